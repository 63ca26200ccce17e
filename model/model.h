// model.h -- Model: a decoder-only MoE transformer on one Backend.
//
// Owns the flat parameter and gradient blocks (model/params.h) and the activations of one
// micro-batch. forward() computes logits (and the loss when targets are given); backward()
// accumulates parameter gradients of
//     loss = CE + aux_coef * mean_l(aux_l) + zloss_coef * mean_l(z_l) + router_reg_coef * sum_l(reg_l)
// (l over MoE layers; reg_l is the router family's regulariser: KL or -log T, 0 for topk)
// scaled by loss_scale (1/grad_accum_steps), so micro-batches add up to the mean.
// Layer l: x += attn(norm1(x)); x += ffn(norm2(x)), ffn = MoE block or dense FFN.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "model/backend.h"
#include "model/buffer.h"
#include "model/config.h"
#include "model/moe_block.h"
#include "model/parallel_context.h"
#include "model/params.h"

namespace bmoe::model {

struct LossWeights {
    float aux_coef = 0.01f;        // Switch/GShard load-balancing loss weight
    float zloss_coef = 0.001f;     // ST-MoE router z-loss weight
    float router_reg_coef = 0.0f;  // beta: weight of the router regulariser (KL / -log T), after warm-up
};

// What one forward pass measured (host values).
struct ForwardStats {
    // All values are over the GLOBAL batch (every rank's tokens) when the model is distributed.
    double ce_loss = 0.0;     // mean cross-entropy over valid targets
    double aux_loss = 0.0;    // mean over MoE layers of the load-balancing loss (unweighted)
    double z_loss = 0.0;      // mean over MoE layers of the router z-loss (unweighted)
    double router_reg = 0.0;  // sum over MoE layers of the router regulariser (unweighted)
    double total_loss = 0.0;
    int64_t num_valid_targets = 0;
    std::vector<MoeLayerStats> moe_layers;  // one per MoE layer
};

class Model {
  public:
    Model(const ModelConfig& config, Backend* backend, const ParallelContext& parallel = {});
    ~Model();
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    const ModelConfig& config() const { return config_; }
    const ParameterLayout& layout() const { return layout_; }
    Backend* backend() const { return backend_; }

    // Write access to the weights (the optimizer): the bf16 weight copy is re-rounded before the
    // next forward or backward reads it.
    float* params() {
        params16_stale_ = true;
        return params_.data();
    }
    // Write access for an optimizer that also writes the bf16 weight copy (Backend::adamw_update's
    // param16): params16 is the copy where the model keeps a fresh one -- the caller then writes
    // bf16(param) there for every param it writes, and the copy stays fresh -- else null, and the
    // copy is re-rounded before the next forward, as after params().
    struct WeightsForUpdate {
        float* params;
        uint16_t* params16;
    };
    WeightsForUpdate weights_for_update() {
        if (params16_.size() > 0 && !params16_stale_) return {params_.data(), params16_.data()};
        return {params(), nullptr};
    }
    float* grads() { return grads_.data(); }
    const ModelTensors& param_views() const { return param_views_; }
    const ModelTensors& grad_views() const { return grad_views_; }

    void init_weights(uint64_t seed);
    // See ParameterLayout::set_trainable (before the optimizer is built). Backward then skips the
    // frozen tensors' gradients (grad_views() holds nullptr for them) and stops below the lowest
    // layer with a trainable tensor.
    int set_trainable(const std::vector<std::string>& patterns);
    std::vector<float> params_to_host() const { return params_.download(); }
    void params_from_host(const std::vector<float>& host);
    std::vector<float> grads_to_host() const { return grads_.download(); }
    void zero_grad() { grads_.zero(); }

    // How the routers draw their noise and route (seed, step, global token ids, train/eval, mode);
    // applies to the following forwards. Default: training, sample mode, seed 0, step 0.
    void set_routing(const RoutingContext& ctx) { routing_ = ctx; }
    const RoutingContext& routing() const { return routing_; }

