// nccl_comm_test.cpp -- NcclComm (parallel/nccl_comm.h).
//
// Built twice (tests/CMakeLists.txt):
//   - nccl_comm_test (GoogleTest main, label cpu): find_shared_device, the one-GPU-per-rank rule of
//     make_nccl_world, on made-up rank tables; runs everywhere NCCL is built.
//   - with BMOE_NCCL_COMM_MPI_TEST defined, nccl_comm_mpi_test (under mpiexec, label gpu): every
//     collective on device buffers, checked against values computed on the host for the world size
//     that runs (1 rank on a one-GPU machine, P ranks on a P-GPU one). Inputs are uploaded and
//     results read back asynchronously on the compute stream, so a missing compute <-> comm stream
//     ordering shows up as wrong values. Skips when no CUDA device is visible.
#include "parallel/nccl_comm.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#ifdef BMOE_NCCL_COMM_MPI_TEST
#include <cuda_runtime.h>
#include <mpi.h>

#include <memory>

#include "parallel/cuda_check.h"
#include "parallel/mpi_comm.h"
#include "parallel/mpi_env.h"
#endif

namespace bmoe::parallel {
namespace {

#ifndef BMOE_NCCL_COMM_MPI_TEST

// ----------------------------------------------------------------------------
// find_shared_device (host only)

TEST(NcclSharedDeviceTest, OneGpuPerRankPasses) {
    EXPECT_EQ(find_shared_device({}), "");
    EXPECT_EQ(find_shared_device({{"node1", "0000:1B:00.0", 0}}), "");
    // Same host, different GPUs; and the same bus id on different hosts.
    EXPECT_EQ(find_shared_device({{"node1", "0000:1B:00.0", 0},
                                  {"node1", "0000:43:00.0", 1},
                                  {"node2", "0000:1B:00.0", 0},
                                  {"node2", "0000:43:00.0", 1}}),
              "");
}

TEST(NcclSharedDeviceTest, SharedGpuIsOneLineNamingRanksHostAndFix) {
    const std::string e =
        find_shared_device({{"node1", "0000:1B:00.0", 0}, {"node1", "0000:43:00.0", 1}, {"node1", "0000:1B:00.0", 0}});
    EXPECT_EQ(
        e,
        "--parallel.comm=nccl needs one GPU per rank: ranks 0 and 2 share GPU 0 (PCI 0000:1B:00.0) on host node1; "
        "launch one rank per GPU or use --parallel.comm=mpi");
}

// CUDA_VISIBLE_DEVICES can give two ranks different ordinals for one GPU: the bus id decides.
TEST(NcclSharedDeviceTest, SameBusIdUnderDifferentOrdinals) {
    const std::string e = find_shared_device({{"node1", "0000:43:00.0", 1}, {"node1", "0000:43:00.0", 0}});
    EXPECT_NE(e.find("ranks 0 and 1 share GPU 1 (PCI 0000:43:00.0)"), std::string::npos) << e;
}

// Every rank gathers the same table, so every rank reports the same (first) pair.
TEST(NcclSharedDeviceTest, ReportsTheFirstPairInRankOrder) {
    const std::string e = find_shared_device(
        {{"a", "0000:01:00.0", 0}, {"b", "0000:02:00.0", 1}, {"b", "0000:02:00.0", 1}, {"a", "0000:01:00.0", 0}});
    EXPECT_NE(e.find("ranks 0 and 3 share GPU 0 (PCI 0000:01:00.0) on host a;"), std::string::npos) << e;
}

#else  // BMOE_NCCL_COMM_MPI_TEST

// ----------------------------------------------------------------------------
// helpers

// n elements of device memory, copied to and from the host on the compute stream.
template <typename T>
class DeviceArray {
  public:
    DeviceArray(cudaStream_t stream, size_t n) : stream_(stream), n_(n) {
        if (n_ > 0) CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr_), n_ * sizeof(T)));
    }
    DeviceArray(cudaStream_t stream, const std::vector<T>& host) : DeviceArray(stream, host.size()) { upload(host); }
    DeviceArray(const DeviceArray&) = delete;
    DeviceArray& operator=(const DeviceArray&) = delete;
    ~DeviceArray() {
        if (ptr_ != nullptr) cudaFree(ptr_);
    }

    T* data() { return ptr_; }
    // Asynchronous: the communicator must order its work after it.
    void upload(const std::vector<T>& host) {
        if (n_ > 0) CUDA_CHECK(cudaMemcpyAsync(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice, stream_));
    }
    std::vector<T> download() const {
        std::vector<T> host(n_);
        if (n_ > 0) CUDA_CHECK(cudaMemcpyAsync(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost, stream_));
        CUDA_CHECK(cudaStreamSynchronize(stream_));
        return host;
    }

  private:
    cudaStream_t stream_;
    size_t n_;
    T* ptr_ = nullptr;
};

