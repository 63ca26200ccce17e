// cuda_gemm.cu -- CudaBackend's cuBLAS GEMMs: dense, grouped over experts, batched over attention
// slices, in fp32 or with bf16 inputs (and, for the LM head's logits, a bf16 output).
//
// bf16 matmul precision: every fp32 tensor an op's GEMMs read is rounded to bf16 once per op (ties
// to even: the CPU emulation's rounding, bit for bit) into a reused scratch slot -- weights the model
// keeps a bf16 copy of (Backend::set_bf16_weight_copy) are read from it instead -- and cuBLAS runs
// bf16 x bf16 -> fp32 with fp32 accumulation (CUBLAS_COMPUTE_32F). Explicit copies, rather than
// fp32 inputs under CUBLAS_COMPUTE_32F_FAST_16BF: that mode only *permits* bf16 (an H200 kept
// small shapes in fp32), and its transposed backward GEMMs ran ~1.6x slower per FLOP than the
// forward ones (2026-11-27 profile). Outputs and dW accumulation stay fp32 (the LM head's logits
// excepted: matmul_forward_bf16).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

#include "model/cuda/attention_plan.h"
#include "model/cuda/cuda_backend.h"
#include "model/cuda/cuda_common.cuh"
#include "model/cuda/op_profiler.h"
#include "parallel/cuda_check.h"

namespace bmoe::model {

using namespace cuda;

namespace {

__global__ void broadcast_rows_kernel(float* out_NO, const float* bias_O, size_t n, int O) {
    BMOE_GRID_STRIDE(i, n) out_NO[i] = bias_O[i % O];
}

// Four elements per thread (16-byte loads, 8-byte stores): the copies run at memory bandwidth.
__global__ void to_bf16_vec4_kernel(uint2* out, const float4* in, size_t quads) {
    BMOE_GRID_STRIDE(i, quads) {
        const float4 v = in[i];
        out[i] = pack_bf16x4(v.x, v.y, v.z, v.w);
    }
}

__global__ void to_bf16_kernel(uint16_t* out, const float* in, size_t n) {
    BMOE_GRID_STRIDE(i, n) out[i] = bf16_bits_rne(in[i]);
}

// Row r0 of a row-major [R, cols] fp32 or bf16 matrix.
void* row_of(void* base, bool bf16, size_t r0, int cols) {
    return static_cast<char*>(base) + r0 * static_cast<size_t>(cols) * (bf16 ? sizeof(uint16_t) : sizeof(float));
}

}  // namespace

// ---- operand copies ---------------------------------------------------------------------------

const void* CudaBackend::GemmInputs::operator()(const float* p) const {
    if (!bf16()) return p;
    const std::less<const float*> before;  // a total order, also across unrelated allocations
    for (const Copy& c : copies) {
        if (!before(p, c.base) && before(p, c.base + c.n)) return c.bf16 + (p - c.base);
        if (p == c.base && c.n == 0) return c.bf16;  // an empty operand (K = 0): never read
    }
    BMOE_ASSERT(false, "bf16 GEMM operand outside every converted tensor of the op");
    return nullptr;
}

CudaBackend::GemmInputs CudaBackend::gemm_inputs(std::initializer_list<GemmTensor> tensors) {
    if (matmul_precision_ == MatmulPrecision::kBf16 && bf16_input_copies_) return bf16_gemm_inputs(tensors);
    GemmInputs inputs;
    inputs.type = matmul_precision_ == MatmulPrecision::kFp32 ? GemmInput::kFp32 : GemmInput::kFp32Fast16Bf;
    return inputs;
}

CudaBackend::GemmInputs CudaBackend::bf16_gemm_inputs(std::initializer_list<GemmTensor> tensors) {
    GemmInputs inputs;
    inputs.type = GemmInput::kBf16;
    for (const GemmTensor& t : tensors) {
        if (t.x == nullptr) continue;
        const uint16_t* copy = t.n == 0 ? reinterpret_cast<const uint16_t*>(t.x) : bf16_weight_copy(t.x, t.n);
        if (copy == nullptr) copy = to_bf16(inputs.next_slot++, t.x, t.n);  // not in the model's weight copy
        inputs.copies.push_back({t.x, t.n, copy});
    }
    return inputs;
}

uint16_t* CudaBackend::bf16_slot(int slot, size_t n) {
    BMOE_ASSERT(slot >= 0 && slot < kBf16Slots, "bf16 GEMM scratch slot ", slot, " out of range");
    return static_cast<uint16_t*>(scratch(bf16_ws_[slot], std::max<size_t>(n, 1) * sizeof(uint16_t)));
}

void cuda::round_to_bf16(cudaStream_t stream, uint16_t* out, const float* in, size_t n) {
    if (n == 0) return;
    if (reinterpret_cast<uintptr_t>(in) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 8 == 0 && n % 4 == 0) {
        to_bf16_vec4_kernel<<<grid_for(n / 4), kThreads, 0, stream>>>(reinterpret_cast<uint2*>(out),
                                                                      reinterpret_cast<const float4*>(in), n / 4);
    } else {
        to_bf16_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, in, n);
    }
    CUDA_CHECK_LAST();
}

