// router_test_util.h -- a tiny one-layer MoE config per router family, its parameters with every
// router tensor randomised, a routing context and one forward/backward run on any backend: shared
// by router_test and cuda_router_test; and a tiny two-layer model config for the model-level tests.
#pragma once

#include <random>
#include <string>
#include <vector>

#include "model/backend.h"
#include "model/buffer.h"
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

// One forward (and, in training, one backward) of f's router on `backend`, with every host-visible
// result: the same weights, inputs, gate gradients and loss coefficients on any backend. SWAG gets
// three perturbed snapshots first; a selection bias is moved once by a fixed load first.
struct RouterRun {
    RouterOutputs out;
    RouterNoise noise;
    std::vector<float> token_stats, dx, grads;
};
inline RouterRun run_router(Backend* backend, RouterFixture& f, const RoutingContext& ctx) {
    const ModelConfig& cfg = f.config;
    Buffer<float> params(backend, f.params.size()), grads(backend, f.params.size()), x(backend, f.x.size()),
        dx(backend, f.x.size()), dgate(backend, static_cast<size_t>(f.N) * cfg.top_k);
    params.upload(f.params);
    x.upload(f.x);
    std::vector<float> dgate_host(dgate.size());
    for (size_t i = 0; i < dgate_host.size(); ++i) dgate_host[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
    dgate.upload(dgate_host);
    const LayerTensors w = f.layout.views(params.data()).layers[0];
    Router router(cfg, backend, 0);
    if (cfg.router.type == RouterType::kSwag) {
        std::vector<float> snapshot = f.params;
        for (int i = 0; i < 3; ++i) {
            for (size_t j = 0; j < snapshot.size(); ++j) snapshot[j] = f.params[j] * (1.0f + 0.1f * ((i + j) % 3));
            params.upload(snapshot);
            router.end_step(i * cfg.router.swag_every, w);
        }
        params.upload(f.params);
    }
    if (cfg.router.selection_bias_rate > 0.0f) {
        std::vector<int64_t> load(cfg.num_experts);
        for (int e = 0; e < cfg.num_experts; ++e) load[e] = e * 3 % 5;
        router.record_load(load);
        router.end_step(1, w);
    }
    router.forward(x.data(), w, f.N, ctx);
    RouterRun r{router.outputs(), router.noise(), router.token_stats(), {}, {}};
    if (ctx.training) {
        std::vector<float> aux(cfg.num_experts);
        for (int e = 0; e < cfg.num_experts; ++e) aux[e] = 0.05f * e;
        router.backward(dx.data(), f.layout.views(grads.data()).layers[0], dgate.data(), x.data(), w, aux, 0.01f, 0.05f,
                        0.002f);
        r.dx = dx.download();
        r.grads = grads.download();
    }
    return r;
}

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
