// op_cost_backend.h -- OpCostBackend: runs no op; models what each would cost on a GPU.
//
// A Backend whose buffers are never touched: alloc() hands out addresses with no memory behind
// them (a host read of one crashes), download() returns zeros (a routing plan's expert counts: a
// balanced routing, so every expert gets its share of rows), and every op adds its FLOPs and the
// bytes it must move to a ledger, with a roofline time per call:
//   time = max(FLOPs / (peak * compute efficiency), bytes / (HBM bandwidth * bandwidth efficiency),
//              min_kernel_seconds)
// summed over the kernels the CUDA backend launches for the op. Driving a model through it tallies a
// training step of any size in a fraction of a second of CPU, without a GPU: the step time the
// CUDA backend's current decomposition into ops could reach if every kernel ran at the roofline,
// hence an upper bound on its MFU (bench/bench_roofline.cpp), and where that time goes.
//
// Bytes are what each op must read and write once, at the CUDA backend's storage types: fp32
// activations, weights, gradients and moments; with bf16 matmul precision each fp32 tensor a GEMM
// op reads is first rounded into a bf16 copy (read 4 + write 2 bytes per element, one kernel per
// tensor) that the GEMM reads (2 bytes), as model/cuda/cuda_gemm.cu does. The attention kernels'
// [B, H, T, T] traffic follows model/cuda/cuda_attention.cu (kGemm) and flash_attention.cu
// (kFlash: only the operands, as if K/V tiles were re-read from L2). CostModel::activation_bytes = 2
// is a what-if: activations stored in bf16, GEMMs reading them without copies.
//
// Host transfers (upload/download) are costed apart (PCIe time plus a synchronisation each).
// peak_allocated_bytes() is exact: the same buffers the model allocates on any backend.
#pragma once

#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <string>
#include <utility>

#include "model/backend.h"

namespace bmoe::model {

// A card's datasheet peaks (dense, no sparsity).
struct GpuSpec {
    std::string name;
    double bf16_flops = 0.0;  // FLOP/s, tensor cores
    double fp32_flops = 0.0;  // FLOP/s, CUDA cores (no TF32)
    double hbm_bytes_per_s = 0.0;
};
// "h100" (SXM: 989 / 67 TFLOP/s, 3.35 TB/s) | "h200" (989 / 67, 4.8 TB/s); throws a one-line
// bmoe::Error naming the valid values otherwise.
GpuSpec gpu_spec(const std::string& name);

struct CostModel {
    GpuSpec gpu = gpu_spec("h100");
    double gemm_efficiency = 0.7;        // of the peak, reached by cuBLAS GEMMs (dense and grouped)
    double attention_efficiency = 0.35;  // of the peak, reached by the attention products
    double bandwidth_efficiency = 0.8;   // of HBM bandwidth, reached by memory-bound kernels
    double min_kernel_seconds = 3e-6;    // no kernel finishes faster (launch and tail)
    double pcie_bytes_per_s = 25e9;      // host <-> device copies
    double sync_seconds = 20e-6;         // a download waits for the queue and restarts it (not one right after another)
    int activation_bytes = 4;            // 4: as built (fp32); 2: what-if bf16 activation storage
};

// One ledger row: everything a kind of op did in the recorded calls.
struct OpCost {
    int64_t calls = 0;
    double flops = 0.0;
    double bytes = 0.0;    // device memory traffic (host transfers: bytes over PCIe)
    double seconds = 0.0;  // roofline time
};

class OpCostBackend final : public Backend {
  public:
    explicit OpCostBackend(const CostModel& model = CostModel{}) : model_(model) {}
    std::string name() const override { return "cost"; }

    const CostModel& cost_model() const { return model_; }
    // Rows keyed by op name; GEMMs also by shape ("matmul_forward 8192x768x50304" = N x I x O), and
    // "bf16 copies, weight: <GEMM row>" and "bf16 copies, activation: <GEMM row>" for the roundings
    // before bf16 GEMMs, "host transfers" for upload/download.
    const std::map<std::string, OpCost>& ledger() const { return ledger_; }
    OpCost total() const;
    // Roofline seconds per op as CUDA's op profiler names and times ops (model/cuda/op_profiler.h:
    // "matmul_fwd 8192x768x3072", "grouped_matmul_bwd 8x768x3072" = G x I x O, "download", ...),
    // an op's bf16 operand copies included: bench_train --profile sets measured against these.
    const std::map<std::string, double>& seconds_by_profiled_op() const { return profiled_; }
    void clear_ledger() {
        ledger_.clear();
        profiled_.clear();
        host_after_sync_ = {};
        queue_empty_ = false;  // a gap open at the clear is not counted
    }
    // Measured, not modelled: wall seconds this process's host code ran between a synchronising
    // download (the first of consecutive ones) and the next kernel (the routing plan, the router's
    // host work), while a GPU would have nothing queued. Not in the ledger (it depends on the CPU;
    // the idle time of the downloads themselves is); bench_roofline reports it.
    struct HostGaps {
        int64_t syncs = 0;
        double seconds = 0.0;
    };
    const HostGaps& host_after_sync() const { return host_after_sync_; }

