// cuda_attention.cu -- CudaBackend: rotary embeddings and causal grouped-query attention.
//
// Attention = cuBLAS GEMMs batched over the (batch, head) slices (grouped_gemm: one batched call per
// GEMM kind) plus fused row kernels, the math of the CPU backend:
//   forward   S = scale Q K^T (full T x T per slice, into att), causal softmax in place (zeros
//             above the diagonal), out = P V
//   backward  dP = dout V^T (into a [B, H, T, T] scratch), dS = P (dP - rowsum(P dP)) in place
//             (zeros above the diagonal), dq = scale dS K, dk = scale sum_h dS_h^T Q_h and
//             dv = sum_h P_h^T dout_h over the query heads h of each kv head, accumulated head by
//             head in a fixed order (deterministic GQA sums, no atomics)
// The T x T scores are materialised (att is saved for backward anyway); the upper triangle's
// GEMM work is wasted. flash_attention.cu never stores att (AttentionKernel::kFlash, bf16 only).
// The GEMMs follow the matmul precision (bf16: bf16 operands, fp32 accumulation and output, as
// flash-attention kernels do; cuda_gemm.cu): q, k, v, dout and the saved P are rounded once per op,
// and the softmax kernels write P and dS rounded for the GEMMs that read them. The softmax, its
// backward and the stored P stay fp32. The CPU backend rounds the same operands, so the two agree
// in both precisions.
#include <cuda_runtime.h>

#include <cmath>
#include <vector>

#include "model/cuda/attention_plan.h"
#include "model/cuda/cuda_backend.h"
#include "model/cuda/cuda_common.cuh"
#include "model/cuda/op_profiler.h"
#include "parallel/cuda_check.h"

namespace bmoe::model {

using namespace cuda;

namespace {

constexpr int kAttThreads = 128;  // 4 warps per query row

// ---- rope -------------------------------------------------------------------------------------

// One thread per rotated pair (b, t, head, i < Hd/2). Angles in double, like the CPU's table.
__global__ void rope_kernel(float* x, size_t pairs, int T, int nh, int Hd, float theta, float sign) {
    const int half = Hd / 2;
    BMOE_GRID_STRIDE(p, pairs) {
        const int i = static_cast<int>(p % half);
        const size_t row = p / half;  // (b, t, head)
        const int t = static_cast<int>((row / nh) % T);
        const double angle = t * pow(static_cast<double>(theta), -2.0 * i / Hd);
        const float c = static_cast<float>(cos(angle)), s = sign * static_cast<float>(sin(angle));
        float* xh = x + row * Hd;
        const float a = xh[i], b = xh[i + half];
        xh[i] = a * c - b * s;
        xh[i + half] = b * c + a * s;
    }
}

// ---- attention --------------------------------------------------------------------------------

// One block per score row i of a slice: softmax over j <= i in place, zeros for j > i; with p16
// (bf16 matmul precision) also the row rounded to bf16, the P operand of out = P V.
__global__ void causal_softmax_kernel(float* att, int T, uint16_t* p16) {
    const int i = blockIdx.x % T;
    float* p = att + static_cast<size_t>(blockIdx.x) * T;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) mx = fmaxf(mx, p[j]);
    mx = block_max(mx);
    double sum = 0.0;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) sum += (p[j] = expf(p[j] - mx));
    const float inv = static_cast<float>(1.0 / block_sum(sum));
    uint16_t* r16 = p16 ? p16 + static_cast<size_t>(blockIdx.x) * T : nullptr;
    for (int j = threadIdx.x; j < T; j += blockDim.x) {
        const float v = j <= i ? p[j] * inv : 0.0f;
        p[j] = v;
        if (r16) r16[j] = bf16_bits_rne(v);
    }
}

// One block per row: ds holds dP on entry, dS = P (dP - rowsum(P dP)) on exit (zeros for j > i).
// With ds16 (bf16 matmul precision) dS goes to ds16 rounded to bf16 instead: only GEMMs read it.
__global__ void causal_softmax_backward_kernel(float* ds, const float* att, int T, uint16_t* ds16) {
    const int i = blockIdx.x % T;
    const float* p = att + static_cast<size_t>(blockIdx.x) * T;
    float* d = ds + static_cast<size_t>(blockIdx.x) * T;
    double dot = 0.0;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) dot += static_cast<double>(p[j]) * d[j];
    const float pdp = static_cast<float>(block_sum(dot));
    uint16_t* r16 = ds16 ? ds16 + static_cast<size_t>(blockIdx.x) * T : nullptr;
    for (int j = threadIdx.x; j < T; j += blockDim.x) {
        const float v = j <= i ? p[j] * (d[j] - pdp) : 0.0f;
        if (r16) {
            r16[j] = bf16_bits_rne(v);
        } else {
            d[j] = v;
        }
    }
}

