// flash_attention.cu -- CudaBackend's fused causal attention (AttentionKernel::kFlash): the
// FlashAttention-2 algorithm (Dao, 2023) in plain form on bf16 WMMA tensor cores with fp32
// accumulation. Never stores the [B, H, T, T] scores.
//
// Forward: one block per (64 query rows, batch * head); 4 warps own 16 rows each. For each 64-key
// tile at or below the diagonal: S = scale Q K^T (WMMA), an online softmax per row (running max
// m, running sum l, the output rows rescaled by exp(m_old - m_new)), then O += P V (WMMA, P
// rounded to bf16). Saves lse = m + log l per row ([B, H, T]) for backward.
// Backward, deterministic (no atomics): D = rowsum(dO * O) per row; one block per (64-key tile,
// batch * kv head) sums dK and dV over the group's query heads and the query tiles at or after it
// (warps own 16 keys); one block per (64 query rows, batch * head) sums dQ over the key tiles
// (warps own 16 rows). Both recompute P = exp(scale Q K^T - lse) tile by tile.
// q, k, v and dout are rounded to bf16 (nearest-even, as the gemm kernel's copies) on their way
// into shared memory (q, k, v stored in bf16 are read as they are: the same values, half the
// bytes; the _bf16 ops, which also store dq, dk, dv in bf16); head_dim is zero-padded to a multiple of 16 (Hd <= 128).
// Unlike the gemm kernel, P enters P V unnormalised and dS is rounded per tile, so the two agree within bf16 error, not
// bit for bit. Needs sm_80 or newer (bf16 WMMA).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>

#include "model/cuda/cuda_backend.h"
#include "model/cuda/cuda_common.cuh"
#include "model/cuda/op_profiler.h"
#include "parallel/cuda_check.h"

