// cuda_backend.cu -- CudaBackend lifecycle, memory, elementwise ops, cuBLAS GEMMs and AdamW.
// The other op families live in cuda_ops.cu and cuda_attention.cu.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "model/cuda/cuda_backend.h"
#include "model/cuda/cuda_common.cuh"
#include "model/cuda/op_profiler.h"
#include "parallel/cuda_check.h"

namespace bmoe::model {

using namespace cuda;

int cuda_device_count() {
    int count = 0;
    const cudaError_t rc = cudaGetDeviceCount(&count);
    if (rc != cudaSuccess) cudaGetLastError();  // clear the (non-sticky) error for later callers
    return rc == cudaSuccess ? count : 0;
}

bool cuda_device_available() { return cuda_device_count() > 0; }

std::string cuda_device_name() {
    int device = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    return prop.name;
}

size_t cuda_memory_in_use() {
    size_t free_bytes = 0, total_bytes = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    return total_bytes - free_bytes;
}

std::unique_ptr<Backend> make_cuda_backend(int local_rank) {
    int count = 0;
    const cudaError_t rc = cudaGetDeviceCount(&count);
    if (rc != cudaSuccess || count == 0) {
        cudaGetLastError();
        throw Error(concat("--backend=cuda: no CUDA device visible (",
                           rc != cudaSuccess ? cudaGetErrorString(rc) : "cudaGetDeviceCount returned 0",
                           "); use --backend=cpu"));
    }
    // One GPU per local rank; more ranks than GPUs share them round-robin (MPI communicator only:
    // NCCL refuses two ranks on one GPU).
    CUDA_CHECK(cudaSetDevice(local_rank % count));
    return std::make_unique<CudaBackend>();
}

// ---- lifecycle ----------------------------------------------------------------------------

CudaBackend::CudaBackend() {
    // Non-blocking: our stream never waits on work other libraries put on the legacy stream.
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    try {
        CUBLAS_CHECK(cublasCreate(&blas_));
        CUBLAS_CHECK(cublasSetStream(blas_, stream_));
        // Plain FP32 math: TF32 tensor cores would only be used with CUBLAS_TF32_TENSOR_OP_MATH, and
        // would break the 1e-4 parity with the CPU backend.
        CUBLAS_CHECK(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH));
        CUBLAS_CHECK(cublasSetPointerMode(blas_, CUBLAS_POINTER_MODE_HOST));
        profiler_ = std::make_unique<OpProfiler>(stream_);
    } catch (...) {
        if (blas_) cublasDestroy(blas_);
        cudaStreamDestroy(stream_);
        throw;
    }
}

// Never throws: errors at teardown (e.g. after a sticky fault) cannot be acted upon.
CudaBackend::~CudaBackend() {
    cudaStreamSynchronize(stream_);
    profiler_.reset();
    for (Scratch* s : {&gemm_ptrs_ws_, &reduce_ws_, &embed_ws_, &attn_ws_, &colred_ws_}) cudaFree(s->ptr);
    cublasDestroy(blas_);
    cudaStreamDestroy(stream_);
}

void* CudaBackend::scratch(Scratch& s, size_t bytes) {
    if (bytes <= s.bytes) return s.ptr;
    CUDA_CHECK(cudaStreamSynchronize(stream_));  // queued work may still read the old block
    note_free(s.ptr);
    CUDA_CHECK(cudaFree(s.ptr));
    s.ptr = nullptr;
    s.bytes = 0;
    s.ptr = alloc(bytes);
    s.bytes = bytes;
    return s.ptr;
}

double* CudaBackend::column_reduce_ws(int N, int D) {
    const size_t n = static_cast<size_t>(column_reduce_splits(N, D)) * std::max(D, 1);
    return static_cast<double*>(scratch(colred_ws_, n * sizeof(double)));
}

// ---- memory ---------------------------------------------------------------------------------

void* CudaBackend::alloc(size_t bytes) {
    void* p = nullptr;
    const cudaError_t rc = cudaMalloc(&p, bytes ? bytes : 1);  // non-null even for 0 bytes, like the CPU
    if (rc == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        throw Error(concat("CudaBackend::alloc: out of GPU memory allocating ", bytes,
                           " bytes: use a smaller batch/model or a GPU with more memory"));
    }
    CUDA_CHECK(rc);
    CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_));
    note_alloc(p, bytes);
    return p;
}