const uint16_t* CudaBackend::to_bf16(int slot, const float* x, size_t n) {
    uint16_t* out = bf16_slot(slot, n);
    round_to_bf16(stream_, out, x, n);
    return out;
}

// ---- dense GEMMs ------------------------------------------------------------------------------

// Row-major X[r, c] (leading dim ld) is column-major X^T, so C = op(A) op(B) becomes
// C^T = op(B)^T op(A)^T: swap the operands and the M/N sizes, keep the transpose flags.
void CudaBackend::gemm(int M,
                       int N,
                       int K,
                       float alpha,
                       const void* A,
                       int lda,
                       bool transA,
                       const void* B,
                       int ldb,
                       bool transB,
                       float beta,
                       void* C,
                       int ldc,
                       GemmInput in,
                       bool c_bf16) {
    BMOE_ASSERT(!c_bf16 || (in == GemmInput::kBf16 && beta == 0.0f), "a bf16 C needs bf16 inputs and beta = 0");
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {  // op(A) op(B) is all zeros; cuBLAS rejects the zero leading dimensions
        BMOE_ASSERT(ldc == N, "gemm with K = 0 expects a contiguous C");
        const size_t n = static_cast<size_t>(M) * N;
        if (beta == 0.0f) {
            zero(C, n * (c_bf16 ? sizeof(uint16_t) : sizeof(float)));
        } else {
            scale(static_cast<float*>(C), beta, n);
        }
        return;
    }
    const cublasOperation_t op_b = transB ? CUBLAS_OP_T : CUBLAS_OP_N, op_a = transA ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (in != GemmInput::kFp32) {  // bf16 tensor cores, fp32 accumulate; fp32 or bf16 output
        const cudaDataType_t type = in == GemmInput::kBf16 ? CUDA_R_16BF : CUDA_R_32F;
        const cublasComputeType_t compute =
            in == GemmInput::kFp32Fast16Bf ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
        CUBLAS_CHECK(cublasGemmEx(blas_, op_b, op_a, N, M, K, &alpha, B, type, ldb, A, type, lda, &beta, C,
                                  c_bf16 ? CUDA_R_16BF : CUDA_R_32F, ldc, compute, CUBLAS_GEMM_DEFAULT));
        return;
    }
    CUBLAS_CHECK(cublasSgemm(blas_, op_b, op_a, N, M, K, &alpha, static_cast<const float*>(B), ldb,
                             static_cast<const float*>(A), lda, &beta, static_cast<float*>(C), ldc));
}

