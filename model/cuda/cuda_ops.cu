// cuda_ops.cu -- CudaBackend: embeddings, norms, activations, loss, router top-k, MoE permutation.
// Simple kernels that mirror cpu_backend.cpp's arithmetic (same double accumulators, same order of
// float operations where cheap), so parity holds well inside 1e-4. No atomics anywhere.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "model/cuda/cuda_backend.h"
#include "model/cuda/cuda_common.cuh"
#include "model/cuda/op_profiler.h"
#include "model/routing_plan.h"
#include "parallel/cuda_check.h"

namespace bmoe::model {

using namespace cuda;

namespace {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2/pi)

// ---- embeddings kernels ---------------------------------------------------------------------

__global__ void embedding_forward_kernel(
    float* out_ND, const int32_t* tokens_N, const float* table_VD, size_t n, int D) {
    BMOE_GRID_STRIDE(i, n) out_ND[i] = table_VD[static_cast<size_t>(tokens_N[i / D]) * D + i % D];
}

// Block (u, column tile): vocab row ids[u] sums its token positions pos[ptr[u] .. ptr[u+1]) in
// token order, exactly the CPU's order, so the result is also bitwise independent of scheduling.
__global__ void embedding_backward_kernel(
    float* dtable_VD, const float* dout_ND, const int32_t* ids, const int32_t* ptr, const int32_t* pos, int D) {
    const int d = blockIdx.y * blockDim.x + threadIdx.x;
    if (d >= D) return;
    const int u = blockIdx.x;
    float* dst = dtable_VD + static_cast<size_t>(ids[u]) * D + d;
    float acc = *dst;
    for (int p = ptr[u]; p < ptr[u + 1]; ++p) acc += dout_ND[static_cast<size_t>(pos[p]) * D + d];
    *dst = acc;
}

__global__ void position_forward_kernel(float* x_BTD, const float* wpe_SD, size_t n, size_t TD) {
    BMOE_GRID_STRIDE(i, n) x_BTD[i] += wpe_SD[i % TD];
}

// One thread per (t, d): sums the batch in order b = 0..B-1, like the CPU.
__global__ void position_backward_kernel(float* dwpe_SD, const float* dx_BTD, int B, size_t TD) {
    BMOE_GRID_STRIDE(i, TD) {
        float acc = dwpe_SD[i];
        for (int b = 0; b < B; ++b) acc += dx_BTD[b * TD + i];
        dwpe_SD[i] = acc;
    }
}

// Host CSR of token positions per used vocab id (stable counting sort): [ids U | ptr U+1 | pos N].
std::vector<int32_t> token_csr(const std::vector<int32_t>& tokens, int& used) {
    int32_t vmax = -1;
    for (int32_t t : tokens) {
        BMOE_REQUIRE(t >= 0, "embedding_backward: negative token id ", t, " in the batch");
        vmax = std::max(vmax, t);
    }
    std::vector<int32_t> count(static_cast<size_t>(vmax) + 2, 0);
    for (int32_t t : tokens) ++count[t + 1];
    used = 0;
    for (int32_t v = 0; v <= vmax; ++v) used += count[v + 1] > 0;
    const size_t N = tokens.size();
    std::vector<int32_t> csr(static_cast<size_t>(used) * 2 + 1 + N);
    int32_t *ids = csr.data(), *ptr = ids + used, *pos = ptr + used + 1;
    for (int32_t v = 0, u = 0; v <= vmax; ++v) {
        if (count[v + 1] > 0) ids[u++] = v;
        count[v + 1] += count[v];  // now count[v] = first slot of v
    }
    for (int u = 0; u <= used; ++u) ptr[u] = u < used ? count[ids[u]] : static_cast<int32_t>(N);
    for (size_t n = 0; n < N; ++n) pos[count[tokens[n]]++] = static_cast<int32_t>(n);
    return csr;
}

// ---- norm kernels: one block per row ----------------------------------------------------------

template <typename Out>
__global__ void rmsnorm_forward_kernel(
    Out* out_ND, float* rstd_N, const float* in_ND, const float* w_D, int D, float eps) {
    const size_t row = static_cast<size_t>(blockIdx.x) * D;
    const float* x = in_ND + row;
    double ss = 0.0;
    for (int d = threadIdx.x; d < D; d += blockDim.x) ss += static_cast<double>(x[d]) * x[d];
    ss = block_sum(ss);
    const float rstd = static_cast<float>(1.0 / sqrt(ss / D + eps));
    for (int d = threadIdx.x; d < D; d += blockDim.x) store_as(out_ND + row + d, x[d] * rstd * w_D[d]);
    if (threadIdx.x == 0) rstd_N[blockIdx.x] = rstd;
}

// dx += r w dy - x r^3 / D * sum(dy w x)
__global__ void rmsnorm_backward_kernel(
    float* din_ND, const float* dout_ND, const float* in_ND, const float* w_D, const float* rstd_N, int D) {
    const size_t row = static_cast<size_t>(blockIdx.x) * D;
    const float *x = in_ND + row, *dy = dout_ND + row;
    const float r = rstd_N[blockIdx.x];
    double dot = 0.0;
    for (int d = threadIdx.x; d < D; d += blockDim.x) dot += static_cast<double>(dy[d]) * w_D[d] * x[d];
    dot = block_sum(dot);
    const float c = static_cast<float>(dot * r * r * r / D);
    for (int d = threadIdx.x; d < D; d += blockDim.x) din_ND[row + d] += r * w_D[d] * dy[d] - x[d] * c;
}

// The norms' backward in one pass over dout and the input (instead of the row kernel above plus
// a column reduction per weight gradient, which read them again): din += ... per row (LayerNorm
// where mean_N is given, RMSNorm where it is null), and this block's column sums of dw (dy * xhat)
// and db (dy; LayerNorm) over its chunk of rows. Each warp takes its rows in order into its own
// shared-memory partials (no atomics), the block sums its warps in order into ws[block][d]
// (double), and column_reduce_finish_kernel adds the blocks in order: bitwise reproducible.
__global__ void norm_backward_fused_kernel(float* din_ND,
                                           double* ws_dw_SD,
                                           double* ws_db_SD,
                                           const float* dout_ND,
                                           const float* in_ND,
                                           const float* w_D,
                                           const float* mean_N,
                                           const float* rstd_N,
                                           int N,
                                           int D,
                                           int chunk) {
    extern __shared__ float partials[];  // [warps][2][D]: dw, db
    const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* pw = partials + static_cast<size_t>(warp) * 2 * D;
    float* pb = pw + D;
    for (int d = lane; d < D; d += 32) pw[d] = pb[d] = 0.0f;
    const int n0 = blockIdx.x * chunk, n1 = min(N, n0 + chunk);
    for (int n = n0 + warp; n < n1; n += warps) {
        const size_t row = static_cast<size_t>(n) * D;
        const float *x = in_ND + row, *dy = dout_ND + row;
        const float m = mean_N ? mean_N[n] : 0.0f, r = rstd_N[n];
        double g_sum = 0.0, gx_sum = 0.0;  // sum(dy w), sum(dy w (x - m))
        for (int d = lane; d < D; d += 32) {
            const float g = dy[d] * w_D[d];
            g_sum += g;
            gx_sum += static_cast<double>(g) * (x[d] - m);
        }
        g_sum = warp_sum(g_sum);
        gx_sum = warp_sum(gx_sum);
        if (mean_N) {  // dx += r (g - mean(g) - xhat mean(g xhat)),  g = dy w
            const float gm = static_cast<float>(g_sum / D), gxm = static_cast<float>(gx_sum * r / D);
            for (int d = lane; d < D; d += 32) din_ND[row + d] += r * (dy[d] * w_D[d] - gm - (x[d] - m) * r * gxm);
        } else {  // dx += r w dy - x r^3 / D * sum(dy w x)
            const float c = static_cast<float>(gx_sum * r * r * r / D);
            for (int d = lane; d < D; d += 32) din_ND[row + d] += r * w_D[d] * dy[d] - x[d] * c;
        }
        for (int d = lane; d < D; d += 32) {
            pw[d] += dy[d] * (x[d] - m) * r;
            pb[d] += dy[d];
        }
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        double sw = 0.0, sb = 0.0;
        for (int k = 0; k < warps; ++k) {
            sw += partials[static_cast<size_t>(k) * 2 * D + d];
            sb += partials[static_cast<size_t>(k) * 2 * D + D + d];
        }
        if (ws_dw_SD) ws_dw_SD[static_cast<size_t>(blockIdx.x) * D + d] = sw;
        if (ws_db_SD) ws_db_SD[static_cast<size_t>(blockIdx.x) * D + d] = sb;
    }
}

struct RmsDw {
    const float *dy, *x, *rstd;
    int D;
    __device__ float operator()(int n, int d) const {
        const size_t i = static_cast<size_t>(n) * D + d;
        return dy[i] * x[i] * rstd[n];
    }
};

template <typename Out>
__global__ void layernorm_forward_kernel(Out* out_ND,
                                         float* mean_N,
                                         float* rstd_N,
                                         const float* in_ND,
                                         const float* w_D,
                                         const float* b_D,
                                         int D,
                                         float eps) {
    const size_t row = static_cast<size_t>(blockIdx.x) * D;
    const float* x = in_ND + row;
    double sum = 0.0;
    for (int d = threadIdx.x; d < D; d += blockDim.x) sum += x[d];
    const double mean = block_sum(sum) / D;
    double var = 0.0;
    for (int d = threadIdx.x; d < D; d += blockDim.x) var += (x[d] - mean) * (x[d] - mean);
    var = block_sum(var);
    const float m = static_cast<float>(mean), rstd = static_cast<float>(1.0 / sqrt(var / D + eps));
    for (int d = threadIdx.x; d < D; d += blockDim.x) store_as(out_ND + row + d, (x[d] - m) * rstd * w_D[d] + b_D[d]);
    if (threadIdx.x == 0) {
        mean_N[blockIdx.x] = m;
        rstd_N[blockIdx.x] = rstd;
    }
}

// xhat = (x - mean) r;  dx += r (g - mean(g) - xhat mean(g xhat)),  g = dy w
__global__ void layernorm_backward_kernel(float* din_ND,
                                          const float* dout_ND,
                                          const float* in_ND,
                                          const float* w_D,
                                          const float* mean_N,
                                          const float* rstd_N,
                                          int D) {
    const size_t row = static_cast<size_t>(blockIdx.x) * D;
    const float *x = in_ND + row, *dy = dout_ND + row;
    const float m = mean_N[blockIdx.x], r = rstd_N[blockIdx.x];
    double g_sum = 0.0, gx_sum = 0.0;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float g = dy[d] * w_D[d];
        g_sum += g;
        gx_sum += static_cast<double>(g) * (x[d] - m) * r;
    }
    const float gm = static_cast<float>(block_sum(g_sum) / D), gxm = static_cast<float>(block_sum(gx_sum) / D);
    for (int d = threadIdx.x; d < D; d += blockDim.x)
        din_ND[row + d] += r * (dy[d] * w_D[d] - gm - (x[d] - m) * r * gxm);
}

