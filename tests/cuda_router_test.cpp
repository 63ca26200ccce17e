// cuda_router_test.cpp -- every router family on the CUDA backend against the CPU backend: the same
// weights, inputs and routing noise (drawn by the same counter-based RNG) give the same samples,
// probabilities, selections, gates and regulariser, and the same gradients (label gpu; skips
// without a device).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "model/buffer.h"
#include "model/cpu_backend.h"
#include "model/cuda/cuda_backend.h"
#include "model/router.h"
#include "tests/router_test_util.h"

namespace bmoe::model {
namespace {

void expect_close(const std::vector<float>& cpu, const std::vector<float>& gpu, const std::string& what) {
    ASSERT_EQ(cpu.size(), gpu.size()) << what;
    double scale = 0.0, worst = 0.0;
    for (float v : cpu) scale = std::max(scale, std::abs(static_cast<double>(v)));
    for (size_t i = 0; i < cpu.size(); ++i) {
        const double err = std::abs(static_cast<double>(cpu[i]) - gpu[i]);
        if (!(err <= worst)) worst = err;  // NaN counts as the worst
    }
    EXPECT_LE(worst, 1e-4 * (scale + 1e-6)) << what << " (max |cpu| " << scale << ")";
}

// One forward + backward of a router on `backend`; the results on the host.
struct RouterRun {
    RouterOutputs out;
    std::vector<float> dx, grads;
};

RouterRun run_router(Backend* backend, RouterFixture& f, const RoutingContext& ctx) {
    const ModelConfig& cfg = f.config;
    Buffer<float> params(backend, f.params.size()), grads(backend, f.params.size()), x(backend, f.x.size()),
        dx(backend, f.x.size()), dgate(backend, static_cast<size_t>(f.N) * cfg.top_k);
    params.upload(f.params);
    x.upload(f.x);
    std::vector<float> dgate_host(static_cast<size_t>(f.N) * cfg.top_k);
    for (size_t i = 0; i < dgate_host.size(); ++i) dgate_host[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
    dgate.upload(dgate_host);
    const LayerTensors w = f.layout.views(params.data()).layers[0];
    Router router(cfg, backend, 0);
    if (cfg.router.type == RouterType::kSwag) {  // SWAG moments from three perturbed snapshots
        std::vector<float> snapshot = f.params;
        for (int i = 0; i < 3; ++i) {
            for (size_t j = 0; j < snapshot.size(); ++j) snapshot[j] = f.params[j] * (1.0f + 0.1f * ((i + j) % 3));
            params.upload(snapshot);
            router.end_step(i * cfg.router.swag_every, w);
        }
        params.upload(f.params);
    }
    router.forward(x.data(), w, f.N, ctx);
    RouterRun r;
    r.out = router.outputs();
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

TEST(CudaRouter, EveryFamilyMatchesTheCpuBackend) {
    if (!cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    auto gpu = make_cuda_backend();
    CpuBackend cpu;
    for (const RouterType type : kAllTypes) {
        const ModelConfig cfg = tiny(type);
        RoutingContext eval_sample = train_ctx(4), eval_mean = train_ctx();
        eval_sample.training = eval_mean.training = false;
        eval_mean.mode = RouterMode::kMean;
        for (const RoutingContext& ctx : {train_ctx(2), eval_sample, eval_mean}) {
            const std::string what = std::string(to_string(type)) + (ctx.training ? " train" : " eval") +
                                     (ctx.mode == RouterMode::kMean ? " mean" : " sample");
            RouterFixture f(cfg, 37, 5);
            const RouterRun c = run_router(&cpu, f, ctx), g = run_router(gpu.get(), f, ctx);
            expect_close(c.out.sample_logits, g.out.sample_logits, what + " sample_logits");
            expect_close(c.out.probs, g.out.probs, what + " probs");
            EXPECT_EQ(c.out.topk_idx, g.out.topk_idx) << what;
            expect_close(c.out.topk_weight, g.out.topk_weight, what + " gates");
            expect_close(c.out.reg, g.out.reg, what + " reg");
            expect_close(c.out.sigma, g.out.sigma, what + " sigma");
            expect_close(c.out.chol, g.out.chol, what + " chol");
            expect_close(c.out.temperature, g.out.temperature, what + " temperature");
            expect_close(c.dx, g.dx, what + " dx");
            expect_close(c.grads, g.grads, what + " router grads");
        }
    }
}

}  // namespace
}  // namespace bmoe::model
