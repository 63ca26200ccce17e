// cpu_backend.cpp -- the CPU reference backend: plain loops + OpenBLAS sgemm, fp32.
//
// Threading rules (see cpu_backend.h): a region is either one BLAS call (OpenBLAS threads) or one
// OpenMP loop, never both nested. Every OpenMP loop writes disjoint outputs and every reduction
// runs in a fixed order, so results do not depend on the thread count.
#include "model/cpu_backend.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "model/routing_plan.h"
#include "parallel/check.h"

namespace bmoe::model {
namespace {

using idx_t = std::ptrdiff_t;  // signed loop index for OpenMP

constexpr size_t kAlign = 64;
constexpr int kColChunk = 64;                  // columns per task in column-parallel reductions
constexpr int kAttBlock = 128;                 // causal row block: rows [r0, r1) only need keys [0, r1)
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2/pi)

// Loops over fewer than ~16K element-ops stay serial: a fork/join costs more than it saves.
constexpr bool par(size_t a, size_t b = 1, size_t c = 1) { return a * b * c > (size_t{1} << 14); }

// A row-major GEMM operand: data, leading dimension, and whether it enters transposed.
struct Op {
    const float* p;
    int ld;
    bool t = false;
    Op rows_from(int r) const { return {p + static_cast<size_t>(r) * ld, ld, t}; }  // skip r stored rows
};

// C_MN = alpha op(A)_MK op(B)_KN + beta C_MN (row-major), tolerating empty dimensions.
void gemm(int M, int N, int K, float alpha, Op A, Op B, float beta, float* C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {  // op(A) op(B) is all zeros; BLAS rejects lda = 0
        for (int i = 0; i < M; ++i)
            for (int j = 0; j < N; ++j) {
                float& c = C[static_cast<size_t>(i) * ldc + j];
                c = beta == 0.0f ? 0.0f : beta * c;
            }
        return;
    }
    cblas_sgemm(CblasRowMajor, A.t ? CblasTrans : CblasNoTrans, B.t ? CblasTrans : CblasNoTrans, M, N, K, alpha, A.p,
                A.ld, B.p, B.ld, beta, C, ldc);
}

// out_D[d] += sum_n f(n, d) for all d, parallel over column chunks; each column sums rows in order.
// f is called as f(n, d0, d1, acc) and must add row n's contribution for columns [d0, d1) to acc.
template <typename RowFn>
void column_reduce(float* out_D, int N, int D, RowFn f) {
    if (out_D == nullptr) return;  // a frozen weight's gradient
    const idx_t chunks = (D + kColChunk - 1) / kColChunk;
#pragma omp parallel for schedule(static) if (par(N, D))
    for (idx_t c = 0; c < chunks; ++c) {
        const int d0 = static_cast<int>(c) * kColChunk, d1 = std::min(D, d0 + kColChunk);
        double acc[kColChunk] = {};
        for (int n = 0; n < N; ++n) f(n, d0, d1, acc);
        for (int d = d0; d < d1; ++d) out_D[d] += static_cast<float>(acc[d - d0]);
    }
}

// Stable softmax of row x_V into p_V; returns logsumexp(x) in double.
double softmax_row(float* p_V, const float* x_V, int V) {
    float mx = x_V[0];
    for (int i = 1; i < V; ++i) mx = std::max(mx, x_V[i]);
    double sum = 0.0;
    for (int i = 0; i < V; ++i) {
        p_V[i] = std::exp(x_V[i] - mx);
        sum += p_V[i];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int i = 0; i < V; ++i) p_V[i] *= inv;
    return static_cast<double>(mx) + std::log(sum);
}

// cos/sin of t * theta^(-2i/Hd), [T, Hd/2], angles in double for accuracy at large t.
void rope_table(std::vector<float>& cos_TH, std::vector<float>& sin_TH, int T, int Hd, float theta) {
    const int half = Hd / 2;
    cos_TH.resize(static_cast<size_t>(T) * half);
    sin_TH.resize(static_cast<size_t>(T) * half);
    for (int i = 0; i < half; ++i) {
        const double freq = std::pow(static_cast<double>(theta), -2.0 * i / Hd);
        for (int t = 0; t < T; ++t) {
            const double angle = t * freq;
            cos_TH[static_cast<size_t>(t) * half + i] = static_cast<float>(std::cos(angle));
            sin_TH[static_cast<size_t>(t) * half + i] = static_cast<float>(std::sin(angle));
        }
    }
}

// Rotates x [B, T, nh, Hd] in place by +angle (sign = 1) or -angle (sign = -1, the transpose).
void rope_apply(float* x, int B, int T, int nh, int Hd, float theta, float sign) {
    BMOE_REQUIRE(Hd % 2 == 0, "rope: head_dim must be even, got ", Hd);
    std::vector<float> cos_TH, sin_TH;
    rope_table(cos_TH, sin_TH, T, Hd, theta);
    const int half = Hd / 2;
#pragma omp parallel for schedule(static) if (par(B, T, nh * Hd))
    for (idx_t bt = 0; bt < static_cast<idx_t>(B) * T; ++bt) {
        const int t = static_cast<int>(bt % T);
        const float* c = &cos_TH[static_cast<size_t>(t) * half];
        const float* s = &sin_TH[static_cast<size_t>(t) * half];
        for (int h = 0; h < nh; ++h) {
            float* xh = x + (static_cast<size_t>(bt) * nh + h) * Hd;
            for (int i = 0; i < half; ++i) {
                const float a = xh[i], b = xh[i + half], si = sign * s[i];
                xh[i] = a * c[i] - b * si;
                xh[i + half] = b * c[i] + a * si;
            }
        }
    }
}

// ---- attention helpers: one (b, h) slice, causal, blocked by rows -----------------------

// S_TT[i, j] = alpha a_i . b_j for j < r1 of i's row block (the causal part; the rest unwritten).
void causal_scores(float* S_TT, Op a, Op b, int T, int Hd, float alpha) {
    b.t = true;
    for (int r0 = 0; r0 < T; r0 += kAttBlock) {
        const int r1 = std::min(T, r0 + kAttBlock);
        gemm(r1 - r0, r1, Hd, alpha, a.rows_from(r0), b, 0.0f, S_TT + static_cast<size_t>(r0) * T, T);
    }
}

// out[i] = beta out[i] + alpha sum_{j<=i} P[i, j] x[j]   (P is zero above the diagonal)
void causal_apply(float* out, int ldo, const float* P_TT, Op x, int T, int Hd, float alpha, float beta) {
    for (int r0 = 0; r0 < T; r0 += kAttBlock) {
        const int r1 = std::min(T, r0 + kAttBlock);
        gemm(r1 - r0, Hd, r1, alpha, Op{P_TT, T}.rows_from(r0), x, beta, out + static_cast<size_t>(r0) * ldo, ldo);
    }
}

// out[j] += alpha sum_{i>=j} P[i, j] x[i]   (the transpose of causal_apply, accumulating)
void causal_apply_t(float* out, int ldo, const float* P_TT, Op x, int T, int Hd, float alpha) {
    for (int r0 = 0; r0 < T; r0 += kAttBlock) {
        const int r1 = std::min(T, r0 + kAttBlock);
        gemm(r1, Hd, r1 - r0, alpha, Op{P_TT, T, true}.rows_from(r0), x.rows_from(r0), 1.0f, out, ldo);
    }
}

// Offsets of the (b, h) slices: q/out rows are strided by H*Hd, k/v rows by KV*Hd (GQA: h reads h / (H/KV)).
struct AttnDims {
    int B, T, H, KV, Hd;
    size_t q_off(int b, int h) const { return static_cast<size_t>(b) * T * H * Hd + static_cast<size_t>(h) * Hd; }
    size_t kv_off(int b, int h) const {
        return static_cast<size_t>(b) * T * KV * Hd + static_cast<size_t>(h / (H / KV)) * Hd;
    }
    size_t att_off(int b, int h) const { return (static_cast<size_t>(b) * H + h) * T * T; }
    Op q(const float* base, int b, int h) const { return {base + q_off(b, h), H * Hd}; }
    Op kv(const float* base, int b, int h) const { return {base + kv_off(b, h), KV * Hd}; }
};

// The causal part (j <= i) of a T x T slice rounded to bf16 into buf (bf16 attention operands).
const float* round_slice(std::vector<float>& buf, const float* S_TT, int T) {
    for (int i = 0; i < T; ++i) {
        const float* src = S_TT + static_cast<size_t>(i) * T;
        float* dst = buf.data() + static_cast<size_t>(i) * T;
        for (int j = 0; j <= i; ++j) dst[j] = round_to_bf16(src[j]);
        std::fill(dst + i + 1, dst + T, 0.0f);
    }
    return buf.data();
}

AttnDims attn_dims(int B, int T, int H, int KV, int Hd) {
    BMOE_REQUIRE(KV > 0 && H % KV == 0, "attention: num_heads (", H, ") must be a multiple of num_kv_heads (", KV, ")");
    return {B, T, H, KV, Hd};
}

}  // namespace

