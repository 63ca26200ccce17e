// expert_dispatcher.h -- ExpertDispatcher: moves token rows to the ranks that own their experts
// and back (expert parallelism), over the EP communicator.
//
// Rows arrive grouped by GLOBAL expert (expert_offsets [E+1], from the routing plan); expert e
// lives on EP rank e / E_local. Pipeline (Megatron's all-to-all dispatcher, DeepEP's handle):
//   1. send_rows: my rows for each peer's experts (contiguous, since rows are expert-sorted)
//   2. plan(): exchange per (peer, local expert) counts, so receivers can regroup
//   3. send_to_experts(): all_to_all_v the rows -> received order (source rank, local expert)
//   4. the caller regroups to (local expert, source rank) with the handle's permutation (a row
//      gather on its backend: model/expert_exchange.h), the grouped GEMM's input order
// return_to_senders() is the mirror image of 3. Backward uses the same handle: dy travels like x,
// dx like y. Row pointers are in the communicator's memory (host for MPI, device for NCCL).
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
    std::vector<int32_t> sorted_to_received;  // [R_local] its inverse
    std::vector<int> local_expert_offsets;    // [E_local + 1] over the expert-sorted rows
    int64_t num_local_rows() const { return local_expert_offsets.empty() ? 0 : local_expert_offsets.back(); }
    int64_t num_sent_rows() const;  // rows this rank routed (sum of send_rows)
};

class ExpertDispatcher {
  public:
    // rows: moves the token rows (its memory); counts: exchanges the row counts, host vectors --
    // the host communicator of the same EP group, so an NCCL row exchange needs no device round
    // trip for its counts (nullptr = rows). Throws a one-line bmoe::Error when the EP size does not
    // divide num_experts.
    ExpertDispatcher(Communicator& rows, int num_experts, Communicator* counts = nullptr);

    // Collective: exchanges the per-expert row counts of rows grouped by global expert and plans
    // the movement (host work only).
    DispatchHandle plan(const std::vector<int>& expert_offsets);
    // rows_RD (R = h.num_sent_rows() rows of D floats, grouped by global expert) -> received_LD
    // (h.num_local_rows() rows in received order: by source rank, then local expert).
    // T = float, or int32_t for rows packed as D / 2 words of two bf16 values.
    template <typename T>
    void send_to_experts(const DispatchHandle& h, const T* rows_RD, int D, T* received_LD);
    // The inverse movement: received-order rows back to the ranks and slots they came from (T as above).
    template <typename T>
    void return_to_senders(const DispatchHandle& h, const T* received_LD, int D, T* rows_RD);
    // Wall seconds spent inside all-to-alls (waiting for peers included) since the last call.
    double take_seconds() { return std::exchange(seconds_, 0.0); }

    Communicator& communicator() const { return ep_; }

  private:
    Communicator& ep_;
    Communicator& counts_;
    int num_experts_, num_local_experts_;
    double seconds_ = 0.0;
};

}  // namespace bmoe::parallel
