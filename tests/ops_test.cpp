// ops_test.cpp -- CpuBackend op checks: forwards against naive double loops, every backward against
// central finite differences of a random linear functional L = <w, out> (computed in double), the
// "+=" vs "=" conventions of backend.h, and thread-count independence.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "model/cpu_backend.h"
#include "model/cpu_threads.h"
#include "model/precision.h"
#include "model/routing_plan.h"
#include "parallel/check.h"
#include "tests/test_util.h"

namespace bmoe::model {
namespace {

using bmoe::testing::IVec;
using bmoe::testing::randn;
using bmoe::testing::Vec;

double dot(const Vec& a, const Vec& b) {
    double s = 0.0;
    for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
    return s;
}

// Central differences of loss() w.r.t. every element of x (x restored afterwards). The denominator
// is the step actually representable in fp32, which keeps the estimate tight.
std::vector<double> numeric_grad(Vec& x, const std::function<double()>& loss, float eps = 1e-2f) {
    std::vector<double> g(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
        const float x0 = x[i], xp = x0 + eps, xm = x0 - eps;
        x[i] = xp;
        const double lp = loss();
        x[i] = xm;
        const double lm = loss();
        x[i] = x0;
        g[i] = (lp - lm) / (static_cast<double>(xp) - xm);
    }
    return g;
}

// max |numeric - analytic| <= tol * max |numeric|  (max-norm relative error)
void expect_grad(const std::vector<double>& num, const Vec& an, double tol, const std::string& what) {
    ASSERT_EQ(num.size(), an.size()) << what;
    double scale = 1e-6, worst = 0.0;
    size_t wi = 0;
    for (size_t i = 0; i < num.size(); ++i) scale = std::max(scale, std::abs(num[i]));
    for (size_t i = 0; i < num.size(); ++i) {
        const double err = std::abs(num[i] - an[i]);
        if (err > worst) worst = err, wi = i;
    }
    EXPECT_LE(worst, tol * scale) << what << ": worst element " << wi << " numeric " << num[wi] << " analytic "
                                  << an[wi] << " (scale " << scale << ")";
}

void check_grad(Vec& x,
                const Vec& an,
                const std::function<double()>& loss,
                const std::string& what,
                double tol = 1e-3,
                float eps = 1e-2f) {
    expect_grad(numeric_grad(x, loss, eps), an, tol, what);
}

void expect_near_vec(const Vec& got, const std::vector<double>& want, double tol, const std::string& what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_NEAR(got[i], want[i], tol * (1.0 + std::abs(want[i]))) << what << " at " << i;
    }
}

// ---- memory, elementwise ----------------------------------------------------------------------

TEST(CpuOps, AllocIsZeroedAlignedAndReportsFailure) {
    CpuBackend be;
    for (size_t bytes : {size_t{1}, size_t{100}, size_t{4096}}) {
        auto* p = static_cast<unsigned char*>(be.alloc(bytes));
        EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u);
        for (size_t i = 0; i < bytes; ++i) ASSERT_EQ(p[i], 0);
        EXPECT_EQ(be.allocated_bytes(), (bytes + 63) / 64 * 64) << "accounted in 64-byte blocks";
        be.free(p);
        EXPECT_EQ(be.allocated_bytes(), 0u);
    }
    void* a = be.alloc(640);
    void* b = be.alloc(6400);
    be.free(a);
    EXPECT_EQ(be.allocated_bytes(), 6400u);
    EXPECT_EQ(be.peak_allocated_bytes(), 7040u);
    be.free(b);
    be.free(nullptr);  // unknown pointers change nothing
    EXPECT_EQ(be.allocated_bytes(), 0u);
    const size_t huge = size_t{1} << 62;
    try {
        be.alloc(huge);
        FAIL() << "alloc of 2^62 bytes succeeded";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(std::to_string(huge)), std::string::npos) << e.what();
    }
}

TEST(CpuOps, ElementwiseAndSumSquares) {
    CpuBackend be;
    const size_t n = 100003;  // several sum_squares chunks plus a ragged tail
    Vec a = randn(n, 1), b = randn(n, 2), out(n);
    be.add(out.data(), a.data(), b.data(), n);
    for (size_t i = 0; i < n; i += 997) ASSERT_EQ(out[i], a[i] + b[i]);
    be.accumulate(out.data(), a.data(), n);
    be.scale(out.data(), 0.5f, n);
    for (size_t i = 0; i < n; i += 997) ASSERT_EQ(out[i], (a[i] + b[i] + a[i]) * 0.5f);
    const Vec b0 = b;
    Vec prod(n);
    be.mul(prod.data(), a.data(), b.data(), n);
    be.mul(b.data(), b.data(), b.data(), n);  // out aliases both inputs
    for (size_t i = 0; i < n; i += 997) {
        ASSERT_EQ(prod[i], a[i] * b0[i]);
        ASSERT_EQ(b[i], b0[i] * b0[i]);
    }
    double want = 0.0;
    for (float x : a) want += static_cast<double>(x) * x;
    EXPECT_NEAR(be.sum_squares(a.data(), n), want, 1e-12 * want);
    EXPECT_EQ(be.sum_squares(a.data(), 0), 0.0);
    a[n - 1] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_TRUE(std::isnan(be.sum_squares(a.data(), n)));
    a[n - 1] = std::numeric_limits<float>::infinity();
    EXPECT_TRUE(std::isinf(be.sum_squares(a.data(), n)));
}

// mc_dropout's mask: the counter-based formula of model/rng.h at counter0 + n * row_stride + d,
// 0 with probability p (binomial 5-sigma band) and 1/(1-p) otherwise.
TEST(CpuOps, DropoutMaskIsTheCounterRngFormula) {
    CpuBackend be;
    constexpr int N = 300, D = 64;
    constexpr float p = 0.25f, keep = 1.0f / (1.0f - p);
    const bmoe::model::CounterRng rng(7, 11);
    const uint64_t counter0 = 12345, stride = 3 * D;
    Vec mask(static_cast<size_t>(N) * D, -1.0f);
    be.dropout_mask(mask.data(), N, D, {rng, counter0, stride, p, keep});
    int dropped = 0;
    for (int n = 0; n < N; ++n)
        for (int d = 0; d < D; ++d) {
            const float m = mask[static_cast<size_t>(n) * D + d];
            ASSERT_EQ(m, rng.uniform(counter0 + n * stride + d) < p ? 0.0f : keep) << n << " " << d;
            dropped += m == 0.0f;
        }
    const double mean = p * N * D, sd = std::sqrt(mean * (1 - p));
    EXPECT_NEAR(dropped, mean, 5 * sd);
}

// Every one of the 2^24 values uniform() can take is strictly inside (0, 1) and never decreasing
// (above 2^23, v + 0.5 rounds to even, so pairs share a value): a Gumbel draw -log(-log(u)) is
// finite for all of them (the top value once rounded to exactly 1).
TEST(CounterRngTest, UniformIsStrictlyInsideZeroOneForEveryValue) {
    using bmoe::model::CounterRng;
    float previous = 0.0f;
    for (uint64_t v = 0; v < (uint64_t{1} << 24); ++v) {
        const float u = CounterRng::unit_interval(v);
        ASSERT_GT(u, 0.0f) << v;
        ASSERT_GE(u, previous) << v;
        ASSERT_LT(u, 1.0f) << v;
        ASSERT_TRUE(std::isfinite(-std::log(-std::log(u)))) << v;
        previous = u;
    }
}

// Stability evaluation's input noise: x + scale * RMS(x_n) * N(0, 1), the normal drawn at counter
// counter0 + n D + d; in place too.
TEST(CpuOps, AddInputNoiseScalesCounterNoiseByTheRowRms) {
    CpuBackend be;
    constexpr int N = 37, D = 24;
    const bmoe::model::CounterRng rng(9, 4);
    const uint64_t counter0 = 5000;
    const Vec x = randn(static_cast<size_t>(N) * D, 8);
    Vec out(x.size()), in_place = x;
    be.add_input_noise(out.data(), x.data(), N, D, rng, counter0, 0.3f);
    be.add_input_noise(in_place.data(), in_place.data(), N, D, rng, counter0, 0.3f);
    EXPECT_EQ(out, in_place);
    for (int n = 0; n < N; ++n) {
        double ms = 0.0;
        for (int d = 0; d < D; ++d) ms += static_cast<double>(x[n * D + d]) * x[n * D + d] / D;
        for (int d = 0; d < D; ++d) {
            const double want = x[n * D + d] + 0.3 * std::sqrt(ms) * rng.normal(counter0 + n * D + d);
            ASSERT_NEAR(out[n * D + d], want, 1e-5 * (1.0 + std::abs(want))) << n << " " << d;
        }
    }
}

// ---- GEMMs ------------------------------------------------------------------------------------