// Called from destructors (Buffer), so it reports instead of throwing.
void CudaBackend::free(void* ptr) {
    if (ptr == nullptr) return;
    note_free(ptr);
    cudaError_t rc = cudaStreamSynchronize(stream_);  // cudaFree must not race queued kernels
    if (rc == cudaSuccess) rc = cudaFree(ptr);
    if (rc != cudaSuccess) std::fprintf(stderr, "bmoe: CudaBackend::free: %s\n", cudaGetErrorString(rc));
}

void CudaBackend::upload(void* dst, const void* src_host, size_t bytes) {
    const ProfiledOp op(profiler_.get(), "upload");
    // Pageable source: the call returns once the data is staged, so the host buffer may be reused.
    if (bytes) CUDA_CHECK(cudaMemcpyAsync(dst, src_host, bytes, cudaMemcpyHostToDevice, stream_));
}

void CudaBackend::download(void* dst_host, const void* src, size_t bytes) {
    const ProfiledOp op(profiler_.get(), "download");
    if (bytes) CUDA_CHECK(cudaMemcpyAsync(dst_host, src, bytes, cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// Unlike the CPU's memmove, overlapping ranges are not supported (the model never overlaps them).
void CudaBackend::copy(void* dst, const void* src, size_t bytes) {
    const ProfiledOp op(profiler_.get(), "copy");
    if (bytes) CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
}

void CudaBackend::zero(void* ptr, size_t bytes) {
    const ProfiledOp op(profiler_.get(), "zero");
    if (bytes) CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, stream_));
}

void CudaBackend::synchronize() { CUDA_CHECK(cudaStreamSynchronize(stream_)); }

// ---- elementwise ------------------------------------------------------------------------------

namespace {

__global__ void add_kernel(float* out, const float* a, const float* b, size_t n) {
    BMOE_GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}

__global__ void accumulate_kernel(float* out, const float* a, size_t n) { BMOE_GRID_STRIDE(i, n) out[i] += a[i]; }

__global__ void scale_kernel(float* x, float s, size_t n) { BMOE_GRID_STRIDE(i, n) x[i] *= s; }

__global__ void mul_kernel(float* out, const float* a, const float* b, size_t n) {
    BMOE_GRID_STRIDE(i, n) out[i] = a[i] * b[i];
}

__global__ void dropout_mask_kernel(float* mask_ND, size_t n, int D, DropoutMaskDraw draw) {
    BMOE_GRID_STRIDE(i, n) {
        const uint64_t row = i / D, col = i % D;
        mask_ND[i] =
            dropout_mask_value(draw.rng, draw.counter0 + row * draw.row_stride + col, draw.drop, draw.keep_scale);
    }
}

constexpr int kSumBlocks = 1024;  // fixed partial count: the summation order depends on n only

__global__ void sum_squares_partial_kernel(double* partial, const float* x, size_t n) {
    double acc = 0.0;
    BMOE_GRID_STRIDE(i, n) acc += static_cast<double>(x[i]) * x[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void sum_partials_kernel(double* out, const double* partial, int count) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) *out = acc;
}

}  // namespace

void CudaBackend::add(float* out, const float* a, const float* b, size_t n) {
    const ProfiledOp op(profiler_.get(), "add");
    if (n == 0) return;
    add_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out, a, b, n);
    CUDA_CHECK_LAST();
}

void CudaBackend::accumulate(float* out, const float* a, size_t n) {
    const ProfiledOp op(profiler_.get(), "accumulate");
    if (n == 0) return;
    accumulate_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out, a, n);
    CUDA_CHECK_LAST();
}

void CudaBackend::scale(float* x, float s, size_t n) {
    const ProfiledOp op(profiler_.get(), "scale");
    if (n == 0) return;
    scale_kernel<<<grid_for(n), kThreads, 0, stream_>>>(x, s, n);
    CUDA_CHECK_LAST();
}

void CudaBackend::mul(float* out, const float* a, const float* b, size_t n) {
    const ProfiledOp op(profiler_.get(), "mul");
    if (n == 0) return;
    mul_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out, a, b, n);
    CUDA_CHECK_LAST();
}

void CudaBackend::dropout_mask(float* mask_ND, int N, int D, const DropoutMaskDraw& draw) {
    const ProfiledOp op(profiler_.get(), "dropout_mask");
    const size_t n = static_cast<size_t>(N) * D;
    if (n == 0) return;
    dropout_mask_kernel<<<grid_for(n), kThreads, 0, stream_>>>(mask_ND, n, D, draw);
    CUDA_CHECK_LAST();
}

