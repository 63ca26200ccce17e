#include "model/routing_plan.h"

#include <algorithm>

#include "parallel/check.h"

namespace bmoe::model {

RoutingPlan plan_from_counts(const std::vector<int64_t>& tokens_per_expert, int capacity) {
    const int E = static_cast<int>(tokens_per_expert.size());
    RoutingPlan plan;
    plan.tokens_per_expert = tokens_per_expert;
    plan.expert_offsets.assign(E + 1, 0);
    for (int e = 0; e < E; ++e) {
        const int64_t kept =
            capacity < 0 ? plan.tokens_per_expert[e] : std::min<int64_t>(plan.tokens_per_expert[e], capacity);
        plan.num_dropped += plan.tokens_per_expert[e] - kept;
        plan.expert_offsets[e + 1] = plan.expert_offsets[e] + static_cast<int>(kept);
    }
    return plan;
}

RoutingPlan plan_routing(const int32_t* topk_idx_NK, int N, int K, int E, int capacity) {
    std::vector<int64_t> counts(E, 0);
    const int64_t NK = static_cast<int64_t>(N) * K;
    for (int64_t i = 0; i < NK; ++i) {
        const int e = topk_idx_NK[i];
        BMOE_ASSERT(e >= 0 && e < E, "expert index ", e, " out of range");
        counts[e]++;
    }
    RoutingPlan plan = plan_from_counts(counts, capacity);
    plan.row_src.resize(plan.expert_offsets[E]);
    plan.slot_row.assign(NK, -1);
    std::vector<int> next(plan.expert_offsets.begin(), plan.expert_offsets.end() - 1);
    for (int64_t i = 0; i < NK; ++i) {  // token order: earlier tokens win under capacity
        const int e = topk_idx_NK[i];
        if (next[e] == plan.expert_offsets[e + 1]) continue;  // expert full: dropped
        plan.row_src[next[e]] = static_cast<int32_t>(i);
        plan.slot_row[i] = next[e]++;
    }
    return plan;
}

}  // namespace bmoe::model