// ---- memory -------------------------------------------------------------------------------

void* CpuBackend::alloc(size_t bytes) {
    BMOE_REQUIRE(bytes <= SIZE_MAX - kAlign, "CpuBackend::alloc: cannot allocate ", bytes, " bytes");
    const size_t rounded = std::max(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
    void* p = std::aligned_alloc(kAlign, rounded);
    BMOE_REQUIRE(p != nullptr, "CpuBackend::alloc: out of host memory allocating ", bytes,
                 " bytes: use a smaller batch/model or a machine with more RAM");
    std::memset(p, 0, rounded);
    note_alloc(p, rounded);
    return p;
}

void CpuBackend::free(void* ptr) {
    note_free(ptr);
    std::free(ptr);
}
void CpuBackend::upload(void* dst, const void* src_host, size_t bytes) {
    if (bytes) std::memcpy(dst, src_host, bytes);
}
void CpuBackend::download(void* dst_host, const void* src, size_t bytes) {
    if (bytes) std::memcpy(dst_host, src, bytes);
}
void CpuBackend::copy(void* dst, const void* src, size_t bytes) {
    if (bytes) std::memmove(dst, src, bytes);
}
void CpuBackend::zero(void* ptr, size_t bytes) {
    if (bytes) std::memset(ptr, 0, bytes);
}
void CpuBackend::synchronize() {}

// ---- elementwise ------------------------------------------------------------------------------

void CpuBackend::add(float* out, const float* a, const float* b, size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) out[i] = a[i] + b[i];
}

void CpuBackend::accumulate(float* out, const float* a, size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) out[i] += a[i];
}

void CpuBackend::scale(float* x, float s, size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) x[i] *= s;
}

void CpuBackend::mul(float* out, const float* a, const float* b, size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) out[i] = a[i] * b[i];
}

double CpuBackend::sum_squares(const float* x, size_t n) {
    // Fixed chunks, partials summed in chunk order: independent of the thread count.
    constexpr size_t kChunk = 1 << 14;
    const idx_t chunks = static_cast<idx_t>((n + kChunk - 1) / kChunk);
    std::vector<double> partial(chunks, 0.0);
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (idx_t c = 0; c < chunks; ++c) {
        const size_t i0 = c * kChunk, i1 = std::min(n, i0 + kChunk);
        double acc = 0.0;
        for (size_t i = i0; i < i1; ++i) acc += static_cast<double>(x[i]) * x[i];
        partial[c] = acc;
    }
    double total = 0.0;
    for (double p : partial) total += p;
    return total;
}

// ---- dense GEMMs ------------------------------------------------------------------------------

const float* CpuBackend::matmul_input(const float* x, size_t n, int slot) {
    if (matmul_precision_ != MatmulPrecision::kBf16 || n == 0) return x;
    if (const uint16_t* x16 = bf16_weight_copy(x, n)) return widen_bf16(x16, n, slot);  // the same values
    std::vector<float>& buf = bf16_scratch_[slot];
    if (buf.size() < n) buf.resize(n);
    float* out = buf.data();
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) out[i] = round_to_bf16(x[i]);
    return out;
}

void CpuBackend::matmul_forward(
    float* out_NO, const float* in_NI, const float* w_OI, const float* bias_O, int N, int I, int O) {
    in_NI = matmul_input(in_NI, static_cast<size_t>(N) * I, 0);
    w_OI = matmul_input(w_OI, static_cast<size_t>(O) * I, 1);
    if (bias_O) {
        for (int n = 0; n < N; ++n) std::memcpy(out_NO + static_cast<size_t>(n) * O, bias_O, O * sizeof(float));
    }
    gemm(N, O, I, 1.0f, {in_NI, I}, {w_OI, I, true}, bias_O ? 1.0f : 0.0f, out_NO, O);
}

void CpuBackend::matmul_backward(float* din_NI,
                                 float* dw_OI,
                                 float* dbias_O,
                                 const float* dout_NO,
                                 const float* in_NI,
                                 const float* w_OI,
                                 int N,
                                 int I,
                                 int O,
                                 bool accumulate_din) {
    dense_backward_rounded(din_NI, dw_OI, matmul_input(dout_NO, static_cast<size_t>(N) * O, 0),
                           dw_OI ? matmul_input(in_NI, static_cast<size_t>(N) * I, 2) : nullptr, w_OI, N, I, O,
                           accumulate_din);
    if (dbias_O) {  // the bias gradient sums the unrounded dout (it is not a GEMM)
        column_reduce(dbias_O, N, O, [&](int n, int d0, int d1, double* acc) {
            const float* row = dout_NO + static_cast<size_t>(n) * O;
            for (int d = d0; d < d1; ++d) acc[d - d0] += row[d];
        });
    }
}

