// comm_test.cpp -- Communicator checks under mpiexec (run with 1, 2 and 4 ranks): provenance-encoded
// all_to_all_v with seeded random per-peer counts, all-reduce (exact and rank-identical), broadcast,
// all_gather, exchange_counts, split, the large-count paths (max_count lowered), LocalComm, and
// launcher detection / LaunchInfo from fake environments.
//
// Provenance (DeepEP / nccl-tests style): element j of row i sent from rank s to rank d holds
// encode(s, d, i, j), and the per-peer row counts come from a hash of (seed, s, d) that every rank
// recomputes, so each receiver checks exactly where every element came from.
#include <gtest/gtest.h>
#include <mpi.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "parallel/check.h"
#include "parallel/local_comm.h"
#include "parallel/mpi_comm.h"
#include "parallel/mpi_env.h"

namespace bmoe::parallel {
namespace {

// ----------------------------------------------------------------------------
// helpers

constexpr uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Rows rank src sends to rank dst for this seed: 0 .. max_rows, zero for about a quarter of the
// pairs, and zero for everything rank (seed % P) sends ("a rank with no tokens for anyone").
int64_t num_rows(uint64_t seed, int src, int dst, int num_ranks, int64_t max_rows) {
    if (num_ranks > 1 && src == static_cast<int>(seed % num_ranks)) return 0;
    const uint64_t h = mix64(mix64(seed * 1000003ull + src) ^ (static_cast<uint64_t>(dst) << 32));
    if (h % 4 == 0) return 0;
    return static_cast<int64_t>((h >> 8) % static_cast<uint64_t>(max_rows + 1));
}

// Exact in float (< 2^24) for src, dst < 8, rows < 100, row width < 10.
float encode_f(int src, int dst, int64_t row, int col) {
    return static_cast<float>(src * 2000000 + dst * 200000 + row * 10 + col);
}
int32_t encode_i(int src, int dst, int64_t row, int col) {
    return (src << 24) | (dst << 20) | static_cast<int32_t>(row << 4) | col;
}

// One all_to_all_v round with provenance rows of `width` elements; every error names the source.
template <typename T, typename Encode>
void check_all_to_all_v(Communicator& comm, uint64_t seed, int width, int64_t max_rows, Encode encode) {
    const int P = comm.size(), me = comm.rank();
    std::vector<int64_t> send_counts(P), expected_recv_counts(P);
    for (int p = 0; p < P; ++p) {
        send_counts[p] = num_rows(seed, me, p, P, max_rows) * width;
        expected_recv_counts[p] = num_rows(seed, p, me, P, max_rows) * width;
    }
    std::vector<int64_t> recv_counts = comm.exchange_counts(send_counts);
    ASSERT_EQ(recv_counts, expected_recv_counts) << "seed " << seed;

    std::vector<T> send;
    for (int p = 0; p < P; ++p) {
        for (int64_t i = 0; i < send_counts[p] / width; ++i) {
            for (int j = 0; j < width; ++j) send.push_back(encode(me, p, i, j));
        }
    }
    int64_t num_recv = 0;
    for (int64_t c : recv_counts) num_recv += c;
    std::vector<T> recv(num_recv + 1, T(-1));  // one sentinel past the end
    comm.all_to_all_v(send.data(), send_counts.data(), recv.data(), recv_counts.data());

    int64_t offset = 0;
    for (int p = 0; p < P; ++p) {
        for (int64_t i = 0; i < recv_counts[p] / width; ++i) {
            for (int j = 0; j < width; ++j, ++offset) {
                ASSERT_EQ(recv[offset], encode(p, me, i, j))
                    << "seed " << seed << ": row " << i << " col " << j << " from rank " << p << " on rank " << me;
            }
        }
    }
    EXPECT_EQ(recv[num_recv], T(-1)) << "wrote past the receive buffer";
}

class CommTest : public ::testing::Test {
  protected:
    MpiComm world_{MPI_COMM_WORLD};
};

// ----------------------------------------------------------------------------
// all_to_all_v and exchange_counts

TEST_F(CommTest, ExchangeCountsTransposes) {
    const int P = world_.size(), me = world_.rank();
    std::vector<int64_t> send(P);
    for (int p = 0; p < P; ++p) send[p] = 100 * me + p + (int64_t{1} << 40);  // needs 64 bits
    std::vector<int64_t> recv = world_.exchange_counts(send);
    ASSERT_EQ(recv.size(), static_cast<size_t>(P));
    for (int p = 0; p < P; ++p) EXPECT_EQ(recv[p], 100 * p + me + (int64_t{1} << 40)) << "from rank " << p;
}

TEST_F(CommTest, ExchangeCountsSeveralPerPeer) {
    const int P = world_.size(), me = world_.rank(), m = 3;
    std::vector<int64_t> send(static_cast<size_t>(P) * m);
    for (int p = 0; p < P; ++p)
        for (int i = 0; i < m; ++i) send[p * m + i] = 1000 * me + 10 * p + i;
    std::vector<int64_t> recv = world_.exchange_counts(send);
    ASSERT_EQ(recv.size(), send.size());
    for (int p = 0; p < P; ++p)
        for (int i = 0; i < m; ++i) EXPECT_EQ(recv[p * m + i], 1000 * p + 10 * me + i) << "from rank " << p;
}

TEST_F(CommTest, AllToAllVProvenanceFloat) {
    for (uint64_t seed = 0; seed < 24; ++seed) {
        check_all_to_all_v<float>(world_, seed, /*width=*/3, /*max_rows=*/20, encode_f);
        if (HasFatalFailure()) return;
    }
}

TEST_F(CommTest, AllToAllVProvenanceInt32) {
    for (uint64_t seed = 100; seed < 124; ++seed) {
        check_all_to_all_v<int32_t>(world_, seed, /*width=*/5, /*max_rows=*/20, encode_i);
        if (HasFatalFailure()) return;
    }
}

TEST_F(CommTest, AllToAllVAllZeroCounts) {
    const int P = world_.size();
    std::vector<int64_t> zeros(P, 0);
    float send = 1.0f, recv = 2.0f;
    world_.all_to_all_v(&send, zeros.data(), &recv, zeros.data());
    EXPECT_EQ(recv, 2.0f);
}

// Rows of 8 elements, 0..2 rows per peer, at most 10 elements per MPI argument: counts of 16 and
// displacements up to 48 only fit as units of the rows' common factor (8 or 16 elements; 16 also
// exceeds max_count, so the unit itself is a block-plus-remainder datatype).
TEST_F(CommTest, AllToAllVLargeCountUnits) {
    world_.set_max_count(10);
    for (uint64_t seed = 0; seed < 24; ++seed) {
        check_all_to_all_v<float>(world_, seed, /*width=*/8, /*max_rows=*/2, encode_f);
        check_all_to_all_v<int32_t>(world_, seed, /*width=*/8, /*max_rows=*/2, encode_i);
        if (HasFatalFailure()) return;
    }
}

TEST_F(CommTest, AllToAllVThrowsWhenNoUnitFits) {
    const int P = world_.size();
    if (P < 2) GTEST_SKIP() << "needs two ranks for coprime per-peer counts";
    world_.set_max_count(10);
    // Every rank sends 11, 12, ... elements (gcd 1, each over 10): every rank throws before MPI.
    std::vector<int64_t> send_counts(P), recv_counts(P, 11 + world_.rank());
    int64_t total = 0;
    for (int p = 0; p < P; ++p) total += send_counts[p] = 11 + p;
    std::vector<float> send(total), recv(11 * P + P);
    EXPECT_THROW(world_.all_to_all_v(send.data(), send_counts.data(), recv.data(), recv_counts.data()), Error);
}

TEST(AllToAllVUnit, PicksOneThenCommonFactorThenNothing) {
    const int64_t fits[] = {3, 0, 4};
    EXPECT_EQ(alltoallv_unit(fits, 3, 10), 1);
    const int64_t rows_of_8[] = {16, 0, 8, 24};  // 16 > 10; displacements 0,16,16,24
    EXPECT_EQ(alltoallv_unit(rows_of_8, 4, 10), 8);
    const int64_t coprime[] = {11, 12};
    EXPECT_EQ(alltoallv_unit(coprime, 2, 10), 0);
    const int64_t total_too_big[] = {8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8};  // 12 units, displacement 11 > 10
    EXPECT_EQ(alltoallv_unit(total_too_big, 12, 10), 0);
    const int64_t zeros[] = {0, 0};
    EXPECT_EQ(alltoallv_unit(zeros, 2, 10), 1);
}

// ----------------------------------------------------------------------------
// reductions

TEST_F(CommTest, AllReduceSumIsExactForIntegers) {
    const int P = world_.size(), me = world_.rank();
    const int64_t rank_sum = int64_t{P} * (P + 1) / 2;          // sum of (rank + 1)
    for (int64_t max_count : {int64_t{INT_MAX}, int64_t{7}}) {  // 7: 30 elements go in 5 chunks
        world_.set_max_count(max_count);
        std::vector<float> f(30);
        std::vector<double> d(30);
        std::vector<int64_t> n(30);
        for (int i = 0; i < 30; ++i) {
            f[i] = static_cast<float>((me + 1) * (i + 1));
            d[i] = 0.5 * (me + 1) * (i + 1);
            n[i] = (int64_t{me + 1} << 40) + i;
        }
        world_.all_reduce_sum(f.data(), f.size());
        world_.all_reduce_sum(d.data(), d.size());
        world_.all_reduce_sum(n.data(), n.size());
        for (int i = 0; i < 30; ++i) {
            EXPECT_EQ(f[i], static_cast<float>(rank_sum * (i + 1))) << "float " << i;
            EXPECT_EQ(d[i], 0.5 * rank_sum * (i + 1)) << "double " << i;
            EXPECT_EQ(n[i], (rank_sum << 40) + int64_t{P} * i) << "int64 " << i;
        }
    }
}

TEST_F(CommTest, AllReduceMax) {
    const int P = world_.size(), me = world_.rank();
    std::vector<double> x(17);
    for (int i = 0; i < 17; ++i) x[i] = (i % 2 == 0 ? 1.5 : -1.5) * me - i;
    world_.all_reduce_max(x.data(), x.size());
    for (int i = 0; i < 17; ++i) {
        const double expected = (i % 2 == 0 ? 1.5 * (P - 1) : 0.0) - i;
        EXPECT_EQ(x[i], expected) << i;
    }
}

// Non-integer float sums depend on the summation order; every rank must still hold the same bits.
TEST_F(CommTest, AllReduceFloatIsBitwiseIdenticalOnEveryRank) {
    const int P = world_.size(), me = world_.rank();
    std::vector<float> x(1000);
    for (size_t i = 0; i < x.size(); ++i) x[i] = 0.1f * static_cast<float>(me + 1) + 1e-3f * i + 1e-7f * me * i;
    world_.all_reduce_sum(x.data(), x.size());
    std::vector<float> all(x.size() * P);
    world_.all_gather(x.data(), x.size() * sizeof(float), all.data());
    for (int p = 1; p < P; ++p) {
        EXPECT_EQ(std::memcmp(all.data(), all.data() + p * x.size(), x.size() * sizeof(float)), 0)
            << "rank " << p << " reduced to different bits than rank 0";
    }
}

// ----------------------------------------------------------------------------
// broadcast and all_gather

TEST_F(CommTest, BroadcastFromEveryRoot) {
    const int P = world_.size(), me = world_.rank();
    for (int64_t max_count : {int64_t{INT_MAX}, int64_t{8}}) {  // 8: 50 bytes = 6 blocks + 2
        world_.set_max_count(max_count);
        for (int root = 0; root < P; ++root) {
            for (size_t num_bytes : {size_t{0}, size_t{1}, size_t{50}}) {
                std::vector<uint8_t> buf(num_bytes + 1, 0xEE);
                if (me == root) {
                    for (size_t i = 0; i < num_bytes; ++i) buf[i] = static_cast<uint8_t>(root * 31 + i);
                }
                world_.broadcast(buf.data(), num_bytes, root);
                for (size_t i = 0; i < num_bytes; ++i) {
                    ASSERT_EQ(buf[i], static_cast<uint8_t>(root * 31 + i)) << "root " << root << " byte " << i;
                }
                EXPECT_EQ(buf[num_bytes], 0xEE) << "wrote past the buffer";
            }
        }
    }
}

TEST_F(CommTest, AllGatherPlacesEveryRankInOrder) {
    const int P = world_.size(), me = world_.rank();
    for (int64_t max_count : {int64_t{INT_MAX}, int64_t{8}}) {
        world_.set_max_count(max_count);
        const int n = 13;  // ints per rank: 52 bytes
        std::vector<int32_t> send(n), recv(n * P + 1, -1);
        for (int j = 0; j < n; ++j) send[j] = encode_i(me, 0, j, 0);
        world_.all_gather(send.data(), n * sizeof(int32_t), recv.data());
        for (int p = 0; p < P; ++p) {
            for (int j = 0; j < n; ++j) ASSERT_EQ(recv[p * n + j], encode_i(p, 0, j, 0)) << "rank " << p << " " << j;
        }
        EXPECT_EQ(recv[n * P], -1);
    }
}

// ----------------------------------------------------------------------------
// split

TEST_F(CommTest, SplitByParityOrderedByKey) {
    const int P = world_.size(), me = world_.rank();
    // Odd and even ranks; key = -rank reverses the order inside each half.
    std::unique_ptr<Communicator> half = world_.split(me % 2, -me);
    std::vector<int> members;
    for (int r = P - 1; r >= 0; --r) {
        if (r % 2 == me % 2) members.push_back(r);
    }
    ASSERT_EQ(half->size(), static_cast<int>(members.size()));
    EXPECT_EQ(members[half->rank()], me);
    EXPECT_EQ(half->name(), "mpi");

    std::vector<int32_t> ranks(half->size());
    const int32_t mine = me;
    half->all_gather(&mine, sizeof(mine), ranks.data());
    EXPECT_EQ(std::vector<int>(ranks.begin(), ranks.end()), members);

    int64_t sum = me;
    half->all_reduce_sum(&sum, 1);
    int64_t expected = 0;
    for (int r : members) expected += r;
    EXPECT_EQ(sum, expected);

    // A split of a split, and an all-to-all inside it.
    std::unique_ptr<Communicator> single = half->split(half->rank(), 0);
    EXPECT_EQ(single->size(), 1);
    check_all_to_all_v<float>(*single, 7, 2, 5, encode_f);
    for (uint64_t seed = 0; seed < 8; ++seed) check_all_to_all_v<float>(*half, seed, 2, 9, encode_f);
    half->barrier();
}

TEST_F(CommTest, SplitInheritsMaxCount) {
    world_.set_max_count(10);
    std::unique_ptr<Communicator> copy = world_.split(0, world_.rank());
    EXPECT_EQ(dynamic_cast<MpiComm&>(*copy).max_count(), 10);
    check_all_to_all_v<float>(*copy, 3, 8, 2, encode_f);
}

// ----------------------------------------------------------------------------
// LocalComm

TEST(LocalCommTest, IsTheIdentity) {
    LocalComm local;
    EXPECT_EQ(local.rank(), 0);
    EXPECT_EQ(local.size(), 1);
    EXPECT_EQ(local.name(), "local");

    std::vector<float> f = {1.5f, -2.0f};
    std::vector<double> d = {3.25};
    std::vector<int64_t> n = {int64_t{1} << 50};
    local.all_reduce_sum(f.data(), f.size());
    local.all_reduce_sum(d.data(), d.size());
    local.all_reduce_sum(n.data(), n.size());
    local.all_reduce_max(d.data(), d.size());
    EXPECT_EQ(f, (std::vector<float>{1.5f, -2.0f}));
    EXPECT_EQ(d, (std::vector<double>{3.25}));
    EXPECT_EQ(n, (std::vector<int64_t>{int64_t{1} << 50}));

    char buf[4] = {'a', 'b', 'c', 'd'};
    local.broadcast(buf, sizeof(buf), 0);
    EXPECT_EQ(std::string(buf, 4), "abcd");
    char gathered[4] = {};
    local.all_gather(buf, sizeof(buf), gathered);
    EXPECT_EQ(std::string(gathered, 4), "abcd");

    EXPECT_EQ(local.exchange_counts({6}), (std::vector<int64_t>{6}));
    for (uint64_t seed = 0; seed < 8; ++seed) {
        check_all_to_all_v<float>(local, seed, 3, 20, encode_f);
        check_all_to_all_v<int32_t>(local, seed, 3, 20, encode_i);
    }
    local.barrier();
    std::unique_ptr<Communicator> sub = local.split(0, 0);
    EXPECT_EQ(sub->size(), 1);
    EXPECT_EQ(sub->name(), "local");
}

TEST(LocalCommTest, RejectsMismatchedSelfCounts) {
    LocalComm local;
    const int64_t send_count = 2, recv_count = 3;
    float send[2] = {}, recv[3] = {};
    EXPECT_THROW(local.all_to_all_v(send, &send_count, recv, &recv_count), Error);
}

// ----------------------------------------------------------------------------
// launcher detection and LaunchInfo

EnvLookup fake_env(std::map<std::string, std::string> vars) {
    return [vars = std::move(vars)](const char* name) -> const char* {
        auto it = vars.find(name);
        return it == vars.end() ? nullptr : it->second.c_str();
    };
}

TEST(LaunchInfoTest, OpenMpi) {
    EnvLookup env = fake_env({{"OMPI_COMM_WORLD_RANK", "5"},
                              {"OMPI_COMM_WORLD_SIZE", "8"},
                              {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                              {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"},
                              {"SLURM_PROCID", "0"},  // Open MPI wins over an enclosing allocation
                              {"SLURM_NTASKS", "1"}});
    EXPECT_TRUE(launched_under_mpi(env));
    std::optional<LaunchInfo> info = launch_info_from_env(env);
    ASSERT_TRUE(info.has_value());
    EXPECT_EQ(info->rank, 5);
    EXPECT_EQ(info->world_size, 8);
    EXPECT_EQ(info->local_rank, 1);
    EXPECT_EQ(info->local_size, 4);
    EXPECT_EQ(info->source, "openmpi");
}

TEST(LaunchInfoTest, MpichHydra) {
    EnvLookup env =
        fake_env({{"PMI_RANK", "3"}, {"PMI_SIZE", "4"}, {"MPI_LOCALRANKID", "1"}, {"MPI_LOCALNRANKS", "2"}});
    EXPECT_TRUE(launched_under_mpi(env));
    std::optional<LaunchInfo> info = launch_info_from_env(env);
    ASSERT_TRUE(info.has_value());
    EXPECT_EQ(info->rank, 3);
    EXPECT_EQ(info->local_size, 2);
    EXPECT_EQ(info->source, "pmi");
}

TEST(LaunchInfoTest, SlurmWithCompressedTasksPerNode) {
    EnvLookup env = fake_env({{"SLURM_PROCID", "9"},
                              {"SLURM_NTASKS", "10"},
                              {"SLURM_LOCALID", "0"},
                              {"SLURM_NODEID", "3"},
                              {"SLURM_TASKS_PER_NODE", "3(x3),1"}});
    EXPECT_TRUE(launched_under_mpi(env));
    std::optional<LaunchInfo> info = launch_info_from_env(env);
    ASSERT_TRUE(info.has_value());
    EXPECT_EQ(info->rank, 9);
    EXPECT_EQ(info->world_size, 10);
    EXPECT_EQ(info->local_rank, 0);
    EXPECT_EQ(info->local_size, 1);
    EXPECT_EQ(info->source, "slurm");
}

TEST(LaunchInfoTest, SlurmTasksOnNode) {
    EXPECT_EQ(slurm_tasks_on_node("4", 0), 4);
    EXPECT_EQ(slurm_tasks_on_node("2(x3),1", 0), 2);
    EXPECT_EQ(slurm_tasks_on_node("2(x3),1", 2), 2);
    EXPECT_EQ(slurm_tasks_on_node("2(x3),1", 3), 1);
    EXPECT_EQ(slurm_tasks_on_node("2(x3),1", 4), -1);
    EXPECT_EQ(slurm_tasks_on_node("", 0), -1);
    EXPECT_EQ(slurm_tasks_on_node("2(3)", 0), -1);
    EXPECT_EQ(slurm_tasks_on_node("x", 0), -1);
}

TEST(LaunchInfoTest, NoLauncherOrIncompleteOrBad) {
    EXPECT_FALSE(launched_under_mpi(fake_env({})));
    EXPECT_FALSE(launch_info_from_env(fake_env({})).has_value());
    EXPECT_FALSE(launched_under_mpi(fake_env({{"SLURM_PROCID", "0"}})));  // needs SLURM_NTASKS too

    EnvLookup pmix_only = fake_env({{"PMIX_RANK", "2"}});
    EXPECT_TRUE(launched_under_mpi(pmix_only));
    EXPECT_FALSE(launch_info_from_env(pmix_only).has_value());

    EXPECT_THROW(launch_info_from_env(fake_env({{"OMPI_COMM_WORLD_RANK", "two"},
                                                {"OMPI_COMM_WORLD_SIZE", "4"},
                                                {"OMPI_COMM_WORLD_LOCAL_RANK", "0"},
                                                {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}})),
                 Error);
    EXPECT_THROW(launch_info_from_env(fake_env({{"OMPI_COMM_WORLD_RANK", "4"},
                                                {"OMPI_COMM_WORLD_SIZE", "4"},
                                                {"OMPI_COMM_WORLD_LOCAL_RANK", "0"},
                                                {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}})),
                 Error);
}

// Under mpiexec the environment and MPI must agree; run directly (a singleton) MPI alone answers.
TEST_F(CommTest, LaunchInfoMatchesMpi) {
    LaunchInfo info = launch_info();
    EXPECT_EQ(info.rank, world_.rank());
    EXPECT_EQ(info.world_size, world_.size());
    EXPECT_GE(info.local_rank, 0);
    EXPECT_LT(info.local_rank, info.local_size);
    EXPECT_LE(info.local_size, info.world_size);
    EXPECT_FALSE(info.hostname.empty());
    if (launched_under_mpi()) {
        std::optional<LaunchInfo> from_env = launch_info_from_env([](const char* n) { return std::getenv(n); });
        if (from_env) {
            EXPECT_EQ(from_env->rank, world_.rank());
            EXPECT_EQ(from_env->world_size, world_.size());
        }
    }
}

}  // namespace
}  // namespace bmoe::parallel