namespace bmoe::model {

using namespace cuda;

namespace {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define BMOE_FLASH_DEVICE_CODE 0  // bf16 WMMA needs sm_80: kernels compile empty (the host refuses)
#else
#define BMOE_FLASH_DEVICE_CODE 1
#endif

using bf16 = __nv_bfloat16;
namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;           // query rows and keys per tile
constexpr int kWarps = kTile / 16;  // each warp owns 16 rows (or keys) of a tile
constexpr int kFlashThreads = kWarps * 32;
constexpr int kMaxHeadDim = 128;  // shared memory bound (dK/dV kernel: ~177 KB at 128)

struct FlashDims {
    int B, T, H, KV, Hd;
    int Hdp;  // Hd rounded up to a multiple of 16 (WMMA)
    float scale;
};

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// c += A B^T over kdim: A 16 x kdim row-major at a (ld lda); B^T given as B's 16 rows, kdim long,
// row-major at b (ld ldb), i.e. a col-major kdim x 16 matrix. (S = Q K^T: rows of Q and of K.)
__device__ void mma_abt(FragC& c, const bf16* a, int lda, const bf16* b, int ldb, int kdim) {
    for (int k = 0; k < kdim; k += 16) {
        FragA fa;
        FragBCol fb;
        wmma::load_matrix_sync(fa, a + k, lda);
        wmma::load_matrix_sync(fb, b + k, ldb);
        wmma::mma_sync(c, fa, fb, c);
    }
}

// c += A B over kdim: A 16 x kdim row-major at a (ld lda); B kdim x 16 row-major at b (ld ldb).
__device__ void mma_ab(FragC& c, const bf16* a, int lda, const bf16* b, int ldb, int kdim) {
    for (int k = 0; k < kdim; k += 16) {
        FragA fa;
        FragBRow fb;
        wmma::load_matrix_sync(fa, a + k, lda);
        wmma::load_matrix_sync(fb, b + static_cast<size_t>(k) * ldb, ldb);
        wmma::mma_sync(c, fa, fb, c);
    }
}

// C (16 x 16 blocks along a row strip, fp32 in shared memory, ld ldc) += A B for a warp's strip:
// rows [0, 16) of A (16 x kdim), every 16 columns of B (kdim x cols).
__device__ void strip_add_ab(float* c, int ldc, const bf16* a, int lda, const bf16* b, int ldb, int kdim, int cols) {
    for (int col = 0; col < cols; col += 16) {
        FragC acc;
        wmma::load_matrix_sync(acc, c + col, ldc, wmma::mem_row_major);
        mma_ab(acc, a, lda, b + col, ldb, kdim);
        wmma::store_matrix_sync(c + col, acc, ldc, wmma::mem_row_major);
    }
}

// C (16 x 64, fp32, ld kTile) = A B^T for a warp: A's 16 rows against 64 rows of B (kdim long).
__device__ void strip_abt(float* c, const bf16* a, int lda, const bf16* b, int ldb, int kdim) {
    for (int col = 0; col < kTile; col += 16) {
        FragC acc;
        wmma::fill_fragment(acc, 0.0f);
        mma_abt(acc, a, lda, b + static_cast<size_t>(col) * ldb, ldb, kdim);
        wmma::store_matrix_sync(c + col, acc, kTile, wmma::mem_row_major);
    }
}

// Rows [t0, t0 + 64) of the (b, head) slice of x [B, T, heads, Hd] -> dst [64][Hdp] bf16, zeros
// past T and past Hd. The whole block takes part.
// x is fp32 (rounded here) or bf16 bits (q, k, v stored in bf16: the same values).
__device__ inline bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }
__device__ inline bf16 to_bf16(uint16_t bits) { return __ushort_as_bfloat16(bits); }
template <typename In>
__device__ void load_tile(bf16* dst, const In* x, int b, int head, int heads, int t0, const FlashDims& d) {
    for (int i = threadIdx.x; i < kTile * d.Hdp; i += blockDim.x) {
        const int r = i / d.Hdp, col = i % d.Hdp, t = t0 + r;
        In v = In(0);
        if (t < d.T && col < d.Hd) v = x[((static_cast<size_t>(b) * d.T + t) * heads + head) * d.Hd + col];
        dst[i] = to_bf16(v);
    }
}

// Rows [t0, t0 + 64) of a [B*H, T] row vector (lse, D) -> dst[64], zeros past T.
__device__ void load_rows(float* dst, const float* x_BHT, size_t bh, int t0, int T) {
    for (int i = threadIdx.x; i < kTile; i += blockDim.x) dst[i] = t0 + i < T ? x_BHT[bh * T + t0 + i] : 0.0f;
}

__device__ void zero_floats(float* x, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = 0.0f;
}

// ---- forward --------------------------------------------------------------------------------

size_t forward_smem(int Hdp) {  // Q, K, V [64][Hdp] bf16; P [64][64] bf16; S [64][64], O [64][Hdp] fp32
    return 3 * kTile * Hdp * sizeof(bf16) + kTile * kTile * sizeof(bf16) +
           (kTile * kTile + kTile * Hdp) * sizeof(float);
}

template <typename In>  // q, k, v: float, or uint16_t (bf16 bits)
__global__ void __launch_bounds__(kFlashThreads)
    flash_forward_kernel(float* out, float* lse_BHT, const In* q, const In* k, const In* v, FlashDims d) {
#if BMOE_FLASH_DEVICE_CODE
    extern __shared__ __align__(128) unsigned char smem[];
    const int Hdp = d.Hdp;
    bf16* Qs = reinterpret_cast<bf16*>(smem);
    bf16* Ks = Qs + kTile * Hdp;
    bf16* Vs = Ks + kTile * Hdp;
    bf16* Ps = Vs + kTile * Hdp;
    float* Ss = reinterpret_cast<float*>(Ps + kTile * kTile);
    float* Os = Ss + kTile * kTile;
    const int i_tile = blockIdx.x, bh = blockIdx.y, b = bh / d.H, h = bh % d.H, g = h / (d.H / d.KV);
    const int i0 = i_tile * kTile, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    load_tile(Qs, q, b, h, d.H, i0, d);
    zero_floats(Os, kTile * Hdp);
    float m[16], l[16];  // this warp's rows: running max and running sum (identical in every lane)
#pragma unroll
    for (int rr = 0; rr < 16; ++rr) m[rr] = -INFINITY, l[rr] = 0.0f;
    // Key tiles 0..i_tile: each has a key (its first) at or before every row of this query tile.
    for (int j = 0; j <= i_tile; ++j) {
        __syncthreads();  // every warp is done with the previous K and V tiles
        load_tile(Ks, k, b, g, d.KV, j * kTile, d);
        load_tile(Vs, v, b, g, d.KV, j * kTile, d);
        __syncthreads();
        float* S = Ss + warp * 16 * kTile;
        strip_abt(S, Qs + warp * 16 * Hdp, Hdp, Ks, Hdp, Hdp);
        __syncwarp();
#pragma unroll
        for (int rr = 0; rr < 16; ++rr) {
            const int r = warp * 16 + rr, qi = i0 + r;
            float s[2];
            bool ok[2];
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int col = lane + 32 * half, kj = j * kTile + col;
                ok[half] = kj <= qi && kj < d.T;
                s[half] = ok[half] ? S[rr * kTile + col] * d.scale : -INFINITY;
            }
            const float m_new = fmaxf(m[rr], warp_max(fmaxf(s[0], s[1])));
            const float p0 = ok[0] ? expf(s[0] - m_new) : 0.0f, p1 = ok[1] ? expf(s[1] - m_new) : 0.0f;
            const float alpha = expf(m[rr] - m_new);  // 0 on the first tile (m = -inf)
            l[rr] = l[rr] * alpha + warp_sum(p0 + p1);
            m[rr] = m_new;
            Ps[r * kTile + lane] = __float2bfloat16_rn(p0);
            Ps[r * kTile + lane + 32] = __float2bfloat16_rn(p1);
            for (int col = lane; col < Hdp; col += 32) Os[r * Hdp + col] *= alpha;
        }
        __syncwarp();
        strip_add_ab(Os + warp * 16 * Hdp, Hdp, Ps + warp * 16 * kTile, kTile, Vs, Hdp, kTile, Hdp);
        __syncwarp();
    }
#pragma unroll
    for (int rr = 0; rr < 16; ++rr) {
        const int r = warp * 16 + rr, qi = i0 + r;
        if (qi >= d.T) continue;
        const float inv = 1.0f / l[rr];
        float* o = out + ((static_cast<size_t>(b) * d.T + qi) * d.H + h) * d.Hd;
        for (int col = lane; col < d.Hd; col += 32) o[col] = Os[r * Hdp + col] * inv;
        if (lane == 0) lse_BHT[static_cast<size_t>(bh) * d.T + qi] = m[rr] + logf(l[rr]);
    }
#endif
}