void CpuBackend::grouped_matmul_forward(
    float* out_RO, const float* in_RI, const float* w_GOI, const int* offsets_host, int G, int I, int O) {
    grouped_forward_rounded(out_RO, matmul_input(in_RI, static_cast<size_t>(offsets_host[G]) * I, 0),
                            matmul_input(w_GOI, static_cast<size_t>(G) * O * I, 1), offsets_host, G, I, O);
}

void CpuBackend::grouped_matmul_backward(float* din_RI,
                                         float* dw_GOI,
                                         const float* dout_RO,
                                         const float* in_RI,
                                         const float* w_GOI,
                                         const int* offsets_host,
                                         int G,
                                         int I,
                                         int O) {
    const size_t R = static_cast<size_t>(offsets_host[G]);
    grouped_backward_rounded(din_RI, dw_GOI, matmul_input(dout_RO, R * O, 0),
                             dw_GOI ? matmul_input(in_RI, R * I, 1) : in_RI,
                             matmul_input(w_GOI, static_cast<size_t>(G) * O * I, 2), offsets_host, G, I, O);
}

void CpuBackend::grouped_matmul_forward_bf16(float* out_RO,
                                             uint16_t* out16_RO,
                                             const float* in_RI,
                                             const uint16_t* in16_RI,
                                             const float* w_GOI,
                                             const int* offsets_host,
                                             int G,
                                             int I,
                                             int O) {
    require_bf16_precision("grouped_matmul_forward_bf16");
    require_forward_bf16_pairs("grouped_matmul_forward_bf16", out_RO, out16_RO, in_RI, in16_RI);
    const size_t R = static_cast<size_t>(offsets_host[G]);
    const float* in = in16_RI ? widen_bf16(in16_RI, R * I, 0) : matmul_input(in_RI, R * I, 0);
    float* out = out_RO ? out_RO : fp32_result(R * O);
    grouped_forward_rounded(out, in, matmul_input(w_GOI, static_cast<size_t>(G) * O * I, 1), offsets_host, G, I, O);
    if (out16_RO) CpuBackend::float_to_bf16(out16_RO, out, R * O);
}

void CpuBackend::grouped_matmul_backward_bf16(float* din_RI,
                                              uint16_t* din16_RI,
                                              float* dw_GOI,
                                              const float* dout_RO,
                                              const uint16_t* dout16_RO,
                                              const float* in_RI,
                                              const uint16_t* in16_RI,
                                              const float* w_GOI,
                                              const int* offsets_host,
                                              int G,
                                              int I,
                                              int O) {
    require_bf16_precision("grouped_matmul_backward_bf16");
    require_backward_bf16_pairs("grouped_matmul_backward_bf16", /*din_optional=*/false, din_RI, din16_RI, dw_GOI,
                                dout_RO, dout16_RO, in_RI, in16_RI);
    const size_t R = static_cast<size_t>(offsets_host[G]);
    const float* dout = dout16_RO ? widen_bf16(dout16_RO, R * O, 0) : matmul_input(dout_RO, R * O, 0);
    const float* in = !dw_GOI ? nullptr : in16_RI ? widen_bf16(in16_RI, R * I, 1) : matmul_input(in_RI, R * I, 1);
    float* din = din16_RI ? fp32_result(R * I) : din_RI;
    grouped_backward_rounded(din, dw_GOI, dout, in, matmul_input(w_GOI, static_cast<size_t>(G) * O * I, 2),
                             offsets_host, G, I, O);
    if (din16_RI) CpuBackend::float_to_bf16(din16_RI, din, R * I);
}

float* CpuBackend::fp32_result(size_t n) {
    std::vector<float>& buf = bf16_scratch_[3];
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}

void CpuBackend::grouped_forward_rounded(
    float* out_RO, const float* in_RI, const float* w_GOI, const int* offsets_host, int G, int I, int O) {
    for (int g = 0; g < G; ++g) {
        const int r0 = offsets_host[g], rows = offsets_host[g + 1] - r0;
        if (rows <= 0) continue;
        gemm(rows, O, I, 1.0f, Op{in_RI, I}.rows_from(r0), {w_GOI + static_cast<size_t>(g) * O * I, I, true}, 0.0f,
             out_RO + static_cast<size_t>(r0) * O, O);
    }
}

void CpuBackend::grouped_backward_rounded(float* din_RI,
                                          float* dw_GOI,
                                          const float* dout_RO,
                                          const float* in_RI,
                                          const float* w_GOI,
                                          const int* offsets_host,
                                          int G,
                                          int I,
                                          int O) {
    for (int g = 0; g < G; ++g) {
        const int r0 = offsets_host[g], rows = offsets_host[g + 1] - r0;
        if (rows <= 0) continue;
        const float* dout = dout_RO + static_cast<size_t>(r0) * O;
        const size_t w_off = static_cast<size_t>(g) * O * I;
        gemm(rows, I, O, 1.0f, {dout, O}, {w_GOI + w_off, I}, 0.0f, din_RI + static_cast<size_t>(r0) * I, I);
        if (dw_GOI)
            gemm(O, I, rows, 1.0f, {dout, O, true}, {in_RI + static_cast<size_t>(r0) * I, I}, 1.0f, dw_GOI + w_off, I);
    }
}

const float* CpuBackend::widen_bf16(const uint16_t* x16, size_t n, int slot) {
    std::vector<float>& buf = bf16_scratch_[slot];
    if (buf.size() < n) buf.resize(n);
    float* out = buf.data();
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) out[i] = model::bf16_to_float(x16[i]);
    return out;
}

// ---- embeddings -------------------------------------------------------------------------------

void CpuBackend::embedding_forward(float* out_ND, const int32_t* tokens_N, const float* table_VD, int N, int D) {
#pragma omp parallel for schedule(static) if (par(N, D))
    for (idx_t n = 0; n < N; ++n) {
        std::memcpy(out_ND + n * D, table_VD + static_cast<size_t>(tokens_N[n]) * D, D * sizeof(float));
    }
}

void CpuBackend::embedding_backward(float* dtable_VD, const float* dout_ND, const int32_t* tokens_N, int N, int D) {
    if (dtable_VD == nullptr) return;
    // Parallel over column chunks; every table entry receives its rows in token order n.
    const idx_t chunks = (D + kColChunk - 1) / kColChunk;
#pragma omp parallel for schedule(static) if (par(N, D))
    for (idx_t c = 0; c < chunks; ++c) {
        const int d0 = static_cast<int>(c) * kColChunk, d1 = std::min(D, d0 + kColChunk);
        for (int n = 0; n < N; ++n) {
            float* dst = dtable_VD + static_cast<size_t>(tokens_N[n]) * D;
            const float* src = dout_ND + static_cast<size_t>(n) * D;
            for (int d = d0; d < d1; ++d) dst[d] += src[d];
        }
    }
}

void CpuBackend::position_forward(float* x_BTD, const float* wpe_SD, int B, int T, int D) {
#pragma omp parallel for schedule(static) if (par(B, T, D))
    for (idx_t bt = 0; bt < static_cast<idx_t>(B) * T; ++bt) {
        float* x = x_BTD + bt * D;
        const float* p = wpe_SD + (bt % T) * D;
        for (int d = 0; d < D; ++d) x[d] += p[d];
    }
}