AttnShape attn_shape(int B, int T, int H, int KV, int Hd) {
    BMOE_REQUIRE(KV > 0 && H % KV == 0, "attention: num_heads (", H, ") must be a multiple of num_kv_heads (", KV, ")");
    return {B, T, H, KV, Hd};
}

}  // namespace

void CudaBackend::rope_forward(float* x_BTHd, int B, int T, int nh, int Hd, float theta) {
    const ProfiledOp op(profiler_.get(), "rope_forward");
    BMOE_REQUIRE(Hd % 2 == 0, "rope: head_dim must be even, got ", Hd);
    const size_t pairs = static_cast<size_t>(B) * T * nh * (Hd / 2);
    if (pairs == 0) return;
    rope_kernel<<<grid_for(pairs), kThreads, 0, stream_>>>(x_BTHd, pairs, T, nh, Hd, theta, 1.0f);
    CUDA_CHECK_LAST();
}

void CudaBackend::rope_backward(float* dx_BTHd, int B, int T, int nh, int Hd, float theta) {
    const ProfiledOp op(profiler_.get(), "rope_backward");
    BMOE_REQUIRE(Hd % 2 == 0, "rope: head_dim must be even, got ", Hd);
    const size_t pairs = static_cast<size_t>(B) * T * nh * (Hd / 2);
    if (pairs == 0) return;
    rope_kernel<<<grid_for(pairs), kThreads, 0, stream_>>>(dx_BTHd, pairs, T, nh, Hd, theta, -1.0f);
    CUDA_CHECK_LAST();
}

void CudaBackend::attention_forward(float* out_BTHd,
                                    float* att_BHTT,
                                    const float* q_BTHd,
                                    const float* k_BTKVHd,
                                    const float* v_BTKVHd,
                                    int B,
                                    int T,
                                    int H,
                                    int KV,
                                    int Hd) {
    if (flash_attention_active(Hd))
        return flash_attention_forward(out_BTHd, att_BHTT, q_BTHd, k_BTKVHd, v_BTKVHd, B, T, H, KV, Hd);
    const ProfiledOp op(profiler_.get(), "attention_forward");
    const AttnShape s = attn_shape(B, T, H, KV, Hd);
    const size_t rows = static_cast<size_t>(B) * H * T;
    if (rows == 0 || Hd <= 0) return;
    const size_t nq = rows * Hd, nkv = static_cast<size_t>(B) * T * KV * Hd, natt = rows * T;
    const std::vector<BatchedGemm> plan = attention_forward_plan(s, out_BTHd, att_BHTT, q_BTHd, k_BTKVHd, v_BTKVHd);
    GemmInputs in = gemm_inputs({{q_BTHd, nq}, {k_BTKVHd, nkv}, {v_BTKVHd, nkv}});
    run_batched_gemm(plan[0], in);  // S = scale Q K^T
    uint16_t* p16 = in.bf16() ? bf16_slot(in.next_slot++, natt) : nullptr;
    causal_softmax_kernel<<<static_cast<unsigned>(rows), kAttThreads, 0, stream_>>>(att_BHTT, T, p16);
    CUDA_CHECK_LAST();
    if (p16) in.copies.push_back({att_BHTT, natt, p16});
    run_batched_gemm(plan[1], in);  // out = P V
}

void CudaBackend::attention_backward(float* dq_BTHd,
                                     float* dk_BTKVHd,
                                     float* dv_BTKVHd,
                                     const float* dout_BTHd,
                                     const float* out_BTHd,
                                     const float* q_BTHd,
                                     const float* k_BTKVHd,
                                     const float* v_BTKVHd,
                                     const float* att_BHTT,
                                     int B,
                                     int T,
                                     int H,
                                     int KV,
                                     int Hd) {
    if (flash_attention_active(Hd))
        return flash_attention_backward(dq_BTHd, dk_BTKVHd, dv_BTKVHd, dout_BTHd, out_BTHd, q_BTHd, k_BTKVHd, v_BTKVHd,
                                        att_BHTT, B, T, H, KV, Hd);
    const ProfiledOp op(profiler_.get(), "attention_backward");
    const AttnShape s = attn_shape(B, T, H, KV, Hd);
    const size_t rows = static_cast<size_t>(B) * H * T;
    if (rows == 0 || Hd <= 0) return;
    const size_t nq = rows * Hd, nkv = static_cast<size_t>(B) * T * KV * Hd, natt = rows * T;
    auto* dS = static_cast<float*>(scratch(attn_ws_, natt * sizeof(float)));  // [B, H, T, T]
    const std::vector<BatchedGemm> plan = attention_backward_plan(s, dq_BTHd, dk_BTKVHd, dv_BTKVHd, dS, dout_BTHd,
                                                                  q_BTHd, k_BTKVHd, v_BTKVHd, att_BHTT);
    GemmInputs in = gemm_inputs({{dout_BTHd, nq}, {q_BTHd, nq}, {k_BTKVHd, nkv}, {v_BTKVHd, nkv}, {att_BHTT, natt}});
    run_batched_gemm(plan[0], in);  // dP = dout V^T
    uint16_t* ds16 = in.bf16() ? bf16_slot(in.next_slot++, natt) : nullptr;
    causal_softmax_backward_kernel<<<static_cast<unsigned>(rows), kAttThreads, 0, stream_>>>(dS, att_BHTT, T, ds16);
    CUDA_CHECK_LAST();
    if (ds16) in.copies.push_back({dS, natt, ds16});
    for (size_t i = 1; i < plan.size(); ++i) run_batched_gemm(plan[i], in);  // dq, then dk/dv head by head
}

