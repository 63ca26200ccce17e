// routing_plan.h -- RoutingPlan: where each (token, slot) copy goes, computed on the host.
//
// From topk_idx [N, K] it groups the N*K token copies by expert (stable: token order within an
// expert), optionally drops copies beyond an expert's capacity, and builds both directions of
// the permutation so gather and combine are gather-only (deterministic, no atomics):
//   row_src_R[r]       = n*K + k  of the copy in routed row r
//   slot_row_NK[n*K+k] = r, or -1 if the copy was dropped
//   expert_offsets[e]  = first row of expert e; expert_offsets[E] = R
#pragma once

#include <cstdint>
#include <vector>

namespace bmoe::model {

struct RoutingPlan {
    std::vector<int> expert_offsets;         // [E+1]
    std::vector<int32_t> row_src;            // [R]
    std::vector<int32_t> slot_row;           // [N*K]
    std::vector<int64_t> tokens_per_expert;  // [E] copies routed to e BEFORE dropping
    int64_t num_dropped = 0;
    int num_rows() const { return expert_offsets.back(); }
};

// capacity < 0: dropless. Otherwise each expert keeps at most `capacity` copies (in token order).
RoutingPlan plan_routing(const int32_t* topk_idx_NK, int N, int K, int E, int capacity = -1);

// The plan's per-expert part from the copies routed to each expert (tokens_per_expert, [E]):
// expert_offsets, num_dropped; row_src and slot_row stay empty (Backend::moe_plan_routing wrote
// them on the backend).
RoutingPlan plan_from_counts(const std::vector<int64_t>& tokens_per_expert, int capacity = -1);

}  // namespace bmoe::model