void CpuBackend::position_backward(float* dwpe_SD, const float* dx_BTD, int B, int T, int D) {
    if (dwpe_SD == nullptr) return;
#pragma omp parallel for schedule(static) if (par(B, T, D))
    for (idx_t t = 0; t < T; ++t) {
        float* dst = dwpe_SD + t * D;
        for (int b = 0; b < B; ++b) {
            const float* src = dx_BTD + (static_cast<size_t>(b) * T + t) * D;
            for (int d = 0; d < D; ++d) dst[d] += src[d];
        }
    }
}

// ---- norms ------------------------------------------------------------------------------------

namespace {
// An output element as stored: fp32, or its bf16 rounding (the *_bf16 ops that write bf16).
inline void store_as(float* y, float v) { *y = v; }
inline void store_as(uint16_t* y, float v) { *y = bf16_bits(v); }

template <typename Out>
void rmsnorm_rows(Out* out_ND, float* rstd_N, const float* in_ND, const float* w_D, int N, int D, float eps) {
#pragma omp parallel for schedule(static) if (par(N, D))
    for (idx_t n = 0; n < N; ++n) {
        const float* x = in_ND + n * D;
        double ss = 0.0;
        for (int d = 0; d < D; ++d) ss += static_cast<double>(x[d]) * x[d];
        const float rstd = static_cast<float>(1.0 / std::sqrt(ss / D + eps));
        Out* y = out_ND + n * D;
        for (int d = 0; d < D; ++d) store_as(y + d, x[d] * rstd * w_D[d]);
        rstd_N[n] = rstd;
    }
}

template <typename Out>
void layernorm_rows(Out* out_ND,
                    float* mean_N,
                    float* rstd_N,
                    const float* in_ND,
                    const float* w_D,
                    const float* b_D,
                    int N,
                    int D,
                    float eps) {
#pragma omp parallel for schedule(static) if (par(N, D))
    for (idx_t n = 0; n < N; ++n) {
        const float* x = in_ND + n * D;
        double sum = 0.0;
        for (int d = 0; d < D; ++d) sum += x[d];
        const double mean = sum / D;
        double var = 0.0;
        for (int d = 0; d < D; ++d) var += (x[d] - mean) * (x[d] - mean);
        const float m = static_cast<float>(mean), rstd = static_cast<float>(1.0 / std::sqrt(var / D + eps));
        Out* y = out_ND + n * D;
        for (int d = 0; d < D; ++d) store_as(y + d, (x[d] - m) * rstd * w_D[d] + b_D[d]);
        mean_N[n] = m;
        rstd_N[n] = rstd;
    }
}
}  // namespace

void CpuBackend::rmsnorm_forward(
    float* out_ND, float* rstd_N, const float* in_ND, const float* w_D, int N, int D, float eps) {
    rmsnorm_rows(out_ND, rstd_N, in_ND, w_D, N, D, eps);
}

void CpuBackend::rmsnorm_forward_bf16(
    uint16_t* out16_ND, float* rstd_N, const float* in_ND, const float* w_D, int N, int D, float eps) {
    require_bf16_precision("rmsnorm_forward_bf16");
    rmsnorm_rows(out16_ND, rstd_N, in_ND, w_D, N, D, eps);
}

void CpuBackend::rmsnorm_backward(float* din_ND,
                                  float* dw_D,
                                  const float* dout_ND,
                                  const float* in_ND,
                                  const float* w_D,
                                  const float* rstd_N,
                                  int N,
                                  int D) {
    // y = x r w, r = (mean x^2 + eps)^-1/2:  dx = r w dy - x r^3 / D * sum(dy w x)
#pragma omp parallel for schedule(static) if (par(N, D))
    for (idx_t n = 0; n < N; ++n) {
        const float *x = in_ND + n * D, *dy = dout_ND + n * D;
        const float r = rstd_N[n];
        double dot = 0.0;
        for (int d = 0; d < D; ++d) dot += static_cast<double>(dy[d]) * w_D[d] * x[d];
        const float c = static_cast<float>(dot * r * r * r / D);
        float* dx = din_ND + n * D;
        for (int d = 0; d < D; ++d) dx[d] += r * w_D[d] * dy[d] - x[d] * c;
    }
    column_reduce(dw_D, N, D, [&](int n, int d0, int d1, double* acc) {
        const float *x = in_ND + static_cast<size_t>(n) * D, *dy = dout_ND + static_cast<size_t>(n) * D;
        const float r = rstd_N[n];
        for (int d = d0; d < d1; ++d) acc[d - d0] += dy[d] * x[d] * r;
    });
}

void CpuBackend::layernorm_forward(float* out_ND,
                                   float* mean_N,
                                   float* rstd_N,
                                   const float* in_ND,
                                   const float* w_D,
                                   const float* b_D,
                                   int N,
                                   int D,
                                   float eps) {
    layernorm_rows(out_ND, mean_N, rstd_N, in_ND, w_D, b_D, N, D, eps);
}

void CpuBackend::layernorm_forward_bf16(uint16_t* out16_ND,
                                        float* mean_N,
                                        float* rstd_N,
                                        const float* in_ND,
                                        const float* w_D,
                                        const float* b_D,
                                        int N,
                                        int D,
                                        float eps) {
    require_bf16_precision("layernorm_forward_bf16");
    layernorm_rows(out16_ND, mean_N, rstd_N, in_ND, w_D, b_D, N, D, eps);
}

void CpuBackend::layernorm_backward(float* din_ND,
                                    float* dw_D,
                                    float* db_D,
                                    const float* dout_ND,
                                    const float* in_ND,
                                    const float* w_D,
                                    const float* mean_N,
                                    const float* rstd_N,
                                    int N,
                                    int D) {
    // xhat = (x - mean) r;  dx = r (g - mean(g) - xhat mean(g xhat)),  g = dy w
#pragma omp parallel for schedule(static) if (par(N, D))
    for (idx_t n = 0; n < N; ++n) {
        const float *x = in_ND + n * D, *dy = dout_ND + n * D;
        const float m = mean_N[n], r = rstd_N[n];
        double g_mean = 0.0, gx_mean = 0.0;
        for (int d = 0; d < D; ++d) {
            const float g = dy[d] * w_D[d];
            g_mean += g;
            gx_mean += static_cast<double>(g) * (x[d] - m) * r;
        }
        const float gm = static_cast<float>(g_mean / D), gxm = static_cast<float>(gx_mean / D);
        float* dx = din_ND + n * D;
        for (int d = 0; d < D; ++d) dx[d] += r * (dy[d] * w_D[d] - gm - (x[d] - m) * r * gxm);
    }
    column_reduce(dw_D, N, D, [&](int n, int d0, int d1, double* acc) {
        const float *x = in_ND + static_cast<size_t>(n) * D, *dy = dout_ND + static_cast<size_t>(n) * D;
        const float m = mean_N[n], r = rstd_N[n];
        for (int d = d0; d < d1; ++d) acc[d - d0] += dy[d] * (x[d] - m) * r;
    });
    column_reduce(db_D, N, D, [&](int n, int d0, int d1, double* acc) {
        const float* dy = dout_ND + static_cast<size_t>(n) * D;
        for (int d = d0; d < d1; ++d) acc[d - d0] += dy[d];
    });
}

