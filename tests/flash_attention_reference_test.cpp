// flash_attention_reference_test.cpp -- the flash attention kernel's algorithm
// (model/cuda/flash_attention.cu) in plain loops on the CPU: the same 64 x 64 tiles and tile
// ranges, the online softmax, the saved log-sum-exp, D = rowsum(dO * O), the dK/dV sums over a kv
// head's query heads, and the kernel's bf16 rounding points (q, k, v, dout on load; P unnormalised
// into P V; P and dS into the backward products). Checked without a GPU:
//   - unrounded, it equals CpuBackend's fp32 attention (the algorithm and its index ranges);
//   - rounded, it stays within half the bound the GPU test (CudaBackend.
//     FlashAttentionMatchesCpuEmulation) allows against CpuBackend's bf16 emulation, so that test
//     fails for kernel bugs, not for the algorithm's own rounding.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "model/cpu_backend.h"
#include "model/precision.h"
#include "tests/test_util.h"

namespace bmoe::model {
namespace {

using bmoe::testing::randn;
using bmoe::testing::Vec;

constexpr int kTile = 64;  // flash_attention.cu's tile

struct Shape {
    int B, T, H, KV, Hd;
};

struct FlashResult {
    Vec out, dq, dk, dv;
};

// The kernel's three passes. bf16: round where the kernel rounds (else exact fp32 inputs).
FlashResult flash_reference(const Shape& s, const Vec& q, const Vec& k, const Vec& v, const Vec& dout, bool bf16) {
    const auto [B, T, H, KV, Hd] = s;
    const int group = H / KV, tiles = (T + kTile - 1) / kTile;
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(Hd)));
    auto r = [&](float x) { return bf16 ? round_to_bf16(x) : x; };
    auto qa = [&](int b, int t, int h) { return &q[((static_cast<size_t>(b) * T + t) * H + h) * Hd]; };
    auto ka = [&](const Vec& x, int b, int t, int g) { return &x[((static_cast<size_t>(b) * T + t) * KV + g) * Hd]; };
    auto dot = [&](const float* a, const float* c) {  // fp32 accumulation of rounded operands
        float acc = 0.0f;
        for (int d = 0; d < Hd; ++d) acc += r(a[d]) * r(c[d]);
        return acc;
    };
    FlashResult res{Vec(q.size()), Vec(q.size()), Vec(k.size()), Vec(v.size())};
    Vec lse(static_cast<size_t>(B) * H * T), D(lse.size());

    // forward: per (query tile, b, h), key tiles 0..i_tile, online softmax
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int it = 0; it < tiles; ++it)
                for (int qi = it * kTile; qi < std::min(T, (it + 1) * kTile); ++qi) {
                    const int g = h / group;
                    float m = -INFINITY, l = 0.0f;
                    std::vector<float> o(Hd, 0.0f);
                    for (int j = 0; j <= it; ++j) {
                        std::vector<float> sc(kTile, -INFINITY);
                        float mx = -INFINITY;
                        for (int c = 0; c < kTile; ++c) {
                            const int kj = j * kTile + c;
                            if (kj > qi || kj >= T) continue;
                            sc[c] = dot(qa(b, qi, h), ka(k, b, kj, g)) * scale;
                            mx = std::max(mx, sc[c]);
                        }
                        const float m_new = std::max(m, mx), alpha = std::exp(m - m_new);
                        float sum = 0.0f;
                        for (float& x : o) x *= alpha;
                        for (int c = 0; c < kTile; ++c) {
                            if (sc[c] == -INFINITY) continue;
                            const float p = std::exp(sc[c] - m_new);
                            sum += p;
                            const float* vr = ka(v, b, j * kTile + c, g);
                            for (int d = 0; d < Hd; ++d) o[d] += r(p) * r(vr[d]);
                        }
                        l = l * alpha + sum;
                        m = m_new;
                    }
                    for (int d = 0; d < Hd; ++d)
                        res.out[((static_cast<size_t>(b) * T + qi) * H + h) * Hd + d] = o[d] / l;
                    lse[(static_cast<size_t>(b) * H + h) * T + qi] = m + std::log(l);
                }
    // D = rowsum(dO * O), dO rounded as the dP products read it
    for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t)
            for (int h = 0; h < H; ++h) {
                float acc = 0.0f;
                for (int d = 0; d < Hd; ++d) {
                    const size_t i = ((static_cast<size_t>(b) * T + t) * H + h) * Hd + d;
                    acc += r(dout[i]) * res.out[i];
                }
                D[(static_cast<size_t>(b) * H + h) * T + t] = acc;
            }
    // P and dS of one (query, key) pair as the backward kernels form them
    auto p_ds = [&](int b, int h, int qi, int kj, float* ds) {
        const int g = h / group;
        const size_t row = (static_cast<size_t>(b) * H + h) * T + qi;
        const float p = std::exp(dot(qa(b, qi, h), ka(k, b, kj, g)) * scale - lse[row]);
        const float dp = dot(&dout[((static_cast<size_t>(b) * T + qi) * H + h) * Hd], ka(v, b, kj, g));
        *ds = p * (dp - D[row]);
        return p;
    };
    // dK, dV: per (key tile, b, kv head), the group's query heads in order, query tiles >= key tile
    for (int b = 0; b < B; ++b)
        for (int g = 0; g < KV; ++g)
            for (int jt = 0; jt < tiles; ++jt)
                for (int kj = jt * kTile; kj < std::min(T, (jt + 1) * kTile); ++kj) {
                    std::vector<float> dkr(Hd, 0.0f), dvr(Hd, 0.0f);
                    for (int hh = 0; hh < group; ++hh)
                        for (int it = jt; it < tiles; ++it)
                            for (int qi = std::max(kj, it * kTile); qi < std::min(T, (it + 1) * kTile); ++qi) {
                                const int h = g * group + hh;
                                float ds = 0.0f;
                                const float p = p_ds(b, h, qi, kj, &ds);
                                const float* dor = &dout[((static_cast<size_t>(b) * T + qi) * H + h) * Hd];
                                for (int d = 0; d < Hd; ++d) {
                                    dvr[d] += r(p) * r(dor[d]);
                                    dkr[d] += r(ds) * r(qa(b, qi, h)[d]);
                                }
                            }
                    for (int d = 0; d < Hd; ++d) {
                        const size_t i = ((static_cast<size_t>(b) * T + kj) * KV + g) * Hd + d;
                        res.dk[i] = dkr[d] * scale;
                        res.dv[i] = dvr[d];
                    }
                }
    // dQ: per (query tile, b, h), key tiles 0..i_tile
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int qi = 0; qi < T; ++qi) {
                std::vector<float> dqr(Hd, 0.0f);
                for (int j = 0; j <= qi / kTile; ++j)
                    for (int kj = j * kTile; kj < std::min({T, (j + 1) * kTile, qi + 1}); ++kj) {
                        float ds = 0.0f;
                        p_ds(b, h, qi, kj, &ds);
                        const float* kr = ka(k, b, kj, h / group);
                        for (int d = 0; d < Hd; ++d) dqr[d] += r(ds) * r(kr[d]);
                    }
                for (int d = 0; d < Hd; ++d)
                    res.dq[((static_cast<size_t>(b) * T + qi) * H + h) * Hd + d] = dqr[d] * scale;
            }
    return res;
}

