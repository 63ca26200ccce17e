// moe_block.h -- MoeBlock: router -> top-k -> gather by expert -> expert MLPs -> weighted combine.
//
// Forward (N tokens, E experts, top-K):
//   logits_NE = x_ND W_r^T;  probs = softmax(logits);  (idx, gate)_NK = top-k(probs) [renormalised]
//   plan = group the N*K copies by expert (host; dropless unless capacity is set)
//   x_RD = gather(x_ND, plan);  y_RD = MLP_e(x_RD) per expert group;  out_ND = sum_k gate * y_RD
// Auxiliary losses (unweighted here; the model weights and averages them over MoE layers):
//   aux = E * sum_e f_e * P_e,  f_e = count_e / (N*K) (fraction of copies), P_e = mean_n probs[n,e]
//         (Switch/GShard; f is a constant, the gradient flows through P; uniform routing gives 1)
//   z   = mean_n logsumexp(logits_n)^2   (ST-MoE router z-loss)
// Backward mirrors forward; the router gets gradients from the gates and from aux/z.
// Distributed: f, P and z are statistics of the GLOBAL batch (all-reduced over the world), and
// under expert parallelism the grouped rows travel to their experts' ranks and back
// (parallel/expert_dispatcher.h) between gather and combine; routing is decided before the exchange.
#pragma once

#include <memory>
#include <vector>

#include "model/backend.h"
#include "model/buffer.h"
#include "model/config.h"
#include "model/mlp.h"
#include "model/parallel_context.h"
#include "model/params.h"
#include "model/routing_plan.h"
#include "parallel/expert_dispatcher.h"

namespace bmoe::model {

// Expert-parallel traffic of this rank since the last take (rows of D floats each way).
struct ExchangeStats {
    double seconds = 0.0;       // wall time inside all-to-alls (waiting for peers included)
    int64_t rows_sent = 0;      // token copies sent to OTHER ranks (dispatch direction, forward)
    int64_t min_rows_sent = 0;  // the same with one row per (token, destination rank): the minimum
                                // a deduplicating dispatcher (DeepEP style) would send
};

struct MoeLayerStats {
    std::vector<int64_t> tokens_per_expert;  // [E] routed copies per expert (before dropping)
    int64_t num_dropped = 0;                 // copies dropped by the capacity limit (all ranks)
    int64_t num_copies = 0;                  // routed copies N*K (all ranks)
    double aux_loss = 0.0;
    double z_loss = 0.0;
};

class MoeBlock {
  public:
    MoeBlock(const ModelConfig& config, Backend* backend, const ParallelContext& parallel);

    // out_ND (=) from x_ND with this layer's weights (router_w, ffn_* of `w`).
    MoeLayerStats forward(float* out_ND, const float* x_ND, const LayerTensors& w, int N);
    // dx_ND (=); parameter grads (+=). aux_weight / z_weight: d(total loss)/d(aux), d/d(z).
    void backward(float* dx_ND,
                  const LayerTensors& dw,
                  const float* dout_ND,
                  const float* x_ND,
                  const LayerTensors& w,
                  float aux_weight,
                  float z_weight);

    // Traffic since the last call (seconds cover forward and backward all-to-alls).
    ExchangeStats take_exchange_stats();

    // Router outputs of the last forward (backend memory), for evaluation and tests.
    const float* probs_NE() const { return probs_NE_.data(); }
    const int32_t* topk_idx_NK() const { return topk_idx_NK_.data(); }
    const float* topk_weight_NK() const { return topk_weight_NK_.data(); }

  private:
    // experts on this rank: x_RD (grouped by global expert) -> y_RD, exchanging rows when EP > 1
    void run_experts_forward(const LayerTensors& w);
    void run_experts_backward(const LayerTensors& dw, const LayerTensors& w);
    void count_exchange_rows();  // adds this dispatch's rows to exchange_

    ModelConfig config_;
    Backend* backend_;
    ParallelContext parallel_;
    GroupedMlp experts_;
    std::unique_ptr<parallel::ExpertDispatcher> dispatcher_;  // EP > 1 only
    parallel::DispatchHandle handle_;
    std::vector<float> host_rows_, host_local_;              // staging for the exchange (host memory)
    Buffer<float> x_local_, y_local_, dy_local_, dx_local_;  // rows of this rank's experts
    int N_ = 0;
    double num_tokens_global_ = 0.0;
    ExchangeStats exchange_;
    RoutingPlan plan_;
    std::vector<int32_t> topk_idx_host_;  // [N*K] host copy of the last routing
    std::vector<float> aux_dprobs_host_;  // [E] d aux / d probs[n, e], same for every n
    // saved
    Buffer<float> logits_NE_, probs_NE_, lse_N_, topk_weight_NK_;
    Buffer<int32_t> topk_idx_NK_, row_src_R_, slot_row_NK_;
    Buffer<float> x_RD_, y_RD_;
    // backward scratch
    Buffer<float> dy_RD_, dx_RD_, dtopk_weight_NK_, dlogits_NE_, aux_dprobs_E_;
};

}  // namespace bmoe::model