// ---- attention --------------------------------------------------------------------------------

void CpuBackend::rope_forward(float* x_BTHd, int B, int T, int nh, int Hd, float theta) {
    rope_apply(x_BTHd, B, T, nh, Hd, theta, 1.0f);
}

void CpuBackend::rope_backward(float* dx_BTHd, int B, int T, int nh, int Hd, float theta) {
    rope_apply(dx_BTHd, B, T, nh, Hd, theta, -1.0f);
}

// One task per (b, h): scores, softmax and P V of a slice. Inside an OpenMP region the OpenMP build
// of OpenBLAS runs single-threaded, so the small GEMMs do not fight for cores. bf16 matmul
// precision rounds every product's operands (q, k, P, v) as the CUDA backend's tensor cores do;
// the softmax and the stored P stay fp32.
void CpuBackend::attention_forward(float* out_BTHd,
                                   float* att_BHTT,
                                   const float* q_BTHd,
                                   const float* k_BTKVHd,
                                   const float* v_BTKVHd,
                                   int B,
                                   int T,
                                   int H,
                                   int KV,
                                   int Hd) {
    const AttnDims a = attn_dims(B, T, H, KV, Hd);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(Hd)));
    const bool bf16 = matmul_precision_ == MatmulPrecision::kBf16;
    const size_t q_n = static_cast<size_t>(B) * T * H * Hd, kv_n = static_cast<size_t>(B) * T * KV * Hd;
    q_BTHd = matmul_input(q_BTHd, q_n, 0);
    k_BTKVHd = matmul_input(k_BTKVHd, kv_n, 1);
    v_BTKVHd = matmul_input(v_BTKVHd, kv_n, 2);
#pragma omp parallel if (B * H > 1)
    {
        std::vector<float> p16(bf16 ? static_cast<size_t>(T) * T : 0);  // this thread's rounded P
#pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; ++b) {
            for (int h = 0; h < H; ++h) {
                float* att = att_BHTT + a.att_off(b, h);
                causal_scores(att, a.q(q_BTHd, b, h), a.kv(k_BTKVHd, b, h), T, Hd, scale);
                for (int i = 0; i < T; ++i) {
                    float* p = att + static_cast<size_t>(i) * T;
                    softmax_row(p, p, i + 1);
                    std::fill(p + i + 1, p + T, 0.0f);
                }
                const float* P = bf16 ? round_slice(p16, att, T) : att;
                causal_apply(out_BTHd + a.q_off(b, h), H * Hd, P, a.kv(v_BTKVHd, b, h), T, Hd, 1.0f, 0.0f);
            }
        }
    }
}

// dP = dout v^T;  dS = P (dP - rowsum(P dP));  dq = s dS k;  dk += s dS^T q;  dv += P^T dout
// (bf16 matmul precision: every product's operands rounded, as in attention_forward).
void CpuBackend::attention_backward(float* dq_BTHd,
                                    float* dk_BTKVHd,
                                    float* dv_BTKVHd,
                                    const float* dout_BTHd,
                                    const float* /*out_BTHd: the saved probabilities suffice*/,
                                    const float* q_BTHd,
                                    const float* k_BTKVHd,
                                    const float* v_BTKVHd,
                                    const float* att_BHTT,
                                    int B,
                                    int T,
                                    int H,
                                    int KV,
                                    int Hd) {
    const AttnDims a = attn_dims(B, T, H, KV, Hd);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(Hd)));
    const bool bf16 = matmul_precision_ == MatmulPrecision::kBf16;
    auto dS = std::make_unique_for_overwrite<float[]>(static_cast<size_t>(B) * H * T * T);
    const size_t q_n = static_cast<size_t>(B) * T * H * Hd, kv_n = static_cast<size_t>(B) * T * KV * Hd;
    std::memset(dk_BTKVHd, 0, kv_n * sizeof(float));
    std::memset(dv_BTKVHd, 0, kv_n * sizeof(float));
    dout_BTHd = matmul_input(dout_BTHd, q_n, 0);
    q_BTHd = matmul_input(q_BTHd, q_n, 1);
    k_BTKVHd = matmul_input(k_BTKVHd, kv_n, 2);
    v_BTKVHd = matmul_input(v_BTKVHd, kv_n, 3);
    // One task per (b, kv head): its query heads run in a fixed order, so dk/dv sum them
    // deterministically and no two tasks write the same rows.
    const int group = H / KV;
#pragma omp parallel if (B * KV > 1)
    {
        std::vector<float> p16(bf16 ? static_cast<size_t>(T) * T : 0), ds16(p16.size());
#pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; ++b) {
            for (int g = 0; g < KV; ++g) {
                for (int h = g * group; h < (g + 1) * group; ++h) {
                    float* ds = dS.get() + a.att_off(b, h);
                    const float* p = att_BHTT + a.att_off(b, h);
                    causal_scores(ds, a.q(dout_BTHd, b, h), a.kv(v_BTKVHd, b, h), T, Hd, 1.0f);
                    for (int i = 0; i < T; ++i) {  // dS = P * (dP - rowsum(P * dP))
                        const float* pi = p + static_cast<size_t>(i) * T;
                        float* dsi = ds + static_cast<size_t>(i) * T;
                        double dot = 0.0;
                        for (int j = 0; j <= i; ++j) dot += static_cast<double>(pi[j]) * dsi[j];
                        for (int j = 0; j <= i; ++j) dsi[j] = pi[j] * (dsi[j] - static_cast<float>(dot));
                        std::fill(dsi + i + 1, dsi + T, 0.0f);
                    }
                    const float* dS_op = bf16 ? round_slice(ds16, ds, T) : ds;
                    const float* P_op = bf16 ? round_slice(p16, p, T) : p;
                    causal_apply(dq_BTHd + a.q_off(b, h), H * Hd, dS_op, a.kv(k_BTKVHd, b, h), T, Hd, scale, 0.0f);
                    causal_apply_t(dk_BTKVHd + a.kv_off(b, h), KV * Hd, dS_op, a.q(q_BTHd, b, h), T, Hd, scale);
                    causal_apply_t(dv_BTKVHd + a.kv_off(b, h), KV * Hd, P_op, a.q(dout_BTHd, b, h), T, Hd, 1.0f);
                }
            }
        }
    }
}

// ---- activations ------------------------------------------------------------------------------