std::vector<double> naive_matmul(const Vec& in, const float* w, const float* bias, int N, int I, int O) {
    std::vector<double> out(static_cast<size_t>(N) * O);
    for (int n = 0; n < N; ++n)
        for (int o = 0; o < O; ++o) {
            double s = bias ? bias[o] : 0.0;
            for (int i = 0; i < I; ++i) s += static_cast<double>(in[n * I + i]) * w[o * I + i];
            out[n * O + o] = s;
        }
    return out;
}

TEST(CpuOps, MatmulForwardMatchesNaive) {
    CpuBackend be;
    const int N = 7, I = 13, O = 5;
    Vec in = randn(N * I, 1), w = randn(O * I, 2), bias = randn(O, 3), out(N * O, 42.0f);
    be.matmul_forward(out.data(), in.data(), w.data(), bias.data(), N, I, O);
    expect_near_vec(out, naive_matmul(in, w.data(), bias.data(), N, I, O), 1e-5, "with bias");
    be.matmul_forward(out.data(), in.data(), w.data(), nullptr, N, I, O);
    expect_near_vec(out, naive_matmul(in, w.data(), nullptr, N, I, O), 1e-5, "no bias");
}

TEST(CpuOps, MatmulBackwardGradAndAccumulation) {
    CpuBackend be;
    const int N = 5, I = 6, O = 4;
    Vec in = randn(N * I, 1), w = randn(O * I, 2), bias = randn(O, 3), wout = randn(N * O, 4), out(N * O);
    auto loss = [&] {
        be.matmul_forward(out.data(), in.data(), w.data(), bias.data(), N, I, O);
        return dot(out, wout);
    };
    Vec din(N * I, 7.0f), dw(O * I), db(O);
    be.matmul_backward(din.data(), dw.data(), db.data(), wout.data(), in.data(), w.data(), N, I, O, false);
    check_grad(in, din, loss, "din");
    check_grad(w, dw, loss, "dw");
    check_grad(bias, db, loss, "dbias");
    // Second call: dw, dbias accumulate; din accumulates only when asked; null din is skipped.
    be.matmul_backward(din.data(), dw.data(), db.data(), wout.data(), in.data(), w.data(), N, I, O, true);
    be.matmul_backward(nullptr, dw.data(), db.data(), wout.data(), in.data(), w.data(), N, I, O, false);
    Vec din1(N * I), dw1(O * I), db1(O);
    be.matmul_backward(din1.data(), dw1.data(), db1.data(), wout.data(), in.data(), w.data(), N, I, O, false);
    for (int i = 0; i < N * I; ++i) EXPECT_FLOAT_EQ(din[i], 2 * din1[i]);
    for (int i = 0; i < O * I; ++i) EXPECT_FLOAT_EQ(dw[i], 3 * dw1[i]);
    for (int i = 0; i < O; ++i) EXPECT_FLOAT_EQ(db[i], 3 * db1[i]);
}

TEST(CpuOps, GroupedMatmulMatchesPerGroupIncludingEmptyGroups) {
    CpuBackend be;
    const int G = 5, I = 6, O = 4;
    const int offsets[G + 1] = {0, 0, 3, 3, 8, 8};  // groups 0, 2 and 4 are empty
    const int R = offsets[G];
    Vec in = randn(R * I, 1), w = randn(G * O * I, 2), out(R * O);
    be.grouped_matmul_forward(out.data(), in.data(), w.data(), offsets, G, I, O);
    for (int g = 0; g < G; ++g) {
        const int rows = offsets[g + 1] - offsets[g];
        Vec in_g(in.begin() + offsets[g] * I, in.begin() + offsets[g + 1] * I);
        Vec out_g(out.begin() + offsets[g] * O, out.begin() + offsets[g + 1] * O);
        expect_near_vec(out_g, naive_matmul(in_g, &w[g * O * I], nullptr, rows, I, O), 1e-5, "group");
    }
    Vec wout = randn(R * O, 3), din(R * I, 5.0f), dw(G * O * I);
    auto loss = [&] {
        be.grouped_matmul_forward(out.data(), in.data(), w.data(), offsets, G, I, O);
        return dot(out, wout);
    };
    be.grouped_matmul_backward(din.data(), dw.data(), wout.data(), in.data(), w.data(), offsets, G, I, O);
    check_grad(in, din, loss, "grouped din");
    check_grad(w, dw, loss, "grouped dw");
    for (int g : {0, 2, 4})
        for (int i = 0; i < O * I; ++i) ASSERT_EQ(dw[g * O * I + i], 0.0f) << "empty group " << g;
    Vec dw2 = dw, din2(R * I);
    be.grouped_matmul_backward(din2.data(), dw2.data(), wout.data(), in.data(), w.data(), offsets, G, I, O);
    for (size_t i = 0; i < dw.size(); ++i) EXPECT_FLOAT_EQ(dw2[i], 2 * dw[i]);
    EXPECT_EQ(din2, din);  // din is overwritten, not accumulated
}

// ---- bf16 matmul precision ----------------------------------------------------------------------

TEST(Bf16, RoundToNearestEvenSpecialValues) {
    EXPECT_EQ(round_to_bf16(1.0f), 1.0f);
    EXPECT_EQ(round_to_bf16(-2.5f), -2.5f);                                // exactly representable
    EXPECT_EQ(round_to_bf16(1.0f + 1.0f / 256.0f), 1.0f);                  // tie -> even (1.0)
    EXPECT_EQ(round_to_bf16(1.0f + 3.0f / 256.0f), 1.0f + 4.0f / 256.0f);  // tie -> even (odd below)
    EXPECT_EQ(round_to_bf16(1.0f + 1.5f / 256.0f), 1.0f + 2.0f / 256.0f);  // nearest
    EXPECT_EQ(round_to_bf16(1.0f + 0.75f / 256.0f), 1.0f);                 // nearest
    EXPECT_EQ(round_to_bf16(std::numeric_limits<float>::max()), std::numeric_limits<float>::infinity());
    EXPECT_EQ(round_to_bf16(-std::numeric_limits<float>::infinity()), -std::numeric_limits<float>::infinity());
    EXPECT_TRUE(std::isnan(round_to_bf16(std::numeric_limits<float>::quiet_NaN())));
    EXPECT_EQ(round_to_bf16(0.0f), 0.0f);
    EXPECT_EQ(parse_matmul_precision("bf16"), MatmulPrecision::kBf16);
    EXPECT_THROW(parse_matmul_precision("fp8"), Error);
}

Vec rounded(const Vec& x) {
    Vec y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = round_to_bf16(x[i]);
    return y;
}

// bf16 precision = GEMMs of bf16-rounded inputs accumulated in (at least) fp32: the result equals a
// double-precision product of the rounded inputs, and differs from the fp32 product by bf16's
// relative precision (2^-8), so the rounding demonstrably happened.
TEST(Bf16, MatmulsRoundInputsAndAccumulateInFp32) {
    CpuBackend be;
    const int N = 9, I = 40, O = 7;
    Vec in = randn(N * I, 1), w = randn(O * I, 2), bias = randn(O, 3), dout = randn(N * O, 4);
    Vec out32(N * O), out16(N * O);
    be.matmul_forward(out32.data(), in.data(), w.data(), bias.data(), N, I, O);
    {
        const ScopedMatmulPrecision bf16(&be, MatmulPrecision::kBf16);
        be.matmul_forward(out16.data(), in.data(), w.data(), bias.data(), N, I, O);
    }
    EXPECT_EQ(be.matmul_precision(), MatmulPrecision::kFp32) << "scope restores the precision";
    const Vec in_r = rounded(in), w_r = rounded(w), dout_r = rounded(dout);
    expect_near_vec(out16, naive_matmul(in_r, w_r.data(), bias.data(), N, I, O), 1e-5, "bf16 forward");
    double diff = 0.0;
    for (int i = 0; i < N * O; ++i) diff = std::max(diff, static_cast<double>(std::abs(out16[i] - out32[i])));
    EXPECT_GT(diff, 1e-3) << "bf16 forward must differ from fp32";
    EXPECT_LT(diff, 0.1);

    // backward: din = dout_r w_r, dw += dout_r^T in_r, dbias += sum of the unrounded dout
    Vec din(N * I), dw(O * I), db(O);
    be.set_matmul_precision(MatmulPrecision::kBf16);
    be.matmul_backward(din.data(), dw.data(), db.data(), dout.data(), in.data(), w.data(), N, I, O, false);
    be.set_matmul_precision(MatmulPrecision::kFp32);
    std::vector<double> want_din(N * I, 0.0), want_dw(O * I, 0.0), want_db(O, 0.0);
    for (int n = 0; n < N; ++n)
        for (int o = 0; o < O; ++o) {
            want_db[o] += dout[n * O + o];
            for (int i = 0; i < I; ++i) {
                want_din[n * I + i] += static_cast<double>(dout_r[n * O + o]) * w_r[o * I + i];
                want_dw[o * I + i] += static_cast<double>(dout_r[n * O + o]) * in_r[n * I + i];
            }
        }
    expect_near_vec(din, want_din, 1e-5, "bf16 din");
    expect_near_vec(dw, want_dw, 1e-5, "bf16 dw");
    expect_near_vec(db, want_db, 1e-5, "bias grad from unrounded dout");

    // grouped: the same per group
    const int G = 3, offsets[G + 1] = {0, 4, 4, 9};
    Vec wg = randn(G * O * I, 5), outg(N * O);
    be.set_matmul_precision(MatmulPrecision::kBf16);
    be.grouped_matmul_forward(outg.data(), in.data(), wg.data(), offsets, G, I, O);
    Vec ding(N * I), dwg(G * O * I);
    be.grouped_matmul_backward(ding.data(), dwg.data(), dout.data(), in.data(), wg.data(), offsets, G, I, O);
    be.set_matmul_precision(MatmulPrecision::kFp32);
    const Vec wg_r = rounded(wg);
    for (int g = 0; g < G; ++g) {
        const int r0 = offsets[g], rows = offsets[g + 1] - r0;
        const Vec in_g(in_r.begin() + r0 * I, in_r.begin() + (r0 + rows) * I);
        const Vec out_g(outg.begin() + r0 * O, outg.begin() + (r0 + rows) * O);
        expect_near_vec(out_g, naive_matmul(in_g, &wg_r[g * O * I], nullptr, rows, I, O), 1e-5, "bf16 grouped");
        for (int o = 0; o < O; ++o)
            for (int i = 0; i < I; ++i) {
                double s = 0.0;
                for (int r = r0; r < r0 + rows; ++r) s += static_cast<double>(dout_r[r * O + o]) * in_r[r * I + i];
                EXPECT_NEAR(dwg[(g * O + o) * I + i], s, 1e-4) << "bf16 grouped dw";
            }
    }
}

