// cuda_backend.cu -- CudaBackend lifecycle, memory, elementwise ops and AdamW.
// The other op families live in cuda_gemm.cu, cuda_ops.cu and cuda_attention.cu.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
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
    // bf16 GEMM inputs: explicit bf16 copies (default), or the fp32 FAST_16BF path to compare with.
    if (const char* mode = std::getenv("BMOE_CUDA_BF16_GEMM"); mode != nullptr && *mode != '\0') {
        const std::string m = mode;
        BMOE_REQUIRE(m == "copies" || m == "fast16bf", "BMOE_CUDA_BF16_GEMM='", m,
                     "' is unknown: use copies (default) or fast16bf");
        bf16_input_copies_ = m == "copies";
    }
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
    for (Scratch* s : {&gemm_ptrs_ws_, &reduce_ws_, &embed_ws_, &attn_ws_, &attn_qkv_ws_, &colred_ws_, &plan_ws_})
        cudaFree(s->ptr);
    for (Scratch& s : bf16_ws_) cudaFree(s.ptr);
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

// One block per row: the row's mean square (double), then x + scale * RMS * N(0, 1).
__global__ void add_input_noise_kernel(
    float* out_ND, const float* x_ND, int D, CounterRng rng, uint64_t counter0, float scale) {
    const size_t row = blockIdx.x;
    const float* x = x_ND + row * D;
    float* out = out_ND + row * D;
    double ms = 0.0;
    for (int d = threadIdx.x; d < D; d += blockDim.x) ms += static_cast<double>(x[d]) * x[d] / D;
    ms = block_sum(ms);  // every thread reads x before any writes out (out may alias x)
    const float s = scale * static_cast<float>(sqrt(ms));
    const uint64_t base = counter0 + row * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[d] = x[d] + s * rng.normal(base + d);
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

void CudaBackend::add_input_noise(
    float* out_ND, const float* x_ND, int N, int D, const CounterRng& rng, uint64_t counter0, float scale) {
    const ProfiledOp op(profiler_.get(), "add_input_noise");
    if (N <= 0 || D <= 0) return;
    add_input_noise_kernel<<<N, kThreads, 0, stream_>>>(out_ND, x_ND, D, rng, counter0, scale);
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

// ---- optimizer --------------------------------------------------------------------------------

namespace {

struct AdamParams {
    float beta1, beta2, eps, grad_scale, step_size, decay, sqrt_bc2;
};

__device__ inline void adamw_element(float& param, float grad, float& m, float& v, const AdamParams& a) {
    const float g = grad * a.grad_scale;
    const float mi = a.beta1 * m + (1.0f - a.beta1) * g;
    const float vi = a.beta2 * v + (1.0f - a.beta2) * g * g;
    m = mi;
    v = vi;
    param = param * a.decay - a.step_size * mi / (sqrtf(vi) / a.sqrt_bc2 + a.eps);
}

__global__ void adamw_kernel(
    float* param, const float* grad, float* m, float* v, uint16_t* param16, size_t n, AdamParams a) {
    BMOE_GRID_STRIDE(i, n) {
        adamw_element(param[i], grad[i], m[i], v[i], a);
        if (param16) param16[i] = bf16_bits_rne(param[i]);
    }
}

// The same update four elements at a time (16-byte loads and stores): AdamW is bandwidth-bound,
// 28 bytes per parameter.
__global__ void adamw_vec4_kernel(
    float4* param, const float4* grad, float4* m, float4* v, uint2* param16, size_t quads, AdamParams a) {
    BMOE_GRID_STRIDE(i, quads) {
        float4 p = param[i], mi = m[i], vi = v[i];
        const float4 g = grad[i];
        adamw_element(p.x, g.x, mi.x, vi.x, a);
        adamw_element(p.y, g.y, mi.y, vi.y, a);
        adamw_element(p.z, g.z, mi.z, vi.z, a);
        adamw_element(p.w, g.w, mi.w, vi.w, a);
        param[i] = p;
        m[i] = mi;
        v[i] = vi;
        if (param16) param16[i] = pack_bf16x4(p.x, p.y, p.z, p.w);
    }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void CudaBackend::adamw_update(float* param,
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
    const ProfiledOp op(profiler_.get(), "adamw_update");
    if (n == 0) return;
    // Same scalar folding as the CPU (PyTorch order): bias corrections in double on the host.
    const float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), step));
    const float sqrt_bc2 = static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(beta2), step)));
    const AdamParams a{beta1, beta2, eps, grad_scale, lr / bc1, 1.0f - lr * weight_decay, sqrt_bc2};
    size_t done = 0;
    const bool param16_aligned = param16 == nullptr || reinterpret_cast<uintptr_t>(param16) % 8 == 0;
    if (aligned16(param) && aligned16(grad) && aligned16(m) && aligned16(v) && param16_aligned && n >= 4) {
        const size_t quads = n / 4;
        adamw_vec4_kernel<<<grid_for(quads), kThreads, 0, stream_>>>(
            reinterpret_cast<float4*>(param), reinterpret_cast<const float4*>(grad), reinterpret_cast<float4*>(m),
            reinterpret_cast<float4*>(v), reinterpret_cast<uint2*>(param16), quads, a);
        CUDA_CHECK_LAST();
        done = 4 * quads;
    }
    if (done < n) {  // unaligned tensors, and the last n % 4 elements
        adamw_kernel<<<grid_for(n - done), kThreads, 0, stream_>>>(param + done, grad + done, m + done, v + done,
                                                                   param16 ? param16 + done : nullptr, n - done, a);
        CUDA_CHECK_LAST();
    }
}

// ---- bf16 transport: the CPU's nearest-even conversion, bit for bit ---------------------------

namespace {

__global__ void bf16_to_float_kernel(float* out, const uint16_t* in, size_t n) {
    BMOE_GRID_STRIDE(i, n) out[i] = bf16_value(in[i]);
}

}  // namespace

void CudaBackend::float_to_bf16(uint16_t* out, const float* in, size_t n) {
    const ProfiledOp op(profiler_.get(), "float_to_bf16");
    round_to_bf16(stream_, out, in, n);
}

void CudaBackend::bf16_to_float(float* out, const uint16_t* in, size_t n) {
    const ProfiledOp op(profiler_.get(), "bf16_to_float");
    if (n == 0) return;
    bf16_to_float_kernel<<<grid_for(n), kThreads, 0, stream_>>>(out, in, n);
    CUDA_CHECK_LAST();
}

}  // namespace bmoe::model
