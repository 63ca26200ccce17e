// nccl_comm.cpp -- NcclComm: collectives over NCCL on the shared comm stream; make_nccl_world.
#include "parallel/nccl_comm.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <unistd.h>

#include <cstring>
#include <utility>

#include "parallel/check.h"
#include "parallel/cuda_check.h"
#include "parallel/nccl_check.h"

namespace bmoe::parallel {

namespace {

// One rank's DeviceSlot as fixed-size bytes for all_gather.
struct WireSlot {
    char host[256];
    char pci_bus_id[32];
    int32_t device;
};

DeviceSlot this_device_slot() {
    WireSlot wire{};
    if (gethostname(wire.host, sizeof(wire.host) - 1) != 0) std::strcpy(wire.host, "unknown-host");
    int device = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetPCIBusId(wire.pci_bus_id, sizeof(wire.pci_bus_id), device));
    return DeviceSlot{wire.host, wire.pci_bus_id, device};
}

// Every rank's DeviceSlot, gathered through the host-memory bootstrap communicator.
std::vector<DeviceSlot> gather_device_slots(Communicator& bootstrap) {
    const DeviceSlot mine = this_device_slot();
    WireSlot wire{};
    std::strncpy(wire.host, mine.host.c_str(), sizeof(wire.host) - 1);
    std::strncpy(wire.pci_bus_id, mine.pci_bus_id.c_str(), sizeof(wire.pci_bus_id) - 1);
    wire.device = mine.device;
    std::vector<WireSlot> all(bootstrap.size());
    bootstrap.all_gather(&wire, sizeof(WireSlot), all.data());
    std::vector<DeviceSlot> slots;
    slots.reserve(all.size());
    for (const WireSlot& w : all) slots.push_back(DeviceSlot{w.host, w.pci_bus_id, w.device});
    return slots;
}

std::shared_ptr<CUstream_st> make_comm_stream() {
    cudaStream_t stream = nullptr;
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    return std::shared_ptr<CUstream_st>(stream, [](cudaStream_t s) { cudaStreamDestroy(s); });
}

}  // namespace

std::string find_shared_device(const std::vector<DeviceSlot>& slots) {
    for (size_t a = 0; a < slots.size(); ++a) {
        for (size_t b = a + 1; b < slots.size(); ++b) {
            if (slots[a].host != slots[b].host || slots[a].pci_bus_id != slots[b].pci_bus_id) continue;
            return concat("--parallel.comm=nccl needs one GPU per rank: ranks ", a, " and ", b, " share GPU ",
                          slots[a].device, " (PCI ", slots[a].pci_bus_id, ") on host ", slots[a].host,
                          "; launch one rank per GPU or use --parallel.comm=mpi");
        }
    }
    return "";
}

std::string shared_device_error(Communicator& bootstrap) { return find_shared_device(gather_device_slots(bootstrap)); }