// ---- backward ---------------------------------------------------------------------------------

// D[b, h, t] = sum_d dout[b, t, h, d] * out[b, t, h, d]: one warp per row. dout is rounded to bf16
// as the dP products read it, so dS = P (dP - D) is 0 where rowsum(P dP) = D says it should be.
__global__ void flash_row_dot_kernel(float* D_BHT, const float* dout, const float* out, FlashDims d) {
    const size_t rows = static_cast<size_t>(d.B) * d.T * d.H;
    const size_t warps = static_cast<size_t>(gridDim.x) * (blockDim.x / 32);
    const int lane = threadIdx.x % 32;
    for (size_t row = blockIdx.x * static_cast<size_t>(blockDim.x / 32) + threadIdx.x / 32; row < rows; row += warps) {
        const float* a = dout + row * d.Hd;
        const float* o = out + row * d.Hd;
        float acc = 0.0f;
        for (int col = lane; col < d.Hd; col += 32) acc += __bfloat162float(__float2bfloat16_rn(a[col])) * o[col];
        acc = warp_sum(acc);
        const size_t h = row % d.H, bt = row / d.H, b = bt / d.T, t = bt % d.T;
        if (lane == 0) D_BHT[(b * d.H + h) * d.T + t] = acc;
    }
}

size_t dkdv_smem(int Hdp) {  // K, V, Q, dO bf16; P^T, dS^T bf16; S^T, dP^T fp32; dK, dV fp32; lse, D
    return 4 * kTile * Hdp * sizeof(bf16) + 2 * kTile * kTile * sizeof(bf16) +
           (2 * kTile * kTile + 2 * kTile * Hdp + 2 * kTile) * sizeof(float);
}