struct LnDw {
    const float *dy, *x, *mean, *rstd;
    int D;
    __device__ float operator()(int n, int d) const {
        const size_t i = static_cast<size_t>(n) * D + d;
        return dy[i] * (x[i] - mean[n]) * rstd[n];
    }
};

// ---- activation kernels -------------------------------------------------------------------------

// Activations and their gradients read and write fp32, or bf16 (the expert MLP's [R, F] tensors
// under bf16 precision; written nearest-even), with fp32 math in between.
__device__ inline float load_activation(const float* in, size_t i) { return in[i]; }
__device__ inline float load_activation(const uint16_t* in, size_t i) { return bf16_value(in[i]); }
__device__ inline void store_activation(float* out, size_t i, float v) { out[i] = v; }
__device__ inline void store_activation(uint16_t* out, size_t i, float v) { out[i] = bf16_bits_rne(v); }

template <typename T>
__global__ void swiglu_forward_kernel(T* out, const T* gate, const T* up, size_t n) {
    BMOE_GRID_STRIDE(i, n) {
        const float g = load_activation(gate, i);
        store_activation(out, i, g / (1.0f + expf(-g)) * load_activation(up, i));
    }
}

template <typename T>
__global__ void swiglu_backward_kernel(T* dgate, T* dup, const T* dout, const T* gate, const T* up, size_t n) {
    BMOE_GRID_STRIDE(i, n) {
        const float g = load_activation(gate, i), u = load_activation(up, i), s = 1.0f / (1.0f + expf(-g));
        const float dy = load_activation(dout, i);  // read before writing: dgate/dup may alias dout
        store_activation(dgate, i, dy * u * s * (1.0f + g * (1.0f - s)));  // d silu/dg = s (1 + g (1 - s))
        store_activation(dup, i, dy * g * s);
    }
}

template <typename T>
__global__ void gelu_forward_kernel(T* out, const T* in, size_t n) {
    BMOE_GRID_STRIDE(i, n) {
        const float x = load_activation(in, i);
        store_activation(out, i, 0.5f * x * (1.0f + tanhf(kGeluC * (x + 0.044715f * x * x * x))));
    }
}

template <typename T>
__global__ void gelu_backward_kernel(T* din, const T* dout, const T* in, size_t n) {
    BMOE_GRID_STRIDE(i, n) {
        const float x = load_activation(in, i), th = tanhf(kGeluC * (x + 0.044715f * x * x * x));
        const float grad =
            0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * kGeluC * (1.0f + 3.0f * 0.044715f * x * x);
        store_activation(din, i, grad * load_activation(dout, i));
    }
}

// ---- loss kernels ---------------------------------------------------------------------------------

// A thread's running max and sum of exp(x - max) over its share of a row (online softmax), then
// combined over the block: one read of the row finds its max and sum.
struct OnlineSoftmax {
    float m = -INFINITY;
    double sum = 0.0;
    __device__ void add(float x) {
        if (x == -INFINITY) return;  // contributes 0 (and -inf - -inf would be NaN)
        if (x > m) {
            sum *= exp(static_cast<double>(m) - x);
            m = x;
        }
        sum += expf(x - m);
    }
    // Block-wide: every thread gets the row max, and the sum rescaled to it. Call from all threads.
    __device__ void reduce_block(float* mx, double* total) const {
        *mx = block_max(m);
        *total = block_sum(m == -INFINITY ? 0.0 : sum * exp(static_cast<double>(m) - *mx));
    }
};