void CudaBackend::matmul_forward(
    float* out_NO, const float* in_NI, const float* w_OI, const float* bias_O, int N, int I, int O) {
    const ProfiledOp op(profiler_.get(), "matmul_fwd", N, I, O);
    if (bias_O && N > 0 && O > 0) {
        const size_t n = static_cast<size_t>(N) * O;
        broadcast_rows_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out_NO, bias_O, n, O);
        CUDA_CHECK_LAST();
    }
    if (N <= 0 || O <= 0) return;
    const GemmInputs in = gemm_inputs({{in_NI, static_cast<size_t>(N) * I}, {w_OI, static_cast<size_t>(O) * I}});
    gemm(N, O, I, 1.0f, in(in_NI), I, false, in(w_OI), I, true, bias_O ? 1.0f : 0.0f, out_NO, O, in.type);
}

void CudaBackend::matmul_backward(float* din_NI,
                                  float* dw_OI,
                                  float* dbias_O,
                                  const float* dout_NO,
                                  const float* in_NI,
                                  const float* w_OI,
                                  int N,
                                  int I,
                                  int O,
                                  bool accumulate_din) {
    const ProfiledOp op(profiler_.get(), "matmul_bwd", N, I, O);
    if (din_NI || dw_OI) {  // dout is converted once for both products
        const GemmInputs in = gemm_inputs({{dout_NO, static_cast<size_t>(N) * O},
                                           {din_NI ? w_OI : nullptr, static_cast<size_t>(O) * I},
                                           {dw_OI ? in_NI : nullptr, static_cast<size_t>(N) * I}});
        dense_backward_gemms(din_NI, dw_OI, in(dout_NO), dw_OI ? in(in_NI) : nullptr, w_OI, in, N, I, O,
                             accumulate_din);
    }
    if (dbias_O) column_reduce(stream_, column_reduce_ws(N, O), dbias_O, N, O, RowValue{dout_NO, O});
}

// The bf16 variants read the operands stored as bf16 directly and round the fp32 ones into copies,
// in either GEMM mode (fast16bf cannot mix a bf16 and an fp32 operand in one product, nor write
// bf16); a bf16 result is cuBLAS's rounding of its fp32 accumulator.
void CudaBackend::matmul_forward_bf16(float* out_NO,
                                      uint16_t* out16_NO,
                                      const float* in_NI,
                                      const uint16_t* in16_NI,
                                      const float* w_OI,
                                      int N,
                                      int I,
                                      int O) {
    const ProfiledOp op(profiler_.get(), "matmul_fwd_bf16", N, I, O);
    require_bf16_precision("matmul_forward_bf16");
    require_forward_bf16_pairs("matmul_forward_bf16", out_NO, out16_NO, in_NI, in16_NI);
    if (N <= 0 || O <= 0) return;
    const GemmInputs in =
        bf16_gemm_inputs({{in16_NI ? nullptr : in_NI, static_cast<size_t>(N) * I}, {w_OI, static_cast<size_t>(O) * I}});
    gemm(N, O, I, 1.0f, in16_NI ? static_cast<const void*>(in16_NI) : in(in_NI), I, false, in(w_OI), I, true, 0.0f,
         out16_NO ? static_cast<void*>(out16_NO) : out_NO, O, in.type, /*c_bf16=*/out16_NO != nullptr);
}

void CudaBackend::matmul_backward_bf16(float* din_NI,
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
    const ProfiledOp op(profiler_.get(), "matmul_bwd_bf16", N, I, O);
    require_bf16_precision("matmul_backward_bf16");
    require_backward_bf16_pairs("matmul_backward_bf16", /*din_optional=*/true, din_NI, nullptr, dw_OI, dout_NO,
                                dout16_NO, in_NI, in16_NI);
    const GemmInputs in = bf16_gemm_inputs({{dout16_NO ? nullptr : dout_NO, static_cast<size_t>(N) * O},
                                            {din_NI ? w_OI : nullptr, static_cast<size_t>(O) * I},
                                            {dw_OI && !in16_NI ? in_NI : nullptr, static_cast<size_t>(N) * I}});
    dense_backward_gemms(din_NI, dw_OI, dout16_NO ? static_cast<const void*>(dout16_NO) : in(dout_NO),
                         !dw_OI    ? nullptr
                         : in16_NI ? static_cast<const void*>(in16_NI)
                                   : in(in_NI),
                         w_OI, in, N, I, O, accumulate_din);
}