// Fails with the first differing element (a million EXPECT_EQs would flood the log).
template <typename T>
void expect_equal(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    for (size_t i = 0; i < got.size(); ++i) {
        if (got[i] != want[i]) {
            ADD_FAILURE() << what << ": element " << i << " is " << +got[i] << ", expected " << +want[i];
            return;
        }
    }
}

// Rows rank src sends to rank dst in round `seed`: 0..4, uneven across pairs, zero for some.
int64_t num_rows(int seed, int src, int dst) { return (seed * 7 + src * 3 + dst * 5) % 5; }

// Exact in float for src, dst < 8, rows < 5, width < 10.
float encode_f(int src, int dst, int64_t row, int col) {
    return static_cast<float>(src * 1000 + dst * 100 + row * 10 + col);
}
int32_t encode_i(int src, int dst, int64_t row, int col) {
    return (src << 24) | (dst << 16) | static_cast<int32_t>(row << 8) | col;
}

// One exchange_counts + all_to_all_v round with provenance rows of `width` elements.
template <typename T, typename Encode>
void check_all_to_all_v(Communicator& comm, cudaStream_t stream, int seed, int width, Encode encode) {
    const int P = comm.size(), me = comm.rank();
    std::vector<int64_t> send_counts(P), want_recv_counts(P);
    for (int p = 0; p < P; ++p) {
        send_counts[p] = num_rows(seed, me, p) * width;
        want_recv_counts[p] = num_rows(seed, p, me) * width;
    }
    const std::vector<int64_t> recv_counts = comm.exchange_counts(send_counts);
    ASSERT_EQ(recv_counts, want_recv_counts) << "seed " << seed;

    std::vector<T> send, want;
    for (int p = 0; p < P; ++p) {
        for (int64_t i = 0; i < send_counts[p] / width; ++i)
            for (int j = 0; j < width; ++j) send.push_back(encode(me, p, i, j));
        for (int64_t i = 0; i < recv_counts[p] / width; ++i)
            for (int j = 0; j < width; ++j) want.push_back(encode(p, me, i, j));
    }
    want.push_back(T(-1));  // a sentinel past the end
    DeviceArray<T> send_dev(stream, send);
    DeviceArray<T> recv_dev(stream, std::vector<T>(want.size(), T(-1)));
    comm.all_to_all_v(send_dev.data(), send_counts.data(), recv_dev.data(), recv_counts.data());
    expect_equal(recv_dev.download(), want, "all_to_all_v seed " + std::to_string(seed));
}

// The NCCL world over MPI_COMM_WORLD, made once for the suite (NCCL initialization is slow).
class NcclCommTest : public ::testing::Test {
  protected:
    static void SetUpTestSuite() {
        int num_devices = 0;
        has_device_ = cudaGetDeviceCount(&num_devices) == cudaSuccess && num_devices > 0;
        if (!has_device_) {
            cudaGetLastError();  // clear the (non-sticky) error
            return;
        }
        CUDA_CHECK(cudaSetDevice(launch_info().local_rank % num_devices));
        CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        bootstrap_ = std::make_unique<MpiComm>(MPI_COMM_WORLD);
        world_ = make_nccl_world(*bootstrap_, stream_);
    }
    static void TearDownTestSuite() {
        world_.reset();
        bootstrap_.reset();
        if (stream_ != nullptr) cudaStreamDestroy(stream_);
        stream_ = nullptr;
    }
    // tests/CMakeLists.txt reports the run as skipped when the skip message appears.
    void SetUp() override {
        if (!has_device_) GTEST_SKIP() << "no CUDA device visible";
        ASSERT_NE(world_, nullptr) << "make_nccl_world failed in SetUpTestSuite";
        P_ = world_->size();
        me_ = world_->rank();
    }

    static inline bool has_device_ = false;
    static inline cudaStream_t stream_ = nullptr;  // the compute stream
    static inline std::unique_ptr<MpiComm> bootstrap_;
    static inline std::unique_ptr<Communicator> world_;
    int P_ = 0, me_ = 0;
};

// ----------------------------------------------------------------------------
// reductions

TEST_F(NcclCommTest, Identity) {
    EXPECT_EQ(world_->name(), "nccl");
    EXPECT_TRUE(world_->device_memory());
    EXPECT_EQ(world_->size(), bootstrap_->size());
    EXPECT_EQ(world_->rank(), bootstrap_->rank());
}

