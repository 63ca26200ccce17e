// routing_plan_test.cpp -- the host-side permutation of token copies to experts, and capacity.
// Spec (model/routing_plan.h): copies are grouped by expert in (token, slot) order; with a
// capacity C, each expert keeps its FIRST C copies in that order and the rest are dropped.
#include "model/routing_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

namespace bmoe::model {
namespace {

TEST(RoutingPlan, GroupsCopiesByExpertInTokenOrder) {
    // 3 tokens, top-2, 4 experts; expert 2 receives nothing.
    const std::vector<int32_t> idx = {1, 0, 3, 1, 0, 3};
    const RoutingPlan p = plan_routing(idx.data(), 3, 2, 4);
    EXPECT_EQ(p.expert_offsets, (std::vector<int>{0, 2, 4, 4, 6}));
    EXPECT_EQ(p.row_src, (std::vector<int32_t>{1, 4, 0, 3, 2, 5}));
    EXPECT_EQ(p.slot_row, (std::vector<int32_t>{2, 0, 4, 3, 1, 5}));
    EXPECT_EQ(p.tokens_per_expert, (std::vector<int64_t>{2, 2, 0, 2}));
    EXPECT_EQ(p.num_dropped, 0);
}

TEST(RoutingPlan, CapacityDropsExactlyTheLaterCopies) {
    std::mt19937 gen(5);
    for (int trial = 0; trial < 50; ++trial) {
        const int N = 1 + static_cast<int>(gen() % 40), K = 1 + static_cast<int>(gen() % 3),
                  E = K + static_cast<int>(gen() % 5);
        const int capacity = static_cast<int>(gen() % 6);
        std::vector<int32_t> idx(static_cast<size_t>(N) * K);
        for (int n = 0; n < N; ++n) {  // distinct experts per token, like top-k
            std::vector<int> experts(E);
            for (int e = 0; e < E; ++e) experts[e] = e;
            std::shuffle(experts.begin(), experts.end(), gen);
            for (int k = 0; k < K; ++k) idx[static_cast<size_t>(n) * K + k] = experts[k];
        }
        const RoutingPlan p = plan_routing(idx.data(), N, K, E, capacity);
        // naive spec: walk copies in order, keep while the expert has room
        std::vector<int> seen(E, 0);
        int64_t dropped = 0;
        for (size_t i = 0; i < idx.size(); ++i) {
            const bool keep = seen[idx[i]]++ < capacity;
            dropped += keep ? 0 : 1;
            ASSERT_EQ(p.slot_row[i] >= 0, keep) << "trial " << trial << " copy " << i;
            if (keep) {
                const int r = p.slot_row[i];
                ASSERT_EQ(p.row_src[r], static_cast<int32_t>(i));
                ASSERT_GE(r, p.expert_offsets[idx[i]]);
                ASSERT_LT(r, p.expert_offsets[idx[i] + 1]);
            }
        }
        EXPECT_EQ(p.num_dropped, dropped);
        for (int e = 0; e < E; ++e) {
            EXPECT_EQ(p.tokens_per_expert[e], seen[e]);  // counted before dropping
            EXPECT_EQ(p.expert_offsets[e + 1] - p.expert_offsets[e], std::min(seen[e], capacity));
        }
    }
}

}  // namespace
}  // namespace bmoe::model