// One block per row: probs = softmax(logits) (float exp, double sum), loss = lse - logit[target].
// Two passes over the row instead of three: an online max/sum, then probs written in one sweep.
// Rows move as float4 where row_quads allows (the padded vocabularies), else one float at a time.
__global__ void cross_entropy_forward_kernel(
    float* loss_N, float* probs_NV, const float* logits_NV, const int32_t* targets_N, int V, int quads) {
    const size_t row = static_cast<size_t>(blockIdx.x) * V;
    const float* x = logits_NV + row;
    float* p = probs_NV + row;
    const int32_t t = targets_N[blockIdx.x];
    // Read before the first barrier (inside block_max): probs may overwrite the logits in place.
    const float target_logit = t < 0 ? 0.0f : x[t];
    OnlineSoftmax acc;
    for (int q = threadIdx.x; q < quads; q += blockDim.x) {
        const float4 v = reinterpret_cast<const float4*>(x)[q];
        acc.add(v.x), acc.add(v.y), acc.add(v.z), acc.add(v.w);
    }
    for (int v = 4 * quads + threadIdx.x; v < V; v += blockDim.x) acc.add(x[v]);
    float mx;
    double sum;
    acc.reduce_block(&mx, &sum);
    const float inv = static_cast<float>(1.0 / sum);
    for (int q = threadIdx.x; q < quads; q += blockDim.x) {
        const float4 v = reinterpret_cast<const float4*>(x)[q];
        reinterpret_cast<float4*>(p)[q] =
            make_float4(expf(v.x - mx) * inv, expf(v.y - mx) * inv, expf(v.z - mx) * inv, expf(v.w - mx) * inv);
    }
    for (int v = 4 * quads + threadIdx.x; v < V; v += blockDim.x) p[v] = expf(x[v] - mx) * inv;
    if (threadIdx.x == 0) {
        const double lse = static_cast<double>(mx) + log(sum);
        loss_N[blockIdx.x] = t < 0 ? 0.0f : static_cast<float>(lse - target_logit);
    }
}

// One block per row, one read of the bf16 row: lse and loss. Rows move as 8 bytes where row_quads
// allows.
__global__ void cross_entropy_forward_bf16_kernel(
    float* loss_N, float* lse_N, const uint16_t* logits16_NV, const int32_t* targets_N, int V, int quads) {
    const uint16_t* x = logits16_NV + static_cast<size_t>(blockIdx.x) * V;
    OnlineSoftmax acc;
    for (int q = threadIdx.x; q < quads; q += blockDim.x) {
        const uint2 v = reinterpret_cast<const uint2*>(x)[q];
        acc.add(__uint_as_float(v.x << 16)), acc.add(__uint_as_float(v.x & 0xffff0000u));
        acc.add(__uint_as_float(v.y << 16)), acc.add(__uint_as_float(v.y & 0xffff0000u));
    }
    for (int v = 4 * quads + threadIdx.x; v < V; v += blockDim.x) acc.add(bf16_value(x[v]));
    float mx;
    double sum;
    acc.reduce_block(&mx, &sum);
    if (threadIdx.x == 0) {
        const int32_t t = targets_N[blockIdx.x];
        const double lse = static_cast<double>(mx) + log(sum);
        lse_N[blockIdx.x] = static_cast<float>(lse);
        loss_N[blockIdx.x] = t < 0 ? 0.0f : static_cast<float>(lse - bf16_value(x[t]));
    }
}

// One block per row (no per-element division to find the row): d = dloss (p - onehot(target)),
// zeros for an ignored target (t < 0). In place (d == p) is allowed.
__global__ void cross_entropy_backward_kernel(
    float* dlogits_NV, const float* probs_NV, const int32_t* targets_N, float dloss, int V, int quads) {
    const size_t row = static_cast<size_t>(blockIdx.x) * V;
    const float* p = probs_NV + row;
    float* d = dlogits_NV + row;
    const int32_t t = targets_N[blockIdx.x];
    const float p_target = t >= 0 ? p[t] : 0.0f;
    __syncthreads();  // every thread has read p[t] before any thread overwrites it (in place)
    auto grad = [&](float pv) { return t < 0 ? 0.0f : dloss * pv; };
    for (int q = threadIdx.x; q < quads; q += blockDim.x) {
        const float4 v = reinterpret_cast<const float4*>(p)[q];
        reinterpret_cast<float4*>(d)[q] = make_float4(grad(v.x), grad(v.y), grad(v.z), grad(v.w));
    }
    for (int v = 4 * quads + threadIdx.x; v < V; v += blockDim.x) d[v] = grad(p[v]);
    __syncthreads();
    if (threadIdx.x == 0 && t >= 0) d[t] = dloss * p_target - dloss;
}

// d = bf16(dloss (exp(logit - lse) - onehot(target))), zeros for an ignored target; elementwise
// from the saved lse, so in place (d == logits) is safe without a barrier. One block per row.
__global__ void cross_entropy_backward_bf16_kernel(uint16_t* dlogits16_NV,
                                                   const uint16_t* logits16_NV,
                                                   const float* lse_N,
                                                   const int32_t* targets_N,
                                                   float dloss,
                                                   int V,
                                                   int quads) {
    const size_t row = static_cast<size_t>(blockIdx.x) * V;
    const uint16_t* x = logits16_NV + row;
    uint16_t* d = dlogits16_NV + row;
    const int32_t t = targets_N[blockIdx.x];
    const float lse = lse_N[blockIdx.x];
    auto grad = [&](uint32_t bits, int v) -> uint32_t {
        if (t < 0) return 0u;
        const float p = expf(__uint_as_float(bits) - lse);
        return bf16_bits_rne(dloss * (v == t ? p - 1.0f : p));
    };
    for (int q = threadIdx.x; q < quads; q += blockDim.x) {
        const uint2 in = reinterpret_cast<const uint2*>(x)[q];
        const int v = 4 * q;
        reinterpret_cast<uint2*>(d)[q] = make_uint2(grad(in.x << 16, v) | (grad(in.x & 0xffff0000u, v + 1) << 16),
                                                    grad(in.y << 16, v + 2) | (grad(in.y & 0xffff0000u, v + 3) << 16));
    }
    for (int v = 4 * quads + threadIdx.x; v < V; v += blockDim.x)
        d[v] = static_cast<uint16_t>(grad(static_cast<uint32_t>(x[v]) << 16, v));
}

// ---- router kernels: one thread per token (E and K are small) ------------------------------------

struct RouterDims {
    int N, E, K;
    bool renormalize;
};

