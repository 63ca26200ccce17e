// attention_plan.h -- the GEMMs of causal grouped-query attention, batched over (batch, head)
// slices: which operands, transposes and leading dimensions each product uses. CudaBackend runs
// them with cuBLAS (cuda_attention.cu); tests/attention_plan_test.cpp runs the same plan with
// plain loops on the CPU against CpuBackend, so the layout is checked without a GPU.
// Plain C++ (no CUDA). Row-major: C_i = alpha op(A_i) op(B_i) + beta C_i, op(A) M x K, op(B) K x N.
// Layouts: q/out/dq/dout [B, T, H, Hd], k/v/dk/dv [B, T, KV, Hd], att/dS [B, H, T, T].
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

namespace bmoe::model {

struct BatchedGemm {
    struct Operands {
        const float* A;
        const float* B;
        float* C;
    };
    int M = 0, N = 0, K = 0;
    float alpha = 1.0f;
    int lda = 0;
    bool transA = false;
    int ldb = 0;
    bool transB = false;
    float beta = 0.0f;
    int ldc = 0;
    std::vector<Operands> slices;
};

// Element offsets of the (b, h) slices; query head h reads kv head h / (H / KV).
struct AttnShape {
    int B, T, H, KV, Hd;
    float scale() const { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(Hd))); }
    size_t q(int b, int h) const { return static_cast<size_t>(b) * T * H * Hd + static_cast<size_t>(h) * Hd; }
    size_t kv(int b, int h) const {
        return static_cast<size_t>(b) * T * KV * Hd + static_cast<size_t>(h / (H / KV)) * Hd;
    }
    size_t att(int b, int h) const { return (static_cast<size_t>(b) * H + h) * T * T; }
};

// Forward: [0] S = scale Q K^T into att (full T x T), then the caller's causal softmax of att,
// then [1] out = P V.
inline std::vector<BatchedGemm> attention_forward_plan(
    const AttnShape& s, float* out, float* att, const float* q, const float* k, const float* v) {
    const int T = s.T, H = s.H, KV = s.KV, Hd = s.Hd;
    BatchedGemm scores{T, T, Hd, s.scale(), H * Hd, false, KV * Hd, true, 0.0f, T, {}};
    BatchedGemm apply{T, Hd, T, 1.0f, T, false, KV * Hd, false, 0.0f, H * Hd, {}};
    for (int b = 0; b < s.B; ++b)
        for (int h = 0; h < H; ++h) {
            scores.slices.push_back({q + s.q(b, h), k + s.kv(b, h), att + s.att(b, h)});
            apply.slices.push_back({att + s.att(b, h), v + s.kv(b, h), out + s.q(b, h)});
        }
    return {scores, apply};
}

// Backward: [0] dP = dout V^T into dS, then the caller's causal softmax backward (dS = P (dP -
// rowsum(P dP)), zero above the diagonal), then [1] dq = scale dS K, then for each query head j of
// a kv group in turn: [2 + 2j] dk (=/+=) scale dS_h^T q_h and [3 + 2j] dv (=/+=) P_h^T dout_h
// (= for the first head of the group, += after: a fixed, deterministic order).
inline std::vector<BatchedGemm> attention_backward_plan(const AttnShape& s,
                                                        float* dq,
                                                        float* dk,
                                                        float* dv,
                                                        float* dS,
                                                        const float* dout,
                                                        const float* q,
                                                        const float* k,
                                                        const float* v,
                                                        const float* att) {
    const int T = s.T, H = s.H, KV = s.KV, Hd = s.Hd, group = H / KV;
    BatchedGemm dp{T, T, Hd, 1.0f, H * Hd, false, KV * Hd, true, 0.0f, T, {}};
    BatchedGemm dq_gemm{T, Hd, T, s.scale(), T, false, KV * Hd, false, 0.0f, H * Hd, {}};
    for (int b = 0; b < s.B; ++b)
        for (int h = 0; h < H; ++h) {
            dp.slices.push_back({dout + s.q(b, h), v + s.kv(b, h), dS + s.att(b, h)});
            dq_gemm.slices.push_back({dS + s.att(b, h), k + s.kv(b, h), dq + s.q(b, h)});
        }
    std::vector<BatchedGemm> plan{dp, dq_gemm};
    for (int j = 0; j < group; ++j) {
        const float beta = j == 0 ? 0.0f : 1.0f;
        BatchedGemm dk_gemm{T, Hd, T, s.scale(), T, true, H * Hd, false, beta, KV * Hd, {}};
        BatchedGemm dv_gemm{T, Hd, T, 1.0f, T, true, H * Hd, false, beta, KV * Hd, {}};
        for (int b = 0; b < s.B; ++b)
            for (int g = 0; g < KV; ++g) {
                const int h = g * group + j;
                dk_gemm.slices.push_back({dS + s.att(b, h), q + s.q(b, h), dk + s.kv(b, h)});
                dv_gemm.slices.push_back({att + s.att(b, h), dout + s.q(b, h), dv + s.kv(b, h)});
            }
        plan.push_back(dk_gemm);
        plan.push_back(dv_gemm);
    }
    return plan;
}

}  // namespace bmoe::model
