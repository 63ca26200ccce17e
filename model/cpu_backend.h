// cpu_backend.h -- CpuBackend: the reference implementation of model/backend.h.
// Plain loops + OpenBLAS sgemm, OpenMP over independent rows/heads where it pays. fp32 (bf16
// matmul precision is emulated exactly: inputs rounded to bf16, fp32 sgemm).
// It is the oracle the CUDA backend is tested against, and fast enough to train small models.
// Threading: one level of parallelism per region (BLAS threads for GEMMs, OpenMP for the rest);
// results never depend on the thread count (every reduction has a fixed order).
#pragma once

#include <vector>

#include "model/backend.h"

namespace bmoe::model {

// Not final: tests derive a memory-checking backend from it (tests/memory_checking_backend.h).
class CpuBackend : public Backend {
  public:
    std::string name() const override { return "cpu"; }
    bool is_host() const override { return true; }
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
    void cross_entropy_forward(
        float* loss_N, float* probs_NV, const float* logits_NV, const int32_t* targets_N, int N, int V) override;
    void cross_entropy_backward(
        float* dlogits_NV, const float* probs_NV, const int32_t* targets_N, float dloss, int N, int V) override;
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
    // With bf16 matmul precision: x[0..n) rounded to bf16 in scratch slot `slot` (0..3), or read
    // from the bf16 weight copy where it has x; else x.
    const float* matmul_input(const float* x, size_t n, int slot);
    // x16[0..n) as floats (exact) in scratch slot `slot`.
    const float* widen_bf16(const uint16_t* x16, size_t n, int slot);
    // fp32 scratch (slot 3; the ops using it read no operand there) for a GEMM result that is
    // then rounded into a bf16 output.
    float* fp32_result(size_t n);
    // moe_combine_backward's gate gradients (both variants)
    static void combine_backward_gates(
        float* dtopk_weight_NK, const float* dy_ND, const float* y_RD, const int32_t* slot_row_NK, int N, int K, int D);
    // The dense backward GEMMs from a rounded (or fp32) dout and in (matmul_backward, matmul_backward_bf16).
    void dense_backward_rounded(float* din_NI,
                                float* dw_OI,
                                const float* dout_NO,
                                const float* in_NI,
                                const float* w_OI,
                                int N,
                                int I,
                                int O,
                                bool accumulate_din);
    // The grouped GEMM loops over operands already rounded (or fp32).
    void grouped_forward_rounded(
        float* out_RO, const float* in_RI, const float* w_GOI, const int* offsets_host, int G, int I, int O);
    void grouped_backward_rounded(float* din_RI,
                                  float* dw_GOI,
                                  const float* dout_RO,
                                  const float* in_RI,
                                  const float* w_GOI,
                                  const int* offsets_host,
                                  int G,
                                  int I,
                                  int O);
    std::vector<float> bf16_scratch_[4];
};

}  // namespace bmoe::model
