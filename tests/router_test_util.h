// router_test_util.h -- a tiny one-layer MoE config per router family, its parameters with every
// router tensor randomised, a routing context: shared by router_test and cuda_router_test; and a
// tiny two-layer model config shared by the model-level tests.
#pragma once

#include <random>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/params.h"
#include "model/router.h"

namespace bmoe::model {

inline ModelConfig tiny(RouterType type) {
    ModelConfig c;
    c.vocab_size = 11;
    c.d_model = 8;
    c.num_layers = 1;
    c.num_heads = 2;
    c.num_kv_heads = 2;
    c.num_experts = 5;
    c.top_k = 2;
    c.expert_hidden = 4;
    c.router.type = type;
    c.router.hidden = 6;
    c.router.ensemble_size = 3;
    c.router.weight_sigma_init = 0.3f;  // visible weight noise (and rho gradients above fp32 noise)
    c.router.prior_std = 0.7f;
    c.router.weight_prior_std = 0.3f;
    return c;
}

// A two-layer Mixtral-like model small enough for finite differences (model_grad_test,
// backend_memory_test).
inline ModelConfig tiny_model_config() {
    ModelConfig c;
    c.vocab_size = 23;
    c.max_seq_len = 16;
    c.d_model = 16;
    c.num_layers = 2;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.num_experts = 4;
    c.top_k = 2;
    c.expert_hidden = 12;
    c.dense_hidden = 20;
    c.init_std = 0.2f;  // large enough that every term matters
    return c;
}

// Parameters of one MoE layer with every router tensor randomised (so dmu != 0, L is full, T != 1).
struct RouterFixture {
    ModelConfig config;
    ParameterLayout layout;
    std::vector<float> params;
    std::vector<float> x;  // [N, D]
    int N;

    RouterFixture(const ModelConfig& c, int n, uint64_t seed) : config(c), layout(c), N(n) {
        params = layout.init_host(seed);
        std::mt19937 gen(static_cast<unsigned>(seed));
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (const ParamInfo& p : layout.params()) {
            const bool router =
                p.name.find(".router.") != std::string::npos || p.name.find(".gate.") != std::string::npos;
            if (!router) continue;
            const bool bias_like = p.shape.size() == 1 || p.name.find("weight_rho") != std::string::npos;
            for (size_t i = 0; i < p.numel; ++i)
                params[p.offset + i] = bias_like ? params[p.offset + i] + 0.3f * normal(gen) : 0.5f * normal(gen);
        }
        x.resize(static_cast<size_t>(N) * c.d_model);
        for (float& v : x) v = normal(gen);
    }
    LayerTensors weights() { return layout.views(params.data()).layers[0]; }
};

inline RoutingContext train_ctx(int samples = 0) {
    RoutingContext ctx;
    ctx.seed = 42;
    ctx.step = 3;
    ctx.first_token = 1000;
    ctx.samples = samples;
    return ctx;
}

inline constexpr RouterType kAllTypes[] = {RouterType::kTopK,    RouterType::kTempSampling, RouterType::kMcDropout,
                                           RouterType::kSwag,    RouterType::kEnsemble,     RouterType::kWeightMfvi,
                                           RouterType::kLogitMf, RouterType::kLogitFc,      RouterType::kVtsr};

}  // namespace bmoe::model
