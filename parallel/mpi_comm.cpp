// mpi_comm.cpp -- MpiComm: collectives over MPI_Comm with int-count-safe large transfers.
#include "parallel/mpi_comm.h"

#include <algorithm>
#include <numeric>

#include "parallel/check.h"
#include "parallel/mpi_check.h"

namespace bmoe::parallel {

namespace {

// Owns a committed derived datatype for the duration of one call.
class ScopedType {
  public:
    ScopedType() = default;
    ScopedType(const ScopedType&) = delete;
    ScopedType& operator=(const ScopedType&) = delete;
    ~ScopedType() {
        if (type_ != MPI_DATATYPE_NULL) MPI_Type_free(&type_);
    }
    MPI_Datatype* out() { return &type_; }
    MPI_Datatype get() const { return type_; }
    void commit() { MPI_CHECK(MPI_Type_commit(&type_)); }

  private:
    MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

// One datatype covering `count` consecutive `element`s, built so that no int argument exceeds
// max_count: a struct of {count / max_count blocks of max_count elements, count % max_count elements}.
void make_contiguous_type(
    int64_t count, MPI_Datatype element, size_t element_size, int64_t max_count, ScopedType& out) {
    BMOE_ASSERT(count > 0 && max_count > 0, "count ", count, " max_count ", max_count);
    if (count <= max_count) {
        MPI_CHECK(MPI_Type_contiguous(static_cast<int>(count), element, out.out()));
        out.commit();
        return;
    }
    const int64_t num_blocks = count / max_count;
    const int64_t remainder = count % max_count;
    BMOE_REQUIRE(num_blocks <= max_count, "a transfer of ", count, " elements needs ", num_blocks,
                 " blocks, more than MPI's int counts allow: send it in smaller pieces");
    ScopedType block;
    MPI_CHECK(MPI_Type_contiguous(static_cast<int>(max_count), element, block.out()));
    int block_lengths[2] = {static_cast<int>(num_blocks), static_cast<int>(remainder)};
    MPI_Aint displacements[2] = {0, static_cast<MPI_Aint>(num_blocks * max_count * static_cast<int64_t>(element_size))};
    MPI_Datatype types[2] = {block.get(), element};
    ScopedType unpadded;
    MPI_CHECK(MPI_Type_create_struct(remainder > 0 ? 2 : 1, block_lengths, displacements, types, unpadded.out()));
    // The extent must be exactly count elements (no alignment padding): displacements count in it.
    MPI_CHECK(MPI_Type_create_resized(unpadded.get(), 0,
                                      static_cast<MPI_Aint>(count * static_cast<int64_t>(element_size)), out.out()));
    out.commit();
}

}  // namespace

int64_t alltoallv_unit(const int64_t* counts, int n, int64_t max_count) {
    auto fits = [&](int64_t unit) {
        int64_t displacement = 0;
        for (int p = 0; p < n; ++p) {
            if (counts[p] / unit > max_count || displacement / unit > max_count) return false;
            displacement += counts[p];
        }
        return true;
    };
    if (fits(1)) return 1;
    int64_t gcd = 0;
    for (int p = 0; p < n; ++p) gcd = std::gcd(gcd, counts[p]);
    return gcd > 1 && fits(gcd) ? gcd : 0;
}

// ----------------------------------------------------------------------------
// construction

MpiComm::MpiComm(MPI_Comm comm) : MpiComm(comm, /*owned=*/false, INT_MAX) {}

MpiComm::MpiComm(MPI_Comm comm, bool owned, int64_t max_count) : comm_(comm), owned_(owned), max_count_(max_count) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    BMOE_REQUIRE(initialized, "MpiComm needs an initialized MPI: create a bmoe::parallel::MpiEnvironment first");
    BMOE_ASSERT(comm != MPI_COMM_NULL, "MpiComm over MPI_COMM_NULL");
    MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiComm::~MpiComm() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    // Errors ignored: destructors must not throw. Reductions still pending (an exception between
    // start and wait) cannot be freed or safely waited for (peers may be gone): the communicator
    // is left to MPI_Abort / MPI_Finalize.
    if (owned_ && pending_.empty()) MPI_Comm_free(&comm_);
}

void MpiComm::set_max_count(int64_t max_count) {
    BMOE_ASSERT(max_count >= 1 && max_count <= INT_MAX, "max_count ", max_count, " outside [1, INT_MAX]");
    max_count_ = max_count;
}

std::unique_ptr<Communicator> MpiComm::split(int color, int key) {
    BMOE_ASSERT(color >= 0, "split color must be >= 0 (got ", color, ")");
    MPI_Comm sub = MPI_COMM_NULL;
    MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
    return std::unique_ptr<Communicator>(new MpiComm(sub, /*owned=*/true, max_count_));
}

void MpiComm::barrier() { MPI_CHECK(MPI_Barrier(comm_)); }

// ----------------------------------------------------------------------------
// reductions: every rank passes the same count, so every rank walks the same chunks

void MpiComm::all_reduce(void* buf, size_t count, size_t element_size, MPI_Datatype type, MPI_Op op) {
    auto* bytes = static_cast<char*>(buf);
    for (size_t offset = 0; offset < count; offset += static_cast<size_t>(max_count_)) {
        const size_t chunk = std::min(count - offset, static_cast<size_t>(max_count_));
        MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, bytes + offset * element_size, static_cast<int>(chunk), type, op, comm_));
    }
}