// bf16 activation storage: the activation written as bf16 is the fp32 activation rounded, and the
// grouped GEMMs reading a bf16 operand give bitwise what they give on the fp32 tensor (which they
// round to the same bf16 values); without bf16 matmul precision they refuse.
// The expert MLP's bf16 ops are the fp32 ops on the widened bf16 inputs, their results rounded once:
// the activations forward and backward, and the grouped GEMMs with each operand and result bf16 or fp32.
TEST(Bf16, MlpTensorOpsAreTheFp32OpsOnBf16Values) {
    CpuBackend be;
    const size_t n = 1001;
    auto bf16_of = [](const Vec& x) {
        std::vector<uint16_t> b(x.size());
        for (size_t i = 0; i < x.size(); ++i) b[i] = bf16_bits(x[i]);
        return b;
    };
    auto widened = [](const std::vector<uint16_t>& b) {
        Vec x(b.size());
        for (size_t i = 0; i < b.size(); ++i) x[i] = bf16_to_float(b[i]);
        return x;
    };
    auto expect_rounded = [&](const std::vector<uint16_t>& got, const Vec& want, const char* what) {
        ASSERT_EQ(got.size(), want.size()) << what;
        for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], bf16_bits(want[i])) << what << " " << i;
    };
    const std::vector<uint16_t> gate16 = bf16_of(randn(n, 1, 3.0f)), up16 = bf16_of(randn(n, 2)),
                                dout16 = bf16_of(randn(n, 7));
    const Vec gate = widened(gate16), up = widened(up16), dout_act = widened(dout16);
    Vec act(n), dgate(n), dup(n);
    std::vector<uint16_t> act16(n), dgate16(n), dup16(n);
    be.gelu_forward(act.data(), gate.data(), n);
    be.gelu_forward_bf16(act16.data(), gate16.data(), n);
    expect_rounded(act16, act, "gelu");
    be.swiglu_forward(act.data(), gate.data(), up.data(), n);
    be.swiglu_forward_bf16(act16.data(), gate16.data(), up16.data(), n);
    expect_rounded(act16, act, "swiglu");
    be.gelu_backward(dgate.data(), dout_act.data(), gate.data(), n);
    be.gelu_backward_bf16(dgate16.data(), dout16.data(), gate16.data(), n);
    expect_rounded(dgate16, dgate, "gelu backward");
    be.swiglu_backward(dgate.data(), dup.data(), dout_act.data(), gate.data(), up.data(), n);
    be.swiglu_backward_bf16(dgate16.data(), dup16.data(), dout16.data(), gate16.data(), up16.data(), n);
    expect_rounded(dgate16, dgate, "swiglu backward dgate");
    expect_rounded(dup16, dup, "swiglu backward dup");

    const int G = 3, I = 40, O = 7, offsets[G + 1] = {0, 4, 4, 9}, R = offsets[G];
    const std::vector<uint16_t> in16 = bf16_of(randn(R * I, 3)), dout16_RO = bf16_of(randn(R * O, 5));
    const Vec in = widened(in16), dout = widened(dout16_RO), w = randn(G * O * I, 4), dw0 = randn(G * O * I, 6);
    Vec out(R * O), din(R * I), dw = dw0;
    be.set_matmul_precision(MatmulPrecision::kBf16);
    be.grouped_matmul_forward(out.data(), in.data(), w.data(), offsets, G, I, O);
    be.grouped_matmul_backward(din.data(), dw.data(), dout.data(), in.data(), w.data(), offsets, G, I, O);
    EXPECT_NE(dw, dw0);
    for (const bool in_bf16 : {false, true}) {
        Vec out32(R * O);
        std::vector<uint16_t> out16(R * O);
        be.grouped_matmul_forward_bf16(out32.data(), nullptr, in_bf16 ? nullptr : in.data(),
                                       in_bf16 ? in16.data() : nullptr, w.data(), offsets, G, I, O);
        EXPECT_EQ(out32, out) << "bf16 in " << in_bf16;
        be.grouped_matmul_forward_bf16(nullptr, out16.data(), in_bf16 ? nullptr : in.data(),
                                       in_bf16 ? in16.data() : nullptr, w.data(), offsets, G, I, O);
        expect_rounded(out16, out, "bf16 out");
    }
    for (const bool dout_bf16 : {false, true})
        for (const bool in_bf16 : {false, true})
            for (const bool din_bf16 : {false, true}) {
                Vec din32(R * I), dw16 = dw0;  // accumulated onto the same dw0
                std::vector<uint16_t> din16(R * I);
                be.grouped_matmul_backward_bf16(din_bf16 ? nullptr : din32.data(), din_bf16 ? din16.data() : nullptr,
                                                dw16.data(), dout_bf16 ? nullptr : dout.data(),
                                                dout_bf16 ? dout16_RO.data() : nullptr, in_bf16 ? nullptr : in.data(),
                                                in_bf16 ? in16.data() : nullptr, w.data(), offsets, G, I, O);
                if (din_bf16)
                    expect_rounded(din16, din, "bf16 din");
                else
                    EXPECT_EQ(din32, din) << "bf16 dout " << dout_bf16 << ", bf16 in " << in_bf16;
                EXPECT_EQ(dw16, dw) << "bf16 dout " << dout_bf16 << ", bf16 in " << in_bf16 << ", bf16 din "
                                    << din_bf16;
            }
    Vec din32(R * I), dw16 = dw0;
    std::vector<uint16_t> din16(R * I), out16(R * O);
    EXPECT_THROW(be.grouped_matmul_backward_bf16(din32.data(), nullptr, dw16.data(), dout.data(), dout16_RO.data(),
                                                 in.data(), nullptr, w.data(), offsets, G, I, O),
                 bmoe::Error)
        << "both douts";
    EXPECT_THROW(be.grouped_matmul_backward_bf16(din32.data(), nullptr, dw16.data(), dout.data(), nullptr, nullptr,
                                                 nullptr, w.data(), offsets, G, I, O),
                 bmoe::Error)
        << "no in with dw";
    EXPECT_THROW(be.grouped_matmul_backward_bf16(din32.data(), din16.data(), dw16.data(), dout.data(), nullptr,
                                                 in.data(), nullptr, w.data(), offsets, G, I, O),
                 bmoe::Error)
        << "both dins";
    EXPECT_THROW(
        be.grouped_matmul_forward_bf16(out.data(), out16.data(), in.data(), nullptr, w.data(), offsets, G, I, O),
        bmoe::Error)
        << "both outs";
    be.set_matmul_precision(MatmulPrecision::kFp32);
    EXPECT_THROW(be.grouped_matmul_forward_bf16(out.data(), nullptr, nullptr, in16.data(), w.data(), offsets, G, I, O),
                 bmoe::Error);
}

// ---- embeddings -------------------------------------------------------------------------------