double CudaBackend::sum_squares(const float* x, size_t n) {
    const ProfiledOp op(profiler_.get(), "sum_squares");
    if (n == 0) return 0.0;
    auto* ws = static_cast<double*>(scratch(reduce_ws_, (kSumBlocks + 1) * sizeof(double)));
    const unsigned blocks = std::min<unsigned>(grid_for(n), kSumBlocks);
    sum_squares_partial_kernel<<<blocks, kThreads, 0, stream_>>>(ws, x, n);
    CUDA_CHECK_LAST();
    sum_partials_kernel<<<1, kSumBlocks, 0, stream_>>>(ws + kSumBlocks, ws, static_cast<int>(blocks));
    CUDA_CHECK_LAST();
    double total = 0.0;
    download(&total, ws + kSumBlocks, sizeof(double));
    return total;
}

// ---- dense GEMMs ------------------------------------------------------------------------------

namespace {

__global__ void broadcast_rows_kernel(float* out_NO, const float* bias_O, size_t n, int O) {
    BMOE_GRID_STRIDE(i, n) out_NO[i] = bias_O[i % O];
}

}  // namespace

// Row-major X[r, c] (leading dim ld) is column-major X^T, so C = op(A) op(B) becomes
// C^T = op(B)^T op(A)^T: swap the operands and the M/N sizes, keep the transpose flags.
void CudaBackend::gemm(int M,
                       int N,
                       int K,
                       float alpha,
                       const float* A,
                       int lda,
                       bool transA,
                       const float* B,
                       int ldb,
                       bool transB,
                       float beta,
                       float* C,
                       int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {  // op(A) op(B) is all zeros; cuBLAS rejects the zero leading dimensions
        BMOE_ASSERT(ldc == N, "gemm with K = 0 expects a contiguous C");
        const size_t n = static_cast<size_t>(M) * N;
        if (beta == 0.0f) {
            zero(C, n * sizeof(float));
        } else {
            scale(C, beta, n);
        }
        return;
    }
    const cublasOperation_t op_b = transB ? CUBLAS_OP_T : CUBLAS_OP_N, op_a = transA ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (matmul_precision_ == MatmulPrecision::kBf16) {  // bf16 tensor cores, fp32 accumulate and output
        CUBLAS_CHECK(cublasGemmEx(blas_, op_b, op_a, N, M, K, &alpha, B, CUDA_R_32F, ldb, A, CUDA_R_32F, lda, &beta, C,
                                  CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_GEMM_DEFAULT));
        return;
    }
    CUBLAS_CHECK(cublasSgemm(blas_, op_b, op_a, N, M, K, &alpha, B, ldb, A, lda, &beta, C, ldc));
}

void CudaBackend::matmul_forward(
    float* out_NO, const float* in_NI, const float* w_OI, const float* bias_O, int N, int I, int O) {
    const ProfiledOp op(profiler_.get(), "matmul_fwd", N, I, O);
    if (bias_O && N > 0 && O > 0) {
        const size_t n = static_cast<size_t>(N) * O;
        broadcast_rows_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out_NO, bias_O, n, O);
        CUDA_CHECK_LAST();
    }
    gemm(N, O, I, 1.0f, in_NI, I, false, w_OI, I, true, bias_O ? 1.0f : 0.0f, out_NO, O);
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
    if (din_NI) gemm(N, I, O, 1.0f, dout_NO, O, false, w_OI, I, false, accumulate_din ? 1.0f : 0.0f, din_NI, I);
    if (dw_OI) gemm(O, I, N, 1.0f, dout_NO, O, true, in_NI, I, false, 1.0f, dw_OI, I);
    if (dbias_O) column_reduce(stream_, column_reduce_ws(N, O), dbias_O, N, O, RowValue{dout_NO, O});
}