// The _bf16 ops: the flash kernel reads q, k, v and stores dq, dk, dv in bf16 directly; the gemm
// kernel runs on fp32 scratch (q, k, v widened; dq, dk, dv rounded after).
float* CudaBackend::widen_qkv(const uint16_t* q16, const uint16_t* k16, const uint16_t* v16, size_t nq, size_t nkv) {
    auto* q = static_cast<float*>(scratch(attn_qkv_ws_, 2 * (nq + 2 * nkv) * sizeof(float)));
    bf16_to_float(q, q16, nq);
    bf16_to_float(q + nq, k16, nkv);
    bf16_to_float(q + nq + nkv, v16, nkv);
    return q;
}

void CudaBackend::attention_forward_bf16(float* out_BTHd,
                                         float* att_BHTT,
                                         const uint16_t* q16_BTHd,
                                         const uint16_t* k16_BTKVHd,
                                         const uint16_t* v16_BTKVHd,
                                         int B,
                                         int T,
                                         int H,
                                         int KV,
                                         int Hd) {
    const ProfiledOp op(profiler_.get(), "attention_forward_bf16");
    require_bf16_precision("attention_forward_bf16");
    if (flash_attention_active(Hd))
        return flash_attention_forward(out_BTHd, att_BHTT, q16_BTHd, k16_BTKVHd, v16_BTKVHd, B, T, H, KV, Hd);
    const size_t nq = static_cast<size_t>(B) * T * H * Hd, nkv = static_cast<size_t>(B) * T * KV * Hd;
    const float* q = widen_qkv(q16_BTHd, k16_BTKVHd, v16_BTKVHd, nq, nkv);
    attention_forward(out_BTHd, att_BHTT, q, q + nq, q + nq + nkv, B, T, H, KV, Hd);
}

void CudaBackend::attention_backward_bf16(uint16_t* dq16_BTHd,
                                          uint16_t* dk16_BTKVHd,
                                          uint16_t* dv16_BTKVHd,
                                          const float* dout_BTHd,
                                          const float* out_BTHd,
                                          const uint16_t* q16_BTHd,
                                          const uint16_t* k16_BTKVHd,
                                          const uint16_t* v16_BTKVHd,
                                          const float* att_BHTT,
                                          int B,
                                          int T,
                                          int H,
                                          int KV,
                                          int Hd) {
    const ProfiledOp op(profiler_.get(), "attention_backward_bf16");
    require_bf16_precision("attention_backward_bf16");
    if (flash_attention_active(Hd))
        return flash_attention_backward(dq16_BTHd, dk16_BTKVHd, dv16_BTKVHd, dout_BTHd, out_BTHd, q16_BTHd, k16_BTKVHd,
                                        v16_BTKVHd, att_BHTT, B, T, H, KV, Hd);
    const size_t nq = static_cast<size_t>(B) * T * H * Hd, nkv = static_cast<size_t>(B) * T * KV * Hd;
    float* q = widen_qkv(q16_BTHd, k16_BTKVHd, v16_BTKVHd, nq, nkv);
    float *dq = q + nq + 2 * nkv, *dk = dq + nq, *dv = dk + nkv;  // the scratch's second half
    attention_backward(dq, dk, dv, dout_BTHd, out_BTHd, q, q + nq, q + nq + nkv, att_BHTT, B, T, H, KV, Hd);
    round_to_bf16(stream_, dq16_BTHd, dq, nq);
    round_to_bf16(stream_, dk16_BTKVHd, dk, nkv);
    round_to_bf16(stream_, dv16_BTKVHd, dv, nkv);
}

}  // namespace bmoe::model
