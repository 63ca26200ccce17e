// comm_bench_test.cpp -- `bmoe comm-bench` (trainer/comm_bench.h) under mpiexec: every size and
// collective is checked and timed, bandwidths follow the nccl-tests conventions, and a
// communicator that corrupts data is caught on every rank with one line.
#include "trainer/comm_bench.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <sstream>

#include "parallel/check.h"
#include "parallel/mpi_comm.h"

namespace bmoe::trainer {
namespace {

CommBenchOptions small() {
    CommBenchOptions o;
    o.min_bytes = 1024;
    o.max_bytes = 16384;
    o.iters = 2;
    o.warmup = 1;
    return o;
}

TEST(CommBench, ChecksAndTimesEverySize) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    const int P = world.size();
    std::ostringstream log;
    const std::vector<CommBenchRow> rows = run_comm_bench(small(), world, log);
    ASSERT_EQ(rows.size(), 2u * 5u) << "1, 2, 4, 8 and 16 KiB, two collectives each";
    for (const CommBenchRow& r : rows) {
        EXPECT_GT(r.seconds, 0.0) << r.op << " " << r.bytes;
        EXPECT_NEAR(r.algbw_gbs, r.bytes / r.seconds / 1e9, 1e-9 * r.algbw_gbs);
        const double factor = r.op == "all_reduce" ? 2.0 * (P - 1) / P : (P - 1.0) / P;
        EXPECT_NEAR(r.busbw_gbs, r.algbw_gbs * factor, 1e-9 * r.algbw_gbs) << r.op;
        EXPECT_EQ(r.bytes % (sizeof(float) * P), 0u) << "whole blocks per peer";
    }
    if (world.rank() == 0) EXPECT_THAT(log.str(), ::testing::HasSubstr("all_to_all"));
    if (world.rank() != 0) EXPECT_EQ(log.str(), "") << "only rank 0 prints";
}

// A link that flips one value on the last rank: the all-to-all check fails on every rank alike.
class CorruptingComm final : public parallel::Communicator {
  public:
    explicit CorruptingComm(parallel::Communicator& inner) : inner_(inner) {}
    int rank() const override { return inner_.rank(); }
    int size() const override { return inner_.size(); }
    std::string name() const override { return "corrupting"; }
    void all_reduce_sum(float* b, size_t n) override { inner_.all_reduce_sum(b, n); }
    void all_reduce_sum(double* b, size_t n) override { inner_.all_reduce_sum(b, n); }
    void all_reduce_sum(int64_t* b, size_t n) override { inner_.all_reduce_sum(b, n); }
    void all_reduce_max(double* b, size_t n) override { inner_.all_reduce_max(b, n); }
    void broadcast(void* b, size_t n, int root) override { inner_.broadcast(b, n, root); }
    void all_gather(const void* s, size_t n, void* r) override { inner_.all_gather(s, n, r); }
    void all_to_all_v(const float* s, const int64_t* sc, float* r, const int64_t* rc) override {
        inner_.all_to_all_v(s, sc, r, rc);
        if (rank() == size() - 1) r[0] += 1.0f;
    }
    void all_to_all_v(const int32_t* s, const int64_t* sc, int32_t* r, const int64_t* rc) override {
        inner_.all_to_all_v(s, sc, r, rc);
    }
    std::vector<int64_t> exchange_counts(const std::vector<int64_t>& c) override { return inner_.exchange_counts(c); }
    void barrier() override { inner_.barrier(); }
    std::unique_ptr<Communicator> split(int color, int key) override { return inner_.split(color, key); }

  private:
    parallel::Communicator& inner_;
};

TEST(CommBench, CorruptedResultsAreAOneLineErrorOnEveryRank) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    CorruptingComm corrupting(world);
    std::ostringstream log;
    EXPECT_THAT([&] { run_comm_bench(small(), corrupting, log); },
                ::testing::ThrowsMessage<Error>(
                    ::testing::AllOf(::testing::HasSubstr("all_to_all of 1024 bytes returned wrong values on rank " +
                                                          std::to_string(world.size() - 1)),
                                     ::testing::HasSubstr("corrupts data"))));
}

TEST(CommBench, BadOptionsAreClearErrors) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    std::ostringstream log;
    CommBenchOptions o = small();
    o.min_bytes = 1 << 20;  // above max_bytes
    EXPECT_THAT([&] { run_comm_bench(o, world, log); },
                ::testing::ThrowsMessage<Error>(::testing::HasSubstr("--min-bytes <= --max-bytes")));
    o = small();
    o.iters = 0;
    EXPECT_THAT([&] { run_comm_bench(o, world, log); },
                ::testing::ThrowsMessage<Error>(::testing::HasSubstr("--iters")));
}

}  // namespace
}  // namespace bmoe::trainer
