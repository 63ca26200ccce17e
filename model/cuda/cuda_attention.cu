// cuda_attention.cu -- CudaBackend: rotary embeddings and causal grouped-query attention.
//
// Straightforward kernels, O(B H T^2 Hd) work like the math, no atomics:
//   forward          one block per query row (b, h, i): scores -> att row, softmax, P v.
//   backward, pass 1 one block per query row: dP = dout v^T, dS = P (dP - rowsum(P dP)) into a
//                    [B, H, T, T] scratch, dq = scale dS k.
//   backward, pass 2 one block per key row (b, kv head, j): dk/dv sum over the query heads of the
//                    group and the query positions i >= j in a fixed order (deterministic GQA sums).
// A flash-style tiled kernel is the obvious next step once correctness is settled.
#include <cuda_runtime.h>

#include <cmath>

#include "model/cuda/cuda_backend.h"
#include "parallel/cuda_check.h"
#include "model/cuda/cuda_common.cuh"

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

struct AttnShape {
    int T, H, KV, Hd;
    float scale;
    // Element offsets of row t of query head h / of the kv head that h reads.
    __device__ size_t q(int b, int t, int h) const { return ((static_cast<size_t>(b) * T + t) * H + h) * Hd; }
    __device__ size_t kv(int b, int t, int h) const {
        return ((static_cast<size_t>(b) * T + t) * KV + h / (H / KV)) * Hd;
    }
};

// dst[j] = alpha * dot(a_shared, base[j-th row]) for j <= i, one warp per j.
__device__ void row_dots(float* dst, const float* a, const float* base, size_t row_stride, int i, int Hd, float alpha) {
    const int lane = threadIdx.x & 31;
    for (int j = threadIdx.x / 32; j <= i; j += blockDim.x / 32) {
        const float* r = base + j * row_stride;
        float acc = 0.0f;
        for (int d = lane; d < Hd; d += 32) acc += a[d] * r[d];
        acc = warp_sum(acc);
        if (lane == 0) dst[j] = alpha * acc;
    }
}

// out[d] = alpha * sum_{j <= i} w[j] * base[j-th row][d], threads over d.
__device__ void weighted_rows(
    float* out, const float* w, const float* base, size_t row_stride, int i, int Hd, float alpha) {
    for (int d = threadIdx.x; d < Hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j <= i; ++j) acc += w[j] * base[j * row_stride + d];
        out[d] = alpha * acc;
    }
}

__global__ void attention_forward_kernel(
    float* out, float* att, const float* q, const float* k, const float* v, AttnShape s) {
    extern __shared__ float q_s[];  // [Hd]
    const int i = blockIdx.x % s.T, h = (blockIdx.x / s.T) % s.H, b = blockIdx.x / (s.T * s.H);
    float* p = att + static_cast<size_t>(blockIdx.x) * s.T;  // att row (b, h, i)
    for (int d = threadIdx.x; d < s.Hd; d += blockDim.x) q_s[d] = q[s.q(b, i, h) + d];
    __syncthreads();
    const size_t kv_stride = static_cast<size_t>(s.KV) * s.Hd;
    row_dots(p, q_s, k + s.kv(b, 0, h), kv_stride, i, s.Hd, s.scale);
    __syncthreads();  // also makes the global p[] writes visible block-wide
    float mx = -INFINITY;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) mx = fmaxf(mx, p[j]);
    mx = block_max(mx);
    double sum = 0.0;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) sum += (p[j] = expf(p[j] - mx));
    const float inv = static_cast<float>(1.0 / block_sum(sum));
    for (int j = threadIdx.x; j < s.T; j += blockDim.x) p[j] = j <= i ? p[j] * inv : 0.0f;
    __syncthreads();
    weighted_rows(out + s.q(b, i, h), p, v + s.kv(b, 0, h), kv_stride, i, s.Hd, 1.0f);
}

// Pass 1 (per query row): dS row into ds, dq row.
__global__ void attention_backward_q_kernel(
    float* dq, float* dS, const float* dout, const float* k, const float* v, const float* att, AttnShape s) {
    extern __shared__ float do_s[];  // [Hd]
    const int i = blockIdx.x % s.T, h = (blockIdx.x / s.T) % s.H, b = blockIdx.x / (s.T * s.H);
    const float* p = att + static_cast<size_t>(blockIdx.x) * s.T;
    float* ds = dS + static_cast<size_t>(blockIdx.x) * s.T;
    for (int d = threadIdx.x; d < s.Hd; d += blockDim.x) do_s[d] = dout[s.q(b, i, h) + d];
    __syncthreads();
    const size_t kv_stride = static_cast<size_t>(s.KV) * s.Hd;
    row_dots(ds, do_s, v + s.kv(b, 0, h), kv_stride, i, s.Hd, 1.0f);  // dP
    __syncthreads();
    double dot = 0.0;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) dot += static_cast<double>(p[j]) * ds[j];
    const float pdp = static_cast<float>(block_sum(dot));
    for (int j = threadIdx.x; j <= i; j += blockDim.x) ds[j] = p[j] * (ds[j] - pdp);
    __syncthreads();
    weighted_rows(dq + s.q(b, i, h), ds, k + s.kv(b, 0, h), kv_stride, i, s.Hd, s.scale);
}

