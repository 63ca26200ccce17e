#include "eval/stability.h"

#include <cmath>

#include "eval/metrics.h"
#include "parallel/check.h"

namespace bmoe::eval {

std::optional<double> crossing_scale(const std::vector<double>& scales, const std::vector<double>& mean, double level) {
    BMOE_ASSERT(scales.size() == mean.size(), "scales and curve differ in length");
    for (size_t i = 0; i < mean.size(); ++i) {
        if (mean[i] > level) continue;
        if (i == 0) return std::nullopt;  // already at or below the level at the smallest scale
        const double m0 = mean[i - 1], m1 = mean[i];
        const double f = m0 == m1 ? 1.0 : (m0 - level) / (m0 - m1);
        const double l0 = std::log(scales[i - 1]), l1 = std::log(scales[i]);
        return std::exp(l0 + f * (l1 - l0));
    }
    return std::nullopt;
}

StabilityResult routing_stability(EvalModel& em,
                                  const std::vector<std::span<const int32_t>>& rows,
                                  const std::vector<double>& noise_scales,
                                  const model::RoutingContext& routing) {
    model::Model& m = em.model();
    const int L = em.num_moe_layers();
    const int R = static_cast<int>(rows.size());
    BMOE_REQUIRE(R > 0, "routing stability: no sequences to perturb (an empty evaluation set)");
    const int T = static_cast<int>(rows.front().size());
    for (const auto& r : rows) BMOE_ASSERT(static_cast<int>(r.size()) == T, "stability rows differ in length");
    StabilityResult res;
    res.noise_scales = noise_scales;
    res.sequences = R;
    res.tokens = static_cast<int64_t>(R) * T;
    if (L == 0) return res;

    model::RoutingContext ctx = routing;
    ctx.input_noise = 0.0f;
    // Clean selections of this rank's rows, per MoE layer.
    LocalRows local = em.forward(rows, T, 0, ctx);
    std::vector<std::vector<int32_t>> clean(static_cast<size_t>(L));
    // (topk_idx_host: the selections only, not every router output)
    for (int l = 0; l < L; ++l) clean[l] = m.moe_block(l).router().topk_idx_host();
    const int K = m.config().top_k;

    // [pass][layer][row]: the sum over the row's tokens of the Jaccard index against the clean pass.
    const size_t passes = noise_scales.size() + 1;  // pass 0: a second clean pass
    std::vector<double> sums(passes * L * R, 0.0);
    for (size_t p = 0; p < passes; ++p) {
        ctx.input_noise = p == 0 ? 0.0f : static_cast<float>(noise_scales[p - 1]);
        local = em.forward(rows, T, 0, ctx);
        for (int l = 0; l < L; ++l) {
            const std::vector<int32_t>& noisy = m.moe_block(l).router().topk_idx_host();
            for (int b = 0; b < local.count; ++b) {
                const int g = local.first + b;
                if (g >= R) continue;
                double s = 0.0;
                for (int t = 0; t < T; ++t) {
                    const size_t off = (static_cast<size_t>(b) * T + t) * K;
                    s += jaccard(clean[l].data() + off, noisy.data() + off, K);
                }
                sums[(p * L + l) * R + g] = s;
            }
        }
    }
    all_reduce_sum(em.world(), sums);
    const double tokens = static_cast<double>(R) * T;
    auto layer_mean = [&](size_t p, int l) {
        double s = 0.0;
        for (int r = 0; r < R; ++r) s += sums[(p * L + l) * R + r];
        return s / tokens;
    };
    res.per_layer.assign(static_cast<size_t>(L), {});
    double clean_sum = 0.0;
    for (int l = 0; l < L; ++l) clean_sum += layer_mean(0, l);
    res.clean_jaccard = clean_sum / L;
    for (size_t p = 1; p < passes; ++p) {
        double mean = 0.0;
        for (int l = 0; l < L; ++l) {
            const double v = layer_mean(p, l);
            res.per_layer[l].push_back(v);
            mean += v / L;
        }
        res.mean_jaccard.push_back(mean);
    }
    res.scale_at_0p7 = crossing_scale(res.noise_scales, res.mean_jaccard);
    return res;
}

}  // namespace bmoe::eval
