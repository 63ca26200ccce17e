// cuda_backend.h -- CudaBackend: model/backend.h on one NVIDIA GPU (fp32, cuBLAS + simple kernels;
// bf16 matmul precision runs the GEMMs on bf16 tensor cores with fp32 accumulation).
//
// Plain-C++ header (no CUDA includes): the stream and cuBLAS handle are held through their opaque
// struct types, so g++-compiled code (model/backend.cpp, tests) can include it.
// Every op is enqueued on the backend's own stream; download(), sum_squares() and synchronize()
// wait for it. Results match CpuBackend within fp32 rounding and are deterministic (no atomics).
// Implementation: cuda_backend.cu (lifecycle, memory, elementwise, optimizer), cuda_gemm.cu
// (cuBLAS GEMMs, bf16 input copies), cuda_ops.cu (embeddings, norms, activations, loss, router,
// MoE), cuda_attention.cu (rope, attention), flash_attention.cu (the fused attention kernel).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <functional>
#include <memory>
#include <vector>

#include "model/backend.h"
#include "model/cuda/op_profiler.h"

struct CUstream_st;    // cudaStream_t is CUstream_st*
struct cublasContext;  // cublasHandle_t is cublasContext*

namespace bmoe::model {

struct BatchedGemm;  // model/cuda/attention_plan.h

// Devices the CUDA runtime sees (0 without a driver or GPU; never throws).
int cuda_device_count();
// True when the CUDA runtime sees at least one device (never throws).
bool cuda_device_available();
// Bytes in use on the current device (total - free: every process and context on it).
size_t cuda_memory_in_use();
// The current device's name, e.g. "NVIDIA H100 80GB HBM3".
std::string cuda_device_name();
// Throws bmoe::Error with a hint when no device is visible.
std::unique_ptr<Backend> make_cuda_backend(int local_rank = 0);  // device = local_rank % device count

class CudaBackend final : public Backend {
  public:
    CudaBackend();  // creates the stream and cuBLAS handle on the current device
    ~CudaBackend() override;
    CudaBackend(const CudaBackend&) = delete;
    CudaBackend& operator=(const CudaBackend&) = delete;