TEST_F(NcclCommTest, AllReduceSumFloat) {
    const size_t n = (size_t{1} << 20) + 3;
    std::vector<float> mine(n), want(n);
    for (size_t i = 0; i < n; ++i) {
        mine[i] = static_cast<float>(me_ + 1) + 0.5f * static_cast<float>(i % 1000);
        want[i] = static_cast<float>(P_ * (P_ + 1) / 2) + 0.5f * static_cast<float>(P_ * (i % 1000));
    }
    DeviceArray<float> buf(stream_, mine);
    world_->all_reduce_sum(buf.data(), n);
    expect_equal(buf.download(), want, "float sum");
}

TEST_F(NcclCommTest, AllReduceSumDoubleAndInt64) {
    const size_t n = 1001;
    std::vector<double> mine_d(n), want_d(n);
    std::vector<int64_t> mine_i(n), want_i(n);
    for (size_t i = 0; i < n; ++i) {
        mine_d[i] = 0.25 * (me_ + 1) + static_cast<double>(i);
        want_d[i] = 0.25 * (P_ * (P_ + 1) / 2) + static_cast<double>(P_ * i);
        mine_i[i] = (int64_t{me_ + 1} << 40) + static_cast<int64_t>(i);  // needs 64 bits
        want_i[i] = (int64_t{P_ * (P_ + 1) / 2} << 40) + static_cast<int64_t>(P_ * i);
    }
    DeviceArray<double> buf_d(stream_, mine_d);
    DeviceArray<int64_t> buf_i(stream_, mine_i);
    world_->all_reduce_sum(buf_d.data(), n);
    world_->all_reduce_sum(buf_i.data(), n);
    expect_equal(buf_d.download(), want_d, "double sum");
    expect_equal(buf_i.download(), want_i, "int64 sum");
}

TEST_F(NcclCommTest, AllReduceMax) {
    const size_t n = 777;
    std::vector<double> mine(n), want(n);
    for (size_t i = 0; i < n; ++i) {
        const double big = 100.0 + static_cast<double>(i);  // held by rank i % P only
        mine[i] = static_cast<int>(i % P_) == me_ ? big : -static_cast<double>(i) - me_;
        want[i] = big;
    }
    DeviceArray<double> buf(stream_, mine);
    world_->all_reduce_max(buf.data(), n);
    expect_equal(buf.download(), want, "max");
}