TEST(CpuOps, EmbeddingAndPosition) {
    CpuBackend be;
    const int V = 5, D = 70, B = 2, T = 3, N = B * T;
    IVec tokens = {3, 1, 3, 0, 3, 4};
    Vec table = randn(V * D, 1), out(N * D);
    be.embedding_forward(out.data(), tokens.data(), table.data(), N, D);
    for (int n = 0; n < N; ++n)
        for (int d = 0; d < D; ++d) ASSERT_EQ(out[n * D + d], table[tokens[n] * D + d]);
    Vec dout = randn(N * D, 2), dtable(V * D, 1.0f);
    be.embedding_backward(dtable.data(), dout.data(), tokens.data(), N, D);
    for (int v = 0; v < V; ++v)
        for (int d = 0; d < D; ++d) {
            float want = 1.0f;
            for (int n = 0; n < N; ++n)
                if (tokens[n] == v) want += dout[n * D + d];
            ASSERT_FLOAT_EQ(dtable[v * D + d], want);
        }
    const int S = 4;  // table longer than T
    Vec wpe = randn(S * D, 3), x = out;
    be.position_forward(x.data(), wpe.data(), B, T, D);
    for (int n = 0; n < N; ++n)
        for (int d = 0; d < D; ++d) ASSERT_EQ(x[n * D + d], out[n * D + d] + wpe[(n % T) * D + d]);
    Vec dwpe(S * D, 2.0f);
    be.position_backward(dwpe.data(), dout.data(), B, T, D);
    for (int t = 0; t < S; ++t)
        for (int d = 0; d < D; ++d) {
            const float want = t < T ? 2.0f + dout[t * D + d] + dout[(T + t) * D + d] : 2.0f;
            ASSERT_FLOAT_EQ(dwpe[t * D + d], want);
        }
}

// ---- norms ------------------------------------------------------------------------------------

TEST(CpuOps, RmsnormGradAndAccumulation) {
    CpuBackend be;
    const int N = 4, D = 9;
    const float eps = 1e-5f;
    Vec in = randn(N * D, 1), w = randn(D, 2), wout = randn(N * D, 3), out(N * D), rstd(N);
    auto loss = [&] {
        be.rmsnorm_forward(out.data(), rstd.data(), in.data(), w.data(), N, D, eps);
        return dot(out, wout);
    };
    loss();
    for (int n = 0; n < N; ++n) {
        double ss = 0.0;
        for (int d = 0; d < D; ++d) ss += static_cast<double>(in[n * D + d]) * in[n * D + d];
        const double r = 1.0 / std::sqrt(ss / D + eps);
        EXPECT_NEAR(rstd[n], r, 1e-5 * r);
        for (int d = 0; d < D; ++d) EXPECT_NEAR(out[n * D + d], in[n * D + d] * r * w[d], 1e-5);
    }
    const Vec base = randn(N * D, 4);  // din accumulates onto existing residual-stream gradient
    Vec din = base, dw(D, 0.0f);
    be.rmsnorm_backward(din.data(), dw.data(), wout.data(), in.data(), w.data(), rstd.data(), N, D);
    Vec din_only(N * D);
    for (int i = 0; i < N * D; ++i) din_only[i] = din[i] - base[i];
    check_grad(in, din_only, loss, "rmsnorm din", 1e-3, 1e-3f);
    check_grad(w, dw, loss, "rmsnorm dw");
    Vec dw2 = dw;
    be.rmsnorm_backward(din.data(), dw2.data(), wout.data(), in.data(), w.data(), rstd.data(), N, D);
    for (int d = 0; d < D; ++d) EXPECT_FLOAT_EQ(dw2[d], 2 * dw[d]);
}

TEST(CpuOps, LayernormGradAndAccumulation) {
    CpuBackend be;
    const int N = 4, D = 9;
    Vec in = randn(N * D, 1), w = randn(D, 2), b = randn(D, 3), wout = randn(N * D, 4);
    Vec out(N * D), mean(N), rstd(N);
    auto loss = [&] {
        be.layernorm_forward(out.data(), mean.data(), rstd.data(), in.data(), w.data(), b.data(), N, D, 1e-5f);
        return dot(out, wout);
    };
    loss();
    const Vec base = randn(N * D, 5);
    Vec din = base, dw(D), db(D);
    be.layernorm_backward(din.data(), dw.data(), db.data(), wout.data(), in.data(), w.data(), mean.data(), rstd.data(),
                          N, D);
    Vec din_only(N * D);
    for (int i = 0; i < N * D; ++i) din_only[i] = din[i] - base[i];
    check_grad(in, din_only, loss, "layernorm din", 1e-3, 1e-3f);
    check_grad(w, dw, loss, "layernorm dw");
    check_grad(b, db, loss, "layernorm db");
    Vec dw2 = dw, db2 = db;
    be.layernorm_backward(din.data(), dw2.data(), db2.data(), wout.data(), in.data(), w.data(), mean.data(),
                          rstd.data(), N, D);
    for (int d = 0; d < D; ++d) EXPECT_FLOAT_EQ(dw2[d], 2 * dw[d]);
    for (int d = 0; d < D; ++d) EXPECT_FLOAT_EQ(db2[d], 2 * db[d]);
}

// ---- rope -------------------------------------------------------------------------------------

TEST(CpuOps, RopeMatchesRotateHalfAndBackwardIsTranspose) {
    CpuBackend be;
    const int B = 2, T = 5, nh = 3, Hd = 8;
    const float theta = 10000.0f;
    const Vec x0 = randn(B * T * nh * Hd, 1);
    Vec x = x0;
    be.rope_forward(x.data(), B, T, nh, Hd, theta);
    for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t)
            for (int h = 0; h < nh; ++h) {
                const int base = ((b * T + t) * nh + h) * Hd;
                for (int i = 0; i < Hd / 2; ++i) {
                    const double ang = t * std::pow(10000.0, -2.0 * i / Hd);
                    const double a = x0[base + i], c = x0[base + i + Hd / 2];
                    EXPECT_NEAR(x[base + i], a * std::cos(ang) - c * std::sin(ang), 1e-5);
                    EXPECT_NEAR(x[base + i + Hd / 2], c * std::cos(ang) + a * std::sin(ang), 1e-5);
                }
            }
    Vec xin = x0, wout = randn(x0.size(), 2);
    auto loss = [&] {
        Vec y = xin;
        be.rope_forward(y.data(), B, T, nh, Hd, theta);
        return dot(y, wout);
    };
    Vec dx = wout;
    be.rope_backward(dx.data(), B, T, nh, Hd, theta);
    check_grad(xin, dx, loss, "rope dx");
    Vec back = x;  // the inverse rotation undoes the forward
    be.rope_backward(back.data(), B, T, nh, Hd, theta);
    for (size_t i = 0; i < x0.size(); ++i) EXPECT_NEAR(back[i], x0[i], 1e-5);
}

// ---- attention --------------------------------------------------------------------------------

struct AttnShape {
    int B, T, H, KV, Hd;
    size_t nq() const { return static_cast<size_t>(B) * T * H * Hd; }
    size_t nkv() const { return static_cast<size_t>(B) * T * KV * Hd; }
    size_t natt() const { return static_cast<size_t>(B) * H * T * T; }
};

// round_p: P's entries rounded to bf16 before P V (the bf16 emulation's rounding point).
std::vector<double> naive_attention(
    const AttnShape& s, const Vec& q, const Vec& k, const Vec& v, bool round_p = false) {
    std::vector<double> out(s.nq());
    for (int b = 0; b < s.B; ++b)
        for (int h = 0; h < s.H; ++h) {
            const int kvh = h / (s.H / s.KV);
            for (int i = 0; i < s.T; ++i) {
                std::vector<double> p(i + 1);
                double mx = -1e300, sum = 0.0;
                for (int j = 0; j <= i; ++j) {
                    double d = 0.0;
                    for (int e = 0; e < s.Hd; ++e)
                        d += static_cast<double>(q[((b * s.T + i) * s.H + h) * s.Hd + e]) *
                             k[((b * s.T + j) * s.KV + kvh) * s.Hd + e];
                    p[j] = d / std::sqrt(static_cast<double>(s.Hd));
                    mx = std::max(mx, p[j]);
                }
                for (double& x : p) sum += (x = std::exp(x - mx));
                for (int e = 0; e < s.Hd; ++e) {
                    double o = 0.0;
                    for (int j = 0; j <= i; ++j) {
                        const double pj =
                            round_p ? bmoe::model::round_to_bf16(static_cast<float>(p[j] / sum)) : p[j] / sum;
                        o += pj * v[((b * s.T + j) * s.KV + kvh) * s.Hd + e];
                    }
                    out[((b * s.T + i) * s.H + h) * s.Hd + e] = o;
                }
            }
        }
    return out;
}

class AttentionForward : public ::testing::TestWithParam<AttnShape> {};

