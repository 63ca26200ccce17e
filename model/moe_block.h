// moe_block.h -- MoeBlock: router -> top-k -> gather by expert -> expert MLPs -> weighted combine.
//
// Forward (N tokens, E experts, top-K):
//   (idx, gate)_NK, probs_NE = the Router (model/router.h: topk or a Bayesian router family)
//   plan = group the N*K copies by expert (host; dropless unless capacity is set)
//   x_RD = gather(x_ND, plan);  y_RD = MLP_e(x_RD) per expert group;  out_ND = sum_k gate * y_RD
// Auxiliary losses (unweighted here; the model weights and averages them over MoE layers):
//   aux = E * sum_e f_e * P_e,  f_e = count_e / (N*K) (fraction of copies), P_e = mean_n probs[n,e]
//         (Switch/GShard; f is a constant, the gradient flows through P; uniform routing gives 1)
//   z   = mean_n logsumexp(mu_n)^2   (ST-MoE router z-loss on the mean logits)
//   reg = mean_n reg_n (+ weight-space KL / N): the router family's regulariser (KL or -log T)
// Backward mirrors forward; the router gets gradients from the gates and from aux/z.
// Distributed: f, P and z are statistics of the GLOBAL batch (all-reduced over the world), and
// under expert parallelism the grouped rows travel to their experts' ranks and back
// (model/expert_exchange.h) between gather and combine; routing is decided before the exchange.
#pragma once

#include <memory>
#include <vector>

#include "model/backend.h"
#include "model/buffer.h"
#include "model/config.h"
#include "model/expert_exchange.h"
#include "model/mlp.h"
#include "model/parallel_context.h"
#include "model/params.h"
#include "model/router.h"
#include "model/routing_plan.h"

namespace bmoe::model {

// Expert-parallel traffic of this rank since the last take.
struct ExchangeStats {
    double seconds = 0.0;       // wall time inside all-to-alls (waiting for peers included)
    int64_t rows_sent = 0;      // token copies sent to OTHER ranks (dispatch direction, forward)
    int64_t min_rows_sent = 0;  // the same with one row per (token, destination rank): the minimum
                                // a deduplicating dispatcher (DeepEP style) would send
    double bytes_sent = 0.0;    // bytes sent to other ranks: x and y rows forward, dy and dx backward
    double min_bytes = 0.0;     // the same for min_rows_sent rows
};

struct MoeLayerStats {
    std::vector<int64_t> tokens_per_expert;  // [E] routed copies per expert (before dropping)
    int64_t num_dropped = 0;                 // copies dropped by the capacity limit (all ranks)
    int64_t num_copies = 0;                  // routed copies N*K (all ranks)
    double aux_loss = 0.0;
    double z_loss = 0.0;
    double reg = 0.0;               // router regulariser (KL or -log T), mean over tokens; 0 for topk
    double mean_sigma = 0.0;        // mean logit std (logit_mf, weight_mfvi) or diag(L) (logit_fc)
    double mean_temperature = 0.0;  // mean T (vtsr, temp_sampling)
};

class MoeBlock {
  public:
    // scratch: the model's buffers shared by every layer (must outlive the block).
    MoeBlock(
        const ModelConfig& config, Backend* backend, const ParallelContext& parallel, int layer, LayerScratch* scratch);

    // out_ND (=) from x_ND with this layer's weights (router_w, ffn_* of `w`).
    MoeLayerStats forward(float* out_ND, const float* x_ND, const LayerTensors& w, int N, const RoutingContext& ctx);
    // dx_ND (=); parameter grads (+=). aux_weight / z_weight / reg_weight: d(total loss)/d(aux), d/d(z), d/d(reg).
    void backward(float* dx_ND,
                  const LayerTensors& dw,
                  const float* dout_ND,
                  const float* x_ND,
                  const LayerTensors& w,
                  float aux_weight,
                  float z_weight,
                  float reg_weight);

