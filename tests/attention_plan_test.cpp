// attention_plan_test.cpp -- the CUDA backend's attention GEMM plan (model/cuda/attention_plan.h),
// executed with plain loops on the CPU, equals CpuBackend's attention forward and backward: every
// operand offset, transpose and leading dimension the cuBLAS calls use is checked without a GPU
// (the row kernels are emulated here; tests/cuda_backend_test.cpp checks the real thing on a GPU).
#include "model/cuda/attention_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "model/cpu_backend.h"
#include "tests/test_util.h"

namespace bmoe::model {
namespace {

using bmoe::testing::randn;
using bmoe::testing::Vec;

// C_i = alpha op(A_i) op(B_i) + beta C_i for every slice (C not read when beta == 0, like cuBLAS).
void run(const BatchedGemm& g) {
    for (const BatchedGemm::Operands& o : g.slices)
        for (int m = 0; m < g.M; ++m)
            for (int n = 0; n < g.N; ++n) {
                double acc = 0.0;
                for (int k = 0; k < g.K; ++k) {
                    const float a =
                        g.transA ? o.A[static_cast<size_t>(k) * g.lda + m] : o.A[static_cast<size_t>(m) * g.lda + k];
                    const float b =
                        g.transB ? o.B[static_cast<size_t>(n) * g.ldb + k] : o.B[static_cast<size_t>(k) * g.ldb + n];
                    acc += static_cast<double>(a) * b;
                }
                float& c = o.C[static_cast<size_t>(m) * g.ldc + n];
                c = static_cast<float>(g.alpha * acc + (g.beta == 0.0f ? 0.0 : g.beta * static_cast<double>(c)));
            }
}

// The row kernels of cuda_attention.cu: causal softmax and its backward, rows of T over [B, H, T, T].
void causal_softmax(float* att, size_t rows, int T) {
    for (size_t r = 0; r < rows; ++r) {
        float* p = att + r * T;
        const int i = static_cast<int>(r % T);
        const float mx = *std::max_element(p, p + i + 1);
        double sum = 0.0;
        for (int j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - mx));
        for (int j = 0; j < T; ++j) p[j] = j <= i ? static_cast<float>(p[j] / sum) : 0.0f;
    }
}
void causal_softmax_backward(float* ds, const float* att, size_t rows, int T) {
    for (size_t r = 0; r < rows; ++r) {
        const float* p = att + r * T;
        float* d = ds + r * T;
        const int i = static_cast<int>(r % T);
        double dot = 0.0;
        for (int j = 0; j <= i; ++j) dot += static_cast<double>(p[j]) * d[j];
        for (int j = 0; j < T; ++j) d[j] = j <= i ? static_cast<float>(p[j] * (d[j] - dot)) : 0.0f;
    }
}

void expect_close(const Vec& got, const Vec& want, const std::string& what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    double scale = 0.0, worst = 0.0;
    for (float w : want) scale = std::max(scale, std::abs(static_cast<double>(w)));
    for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(static_cast<double>(got[i]) - want[i]));
    EXPECT_LE(worst, 1e-5 * (scale + 1e-6)) << what << " (max |want| " << scale << ")";
}

struct Shape {
    int B, T, H, KV, Hd;
};

class AttentionPlan : public ::testing::TestWithParam<Shape> {};

TEST_P(AttentionPlan, LoopsOverThePlanEqualCpuAttention) {
    const auto [B, T, H, KV, Hd] = GetParam();
    const size_t nq = static_cast<size_t>(B) * T * H * Hd, nkv = static_cast<size_t>(B) * T * KV * Hd,
                 natt = static_cast<size_t>(B) * H * T * T;
    const Vec q = randn(nq, 1), k = randn(nkv, 2), v = randn(nkv, 3), dout = randn(nq, 4);

    CpuBackend cpu;
    Vec out_ref(nq), att_ref(natt), dq_ref(nq), dk_ref(nkv), dv_ref(nkv);
    cpu.attention_forward(out_ref.data(), att_ref.data(), q.data(), k.data(), v.data(), B, T, H, KV, Hd);
    cpu.attention_backward(dq_ref.data(), dk_ref.data(), dv_ref.data(), dout.data(), out_ref.data(), q.data(), k.data(),
                           v.data(), att_ref.data(), B, T, H, KV, Hd);

    const AttnShape s{B, T, H, KV, Hd};
    Vec out(nq, 7.0f), att(natt, 7.0f), dq(nq, 7.0f), dk(nkv, 7.0f), dv(nkv, 7.0f), dS(natt, 7.0f);
    const std::vector<BatchedGemm> fwd =
        attention_forward_plan(s, out.data(), att.data(), q.data(), k.data(), v.data());
    ASSERT_EQ(fwd.size(), 2u);
    run(fwd[0]);
    causal_softmax(att.data(), natt / T, T);
    run(fwd[1]);
    expect_close(att, att_ref, "att");
    expect_close(out, out_ref, "out");

    const std::vector<BatchedGemm> bwd = attention_backward_plan(s, dq.data(), dk.data(), dv.data(), dS.data(),
                                                                 dout.data(), q.data(), k.data(), v.data(), att.data());
    ASSERT_EQ(bwd.size(), 2u + 2u * (H / KV));
    run(bwd[0]);
    causal_softmax_backward(dS.data(), att.data(), natt / T, T);
    for (size_t i = 1; i < bwd.size(); ++i) run(bwd[i]);
    expect_close(dq, dq_ref, "dq");
    expect_close(dk, dk_ref, "dk");
    expect_close(dv, dv_ref, "dv");
}

INSTANTIATE_TEST_SUITE_P(Shapes,
                         AttentionPlan,
                         ::testing::Values(Shape{2, 7, 4, 2, 8},   // GQA, 2 query heads per kv head
                                           Shape{1, 5, 3, 3, 4},   // MHA
                                           Shape{2, 9, 6, 1, 6},   // MQA
                                           Shape{1, 1, 2, 1, 2}),  // one token
                         [](const auto& info) {
                             const Shape& s = info.param;
                             return "B" + std::to_string(s.B) + "_T" + std::to_string(s.T) + "_H" +
                                    std::to_string(s.H) + "_KV" + std::to_string(s.KV) + "_Hd" + std::to_string(s.Hd);
                         });

}  // namespace
}  // namespace bmoe::model