TEST_P(AttentionForward, MatchesNaiveGqaAndCausal) {
    const AttnShape s = GetParam();
    CpuBackend be;
    Vec q = randn(s.nq(), 1), k = randn(s.nkv(), 2), v = randn(s.nkv(), 3), out(s.nq()), att(s.natt(), 9.0f);
    be.attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), s.B, s.T, s.H, s.KV, s.Hd);
    expect_near_vec(out, naive_attention(s, q, k, v), 1e-5, "attention out");
    for (size_t row = 0; row < static_cast<size_t>(s.B) * s.H * s.T; ++row) {
        const int i = static_cast<int>(row % s.T);
        double sum = 0.0;
        for (int j = 0; j < s.T; ++j) {
            if (j > i) {
                ASSERT_EQ(att[row * s.T + j], 0.0f) << "above diagonal";
            }
            sum += att[row * s.T + j];
        }
        ASSERT_NEAR(sum, 1.0, 1e-5);
    }
    // Causality: changing the last position's k/v leaves every earlier output bit-identical.
    Vec k2 = k, v2 = v, out2(s.nq());
    for (int b = 0; b < s.B; ++b)
        for (int e = 0; e < s.KV * s.Hd; ++e) {
            k2[((b * s.T + s.T - 1) * s.KV) * s.Hd + e] += 3.0f;
            v2[((b * s.T + s.T - 1) * s.KV) * s.Hd + e] -= 2.0f;
        }
    be.attention_forward(out2.data(), att.data(), q.data(), k2.data(), v2.data(), s.B, s.T, s.H, s.KV, s.Hd);
    for (int b = 0; b < s.B; ++b)
        for (int t = 0; t < s.T - 1; ++t)
            for (int e = 0; e < s.H * s.Hd; ++e) {
                const size_t i = (static_cast<size_t>(b) * s.T + t) * s.H * s.Hd + e;
                ASSERT_EQ(out2[i], out[i]);
            }
}

// bf16 matmul precision rounds q, k, P and v (the CUDA backend's tensor-core operands): the
// output matches a float64 reference with the same roundings, far nearer than the fp32 result.
TEST_P(AttentionForward, Bf16RoundsTheGemmOperands) {
    const AttnShape s = GetParam();
    CpuBackend be;
    Vec q = randn(s.nq(), 1), k = randn(s.nkv(), 2), v = randn(s.nkv(), 3), out(s.nq()), att(s.natt());
    {
        const bmoe::model::ScopedMatmulPrecision bf16(&be, bmoe::model::MatmulPrecision::kBf16);
        be.attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), s.B, s.T, s.H, s.KV, s.Hd);
    }
    auto rounded = [](Vec x) {
        for (float& e : x) e = bmoe::model::round_to_bf16(e);
        return x;
    };
    const std::vector<double> ref16 = naive_attention(s, rounded(q), rounded(k), rounded(v), /*round_p=*/true);
    const std::vector<double> ref32 = naive_attention(s, q, k, v);
    double to16 = 0.0, to32 = 0.0;
    for (size_t i = 0; i < out.size(); ++i) {
        to16 += (out[i] - ref16[i]) * (out[i] - ref16[i]);
        to32 += (out[i] - ref32[i]) * (out[i] - ref32[i]);
    }
    EXPECT_LT(std::sqrt(to16), 0.1 * std::sqrt(to32)) << "rms distance to the bf16 reference vs the fp32 one";
    expect_near_vec(out, ref16, 1e-2, "bf16 attention out");
}

INSTANTIATE_TEST_SUITE_P(CpuOps,
                         AttentionForward,
                         ::testing::Values(AttnShape{2, 7, 4, 2, 8},     // GQA
                                           AttnShape{1, 150, 2, 2, 16},  // MHA, several causal row blocks
                                           AttnShape{2, 70, 4, 1, 8}));  // MQA, ragged last block

// The CPU has only the gemm attention kernel: it saves the [B, H, T, T] probabilities, and asking
// for the flash kernel is a one-line error naming the fix.
TEST(CpuOps, AttentionKernelChoice) {
    CpuBackend be;
    EXPECT_EQ(be.attention_saved_numel(2, 5, 3, 8), size_t{2 * 3 * 5 * 5});
    EXPECT_NO_THROW(be.set_attention_kernel(AttentionKernel::kGemm));
    try {
        be.set_attention_kernel(AttentionKernel::kFlash);
        FAIL() << "the CPU backend accepted the flash attention kernel";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("--train.attention=gemm"), std::string::npos) << e.what();
    }
    EXPECT_EQ(be.attention_kernel(), AttentionKernel::kGemm);
    EXPECT_EQ(parse_attention_kernel("flash"), AttentionKernel::kFlash);
    EXPECT_EQ(to_string(parse_attention_kernel("gemm")), "gemm");
    EXPECT_THROW(parse_attention_kernel("sdpa"), Error);
}

TEST(CpuOps, AttentionGqaHeadMapping) {
    const AttnShape s{1, 4, 4, 2, 4};  // query heads {0,1} read kv head 0, {2,3} read kv head 1
    CpuBackend be;
    Vec q = randn(s.nq(), 1), k = randn(s.nkv(), 2), v = randn(s.nkv(), 3), out(s.nq()), att(s.natt());
    be.attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), s.B, s.T, s.H, s.KV, s.Hd);
    Vec v2 = v, out2(s.nq());
    for (int t = 0; t < s.T; ++t)
        for (int e = 0; e < s.Hd; ++e) v2[(t * s.KV + 1) * s.Hd + e] += 10.0f;  // kv head 1 only
    be.attention_forward(out2.data(), att.data(), q.data(), k.data(), v2.data(), s.B, s.T, s.H, s.KV, s.Hd);
    for (int t = 0; t < s.T; ++t)
        for (int h = 0; h < s.H; ++h)
            for (int e = 0; e < s.Hd; ++e) {
                const size_t i = (t * s.H + h) * s.Hd + e;
                if (h < 2) {
                    EXPECT_EQ(out2[i], out[i]);
                } else {
                    EXPECT_NEAR(out2[i], out[i] + 10.0f, 1e-4);  // probs sum to 1
                }
            }
}

TEST(CpuOps, AttentionBackwardGrad) {
    const AttnShape s{2, 6, 4, 2, 4};
    CpuBackend be;
    Vec q = randn(s.nq(), 1), k = randn(s.nkv(), 2), v = randn(s.nkv(), 3), wout = randn(s.nq(), 4);
    Vec out(s.nq()), att(s.natt());
    auto loss = [&] {
        be.attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), s.B, s.T, s.H, s.KV, s.Hd);
        return dot(out, wout);
    };
    loss();
    Vec dq(s.nq(), 5.0f), dk(s.nkv(), 5.0f), dv(s.nkv(), 5.0f);  // stale values must be overwritten
    be.attention_backward(dq.data(), dk.data(), dv.data(), wout.data(), out.data(), q.data(), k.data(), v.data(),
                          att.data(), s.B, s.T, s.H, s.KV, s.Hd);
    check_grad(q, dq, loss, "attention dq");
    check_grad(k, dk, loss, "attention dk");
    check_grad(v, dv, loss, "attention dv");
}

TEST(CpuOps, AttentionBackwardDirectionalLargeT) {
    // Crosses several causal row blocks; one random direction per input keeps it cheap.
    const AttnShape s{1, 150, 2, 1, 8};
    CpuBackend be;
    Vec q = randn(s.nq(), 1), k = randn(s.nkv(), 2), v = randn(s.nkv(), 3), wout = randn(s.nq(), 4);
    Vec out(s.nq()), att(s.natt()), dq(s.nq()), dk(s.nkv()), dv(s.nkv());
    be.attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), s.B, s.T, s.H, s.KV, s.Hd);
    be.attention_backward(dq.data(), dk.data(), dv.data(), wout.data(), out.data(), q.data(), k.data(), v.data(),
                          att.data(), s.B, s.T, s.H, s.KV, s.Hd);
    const float eps = 1e-2f;
    uint32_t seed = 10;
    struct Input {
        Vec* x;
        const Vec* dx;
        const char* name;
    };
    for (const Input& in : {Input{&q, &dq, "dq"}, Input{&k, &dk, "dk"}, Input{&v, &dv, "dv"}}) {
        Vec* x = in.x;
        const Vec u = randn(x->size(), seed++), x0 = *x;
        double l[2];
        for (int side = 0; side < 2; ++side) {
            for (size_t i = 0; i < x->size(); ++i) (*x)[i] = x0[i] + (side ? -eps : eps) * u[i];
            be.attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), s.B, s.T, s.H, s.KV, s.Hd);
            l[side] = dot(out, wout);
        }
        *x = x0;
        const double fd = (l[0] - l[1]) / (2.0 * eps), an = dot(*in.dx, u);
        EXPECT_NEAR(fd, an, 2e-3 * std::abs(an) + 1e-3) << in.name;
    }
}

// ---- activations ------------------------------------------------------------------------------