__global__ void router_topk_forward_kernel(
    float* probs_NE, float* lse_N, int32_t* topk_idx_NK, float* topk_weight_NK, const float* logits_NE, RouterDims r) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= r.N) return;
    const float* x = logits_NE + static_cast<size_t>(n) * r.E;
    float* p = probs_NE + static_cast<size_t>(n) * r.E;
    float mx = x[0];
    for (int e = 1; e < r.E; ++e) mx = fmaxf(mx, x[e]);
    double sum = 0.0;
    for (int e = 0; e < r.E; ++e) sum += (p[e] = expf(x[e] - mx));
    const float inv = static_cast<float>(1.0 / sum);
    for (int e = 0; e < r.E; ++e) p[e] *= inv;
    lse_N[n] = static_cast<float>(static_cast<double>(mx) + log(sum));
    int32_t* idx = topk_idx_NK + static_cast<size_t>(n) * r.K;
    float* w = topk_weight_NK + static_cast<size_t>(n) * r.K;
    double wsum = 0.0;
    for (int k = 0; k < r.K; ++k) {  // selection: strict '>' keeps the lower index on ties
        int best = -1;
        for (int e = 0; e < r.E; ++e) {
            bool taken = false;
            for (int j = 0; j < k; ++j) taken |= idx[j] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        idx[k] = best;
        w[k] = p[best];
        wsum += p[best];
    }
    if (r.renormalize) {
        for (int k = 0; k < r.K; ++k) w[k] = static_cast<float>(w[k] / wsum);
    }
}

struct RouterGrads {
    const float *dtopk_weight_NK, *probs_NE, *lse_N, *topk_weight_NK, *aux_dprobs_E;
    const int32_t* topk_idx_NK;
    float zloss_coef;
};

// dprobs from the gates (+ aux), then the softmax Jacobian plus the z-loss term, in place.
__global__ void router_topk_backward_kernel(float* dlogits_NE, RouterGrads a, RouterDims r) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= r.N) return;
    const float* p = a.probs_NE + static_cast<size_t>(n) * r.E;
    const int32_t* idx = a.topk_idx_NK + static_cast<size_t>(n) * r.K;
    const float *dg = a.dtopk_weight_NK + static_cast<size_t>(n) * r.K,
                *g = a.topk_weight_NK + static_cast<size_t>(n) * r.K;
    float* dp = dlogits_NE + static_cast<size_t>(n) * r.E;
    for (int e = 0; e < r.E; ++e) dp[e] = a.aux_dprobs_E ? a.aux_dprobs_E[e] : 0.0f;
    if (r.renormalize) {  // g_k = p_k / S:  dp_k += dg_k / S - sum_j dg_j g_j / S
        double S = 0.0, dgg = 0.0;
        for (int k = 0; k < r.K; ++k) {
            S += p[idx[k]];
            dgg += static_cast<double>(dg[k]) * g[k];
        }
        for (int k = 0; k < r.K; ++k) dp[idx[k]] += static_cast<float>((dg[k] - dgg) / S);
    } else {
        for (int k = 0; k < r.K; ++k) dp[idx[k]] += dg[k];
    }
    double pdp = 0.0;
    for (int e = 0; e < r.E; ++e) pdp += static_cast<double>(p[e]) * dp[e];
    const float z = 2.0f * a.zloss_coef * a.lse_N[n];  // d(c lse^2)/dlogit_e = 2 c lse p_e
    for (int e = 0; e < r.E; ++e) dp[e] = p[e] * (dp[e] - static_cast<float>(pdp) + z);
}

__global__ void router_rows_kernel(RouterStage stage, RouterRows rows) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n < rows.N) router_row(stage, rows, n);
}

// ---- MoE permutation kernels: one thread per output element ---------------------------------------

template <typename Out>
__global__ void moe_gather_forward_kernel(
    Out* x_RD, const float* x_ND, const int32_t* row_src_R, size_t n, int K, int D) {
    BMOE_GRID_STRIDE(i, n) store_as(x_RD + i, x_ND[static_cast<size_t>(row_src_R[i / D] / K) * D + i % D]);
}

// Word: uint32_t (two bf16 values) for even D, uint16_t otherwise; W = words per row
template <typename Word>
__global__ void gather_rows_kernel(Word* out_LW, const Word* in_RW, const int32_t* src_L, size_t n, int W) {
    BMOE_GRID_STRIDE(i, n) out_LW[i] = in_RW[static_cast<size_t>(src_L[i / W]) * W + i % W];
}

// ---- routing plan: a stable counting sort of the N*K copies by expert ---------------------------
// Tiles of kPlanTile copies, one block each. A copy's place among its expert's copies is the count
// of earlier ones: in earlier tiles (the scan's tile base), earlier warps of its tile (per-warp
// histograms in shared memory) and earlier lanes of its warp (__match_any_sync): the order of
// plan_routing, with no atomics.
constexpr int kPlanTile = 256, kPlanWarps = kPlanTile / 32;

// warp_hist[w * E + e] = copies of expert e in warp w of this block's tile; returns this thread's
// expert (E for lanes past the end) and sets rank to its place among its warp's copies of it.
__device__ int plan_tile_histogram(int32_t* warp_hist, const int32_t* idx, int NK, int E, int& rank) {
    for (int j = threadIdx.x; j < kPlanWarps * E; j += blockDim.x) warp_hist[j] = 0;
    __syncthreads();
    const int i = blockIdx.x * kPlanTile + threadIdx.x, lane = threadIdx.x & 31;
    int e = i < NK ? idx[i] : E;
    if (e < 0 || e > E) e = E;  // out of range: not placed (the router writes [0, E))
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    rank = __popc(peers & ((1u << lane) - 1u));
    if (e < E && rank == 0) warp_hist[(threadIdx.x >> 5) * E + e] = __popc(peers);
    __syncthreads();
    return e;
}

__global__ void plan_count_kernel(int32_t* tile_counts_TE, const int32_t* idx, int NK, int E) {
    extern __shared__ int32_t warp_hist[];
    int rank;
    plan_tile_histogram(warp_hist, idx, NK, E, rank);
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int32_t n = 0;
        for (int w = 0; w < kPlanWarps; ++w) n += warp_hist[w * E + e];
        tile_counts_TE[static_cast<size_t>(blockIdx.x) * E + e] = n;
    }
}

// One block: tile_base[t][e] = copies of e in tiles before t; counts_E; offsets_kept = [offset[E], kept[E]].
__global__ void plan_scan_kernel(int32_t* tile_base_TE,
                                 int32_t* counts_E,
                                 int32_t* offsets_kept,
                                 const int32_t* tile_counts_TE,
                                 int T,
                                 int E,
                                 int capacity) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int32_t running = 0;
        for (int t = 0; t < T; ++t) {
            tile_base_TE[static_cast<size_t>(t) * E + e] = running;
            running += tile_counts_TE[static_cast<size_t>(t) * E + e];
        }
        counts_E[e] = running;
        offsets_kept[E + e] = capacity < 0 ? running : min(running, capacity);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int32_t next = 0;
        for (int e = 0; e < E; ++e) {
            offsets_kept[e] = next;
            next += offsets_kept[E + e];
        }
    }
}