namespace {
inline float swiglu_value(float g, float up) { return g / (1.0f + std::exp(-g)) * up; }
inline float gelu_value(float x) { return 0.5f * x * (1.0f + std::tanh(kGeluC * (x + 0.044715f * x * x * x))); }
inline float gelu_grad(float x) {
    const float th = std::tanh(kGeluC * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * kGeluC * (1.0f + 3.0f * 0.044715f * x * x);
}
inline void swiglu_grads(float dout, float g, float up, float& dgate, float& dup) {
    const float s = 1.0f / (1.0f + std::exp(-g));
    dgate = dout * up * s * (1.0f + g * (1.0f - s));  // d silu/dg = s (1 + g (1 - s))
    dup = dout * g * s;
}
}  // namespace

void CpuBackend::swiglu_forward(float* out, const float* gate, const float* up, size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) out[i] = swiglu_value(gate[i], up[i]);
}

void CpuBackend::swiglu_forward_bf16(uint16_t* out16, const uint16_t* gate16, const uint16_t* up16, size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i)
        out16[i] = bf16_bits(swiglu_value(model::bf16_to_float(gate16[i]), model::bf16_to_float(up16[i])));
}

void CpuBackend::swiglu_backward(
    float* dgate, float* dup, const float* dout, const float* gate, const float* up, size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) swiglu_grads(dout[i], gate[i], up[i], dgate[i], dup[i]);
}

void CpuBackend::swiglu_backward_bf16(uint16_t* dgate16,
                                      uint16_t* dup16,
                                      const uint16_t* dout16,
                                      const uint16_t* gate16,
                                      const uint16_t* up16,
                                      size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) {
        float dg, du;
        swiglu_grads(model::bf16_to_float(dout16[i]), model::bf16_to_float(gate16[i]), model::bf16_to_float(up16[i]),
                     dg, du);
        dgate16[i] = bf16_bits(dg), dup16[i] = bf16_bits(du);
    }
}

void CpuBackend::gelu_forward(float* out, const float* in, size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) out[i] = gelu_value(in[i]);
}

void CpuBackend::gelu_forward_bf16(uint16_t* out16, const uint16_t* in16, size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) out16[i] = bf16_bits(gelu_value(model::bf16_to_float(in16[i])));
}

void CpuBackend::gelu_backward(float* din, const float* dout, const float* in, size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) din[i] = gelu_grad(in[i]) * dout[i];
}

void CpuBackend::gelu_backward_bf16(uint16_t* din16, const uint16_t* dout16, const uint16_t* in16, size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i)
        din16[i] = bf16_bits(gelu_grad(model::bf16_to_float(in16[i])) * model::bf16_to_float(dout16[i]));
}

// ---- loss -------------------------------------------------------------------------------------

void CpuBackend::cross_entropy_forward(
    float* loss_N, float* probs_NV, const float* logits_NV, const int32_t* targets_N, int N, int V) {
#pragma omp parallel for schedule(static) if (par(N, V))
    for (idx_t n = 0; n < N; ++n) {
        const float* logits = logits_NV + n * V;
        const int32_t t = targets_N[n];
        const float target_logit = t < 0 ? 0.0f : logits[t];  // read first: probs may overwrite logits
        const double lse = softmax_row(probs_NV + n * V, logits, V);
        loss_N[n] = t < 0 ? 0.0f : static_cast<float>(lse - target_logit);
    }
}

void CpuBackend::cross_entropy_backward(
    float* dlogits_NV, const float* probs_NV, const int32_t* targets_N, float dloss, int N, int V) {
#pragma omp parallel for schedule(static) if (par(N, V))
    for (idx_t n = 0; n < N; ++n) {
        float* dl = dlogits_NV + n * V;
        const float* p = probs_NV + n * V;
        const int32_t t = targets_N[n];
        if (t < 0) {
            std::fill(dl, dl + V, 0.0f);
            continue;
        }
        for (int v = 0; v < V; ++v) dl[v] = dloss * p[v];
        dl[t] -= dloss;
    }
}

// ---- the LM head and loss on bf16 logits -------------------------------------------------------

void CpuBackend::matmul_forward_bf16(float* out_NO,
                                     uint16_t* out16_NO,
                                     const float* in_NI,
                                     const uint16_t* in16_NI,
                                     const float* w_OI,
                                     int N,
                                     int I,
                                     int O) {
    require_bf16_precision("matmul_forward_bf16");
    require_forward_bf16_pairs("matmul_forward_bf16", out_NO, out16_NO, in_NI, in16_NI);
    const float* in = in16_NI ? widen_bf16(in16_NI, static_cast<size_t>(N) * I, 0)
                              : matmul_input(in_NI, static_cast<size_t>(N) * I, 0);
    const float* w = matmul_input(w_OI, static_cast<size_t>(O) * I, 1);
    if (out_NO) {
        gemm(N, O, I, 1.0f, {in, I}, {w, I, true}, 0.0f, out_NO, O);
        return;
    }
    // bf16 results from fp32 ones a block of rows at a time: the scratch stays small at a 50K vocabulary
    constexpr int kRows = 256;
    float* out = fp32_result(static_cast<size_t>(std::min(N, kRows)) * O);
    for (int r0 = 0; r0 < N; r0 += kRows) {
        const int rows = std::min(kRows, N - r0);
        gemm(rows, O, I, 1.0f, Op{in, I}.rows_from(r0), {w, I, true}, 0.0f, out, O);
        CpuBackend::float_to_bf16(out16_NO + static_cast<size_t>(r0) * O, out, static_cast<size_t>(rows) * O);
    }
}

void CpuBackend::matmul_backward_bf16(float* din_NI,
                                      float* dw_OI,
                                      const float* dout_NO,
                                      const uint16_t* dout16_NO,
                                      const float* in_NI,
                                      const uint16_t* in16_NI,
                                      const float* w_OI,
                                      int N,
                                      int I,
                                      int O,
                                      bool accumulate_din) {
    require_bf16_precision("matmul_backward_bf16");
    require_backward_bf16_pairs("matmul_backward_bf16", /*din_optional=*/true, din_NI, nullptr, dw_OI, dout_NO,
                                dout16_NO, in_NI, in16_NI);
    const size_t NO = static_cast<size_t>(N) * O;
    const float* dout = dout16_NO ? widen_bf16(dout16_NO, NO, 0) : matmul_input(dout_NO, NO, 0);
    const size_t NI = static_cast<size_t>(N) * I;
    const float* in = !dw_OI ? nullptr : in16_NI ? widen_bf16(in16_NI, NI, 2) : matmul_input(in_NI, NI, 2);
    dense_backward_rounded(din_NI, dw_OI, dout, in, w_OI, N, I, O, accumulate_din);
}

// dout and in already rounded (or fp32; in read only with dw); w rounded here where din needs it.
void CpuBackend::dense_backward_rounded(float* din_NI,
                                        float* dw_OI,
                                        const float* dout_NO,
                                        const float* in_NI,
                                        const float* w_OI,
                                        int N,
                                        int I,
                                        int O,
                                        bool accumulate_din) {
    if (din_NI)
        gemm(N, I, O, 1.0f, {dout_NO, O}, {matmul_input(w_OI, static_cast<size_t>(O) * I, 1), I},
             accumulate_din ? 1.0f : 0.0f, din_NI, I);
    if (dw_OI) gemm(O, I, N, 1.0f, {dout_NO, O, true}, {in_NI, I}, 1.0f, dw_OI, I);
}