template <typename E>  // q, k, v, dk, dv elements: float, or uint16_t: bf16 bits (attention_backward_bf16)
__global__ void __launch_bounds__(kFlashThreads) flash_dkdv_kernel(E* dk,
                                                                   E* dv,
                                                                   const float* dout,
                                                                   const E* q,
                                                                   const E* k,
                                                                   const E* v,
                                                                   const float* lse_BHT,
                                                                   const float* D_BHT,
                                                                   FlashDims d) {
#if BMOE_FLASH_DEVICE_CODE
    extern __shared__ __align__(128) unsigned char smem[];
    const int Hdp = d.Hdp;
    bf16* Ks = reinterpret_cast<bf16*>(smem);
    bf16* Vs = Ks + kTile * Hdp;
    bf16* Qs = Vs + kTile * Hdp;
    bf16* dOs = Qs + kTile * Hdp;
    bf16* PT = dOs + kTile * Hdp;    // [key][query]
    bf16* dST = PT + kTile * kTile;  // [key][query]
    float* ST = reinterpret_cast<float*>(dST + kTile * kTile);
    float* dPT = ST + kTile * kTile;
    float* dKs = dPT + kTile * kTile;
    float* dVs = dKs + kTile * Hdp;
    float* Lq = dVs + kTile * Hdp;
    float* Dq = Lq + kTile;
    const int j_tile = blockIdx.x, bg = blockIdx.y, b = bg / d.KV, g = bg % d.KV, group = d.H / d.KV;
    const int j0 = j_tile * kTile, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int q_tiles = (d.T + kTile - 1) / kTile;
    load_tile(Ks, k, b, g, d.KV, j0, d);
    load_tile(Vs, v, b, g, d.KV, j0, d);
    zero_floats(dKs, kTile * Hdp);
    zero_floats(dVs, kTile * Hdp);
    for (int hh = 0; hh < group; ++hh) {  // the group's query heads in order: a fixed summation order
        const int h = g * group + hh;
        const size_t bh = static_cast<size_t>(b) * d.H + h;
        for (int i_tile = j_tile; i_tile < q_tiles; ++i_tile) {  // queries at or after these keys
            const int i0 = i_tile * kTile;
            __syncthreads();  // every warp is done with the previous Q and dO tiles
            load_tile(Qs, q, b, h, d.H, i0, d);
            load_tile(dOs, dout, b, h, d.H, i0, d);
            load_rows(Lq, lse_BHT, bh, i0, d.T);
            load_rows(Dq, D_BHT, bh, i0, d.T);
            __syncthreads();
            float* S = ST + warp * 16 * kTile;  // this warp's 16 keys x 64 queries
            float* dP = dPT + warp * 16 * kTile;
            strip_abt(S, Ks + warp * 16 * Hdp, Hdp, Qs, Hdp, Hdp);    // S^T = K Q^T
            strip_abt(dP, Vs + warp * 16 * Hdp, Hdp, dOs, Hdp, Hdp);  // dP^T = V dO^T
            __syncwarp();
            for (int rr = 0; rr < 16; ++rr) {
                const int r = warp * 16 + rr, kj = j0 + r;
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int col = lane + 32 * half, qi = i0 + col;
                    const bool ok = qi >= kj && qi < d.T && kj < d.T;
                    const float p = ok ? expf(S[rr * kTile + col] * d.scale - Lq[col]) : 0.0f;
                    PT[r * kTile + col] = __float2bfloat16_rn(p);
                    dST[r * kTile + col] = __float2bfloat16_rn(ok ? p * (dP[rr * kTile + col] - Dq[col]) : 0.0f);
                }
            }
            __syncwarp();
            strip_add_ab(dVs + warp * 16 * Hdp, Hdp, PT + warp * 16 * kTile, kTile, dOs, Hdp, kTile, Hdp);
            strip_add_ab(dKs + warp * 16 * Hdp, Hdp, dST + warp * 16 * kTile, kTile, Qs, Hdp, kTile, Hdp);
            __syncwarp();
        }
    }
    for (int rr = 0; rr < 16; ++rr) {
        const int r = warp * 16 + rr, kj = j0 + r;
        if (kj >= d.T) continue;
        const size_t row = ((static_cast<size_t>(b) * d.T + kj) * d.KV + g) * d.Hd;
        for (int col = lane; col < d.Hd; col += 32) {
            store_as(dk + row + col, dKs[r * Hdp + col] * d.scale);
            store_as(dv + row + col, dVs[r * Hdp + col]);
        }
    }
#endif
}

size_t dq_smem(int Hdp) {  // Q, dO, K, V bf16; dS bf16; S, dP fp32; dQ fp32; lse, D
    return 4 * kTile * Hdp * sizeof(bf16) + kTile * kTile * sizeof(bf16) +
           (2 * kTile * kTile + kTile * Hdp + 2 * kTile) * sizeof(float);
}