    // Traffic since the last call (seconds cover forward and backward all-to-alls).
    ExchangeStats take_exchange_stats();

    // MLP recompute: GroupedMlp::set_recompute_activation for this block's experts, and (on one
    // rank) the experts' gathered input rows are gathered again in backward instead of kept.
    void set_recompute_activation(bool on);
    // GroupedMlp::set_bf16_activation_storage for this block's experts.
    void set_bf16_activation_storage(bool on) { experts_.set_bf16_activation_storage(on); }
    // Where the experts read only the bf16 rounding of their rows (bf16 MLP storage): the gather
    // writes the input rows in bf16 straight into the experts' kept copy (no fp32 rows, no rounding
    // pass), and the combine's backward writes the d rows in bf16. With expert parallelism where
    // rows travel as bf16 (ParallelContext::exchange_bf16, even D) the bf16 rows are what is sent,
    // and they arrive in the experts' copy. Bitwise the same training (Model::set_bf16_gemm_inputs,
    // which sets it; on by default).
    void set_bf16_gemm_inputs(bool on) { bf16_gemm_inputs_ = on; }

    Router& router() { return router_; }
    const Router& router() const { return router_; }

  private:
    // experts on this rank: x_RD (grouped by global expert) -> y_RD, exchanging rows when EP > 1
    void run_experts_forward(const LayerTensors& w);
    void run_experts_backward(const LayerTensors& dw, const LayerTensors& w);
    void count_exchange_rows();  // adds this dispatch's rows to exchange_
    bool bf16_rows() const;      // x and dy rows travel as bf16 (ParallelContext::exchange_bf16)
    bool bf16_returns() const;   // y and dx rows travel as bf16 (ParallelContext::combine_bf16)
    bool dy_rows16() const;      // backward's d rows are written in bf16 (set_bf16_gemm_inputs)
    bool rows16_reach_experts() const;  // bf16 rows reach the experts as they are (one rank, or bf16 exchange)
    Buffer<float>& x_rows();     // x_RD [R, D]: x_RD_, or shared scratch (expert parallelism, recompute)
    const float* add_input_noise(const float* x_ND, int N, const RoutingContext& ctx);

    ModelConfig config_;
    Backend* backend_;
    ParallelContext parallel_;
    Router router_;
    int layer_;
    LayerScratch* scratch_;  // y_local, dy/dx rows: shared with every layer
    bool recompute_ = false;  // set_recompute_activation
    bool bf16_gemm_inputs_ = bf16_mode_default("BMOE_BF16_GEMM_INPUTS");  // set_bf16_gemm_inputs
    bool plan_on_backend_ = env_switch("BMOE_DEVICE_ROUTING_PLAN", "the plan on the backend", "on the host");
    bool gather16_ = false;  // this forward gathered the experts' rows in bf16 (bf16_gemm_inputs_), sent them so (EP)
    GroupedMlp experts_;
    std::unique_ptr<ExpertExchange> expert_exchange_;  // EP > 1 only
    Buffer<float> x_local_;  // rows of this rank's experts (saved; none where the experts keep a bf16 copy)
    int N_ = 0;
    double num_tokens_global_ = 0.0;
    ExchangeStats exchange_;
    RoutingPlan plan_;                    // row_src and slot_row on the host only with expert parallelism
    std::vector<float> aux_dprobs_host_;  // [E] d aux / d probs[n, e], same for every n
    // saved
    Buffer<int32_t> row_src_R_, slot_row_NK_;  // row_src_R_: room for N*K rows on one rank
    Buffer<int32_t> expert_counts_E_;          // Backend::moe_plan_routing's counts
    Buffer<float> x_RD_, y_RD_;  // x_RD_: one rank without recompute only (x_rows())
    Buffer<float> x_noisy_;  // [N, D] input with RoutingContext::input_noise (evaluation)
    // backward scratch (the [R, D] ones are in scratch_)
    Buffer<float> dtopk_weight_NK_;
};

}  // namespace bmoe::model
