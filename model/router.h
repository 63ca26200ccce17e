// router.h -- Router: the routing decision of one MoE layer, for every router family.
//
// Forward (N tokens, E experts, top-K, S samples; docs/routers.md has every equation):
//   l^s_NE  = the family's logit sample s (l_det = x W_r^T; + dmu + sigma*eps, dropout masks, ...)
//   p^s_NE  = softmax(l^s / T)     (T: 1, the fixed temp_sampling T, or vtsr's T(u) per token)
//   pbar_NE = mean_s p^s           (Monte-Carlo averaging INSIDE the router: one expert pass)
//   idx_NK  = top-k of the selection score: log pbar (S > 1), l / T (S = 1), or l / T + Gumbel noise
//             (temp_sampling, vtsr: Sample-K without replacement); + the aux-free selection bias
//   gate_NK = pbar[idx], renormalised over the K selected when model.router_renormalize
//   mu_NE   = the mean logits (z-loss, evaluation); reg_N = the per-token regulariser (KL or -log T)
// Backward: the gate gradient flows to every sample's logits (weighted by its share of pbar),
// plus the aux-loss gradient through pbar, the z-loss through mu and beta * the regulariser.
//
// The deterministic topk router without a selection bias runs entirely on the backend's fused
// router_topk ops. Every other family does its small [N, E] math on the host (GEMMs stay on the
// backend), so one implementation serves the CPU and CUDA backends.
// Noise comes from CounterRng keyed by (seed, step, layer, GLOBAL token id, sample): results do
// not depend on threads, ranks or expert sharding, and noise is drawn before the exchange.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/backend.h"
#include "model/buffer.h"
#include "model/config.h"
#include "model/layer_scratch.h"
#include "model/params.h"

namespace bmoe::model {

enum class RouterMode {
    kSample,  // draw S samples (training, and Monte-Carlo evaluation)
    kMean,    // deterministic: l = mu, no dropout, SWAG mean weights, top-k instead of Sample-K
};

// Set by the caller before each forward: where the noise comes from and how to route.
struct RoutingContext {
    uint64_t seed = 0;
    int64_t step = 0;         // noise changes every optimizer step
    int64_t first_token = 0;  // global id of this rank's first token (ids are unique over ranks and micro-batches)
    bool training = true;     // S = router.train_samples (else router.eval_samples)
    RouterMode mode = RouterMode::kSample;
    int samples = 0;  // > 0 overrides S
    // Evaluation only (routing stability): Gaussian noise of std input_noise * RMS(x_n) added to
    // the hidden state entering every MoE block, keyed like the routing noise, so a clean and a
    // perturbed pass share every other random number.
    float input_noise = 0.0f;
};

// Host copies of the last forward, per token: the inference API of evaluation.
struct RouterOutputs {
    int N = 0, E = 0, K = 0, S = 0;
    std::vector<float> mu;             // [N, E] mean logits (l_det + dmu for logit routers)
    std::vector<float> sigma;          // [N, E] logit std (logit_mf, weight_mfvi); empty otherwise
    std::vector<float> chol;           // [N, P] packed lower-triangular L (logit_fc); empty otherwise
    std::vector<float> temperature;    // [N] T per token (temp_sampling, vtsr); empty otherwise
    std::vector<float> sample_logits;  // [S, N, E] l^s (before the temperature)
    std::vector<float> sample_probs;   // [S, N, E] softmax(l^s / T)
    std::vector<float> probs;          // [N, E] pbar: average over samples
    std::vector<int32_t> topk_idx;     // [N, K] selected experts
    std::vector<float> topk_weight;    // [N, K] gates
    std::vector<float> reg;            // [N] per-token regulariser (KL or -log T); empty when none
};

// The noise the last forward drew (host), exported so an independent implementation
// (tools/bmoe_torch.py) can reproduce it exactly; empty where the family draws none.
struct RouterNoise {
    std::vector<float> eps;           // [S, N, E] standard normal (logit_mf/fc, weight_mfvi)
    std::vector<float> dropout_mask;  // [S, N, D] 0 or 1/(1-p) (mc_dropout)
    std::vector<float> gumbel;        // [N, E] Gumbel(0, 1) added to l / T for Sample-K (temp_sampling, vtsr)
    std::vector<int32_t> member;      // [N] ensemble member routing each token (ensemble, training)
};

// A named host tensor of router state that is not a parameter (checkpointed, not optimised).
struct RouterStateTensor {
    std::string name;  // suffix after "model.layers.{l}.block_sparse_moe.router_state."
    std::vector<int64_t> shape;
    std::vector<float>* values;
};

class Router {
  public:
    // scratch: temporaries shared with the model's other layers (null: the router keeps its own).
    Router(const ModelConfig& config, Backend* backend, int layer, LayerScratch* scratch = nullptr);