template <typename E>
__global__ void __launch_bounds__(kFlashThreads) flash_dq_kernel(E* dq,
                                                                 const float* dout,
                                                                 const E* q,
                                                                 const E* k,
                                                                 const E* v,
                                                                 const float* lse_BHT,
                                                                 const float* D_BHT,
                                                                 FlashDims d) {
#if BMOE_FLASH_DEVICE_CODE
    extern __shared__ __align__(128) unsigned char smem[];
    const int Hdp = d.Hdp;
    bf16* Qs = reinterpret_cast<bf16*>(smem);
    bf16* dOs = Qs + kTile * Hdp;
    bf16* Ks = dOs + kTile * Hdp;
    bf16* Vs = Ks + kTile * Hdp;
    bf16* dSs = Vs + kTile * Hdp;
    float* Ss = reinterpret_cast<float*>(dSs + kTile * kTile);
    float* dPs = Ss + kTile * kTile;
    float* dQs = dPs + kTile * kTile;
    float* Lq = dQs + kTile * Hdp;
    float* Dq = Lq + kTile;
    const int i_tile = blockIdx.x, bh = blockIdx.y, b = bh / d.H, h = bh % d.H, g = h / (d.H / d.KV);
    const int i0 = i_tile * kTile, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    load_tile(Qs, q, b, h, d.H, i0, d);
    load_tile(dOs, dout, b, h, d.H, i0, d);
    load_rows(Lq, lse_BHT, bh, i0, d.T);
    load_rows(Dq, D_BHT, bh, i0, d.T);
    zero_floats(dQs, kTile * Hdp);
    for (int j = 0; j <= i_tile; ++j) {  // keys at or before these queries
        __syncthreads();                 // every warp is done with the previous K and V tiles
        load_tile(Ks, k, b, g, d.KV, j * kTile, d);
        load_tile(Vs, v, b, g, d.KV, j * kTile, d);
        __syncthreads();
        float* S = Ss + warp * 16 * kTile;  // this warp's 16 queries x 64 keys
        float* dP = dPs + warp * 16 * kTile;
        strip_abt(S, Qs + warp * 16 * Hdp, Hdp, Ks, Hdp, Hdp);    // S = Q K^T
        strip_abt(dP, dOs + warp * 16 * Hdp, Hdp, Vs, Hdp, Hdp);  // dP = dO V^T
        __syncwarp();
        for (int rr = 0; rr < 16; ++rr) {
            const int r = warp * 16 + rr, qi = i0 + r;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int col = lane + 32 * half, kj = j * kTile + col;
                const bool ok = kj <= qi && kj < d.T && qi < d.T;
                const float p = ok ? expf(S[rr * kTile + col] * d.scale - Lq[r]) : 0.0f;
                dSs[r * kTile + col] = __float2bfloat16_rn(ok ? p * (dP[rr * kTile + col] - Dq[r]) : 0.0f);
            }
        }
        __syncwarp();
        strip_add_ab(dQs + warp * 16 * Hdp, Hdp, dSs + warp * 16 * kTile, kTile, Ks, Hdp, kTile, Hdp);
        __syncwarp();
    }
    for (int rr = 0; rr < 16; ++rr) {
        const int r = warp * 16 + rr, qi = i0 + r;
        if (qi >= d.T) continue;
        E* o = dq + ((static_cast<size_t>(b) * d.T + qi) * d.H + h) * d.Hd;
        for (int col = lane; col < d.Hd; col += 32) store_as(o + col, dQs[r * Hdp + col] * d.scale);
    }
#endif
}

FlashDims flash_dims(int B, int T, int H, int KV, int Hd) {
    BMOE_REQUIRE(KV > 0 && H % KV == 0, "attention: num_heads (", H, ") must be a multiple of num_kv_heads (", KV, ")");
    BMOE_REQUIRE(Hd <= kMaxHeadDim, "flash attention supports head_dim <= ", kMaxHeadDim, " (got ", Hd,
                 "): use --train.attention=gemm");
    BMOE_REQUIRE(static_cast<size_t>(B) * H <= 65535, "flash attention: batch * heads (", B * H,
                 ") exceeds 65535 blocks: use a smaller batch or --train.attention=gemm");
    return {B, T, H, KV, Hd, (Hd + 15) / 16 * 16, static_cast<float>(1.0 / std::sqrt(static_cast<double>(Hd)))};
}

// Kernels with more than 48 KB of dynamic shared memory must say so before launch.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace

bool CudaBackend::flash_attention_active(int Hd) const {
    return attention_kernel_ == AttentionKernel::kFlash && matmul_precision_ == MatmulPrecision::kBf16 &&
           Hd <= kMaxHeadDim;
}