TEST(CpuOps, SwigluAndGeluGrad) {
    CpuBackend be;
    const size_t n = 50;
    Vec g = randn(n, 1, 2.0f), u = randn(n, 2), x = randn(n, 3, 2.0f), wout = randn(n, 4), out(n);
    be.swiglu_forward(out.data(), g.data(), u.data(), n);
    for (size_t i = 0; i < n; ++i) EXPECT_NEAR(out[i], g[i] / (1.0 + std::exp(-double(g[i]))) * u[i], 1e-5);
    auto swiglu_loss = [&] {
        be.swiglu_forward(out.data(), g.data(), u.data(), n);
        return dot(out, wout);
    };
    Vec dg(n, 3.0f), du(n, 3.0f);
    be.swiglu_backward(dg.data(), du.data(), wout.data(), g.data(), u.data(), n);
    check_grad(g, dg, swiglu_loss, "swiglu dgate", 1e-3, 1e-3f);
    check_grad(u, du, swiglu_loss, "swiglu dup", 1e-3, 1e-3f);

    be.gelu_forward(out.data(), x.data(), n);
    for (size_t i = 0; i < n; ++i) {
        const double xi = x[i];
        const double want = 0.5 * xi * (1 + std::tanh(std::sqrt(2 / M_PI) * (xi + 0.044715 * xi * xi * xi)));
        EXPECT_NEAR(out[i], want, 1e-5);
    }
    auto gelu_loss = [&] {
        be.gelu_forward(out.data(), x.data(), n);
        return dot(out, wout);
    };
    Vec dx(n, 3.0f);
    be.gelu_backward(dx.data(), wout.data(), x.data(), n);
    check_grad(x, dx, gelu_loss, "gelu din", 1e-3, 1e-3f);
}

// ---- loss -------------------------------------------------------------------------------------

TEST(CpuOps, CrossEntropyIgnoredTargetsAndGrad) {
    CpuBackend be;
    const int N = 4, V = 7;
    const float dloss = 0.25f;
    IVec targets = {2, -1, 6, 0};
    Vec logits = randn(N * V, 1, 3.0f), loss_N(N), probs(N * V);
    logits[5] = 80.0f;  // large logit: the softmax must subtract the max
    be.cross_entropy_forward(loss_N.data(), probs.data(), logits.data(), targets.data(), N, V);
    for (int n = 0; n < N; ++n) {
        double mx = -1e300, sum = 0.0;
        for (int v = 0; v < V; ++v) mx = std::max(mx, double(logits[n * V + v]));
        for (int v = 0; v < V; ++v) sum += std::exp(logits[n * V + v] - mx);
        for (int v = 0; v < V; ++v) EXPECT_NEAR(probs[n * V + v], std::exp(logits[n * V + v] - mx) / sum, 1e-6);
        const double want = targets[n] < 0 ? 0.0 : mx + std::log(sum) - logits[n * V + targets[n]];
        EXPECT_NEAR(loss_N[n], want, 1e-5 * (1 + want));
    }
    auto loss = [&] {
        be.cross_entropy_forward(loss_N.data(), probs.data(), logits.data(), targets.data(), N, V);
        double s = 0.0;
        for (float l : loss_N) s += dloss * static_cast<double>(l);
        return s;
    };
    loss();
    Vec dlogits(N * V, 9.0f);
    be.cross_entropy_backward(dlogits.data(), probs.data(), targets.data(), dloss, N, V);
    for (int v = 0; v < V; ++v) EXPECT_EQ(dlogits[1 * V + v], 0.0f) << "ignored row";
    check_grad(logits, dlogits, loss, "cross-entropy dlogits");  // loss ~80 in fp32: the larger step beats rounding
    loss();  // in place, as Model runs it: d logits overwrites probs
    be.cross_entropy_backward(probs.data(), probs.data(), targets.data(), dloss, N, V);
    EXPECT_EQ(probs, dlogits);
    // The forward in place too (Model::set_keep_logits(false)): probs over the logits, same loss.
    const Vec want_loss = loss_N, want_probs = [&] {
        loss();
        return probs;
    }();
    Vec inplace = logits, inplace_loss(N);
    be.cross_entropy_forward(inplace_loss.data(), inplace.data(), inplace.data(), targets.data(), N, V);
    EXPECT_EQ(inplace, want_probs);
    EXPECT_EQ(inplace_loss, want_loss);
}

// The bf16-logit loss against the fp32 ops on the same (bf16-exact) logits: the same loss, and d logits
// the fp32 ones rounded to bf16 (within one bf16 step: exp rounds differently from the probabilities'
// exp * 1/sum). In place, as Model runs it.
TEST(Bf16, LossOnBf16LogitsIsTheFp32LossOnTheRoundedLogits) {
    CpuBackend be;
    const int N = 5, V = 37;
    const float dloss = 0.125f;
    const IVec targets = {2, -1, 36, 0, 17};
    Vec logits = randn(N * V, 11, 3.0f);
    logits[5] = 80.0f;  // large logit: the max is subtracted
    std::vector<uint16_t> logits16(N * V);
    for (int i = 0; i < N * V; ++i) logits16[i] = bf16_bits(logits[i]), logits[i] = bf16_to_float(logits16[i]);
    Vec loss(N), probs(N * V), loss16(N, 9.0f), lse(N);
    be.cross_entropy_forward(loss.data(), probs.data(), logits.data(), targets.data(), N, V);
    be.cross_entropy_backward(probs.data(), probs.data(), targets.data(), dloss, N, V);  // d logits
    EXPECT_THROW(be.cross_entropy_forward_bf16(loss16.data(), lse.data(), logits16.data(), targets.data(), N, V),
                 bmoe::Error)
        << "fp32 matmul precision";
    be.set_matmul_precision(MatmulPrecision::kBf16);
    be.cross_entropy_forward_bf16(loss16.data(), lse.data(), logits16.data(), targets.data(), N, V);
    for (int n = 0; n < N; ++n) {
        EXPECT_NEAR(loss16[n], loss[n], 1e-5 * (1 + loss[n])) << "row " << n;
        double sum = 0.0;
        for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(logits[n * V + v]) - lse[n]);
        EXPECT_NEAR(sum, 1.0, 1e-5) << "lse of row " << n;
    }
    EXPECT_EQ(loss16[1], 0.0f) << "ignored target";
    be.cross_entropy_backward_bf16(logits16.data(), logits16.data(), lse.data(), targets.data(), dloss, N, V);
    for (int i = 0; i < N * V; ++i) {
        const float got = bf16_to_float(logits16[i]), want = probs[i];
        ASSERT_NEAR(got, want, std::abs(want) * 0x1p-7f + 1e-12f) << "d logit " << i;
    }
    for (int v = 0; v < V; ++v) EXPECT_EQ(logits16[1 * V + v], 0) << "ignored row";
}

// The dense bf16 GEMMs are the fp32 ones fed the same values: an operand given as bf16 is the fp32
// one's rounding, and a bf16 result is the fp32 result rounded.
TEST(Bf16, DenseGemmsWithBf16OperandsAreTheFp32Ones) {
    CpuBackend be;
    const int N = 300, I = 24, O = 29;  // N above the bf16-output forward's 256-row blocks
    const Vec in = randn(N * I, 1), w = randn(O * I, 2), dout = randn(N * O, 3), dw0 = randn(O * I, 4);
    std::vector<uint16_t> in16(N * I), out16(N * O), dout16(N * O);
    for (int i = 0; i < N * I; ++i) in16[i] = bf16_bits(in[i]);
    for (int i = 0; i < N * O; ++i) dout16[i] = bf16_bits(dout[i]);
    Vec out(N * O), out_from16(N * O);
    EXPECT_THROW(be.matmul_forward_bf16(nullptr, out16.data(), in.data(), nullptr, w.data(), N, I, O), bmoe::Error)
        << "needs bf16 precision";
    be.set_matmul_precision(MatmulPrecision::kBf16);
    EXPECT_THROW(be.matmul_forward_bf16(out.data(), out16.data(), in.data(), nullptr, w.data(), N, I, O), bmoe::Error)
        << "two outputs";
    EXPECT_THROW(be.matmul_forward_bf16(out.data(), nullptr, in.data(), in16.data(), w.data(), N, I, O), bmoe::Error)
        << "two inputs";
    be.matmul_forward(out.data(), in.data(), w.data(), nullptr, N, I, O);
    be.matmul_forward_bf16(out_from16.data(), nullptr, nullptr, in16.data(), w.data(), N, I, O);
    EXPECT_EQ(out_from16, out) << "bf16 input";
    for (const bool input16 : {false, true}) {
        be.matmul_forward_bf16(nullptr, out16.data(), input16 ? nullptr : in.data(), input16 ? in16.data() : nullptr,
                               w.data(), N, I, O);
        for (int i = 0; i < N * O; ++i)  // sgemm over 256-row blocks may sum in another order
            ASSERT_NEAR(bf16_to_float(out16[i]), out[i], std::abs(out[i]) * 0x1p-8f + 1e-6f) << "logit " << i;
    }
    Vec dout_rounded(N * O);
    for (int i = 0; i < N * O; ++i) dout_rounded[i] = bf16_to_float(dout16[i]);
    for (const bool accumulate : {false, true}) {
        Vec din(N * I, 1.5f), dw = dw0;
        be.matmul_backward(din.data(), dw.data(), nullptr, dout_rounded.data(), in.data(), w.data(), N, I, O,
                           accumulate);
        for (const bool dout_16 : {false, true})
            for (const bool input16 : {false, true}) {
                Vec din2(N * I, 1.5f), dw2 = dw0;
                be.matmul_backward_bf16(din2.data(), dw2.data(), dout_16 ? nullptr : dout.data(),
                                        dout_16 ? dout16.data() : nullptr, input16 ? nullptr : in.data(),
                                        input16 ? in16.data() : nullptr, w.data(), N, I, O, accumulate);
                EXPECT_EQ(din2, din) << "accumulate " << accumulate << " dout16 " << dout_16 << " in16 " << input16;
                EXPECT_EQ(dw2, dw) << "accumulate " << accumulate << " dout16 " << dout_16 << " in16 " << input16;
            }
        Vec dw_only = dw0;  // no din: the input pair is still required with dw, no din16 exists
        be.matmul_backward_bf16(nullptr, dw_only.data(), nullptr, dout16.data(), nullptr, in16.data(), w.data(), N, I,
                                O, accumulate);
        EXPECT_EQ(dw_only, dw);
    }
    Vec din(N * I), dw = dw0;
    EXPECT_THROW(be.matmul_backward_bf16(din.data(), dw.data(), dout.data(), dout16.data(), in.data(), nullptr,
                                         w.data(), N, I, O, false),
                 bmoe::Error)
        << "two d outputs";
    EXPECT_THROW(be.matmul_backward_bf16(din.data(), dw.data(), dout.data(), nullptr, nullptr, nullptr, w.data(), N, I,
                                         O, false),
                 bmoe::Error)
        << "dw without an input";
}

