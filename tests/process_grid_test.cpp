// process_grid_test.cpp -- ProcessGrid: the dp x ep layout as pure functions for many (world, ep)
// pairs (no MPI involved), expert ranges and the one-line errors, then real sub-communicators over
// LocalComm and, under mpiexec with 1, 2 and 4 ranks, over MPI_COMM_WORLD for every valid ep.
#include "parallel/process_grid.h"

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <iterator>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "parallel/check.h"
#include "parallel/local_comm.h"
#include "parallel/mpi_comm.h"

namespace bmoe::parallel {
namespace {

// The message of the bmoe::Error that fn throws ("" if it throws nothing).
template <typename Fn>
std::string error_of(Fn fn) {
    try {
        fn();
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

// ----------------------------------------------------------------------------
// pure layout

TEST(GridLayout, ExamplesFromTheHeader) {
    // world 4, ep 2: EP groups {0,1} {2,3}; DP groups {0,2} {1,3}.
    GridCoords c = grid_coords(4, 2, 3);
    EXPECT_EQ(c.ep_rank, 1);
    EXPECT_EQ(c.dp_rank, 1);
    EXPECT_EQ(c.ep_size, 2);
    EXPECT_EQ(c.dp_size, 2);
    EXPECT_EQ(ep_group_ranks(c), (std::vector<int>{2, 3}));
    EXPECT_EQ(dp_group_ranks(c), (std::vector<int>{1, 3}));
    EXPECT_EQ(ep_group_ranks(grid_coords(4, 4, 2)), (std::vector<int>{0, 1, 2, 3}));
    EXPECT_EQ(dp_group_ranks(grid_coords(4, 4, 2)), (std::vector<int>{2}));
    EXPECT_EQ(ep_group_ranks(grid_coords(4, 1, 2)), (std::vector<int>{2}));
    EXPECT_EQ(dp_group_ranks(grid_coords(4, 1, 2)), (std::vector<int>{0, 1, 2, 3}));
}

// For every world size up to 24 and every ep that divides it: the EP groups and the DP groups each
// partition the world, every member of a group computes the same group, a rank's position in its
// group is its ep/dp rank, EP groups are consecutive ranks, and an EP and a DP group meet in one rank.
TEST(GridLayout, GroupsPartitionTheWorldForManySizes) {
    int num_checked = 0;
    for (int world_size = 1; world_size <= 24; ++world_size) {
        for (int ep = 1; ep <= world_size; ++ep) {
            if (world_size % ep != 0) continue;
            SCOPED_TRACE("world " + std::to_string(world_size) + " ep " + std::to_string(ep));
            std::set<std::vector<int>> ep_groups, dp_groups;
            for (int r = 0; r < world_size; ++r) {
                const GridCoords c = grid_coords(world_size, ep, r);
                ASSERT_EQ(c.ep_size * c.dp_size, world_size);
                ASSERT_EQ(c.dp_rank * c.ep_size + c.ep_rank, r);
                const std::vector<int> e = ep_group_ranks(c), d = dp_group_ranks(c);
                ASSERT_EQ(static_cast<int>(e.size()), ep);
                ASSERT_EQ(static_cast<int>(d.size()), world_size / ep);
                ASSERT_EQ(e[c.ep_rank], r);
                ASSERT_EQ(d[c.dp_rank], r);
                ASSERT_EQ(e.back() - e.front(), ep - 1) << "EP group is not consecutive";
                for (int member : e) ASSERT_EQ(ep_group_ranks(grid_coords(world_size, ep, member)), e);
                for (int member : d) ASSERT_EQ(dp_group_ranks(grid_coords(world_size, ep, member)), d);
                std::vector<int> both;
                std::set_intersection(e.begin(), e.end(), d.begin(), d.end(), std::back_inserter(both));
                ASSERT_EQ(both, std::vector<int>{r});
                ep_groups.insert(e);
                dp_groups.insert(d);
            }
            ASSERT_EQ(static_cast<int>(ep_groups.size()), world_size / ep);
            ASSERT_EQ(static_cast<int>(dp_groups.size()), ep);
            std::vector<int> seen;
            for (const auto& g : ep_groups) seen.insert(seen.end(), g.begin(), g.end());
            std::sort(seen.begin(), seen.end());
            std::vector<int> all(world_size);
            std::iota(all.begin(), all.end(), 0);
            ASSERT_EQ(seen, all);
            ++num_checked;
        }
    }
    EXPECT_EQ(num_checked, 84);  // sum of the number of divisors of 1..24
}

TEST(GridLayout, IndivisibleWorldIsAOneLineError) {
    const std::string message = error_of([] { grid_coords(4, 3, 0); });
    EXPECT_EQ(message,
              "--parallel.ep=3 does not divide the world size 4: launch a multiple of 3 ranks, or set "
              "--parallel.ep to one of 1, 2, 4");
    for (int world_size = 1; world_size <= 12; ++world_size) {
        for (int ep = 1; ep <= 13; ++ep) {
            if (world_size % ep == 0) continue;
            EXPECT_THROW(validate_ep_size(world_size, ep), Error) << world_size << " " << ep;
        }
    }
    EXPECT_NE(error_of([] { validate_ep_size(4, 0); }).find("--parallel.ep must be >= 1"), std::string::npos);
}

TEST(ExpertRangeTest, SplitsExpertsEvenlyAndInOrder) {
    for (int ep = 1; ep <= 8; ++ep) {
        for (int num_experts = ep; num_experts <= 64; num_experts += ep) {
            int next = 0;
            for (int e = 0; e < ep; ++e) {
                const ExpertRange range = expert_range(num_experts, ep, e);
                ASSERT_EQ(range.first, next) << num_experts << " experts, ep " << ep;
                ASSERT_EQ(range.count, num_experts / ep);
                next += range.count;
            }
            ASSERT_EQ(next, num_experts);
        }
    }
    EXPECT_EQ(expert_range(8, 4, 3).first, 6);
    EXPECT_EQ(expert_range(8, 4, 3).count, 2);
}

TEST(ExpertRangeTest, IndivisibleExpertsNameBothNumbersAndTheFix) {
    const std::string message = error_of([] { expert_range(6, 4, 0); });
    EXPECT_NE(message.find("--model.num_experts=6"), std::string::npos) << message;
    EXPECT_NE(message.find("--parallel.ep=4"), std::string::npos) << message;
    EXPECT_NE(message.find("multiple of 4 experts"), std::string::npos) << message;
    EXPECT_NE(message.find("1, 2, 3, 6"), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << "must be one line";
}

// ----------------------------------------------------------------------------
// ProcessGrid over real communicators

TEST(ProcessGridTest, OverLocalComm) {
    LocalComm world;
    ProcessGrid grid(world, 1);
    EXPECT_EQ(grid.world_size(), 1);
    EXPECT_EQ(grid.ep().size(), 1);
    EXPECT_EQ(grid.dp().size(), 1);
    EXPECT_EQ(grid.expert_range(8).count, 8);
    EXPECT_EQ(grid.ep().name(), "local");
    EXPECT_THROW(ProcessGrid(world, 2), Error);
}

// All-gathers the world rank of every member of `comm`, in comm rank order.
std::vector<int> members(Communicator& comm, int world_rank) {
    std::vector<int32_t> ranks(comm.size());
    const int32_t mine = world_rank;
    comm.all_gather(&mine, sizeof(mine), ranks.data());
    return std::vector<int>(ranks.begin(), ranks.end());
}

TEST(ProcessGridTest, SubCommunicatorsMatchTheLayout) {
    MpiComm world(MPI_COMM_WORLD);
    for (int ep : {1, 2, 4}) {
        SCOPED_TRACE("ep " + std::to_string(ep));
        if (world.size() % ep != 0) {
            // Every rank sees the same sizes, so every rank throws before any collective.
            EXPECT_THROW(ProcessGrid(world, ep), Error);
            continue;
        }
        ProcessGrid grid(world, ep);
        const GridCoords expected = grid_coords(world.size(), ep, world.rank());
        EXPECT_EQ(grid.ep_rank(), expected.ep_rank);
        EXPECT_EQ(grid.dp_rank(), expected.dp_rank);
        EXPECT_EQ(grid.ep_size(), ep);
        EXPECT_EQ(grid.dp_size(), world.size() / ep);
        EXPECT_EQ(&grid.world(), &world);
        EXPECT_EQ(members(grid.ep(), world.rank()), ep_group_ranks(expected));
        EXPECT_EQ(members(grid.dp(), world.rank()), dp_group_ranks(expected));

        // An EP all-reduce sums over the EP group only.
        int64_t sum = world.rank();
        grid.ep().all_reduce_sum(&sum, 1);
        const std::vector<int> group = ep_group_ranks(expected);
        EXPECT_EQ(sum, std::accumulate(group.begin(), group.end(), int64_t{0}));

        // Expert ranges of an EP group tile [0, E).
        const ExpertRange mine = grid.expert_range(8);
        std::vector<int32_t> firsts(ep);
        const int32_t first = mine.first;
        grid.ep().all_gather(&first, sizeof(first), firsts.data());
        for (int e = 0; e < ep; ++e) EXPECT_EQ(firsts[e], e * (8 / ep));
        EXPECT_THROW(grid.expert_range(ep == 1 ? 0 : ep + 1), Error);
    }
}

}  // namespace
}  // namespace bmoe::parallel