__global__ void plan_scatter_kernel(int32_t* row_src_R,
                                    int32_t* slot_row_NK,
                                    const int32_t* idx,
                                    const int32_t* tile_base_TE,
                                    const int32_t* offsets_kept,
                                    int NK,
                                    int E) {
    extern __shared__ int32_t warp_hist[];
    int rank;
    const int e = plan_tile_histogram(warp_hist, idx, NK, E, rank);
    const int i = blockIdx.x * kPlanTile + threadIdx.x;
    if (i >= NK) return;
    if (e == E) {
        slot_row_NK[i] = -1;
        return;
    }
    int32_t pos = tile_base_TE[static_cast<size_t>(blockIdx.x) * E + e] + rank;
    for (int w = 0; w < (threadIdx.x >> 5); ++w) pos += warp_hist[w * E + e];
    const int32_t row = pos < offsets_kept[E + e] ? offsets_kept[e] + pos : -1;
    slot_row_NK[i] = row;
    if (row >= 0) row_src_R[row] = i;
}

__global__ void moe_gather_backward_kernel(
    float* dx_ND, const float* dx_RD, const int32_t* slot_row_NK, size_t n, int K, int D) {
    BMOE_GRID_STRIDE(i, n) {
        const size_t tok = i / D, d = i % D;
        float acc = dx_ND[i];
        for (int k = 0; k < K; ++k) {
            const int32_t r = slot_row_NK[tok * K + k];
            if (r >= 0) acc += dx_RD[static_cast<size_t>(r) * D + d];
        }
        dx_ND[i] = acc;
    }
}

__global__ void moe_combine_forward_kernel(
    float* y_ND, const float* y_RD, const int32_t* slot_row_NK, const float* topk_weight_NK, size_t n, int K, int D) {
    BMOE_GRID_STRIDE(i, n) {
        const size_t tok = i / D, d = i % D;
        float acc = 0.0f;
        for (int k = 0; k < K; ++k) {
            const int32_t r = slot_row_NK[tok * K + k];
            if (r >= 0) acc += topk_weight_NK[tok * K + k] * y_RD[static_cast<size_t>(r) * D + d];
        }
        y_ND[i] = acc;
    }
}

template <typename Out>
__global__ void moe_combine_backward_rows_kernel(
    Out* dy_RD, const float* dy_ND, const int32_t* row_src_R, const float* topk_weight_NK, size_t n, int K, int D) {
    BMOE_GRID_STRIDE(i, n) {
        const int32_t src = row_src_R[i / D];
        store_as(dy_RD + i, topk_weight_NK[src] * dy_ND[static_cast<size_t>(src / K) * D + i % D]);
    }
}

// One warp per (token, slot): dot(dy_ND[n], y_RD[slot row]) in double; 0 for dropped copies.
__global__ void moe_combine_backward_gate_kernel(
    float* dtopk_weight_NK, const float* dy_ND, const float* y_RD, const int32_t* slot_row_NK, int NK, int K, int D) {
    const int nk = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (nk >= NK) return;  // whole warps exit together
    const int32_t r = slot_row_NK[nk];
    double dot = 0.0;
    if (r >= 0) {
        const float *dy = dy_ND + static_cast<size_t>(nk / K) * D, *y = y_RD + static_cast<size_t>(r) * D;
        for (int d = lane; d < D; d += 32) dot += static_cast<double>(dy[d]) * y[d];
    }
    dot = warp_sum(dot);
    if (lane == 0) dtopk_weight_NK[nk] = static_cast<float>(dot);
}

}  // namespace

// ---- embeddings -------------------------------------------------------------------------------

void CudaBackend::embedding_forward(float* out_ND, const int32_t* tokens_N, const float* table_VD, int N, int D) {
    const ProfiledOp op(profiler_.get(), "embedding_forward");
    const size_t n = static_cast<size_t>(N) * D;
    if (n == 0) return;
    embedding_forward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out_ND, tokens_N, table_VD, n, D);
    CUDA_CHECK_LAST();
}

// Deterministic without atomics or a scan over the vocabulary: the tokens (N ints) come to the
// host once, a stable counting sort builds a CSR of positions per used vocab id, and one block
// column per used id sums its rows in token order. Costs one sync + O(N) host work per call.
void CudaBackend::embedding_backward(float* dtable_VD, const float* dout_ND, const int32_t* tokens_N, int N, int D) {
    const ProfiledOp op(profiler_.get(), "embedding_backward");
    if (dtable_VD == nullptr || N <= 0 || D <= 0) return;
    std::vector<int32_t> tokens(N);
    download(tokens.data(), tokens_N, tokens.size() * sizeof(int32_t));
    int used = 0;
    const std::vector<int32_t> csr = token_csr(tokens, used);
    auto* ws = static_cast<int32_t*>(scratch(embed_ws_, csr.size() * sizeof(int32_t)));
    upload(ws, csr.data(), csr.size() * sizeof(int32_t));
    const int32_t *ids = ws, *ptr = ws + used, *pos = ptr + used + 1;
    constexpr int kCols = 128;
    embedding_backward_kernel<<<dim3(used, div_up(D, kCols)), kCols, 0, stream_>>>(dtable_VD, dout_ND, ids, ptr, pos,
                                                                                   D);
    CUDA_CHECK_LAST();
}

void CudaBackend::position_forward(float* x_BTD, const float* wpe_SD, int B, int T, int D) {
    const ProfiledOp op(profiler_.get(), "position_forward");
    const size_t TD = static_cast<size_t>(T) * D, n = TD * B;
    if (n == 0) return;
    position_forward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(x_BTD, wpe_SD, n, TD);
    CUDA_CHECK_LAST();
}

void CudaBackend::position_backward(float* dwpe_SD, const float* dx_BTD, int B, int T, int D) {
    const ProfiledOp op(profiler_.get(), "position_backward");
    const size_t TD = static_cast<size_t>(T) * D;
    if (dwpe_SD == nullptr || TD == 0) return;
    position_backward_kernel<<<grid_for(TD), kThreads, 0, stream_>>>(dwpe_SD, dx_BTD, B, TD);
    CUDA_CHECK_LAST();
}

// ---- norms ------------------------------------------------------------------------------------

void CudaBackend::rmsnorm_forward(
    float* out_ND, float* rstd_N, const float* in_ND, const float* w_D, int N, int D, float eps) {
    const ProfiledOp op(profiler_.get(), "rmsnorm_forward");
    if (N <= 0) return;
    rmsnorm_forward_kernel<<<N, kThreads, 0, stream_>>>(out_ND, rstd_N, in_ND, w_D, D, eps);
    CUDA_CHECK_LAST();
}

void CudaBackend::rmsnorm_forward_bf16(
    uint16_t* out16_ND, float* rstd_N, const float* in_ND, const float* w_D, int N, int D, float eps) {
    const ProfiledOp op(profiler_.get(), "rmsnorm_forward_bf16");
    require_bf16_precision("rmsnorm_forward_bf16");
    if (N <= 0) return;
    rmsnorm_forward_kernel<<<N, kThreads, 0, stream_>>>(out16_ND, rstd_N, in_ND, w_D, D, eps);
    CUDA_CHECK_LAST();
}