// The norms' bf16-output variants write the fp32 output's rounding, and the same mean and rstd.
TEST(Bf16, NormsWithBf16OutputRoundTheFp32Output) {
    CpuBackend be;
    const int N = 7, D = 40;
    const Vec in = randn(N * D, 5), w = randn(D, 6), b = randn(D, 7);
    Vec out(N * D), mean(N), rstd(N), mean16(N), rstd16(N);
    std::vector<uint16_t> out16(N * D);
    EXPECT_THROW(be.rmsnorm_forward_bf16(out16.data(), rstd16.data(), in.data(), w.data(), N, D, 1e-5f), bmoe::Error);
    be.set_matmul_precision(MatmulPrecision::kBf16);
    for (const bool layernorm : {false, true}) {
        if (layernorm) {
            be.layernorm_forward(out.data(), mean.data(), rstd.data(), in.data(), w.data(), b.data(), N, D, 1e-5f);
            be.layernorm_forward_bf16(out16.data(), mean16.data(), rstd16.data(), in.data(), w.data(), b.data(), N, D,
                                      1e-5f);
            EXPECT_EQ(mean16, mean);
        } else {
            be.rmsnorm_forward(out.data(), rstd.data(), in.data(), w.data(), N, D, 1e-5f);
            be.rmsnorm_forward_bf16(out16.data(), rstd16.data(), in.data(), w.data(), N, D, 1e-5f);
        }
        EXPECT_EQ(rstd16, rstd) << "layernorm " << layernorm;
        for (int i = 0; i < N * D; ++i) ASSERT_EQ(out16[i], bf16_bits(out[i])) << "layernorm " << layernorm << " " << i;
    }
}

// ---- router -----------------------------------------------------------------------------------

TEST(CpuOps, RouterTopkOrderTiesAndRenormalize) {
    CpuBackend be;
    const int N = 2, E = 5, K = 3;
    Vec logits = {1.0f, 3.0f,  1.0f, 3.0f, 0.5f,  // ties: 1 and 3 at the top, 0 and 2 next
                  0.0f, -1.0f, 2.0f, 0.7f, 0.7f};
    Vec probs(N * E), lse(N), w(N * K), wr(N * K);
    IVec idx(N * K);
    be.router_topk_forward(probs.data(), lse.data(), idx.data(), w.data(), logits.data(), N, E, K, false);
    EXPECT_EQ(idx, (IVec{1, 3, 0, 2, 3, 4}));
    for (int n = 0; n < N; ++n) {
        double sum = 0.0;
        for (int e = 0; e < E; ++e) sum += std::exp(double(logits[n * E + e]));
        EXPECT_NEAR(lse[n], std::log(sum), 1e-5);
        for (int k = 0; k < K; ++k) EXPECT_EQ(w[n * K + k], probs[n * E + idx[n * K + k]]);
    }
    be.router_topk_forward(probs.data(), lse.data(), idx.data(), wr.data(), logits.data(), N, E, K, true);
    for (int n = 0; n < N; ++n) {
        const double S = w[n * K] + double(w[n * K + 1]) + w[n * K + 2];
        for (int k = 0; k < K; ++k) EXPECT_NEAR(wr[n * K + k], w[n * K + k] / S, 1e-6);
    }
}

class RouterBackward : public ::testing::TestWithParam<bool> {};

TEST_P(RouterBackward, GradThroughGatesAuxAndZloss) {
    const bool renorm = GetParam();
    CpuBackend be;
    const int N = 4, E = 6, K = 2;
    const float zcoef = 0.3f;
    Vec logits = randn(N * E, 1), dg = randn(N * K, 2), aux = randn(E, 3);
    Vec probs(N * E), lse(N), w(N * K), dlogits(N * E, 7.0f);
    IVec idx(N * K);
    auto loss = [&] {
        be.router_topk_forward(probs.data(), lse.data(), idx.data(), w.data(), logits.data(), N, E, K, renorm);
        double s = dot(w, dg);
        for (int n = 0; n < N; ++n) {
            s += zcoef * static_cast<double>(lse[n]) * lse[n];
            for (int e = 0; e < E; ++e) s += static_cast<double>(aux[e]) * probs[n * E + e];
        }
        return s;
    };
    loss();
    be.router_topk_backward(dlogits.data(), dg.data(), probs.data(), lse.data(), idx.data(), w.data(), aux.data(),
                            zcoef, N, E, K, renorm);
    check_grad(logits, dlogits, loss, renorm ? "router dlogits (renormalized)" : "router dlogits (raw)", 1e-3, 1e-3f);
}

INSTANTIATE_TEST_SUITE_P(CpuOps, RouterBackward, ::testing::Bool());

// ---- MoE permutation --------------------------------------------------------------------------

struct Routing {
    int N = 3, K = 2, D = 5;
    // Copies grouped by expert; copy (2, 0) is dropped, so R = 5.
    IVec row_src = {0 * 2 + 1, 2 * 2 + 1, 1 * 2 + 0, 0 * 2 + 0, 1 * 2 + 1};
    IVec slot_row = {3, 0, 2, 4, -1, 1};
    int R() const { return static_cast<int>(row_src.size()); }
};

TEST(CpuOps, MoeGatherCombineWithDroppedSlots) {
    CpuBackend be;
    const Routing rt;
    const int N = rt.N, K = rt.K, D = rt.D, R = rt.R();
    Vec x = randn(N * D, 1), xr(R * D);
    be.moe_gather_forward(xr.data(), x.data(), rt.row_src.data(), R, K, D);
    for (int r = 0; r < R; ++r)
        for (int d = 0; d < D; ++d) ASSERT_EQ(xr[r * D + d], x[rt.row_src[r] / K * D + d]);
    const Vec base = randn(N * D, 2), dxr = randn(R * D, 3);
    Vec dx = base;
    be.moe_gather_backward(dx.data(), dxr.data(), rt.slot_row.data(), N, K, D);
    Vec xin = randn(N * D, 4), dx_only(N * D);
    for (int i = 0; i < N * D; ++i) dx_only[i] = dx[i] - base[i];
    check_grad(
        xin, dx_only,
        [&] {
            be.moe_gather_forward(xr.data(), xin.data(), rt.row_src.data(), R, K, D);
            return dot(xr, dxr);
        },
        "gather dx");

    Vec yr = randn(R * D, 5), tw = randn(N * K, 6), y(N * D, 9.0f), wout = randn(N * D, 7);
    auto combine_loss = [&] {
        be.moe_combine_forward(y.data(), yr.data(), rt.slot_row.data(), tw.data(), N, K, D);
        return dot(y, wout);
    };
    combine_loss();
    for (int n = 0; n < N; ++n)
        for (int d = 0; d < D; ++d) {
            double want = 0.0;
            for (int k = 0; k < K; ++k)
                if (rt.slot_row[n * K + k] >= 0) want += double(tw[n * K + k]) * yr[rt.slot_row[n * K + k] * D + d];
            ASSERT_NEAR(y[n * D + d], want, 1e-6);
        }
    Vec dyr(R * D, 9.0f), dtw(N * K, 9.0f);
    be.moe_combine_backward(dyr.data(), dtw.data(), wout.data(), yr.data(), rt.row_src.data(), rt.slot_row.data(),
                            tw.data(), N, R, K, D);
    EXPECT_EQ(dtw[2 * K + 0], 0.0f) << "dropped copy";
    check_grad(yr, dyr, combine_loss, "combine dy_RD");
    check_grad(tw, dtw, combine_loss, "combine dtopk_weight");

    // the bf16-row variants: the fp32 rows rounded, the same gate gradients; bf16 precision only
    std::vector<uint16_t> xr16(R * D), dyr16(R * D);
    Vec dtw16(N * K, 9.0f);
    EXPECT_THROW(be.moe_gather_forward_bf16(xr16.data(), x.data(), rt.row_src.data(), R, K, D), bmoe::Error);
    be.set_matmul_precision(MatmulPrecision::kBf16);
    be.moe_gather_forward(xr.data(), x.data(), rt.row_src.data(), R, K, D);
    be.moe_gather_forward_bf16(xr16.data(), x.data(), rt.row_src.data(), R, K, D);
    be.moe_combine_backward_bf16(dyr16.data(), dtw16.data(), wout.data(), yr.data(), rt.row_src.data(),
                                 rt.slot_row.data(), tw.data(), N, R, K, D);
    for (int i = 0; i < R * D; ++i) {
        ASSERT_EQ(xr16[i], bf16_bits(xr[i])) << "gathered row element " << i;
        ASSERT_EQ(dyr16[i], bf16_bits(dyr[i])) << "d row element " << i;
    }
    EXPECT_EQ(dtw16, dtw);
}