void CudaBackend::dense_backward_gemms(float* din_NI,
                                       float* dw_OI,
                                       const void* dout,
                                       const void* in_rows,
                                       const float* w_OI,
                                       const GemmInputs& in,
                                       int N,
                                       int I,
                                       int O,
                                       bool accumulate_din) {
    if (din_NI)
        gemm(N, I, O, 1.0f, dout, O, false, in(w_OI), I, false, accumulate_din ? 1.0f : 0.0f, din_NI, I, in.type);
    if (dw_OI) gemm(O, I, N, 1.0f, dout, O, true, in_rows, I, false, 1.0f, dw_OI, I, in.type);
}

// ---- grouped and batched GEMMs ---------------------------------------------------------------

// One cublasSgemmGroupedBatched / cublasGemmGroupedBatchedEx call over the non-empty problems
// (CUDA >= 12.5); where this cuBLAS does not support the call, one GEMM per problem on the backend
// stream. Problems all of one shape go to the batched (not grouped) call, which cuBLAS can tune for
// that one shape (attention's (batch, head) slices, equal expert loads).
void CudaBackend::grouped_gemm(const std::vector<GemmProblem>& problems,
                               float alpha,
                               int lda,
                               bool transA,
                               int ldb,
                               bool transB,
                               float beta,
                               int ldc,
                               GemmInput in,
                               bool c_bf16) {
    BMOE_ASSERT(!c_bf16 || (in == GemmInput::kBf16 && beta == 0.0f), "a bf16 C needs bf16 inputs and beta = 0");
    // Column-major view, as in gemm(): C^T = op(B)^T op(A)^T, so cuBLAS sees (N, M, K) and B first.
    std::vector<int> m, n, k, ld_a, ld_b, ld_c, ones;
    std::vector<cublasOperation_t> op_a, op_b;
    std::vector<float> alphas, betas;
    std::vector<const void*> ptrs;  // [A0 ... A(P-1), B0 ..., C0 ...] once filled, each list padded
    std::vector<const void*> a_ptrs, b_ptrs;
    std::vector<void*> c_ptrs;
    for (const GemmProblem& p : problems) {
        if (p.M <= 0 || p.N <= 0 || p.K <= 0) continue;  // empty expert: nothing to add
        m.push_back(p.N);
        n.push_back(p.M);
        k.push_back(p.K);
        op_a.push_back(transB ? CUBLAS_OP_T : CUBLAS_OP_N);
        op_b.push_back(transA ? CUBLAS_OP_T : CUBLAS_OP_N);
        ld_a.push_back(ldb);
        ld_b.push_back(lda);
        ld_c.push_back(ldc);
        alphas.push_back(alpha);
        betas.push_back(beta);
        ones.push_back(1);
        a_ptrs.push_back(p.B);
        b_ptrs.push_back(p.A);
        c_ptrs.push_back(p.C);
    }
    const int count = static_cast<int>(m.size());
    if (count == 0) return;
    // Each pointer list starts 32-byte aligned (a multiple of 4 pointers apart): newer cuBLAS
    // refuses batched pointer arrays that are not 16-byte aligned, which an odd count would give.
    const int stride = (count + 3) & ~3;
    ptrs.assign(3 * static_cast<size_t>(stride), nullptr);
    std::copy(a_ptrs.begin(), a_ptrs.end(), ptrs.begin());
    std::copy(b_ptrs.begin(), b_ptrs.end(), ptrs.begin() + stride);
    std::copy(c_ptrs.begin(), c_ptrs.end(), ptrs.begin() + 2 * stride);
    auto* dev = static_cast<void**>(scratch(gemm_ptrs_ws_, ptrs.size() * sizeof(void*)));
    // Pageable host arrays: cudaMemcpyAsync staged them before returning, so they may go out of scope.
    CUDA_CHECK(cudaMemcpyAsync(dev, ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice, stream_));
    const bool ex = in != GemmInput::kFp32;  // the *Ex calls (bf16 inputs, or bf16 compute permitted)
    const bool uniform = std::all_of(m.begin(), m.end(), [&](int v) { return v == m[0]; }) &&
                         std::all_of(n.begin(), n.end(), [&](int v) { return v == n[0]; }) &&
                         std::all_of(k.begin(), k.end(), [&](int v) { return v == k[0]; });
    // Whether cuBLAS supports a call can depend on its kind, the input type and the transposes:
    // remembered per combination, and said once, since the per-GEMM fallback is slower.
    const uint64_t combo = uint64_t{1} << ((c_bf16 ? 32u : 0u) | (uniform ? 16u : 0u) |
                                           (static_cast<unsigned>(in) << 2) | (transA ? 2u : 0u) | (transB ? 1u : 0u));
    const cudaDataType_t type = in == GemmInput::kBf16 ? CUDA_R_16BF : CUDA_R_32F;
    const cudaDataType_t c_type = c_bf16 ? CUDA_R_16BF : CUDA_R_32F;
    const cublasComputeType_t compute =
        in == GemmInput::kFp32Fast16Bf ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
    cublasStatus_t rc = CUBLAS_STATUS_NOT_SUPPORTED;
    if ((gemm_unsupported_ & combo) == 0) {
        if (uniform && ex) {
            rc = cublasGemmBatchedEx(blas_, op_a[0], op_b[0], m[0], n[0], k[0], &alpha, dev, type, ldb, dev + stride,
                                     type, lda, &beta, dev + 2 * stride, c_type, ldc, count, compute,
                                     CUBLAS_GEMM_DEFAULT);
        } else if (uniform) {
            rc = cublasSgemmBatched(blas_, op_a[0], op_b[0], m[0], n[0], k[0], &alpha,
                                    reinterpret_cast<const float* const*>(dev), ldb,
                                    reinterpret_cast<const float* const*>(dev + stride), lda, &beta,
                                    reinterpret_cast<float* const*>(dev + 2 * stride), ldc, count);
        } else if (ex) {
            rc =
                cublasGemmGroupedBatchedEx(blas_, op_a.data(), op_b.data(), m.data(), n.data(), k.data(), alphas.data(),
                                           dev, type, ld_a.data(), dev + stride, type, ld_b.data(), betas.data(),
                                           dev + 2 * stride, c_type, ld_c.data(), count, ones.data(), compute);
        } else {
            rc = cublasSgemmGroupedBatched(blas_, op_a.data(), op_b.data(), m.data(), n.data(), k.data(), alphas.data(),
                                           reinterpret_cast<const float* const*>(dev), ld_a.data(),
                                           reinterpret_cast<const float* const*>(dev + stride), ld_b.data(),
                                           betas.data(), reinterpret_cast<float* const*>(dev + 2 * stride), ld_c.data(),
                                           count, ones.data());
        }
        // Batched and grouped calls with bf16 inputs (and fp32 outputs) are not in every cuBLAS's
        // support table; some report that as INVALID_VALUE. The per-problem fallback re-checks real
        // argument errors (cublasGemmEx under CUBLAS_CHECK).
        if (rc == CUBLAS_STATUS_INVALID_VALUE && ex) rc = CUBLAS_STATUS_NOT_SUPPORTED;
        if (rc == CUBLAS_STATUS_NOT_SUPPORTED) {
            gemm_unsupported_ |= combo;
            std::fprintf(stderr,
                         "bmoe: this cuBLAS has no %s %s GEMM%s with transA=%d transB=%d; running one GEMM per "
                         "problem instead (slower)\n",
                         uniform ? "batched" : "grouped",
                         in == GemmInput::kBf16 ? "bf16" : (ex ? "fp32 (bf16 compute)" : "fp32"),
                         c_bf16 ? " (bf16 output)" : "", transA ? 1 : 0, transB ? 1 : 0);
        }
    }
    if (rc == CUBLAS_STATUS_NOT_SUPPORTED) {  // this cuBLAS has no such call: one GEMM per problem
        for (const GemmProblem& p : problems)
            gemm(p.M, p.N, p.K, alpha, p.A, lda, transA, p.B, ldb, transB, beta, p.C, ldc, in, c_bf16);
        return;
    }
    CUBLAS_CHECK(rc);
}