void CpuBackend::cross_entropy_forward_bf16(
    float* loss_N, float* lse_N, const uint16_t* logits16_NV, const int32_t* targets_N, int N, int V) {
    require_bf16_precision("cross_entropy_forward_bf16");
#pragma omp parallel for schedule(static) if (par(N, V))
    for (idx_t n = 0; n < N; ++n) {
        const uint16_t* x = logits16_NV + n * V;
        float mx = -INFINITY;
        for (int v = 0; v < V; ++v) mx = std::max(mx, model::bf16_to_float(x[v]));
        double sum = 0.0;
        for (int v = 0; v < V; ++v) sum += std::exp(model::bf16_to_float(x[v]) - mx);
        const double lse = static_cast<double>(mx) + std::log(sum);
        const int32_t t = targets_N[n];
        lse_N[n] = static_cast<float>(lse);
        loss_N[n] = t < 0 ? 0.0f : static_cast<float>(lse - model::bf16_to_float(x[t]));
    }
}

void CpuBackend::cross_entropy_backward_bf16(uint16_t* dlogits16_NV,
                                             const uint16_t* logits16_NV,
                                             const float* lse_N,
                                             const int32_t* targets_N,
                                             float dloss,
                                             int N,
                                             int V) {
    require_bf16_precision("cross_entropy_backward_bf16");
#pragma omp parallel for schedule(static) if (par(N, V))
    for (idx_t n = 0; n < N; ++n) {
        const uint16_t* x = logits16_NV + n * V;
        uint16_t* d = dlogits16_NV + n * V;
        const int32_t t = targets_N[n];
        const float lse = lse_N[n];
        for (int v = 0; v < V; ++v) {  // each element read before it is overwritten: in place is safe
            const float p = std::exp(model::bf16_to_float(x[v]) - lse);
            d[v] = t < 0 ? uint16_t{0} : bf16_bits(dloss * (v == t ? p - 1.0f : p));
        }
    }
}

// ---- MoE router and token permutation ---------------------------------------------------------

void CpuBackend::router_topk_forward(float* probs_NE,
                                     float* lse_N,
                                     int32_t* topk_idx_NK,
                                     float* topk_weight_NK,
                                     const float* logits_NE,
                                     int N,
                                     int E,
                                     int K,
                                     bool renormalize) {
#pragma omp parallel for schedule(static) if (par(N, E, K))
    for (idx_t n = 0; n < N; ++n) {
        const float* p = probs_NE + n * E;
        lse_N[n] = static_cast<float>(softmax_row(probs_NE + n * E, logits_NE + n * E, E));
        int32_t* idx = topk_idx_NK + n * K;
        float* w = topk_weight_NK + n * K;
        double sum = 0.0;
        for (int k = 0; k < K; ++k) {  // selection: strict '>' keeps the lower index on ties
            int best = -1;
            for (int e = 0; e < E; ++e) {
                if (std::find(idx, idx + k, e) != idx + k) continue;
                if (best < 0 || p[e] > p[best]) best = e;
            }
            idx[k] = best;
            w[k] = p[best];
            sum += p[best];
        }
        if (renormalize) {
            for (int k = 0; k < K; ++k) w[k] = static_cast<float>(w[k] / sum);
        }
    }
}

void CpuBackend::router_topk_backward(float* dlogits_NE,
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
#pragma omp parallel for schedule(static) if (par(N, E, K))
    for (idx_t n = 0; n < N; ++n) {
        const float* p = probs_NE + n * E;
        const int32_t* idx = topk_idx_NK + n * K;
        const float *dg = dtopk_weight_NK + n * K, *g = topk_weight_NK + n * K;
        float* dp = dlogits_NE + n * E;  // dprobs first, turned into dlogits in place
        for (int e = 0; e < E; ++e) dp[e] = aux_dprobs_E ? aux_dprobs_E[e] : 0.0f;
        if (renormalize) {  // g_k = p_k / S:  dp_k += dg_k / S - sum_j dg_j g_j / S
            double S = 0.0, dgg = 0.0;
            for (int k = 0; k < K; ++k) {
                S += p[idx[k]];
                dgg += static_cast<double>(dg[k]) * g[k];
            }
            for (int k = 0; k < K; ++k) dp[idx[k]] += static_cast<float>((dg[k] - dgg) / S);
        } else {
            for (int k = 0; k < K; ++k) dp[idx[k]] += dg[k];
        }
        double pdp = 0.0;
        for (int e = 0; e < E; ++e) pdp += static_cast<double>(p[e]) * dp[e];
        const float z = 2.0f * zloss_coef * lse_N[n];  // d(c lse^2)/dlogit_e = 2 c lse p_e
        for (int e = 0; e < E; ++e) dp[e] = p[e] * (dp[e] - static_cast<float>(pdp) + z);
    }
}

void CpuBackend::moe_plan_routing(int32_t* row_src_R,
                                  int32_t* slot_row_NK,
                                  int32_t* counts_E,
                                  const int32_t* topk_idx_NK,
                                  int N,
                                  int K,
                                  int E,
                                  int capacity) {
    const RoutingPlan plan = plan_routing(topk_idx_NK, N, K, E, capacity);
    std::copy(plan.row_src.begin(), plan.row_src.end(), row_src_R);
    std::copy(plan.slot_row.begin(), plan.slot_row.end(), slot_row_NK);
    for (int e = 0; e < E; ++e) counts_E[e] = static_cast<int32_t>(plan.tokens_per_expert[e]);
}

void CpuBackend::moe_gather_forward(float* x_RD, const float* x_ND, const int32_t* row_src_R, int R, int K, int D) {
#pragma omp parallel for schedule(static) if (par(R, D))
    for (idx_t r = 0; r < R; ++r) {
        std::memcpy(x_RD + r * D, x_ND + static_cast<size_t>(row_src_R[r] / K) * D, D * sizeof(float));
    }
}

void CpuBackend::moe_gather_forward_bf16(
    uint16_t* x16_RD, const float* x_ND, const int32_t* row_src_R, int R, int K, int D) {
    require_bf16_precision("moe_gather_forward_bf16");
#pragma omp parallel for schedule(static) if (par(R, D))
    for (idx_t r = 0; r < R; ++r) {
        const float* x = x_ND + static_cast<size_t>(row_src_R[r] / K) * D;
        for (int d = 0; d < D; ++d) x16_RD[r * D + d] = bf16_bits(x[d]);
    }
}

void CpuBackend::gather_rows_bf16(uint16_t* out16_LD, const uint16_t* in16_RD, const int32_t* src_L, int L, int D) {
#pragma omp parallel for schedule(static) if (par(L, D))
    for (idx_t l = 0; l < L; ++l)
        std::memcpy(out16_LD + l * D, in16_RD + static_cast<size_t>(src_L[l]) * D, D * sizeof(uint16_t));
}

