#include "model/model.h"

#include <algorithm>
#include <cmath>

#include "parallel/check.h"

namespace bmoe::model {

// Saved activations of one transformer layer for a micro-batch of N = B*T tokens.
struct Model::LayerActs {
    Buffer<float> resid_in;                           // [N, D] residual stream entering the layer
    Buffer<float> norm1_out, norm1_mean, norm1_rstd;  // [N, D], [N], [N]
    Buffer<uint16_t> norm1_out16;                     // [N, D] instead of norm1_out (bf16 GEMM inputs)
    Buffer<float> q, k, v;                            // [N, H*Hd], [N, KV*Hd] x2 (q, k after RoPE)
    Buffer<uint16_t> q16, k16, v16;                   // instead of q, k, v where Model::qkv16_
    Buffer<float> att;  // what attention saves: [B, H, T, T] probs or [B, H, T] lse (empty with recompute)
    Buffer<float> attn_out;                           // [N, H*Hd]
    Buffer<uint16_t> attn_out16;                      // [N, H*Hd] its bf16 rounding (bf16 GEMM inputs)
    Buffer<float> resid_mid;                          // [N, D] after the attention residual add
    Buffer<float> norm2_out, norm2_mean, norm2_rstd;
    std::unique_ptr<GroupedMlp> dense_ffn;  // dense layers only
    int moe_index = -1;                     // index into moe_blocks_, or -1
};

Model::Model(const ModelConfig& config, Backend* backend, const ParallelContext& parallel)
    : config_(config),
      backend_(backend),
      parallel_(parallel),
      layout_((config.validate(), config), parallel.first_expert, parallel.num_local_experts) {
    params_ = Buffer<float>(backend_, layout_.total_numel());
    grads_ = Buffer<float>(backend_, layout_.total_numel());
    param_views_ = layout_.views(params_.data());
    grad_views_ = layout_.views(grads_.data(), /*trainable_only=*/true);
    for (int l = 0; l < config_.num_layers; ++l) {
        auto acts = std::make_unique<LayerActs>();
        if (config_.is_moe_layer(l)) {
            acts->moe_index = static_cast<int>(moe_blocks_.size());
            moe_blocks_.emplace_back(config_, backend_, parallel_, l, layer_scratch_.get());
        } else {
            acts->dense_ffn = std::make_unique<GroupedMlp>(backend_, config_.activation, config_.d_model,
                                                           config_.dense_hidden, layer_scratch_.get());
        }
        layer_acts_.push_back(std::move(acts));
    }
}

Model::~Model() { backend_->clear_bf16_weight_copy(params_.data()); }

void Model::use_bf16_weight_copy() {
    Backend* be = backend_;
    if (!bf16_weights_ || be->matmul_precision() != MatmulPrecision::kBf16) {
        be->clear_bf16_weight_copy(params_.data());
        return;
    }
    const size_t n = layout_.total_numel();
    if (params16_.size() != n) params16_ = Buffer<uint16_t>(be, n), params16_stale_ = true;
    be->set_bf16_weight_copy(params_.data(), params16_.data(), n);
    if (params16_stale_) be->float_to_bf16(params16_.data(), params_.data(), n);
    params16_stale_ = false;
}

ExchangeStats Model::take_exchange_stats() {
    ExchangeStats total;
    for (MoeBlock& b : moe_blocks_) {
        const ExchangeStats s = b.take_exchange_stats();
        total.seconds += s.seconds;
        total.rows_sent += s.rows_sent;
        total.min_rows_sent += s.min_rows_sent;
        total.bytes_sent += s.bytes_sent;
        total.min_bytes += s.min_bytes;
    }
    return total;
}

void Model::end_step(int step) {
    for (int l = 0; l < config_.num_layers; ++l)
        if (layer_acts_[l]->moe_index >= 0)
            moe_blocks_[layer_acts_[l]->moe_index].router().end_step(step, param_views_.layers[l]);
}

std::vector<RouterStateTensor> Model::router_state() {
    std::vector<RouterStateTensor> all;
    for (int l = 0; l < config_.num_layers; ++l) {
        if (layer_acts_[l]->moe_index < 0) continue;
        for (RouterStateTensor t : moe_blocks_[layer_acts_[l]->moe_index].router().state()) {
            t.name = "model.layers." + std::to_string(l) + ".block_sparse_moe.router_state." + t.name;
            all.push_back(std::move(t));
        }
    }
    return all;
}

void Model::init_weights(uint64_t seed) {
    params_.upload(layout_.init_host(seed));
    params16_stale_ = true;
}

int Model::set_trainable(const std::vector<std::string>& patterns) {
    const int trainable = layout_.set_trainable(patterns);
    grad_views_ = layout_.views(grads_.data(), /*trainable_only=*/true);
    lowest_trainable_stage_ = config_.num_layers + 1;
    for (const ParamInfo& p : layout_.params())
        if (p.trainable) lowest_trainable_stage_ = std::min(lowest_trainable_stage_, p.backward_stage);
    return trainable;
}

void Model::params_from_host(const std::vector<float>& host) {
    BMOE_REQUIRE(host.size() == layout_.total_numel(), "parameter block has ", host.size(), " floats, model expects ",
                 layout_.total_numel(), ": the weights were made for another model config");
    params_.upload(host);
    params16_stale_ = true;
}

std::vector<float> Model::logits_to_host() const {
    BMOE_REQUIRE(!loss16_,
                 "the last forward kept its logits in bf16 only (a training forward with bf16 logits): "
                 "read logits after a forward without targets, or with set_keep_logits(true)");
    std::vector<float> host(static_cast<size_t>(B_) * T_ * config_.vocab_size);
    backend_->download(host.data(), logits_.data(), host.size() * sizeof(float));
    return host;
}

void Model::set_attention_recompute(bool on) {
    if (on == recompute_attention_) return;
    recompute_attention_ = on;
    B_ = T_ = 0;  // reallocate the activations at the next forward
}

void Model::set_keep_logits(bool keep) {
    if (keep == keep_logits_) return;
    keep_logits_ = keep;
    B_ = T_ = 0;  // reallocate the activations at the next forward
}

void Model::set_mlp_recompute(bool on) {
    recompute_mlp_ = on;
    for (MoeBlock& b : moe_blocks_) b.set_recompute_activation(on);
    for (auto& a : layer_acts_)
        if (a->dense_ffn) a->dense_ffn->set_recompute_activation(on);
}

void Model::set_mlp_bf16_activations(bool on) {
    for (MoeBlock& b : moe_blocks_) b.set_bf16_activation_storage(on);
    for (auto& a : layer_acts_)
        if (a->dense_ffn) a->dense_ffn->set_bf16_activation_storage(on);
}

void Model::set_bf16_gemm_inputs(bool on) {
    bf16_gemm_inputs_ = on;
    for (MoeBlock& b : moe_blocks_) b.set_bf16_gemm_inputs(on);
}

void Model::attention_forward(LayerActs& a, float* out) {
    const ModelConfig& c = config_;
    const int H = c.num_heads, KV = c.num_kv_heads, Hd = c.head_dim();
    if (qkv16_)
        backend_->attention_forward_bf16(out, scores(a), a.q16.data(), a.k16.data(), a.v16.data(), B_, T_, H, KV, Hd);
    else
        backend_->attention_forward(out, scores(a), a.q.data(), a.k.data(), a.v.data(), B_, T_, H, KV, Hd);
}

float* Model::scores(LayerActs& a) { return recompute_attention_ ? att_shared_.data() : a.att.data(); }

void Model::ensure_activations(int B, int T) {
    // What attention saves depends on the backend's attention kernel (and precision): re-checked.
    const size_t att_numel = backend_->attention_saved_numel(B, T, config_.num_heads, config_.head_dim());
    const bool inputs16 = bf16_gemm_inputs_ && backend_->matmul_precision() == MatmulPrecision::kBf16;
    // q, k, v in bf16 where no RoPE rotates them in fp32 and the backend's attention reads bf16
    const bool qkv16 =
        inputs16 && config_.position != PositionType::kRope && backend_->attention_reads_bf16(config_.head_dim());
    if (B == B_ && T == T_ && att_numel == att_numel_ && inputs16 == gemm_inputs16_ && qkv16 == qkv16_) return;
    B_ = B;
    T_ = T;
    att_numel_ = att_numel;
    gemm_inputs16_ = inputs16;
    qkv16_ = qkv16;
    const size_t N = static_cast<size_t>(B) * T, D = config_.d_model, V = config_.vocab_size;
    const size_t q_dim = static_cast<size_t>(config_.num_heads) * config_.head_dim();
    const size_t kv_dim = static_cast<size_t>(config_.num_kv_heads) * config_.head_dim();
    Backend* be = backend_;
    tokens_ = Buffer<int32_t>(be, N);
    targets_ = Buffer<int32_t>(be, N);
    att_shared_ = recompute_attention_ ? Buffer<float>(be, att_numel) : Buffer<float>();
    for (auto& a : layer_acts_) {
        a->resid_in = Buffer<float>(be, N * D);
        a->norm1_out = inputs16 ? Buffer<float>() : Buffer<float>(be, N * D);
        a->norm1_out16 = inputs16 ? Buffer<uint16_t>(be, N * D) : Buffer<uint16_t>();
        a->norm1_mean = Buffer<float>(be, N);
        a->norm1_rstd = Buffer<float>(be, N);
        a->q = qkv16_ ? Buffer<float>() : Buffer<float>(be, N * q_dim);
        a->k = qkv16_ ? Buffer<float>() : Buffer<float>(be, N * kv_dim);
        a->v = qkv16_ ? Buffer<float>() : Buffer<float>(be, N * kv_dim);
        a->q16 = qkv16_ ? Buffer<uint16_t>(be, N * q_dim) : Buffer<uint16_t>();
        a->k16 = qkv16_ ? Buffer<uint16_t>(be, N * kv_dim) : Buffer<uint16_t>();
        a->v16 = qkv16_ ? Buffer<uint16_t>(be, N * kv_dim) : Buffer<uint16_t>();
        a->att = recompute_attention_ ? Buffer<float>() : Buffer<float>(be, att_numel);
        a->attn_out = Buffer<float>(be, N * q_dim);
        a->attn_out16 = inputs16 ? Buffer<uint16_t>(be, N * q_dim) : Buffer<uint16_t>();
        a->resid_mid = Buffer<float>(be, N * D);
        a->norm2_out = Buffer<float>(be, N * D);
        a->norm2_mean = Buffer<float>(be, N);
        a->norm2_rstd = Buffer<float>(be, N);
    }
    ffn_out_ = Buffer<float>(be, N * D);
    resid_final_ = Buffer<float>(be, N * D);
    final_norm_out_ = inputs16 ? Buffer<float>() : Buffer<float>(be, N * D);
    final_norm_out16_ = inputs16 ? Buffer<uint16_t>(be, N * D) : Buffer<uint16_t>();
    final_mean_ = Buffer<float>(be, N);
    final_rstd_ = Buffer<float>(be, N);
    // the logits: fp32 and/or bf16, allocated by the forwards that use them
    logits_ = Buffer<float>();
    logits16_ = Buffer<uint16_t>();
    lse_ = Buffer<float>();
    probs_ = keep_logits_ ? Buffer<float>(be, N * V) : Buffer<float>();
    losses_ = Buffer<float>(be, N);
    dresidual_ = Buffer<float>(be, N * D);
    dtmp_ND_ = Buffer<float>(be, N * std::max(D, q_dim));
    dq_ = qkv16_ && !recompute_attention_ ? Buffer<float>() : Buffer<float>(be, N * q_dim);
    dk_ = qkv16_ ? Buffer<float>() : Buffer<float>(be, N * kv_dim);
    dv_ = qkv16_ ? Buffer<float>() : Buffer<float>(be, N * kv_dim);
    dq16_ = qkv16_ ? Buffer<uint16_t>(be, N * q_dim) : Buffer<uint16_t>();
    dk16_ = qkv16_ ? Buffer<uint16_t>(be, N * kv_dim) : Buffer<uint16_t>();
    dv16_ = qkv16_ ? Buffer<uint16_t>(be, N * kv_dim) : Buffer<uint16_t>();
    dattn_ = Buffer<float>(be, N * q_dim);
}

// ---------------------------------------------------------------------------------------------
// norm dispatch: the config picks RMSNorm (mean unused) or LayerNorm

namespace {
// out (fp32) or out16 (its bf16 rounding): exactly one is given.
void norm_forward(Backend* be,
                  const ModelConfig& c,
                  float* out,
                  uint16_t* out16,
                  float* mean,
                  float* rstd,
                  const float* in,
                  const float* w,
                  const float* b,
                  int N) {
    const int D = c.d_model;
    if (c.norm == NormType::kRmsNorm) {
        if (out16)
            be->rmsnorm_forward_bf16(out16, rstd, in, w, N, D, c.norm_eps);
        else
            be->rmsnorm_forward(out, rstd, in, w, N, D, c.norm_eps);
    } else {
        if (out16)
            be->layernorm_forward_bf16(out16, mean, rstd, in, w, b, N, D, c.norm_eps);
        else
            be->layernorm_forward(out, mean, rstd, in, w, b, N, D, c.norm_eps);
    }
}
void norm_backward(Backend* be,
                   const ModelConfig& c,
                   float* din,
                   float* dw,
                   float* db,
                   const float* dout,
                   const float* in,
                   const float* w,
                   const float* mean,
                   const float* rstd,
                   int N) {
    if (c.norm == NormType::kRmsNorm)
        be->rmsnorm_backward(din, dw, dout, in, w, rstd, N, c.d_model);
    else
        be->layernorm_backward(din, dw, db, dout, in, w, mean, rstd, N, c.d_model);
}

// A dense GEMM's input or d output (no bias): stored as bf16 where x16 is set (bf16 GEMM inputs;
// it wins over x), else fp32.
struct GemmInput {
    const float* x;
    const uint16_t* x16;
};
void dense_forward(Backend* be, float* out_NO, GemmInput in, const float* w_OI, int N, int I, int O) {
    if (in.x16)
        be->matmul_forward_bf16(out_NO, nullptr, nullptr, in.x16, w_OI, N, I, O);
    else
        be->matmul_forward(out_NO, in.x, w_OI, nullptr, N, I, O);
}
void dense_backward(Backend* be,
                    float* din_NI,
                    float* dw_OI,
                    GemmInput dout,
                    GemmInput in,
                    const float* w_OI,
                    int N,
                    int I,
                    int O,
                    bool accumulate_din) {
    if (in.x16 || dout.x16)
        be->matmul_backward_bf16(din_NI, dw_OI, dout.x16 ? nullptr : dout.x, dout.x16, in.x16 ? nullptr : in.x, in.x16,
                                 w_OI, N, I, O, accumulate_din);
    else
        be->matmul_backward(din_NI, dw_OI, nullptr, dout.x, in.x, w_OI, N, I, O, accumulate_din);
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// forward

ForwardStats Model::forward(const int32_t* tokens, const int32_t* targets, int B, int T, const LossWeights& weights) {
    BMOE_REQUIRE(B >= 1 && T >= 1, "batch size and sequence length must be >= 1 (got ", B, "x", T, ")");
    BMOE_REQUIRE(config_.position != PositionType::kLearned || T <= config_.max_seq_len, "sequence length ", T,
                 " exceeds model.max_seq_len ", config_.max_seq_len, " (learned positions): shorten data.seq_len");
    ensure_activations(B, T);
    use_bf16_weight_copy();
    const ModelConfig& c = config_;
    const int N = B * T, D = c.d_model, V = c.vocab_size, H = c.num_heads, KV = c.num_kv_heads, Hd = c.head_dim();
    const ModelTensors& p = param_views_;
    Backend* be = backend_;
    loss_weights_ = weights;
    for (int i = 0; i < N; ++i)
        BMOE_REQUIRE(tokens[i] >= 0 && tokens[i] < V, "token id ", tokens[i], " at position ", i,
                     " is outside the vocabulary [0, ", V, "): the data was made for another vocab_size");
    be->upload(tokens_.data(), tokens, N * sizeof(int32_t));

    // embeddings -> residual stream of layer 0
    float* x = layer_acts_[0]->resid_in.data();
    be->embedding_forward(x, tokens_.data(), p.tok_emb, N, D);
    if (c.position == PositionType::kLearned) be->position_forward(x, p.pos_emb, B, T, D);

    ForwardStats stats;
    for (int l = 0; l < c.num_layers; ++l) {
        LayerActs& a = *layer_acts_[l];
        const LayerTensors& w = p.layers[l];
        // attention sub-block
        norm_forward(be, c, a.norm1_out.data(), a.norm1_out16.data(), a.norm1_mean.data(), a.norm1_rstd.data(),
                     a.resid_in.data(), w.attn_norm_w, w.attn_norm_b, N);
        const GemmInput norm1{a.norm1_out.data(), a.norm1_out16.data()};
        if (qkv16_) {  // the projections write bf16, which attention reads directly
            be->matmul_forward_bf16(nullptr, a.q16.data(), nullptr, norm1.x16, w.wq, N, D, H * Hd);
            be->matmul_forward_bf16(nullptr, a.k16.data(), nullptr, norm1.x16, w.wk, N, D, KV * Hd);
            be->matmul_forward_bf16(nullptr, a.v16.data(), nullptr, norm1.x16, w.wv, N, D, KV * Hd);
        } else {
            dense_forward(be, a.q.data(), norm1, w.wq, N, D, H * Hd);
            dense_forward(be, a.k.data(), norm1, w.wk, N, D, KV * Hd);
            dense_forward(be, a.v.data(), norm1, w.wv, N, D, KV * Hd);
        }
        if (c.position == PositionType::kRope) {
            be->rope_forward(a.q.data(), B, T, H, Hd, c.rope_theta);
            be->rope_forward(a.k.data(), B, T, KV, Hd, c.rope_theta);
        }
        attention_forward(a, a.attn_out.data());
        if (gemm_inputs16_) be->float_to_bf16(a.attn_out16.data(), a.attn_out.data(), a.attn_out16.size());
        // ffn_out_ holds the attention projection's output here, the FFN's below
        dense_forward(be, ffn_out_.data(), {a.attn_out.data(), a.attn_out16.data()}, w.wo, N, H * Hd, D);
        be->add(a.resid_mid.data(), a.resid_in.data(), ffn_out_.data(), static_cast<size_t>(N) * D);
        // feed-forward sub-block (MoE or dense)
        norm_forward(be, c, a.norm2_out.data(), nullptr, a.norm2_mean.data(), a.norm2_rstd.data(), a.resid_mid.data(),
                     w.ffn_norm_w, w.ffn_norm_b, N);
        if (a.moe_index >= 0) {
            stats.moe_layers.push_back(
                moe_blocks_[a.moe_index].forward(ffn_out_.data(), a.norm2_out.data(), w, N, routing_));
        } else {
            a.dense_ffn->forward(ffn_out_.data(), a.norm2_out.data(), MlpWeights{w.ffn_gate, w.ffn_up, w.ffn_down},
                                 {0, N});
        }
        float* next = l + 1 < c.num_layers ? layer_acts_[l + 1]->resid_in.data() : resid_final_.data();
        be->add(next, a.resid_mid.data(), ffn_out_.data(), static_cast<size_t>(N) * D);
    }

    // final norm -> LM head
    norm_forward(be, c, final_norm_out_.data(), final_norm_out16_.data(), final_mean_.data(), final_rstd_.data(),
                 resid_final_.data(), p.final_norm_w, p.final_norm_b, N);
    const GemmInput final_norm{final_norm_out_.data(), final_norm_out16_.data()};
    const size_t NV = static_cast<size_t>(N) * V;
    loss16_ = targets != nullptr && !keep_logits_ && bf16_logits_ && be->matmul_precision() == MatmulPrecision::kBf16;
    if (loss16_) {
        logits16_.ensure(be, NV);
        lse_.ensure(be, N);
        be->matmul_forward_bf16(nullptr, logits16_.data(), final_norm.x, final_norm.x16, p.lm_head, N, D, V);
    } else {
        logits_.ensure(be, NV);
        dense_forward(be, logits_.data(), final_norm, p.lm_head, N, D, V);
    }

    for (const MoeLayerStats& s : stats.moe_layers) {
        stats.aux_loss += s.aux_loss / static_cast<double>(stats.moe_layers.size());
        stats.z_loss += s.z_loss / static_cast<double>(stats.moe_layers.size());
        stats.router_reg += s.reg;
    }
    num_valid_targets_ = 0;
    if (targets != nullptr) {
        // [sum of losses, valid targets] over the global batch: CE is the mean over all ranks' tokens.
        double totals[2] = {0.0, 0.0};
        for (int i = 0; i < N; ++i) {
            BMOE_REQUIRE(targets[i] < V, "target id ", targets[i], " is outside the vocabulary [0, ", V, ")");
            totals[1] += targets[i] >= 0 ? 1.0 : 0.0;
        }
        be->upload(targets_.data(), targets, N * sizeof(int32_t));
        if (loss16_)
            be->cross_entropy_forward_bf16(losses_.data(), lse_.data(), logits16_.data(), targets_.data(), N, V);
        else
            be->cross_entropy_forward(losses_.data(), probs(), logits_.data(), targets_.data(), N, V);
        std::vector<float> losses = losses_.download();
        for (int i = 0; i < N; ++i) totals[0] += losses[i];
        if (parallel_.world != nullptr) parallel_.world->all_reduce_sum(totals, 2);
        num_valid_targets_ = static_cast<int64_t>(totals[1]);
        stats.ce_loss = num_valid_targets_ > 0 ? totals[0] / totals[1] : 0.0;
    }
    stats.num_valid_targets = num_valid_targets_;
    stats.total_loss = stats.ce_loss + weights.aux_coef * stats.aux_loss + weights.zloss_coef * stats.z_loss +
                       weights.router_reg_coef * stats.router_reg;
    return stats;
}

// ---------------------------------------------------------------------------------------------
// backward: the forward's calls in reverse order

void Model::backward(float loss_scale) {
    BMOE_ASSERT(B_ > 0, "backward() before forward()");
    use_bf16_weight_copy();
    const ModelConfig& c = config_;
    const int B = B_, T = T_, N = B * T, D = c.d_model, V = c.vocab_size, H = c.num_heads, KV = c.num_kv_heads,
              Hd = c.head_dim();
    const ModelTensors& p = param_views_;
    const ModelTensors& g = grad_views_;
    Backend* be = backend_;
    const int num_moe = c.num_moe_layers();
    const float aux_weight = num_moe > 0 ? loss_weights_.aux_coef * loss_scale / num_moe : 0.0f;
    const float z_weight = num_moe > 0 ? loss_weights_.zloss_coef * loss_scale / num_moe : 0.0f;
    const float reg_weight = loss_weights_.router_reg_coef * loss_scale;
    const GemmInput final_norm{final_norm_out_.data(), final_norm_out16_.data()};

    // LM head and final norm. CE is a mean over valid targets.
    const float dloss = num_valid_targets_ > 0 ? loss_scale / static_cast<float>(num_valid_targets_) : 0.0f;
    // d logits overwrites probs in place (elementwise on every backend; probs are the logits'
    // buffer too without keep_logits): [N, V] buffers fewer, 1.6 GB each at GPT-2's vocabulary and
    // 8K tokens.
    if (loss16_) {  // the same in place over the bf16 logits
        uint16_t* dlogits16 = logits16_.data();
        be->cross_entropy_backward_bf16(dlogits16, dlogits16, lse_.data(), targets_.data(), dloss, N, V);
        be->matmul_backward_bf16(dtmp_ND_.data(), g.lm_head, nullptr, dlogits16, final_norm.x, final_norm.x16,
                                 p.lm_head, N, D, V, false);
    } else {
        float* dlogits = probs();
        be->cross_entropy_backward(dlogits, dlogits, targets_.data(), dloss, N, V);
        dense_backward(be, dtmp_ND_.data(), g.lm_head, {dlogits, nullptr}, final_norm, p.lm_head, N, D, V, false);
    }
    dresidual_.zero();
    norm_backward(be, c, dresidual_.data(), g.final_norm_w, g.final_norm_b, dtmp_ND_.data(), resid_final_.data(),
                  p.final_norm_w, final_mean_.data(), final_rstd_.data(), N);
    if (gradients_ready_) gradients_ready_(c.num_layers);

    // Below the lowest layer with a trainable tensor no gradient is needed: stop there.
    for (int l = c.num_layers - 1; l >= std::max(0, lowest_trainable_stage_); --l) {
        LayerActs& a = *layer_acts_[l];
        const LayerTensors& w = p.layers[l];
        const LayerTensors& dw = g.layers[l];
        // feed-forward sub-block: d ffn_out = dresidual
        if (a.moe_index >= 0) {
            moe_blocks_[a.moe_index].backward(dtmp_ND_.data(), dw, dresidual_.data(), a.norm2_out.data(), w, aux_weight,
                                              z_weight, reg_weight);
        } else {
            a.dense_ffn->backward(dtmp_ND_.data(), MlpGrads{dw.ffn_gate, dw.ffn_up, dw.ffn_down}, dresidual_.data(),
                                  nullptr, a.norm2_out.data(), MlpWeights{w.ffn_gate, w.ffn_up, w.ffn_down});
        }
        norm_backward(be, c, dresidual_.data(), dw.ffn_norm_w, dw.ffn_norm_b, dtmp_ND_.data(), a.resid_mid.data(),
                      w.ffn_norm_w, a.norm2_mean.data(), a.norm2_rstd.data(), N);
        // attention sub-block: d o_proj out = dresidual
        dense_backward(be, dattn_.data(), dw.wo, {dresidual_.data(), nullptr}, {a.attn_out.data(), a.attn_out16.data()},
                       w.wo, N, H * Hd, D, false);
        if (recompute_attention_)  // this layer's scores again (dq_ is free scratch for the output until below)
            attention_forward(a, dq_.data());
        if (qkv16_) {
            be->attention_backward_bf16(dq16_.data(), dk16_.data(), dv16_.data(), dattn_.data(), a.attn_out.data(),
                                        a.q16.data(), a.k16.data(), a.v16.data(), scores(a), B, T, H, KV, Hd);
        } else {
            be->attention_backward(dq_.data(), dk_.data(), dv_.data(), dattn_.data(), a.attn_out.data(), a.q.data(),
                                   a.k.data(), a.v.data(), scores(a), B, T, H, KV, Hd);
        }
        if (c.position == PositionType::kRope) {
            be->rope_backward(dq_.data(), B, T, H, Hd, c.rope_theta);
            be->rope_backward(dk_.data(), B, T, KV, Hd, c.rope_theta);
        }
        const GemmInput norm1{a.norm1_out.data(), a.norm1_out16.data()};
        const GemmInput dq{dq_.data(), dq16_.data()}, dk{dk_.data(), dk16_.data()}, dv{dv_.data(), dv16_.data()};
        dense_backward(be, dtmp_ND_.data(), dw.wq, dq, norm1, w.wq, N, D, H * Hd, false);
        dense_backward(be, dtmp_ND_.data(), dw.wk, dk, norm1, w.wk, N, D, KV * Hd, true);
        dense_backward(be, dtmp_ND_.data(), dw.wv, dv, norm1, w.wv, N, D, KV * Hd, true);
        norm_backward(be, c, dresidual_.data(), dw.attn_norm_w, dw.attn_norm_b, dtmp_ND_.data(), a.resid_in.data(),
                      w.attn_norm_w, a.norm1_mean.data(), a.norm1_rstd.data(), N);
        if (gradients_ready_) gradients_ready_(l);
    }

    if (lowest_trainable_stage_ >= 0) return;  // embeddings frozen
    // embeddings
    if (c.position == PositionType::kLearned) be->position_backward(g.pos_emb, dresidual_.data(), B, T, D);
    be->embedding_backward(g.tok_emb, dresidual_.data(), tokens_.data(), N, D);
    if (gradients_ready_) gradients_ready_(-1);
}

}  // namespace bmoe::model