    // Both kernels can be costed (the CPU has no flash kernel, the model of one needs none).
    void set_attention_kernel(AttentionKernel k) override { attention_kernel_ = k; }
    size_t attention_saved_numel(int B, int T, int H, int Hd) const override;

    void* alloc(size_t bytes) override;
    void free(void* ptr) override;
    void upload(void* dst, const void* src_host, size_t bytes) override;
    void download(void* dst_host, const void* src, size_t bytes) override;
    void copy(void* dst, const void* src, size_t bytes) override;
    void zero(void* ptr, size_t bytes) override;
    void synchronize() override {}
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
    bool attention_reads_bf16(int) const override { return attention_kernel_ == AttentionKernel::kFlash && bf16(); }
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
    // One GEMM operand: its elements and whether it is a weight (always fp32) or an activation.
    struct Operand {
        double elements;
        bool weight;
    };
    // Adds one memory-bound kernel (or one per op where the kernels are fused) to row `key`.
    void kernel(const std::string& key, double bytes, double flops = 0.0);
    // With bf16 matmul precision: one rounding kernel per fp32 operand of a GEMM op (once per op,
    // however many of its GEMMs read it).
    void operand_copies(const std::string& key, std::initializer_list<Operand> operands);
    // Adds a GEMM kernel of `flops` reading `inputs` (bf16 copies, or as stored) and writing (or,
    // accumulate, updating) `outputs` elements of output_bytes each (fp32, or bf16).
    void gemm(const std::string& key,
              double flops,
              std::initializer_list<Operand> inputs,
              double outputs,
              bool accumulate = false,
              double output_bytes = 4.0);
    // The dense GEMM ops with weight w: out written at output_bytes per element; dout_stored_bf16:
    // d out is held as bf16 and needs no copy.
    void dense_forward_cost(const float* w, int N, int I, int O, bool bias, double output_bytes, bool in_stored_bf16);
    void dense_backward_cost(const float* w,
                             bool din,
                             bool dw,
                             bool dbias,
                             int N,
                             int I,
                             int O,
                             bool accumulate_din,
                             bool dout_stored_bf16,
                             bool in_stored_bf16);
    // Adds tensor-core work at the attention efficiency with `bytes` of traffic.
    void attention_products(const std::string& key, double flops, double bytes);
    // The grouped expert GEMMs over r rows (din/dw: which products run; *_stored_bf16: that operand
    // is held as bf16 and needs no copy; out_bytes / din_bytes: 4, or 2 for a bf16 result).
    void grouped_forward_cost(const float* w, double r, int G, int I, int O, bool in_stored_bf16, double out_bytes);
    void grouped_backward_cost(const float* w,
                               bool din,
                               bool dw,
                               double r,
                               int G,
                               int I,
                               int O,
                               bool dout_stored_bf16,
                               bool in_stored_bf16,
                               double din_bytes);
    // n, the elements of weight operand w to round into a copy; 0 where the model's bf16 weight
    // copy holds them (Backend::set_bf16_weight_copy).
    double weight_to_round(const float* w, double n) const;
    // A tensor-core kernel's roofline time at `efficiency` of the peak.
    double product_seconds(double flops, double bytes, double efficiency) const;
    void host_transfer(size_t bytes, bool synchronizes);
    // Books `seconds` to ledger row `key` and to the op's profiled name (op_name_, or the key itself).
    void book(const std::string& key, double flops, double bytes, double seconds);
    // Sets op_name_ for one op whose ledger rows are named otherwise than CUDA's profiler names it.
    class ProfiledName {
      public:
        // Nested ops (an op calling another) book under the outermost name, as CUDA's profiler does.
        ProfiledName(OpCostBackend* be, std::string name) : be_(be), outermost_(be->op_name_.empty()) {
            if (outermost_) be_->op_name_ = std::move(name);
        }
        ProfiledName(OpCostBackend* be, const char* name, long a, long b, long c);
        ~ProfiledName() {
            if (outermost_) be_->op_name_.clear();
        }

      private:
        OpCostBackend* be_;
        bool outermost_;
    };
    double act(double elements) const { return elements * model_.activation_bytes; }
    bool bf16() const { return matmul_precision_ == MatmulPrecision::kBf16; }

    CostModel model_;
    std::map<std::string, OpCost> ledger_;
    std::map<std::string, double> profiled_;
    std::string op_name_;
    HostGaps host_after_sync_;
    struct {
        const void* counts = nullptr;  // the last moe_plan_routing's counts_E
        int64_t copies = 0;
        int experts = 0;
    } planned_;
    std::chrono::steady_clock::time_point synced_at_;
    bool queue_empty_ = false;                     // a download synchronised and no kernel was queued since
    uintptr_t next_address_ = uintptr_t{1} << 44;  // far above any host allocation: never dereferenced
};

}  // namespace bmoe::model