    std::string name() const override { return "cuda"; }
    void set_attention_kernel(AttentionKernel k) override;  // kFlash: compute capability 8.0+
    size_t attention_saved_numel(int B, int T, int H, int Hd) const override;
    CUstream_st* stream() const { return stream_; }  // the compute stream, e.g. for make_nccl_world
    OpProfiler& profiler() { return *profiler_; }    // per-op GPU time (bench_train --profile)
    void* alloc(size_t bytes) override;
    void free(void* ptr) override;
    void upload(void* dst, const void* src_host, size_t bytes) override;
    void download(void* dst_host, const void* src, size_t bytes) override;
    void copy(void* dst, const void* src, size_t bytes) override;
    void zero(void* ptr, size_t bytes) override;
    void synchronize() override;
    void add(float* out, const float* a, const float* b, size_t n) override;
    void accumulate(float* out, const float* a, size_t n) override;
    void scale(float* x, float s, size_t n) override;
    void mul(float* out, const float* a, const float* b, size_t n) override;
    double sum_squares(const float* x, size_t n) override;
    void matmul_forward(
        float* out_NO, const float* in_NI, const float* w_OI, const float* bias_O, int N, int I, int O) override;
    void matmul_backward(float* din_NI,
                         float* dw_OI,
                         float* dbias_O,
                         const float* dout_NO,
                         const float* in_NI,
                         const float* w_OI,
                         int N,
                         int I,
                         int O,
                         bool accumulate_din) override;
    void grouped_matmul_forward(
        float* out_RO, const float* in_RI, const float* w_GOI, const int* offsets_host, int G, int I, int O) override;
    void grouped_matmul_backward(float* din_RI,
                                 float* dw_GOI,
                                 const float* dout_RO,
                                 const float* in_RI,
                                 const float* w_GOI,
                                 const int* offsets_host,
                                 int G,
                                 int I,
                                 int O) override;
    void embedding_forward(float* out_ND, const int32_t* tokens_N, const float* table_VD, int N, int D) override;
    void embedding_backward(float* dtable_VD, const float* dout_ND, const int32_t* tokens_N, int N, int D) override;
    void position_forward(float* x_BTD, const float* wpe_SD, int B, int T, int D) override;
    void position_backward(float* dwpe_SD, const float* dx_BTD, int B, int T, int D) override;
    void rmsnorm_forward(
        float* out_ND, float* rstd_N, const float* in_ND, const float* w_D, int N, int D, float eps) override;
    void rmsnorm_backward(float* din_ND,
                          float* dw_D,
                          const float* dout_ND,
                          const float* in_ND,
                          const float* w_D,
                          const float* rstd_N,
                          int N,
                          int D) override;
    void layernorm_forward(float* out_ND,
                           float* mean_N,
                           float* rstd_N,
                           const float* in_ND,
                           const float* w_D,
                           const float* b_D,
                           int N,
                           int D,
                           float eps) override;
    void rmsnorm_forward_bf16(
        uint16_t* out16_ND, float* rstd_N, const float* in_ND, const float* w_D, int N, int D, float eps) override;
    void layernorm_forward_bf16(uint16_t* out16_ND,
                                float* mean_N,
                                float* rstd_N,
                                const float* in_ND,
                                const float* w_D,
                                const float* b_D,
                                int N,
                                int D,
                                float eps) override;
    void layernorm_backward(float* din_ND,
                            float* dw_D,
                            float* db_D,
                            const float* dout_ND,
                            const float* in_ND,
                            const float* w_D,
                            const float* mean_N,
                            const float* rstd_N,
                            int N,
                            int D) override;
    void rope_forward(float* x_BTHd, int B, int T, int nh, int Hd, float theta) override;
    void rope_backward(float* dx_BTHd, int B, int T, int nh, int Hd, float theta) override;
    void attention_forward(float* out_BTHd,
                           float* att_BHTT,
                           const float* q_BTHd,
                           const float* k_BTKVHd,
                           const float* v_BTKVHd,
                           int B,
                           int T,
                           int H,
                           int KV,
                           int Hd) override;
    void attention_backward(float* dq_BTHd,
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
                            int Hd) override;
    bool attention_reads_bf16(int Hd) const override { return flash_attention_active(Hd); }
    void attention_forward_bf16(float* out_BTHd,
                                float* att_BHTT,
                                const uint16_t* q16_BTHd,
                                const uint16_t* k16_BTKVHd,
                                const uint16_t* v16_BTKVHd,
                                int B,
                                int T,
                                int H,
                                int KV,
                                int Hd) override;
    void attention_backward_bf16(uint16_t* dq16_BTHd,
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
                                 int Hd) override;
    void swiglu_forward(float* out, const float* gate, const float* up, size_t n) override;
    void swiglu_backward(
        float* dgate, float* dup, const float* dout, const float* gate, const float* up, size_t n) override;
    void gelu_forward(float* out, const float* in, size_t n) override;
    void gelu_backward(float* din, const float* dout, const float* in, size_t n) override;
    void gelu_forward_bf16(uint16_t* out16, const uint16_t* in16, size_t n) override;
    void swiglu_forward_bf16(uint16_t* out16, const uint16_t* gate16, const uint16_t* up16, size_t n) override;
    void gelu_backward_bf16(uint16_t* din16, const uint16_t* dout16, const uint16_t* in16, size_t n) override;
    void swiglu_backward_bf16(uint16_t* dgate16,
                              uint16_t* dup16,
                              const uint16_t* dout16,
                              const uint16_t* gate16,
                              const uint16_t* up16,
                              size_t n) override;
    void grouped_matmul_forward_bf16(float* out_RO,
                                     uint16_t* out16_RO,
                                     const float* in_RI,
                                     const uint16_t* in16_RI,
                                     const float* w_GOI,
                                     const int* offsets_host,
                                     int G,
                                     int I,
                                     int O) override;
    void grouped_matmul_backward_bf16(float* din_RI,
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
                                      int O) override;
    void matmul_forward_bf16(float* out_NO,
                             uint16_t* out16_NO,
                             const float* in_NI,
                             const uint16_t* in16_NI,
                             const float* w_OI,
                             int N,
                             int I,
                             int O) override;
    void matmul_backward_bf16(float* din_NI,
                              float* dw_OI,
                              const float* dout_NO,
                              const uint16_t* dout16_NO,
                              const float* in_NI,
                              const uint16_t* in16_NI,
                              const float* w_OI,
                              int N,
                              int I,
                              int O,
                              bool accumulate_din) override;
    void cross_entropy_forward_bf16(
        float* loss_N, float* lse_N, const uint16_t* logits16_NV, const int32_t* targets_N, int N, int V) override;
    void cross_entropy_backward_bf16(uint16_t* dlogits16_NV,
                                     const uint16_t* logits16_NV,
                                     const float* lse_N,
                                     const int32_t* targets_N,
                                     float dloss,
                                     int N,
                                     int V) override;
    void cross_entropy_forward(
        float* loss_N, float* probs_NV, const float* logits_NV, const int32_t* targets_N, int N, int V) override;
    void cross_entropy_backward(
        float* dlogits_NV, const float* probs_NV, const int32_t* targets_N, float dloss, int N, int V) override;
    void router_topk_forward(float* probs_NE,
                             float* lse_N,
                             int32_t* topk_idx_NK,
                             float* topk_weight_NK,
                             const float* logits_NE,
                             int N,
                             int E,
                             int K,
                             bool renormalize) override;
    void router_topk_backward(float* dlogits_NE,
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
                              bool renormalize) override;
    void moe_plan_routing(int32_t* row_src_R,
                          int32_t* slot_row_NK,
                          int32_t* counts_E,
                          const int32_t* topk_idx_NK,
                          int N,
                          int K,
                          int E,
                          int capacity) override;
    void moe_gather_forward(float* x_RD, const float* x_ND, const int32_t* row_src_R, int R, int K, int D) override;
    void moe_gather_backward(
        float* dx_ND, const float* dx_RD, const int32_t* slot_row_NK, int N, int K, int D) override;
    void moe_combine_forward(float* y_ND,
                             const float* y_RD,
                             const int32_t* slot_row_NK,
                             const float* topk_weight_NK,
                             int N,
                             int K,
                             int D) override;
    void moe_combine_backward(float* dy_RD,
                              float* dtopk_weight_NK,
                              const float* dy_ND,
                              const float* y_RD,
                              const int32_t* row_src_R,
                              const int32_t* slot_row_NK,
                              const float* topk_weight_NK,
                              int N,
                              int R,
                              int K,
                              int D) override;
    void moe_gather_forward_bf16(
        uint16_t* x16_RD, const float* x_ND, const int32_t* row_src_R, int R, int K, int D) override;
    void moe_combine_backward_bf16(uint16_t* dy16_RD,
                                   float* dtopk_weight_NK,
                                   const float* dy_ND,
                                   const float* y_RD,
                                   const int32_t* row_src_R,
                                   const int32_t* slot_row_NK,
                                   const float* topk_weight_NK,
                                   int N,
                                   int R,
                                   int K,
                                   int D) override;
    void gather_rows_bf16(uint16_t* out16_LD, const uint16_t* in16_RD, const int32_t* src_L, int L, int D) override;
    void adamw_update(float* param,
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
                      int step) override;
    void router_rows(RouterStage stage, const RouterRows& rows) override;
    void dropout_mask(float* mask_ND, int N, int D, const DropoutMaskDraw& draw) override;
    void add_input_noise(
        float* out_ND, const float* x_ND, int N, int D, const CounterRng& rng, uint64_t counter0, float scale) override;
    void float_to_bf16(uint16_t* out, const float* in, size_t n) override;
    void bf16_to_float(float* out, const uint16_t* in, size_t n) override;

