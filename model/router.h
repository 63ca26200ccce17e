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
// The deterministic topk router without a selection bias runs on the backend's fused router_topk
// ops. Every other family runs its GEMMs and its per-token [S, N, E] math (model/router_rows.h) on
// the backend too; only weight-space terms of [E, D] (weight_mfvi's KL, SWAG's weight draws) and
// the state updates run on the host.
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
    std::vector<float> lse;            // [N] lse(mu), the z-loss term
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
    // (backend memory), topk_idx_host() and token_stats() its host copies.
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

    const int32_t* topk_idx_NK() const { return t_.topk_idx_NK.data(); }
    const float* topk_weight_NK() const { return t_.topk_weight_NK.data(); }
    // Host: the selection [N, K] (downloaded on the first call after each forward: the expert-
    // parallel dispatcher plans on it; one rank plans on the backend and never needs it), and the
    // per-token statistics [N, E + kStatsExtra]: pbar, then the RouterStatsColumn values.
    // fetch_token_stats() downloads them (where the caller synchronises anyway; token_stats() does
    // it on its first call otherwise) and token_stats() lays them out.
    const std::vector<int32_t>& topk_idx_host() const;
    void fetch_token_stats() const;
    const std::vector<float>& token_stats() const;
    // Host copies of everything the last forward computed (evaluation, tests), and the noise it
    // drew: downloaded on the first call after each forward, so training never pays for them.
    const RouterOutputs& outputs() const;
    const RouterNoise& noise() const;
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
    void forward_fast();
    void sample_logits(const float* x_ND, const LayerTensors& w, const RoutingContext& ctx);
    void select(const RoutingContext& ctx);
    void backward_family(
        float* dx_ND, const LayerTensors& dw, const float* x_ND, const LayerTensors& w, float weight_reg_coef);
    DropoutMaskDraw dropout_draw(int s) const;             // mc_dropout: sample s's mask draw
    const float* dropout_input(const float* x_ND, int s);  // mc_dropout: x * mask^s (backend)
    template <typename T>
    T* sized(Buffer<T>& b, size_t n);  // b grown to n elements (at least 1), its data
    float* to_backend(Buffer<float>& dst, const std::vector<float>& src);  // host -> backend

    ModelConfig config_;
    RouterConfig rc_;
    Backend* backend_;
    int layer_;
    int N_ = 0, S_ = 1;
    bool training_ = true;
    RouterMode mode_ = RouterMode::kSample;
    double weight_kl_ = 0.0;
    struct DropoutDraw {  // mc_dropout: the last forward's mask stream (redrawn in backward)
        CounterRng rng{0, 0};
        uint64_t first_token = 0;
    } dropout_;

    // The last forward's tensors (backend memory; shapes in model/router_rows.h) and the stage
    // arguments pointing into them: backward and the host copies read both.
    struct Tensors {
        Buffer<float> ldet_NE, mu_NE, sigma_NE, chol_NP, eps_SNE, sample_logits_SNE, sample_logp_SNE, sample_probs_SNE,
            log_pbar_NE, probs_NE, gumbel_NE, temperature_N, reg_N, lse_N, stats_NC, topk_weight_NK, selection_bias_E;
        Buffer<int32_t> topk_idx_NK, member_N;
        Buffer<float> dmu_NE, raw_NP, var_NE, temp_raw_N, members_NME;  // the families' GEMM heads
        Buffer<float> trunk_pre, trunk_out, dtrunk_pre;                 // logit_mf/fc trunk [N, R]
        Buffer<float> sigma2_ED, dsigma2_ED, swag_weights_ED;           // weight_mfvi, SWAG [E, D]
        // backward
        Buffer<float> aux_E, dl_SNE, dtemp_N, dmu_z_NE, dldet_NE, ddmu_NE, draw_NP, dvar_NE, dtemp_raw_N, dmembers_NME,
            dlogits_NE;
    } t_;
    RouterRows rows_;
    mutable std::vector<int32_t> topk_idx_host_;  // [N, K], downloaded on demand
    mutable bool idx_current_ = false;
    mutable std::vector<float> token_stats_;      // [N, E + kStatsExtra]
    mutable std::vector<float> fast_stats_host_;  // fast path: pbar [N, E], then lse [N]
    mutable bool stats_fetched_ = false, stats_current_ = false;
    mutable RouterOutputs out_;
    mutable RouterNoise noise_;
    mutable bool outputs_current_ = false, noise_current_ = false;

    // state (host)
    std::vector<int64_t> load_;                               // [E] accumulated over the step's micro-batches
    std::vector<float> selection_bias_;                       // [E]
    std::vector<float> swag_mean_, swag_sq_mean_, swag_dev_;  // [E*D], [E*D], [swag_rank, E*D]
    std::vector<float> swag_count_{0.0f};                     // [1] snapshots collected

    // [N, D]-sized temporaries (mc_dropout's mask and x * mask, weight_mfvi's x * x, d trunk)
    std::unique_ptr<LayerScratch> own_scratch_;  // when the model shares none
    LayerScratch* scratch_;
};

}  // namespace bmoe::model