    // tokens/targets: host arrays [B*T]; targets may be null (no loss) and < 0 means "ignore".
    ForwardStats forward(const int32_t* tokens, const int32_t* targets, int B, int T, const LossWeights& weights);
    // Requires a forward with targets; accumulates d(loss * loss_scale)/dparams into grads().
    void backward(float loss_scale);
    // Activation recomputation for attention (Megatron's selective recompute): instead of keeping
    // every layer's softmax scores [B, H, T, T] from forward to backward, all layers share one
    // buffer and backward recomputes a layer's scores from its saved q and k. Saves (L - 1) B H T^2
    // floats for one extra Q K^T + softmax per layer in backward; gradients are bitwise the same.
    void set_attention_recompute(bool on);
    bool attention_recompute() const { return recompute_attention_; }
    // MLP activation recompute: every expert MLP (and dense FFN) keeps only its pre-activations and
    // recomputes the activation in backward (GroupedMlp::set_recompute_activation). Gradients are
    // bitwise the same; saves one [R, F] per MoE layer (R = routed rows) for one activation kernel.
    void set_mlp_recompute(bool on);
    bool mlp_recompute() const { return recompute_mlp_; }
    // bf16 storage of every expert MLP's (and dense FFN's) activation and pre-activation gradients
    // under bf16 matmul precision (GroupedMlp::set_bf16_activation_storage): on by default, bitwise
    // the same training.
    void set_mlp_bf16_activations(bool on);
    // The LM head and loss on bf16 logits (torch.autocast's split) for training forwards -- with
    // targets, keep_logits false and bf16 matmul precision: the LM head writes bf16 logits, the
    // loss reads them (fp32 math) and backward writes bf16 d logits over them for the bf16 GEMMs.
    // A third of the fp32 path's [B*T, V] traffic and half its memory; the loss differs from the
    // fp32 logits' by their bf16 rounding. On by default; off (or BMOE_BF16_LOGITS=0 in the
    // environment) keeps fp32 logits, for A/B runs.
    void set_bf16_logits(bool on) { bf16_logits_ = on; }
    // A bf16 copy of the weights under bf16 matmul precision (Backend::set_bf16_weight_copy): the
    // GEMMs read it instead of rounding each weight into a copy per op, forward and backward. AdamW
    // writes it as it updates the weights (weights_for_update); after any other write (params(),
    // init_weights, params_from_host) it is re-rounded before the next forward. Bitwise the same
    // training, for 2 bytes per parameter. On by default; off (or BMOE_BF16_WEIGHTS=0 in the
    // environment) rounds per op, for A/B runs.
    void set_bf16_weights(bool on) { bf16_weights_ = on; }
    // bf16 inputs for the GEMMs under bf16 matmul precision, each rounded once where it is written
    // instead of in every GEMM op that reads it (three times for Q, K, V forward, again in every
    // backward): the attention norm and the final norm write their output in bf16 (the Q/K/V
    // projections and the LM head read only its rounding; no fp32 copy is kept); the attention
    // output is rounded once into a copy kept for the output projection's forward and weight
    // gradient; without RoPE and where the backend's attention reads bf16
    // (Backend::attention_reads_bf16: CUDA's flash kernel), q, k, v and their gradients are bf16;
    // and the MoE blocks' expert rows (MoeBlock::set_bf16_gemm_inputs: on one rank the gather
    // writes the experts' input rows and the combine's backward their d rows in bf16). Bitwise the
    // same training. On by default; off (or BMOE_BF16_GEMM_INPUTS=0 in the environment) rounds
    // per op, for A/B runs. Takes effect at the next forward.
    void set_bf16_gemm_inputs(bool on);
    // Called by backward() each time the gradients of one backward stage are final (queued on the
    // backend): stage num_layers (final norm, LM head), then l = num_layers-1 .. 0, then -1
    // (embeddings). See ParamInfo::backward_stage. The trainer starts gradient all-reduces from it
    // on the last micro-batch. An empty function removes the hook.
    using GradientsReadyHook = std::function<void(int stage)>;
    void set_gradients_ready_hook(GradientsReadyHook hook) { gradients_ready_ = std::move(hook); }

    // After each optimizer step (step = steps done): router state updates (selection bias, SWAG).
    void end_step(int step);
    // Router state that is not a parameter, named "model.layers.{l}.block_sparse_moe.router_state.*".
    std::vector<RouterStateTensor> router_state();
    int num_moe_blocks() const { return static_cast<int>(moe_blocks_.size()); }
    const MoeBlock& moe_block(int i) const { return moe_blocks_[i]; }
    MoeBlock& moe_block(int i) { return moe_blocks_[i]; }

    // This rank's expert-parallel traffic since the last call, summed over MoE layers.
    ExchangeStats take_exchange_stats();

    // Logits of the last forward, backend memory [B*T, V]. Without keep_logits, a forward with
    // targets overwrites them with the probabilities (and backward with d logits); with bf16 logits
    // (set_bf16_logits) it keeps none in fp32: logits_to_host throws.
    const float* logits() const { return loss16_ ? nullptr : logits_.data(); }
    std::vector<float> logits_to_host() const;
    // false (training): the loss writes the probabilities over the logits and backward d logits
    // over those, in place: one [B*T, V] buffer fewer (1.6 GB at GPT-2's vocabulary and 8K tokens).
    // true (default): logits stay readable after a forward with targets.
    void set_keep_logits(bool keep);