  private:
    // Device scratch that grows on demand and is reused across calls (stream-ordered).
    struct Scratch {
        void* ptr = nullptr;
        size_t bytes = 0;
    };
    void* scratch(Scratch& s, size_t bytes);
    double* column_reduce_ws(int N, int D);  // cuda::column_reduce's partial sums
    // A GEMM's A and B inputs (C is fp32 unless gemm's c_bf16): fp32; bf16 copies (bf16 matmul precision); or,
    // with BMOE_CUDA_BF16_GEMM=fast16bf, fp32 under CUBLAS_COMPUTE_32F_FAST_16BF (the path before
    // the copies, kept to compare the two on the same machine).
    enum class GemmInput { kFp32, kBf16, kFp32Fast16Bf };
    // A GEMM's inputs as cuBLAS reads them. fp32: the tensors themselves. bf16 matmul precision:
    // each fp32 tensor of the op rounded to bf16 once, into its own scratch slot; operator() maps
    // a pointer into a converted tensor to the same element of its copy.
    struct GemmTensor {
        const float* x;  // null: not read by this op
        size_t n;
    };
    struct GemmInputs {
        struct Copy {
            const float* base;
            size_t n;
            const uint16_t* bf16;
        };
        GemmInput type = GemmInput::kFp32;
        std::vector<Copy> copies;
        int next_slot = 0;  // the first bf16 scratch slot the copies leave free
        bool bf16() const { return type == GemmInput::kBf16; }
        const void* operator()(const float* p) const;
    };
    GemmInputs gemm_inputs(std::initializer_list<GemmTensor> tensors);  // into slots 0, 1, ... in order
    GemmInputs bf16_gemm_inputs(std::initializer_list<GemmTensor> tensors);  // bf16 copies in either mode
    static constexpr int kBf16Slots = 6;
    uint16_t* bf16_slot(int slot, size_t n);                      // scratch for n bf16 values
    const uint16_t* to_bf16(int slot, const float* x, size_t n);  // x rounded into bf16_slot(slot, n)