void CpuBackend::moe_gather_backward(
    float* dx_ND, const float* dx_RD, const int32_t* slot_row_NK, int N, int K, int D) {
#pragma omp parallel for schedule(static) if (par(N, K, D))
    for (idx_t n = 0; n < N; ++n) {
        float* dx = dx_ND + n * D;
        for (int k = 0; k < K; ++k) {
            const int32_t r = slot_row_NK[n * K + k];
            if (r < 0) continue;
            const float* src = dx_RD + static_cast<size_t>(r) * D;
            for (int d = 0; d < D; ++d) dx[d] += src[d];
        }
    }
}

void CpuBackend::moe_combine_forward(
    float* y_ND, const float* y_RD, const int32_t* slot_row_NK, const float* topk_weight_NK, int N, int K, int D) {
#pragma omp parallel for schedule(static) if (par(N, K, D))
    for (idx_t n = 0; n < N; ++n) {
        float* y = y_ND + n * D;
        std::fill(y, y + D, 0.0f);
        for (int k = 0; k < K; ++k) {
            const int32_t r = slot_row_NK[n * K + k];
            if (r < 0) continue;
            const float w = topk_weight_NK[n * K + k];
            const float* src = y_RD + static_cast<size_t>(r) * D;
            for (int d = 0; d < D; ++d) y[d] += w * src[d];
        }
    }
}

namespace {
// dy_RD[r] = topk_weight[src] * dy_ND[src / K], stored as Out
template <typename Out>
void combine_backward_rows(
    Out* dy_RD, const float* dy_ND, const int32_t* row_src_R, const float* topk_weight_NK, int R, int K, int D) {
#pragma omp parallel for schedule(static) if (par(R, D))
    for (idx_t r = 0; r < R; ++r) {
        const int32_t src = row_src_R[r];
        const float w = topk_weight_NK[src];
        const float* dy = dy_ND + static_cast<size_t>(src / K) * D;
        Out* dst = dy_RD + r * D;
        for (int d = 0; d < D; ++d) store_as(dst + d, w * dy[d]);
    }
}
}  // namespace

void CpuBackend::moe_combine_backward_bf16(uint16_t* dy16_RD,
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
    require_bf16_precision("moe_combine_backward_bf16");
    combine_backward_rows(dy16_RD, dy_ND, row_src_R, topk_weight_NK, R, K, D);
    combine_backward_gates(dtopk_weight_NK, dy_ND, y_RD, slot_row_NK, N, K, D);
}

void CpuBackend::moe_combine_backward(float* dy_RD,
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
    combine_backward_rows(dy_RD, dy_ND, row_src_R, topk_weight_NK, R, K, D);
    combine_backward_gates(dtopk_weight_NK, dy_ND, y_RD, slot_row_NK, N, K, D);
}

// dtopk_weight_NK[n,k] = dot(dy_ND[n], y_RD[slot_row_NK[n,k]]), 0 for dropped copies
void CpuBackend::combine_backward_gates(
    float* dtopk_weight_NK, const float* dy_ND, const float* y_RD, const int32_t* slot_row_NK, int N, int K, int D) {
#pragma omp parallel for schedule(static) if (par(N, K, D))
    for (idx_t nk = 0; nk < static_cast<idx_t>(N) * K; ++nk) {
        const int32_t r = slot_row_NK[nk];
        if (r < 0) {
            dtopk_weight_NK[nk] = 0.0f;
            continue;
        }
        const float *dy = dy_ND + (nk / K) * D, *y = y_RD + static_cast<size_t>(r) * D;
        double dot = 0.0;
        for (int d = 0; d < D; ++d) dot += static_cast<double>(dy[d]) * y[d];
        dtopk_weight_NK[nk] = static_cast<float>(dot);
    }
}

// ---- optimizer --------------------------------------------------------------------------------

void CpuBackend::adamw_update(float* param,
                              const float* grad,
                              float* m,
                              float* v,
                              uint16_t* param16,
                              size_t n,
                              float lr,
                              float beta1,
                              float beta2,
                              float eps,
                              float weight_decay,
                              float grad_scale,
                              int step) {
    // PyTorch order: p *= 1 - lr wd; p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
    const float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), step));
    const float sqrt_bc2 = static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(beta2), step)));
    const float step_size = lr / bc1, decay = 1.0f - lr * weight_decay;
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) {
        const float g = grad[i] * grad_scale;
        m[i] = beta1 * m[i] + (1.0f - beta1) * g;
        v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
        param[i] = param[i] * decay - step_size * m[i] / (std::sqrt(v[i]) / sqrt_bc2 + eps);
        if (param16) param16[i] = bf16_bits(param[i]);
    }
}

// ---- router families' per-token math ---------------------------------------------------------

void CpuBackend::router_rows(RouterStage stage, const RouterRows& rows) {
    const size_t work = static_cast<size_t>(rows.N) * rows.S * std::max(rows.E, rows.P) * 8;
#pragma omp parallel for schedule(static) if (par(work))
    for (idx_t n = 0; n < rows.N; ++n) router_row(stage, rows, static_cast<int>(n));
}

// ---- router noise -------------------------------------------------------------------------

void CpuBackend::dropout_mask(float* mask_ND, int N, int D, const DropoutMaskDraw& draw) {
#pragma omp parallel for schedule(static) if (par(static_cast <size_t>(N) * D))
    for (idx_t n = 0; n < N; ++n) {
        const uint64_t base = draw.counter0 + static_cast<uint64_t>(n) * draw.row_stride;
        float* row = mask_ND + static_cast<size_t>(n) * D;
        for (int d = 0; d < D; ++d) row[d] = dropout_mask_value(draw.rng, base + d, draw.drop, draw.keep_scale);
    }
}

void CpuBackend::add_input_noise(
    float* out_ND, const float* x_ND, int N, int D, const CounterRng& rng, uint64_t counter0, float scale) {
#pragma omp parallel for schedule(static) if (par(static_cast <size_t>(N) * D * 8))
    for (idx_t n = 0; n < N; ++n) {
        const float* x = x_ND + static_cast<size_t>(n) * D;
        float* out = out_ND + static_cast<size_t>(n) * D;
        double ms = 0.0;
        for (int d = 0; d < D; ++d) ms += static_cast<double>(x[d]) * x[d] / D;
        const float s = scale * static_cast<float>(std::sqrt(ms));
        const uint64_t base = counter0 + static_cast<uint64_t>(n) * D;
        for (int d = 0; d < D; ++d) out[d] = x[d] + s * rng.normal(base + d);
    }
}

// ---- bf16 transport ------------------------------------------------------------------------

void CpuBackend::float_to_bf16(uint16_t* out, const float* in, size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) out[i] = bf16_bits(in[i]);
}

void CpuBackend::bf16_to_float(float* out, const uint16_t* in, size_t n) {
#pragma omp parallel for schedule(static) if (par(n))
    for (idx_t i = 0; i < static_cast<idx_t>(n); ++i) out[i] = model::bf16_to_float(in[i]);
}

}  // namespace bmoe::model
