// expert_dispatcher.h -- ExpertDispatcher: moves token rows to the ranks that own their experts
// and back (expert parallelism), over the EP communicator. Host memory.
//
// Rows arrive grouped by GLOBAL expert (expert_offsets [E+1], from the routing plan); expert e
// lives on EP rank e / E_local. Pipeline (Megatron's all-to-all dispatcher, DeepEP's handle):
//   1. send_counts: my rows for each peer's experts (contiguous, since rows are expert-sorted)
//   2. exchange_counts: per (peer, local expert) counts, so receivers can regroup
//   3. all_to_all_v the rows          -> received grouped by (source rank, local expert)
//   4. sort_by_local_expert           -> grouped by (local expert, source rank): grouped GEMM input
// combine() is the mirror image: unsort, all_to_all_v back, rows return to their original slots.
// Backward uses the same handle: dy goes forward() like x, dx goes back like y.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "parallel/communicator.h"

namespace bmoe::parallel {

struct DispatchHandle {
    int num_local_experts = 0;
    std::vector<int64_t> send_rows;           // [ep] rows I send to each peer
    std::vector<int64_t> recv_rows;           // [ep] rows I receive from each peer
    std::vector<int64_t> recv_expert_rows;    // [ep * E_local] rows from peer s for local expert le
    std::vector<int32_t> received_to_sorted;  // [R_local] received row -> expert-sorted row
    std::vector<int> local_expert_offsets;    // [E_local + 1] over the expert-sorted rows
    int64_t num_local_rows() const { return local_expert_offsets.empty() ? 0 : local_expert_offsets.back(); }
};

class ExpertDispatcher {
  public:
    ExpertDispatcher(Communicator& ep, int num_experts);

    // Plans the exchange for rows grouped by global expert and moves them:
    // x_RD (R = expert_offsets[E] rows of D floats) -> local_x (num_local_rows x D, expert-sorted).
    DispatchHandle dispatch(const float* x_RD,
                            const std::vector<int>& expert_offsets,
                            int D,
                            std::vector<float>& local_x);
    // Same movement as dispatch() for another tensor of rows (e.g. dy in backward).
    void forward(const DispatchHandle& h, const float* rows_RD, int D, std::vector<float>& local_rows);
    // Inverse movement: local expert-sorted rows back to their original slots, y_RD (R x D).
    void combine(const DispatchHandle& h, const float* local_rows, int D, float* y_RD);
    // Wall seconds spent inside all-to-alls (waiting for peers included) since the last call.
    double take_seconds() { return std::exchange(seconds_, 0.0); }

  private:
    Communicator& ep_;
    int num_experts_, num_local_experts_;
    std::vector<float> staging_;
    double seconds_ = 0.0;
};

}  // namespace bmoe::parallel