    // Row-major C_MN = alpha op(A)_MK op(B)_KN + beta C_MN via cuBLAS (column-major underneath).
    // C is fp32, or bf16 (c_bf16: bf16 inputs and beta = 0 only; cuBLAS rounds the fp32 accumulator).
    void gemm(int M,
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
              bool c_bf16 = false);

    // The norms' backward in one pass (norm_backward_fused_kernel: LayerNorm where mean_N is given,
    // RMSNorm where null; db_D LayerNorm only, null where frozen, as dw_D may be). False where D is
    // too wide for its shared memory: the caller runs the row kernel and column reductions.
    bool norm_backward_fused(float* din_ND,
                             float* dw_D,
                             float* db_D,
                             const float* dout_ND,
                             const float* in_ND,
                             const float* w_D,
                             const float* mean_N,
                             const float* rstd_N,
                             int N,
                             int D);
    // moe_combine_backward with the d rows stored as Out (float or bf16 bits): rows, then gates.
    template <typename Out>
    void combine_backward(Out* dy_RD,
                          float* dtopk_weight_NK,
                          const float* dy_ND,
                          const float* y_RD,
                          const int32_t* row_src_R,
                          const int32_t* slot_row_NK,
                          const float* topk_weight_NK,
                          int N,
                          int R,
                          int K,
                          int D);

    // din_NI (=, or += with accumulate_din) = dout w; dw_OI += dout^T in: dout and in_rows as cuBLAS
    // reads them (fp32, a bf16 copy, or a bf16 tensor; in_rows read only with dw), w through `in`
    // (matmul_backward and its bf16 variant).
    void dense_backward_gemms(float* din_NI,
                              float* dw_OI,
                              const void* dout,
                              const void* in_rows,
                              const float* w_OI,
                              const GemmInputs& in,
                              int N,
                              int I,
                              int O,
                              bool accumulate_din);