    // Routes x_ND (backend memory). After it, topk_idx_NK()/topk_weight_NK() hold the decision
    // (backend memory) and outputs() the host copies.
    void forward(const float* x_ND, const LayerTensors& w, int N, const RoutingContext& ctx);
    // dx_ND += d/dx; router grads in dw +=. dtopk_weight_NK: d loss / d gates (backend).
    // aux_dprobs_E (host): d loss / d pbar[n, e] (same for every token); z_coef: d loss / d sum_n lse(mu_n)^2;
    // reg_coef: d loss / d sum_n reg_n; weight_reg_coef: d loss / d (weight-space KL of this layer).
    void backward(float* dx_ND,
                  const LayerTensors& dw,
                  const float* dtopk_weight_NK,
                  const float* x_ND,
                  const LayerTensors& w,
                  const std::vector<float>& aux_dprobs_E,
                  float z_coef,
                  float reg_coef,
                  float weight_reg_coef);

    const int32_t* topk_idx_NK() const { return topk_idx_NK_.data(); }
    const float* topk_weight_NK() const { return topk_weight_NK_.data(); }
    const RouterOutputs& outputs() const { return out_; }
    const RouterNoise& noise() const;
    // lse(mu_n) per token of the last forward (host), for the z-loss.
    const std::vector<float>& lse() const { return lse_; }
    // Weight-space KL of this layer (weight_mfvi; 0 otherwise), computed by the last forward.
    double weight_kl() const { return weight_kl_; }

    // After each optimizer step (training): moves the selection bias by the step's global expert
    // load and collects SWAG snapshots. `load` = routed copies per expert over all ranks.
    void record_load(const std::vector<int64_t>& load);
    void end_step(int step, const LayerTensors& w);

    // Checkpointed state (selection bias, SWAG moments); empty for families without state.
    std::vector<RouterStateTensor> state();
    int swag_snapshots() const { return static_cast<int>(swag_count_[0]); }

  private:
    bool fast_path() const;
    void forward_fast(int N);
    void sample_logits(const float* x_ND, const LayerTensors& w, const RoutingContext& ctx);
    void select_and_gate(const RoutingContext& ctx);
    void upload_decision();
    DropoutMaskDraw dropout_draw(int s) const;             // mc_dropout: sample s's mask draw
    const float* dropout_input(const float* x_ND, int s);  // mc_dropout: x * mask^s (backend)
    // host [rows, cols] -> backend scratch
    float* to_backend(Buffer<float>& dst, const std::vector<float>& src);

    ModelConfig config_;
    RouterConfig rc_;
    Backend* backend_;
    int layer_;
    int N_ = 0, S_ = 1;
    bool training_ = true;

    RouterMode mode_ = RouterMode::kSample;
    int ensemble_members_ = 1;  // members whose logits were computed (ensemble)
    RouterOutputs out_;
    std::vector<float> lse_;
    double weight_kl_ = 0.0;

    // saved for backward (host)
    std::vector<float> ldet_;    // [N, E] x W_r^T
    mutable RouterNoise noise_;  // noise() fills dropout_mask on request
    struct DropoutDraw {         // mc_dropout: the last forward's mask stream (redrawn in backward)
        CounterRng rng{0, 0};
        uint64_t first_token = 0;
    } dropout_;
    std::vector<float> dmu_, raw_;    // [N, E], [N, E | P] inference-network heads
    std::vector<float> var_;          // [N, E] weight_mfvi logit variance
    std::vector<float> temp_raw_;     // [N] vtsr pre-sigmoid temperature
    std::vector<float> all_members_;  // [N, (M-1) E] ensemble members 1..M-1
    std::vector<float> log_pbar_;     // [N, E]
    std::vector<float> sample_logp_;  // [S, N, E] log p^s (p^s itself underflows at small T)
    // state
    std::vector<int64_t> load_;                               // [E] accumulated over the step's micro-batches
    std::vector<float> selection_bias_;                       // [E]
    std::vector<float> swag_mean_, swag_sq_mean_, swag_dev_;  // [E*D], [E*D], [swag_rank, E*D]
    std::vector<float> swag_count_{0.0f};                     // [1] snapshots collected

    // backend scratch
    Buffer<float> ldet_NE_, probs_NE_, lse_N_, topk_weight_NK_, scratch_a_, scratch_b_, scratch_c_, scratch_w_;
    Buffer<float> trunk_pre_, trunk_out_;
    Buffer<float> dsigma2_;  // weight_mfvi: d sigma^2 [E, D]
    // [N, D]-sized temporaries (mc_dropout's mask and x * mask, weight_mfvi's x * x, d trunk)
    std::unique_ptr<LayerScratch> own_scratch_;  // when the model shares none
    LayerScratch* scratch_;
    Buffer<int32_t> topk_idx_NK_;
};

}  // namespace bmoe::model