// Grouped GEMMs: one cublasSgemmGroupedBatched call over the non-empty groups (CUDA >= 12.5), or
// cublasGemmGroupedBatchedEx with the bf16 compute type; where this cuBLAS does not support the
// call, one GEMM per group on the backend stream. Problems all of one shape go to the batched
// (not grouped) call, which cuBLAS can tune for that one shape (attention's (batch, head) slices).
void CudaBackend::grouped_gemm(const std::vector<GemmProblem>& problems,
                               float alpha,
                               int lda,
                               bool transA,
                               int ldb,
                               bool transB,
                               float beta,
                               int ldc) {
    // Column-major view, as in gemm(): C^T = op(B)^T op(A)^T, so cuBLAS sees (N, M, K) and B first.
    std::vector<int> m, n, k, ld_a, ld_b, ld_c, ones;
    std::vector<cublasOperation_t> op_a, op_b;
    std::vector<float> alphas, betas;
    std::vector<const void*> ptrs;  // [A0 ... A(P-1), B0 ..., C0 ...] once filled
    std::vector<const float*> a_ptrs, b_ptrs;
    std::vector<float*> c_ptrs;
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
    ptrs.insert(ptrs.end(), a_ptrs.begin(), a_ptrs.end());
    ptrs.insert(ptrs.end(), b_ptrs.begin(), b_ptrs.end());
    ptrs.insert(ptrs.end(), c_ptrs.begin(), c_ptrs.end());
    auto* dev = static_cast<void**>(scratch(gemm_ptrs_ws_, ptrs.size() * sizeof(void*)));
    CUDA_CHECK(cudaMemcpyAsync(dev, ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice, stream_));
    const bool bf16 = matmul_precision_ == MatmulPrecision::kBf16;
    const bool uniform = std::all_of(m.begin(), m.end(), [&](int v) { return v == m[0]; }) &&
                         std::all_of(n.begin(), n.end(), [&](int v) { return v == n[0]; }) &&
                         std::all_of(k.begin(), k.end(), [&](int v) { return v == k[0]; });
    if (uniform) {  // one shape (attention slices, equal expert loads): a plain batched GEMM is faster
        if (bf16) {
            CUBLAS_CHECK(cublasGemmBatchedEx(blas_, op_a[0], op_b[0], m[0], n[0], k[0], &alpha, dev, CUDA_R_32F, ldb,
                                             dev + count, CUDA_R_32F, lda, &beta, dev + 2 * count, CUDA_R_32F, ldc,
                                             count, CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_GEMM_DEFAULT));
        } else {
            CUBLAS_CHECK(cublasSgemmBatched(blas_, op_a[0], op_b[0], m[0], n[0], k[0], &alpha,
                                            reinterpret_cast<const float* const*>(dev), ldb,
                                            reinterpret_cast<const float* const*>(dev + count), lda, &beta,
                                            reinterpret_cast<float* const*>(dev + 2 * count), ldc, count));
        }
        return;
    }
    // Whether cuBLAS supports a grouped call can depend on the compute type and the transposes:
    // remembered per combination, and said once, since the per-GEMM fallback is slower.
    const unsigned combo = 1u << ((bf16 ? 4u : 0u) | (transA ? 2u : 0u) | (transB ? 1u : 0u));
    cublasStatus_t rc = CUBLAS_STATUS_NOT_SUPPORTED;
    if ((grouped_unsupported_ & combo) == 0) {
        if (bf16) {
            rc = cublasGemmGroupedBatchedEx(blas_, op_a.data(), op_b.data(), m.data(), n.data(), k.data(),
                                            alphas.data(), dev, CUDA_R_32F, ld_a.data(), dev + count, CUDA_R_32F,
                                            ld_b.data(), betas.data(), dev + 2 * count, CUDA_R_32F, ld_c.data(), count,
                                            ones.data(), CUBLAS_COMPUTE_32F_FAST_16BF);
        } else {
            rc = cublasSgemmGroupedBatched(blas_, op_a.data(), op_b.data(), m.data(), n.data(), k.data(), alphas.data(),
                                           reinterpret_cast<const float* const*>(dev), ld_a.data(),
                                           reinterpret_cast<const float* const*>(dev + count), ld_b.data(),
                                           betas.data(), reinterpret_cast<float* const*>(dev + 2 * count), ld_c.data(),
                                           count, ones.data());
        }
        if (rc == CUBLAS_STATUS_NOT_SUPPORTED) {
            grouped_unsupported_ |= combo;
            std::fprintf(stderr,
                         "bmoe: this cuBLAS has no grouped %s GEMM with transA=%d transB=%d; running one GEMM per "
                         "expert instead (slower)\n",
                         bf16 ? "bf16" : "fp32", transA ? 1 : 0, transB ? 1 : 0);
        }
    }
    // Pageable host arrays: cudaMemcpyAsync staged them before returning, so they may go out of scope.
    if (rc == CUBLAS_STATUS_NOT_SUPPORTED) {  // this cuBLAS has no such grouped call: one GEMM per problem
        for (const GemmProblem& p : problems)
            gemm(p.M, p.N, p.K, alpha, p.A, lda, transA, p.B, ldb, transB, beta, p.C, ldc);
        return;
    }
    CUBLAS_CHECK(rc);
}