// Pass 2 (per key row j of kv head g): dk = scale sum_h sum_{i>=j} dS_h[i, j] q_h[i],
// dv = sum_h sum_{i>=j} P_h[i, j] dout_h[i]; threads over d, fixed (h, i) order.
__global__ void attention_backward_kv_kernel(
    float* dk, float* dv, const float* dS, const float* att, const float* q, const float* dout, AttnShape s) {
    const int j = blockIdx.x % s.T, g = (blockIdx.x / s.T) % s.KV, b = blockIdx.x / (s.T * s.KV);
    const int group = s.H / s.KV;
    const size_t q_stride = static_cast<size_t>(s.H) * s.Hd;
    for (int d = threadIdx.x; d < s.Hd; d += blockDim.x) {
        float dk_acc = 0.0f, dv_acc = 0.0f;
        for (int h = g * group; h < (g + 1) * group; ++h) {
            const size_t col = (static_cast<size_t>(b) * s.H + h) * s.T * s.T + j;  // (b, h, i = 0, j)
            const size_t qi = s.q(b, 0, h) + d;
            for (int i = j; i < s.T; ++i) {
                const size_t at = col + static_cast<size_t>(i) * s.T;
                dk_acc += dS[at] * q[qi + i * q_stride];
                dv_acc += att[at] * dout[qi + i * q_stride];
            }
        }
        const size_t o = s.kv(b, j, g * group) + d;
        dk[o] = s.scale * dk_acc;
        dv[o] = dv_acc;
    }
}

AttnShape attn_shape(int T, int H, int KV, int Hd) {
    BMOE_REQUIRE(KV > 0 && H % KV == 0, "attention: num_heads (", H, ") must be a multiple of num_kv_heads (", KV, ")");
    return {T, H, KV, Hd, static_cast<float>(1.0 / std::sqrt(static_cast<double>(Hd)))};
}

}  // namespace

void CudaBackend::rope_forward(float* x_BTHd, int B, int T, int nh, int Hd, float theta) {
    BMOE_REQUIRE(Hd % 2 == 0, "rope: head_dim must be even, got ", Hd);
    const size_t pairs = static_cast<size_t>(B) * T * nh * (Hd / 2);
    if (pairs == 0) return;
    rope_kernel<<<grid_for(pairs), kThreads, 0, stream_>>>(x_BTHd, pairs, T, nh, Hd, theta, 1.0f);
    CUDA_CHECK_LAST();
}

void CudaBackend::rope_backward(float* dx_BTHd, int B, int T, int nh, int Hd, float theta) {
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
    const AttnShape s = attn_shape(T, H, KV, Hd);
    const size_t rows = static_cast<size_t>(B) * H * T;
    if (rows == 0 || Hd <= 0) return;
    attention_forward_kernel<<<static_cast<unsigned>(rows), kAttThreads, Hd * sizeof(float), stream_>>>(
        out_BTHd, att_BHTT, q_BTHd, k_BTKVHd, v_BTKVHd, s);
    CUDA_CHECK_LAST();
}

void CudaBackend::attention_backward(float* dq_BTHd,
                                     float* dk_BTKVHd,
                                     float* dv_BTKVHd,
                                     const float* dout_BTHd,
                                     const float* q_BTHd,
                                     const float* k_BTKVHd,
                                     const float* v_BTKVHd,
                                     const float* att_BHTT,
                                     int B,
                                     int T,
                                     int H,
                                     int KV,
                                     int Hd) {
    const AttnShape s = attn_shape(T, H, KV, Hd);
    const size_t q_rows = static_cast<size_t>(B) * H * T, kv_rows = static_cast<size_t>(B) * KV * T;
    if (q_rows == 0 || Hd <= 0) return;
    // dS lives in a reused scratch of the att size (only the causal part is written and read).
    auto* dS = static_cast<float*>(scratch(attn_ws_, q_rows * T * sizeof(float)));
    attention_backward_q_kernel<<<static_cast<unsigned>(q_rows), kAttThreads, Hd * sizeof(float), stream_>>>(
        dq_BTHd, dS, dout_BTHd, k_BTKVHd, v_BTKVHd, att_BHTT, s);
    CUDA_CHECK_LAST();
    const int kv_threads = std::min(kAttThreads, (Hd + 31) / 32 * 32);
    attention_backward_kv_kernel<<<static_cast<unsigned>(kv_rows), kv_threads, 0, stream_>>>(
        dk_BTKVHd, dv_BTKVHd, dS, att_BHTT, q_BTHd, dout_BTHd, s);
    CUDA_CHECK_LAST();
}

}  // namespace bmoe::model