std::unique_ptr<Communicator> make_nccl_world(Communicator& bootstrap, CUstream_st* compute_stream) {
    const std::string shared = shared_device_error(bootstrap);
    BMOE_REQUIRE(shared.empty(), shared);
    ncclUniqueId id{};
    if (bootstrap.rank() == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    bootstrap.broadcast(&id, sizeof(id), 0);
    ncclComm_t comm = nullptr;
    NCCL_CHECK(ncclCommInitRank(&comm, bootstrap.size(), id, bootstrap.rank()));
    return std::make_unique<NcclComm>(comm, compute_stream, make_comm_stream());
}

// ----------------------------------------------------------------------------
// construction

NcclComm::NcclComm(ncclComm* comm, CUstream_st* compute_stream, std::shared_ptr<CUstream_st> comm_stream)
    : comm_stream_(std::move(comm_stream)), comm_(comm), compute_stream_(compute_stream) {
    try {
        BMOE_ASSERT(comm_ != nullptr && comm_stream_ != nullptr, "NcclComm needs a communicator and a comm stream");
        NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
        NCCL_CHECK(ncclCommCount(comm_, &size_));
        CUDA_CHECK(cudaEventCreateWithFlags(&compute_ready_, cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&comm_done_, cudaEventDisableTiming));
    } catch (...) {
        failed_ = true;
        release();
        throw;
    }
}

NcclComm::~NcclComm() { release(); }

// Errors are ignored: destructors must not throw. ncclCommDestroy finalizes (waits for queued
// work, which never ends after a peer failed), so a failed communicator is aborted instead.
void NcclComm::release() noexcept {
    if (comm_ != nullptr) {
        if (failed_) {
            ncclCommAbort(comm_);
        } else {
            ncclCommDestroy(comm_);
        }
        comm_ = nullptr;
    }
    if (counts_dev_ != nullptr) cudaFree(counts_dev_);
    if (compute_ready_ != nullptr) cudaEventDestroy(compute_ready_);
    if (comm_done_ != nullptr) cudaEventDestroy(comm_done_);
    counts_dev_ = nullptr;
    compute_ready_ = comm_done_ = nullptr;
}

std::unique_ptr<Communicator> NcclComm::split(int color, int key) {
    ncclComm_t sub = nullptr;
    guarded("split",
            [&] { NCCL_CHECK(ncclCommSplit(comm_, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &sub, nullptr)); });
    if (sub == nullptr) return nullptr;
    return std::make_unique<NcclComm>(sub, compute_stream_, comm_stream_);
}

// ----------------------------------------------------------------------------
// ordering and error handling

template <typename F>
void NcclComm::guarded(const char* what, F&& f) {
    BMOE_REQUIRE(!failed_, "NcclComm::", what, " after an earlier NCCL failure on rank ", rank_,
                 ": the communicator cannot be recovered, end the job");
    try {
        f();
    } catch (...) {
        failed_ = true;
        throw;
    }
}

template <typename Issue>
void NcclComm::run(const char* what, bool blocking, Issue&& issue) {
    guarded(what, [&] {
        CUDA_CHECK(cudaEventRecord(compute_ready_, compute_stream_));
        CUDA_CHECK(cudaStreamWaitEvent(comm_stream_.get(), compute_ready_, 0));
        issue();
        if (!blocking) return;
        CUDA_CHECK(cudaStreamSynchronize(comm_stream_.get()));
        check_async_error(what);
    });
}

void NcclComm::check_async_error(const char* what) {
    ncclResult_t async_error = ncclSuccess;
    NCCL_CHECK(ncclCommGetAsyncError(comm_, &async_error));
    BMOE_REQUIRE(async_error == ncclSuccess, "NCCL error: ", nccl_error_string(async_error),
                 " (asynchronous, found after ", what, " on rank ", rank_, " of ", size_, ")");
}

int64_t* NcclComm::counts_scratch(size_t count) {
    if (count > counts_capacity_) {
        // Only blocking collectives use the buffer, so none still has it queued.
        if (counts_dev_ != nullptr) CUDA_CHECK(cudaFree(counts_dev_));
        counts_dev_ = nullptr;
        counts_capacity_ = 0;
        CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&counts_dev_), count * sizeof(int64_t)));
        CUDA_CHECK(cudaMemset(counts_dev_, 0, count * sizeof(int64_t)));
        counts_capacity_ = count;
    }
    return counts_dev_;
}

// ----------------------------------------------------------------------------
// reductions: counts are equal on every rank; zero elements return at once (buf may be null)

void NcclComm::all_reduce_sum(float* buf, size_t count) {
    if (count == 0) return;
    run("all_reduce_sum", /*blocking=*/true,
        [&] { NCCL_CHECK(ncclAllReduce(buf, buf, count, ncclFloat32, ncclSum, comm_, comm_stream_.get())); });
}

void NcclComm::all_reduce_sum(double* buf, size_t count) {
    if (count == 0) return;
    run("all_reduce_sum", /*blocking=*/true,
        [&] { NCCL_CHECK(ncclAllReduce(buf, buf, count, ncclFloat64, ncclSum, comm_, comm_stream_.get())); });
}

void NcclComm::all_reduce_sum(int64_t* buf, size_t count) {
    if (count == 0) return;
    run("all_reduce_sum", /*blocking=*/true,
        [&] { NCCL_CHECK(ncclAllReduce(buf, buf, count, ncclInt64, ncclSum, comm_, comm_stream_.get())); });
}

void NcclComm::all_reduce_max(double* buf, size_t count) {
    if (count == 0) return;
    run("all_reduce_max", /*blocking=*/true,
        [&] { NCCL_CHECK(ncclAllReduce(buf, buf, count, ncclFloat64, ncclMax, comm_, comm_stream_.get())); });
}

void NcclComm::start_all_reduce_sum(float* buf, size_t count) {
    if (count == 0) return;
    run("start_all_reduce_sum", /*blocking=*/false,
        [&] { NCCL_CHECK(ncclAllReduce(buf, buf, count, ncclFloat32, ncclSum, comm_, comm_stream_.get())); });
}

void NcclComm::wait_reductions() {
    guarded("wait_reductions", [&] {
        CUDA_CHECK(cudaEventRecord(comm_done_, comm_stream_.get()));
        CUDA_CHECK(cudaStreamWaitEvent(compute_stream_, comm_done_, 0));
        check_async_error("wait_reductions");  // errors seen so far; the host does not wait
    });
}