void CudaBackend::rmsnorm_backward(float* din_ND,
                                   float* dw_D,
                                   const float* dout_ND,
                                   const float* in_ND,
                                   const float* w_D,
                                   const float* rstd_N,
                                   int N,
                                   int D) {
    const ProfiledOp op(profiler_.get(), "rmsnorm_backward");
    if (N <= 0) return;
    if (norm_backward_fused(din_ND, dw_D, nullptr, dout_ND, in_ND, w_D, nullptr, rstd_N, N, D)) return;
    rmsnorm_backward_kernel<<<N, kThreads, 0, stream_>>>(din_ND, dout_ND, in_ND, w_D, rstd_N, D);
    CUDA_CHECK_LAST();
    column_reduce(stream_, column_reduce_ws(N, D), dw_D, N, D, RmsDw{dout_ND, in_ND, rstd_N, D});
}

bool CudaBackend::norm_backward_fused(float* din_ND,
                                      float* dw_D,
                                      float* db_D,
                                      const float* dout_ND,
                                      const float* in_ND,
                                      const float* w_D,
                                      const float* mean_N,
                                      const float* rstd_N,
                                      int N,
                                      int D) {
    // warps per block: as many as 48 KB of partials allow (8 at D = 768); wider rows take the
    // two-pass path
    constexpr size_t kSmem = 48 * 1024;
    const int warps = static_cast<int>(std::min<size_t>(8, kSmem / (2 * sizeof(float) * std::max(D, 1))));
    if (warps < 1 || D <= 0) return false;
    const int blocks = std::clamp(N / 16, 1, 264);  // ~2 per SM, at least 16 rows each
    const int chunk = static_cast<int>(div_up(static_cast<size_t>(N), static_cast<size_t>(blocks)));
    const size_t SD = static_cast<size_t>(blocks) * D;
    auto* ws = static_cast<double*>(scratch(colred_ws_, 2 * SD * sizeof(double)));
    norm_backward_fused_kernel<<<blocks, warps * 32, 2 * sizeof(float) * warps * D, stream_>>>(
        din_ND, dw_D ? ws : nullptr, db_D ? ws + SD : nullptr, dout_ND, in_ND, w_D, mean_N, rstd_N, N, D, chunk);
    CUDA_CHECK_LAST();
    for (auto [out, part] : {std::pair<float*, const double*>{dw_D, ws}, {db_D, ws + SD}}) {
        if (out == nullptr) continue;  // a frozen weight's gradient
        column_reduce_finish_kernel<<<grid_for(static_cast<size_t>(D)), kThreads, 0, stream_>>>(out, part, blocks, D);
        CUDA_CHECK_LAST();
    }
    return true;
}

void CudaBackend::layernorm_forward(float* out_ND,
                                    float* mean_N,
                                    float* rstd_N,
                                    const float* in_ND,
                                    const float* w_D,
                                    const float* b_D,
                                    int N,
                                    int D,
                                    float eps) {
    const ProfiledOp op(profiler_.get(), "layernorm_forward");
    if (N <= 0) return;
    layernorm_forward_kernel<<<N, kThreads, 0, stream_>>>(out_ND, mean_N, rstd_N, in_ND, w_D, b_D, D, eps);
    CUDA_CHECK_LAST();
}

void CudaBackend::layernorm_forward_bf16(uint16_t* out16_ND,
                                         float* mean_N,
                                         float* rstd_N,
                                         const float* in_ND,
                                         const float* w_D,
                                         const float* b_D,
                                         int N,
                                         int D,
                                         float eps) {
    const ProfiledOp op(profiler_.get(), "layernorm_forward_bf16");
    require_bf16_precision("layernorm_forward_bf16");
    if (N <= 0) return;
    layernorm_forward_kernel<<<N, kThreads, 0, stream_>>>(out16_ND, mean_N, rstd_N, in_ND, w_D, b_D, D, eps);
    CUDA_CHECK_LAST();
}

void CudaBackend::layernorm_backward(float* din_ND,
                                     float* dw_D,
                                     float* db_D,
                                     const float* dout_ND,
                                     const float* in_ND,
                                     const float* w_D,
                                     const float* mean_N,
                                     const float* rstd_N,
                                     int N,
                                     int D) {
    const ProfiledOp op(profiler_.get(), "layernorm_backward");
    if (N <= 0) return;
    if (norm_backward_fused(din_ND, dw_D, db_D, dout_ND, in_ND, w_D, mean_N, rstd_N, N, D)) return;
    layernorm_backward_kernel<<<N, kThreads, 0, stream_>>>(din_ND, dout_ND, in_ND, w_D, mean_N, rstd_N, D);
    CUDA_CHECK_LAST();
    column_reduce(stream_, column_reduce_ws(N, D), dw_D, N, D, LnDw{dout_ND, in_ND, mean_N, rstd_N, D});
    column_reduce(stream_, column_reduce_ws(N, D), db_D, N, D, RowValue{dout_ND, D});
}

// ---- activations ------------------------------------------------------------------------------

void CudaBackend::swiglu_forward(float* out, const float* gate, const float* up, size_t n) {
    const ProfiledOp op(profiler_.get(), "swiglu_forward");
    if (n == 0) return;
    swiglu_forward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out, gate, up, n);
    CUDA_CHECK_LAST();
}

void CudaBackend::swiglu_forward_bf16(uint16_t* out16, const uint16_t* gate16, const uint16_t* up16, size_t n) {
    const ProfiledOp op(profiler_.get(), "swiglu_forward_bf16");
    if (n == 0) return;
    swiglu_forward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out16, gate16, up16, n);
    CUDA_CHECK_LAST();
}

void CudaBackend::swiglu_backward(
    float* dgate, float* dup, const float* dout, const float* gate, const float* up, size_t n) {
    const ProfiledOp op(profiler_.get(), "swiglu_backward");
    if (n == 0) return;
    swiglu_backward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(dgate, dup, dout, gate, up, n);
    CUDA_CHECK_LAST();
}

void CudaBackend::gelu_forward(float* out, const float* in, size_t n) {
    const ProfiledOp op(profiler_.get(), "gelu_forward");
    if (n == 0) return;
    gelu_forward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out, in, n);
    CUDA_CHECK_LAST();
}

void CudaBackend::gelu_forward_bf16(uint16_t* out16, const uint16_t* in16, size_t n) {
    const ProfiledOp op(profiler_.get(), "gelu_forward_bf16");
    if (n == 0) return;
    gelu_forward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out16, in16, n);
    CUDA_CHECK_LAST();
}

void CudaBackend::gelu_backward_bf16(uint16_t* din16, const uint16_t* dout16, const uint16_t* in16, size_t n) {
    const ProfiledOp op(profiler_.get(), "gelu_backward_bf16");
    if (n == 0) return;
    gelu_backward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(din16, dout16, in16, n);
    CUDA_CHECK_LAST();
}

void CudaBackend::swiglu_backward_bf16(uint16_t* dgate16,
                                       uint16_t* dup16,
                                       const uint16_t* dout16,
                                       const uint16_t* gate16,
                                       const uint16_t* up16,
                                       size_t n) {
    const ProfiledOp op(profiler_.get(), "swiglu_backward_bf16");
    if (n == 0) return;
    swiglu_backward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(dgate16, dup16, dout16, gate16, up16, n);
    CUDA_CHECK_LAST();
}