    // One row-major GEMM per problem, C_i = alpha op(A_i) op(B_i) + beta C_i with per-problem
    // M/N/K and shared leading dimensions, in ONE grouped (or, all of one shape, batched) cuBLAS
    // call. Problems with M, N or K = 0 are skipped. C is fp32, or bf16 (c_bf16: as in gemm()).
    struct GemmProblem {
        int M, N, K;
        const void* A;  // GemmInput elements
        const void* B;
        void* C;
    };
    void grouped_gemm(const std::vector<GemmProblem>& problems,
                      float alpha,
                      int lda,
                      bool transA,
                      int ldb,
                      bool transB,
                      float beta,
                      int ldc,
                      GemmInput in,
                      bool c_bf16 = false);
    // One product of an attention plan (attention_plan.h), its operands mapped through `in`.
    void run_batched_gemm(const BatchedGemm& g, const GemmInputs& in);
    // The expert GEMMs over row groups [offsets[g], offsets[g+1]); in_rows(r0) / dout_rows(r0) is
    // that operand, as cuBLAS reads it, from row r0 (fp32, a bf16 copy, or a tensor stored as bf16).
    // out_RO / din_RI: fp32, or bf16 with out_bf16 / din_bf16.
    using RowOperand = std::function<const void*(size_t r0)>;
    void grouped_forward_gemms(void* out_RO,
                               bool out_bf16,
                               const RowOperand& in_rows,
                               const float* w_GOI,
                               const GemmInputs& in,
                               const int* offsets_host,
                               int G,
                               int I,
                               int O);
    void grouped_backward_gemms(void* din_RI,
                                bool din_bf16,
                                float* dw_GOI,
                                const RowOperand& dout_rows,
                                const RowOperand& in_rows,
                                const float* w_GOI,
                                const GemmInputs& in,
                                const int* offsets_host,
                                int G,
                                int I,
                                int O);
    // q, k, v [nq], [nkv] x2 widened from bf16 into attn_qkv_ws_ (sized for them and as much
    // again, for dq, dk, dv): the _bf16 attention ops on the gemm kernel. Returns q; k and v follow.
    float* widen_qkv(const uint16_t* q16, const uint16_t* k16, const uint16_t* v16, size_t nq, size_t nkv);
    // AttentionKernel::kFlash (flash_attention.cu): used when chosen, with bf16 matmul precision
    // and head_dim <= 128; the attention ops fall back to the gemm kernel otherwise.
    bool flash_attention_active(int Hd) const;
    template <typename E>  // q, k, v elements: float, or uint16_t (bf16 bits: attention_forward_bf16)
    void flash_attention_forward(float* out_BTHd,
                                 float* lse_BHT,
                                 const E* q_BTHd,
                                 const E* k_BTKVHd,
                                 const E* v_BTKVHd,
                                 int B,
                                 int T,
                                 int H,
                                 int KV,
                                 int Hd);
    template <typename E>  // q, k, v, dq, dk, dv elements: float, or uint16_t (attention_backward_bf16)
    void flash_attention_backward(E* dq_BTHd,
                                  E* dk_BTKVHd,
                                  E* dv_BTKVHd,
                                  const float* dout_BTHd,
                                  const float* out_BTHd,
                                  const E* q_BTHd,
                                  const E* k_BTKVHd,
                                  const E* v_BTKVHd,
                                  const float* lse_BHT,
                                  int B,
                                  int T,
                                  int H,
                                  int KV,
                                  int Hd);

    CUstream_st* stream_ = nullptr;
    cublasContext* blas_ = nullptr;
    Scratch gemm_ptrs_ws_;                   // device arrays of A/B/C pointers for grouped GEMMs
    Scratch reduce_ws_;                      // sum_squares partials
    Scratch embed_ws_;                       // embedding_backward CSR of token positions
    Scratch attn_ws_;                        // attention_backward dS [B, H, T, T]
    Scratch attn_qkv_ws_;                    // the _bf16 attention ops (gemm kernel): fp32 q, k, v (dq, dk, dv)
    Scratch colred_ws_;                      // column_reduce partial sums [splits, D] (double)
    Scratch plan_ws_;                        // moe_plan_routing: per-tile counts and bases, offsets, kept
    Scratch bf16_ws_[kBf16Slots];            // bf16 copies of GEMM inputs (bf16 matmul precision)
    std::unique_ptr<OpProfiler> profiler_;   // disabled unless asked for
    uint64_t gemm_unsupported_ = 0;  // bit (bf16 C, batched, GemmInput, transA, transB): cuBLAS refused that call
    bool bf16_input_copies_ = true;          // BMOE_CUDA_BF16_GEMM: copies (default) | fast16bf
};

}  // namespace bmoe::model