void NcclComm::barrier() {
    int64_t* one = counts_scratch(1);
    run("barrier", /*blocking=*/true,
        [&] { NCCL_CHECK(ncclAllReduce(one, one, 1, ncclInt64, ncclSum, comm_, comm_stream_.get())); });
}

// ----------------------------------------------------------------------------
// broadcast / all_gather: byte counts are equal on every rank

void NcclComm::broadcast(void* buf, size_t num_bytes, int root) {
    BMOE_ASSERT(root >= 0 && root < size_, "broadcast root ", root, " outside [0, ", size_, ")");
    if (num_bytes == 0) return;
    run("broadcast", /*blocking=*/true,
        [&] { NCCL_CHECK(ncclBroadcast(buf, buf, num_bytes, ncclChar, root, comm_, comm_stream_.get())); });
}

void NcclComm::all_gather(const void* send, size_t bytes_per_rank, void* recv) {
    if (bytes_per_rank == 0) return;
    run("all_gather", /*blocking=*/true,
        [&] { NCCL_CHECK(ncclAllGather(send, recv, bytes_per_rank, ncclChar, comm_, comm_stream_.get())); });
}

// ----------------------------------------------------------------------------
// all-to-all: grouped point-to-point, one send and one receive per peer with a non-zero count

std::vector<int64_t> NcclComm::exchange_counts(const std::vector<int64_t>& send_counts) {
    BMOE_ASSERT(!send_counts.empty() && send_counts.size() % size_ == 0,
                "exchange_counts needs a multiple of the group size (", size_, ") of counts, got ", send_counts.size());
    const size_t n = send_counts.size(), m = n / size_;
    int64_t* send_dev = counts_scratch(2 * n);
    int64_t* recv_dev = send_dev + n;
    std::vector<int64_t> recv_counts(n);
    run("exchange_counts", /*blocking=*/true, [&] {
        cudaStream_t stream = comm_stream_.get();
        CUDA_CHECK(cudaMemcpyAsync(send_dev, send_counts.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice, stream));
        NCCL_CHECK(ncclGroupStart());
        for (int p = 0; p < size_; ++p) {
            NCCL_CHECK(ncclSend(send_dev + p * m, m, ncclInt64, p, comm_, stream));
            NCCL_CHECK(ncclRecv(recv_dev + p * m, m, ncclInt64, p, comm_, stream));
        }
        NCCL_CHECK(ncclGroupEnd());
        CUDA_CHECK(cudaMemcpyAsync(recv_counts.data(), recv_dev, n * sizeof(int64_t), cudaMemcpyDeviceToHost, stream));
    });
    return recv_counts;
}

void NcclComm::all_to_all_v(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts) {
    all_to_all_v_impl(send, send_counts, recv, recv_counts, sizeof(float));
}

void NcclComm::all_to_all_v(const int32_t* send,
                            const int64_t* send_counts,
                            int32_t* recv,
                            const int64_t* recv_counts) {
    all_to_all_v_impl(send, send_counts, recv, recv_counts, sizeof(int32_t));
}

// Moves bytes (ncclChar), so one implementation serves every element type.
void NcclComm::all_to_all_v_impl(
    const void* send, const int64_t* send_counts, void* recv, const int64_t* recv_counts, size_t element_size) {
    for (int p = 0; p < size_; ++p) {
        BMOE_ASSERT(send_counts[p] >= 0 && recv_counts[p] >= 0, "negative all_to_all_v count for peer ", p);
    }
    run("all_to_all_v", /*blocking=*/true, [&] {
        cudaStream_t stream = comm_stream_.get();
        const auto* send_bytes = static_cast<const char*>(send);
        auto* recv_bytes = static_cast<char*>(recv);
        size_t send_offset = 0, recv_offset = 0;  // bytes: prefix sums of the counts
        NCCL_CHECK(ncclGroupStart());
        for (int p = 0; p < size_; ++p) {
            const size_t send_size = static_cast<size_t>(send_counts[p]) * element_size;
            const size_t recv_size = static_cast<size_t>(recv_counts[p]) * element_size;
            if (send_size > 0) NCCL_CHECK(ncclSend(send_bytes + send_offset, send_size, ncclChar, p, comm_, stream));
            if (recv_size > 0) NCCL_CHECK(ncclRecv(recv_bytes + recv_offset, recv_size, ncclChar, p, comm_, stream));
            send_offset += send_size;
            recv_offset += recv_size;
        }
        NCCL_CHECK(ncclGroupEnd());
    });
}

}  // namespace bmoe::parallel
