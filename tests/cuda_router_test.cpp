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
            expect_close(c.out.lse, g.out.lse, what + " lse");
            expect_close(c.token_stats, g.token_stats, what + " token statistics");
            expect_close(c.noise.eps, g.noise.eps, what + " eps (drawn on the device)");
            expect_close(c.noise.gumbel, g.noise.gumbel, what + " Gumbel noise (drawn on the device)");
            EXPECT_EQ(c.noise.member, g.noise.member) << what;
            expect_close(c.dx, g.dx, what + " dx");
            expect_close(c.grads, g.grads, what + " router grads");
        }
    }
}

}  // namespace
}  // namespace bmoe::model