void CudaBackend::gelu_backward(float* din, const float* dout, const float* in, size_t n) {
    const ProfiledOp op(profiler_.get(), "gelu_backward");
    if (n == 0) return;
    gelu_backward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(din, dout, in, n);
    CUDA_CHECK_LAST();
}

// ---- loss -------------------------------------------------------------------------------------

namespace {
// The 4-wide vectors per row of V elements the loss kernels may use: V / 4 where V % 4 == 0 and
// every row of every tensor starts aligned for them (each base 4 elements aligned), else 0 (one
// element at a time). A misaligned vector access would be a sticky device fault.
int row_quads(int V, size_t element_bytes, std::initializer_list<const void*> bases) {
    if (V % 4 != 0) return 0;
    for (const void* b : bases)
        if (reinterpret_cast<uintptr_t>(b) % (4 * element_bytes) != 0) return 0;
    return V / 4;
}
}  // namespace

void CudaBackend::cross_entropy_forward(
    float* loss_N, float* probs_NV, const float* logits_NV, const int32_t* targets_N, int N, int V) {
    const ProfiledOp op(profiler_.get(), "cross_entropy_forward");
    if (N <= 0 || V <= 0) return;
    cross_entropy_forward_kernel<<<N, kThreads, 0, stream_>>>(loss_N, probs_NV, logits_NV, targets_N, V,
                                                              row_quads(V, sizeof(float), {probs_NV, logits_NV}));
    CUDA_CHECK_LAST();
}

void CudaBackend::cross_entropy_backward(
    float* dlogits_NV, const float* probs_NV, const int32_t* targets_N, float dloss, int N, int V) {
    const ProfiledOp op(profiler_.get(), "cross_entropy_backward");
    if (N <= 0 || V <= 0) return;
    cross_entropy_backward_kernel<<<N, kThreads, 0, stream_>>>(dlogits_NV, probs_NV, targets_N, dloss, V,
                                                               row_quads(V, sizeof(float), {dlogits_NV, probs_NV}));
    CUDA_CHECK_LAST();
}

void CudaBackend::cross_entropy_forward_bf16(
    float* loss_N, float* lse_N, const uint16_t* logits16_NV, const int32_t* targets_N, int N, int V) {
    const ProfiledOp op(profiler_.get(), "cross_entropy_forward_bf16");
    require_bf16_precision("cross_entropy_forward_bf16");
    if (N <= 0 || V <= 0) return;
    cross_entropy_forward_bf16_kernel<<<N, kThreads, 0, stream_>>>(loss_N, lse_N, logits16_NV, targets_N, V,
                                                                   row_quads(V, sizeof(uint16_t), {logits16_NV}));
    CUDA_CHECK_LAST();
}

void CudaBackend::cross_entropy_backward_bf16(uint16_t* dlogits16_NV,
                                              const uint16_t* logits16_NV,
                                              const float* lse_N,
                                              const int32_t* targets_N,
                                              float dloss,
                                              int N,
                                              int V) {
    const ProfiledOp op(profiler_.get(), "cross_entropy_backward_bf16");
    require_bf16_precision("cross_entropy_backward_bf16");
    if (N <= 0 || V <= 0) return;
    cross_entropy_backward_bf16_kernel<<<N, kThreads, 0, stream_>>>(
        dlogits16_NV, logits16_NV, lse_N, targets_N, dloss, V,
        row_quads(V, sizeof(uint16_t), {dlogits16_NV, logits16_NV}));
    CUDA_CHECK_LAST();
}

// ---- MoE router and token permutation ---------------------------------------------------------

void CudaBackend::router_topk_forward(float* probs_NE,
                                      float* lse_N,
                                      int32_t* topk_idx_NK,
                                      float* topk_weight_NK,
                                      const float* logits_NE,
                                      int N,
                                      int E,
                                      int K,
                                      bool renormalize) {
    const ProfiledOp op(profiler_.get(), "router_topk_forward");
    if (N <= 0) return;
    BMOE_REQUIRE(E > 0 && K >= 0 && K <= E, "router: top-k (", K, ") must be in [0, num_experts = ", E, "]");
    constexpr int kRouterThreads = 128;
    router_topk_forward_kernel<<<div_up(N, kRouterThreads), kRouterThreads, 0, stream_>>>(
        probs_NE, lse_N, topk_idx_NK, topk_weight_NK, logits_NE, RouterDims{N, E, K, renormalize});
    CUDA_CHECK_LAST();
}

void CudaBackend::router_topk_backward(float* dlogits_NE,
                                       const float* dtopk_weight_NK,
                                       const float* probs_NE,
                                       const float* lse_N,
                                       const int32_t* topk_idx_NK,
                                       const float* topk_weight_NK,
                                       const float* aux_dprobs_E,
                                       float zloss_coef,
                                       int N,
                                       int E,
                                       int K,
                                       bool renormalize) {
    const ProfiledOp op(profiler_.get(), "router_topk_backward");
    if (N <= 0) return;
    constexpr int kRouterThreads = 128;
    const RouterGrads a{dtopk_weight_NK, probs_NE, lse_N, topk_weight_NK, aux_dprobs_E, topk_idx_NK, zloss_coef};
    router_topk_backward_kernel<<<div_up(N, kRouterThreads), kRouterThreads, 0, stream_>>>(
        dlogits_NE, a, RouterDims{N, E, K, renormalize});
    CUDA_CHECK_LAST();
}

void CudaBackend::router_rows(RouterStage stage, const RouterRows& rows) {
    static constexpr const char* kNames[] = {"router_sample", "router_select", "router_gate_backward",
                                             "router_family_backward"};
    const ProfiledOp op(profiler_.get(), kNames[static_cast<int>(stage)]);
    if (rows.N <= 0) return;
    // One thread per token is latency-bound work (a few hundred dependent fp64 ops): small blocks
    // spread the 8k tokens of a step over every SM instead of half of them.
    constexpr int kRowThreads = 64;
    router_rows_kernel<<<div_up(rows.N, kRowThreads), kRowThreads, 0, stream_>>>(stage, rows);
    CUDA_CHECK_LAST();
}