// max |got - want| / max |want|
double max_rel_error(const Vec& got, const Vec& want) {
    double scale = 0.0, worst = 0.0;
    for (float w : want) scale = std::max(scale, std::abs(static_cast<double>(w)));
    for (size_t i = 0; i < got.size(); ++i) {
        const double err = std::abs(static_cast<double>(got[i]) - want[i]);
        if (!(err <= worst)) worst = err;  // NaN counts as the worst
    }
    return worst / (scale + 1e-6);
}

class FlashReference : public ::testing::TestWithParam<Shape> {};

TEST_P(FlashReference, MatchesCpuAttentionExactlyUnroundedAndWithinTheGpuBoundRounded) {
    const Shape s = GetParam();
    const auto [B, T, H, KV, Hd] = s;
    const size_t nq = static_cast<size_t>(B) * T * H * Hd, nkv = static_cast<size_t>(B) * T * KV * Hd;
    const Vec q = randn(nq, 1), k = randn(nkv, 2), v = randn(nkv, 3), dout = randn(nq, 4);
    for (const MatmulPrecision precision : {MatmulPrecision::kFp32, MatmulPrecision::kBf16}) {
        const bool bf16 = precision == MatmulPrecision::kBf16;
        CpuBackend cpu;
        cpu.set_matmul_precision(precision);
        Vec out(nq), att(cpu.attention_saved_numel(B, T, H, Hd)), dq(nq), dk(nkv), dv(nkv);
        cpu.attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, KV, Hd);
        cpu.attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), out.data(), q.data(), k.data(), v.data(),
                               att.data(), B, T, H, KV, Hd);
        const FlashResult f = flash_reference(s, q, k, v, dout, bf16);
        // Unrounded: float summation order only. Rounded: half the GPU test's 2e-2.
        const double bound = bf16 ? 1e-2 : 1e-4;
        const std::string at = std::string(bf16 ? "bf16" : "fp32") + " B=" + std::to_string(B) +
                               " T=" + std::to_string(T) + " H=" + std::to_string(H) + " KV=" + std::to_string(KV) +
                               " Hd=" + std::to_string(Hd);
        EXPECT_LE(max_rel_error(f.out, out), bound) << "out " << at;
        EXPECT_LE(max_rel_error(f.dq, dq), bound) << "dq " << at;
        EXPECT_LE(max_rel_error(f.dk, dk), bound) << "dk " << at;
        EXPECT_LE(max_rel_error(f.dv, dv), bound) << "dv " << at;
    }
}

// The GPU test's shapes (one tile; MQA with head_dim 128 over two tiles; head_dim 40 over three;
// a GQA group of 4 whose last tile has 2 rows) and the CUDA training test's (GQA, T = 32).
INSTANTIATE_TEST_SUITE_P(Shapes,
                         FlashReference,
                         ::testing::Values(Shape{2, 17, 4, 2, 16},
                                           Shape{1, 70, 2, 1, 128},
                                           Shape{1, 150, 3, 3, 40},
                                           Shape{2, 130, 4, 1, 64},
                                           Shape{4, 32, 4, 2, 16}),
                         [](const ::testing::TestParamInfo<Shape>& info) {
                             const Shape& s = info.param;
                             return "B" + std::to_string(s.B) + "_T" + std::to_string(s.T) + "_H" +
                                    std::to_string(s.H) + "_KV" + std::to_string(s.KV) + "_Hd" + std::to_string(s.Hd);
                         });

}  // namespace
}  // namespace bmoe::model
