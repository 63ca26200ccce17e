#include "model/params.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <regex>

#include "model/rng.h"
#include "parallel/check.h"

namespace bmoe::model {

namespace {
// softplus(y) = x  <=>  y = log(exp(x) - 1), for initialising softplus-parameterised scales.
float softplus_inverse(float x) { return x > 20.0f ? x : std::log(std::expm1(x)); }
}  // namespace

ParameterLayout::ParameterLayout(const ModelConfig& c, int first_expert, int num_local_experts)
    : config_(c),
      first_expert_(first_expert),
      num_local_experts_(num_local_experts < 0 ? c.num_experts : num_local_experts) {
    BMOE_ASSERT(first_expert_ >= 0 && first_expert_ + num_local_experts_ <= c.num_experts, "bad expert slice");
    const int64_t V = c.vocab_size, D = c.d_model, E = c.num_experts, F = c.expert_hidden, Fd = c.dense_hidden;
    const int64_t q_dim = int64_t{c.num_heads} * c.head_dim(), kv_dim = int64_t{c.num_kv_heads} * c.head_dim();
    const bool layernorm = c.norm == NormType::kLayerNorm;
    const bool swiglu = c.activation == Activation::kSwiGlu;
    auto add_norm = [&](const std::string& prefix) {
        add(prefix + ".weight", {D}, ParamGroup::kDense, ParamInit::kOnes);
        if (layernorm) add(prefix + ".bias", {D}, ParamGroup::kDense, ParamInit::kZeros);
    };

    // Variational router tensors; "variance heads" get no weight decay and their own learning rate.
    const RouterConfig& rc = c.router;
    auto add_router_tensors = [&](const std::string& r) {
        const int64_t H = rc.hidden;
        auto add_head = [&](const std::string& name, std::vector<int64_t> shape, ParamInit init, float value) {
            add(name, std::move(shape), ParamGroup::kRouter, init);
            params_.back().init_value = value;
            params_.back().variance_head = true;
            params_.back().weight_decay = false;
        };
        switch (rc.type) {
            case RouterType::kEnsemble:
                add(r + ".ensemble.weight", {rc.ensemble_size - 1, E, D}, ParamGroup::kRouter, ParamInit::kNormal);
                break;
            case RouterType::kWeightMfvi:
                add_head(r + ".weight_rho", {E, D}, ParamInit::kConstant, softplus_inverse(rc.weight_sigma_init));
                break;
            case RouterType::kLogitMf:
            case RouterType::kLogitFc: {
                const bool fc = rc.type == RouterType::kLogitFc;
                const int64_t rows = fc ? RouterConfig::packed_size(c.num_experts) : E;
                const std::string head = r + (fc ? ".chol_head" : ".scale_head");
                add(r + ".trunk.weight", {H, D}, ParamGroup::kRouter, ParamInit::kNormal);
                add(r + ".mean_head.weight", {E, H}, ParamGroup::kRouter, ParamInit::kZeros);
                add_head(head + ".weight", {rows, H}, ParamInit::kZeros, 0.0f);
                add_head(head + ".bias", {rows}, fc ? ParamInit::kCholeskyDiag : ParamInit::kConstant,
                         softplus_inverse(rc.sigma_init - rc.sigma_min));
                break;
            }
            case RouterType::kVtsr:
                add_head(r + ".temperature.weight", {1, D}, ParamInit::kZeros, 0.0f);
                add_head(r + ".temperature.bias", {1}, ParamInit::kConstant,
                         std::log((1.0f - rc.temp_min) / (rc.temp_max - 1.0f)));  // T = 1 at init
                break;
            default:
                break;  // topk, temp_sampling, mc_dropout, swag: gate.weight only
        }
    };

    add("model.embed_tokens.weight", {V, D}, ParamGroup::kDense, ParamInit::kNormal);
    if (c.position == PositionType::kLearned)
        add("model.embed_positions.weight", {c.max_seq_len, D}, ParamGroup::kDense, ParamInit::kNormal);
    for (int l = 0; l < c.num_layers; ++l) {
        stage_ = l;
        const std::string p = "model.layers." + std::to_string(l);
        add_norm(p + ".input_layernorm");
        add(p + ".self_attn.q_proj.weight", {q_dim, D}, ParamGroup::kDense, ParamInit::kNormal);
        add(p + ".self_attn.k_proj.weight", {kv_dim, D}, ParamGroup::kDense, ParamInit::kNormal);
        add(p + ".self_attn.v_proj.weight", {kv_dim, D}, ParamGroup::kDense, ParamInit::kNormal);
        add(p + ".self_attn.o_proj.weight", {D, q_dim}, ParamGroup::kDense, ParamInit::kNormalScaled);
        add_norm(p + ".post_attention_layernorm");
        if (c.is_moe_layer(l)) {
            const std::string m = p + ".block_sparse_moe";
            add(m + ".gate.weight", {E, D}, ParamGroup::kRouter, ParamInit::kNormal);
            add_router_tensors(m + ".router");
            if (swiglu) add(m + ".experts.w1", {E, F, D}, ParamGroup::kExpert, ParamInit::kNormal);
            add(m + ".experts.w3", {E, F, D}, ParamGroup::kExpert, ParamInit::kNormal);
            add(m + ".experts.w2", {E, D, F}, ParamGroup::kExpert, ParamInit::kNormalScaled);
        } else {
            if (swiglu) add(p + ".mlp.gate_proj.weight", {Fd, D}, ParamGroup::kDense, ParamInit::kNormal);
            add(p + ".mlp.up_proj.weight", {Fd, D}, ParamGroup::kDense, ParamInit::kNormal);
            add(p + ".mlp.down_proj.weight", {D, Fd}, ParamGroup::kDense, ParamInit::kNormalScaled);
        }
    }
    stage_ = c.num_layers;
    add_norm("model.norm");
    if (!c.tie_embeddings) add("lm_head.weight", {V, D}, ParamGroup::kDense, ParamInit::kNormal);
}

void ParameterLayout::add(const std::string& name, std::vector<int64_t> shape, ParamGroup group, ParamInit init) {
    ParamInfo info;
    info.name = name;
    info.global_shape = shape;
    if (group == ParamGroup::kExpert) {  // this rank's experts only
        const size_t per_expert = static_cast<size_t>(shape[1] * shape[2]);
        info.global_offset = static_cast<size_t>(first_expert_) * per_expert;
        shape[0] = num_local_experts_;
    }
    info.numel = 1;
    for (int64_t s : shape) info.numel *= static_cast<size_t>(s);
    info.shape = std::move(shape);
    info.offset = total_numel_;
    info.weight_decay = info.shape.size() >= 2;  // no decay on norms and biases
    info.group = group;
    info.init = init;
    info.backward_stage = stage_;
    // Keep every tensor 16-float aligned so vectorised kernels can assume it.
    total_numel_ += (info.numel + 15) / 16 * 16;
    params_.push_back(std::move(info));
}

int ParameterLayout::find(const std::string& name) const {
    for (size_t i = 0; i < params_.size(); ++i)
        if (params_[i].name == name) return static_cast<int>(i);
    return -1;
}

ModelTensors ParameterLayout::views(float* block, bool trainable_only) const {
    auto at = [&](const std::string& name) -> float* {
        int i = find(name);
        return i < 0 || (trainable_only && !params_[i].trainable) ? nullptr : block + params_[i].offset;
    };
    ModelTensors t;
    t.tok_emb = at("model.embed_tokens.weight");
    t.pos_emb = at("model.embed_positions.weight");
    t.final_norm_w = at("model.norm.weight");
    t.final_norm_b = at("model.norm.bias");
    t.lm_head = config_.tie_embeddings ? t.tok_emb : at("lm_head.weight");
    for (int l = 0; l < config_.num_layers; ++l) {
        const std::string p = "model.layers." + std::to_string(l);
        LayerTensors L;
        L.attn_norm_w = at(p + ".input_layernorm.weight");
        L.attn_norm_b = at(p + ".input_layernorm.bias");
        L.wq = at(p + ".self_attn.q_proj.weight");
        L.wk = at(p + ".self_attn.k_proj.weight");
        L.wv = at(p + ".self_attn.v_proj.weight");
        L.wo = at(p + ".self_attn.o_proj.weight");
        L.ffn_norm_w = at(p + ".post_attention_layernorm.weight");
        L.ffn_norm_b = at(p + ".post_attention_layernorm.bias");
        if (config_.is_moe_layer(l)) {
            const std::string r = p + ".block_sparse_moe.router";
            L.router_w = at(p + ".block_sparse_moe.gate.weight");
            L.router_ensemble_w = at(r + ".ensemble.weight");
            L.router_rho = at(r + ".weight_rho");
            L.router_trunk_w = at(r + ".trunk.weight");
            L.router_mean_w = at(r + ".mean_head.weight");
            L.router_scale_w =
                at(r + ".scale_head.weight") ? at(r + ".scale_head.weight") : at(r + ".chol_head.weight");
            L.router_scale_b = at(r + ".scale_head.bias") ? at(r + ".scale_head.bias") : at(r + ".chol_head.bias");
            L.router_temp_w = at(r + ".temperature.weight");
            L.router_temp_b = at(r + ".temperature.bias");
            L.ffn_gate = at(p + ".block_sparse_moe.experts.w1");
            L.ffn_up = at(p + ".block_sparse_moe.experts.w3");
            L.ffn_down = at(p + ".block_sparse_moe.experts.w2");
        } else {
            L.ffn_gate = at(p + ".mlp.gate_proj.weight");
            L.ffn_up = at(p + ".mlp.up_proj.weight");
            L.ffn_down = at(p + ".mlp.down_proj.weight");
        }
        t.layers.push_back(L);
    }
    return t;
}

std::vector<float> ParameterLayout::init_host(uint64_t seed) const {
    std::vector<float> host(total_numel_, 0.0f);
    const float scaled_std = config_.init_std / std::sqrt(2.0f * static_cast<float>(config_.num_layers));
    for (size_t i = 0; i < params_.size(); ++i) {
        const ParamInfo& p = params_[i];
        float* dst = host.data() + p.offset;
        // One independent stream per tensor: adding a tensor never changes the others' values.
        const CounterRng rng(seed, /*stream=*/0x1000 + i);
        const auto n = static_cast<int64_t>(p.numel);
        switch (p.init) {
            case ParamInit::kNormal:
            case ParamInit::kNormalScaled: {
                const float std = p.init == ParamInit::kNormal ? config_.init_std : scaled_std;
                // Counter-based draws: threads give the same values as one (a 2B-parameter model
                // took minutes to initialise on one core).
#pragma omp parallel for schedule(static) if (n > (1 << 16))
                for (int64_t j = 0; j < n; ++j) dst[j] = std * rng.normal(p.global_offset + j);
                break;
            }
            case ParamInit::kOnes:
                std::fill(dst, dst + n, 1.0f);
                break;
            case ParamInit::kConstant:
                std::fill(dst, dst + n, p.init_value);
                break;
            case ParamInit::kZeros:
            case ParamInit::kCholeskyDiag:
                break;  // host is zero-filled
        }
        if (p.init == ParamInit::kCholeskyDiag)  // packed row-major: row i starts at i(i+1)/2
            for (int i = 0; i < config_.num_experts; ++i) dst[i * (i + 1) / 2 + i] = p.init_value;
    }
    return host;
}

int ParameterLayout::set_trainable(const std::vector<std::string>& patterns) {
    std::vector<std::regex> regexes;
    for (const std::string& p : patterns) {
        try {
            regexes.emplace_back(p);
        } catch (const std::regex_error& e) {
            throw Error(concat("trainable pattern '", p, "' is not a valid regex (", e.what(), ")"));
        }
    }
    int count = 0;
    for (ParamInfo& p : params_) {
        p.trainable = regexes.empty();
        for (const std::regex& r : regexes) p.trainable = p.trainable || std::regex_search(p.name, r);
        count += p.trainable ? 1 : 0;
    }
    std::string joined;
    for (const std::string& p : patterns) joined += (joined.empty() ? "" : ",") + p;
    BMOE_REQUIRE(count > 0, "train.trainable='", joined, "' matches no parameter: patterns are regexes searched in ",
                 "names like model.layers.0.block_sparse_moe.gate.weight (bmoe ckpt inspect lists them)");
    return count;
}

size_t ParameterLayout::active_matmul_params() const {
    const ModelConfig& c = config_;
    size_t n = 0;
    for (const ParamInfo& p : params_) {
        if (p.shape.size() < 2 || p.name == "model.embed_tokens.weight" || p.name == "model.embed_positions.weight")
            continue;
        // Only K of E experts run per token.
        n += p.group == ParamGroup::kExpert ? p.numel / num_local_experts_ * c.top_k : p.numel;
    }
    if (c.tie_embeddings) n += static_cast<size_t>(c.vocab_size) * c.d_model;  // tied LM head is still a matmul
    return n;
}

}  // namespace bmoe::model
