// cuda_common.cuh -- device helpers shared by the CUDA backend's .cu files (internal header).
//
// Every reduction here runs in a fixed order for a given launch shape (shuffle trees, then warp
// partials summed in warp order), so results are bitwise reproducible run to run: no atomics.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "parallel/cuda_check.h"

namespace bmoe::model::cuda {

constexpr int kThreads = 256;              // default block size (a multiple of 32: block_* need full warps)
constexpr unsigned kMaxBlocks = 1u << 16;  // grid-stride loops cover the rest
constexpr unsigned kFullMask = 0xffffffffu;

// Blocks for a grid-stride loop over n elements.
inline unsigned grid_for(size_t n, int threads = kThreads) {
    const size_t blocks = (n + threads - 1) / threads;
    return static_cast<unsigned>(std::clamp<size_t>(blocks, 1, kMaxBlocks));
}

inline unsigned div_up(size_t a, size_t b) { return static_cast<unsigned>((a + b - 1) / b); }

#define BMOE_GRID_STRIDE(i, n) \
    for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < (n); i += size_t{gridDim.x} * blockDim.x)

// ---- warp / block reductions -------------------------------------------------------------

template <typename T>
__device__ T warp_sum(T v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    return v;
}

__device__ inline float warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
    return v;
}

// Sum over a 1-D block (blockDim.x a multiple of 32); every thread gets the total. Call from all
// threads. The leading barrier makes back-to-back calls safe.
template <typename T>
__device__ T block_sum(T v) {
    __shared__ T part[32];
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    T total = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += part[w];
    return total;
}

__device__ inline float block_max(float v) {
    __shared__ float part[32];
    v = warp_max(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    float m = part[0];
    for (unsigned w = 1; w < blockDim.x / 32; ++w) m = fmaxf(m, part[w]);
    return m;
}

// ---- bf16 --------------------------------------------------------------------------------

// The bf16 bit pattern nearest to x, ties to even: model/precision.h's bf16_bits, bit for bit.
__device__ inline uint16_t bf16_bits_rne(float x) {
    uint32_t bits = __float_as_uint(x);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0)
        return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN stays a quiet NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

// The float a bf16 bit pattern encodes (exact).
__device__ inline float bf16_value(uint16_t b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }

// An output element as stored: fp32, or its bf16 rounding (the ops that write bf16).
__device__ inline void store_as(float* y, float v) { *y = v; }
__device__ inline void store_as(uint16_t* y, float v) { *y = bf16_bits_rne(v); }

// Four floats rounded to bf16 and packed as they lie in memory (one 8-byte store).
__device__ inline uint2 pack_bf16x4(float a, float b, float c, float d) {
    return make_uint2(bf16_bits_rne(a) | (static_cast<uint32_t>(bf16_bits_rne(b)) << 16),
                      bf16_bits_rne(c) | (static_cast<uint32_t>(bf16_bits_rne(d)) << 16));
}

// out[i] = bf16_bits_rne(in[i]) for n elements on `stream`, four per thread where aligned (the
// GEMM operand copies and Backend::float_to_bf16; cuda_gemm.cu).
void round_to_bf16(cudaStream_t stream, uint16_t* out, const float* in, size_t n);

// ---- column reductions: out_D[d] += sum_n f(n, d) -------------------------------------------
// Two passes, so even a small D fills the GPU: pass 1 splits the rows into S chunks, block
// (32, kColRows) per (32 columns, chunk): x picks the column (coalesced rows), y strides the chunk's
// rows, partials summed over y in order into ws[s * D + d] (double, like the CPU's column_reduce);
// pass 2 adds the S chunk sums of each column in chunk order. Fixed order: bitwise reproducible.
constexpr int kColRows = 16;

// Row chunks for an N x D reduction: about two blocks per SM, chunks of at least 64 rows.
inline int column_reduce_splits(int N, int D) {
    const int col_blocks = static_cast<int>(div_up(static_cast<size_t>(D), 32));
    const int want = static_cast<int>(div_up(264, static_cast<size_t>(col_blocks)));
    return std::clamp(want, 1, std::max(1, static_cast<int>(div_up(static_cast<size_t>(N), 64))));
}

template <typename F>
__global__ void column_reduce_partial_kernel(double* ws_SD, int N, int D, int chunk, F f) {
    __shared__ double part[kColRows][33];
    const int d = blockIdx.x * 32 + threadIdx.x;
    const int n0 = blockIdx.y * chunk, n1 = min(N, n0 + chunk);
    double acc = 0.0;
    if (d < D) {
        for (int n = n0 + threadIdx.y; n < n1; n += kColRows) acc += f(n, d);
    }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && d < D) {
        double s = 0.0;
        for (int y = 0; y < kColRows; ++y) s += part[y][threadIdx.x];
        ws_SD[static_cast<size_t>(blockIdx.y) * D + d] = s;
    }
}

static __global__ void column_reduce_finish_kernel(float* out_D, const double* ws_SD, int S, int D) {
    BMOE_GRID_STRIDE(d, static_cast<size_t>(D)) {
        double s = 0.0;
        for (int c = 0; c < S; ++c) s += ws_SD[static_cast<size_t>(c) * D + d];
        out_D[d] += static_cast<float>(s);
    }
}

// ws: column_reduce_splits(N, D) * D doubles of device scratch (stream-ordered reuse is safe).
template <typename F>
void column_reduce(cudaStream_t stream, double* ws, float* out_D, int N, int D, F f) {
    if (out_D == nullptr || N <= 0 || D <= 0) return;  // null: a frozen weight's gradient
    const int S = column_reduce_splits(N, D);
    const int chunk = static_cast<int>(div_up(static_cast<size_t>(N), static_cast<size_t>(S)));
    column_reduce_partial_kernel<<<dim3(div_up(D, 32), S), dim3(32, kColRows), 0, stream>>>(ws, N, D, chunk, f);
    CUDA_CHECK_LAST();
    column_reduce_finish_kernel<<<grid_for(static_cast<size_t>(D)), kThreads, 0, stream>>>(out_D, ws, S, D);
    CUDA_CHECK_LAST();
}

// f(n, d) = x[n * ld + d]: plain column sums (bias / beta gradients).
struct RowValue {
    const float* x;
    int ld;
    __device__ float operator()(int n, int d) const { return x[static_cast<size_t>(n) * ld + d]; }
};

}  // namespace bmoe::model::cuda