// All local experts in one grouped GEMM call (rows of expert g: [offsets[g], offsets[g+1])).
void CudaBackend::grouped_matmul_forward(
    float* out_RO, const float* in_RI, const float* w_GOI, const int* offsets_host, int G, int I, int O) {
    const ProfiledOp op(profiler_.get(), "grouped_matmul_fwd", G, I, O);
    std::vector<GemmProblem> problems;
    for (int g = 0; g < G; ++g) {
        const int r0 = offsets_host[g], rows = offsets_host[g + 1] - r0;
        problems.push_back({rows, O, I, in_RI + static_cast<size_t>(r0) * I, w_GOI + static_cast<size_t>(g) * O * I,
                            out_RO + static_cast<size_t>(r0) * O});
    }
    grouped_gemm(problems, 1.0f, I, false, I, true, 0.0f, O);
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
    std::vector<GemmProblem> din, dw;
    for (int g = 0; g < G; ++g) {
        const int r0 = offsets_host[g], rows = offsets_host[g + 1] - r0;
        const float* dout = dout_RO + static_cast<size_t>(r0) * O;
        const size_t w_off = static_cast<size_t>(g) * O * I;
        din.push_back({rows, I, O, dout, w_GOI + w_off, din_RI + static_cast<size_t>(r0) * I});
        if (dw_GOI) dw.push_back({O, I, rows, dout, in_RI + static_cast<size_t>(r0) * I, dw_GOI + w_off});
    }
    grouped_gemm(din, 1.0f, O, false, I, false, 0.0f, I);  // din_g = dout_g w_g   (=)
    if (dw_GOI) grouped_gemm(dw, 1.0f, O, true, I, false, 1.0f, I);  // dw_g += dout_g^T in_g
}

// ---- optimizer --------------------------------------------------------------------------------

namespace {

struct AdamParams {
    float beta1, beta2, eps, grad_scale, step_size, decay, sqrt_bc2;
};

__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, size_t n, AdamParams a) {
    BMOE_GRID_STRIDE(i, n) {
        const float g = grad[i] * a.grad_scale;
        const float mi = a.beta1 * m[i] + (1.0f - a.beta1) * g;
        const float vi = a.beta2 * v[i] + (1.0f - a.beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] = param[i] * a.decay - a.step_size * mi / (sqrtf(vi) / a.sqrt_bc2 + a.eps);
    }
}

}  // namespace

void CudaBackend::adamw_update(float* param,
                               const float* grad,
                               float* m,
                               float* v,
                               size_t n,
                               float lr,
                               float beta1,
                               float beta2,
                               float eps,
                               float weight_decay,
                               float grad_scale,
                               int step) {
    const ProfiledOp op(profiler_.get(), "adamw_update");
    if (n == 0) return;
    // Same scalar folding as the CPU (PyTorch order): bias corrections in double on the host.
    const float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), step));
    const float sqrt_bc2 = static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(beta2), step)));
    const AdamParams a{beta1, beta2, eps, grad_scale, lr / bc1, 1.0f - lr * weight_decay, sqrt_bc2};
    adamw_kernel<<<grid_for(n), kThreads, 0, stream_>>>(param, grad, m, v, n, a);
    CUDA_CHECK_LAST();
}

// ---- bf16 transport: the CPU's nearest-even conversion, bit for bit ---------------------------

namespace {

__global__ void float_to_bf16_kernel(uint16_t* out, const float* in, size_t n) {
    BMOE_GRID_STRIDE(i, n) {
        uint32_t bits = __float_as_uint(in[i]);
        if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
            out[i] = static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN
        } else {
            bits += 0x7fffu + ((bits >> 16) & 1u);
            out[i] = static_cast<uint16_t>(bits >> 16);
        }
    }
}

__global__ void bf16_to_float_kernel(float* out, const uint16_t* in, size_t n) {
    BMOE_GRID_STRIDE(i, n) out[i] = __uint_as_float(static_cast<uint32_t>(in[i]) << 16);
}

}  // namespace

void CudaBackend::float_to_bf16(uint16_t* out, const float* in, size_t n) {
    const ProfiledOp op(profiler_.get(), "float_to_bf16");
    if (n == 0) return;
    float_to_bf16_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out, in, n);
    CUDA_CHECK_LAST();
}

void CudaBackend::bf16_to_float(float* out, const uint16_t* in, size_t n) {
    const ProfiledOp op(profiler_.get(), "bf16_to_float");
    if (n == 0) return;
    bf16_to_float_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out, in, n);
    CUDA_CHECK_LAST();
}

}  // namespace bmoe::model