  private:
    struct LayerActs;  // per-layer saved activations (model.cpp)
    void ensure_activations(int B, int T);

    ModelConfig config_;
    Backend* backend_;
    ParallelContext parallel_;
    ParameterLayout layout_;
    Buffer<float> params_, grads_;
    Buffer<uint16_t> params16_;  // bf16 copy of params_ (set_bf16_weights)
    bool bf16_weights_ = bf16_mode_default("BMOE_BF16_WEIGHTS");
    bool params16_stale_ = true;  // params_ written since params16_ was rounded
    // Before a forward or backward: sets the backend's bf16 weight copy (re-rounded if stale), or
    // clears it where unused (fp32, or set_bf16_weights(false)).
    void use_bf16_weight_copy();
    ModelTensors param_views_, grad_views_;  // grad_views_: nullptr for frozen tensors
    int lowest_trainable_stage_ = -1;        // min ParamInfo::backward_stage of trainable tensors

    // ---- activations of the last forward (sized for B*T) ----
    int B_ = 0, T_ = 0;
    size_t att_numel_ = 0;  // floats attention saves per layer (Backend::attention_saved_numel)
    LossWeights loss_weights_;
    RoutingContext routing_;
    GradientsReadyHook gradients_ready_;
    int64_t num_valid_targets_ = 0;  // over the global batch (all ranks)
    Buffer<int32_t> tokens_, targets_;
    // What a layer needs only while it runs, shared by all layers (first: the layers point into it).
    std::unique_ptr<LayerScratch> layer_scratch_ = std::make_unique<LayerScratch>();
    std::vector<std::unique_ptr<LayerActs>> layer_acts_;
    std::vector<MoeBlock> moe_blocks_;                        // one per MoE layer
    Buffer<float> ffn_out_;  // [N, D] a sub-block's output until its residual add (every layer's)
    Buffer<float> resid_final_;                               // [N, D] output of the last layer
    Buffer<float> final_norm_out_, final_mean_, final_rstd_;  // [N, D], [N], [N]
    Buffer<uint16_t> final_norm_out16_;                       // [N, D] instead of final_norm_out_ with bf16 GEMM inputs
    bool bf16_gemm_inputs_ = bf16_mode_default("BMOE_BF16_GEMM_INPUTS");  // set_bf16_gemm_inputs
    bool gemm_inputs16_ = false;             // the activations are laid out for bf16 GEMM inputs (ensure_activations)
    Buffer<float> logits_, probs_, losses_;  // [N, V], [N, V] (d logits in backward; none without keep_logits), [N]
    Buffer<uint16_t> logits16_;              // [N, V] bf16 logits, then d logits (bf16 logits only)
    Buffer<float> lse_;                      // [N] the loss's log-sum-exp per row (bf16 logits only)
    bool bf16_logits_ = bf16_mode_default("BMOE_BF16_LOGITS");  // set_bf16_logits
    bool loss16_ = false;  // the last forward ran the LM head and loss on bf16 logits
    // backward scratch
    Buffer<float> dresidual_, dtmp_ND_;            // [N, D], [N, max(D, H*Hd)]
    Buffer<float> dq_, dk_, dv_, dattn_;           // [N, H*Hd], [N, KV*Hd] x2, [N, H*Hd]
    // dq, dk, dv in bf16 instead where q, k, v are (qkv16_); dq_ then stays only as attention
    // recompute's scratch output
    Buffer<uint16_t> dq16_, dk16_, dv16_;
    // q, k, v and their gradients in bf16: bf16 GEMM inputs without RoPE (which rotates them in fp32)
    // where the backend's attention reads bf16 (Backend::attention_reads_bf16)
    bool qkv16_ = false;
    bool recompute_attention_ = false;
    bool recompute_mlp_ = false;
    bool keep_logits_ = true;
    float* probs() { return keep_logits_ ? probs_.data() : logits_.data(); }  // the loss's [N, V] buffer
    Buffer<float> att_shared_;  // what attention saves, shared by every layer with attention recompute
    float* scores(LayerActs& a);
    // attention over the layer's saved q, k, v (fp32, or bf16 where qkv16_) into out [B*T, H*Hd]
    void attention_forward(LayerActs& a, float* out);
};

}  // namespace bmoe::model