// All local experts in one grouped GEMM call (rows of expert g: [offsets[g], offsets[g+1])).
void CudaBackend::grouped_matmul_forward(
    float* out_RO, const float* in_RI, const float* w_GOI, const int* offsets_host, int G, int I, int O) {
    const ProfiledOp op(profiler_.get(), "grouped_matmul_fwd", G, I, O);
    const size_t R = static_cast<size_t>(offsets_host[G]);
    const GemmInputs in = gemm_inputs({{in_RI, R * I}, {w_GOI, static_cast<size_t>(G) * O * I}});
    grouped_forward_gemms(
        out_RO, false, [&](size_t r0) { return in(in_RI + r0 * I); }, w_GOI, in, offsets_host, G, I, O);
}

void CudaBackend::grouped_matmul_backward(float* din_RI,
                                          float* dw_GOI,
                                          const float* dout_RO,
                                          const float* in_RI,
                                          const float* w_GOI,
                                          const int* offsets_host,
                                          int G,
                                          int I,
                                          int O) {
    const ProfiledOp op(profiler_.get(), "grouped_matmul_bwd", G, I, O);
    const size_t R = static_cast<size_t>(offsets_host[G]);
    const GemmInputs in =
        gemm_inputs({{dout_RO, R * O}, {w_GOI, static_cast<size_t>(G) * O * I}, {dw_GOI ? in_RI : nullptr, R * I}});
    grouped_backward_gemms(
        din_RI, false, dw_GOI, [&](size_t r0) { return in(dout_RO + r0 * O); },
        [&](size_t r0) { return in(in_RI + r0 * I); }, w_GOI, in, offsets_host, G, I, O);
}