void MpiComm::all_reduce_sum(float* buf, size_t count) { all_reduce(buf, count, sizeof(float), MPI_FLOAT, MPI_SUM); }
void MpiComm::all_reduce_sum(double* buf, size_t count) { all_reduce(buf, count, sizeof(double), MPI_DOUBLE, MPI_SUM); }
void MpiComm::all_reduce_sum(int64_t* buf, size_t count) {
    all_reduce(buf, count, sizeof(int64_t), MPI_INT64_T, MPI_SUM);
}
void MpiComm::all_reduce_max(double* buf, size_t count) { all_reduce(buf, count, sizeof(double), MPI_DOUBLE, MPI_MAX); }

void MpiComm::start_all_reduce_sum(float* buf, size_t count) {
    for (size_t offset = 0; offset < count; offset += static_cast<size_t>(max_count_)) {
        const size_t chunk = std::min(count - offset, static_cast<size_t>(max_count_));
        MPI_Request request = MPI_REQUEST_NULL;
        MPI_CHECK(
            MPI_Iallreduce(MPI_IN_PLACE, buf + offset, static_cast<int>(chunk), MPI_FLOAT, MPI_SUM, comm_, &request));
        pending_.push_back(request);
    }
}

void MpiComm::progress() {
    if (pending_.empty()) return;
    int done = 0;
    MPI_CHECK(MPI_Testall(static_cast<int>(pending_.size()), pending_.data(), &done, MPI_STATUSES_IGNORE));
    if (done) pending_.clear();
}

void MpiComm::wait_reductions() {
    if (pending_.empty()) return;
    MPI_CHECK(MPI_Waitall(static_cast<int>(pending_.size()), pending_.data(), MPI_STATUSES_IGNORE));
    pending_.clear();
}

// ----------------------------------------------------------------------------
// broadcast / all_gather: byte counts are equal on every rank, so the datatype choice is too

void MpiComm::broadcast(void* buf, size_t num_bytes, int root) {
    BMOE_ASSERT(root >= 0 && root < size_, "broadcast root ", root, " outside [0, ", size_, ")");
    if (num_bytes == 0) return;
    ScopedType type;
    make_contiguous_type(static_cast<int64_t>(num_bytes), MPI_BYTE, 1, max_count_, type);
    MPI_CHECK(MPI_Bcast(buf, 1, type.get(), root, comm_));
}

void MpiComm::all_gather(const void* send, size_t bytes_per_rank, void* recv) {
    if (bytes_per_rank == 0) return;
    ScopedType type;
    make_contiguous_type(static_cast<int64_t>(bytes_per_rank), MPI_BYTE, 1, max_count_, type);
    MPI_CHECK(MPI_Allgather(send, 1, type.get(), recv, 1, type.get(), comm_));
}

// ----------------------------------------------------------------------------
// all-to-all

std::vector<int64_t> MpiComm::exchange_counts(const std::vector<int64_t>& send_counts) {
    BMOE_ASSERT(!send_counts.empty() && send_counts.size() % size_ == 0,
                "exchange_counts needs a multiple of the group size (", size_, ") of counts, got ", send_counts.size());
    const int m = static_cast<int>(send_counts.size() / size_);
    std::vector<int64_t> recv_counts(send_counts.size());
    MPI_CHECK(MPI_Alltoall(send_counts.data(), m, MPI_INT64_T, recv_counts.data(), m, MPI_INT64_T, comm_));
    return recv_counts;
}

void MpiComm::all_to_all_v(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts) {
    all_to_all_v_impl(send, send_counts, recv, recv_counts, MPI_FLOAT, sizeof(float));
}

void MpiComm::all_to_all_v(const int32_t* send, const int64_t* send_counts, int32_t* recv, const int64_t* recv_counts) {
    all_to_all_v_impl(send, send_counts, recv, recv_counts, MPI_INT32_T, sizeof(int32_t));
}

// NOTES: the send and receive sides pick their units independently. That is valid MPI: a
// matching pair needs equal type signatures (the same sequence of base elements), not equal types.
void MpiComm::all_to_all_v_impl(const void* send,
                                const int64_t* send_counts,
                                void* recv,
                                const int64_t* recv_counts,
                                MPI_Datatype type,
                                size_t element_size) {
    for (int p = 0; p < size_; ++p) {
        BMOE_ASSERT(send_counts[p] >= 0 && recv_counts[p] >= 0, "negative all_to_all_v count for peer ", p);
    }
    const int64_t send_unit = alltoallv_unit(send_counts, size_, max_count_);
    const int64_t recv_unit = alltoallv_unit(recv_counts, size_, max_count_);
    BMOE_REQUIRE(send_unit > 0 && recv_unit > 0, "all_to_all_v on rank ", rank_, " moves more than ", max_count_,
                 " elements per peer or in total, and the per-peer counts share no common factor that brings them "
                 "under MPI's int count limit: send fewer rows per step (smaller batch or capacity)");

    std::vector<int> send_n(size_), send_displ(size_), recv_n(size_), recv_displ(size_);
    int64_t send_offset = 0, recv_offset = 0;
    for (int p = 0; p < size_; ++p) {
        send_n[p] = static_cast<int>(send_counts[p] / send_unit);
        send_displ[p] = static_cast<int>(send_offset / send_unit);
        recv_n[p] = static_cast<int>(recv_counts[p] / recv_unit);
        recv_displ[p] = static_cast<int>(recv_offset / recv_unit);
        send_offset += send_counts[p];
        recv_offset += recv_counts[p];
    }
    ScopedType send_type, recv_type;
    if (send_unit > 1) make_contiguous_type(send_unit, type, element_size, max_count_, send_type);
    if (recv_unit > 1) make_contiguous_type(recv_unit, type, element_size, max_count_, recv_type);
    MPI_CHECK(MPI_Alltoallv(send, send_n.data(), send_displ.data(), send_unit > 1 ? send_type.get() : type, recv,
                            recv_n.data(), recv_displ.data(), recv_unit > 1 ? recv_type.get() : type, comm_));
}

}  // namespace bmoe::parallel