void CudaBackend::set_attention_kernel(AttentionKernel k) {
    if (k == AttentionKernel::kFlash) {
        int device = 0, major = 0;
        CUDA_CHECK(cudaGetDevice(&device));
        CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
        BMOE_REQUIRE(major >= 8,
                     "the flash attention kernel needs bf16 tensor cores (compute capability 8.0+; this "
                     "GPU is ",
                     major, ".x): use --train.attention=gemm");
    }
    attention_kernel_ = k;
}

size_t CudaBackend::attention_saved_numel(int B, int T, int H, int Hd) const {
    if (flash_attention_active(Hd)) return static_cast<size_t>(B) * H * T;
    return Backend::attention_saved_numel(B, T, H, Hd);
}

template <typename E>
void CudaBackend::flash_attention_forward(
    float* out_BTHd, float* lse_BHT, const E* q, const E* k, const E* v, int B, int T, int H, int KV, int Hd) {
    const ProfiledOp op(profiler_.get(), "flash_attention_forward");
    const FlashDims d = flash_dims(B, T, H, KV, Hd);
    if (B == 0 || T == 0 || H == 0 || Hd == 0) return;
    const size_t smem = forward_smem(d.Hdp);
    allow_smem(flash_forward_kernel<E>, smem);
    const dim3 grid((T + kTile - 1) / kTile, B * H);
    flash_forward_kernel<E><<<grid, kFlashThreads, smem, stream_>>>(out_BTHd, lse_BHT, q, k, v, d);
    CUDA_CHECK_LAST();
}

template <typename E>
void CudaBackend::flash_attention_backward(E* dq,
                                           E* dk,
                                           E* dv,
                                           const float* dout,
                                           const float* out,
                                           const E* q,
                                           const E* k,
                                           const E* v,
                                           const float* lse_BHT,
                                           int B,
                                           int T,
                                           int H,
                                           int KV,
                                           int Hd) {
    const ProfiledOp op(profiler_.get(), "flash_attention_backward");
    const FlashDims d = flash_dims(B, T, H, KV, Hd);
    if (B == 0 || T == 0 || H == 0 || Hd == 0) return;
    const size_t rows = static_cast<size_t>(B) * H * T;
    auto* D = static_cast<float*>(scratch(attn_ws_, rows * sizeof(float)));  // [B, H, T]
    flash_row_dot_kernel<<<grid_for(rows * 32), kThreads, 0, stream_>>>(D, dout, out, d);
    CUDA_CHECK_LAST();
    const unsigned tiles = static_cast<unsigned>((T + kTile - 1) / kTile);
    const size_t smem_kv = dkdv_smem(d.Hdp), smem_q = dq_smem(d.Hdp);
    allow_smem(flash_dkdv_kernel<E>, smem_kv);
    allow_smem(flash_dq_kernel<E>, smem_q);
    flash_dkdv_kernel<E>
        <<<dim3(tiles, B * KV), kFlashThreads, smem_kv, stream_>>>(dk, dv, dout, q, k, v, lse_BHT, D, d);
    CUDA_CHECK_LAST();
    flash_dq_kernel<E><<<dim3(tiles, B * H), kFlashThreads, smem_q, stream_>>>(dq, dout, q, k, v, lse_BHT, D, d);
    CUDA_CHECK_LAST();
}

// fp32 q, k, v and d inputs (attention_forward/backward), and bf16 ones (the _bf16 variants)
template void CudaBackend::flash_attention_forward<float>(
    float*, float*, const float*, const float*, const float*, int, int, int, int, int);
template void CudaBackend::flash_attention_forward<uint16_t>(
    float*, float*, const uint16_t*, const uint16_t*, const uint16_t*, int, int, int, int, int);
template void CudaBackend::flash_attention_backward<float>(float*,
                                                           float*,
                                                           float*,
                                                           const float*,
                                                           const float*,
                                                           const float*,
                                                           const float*,
                                                           const float*,
                                                           const float*,
                                                           int,
                                                           int,
                                                           int,
                                                           int,
                                                           int);
template void CudaBackend::flash_attention_backward<uint16_t>(uint16_t*,
                                                              uint16_t*,
                                                              uint16_t*,
                                                              const float*,
                                                              const float*,
                                                              const uint16_t*,
                                                              const uint16_t*,
                                                              const uint16_t*,
                                                              const float*,
                                                              int,
                                                              int,
                                                              int,
                                                              int,
                                                              int);

}  // namespace bmoe::model