void CudaBackend::moe_plan_routing(int32_t* row_src_R,
                                   int32_t* slot_row_NK,
                                   int32_t* counts_E,
                                   const int32_t* topk_idx_NK,
                                   int N,
                                   int K,
                                   int E,
                                   int capacity) {
    const ProfiledOp op(profiler_.get(), "moe_plan_routing");
    const int NK = N * K;
    const size_t hist_bytes = static_cast<size_t>(kPlanWarps) * E * sizeof(int32_t);
    if (hist_bytes > 48 * 1024) {  // more experts than a block's histograms hold: plan on the host
        std::vector<int32_t> idx(NK), counts(E);
        download(idx.data(), topk_idx_NK, idx.size() * sizeof(int32_t));
        CUDA_CHECK(cudaStreamSynchronize(stream_));
        const RoutingPlan plan = plan_routing(idx.data(), N, K, E, capacity);
        for (int e = 0; e < E; ++e) counts[e] = static_cast<int32_t>(plan.tokens_per_expert[e]);
        upload(row_src_R, plan.row_src.data(), plan.row_src.size() * sizeof(int32_t));
        upload(slot_row_NK, plan.slot_row.data(), plan.slot_row.size() * sizeof(int32_t));
        upload(counts_E, counts.data(), counts.size() * sizeof(int32_t));
        CUDA_CHECK(cudaStreamSynchronize(stream_));  // the host vectors go out of scope
        return;
    }
    if (NK == 0) {
        CUDA_CHECK(cudaMemsetAsync(counts_E, 0, E * sizeof(int32_t), stream_));
        return;
    }
    const int T = div_up(NK, kPlanTile);
    auto* ws = static_cast<int32_t*>(scratch(plan_ws_, (2 * static_cast<size_t>(T) * E + 2 * E) * sizeof(int32_t)));
    int32_t *tile_counts = ws, *tile_base = ws + static_cast<size_t>(T) * E,
            *offsets_kept = tile_base + static_cast<size_t>(T) * E;
    plan_count_kernel<<<T, kPlanTile, hist_bytes, stream_>>>(tile_counts, topk_idx_NK, NK, E);
    CUDA_CHECK_LAST();
    plan_scan_kernel<<<1, 256, 0, stream_>>>(tile_base, counts_E, offsets_kept, tile_counts, T, E, capacity);
    CUDA_CHECK_LAST();
    plan_scatter_kernel<<<T, kPlanTile, hist_bytes, stream_>>>(row_src_R, slot_row_NK, topk_idx_NK, tile_base,
                                                               offsets_kept, NK, E);
    CUDA_CHECK_LAST();
}

void CudaBackend::moe_gather_forward(float* x_RD, const float* x_ND, const int32_t* row_src_R, int R, int K, int D) {
    const ProfiledOp op(profiler_.get(), "moe_gather_forward");
    const size_t n = static_cast<size_t>(R) * D;
    if (n == 0) return;
    moe_gather_forward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(x_RD, x_ND, row_src_R, n, K, D);
    CUDA_CHECK_LAST();
}

void CudaBackend::moe_gather_forward_bf16(
    uint16_t* x16_RD, const float* x_ND, const int32_t* row_src_R, int R, int K, int D) {
    const ProfiledOp op(profiler_.get(), "moe_gather_forward_bf16");
    require_bf16_precision("moe_gather_forward_bf16");
    const size_t n = static_cast<size_t>(R) * D;
    if (n == 0) return;
    moe_gather_forward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(x16_RD, x_ND, row_src_R, n, K, D);
    CUDA_CHECK_LAST();
}

void CudaBackend::gather_rows_bf16(uint16_t* out16_LD, const uint16_t* in16_RD, const int32_t* src_L, int L, int D) {
    const ProfiledOp op(profiler_.get(), "gather_rows_bf16");
    if (L <= 0 || D <= 0) return;
    // Buffers are 256-byte aligned and even rows keep every row 4-byte aligned: move 32-bit words.
    const bool words =
        D % 2 == 0 && reinterpret_cast<uintptr_t>(out16_LD) % 4 == 0 && reinterpret_cast<uintptr_t>(in16_RD) % 4 == 0;
    const int W = words ? D / 2 : D;
    const size_t n = static_cast<size_t>(L) * W;
    if (words)
        gather_rows_kernel<<<grid_for(n), kThreads, 0, stream_>>>(
            reinterpret_cast<uint32_t*>(out16_LD), reinterpret_cast<const uint32_t*>(in16_RD), src_L, n, W);
    else
        gather_rows_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out16_LD, in16_RD, src_L, n, W);
    CUDA_CHECK_LAST();
}

void CudaBackend::moe_gather_backward(
    float* dx_ND, const float* dx_RD, const int32_t* slot_row_NK, int N, int K, int D) {
    const ProfiledOp op(profiler_.get(), "moe_gather_backward");
    const size_t n = static_cast<size_t>(N) * D;
    if (n == 0) return;
    moe_gather_backward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(dx_ND, dx_RD, slot_row_NK, n, K, D);
    CUDA_CHECK_LAST();
}

void CudaBackend::moe_combine_forward(
    float* y_ND, const float* y_RD, const int32_t* slot_row_NK, const float* topk_weight_NK, int N, int K, int D) {
    const ProfiledOp op(profiler_.get(), "moe_combine_forward");
    const size_t n = static_cast<size_t>(N) * D;
    if (n == 0) return;
    moe_combine_forward_kernel<<<grid_for(n), kThreads, 0, stream_>>>(y_ND, y_RD, slot_row_NK, topk_weight_NK, n, K, D);
    CUDA_CHECK_LAST();
}

void CudaBackend::moe_combine_backward(float* dy_RD,
                                       float* dtopk_weight_NK,
                                       const float* dy_ND,
                                       const float* y_RD,
                                       const int32_t* row_src_R,
                                       const int32_t* slot_row_NK,
                                       const float* topk_weight_NK,
                                       int N,
                                       int R,
                                       int K,
                                       int D) {
    const ProfiledOp op(profiler_.get(), "moe_combine_backward");
    combine_backward(dy_RD, dtopk_weight_NK, dy_ND, y_RD, row_src_R, slot_row_NK, topk_weight_NK, N, R, K, D);
}

void CudaBackend::moe_combine_backward_bf16(uint16_t* dy16_RD,
                                            float* dtopk_weight_NK,
                                            const float* dy_ND,
                                            const float* y_RD,
                                            const int32_t* row_src_R,
                                            const int32_t* slot_row_NK,
                                            const float* topk_weight_NK,
                                            int N,
                                            int R,
                                            int K,
                                            int D) {
    const ProfiledOp op(profiler_.get(), "moe_combine_backward_bf16");
    require_bf16_precision("moe_combine_backward_bf16");
    combine_backward(dy16_RD, dtopk_weight_NK, dy_ND, y_RD, row_src_R, slot_row_NK, topk_weight_NK, N, R, K, D);
}

template <typename Out>
void CudaBackend::combine_backward(Out* dy_RD,
                                   float* dtopk_weight_NK,
                                   const float* dy_ND,
                                   const float* y_RD,
                                   const int32_t* row_src_R,
                                   const int32_t* slot_row_NK,
                                   const float* topk_weight_NK,
                                   int N,
                                   int R,
                                   int K,
                                   int D) {
    const size_t rows = static_cast<size_t>(R) * D;
    if (rows > 0) {
        moe_combine_backward_rows_kernel<<<grid_for(rows), kThreads, 0, stream_>>>(dy_RD, dy_ND, row_src_R,
                                                                                   topk_weight_NK, rows, K, D);
        CUDA_CHECK_LAST();
    }
    const int NK = N * K;
    if (NK <= 0) return;
    moe_combine_backward_gate_kernel<<<div_up(NK, kThreads / 32), kThreads, 0, stream_>>>(dtopk_weight_NK, dy_ND, y_RD,
                                                                                          slot_row_NK, NK, K, D);
    CUDA_CHECK_LAST();
}

}  // namespace bmoe::model