// The grouped _bf16 variants: operands as in matmul_forward_bf16 above.
void CudaBackend::grouped_matmul_forward_bf16(float* out_RO,
                                              uint16_t* out16_RO,
                                              const float* in_RI,
                                              const uint16_t* in16_RI,
                                              const float* w_GOI,
                                              const int* offsets_host,
                                              int G,
                                              int I,
                                              int O) {
    const ProfiledOp op(profiler_.get(), "grouped_matmul_fwd_bf16", G, I, O);
    require_bf16_precision("grouped_matmul_forward_bf16");
    require_forward_bf16_pairs("grouped_matmul_forward_bf16", out_RO, out16_RO, in_RI, in16_RI);
    const size_t R = static_cast<size_t>(offsets_host[G]);
    const GemmInputs in =
        bf16_gemm_inputs({{in16_RI ? nullptr : in_RI, R * I}, {w_GOI, static_cast<size_t>(G) * O * I}});
    grouped_forward_gemms(
        out16_RO ? static_cast<void*>(out16_RO) : out_RO, out16_RO != nullptr,
        [&](size_t r0) -> const void* { return in16_RI ? in16_RI + r0 * I : in(in_RI + r0 * I); }, w_GOI, in,
        offsets_host, G, I, O);
}

void CudaBackend::grouped_matmul_backward_bf16(float* din_RI,
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
    const ProfiledOp op(profiler_.get(), "grouped_matmul_bwd_bf16", G, I, O);
    require_bf16_precision("grouped_matmul_backward_bf16");
    require_backward_bf16_pairs("grouped_matmul_backward_bf16", /*din_optional=*/false, din_RI, din16_RI, dw_GOI,
                                dout_RO, dout16_RO, in_RI, in16_RI);
    const size_t R = static_cast<size_t>(offsets_host[G]);
    const GemmInputs in = bf16_gemm_inputs({{dout16_RO ? nullptr : dout_RO, R * O},
                                            {w_GOI, static_cast<size_t>(G) * O * I},
                                            {dw_GOI && !in16_RI ? in_RI : nullptr, R * I}});
    grouped_backward_gemms(
        din16_RI ? static_cast<void*>(din16_RI) : din_RI, din16_RI != nullptr, dw_GOI,
        [&](size_t r0) -> const void* { return dout16_RO ? dout16_RO + r0 * O : in(dout_RO + r0 * O); },
        [&](size_t r0) -> const void* { return in16_RI ? in16_RI + r0 * I : in(in_RI + r0 * I); }, w_GOI, in,
        offsets_host, G, I, O);
}