// Started sums are ordered after the (asynchronous) uploads, and work queued on the compute stream
// after wait_reductions() sees the sums: the copy below runs on the compute stream.
TEST_F(NcclCommTest, StartedSumsCompleteForLaterComputeWork) {
    const size_t n_a = size_t{1} << 22, n_b = 999;
    std::vector<float> a(n_a), b(n_b), want_a(n_a), want_b(n_b);
    for (size_t i = 0; i < n_a; ++i) {
        a[i] = static_cast<float>((i + me_) % 64);
        want_a[i] = 0.0f;
        for (int r = 0; r < P_; ++r) want_a[i] += static_cast<float>((i + r) % 64);
    }
    for (size_t i = 0; i < n_b; ++i) {
        b[i] = static_cast<float>(me_ * 1000 + i);
        want_b[i] = static_cast<float>(P_ * (P_ - 1) / 2 * 1000 + P_ * i);
    }
    DeviceArray<float> buf_a(stream_, a), buf_b(stream_, b), copy_a(stream_, n_a);
    world_->start_all_reduce_sum(buf_a.data(), n_a);
    world_->start_all_reduce_sum(buf_b.data(), n_b);
    world_->progress();
    world_->wait_reductions();
    CUDA_CHECK(cudaMemcpyAsync(copy_a.data(), buf_a.data(), n_a * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
    expect_equal(copy_a.download(), want_a, "started sum a");
    expect_equal(buf_b.download(), want_b, "started sum b");
}

// ----------------------------------------------------------------------------
// broadcast / all_gather

TEST_F(NcclCommTest, BroadcastFromLastRank) {
    const size_t n = 1001;
    const int root = P_ - 1;
    std::vector<uint8_t> mine(n), want(n);
    for (size_t i = 0; i < n; ++i) {
        mine[i] = static_cast<uint8_t>(me_ * 31 + i);
        want[i] = static_cast<uint8_t>(root * 31 + i);
    }
    DeviceArray<uint8_t> buf(stream_, mine);
    world_->broadcast(buf.data(), n, root);
    expect_equal(buf.download(), want, "broadcast");
}

TEST_F(NcclCommTest, AllGather) {
    const size_t bytes_per_rank = 37;
    std::vector<uint8_t> mine(bytes_per_rank), want(bytes_per_rank * P_);
    for (size_t i = 0; i < bytes_per_rank; ++i) mine[i] = static_cast<uint8_t>(me_ * 7 + i);
    for (int r = 0; r < P_; ++r)
        for (size_t i = 0; i < bytes_per_rank; ++i) want[r * bytes_per_rank + i] = static_cast<uint8_t>(r * 7 + i);
    DeviceArray<uint8_t> send(stream_, mine), recv(stream_, want.size());
    world_->all_gather(send.data(), bytes_per_rank, recv.data());
    expect_equal(recv.download(), want, "all_gather");
}

// ----------------------------------------------------------------------------
// all-to-all

TEST_F(NcclCommTest, ExchangeCountsTransposes) {
    for (int m : {1, 3}) {
        std::vector<int64_t> send(static_cast<size_t>(P_) * m), want(send.size());
        for (int p = 0; p < P_; ++p) {
            for (int i = 0; i < m; ++i) {
                send[p * m + i] = (int64_t{1} << 40) + 1000 * me_ + 10 * p + i;
                want[p * m + i] = (int64_t{1} << 40) + 1000 * p + 10 * me_ + i;
            }
        }
        EXPECT_EQ(world_->exchange_counts(send), want) << m << " counts per peer";
    }
}

// Rounds 0..4 give every pair each row count 0..4 once (zero counts included) at any world size.
TEST_F(NcclCommTest, AllToAllVProvenanceFloat) {
    for (int seed = 0; seed < 5; ++seed) {
        check_all_to_all_v<float>(*world_, stream_, seed, /*width=*/3, encode_f);
        if (HasFatalFailure()) return;
    }
}

TEST_F(NcclCommTest, AllToAllVProvenanceInt32) {
    for (int seed = 0; seed < 5; ++seed) {
        check_all_to_all_v<int32_t>(*world_, stream_, seed, /*width=*/5, encode_i);
        if (HasFatalFailure()) return;
    }
}

// Zero-sized calls move nothing and accept null buffers (an empty Buffer's data()).
TEST_F(NcclCommTest, ZeroSizedCallsAreNoOps) {
    const std::vector<int64_t> zeros(P_, 0);
    DeviceArray<float> send(stream_, std::vector<float>{1.0f}), recv(stream_, std::vector<float>{2.0f});
    world_->all_to_all_v(send.data(), zeros.data(), recv.data(), zeros.data());
    EXPECT_EQ(recv.download(), std::vector<float>{2.0f});
    world_->all_reduce_sum(static_cast<float*>(nullptr), 0);
    world_->all_reduce_max(nullptr, 0);
    world_->start_all_reduce_sum(nullptr, 0);
    world_->wait_reductions();
    world_->broadcast(nullptr, 0, 0);
    world_->all_gather(nullptr, 0, nullptr);
}

// ----------------------------------------------------------------------------
// split / barrier

// Sub-communicators share the comm stream with the world: interleaved use must neither deadlock nor
// mix up results.
TEST_F(NcclCommTest, SplitOrdersByKey) {
    std::unique_ptr<Communicator> same = world_->split(0, me_);
    std::unique_ptr<Communicator> reversed = world_->split(0, -me_);
    ASSERT_NE(same, nullptr);
    ASSERT_NE(reversed, nullptr);
    EXPECT_EQ(same->name(), "nccl");
    EXPECT_EQ(same->size(), P_);
    EXPECT_EQ(same->rank(), me_);
    EXPECT_EQ(reversed->size(), P_);
    EXPECT_EQ(reversed->rank(), P_ - 1 - me_);

    DeviceArray<int64_t> a(stream_, std::vector<int64_t>{me_}), b(stream_, std::vector<int64_t>{1});
    same->all_reduce_sum(a.data(), 1);
    world_->all_reduce_sum(b.data(), 1);
    reversed->all_reduce_sum(a.data(), 1);
    EXPECT_EQ(a.download(), std::vector<int64_t>{P_ * P_ * (P_ - 1) / 2});
    EXPECT_EQ(b.download(), std::vector<int64_t>{P_});

    // The broadcast root is a rank of `reversed`: world rank P-1.
    DeviceArray<int32_t> c(stream_, std::vector<int32_t>{me_});
    reversed->broadcast(c.data(), sizeof(int32_t), 0);
    EXPECT_EQ(c.download(), std::vector<int32_t>{P_ - 1});
}

TEST_F(NcclCommTest, Barrier) {
    world_->barrier();
    world_->barrier();
    SUCCEED();
}

#endif  // BMOE_NCCL_COMM_MPI_TEST

}  // namespace
}  // namespace bmoe::parallel