// The backend's routing plan is the host's plan_routing: the same rows, slots and counts, with and
// without a capacity (plan_from_counts then gives the same offsets from the counts alone).
TEST(CpuOps, PlanRoutingOnTheBackendIsTheHostPlan) {
    CpuBackend be;
    std::mt19937 gen(5);
    const int N = 37, K = 3, E = 6;
    std::vector<int32_t> idx(N * K);
    for (int32_t& e : idx) e = static_cast<int32_t>(gen() % (E - 1));  // expert E-1 gets none
    for (const int capacity : {-1, 4, 0}) {
        const RoutingPlan want = plan_routing(idx.data(), N, K, E, capacity);
        std::vector<int32_t> row_src(N * K, -7), slot_row(N * K, -7), counts(E, -7);
        be.moe_plan_routing(row_src.data(), slot_row.data(), counts.data(), idx.data(), N, K, E, capacity);
        const int R = want.num_rows();
        EXPECT_EQ(std::vector<int32_t>(row_src.begin(), row_src.begin() + R), want.row_src) << "capacity " << capacity;
        EXPECT_EQ(slot_row, want.slot_row) << "capacity " << capacity;
        const RoutingPlan from_counts = plan_from_counts(std::vector<int64_t>(counts.begin(), counts.end()), capacity);
        EXPECT_EQ(from_counts.tokens_per_expert, want.tokens_per_expert);
        EXPECT_EQ(from_counts.expert_offsets, want.expert_offsets);
        EXPECT_EQ(from_counts.num_dropped, want.num_dropped);
    }
}

// bf16 rows move bit for bit (NaN and odd widths included): out[l] = in[src[l]]
TEST(CpuOps, GatherRowsBf16CopiesRowsAsTheyAre) {
    CpuBackend be;
    for (const int D : {1, 3, 8}) {
        const int R = 5, L = 7;
        std::vector<uint16_t> in(R * D);
        for (int i = 0; i < R * D; ++i) in[i] = static_cast<uint16_t>(0x7fc1 + 977 * i);  // NaN bits among them
        const std::vector<int32_t> src = {4, 0, 0, 2, 3, 1, 4};
        std::vector<uint16_t> out(L * D, 0xdead);
        be.gather_rows_bf16(out.data(), in.data(), src.data(), L, D);
        for (int l = 0; l < L; ++l)
            for (int d = 0; d < D; ++d) ASSERT_EQ(out[l * D + d], in[src[l] * D + d]) << "D " << D << " row " << l;
    }
}

// OpenBLAS's generic fallback on a CPU with wide vector units gets the matching kernels; a core
// OpenBLAS recognised, or a CPU with nothing wider, keeps OpenBLAS's choice.
TEST(CpuThreads, GenericOpenblasCoreIsReplacedWhereTheCpuHasWiderVectors) {
    EXPECT_EQ(better_openblas_core("Prescott", true, true), "SkylakeX");
    EXPECT_EQ(better_openblas_core("Prescott", false, true), "Haswell");
    EXPECT_EQ(better_openblas_core("Core2", false, true), "Haswell");
    EXPECT_EQ(better_openblas_core("Prescott", false, false), "");
    EXPECT_EQ(better_openblas_core("SkylakeX", true, true), "");
    EXPECT_EQ(better_openblas_core("Zen", false, true), "");
}

// ---- optimizer --------------------------------------------------------------------------------

TEST(CpuOps, AdamwMatchesHandComputation) {
    CpuBackend be;
    const float lr = 0.1f, b1 = 0.9f, b2 = 0.99f, eps = 1e-8f, wd = 0.5f, gs = 0.5f;
    Vec p = {1.0f, -2.0f}, g = {0.4f, 2.0f}, m(2), v(2);
    std::vector<uint16_t> p16(2);
    double pe[2] = {1.0, -2.0}, me[2] = {}, ve[2] = {};
    for (int step = 1; step <= 2; ++step) {
        be.adamw_update(p.data(), g.data(), m.data(), v.data(), p16.data(), 2, lr, b1, b2, eps, wd, gs, step);
        for (int i = 0; i < 2; ++i) {
            const double gi = g[i] * gs;
            me[i] = b1 * me[i] + (1 - b1) * gi;
            ve[i] = b2 * ve[i] + (1 - b2) * gi * gi;
            const double mhat = me[i] / (1 - std::pow(b1, step)), vhat = ve[i] / (1 - std::pow(b2, step));
            pe[i] -= lr * (mhat / (std::sqrt(vhat) + eps) + wd * pe[i]);
            EXPECT_NEAR(m[i], me[i], 1e-6);
            EXPECT_NEAR(v[i], ve[i], 1e-6);
            EXPECT_NEAR(p[i], pe[i], 1e-6) << "step " << step;
            EXPECT_EQ(p16[i], bf16_bits(p[i])) << "the bf16 weight copy, step " << step;
        }
    }
    // Step 1 by hand, element 0: g = 0.2, mhat = 0.2, vhat = 0.04 -> update 1; p = 1 - 0.1 (1 + 0.5) = 0.85.
    Vec p1 = {1.0f}, m1(1), v1(1), g1 = {0.4f};
    be.adamw_update(p1.data(), g1.data(), m1.data(), v1.data(), nullptr, 1, lr, b1, b2, eps, wd, gs, 1);
    EXPECT_NEAR(p1[0], 0.85f, 1e-6);
}

// ---- thread-count independence ----------------------------------------------------------------

// Runs fn() once with 1 thread and once with 2 (OpenMP and OpenBLAS) and returns both outputs.
template <typename Fn>
std::pair<Vec, Vec> with_1_and_2_threads(Fn fn) {
    const int saved = omp_get_max_threads();
    set_cpu_threads(1);
    Vec a = fn();
    set_cpu_threads(2);
    Vec b = fn();
    set_cpu_threads(saved);
    return {a, b};
}

TEST(CpuOps, ResultsIndependentOfThreadCount) {
    CpuBackend be;
    const int N = 512, D = 256, V = 11;
    IVec tokens(N);
    for (int n = 0; n < N; ++n) tokens[n] = (n * 7) % V;
    const Vec dout = randn(N * D, 1);
    auto [e1, e2] = with_1_and_2_threads([&] {
        Vec dtable(V * D);
        be.embedding_backward(dtable.data(), dout.data(), tokens.data(), N, D);
        return dtable;
    });
    EXPECT_EQ(e1, e2) << "embedding_backward";

    const int I = 192, O = 160;
    const Vec in = randn(N * I, 2), w = randn(O * I, 3), bias = randn(O, 4), dmm = randn(N * O, 5);
    auto [m1, m2] = with_1_and_2_threads([&] {
        Vec out(N * O), din(N * I), dw(O * I), db(O);
        be.matmul_forward(out.data(), in.data(), w.data(), bias.data(), N, I, O);
        be.matmul_backward(din.data(), dw.data(), db.data(), dmm.data(), in.data(), w.data(), N, I, O, false);
        out.insert(out.end(), din.begin(), din.end());
        out.insert(out.end(), dw.begin(), dw.end());
        out.insert(out.end(), db.begin(), db.end());
        return out;
    });
    EXPECT_EQ(m1, m2) << "matmul";

    const AttnShape s{2, 96, 4, 2, 16};
    const Vec q = randn(s.nq(), 6), k = randn(s.nkv(), 7), v = randn(s.nkv(), 8), da = randn(s.nq(), 9);
    auto [a1, a2] = with_1_and_2_threads([&] {
        Vec out(s.nq()), att(s.natt()), dq(s.nq()), dk(s.nkv()), dv(s.nkv());
        be.attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), s.B, s.T, s.H, s.KV, s.Hd);
        be.attention_backward(dq.data(), dk.data(), dv.data(), da.data(), out.data(), q.data(), k.data(), v.data(),
                              att.data(), s.B, s.T, s.H, s.KV, s.Hd);
        for (const Vec* x : {&att, &dq, &dk, &dv}) out.insert(out.end(), x->begin(), x->end());
        return out;
    });
    EXPECT_EQ(a1, a2) << "attention";
}

}  // namespace
}  // namespace bmoe::model