void CudaBackend::grouped_forward_gemms(void* out_RO,
                                        bool out_bf16,
                                        const RowOperand& in_rows,
                                        const float* w_GOI,
                                        const GemmInputs& in,
                                        const int* offsets_host,
                                        int G,
                                        int I,
                                        int O) {
    std::vector<GemmProblem> problems;
    for (int g = 0; g < G; ++g) {
        const int r0 = offsets_host[g], rows = offsets_host[g + 1] - r0;
        if (rows == 0) continue;
        problems.push_back({rows, O, I, in_rows(static_cast<size_t>(r0)), in(w_GOI + static_cast<size_t>(g) * O * I),
                            row_of(out_RO, out_bf16, static_cast<size_t>(r0), O)});
    }
    grouped_gemm(problems, 1.0f, I, false, I, true, 0.0f, O, in.type, out_bf16);
}

void CudaBackend::grouped_backward_gemms(void* din_RI,
                                         bool din_bf16,
                                         float* dw_GOI,
                                         const RowOperand& dout_rows,
                                         const RowOperand& in_rows,
                                         const float* w_GOI,
                                         const GemmInputs& in,
                                         const int* offsets_host,
                                         int G,
                                         int I,
                                         int O) {
    std::vector<GemmProblem> din, dw;
    for (int g = 0; g < G; ++g) {
        const int r0 = offsets_host[g], rows = offsets_host[g + 1] - r0;
        if (rows == 0) continue;  // din has no rows; dw_g += 0
        const void* dout = dout_rows(static_cast<size_t>(r0));
        const size_t w_off = static_cast<size_t>(g) * O * I;
        din.push_back({rows, I, O, dout, in(w_GOI + w_off), row_of(din_RI, din_bf16, static_cast<size_t>(r0), I)});
        if (dw_GOI) dw.push_back({O, I, rows, dout, in_rows(static_cast<size_t>(r0)), dw_GOI + w_off});
    }
    grouped_gemm(din, 1.0f, O, false, I, false, 0.0f, I, in.type, din_bf16);  // din_g = dout_g w_g   (=)
    if (dw_GOI) grouped_gemm(dw, 1.0f, O, true, I, false, 1.0f, I, in.type);  // dw_g += dout_g^T in_g
}

// One product of an attention plan: its (batch, head) slices all have one shape (a batched call).
void CudaBackend::run_batched_gemm(const BatchedGemm& g, const GemmInputs& in) {
    std::vector<GemmProblem> problems;
    problems.reserve(g.slices.size());
    for (const BatchedGemm::Operands& o : g.slices) problems.push_back({g.M, g.N, g.K, in(o.A), in(o.B), o.C});
    grouped_gemm(problems, g.alpha, g.lda, g.transA, g.ldb, g.transB, g.beta, g.ldc, in.type);
}

}  // namespace bmoe::model
