// backend.h -- the compute interface every bmoe backend implements (CPU reference, CUDA).
//
// The model (model/model.cpp) is a straight list of calls to these ops; a backend owns memory
// and kernels. Every float*/int32_t* argument is *backend memory* (host RAM for the CPU backend,
// device memory for CUDA) unless its comment says "host". All math is fp32 (GEMMs optionally with
// bf16 inputs: set_matmul_precision).
//
// Conventions (llm.c style):
//   - forward:  outputs (incl. saved-for-backward), then inputs, then weights, then sizes.
//   - backward: d-inputs, d-weights, then dout, saved activations, weights, sizes.
//   - Parameter gradients ACCUMULATE (+=). Activation gradients OVERWRITE (=) unless the
//     comment says "+=" (norm backward accumulates into the residual stream's gradient).
//   - A null parameter-gradient pointer (dw, dbias, dtable, ...) marks a frozen weight: that
//     gradient is skipped, its GEMM or reduction not computed (router fine-tuning skips the
//     weight-gradient GEMMs of every frozen layer this way).
//   - Linear weights are [out, in] row-major (PyTorch nn.Linear layout): y = x W^T + b.
// Shape legend: N = tokens (B*T), B = batch, T = sequence, D = d_model, V = vocab, H = query heads,
// KV = key/value heads, Hd = head_dim, E = experts, K = top-k, R = routed rows (N*K, grouped by
// expert), F = FFN hidden, I/O = GEMM in/out features, G = groups of a grouped GEMM.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>

#include "model/precision.h"
#include "model/rng.h"
#include "model/router_rows.h"

namespace bmoe::model {

// One draw of mc_dropout masks (Backend::dropout_mask): element (n, d) takes counter
// counter0 + n * row_stride + d of rng; 0 with probability drop, else keep_scale.
struct DropoutMaskDraw {
    CounterRng rng;
    uint64_t counter0;
    uint64_t row_stride;
    float drop;
    float keep_scale;
};

// How attention_forward/backward compute (Backend::set_attention_kernel):
//   kGemm : batched GEMMs with a fused causal softmax; saves the [B, H, T, T] probabilities.
//   kFlash: one fused tiled kernel per pass (FlashAttention-2 style) on bf16 tensor cores; saves
//           only the per-row log-sum-exp [B, H, T]. CUDA with bf16 matmul precision only.
enum class AttentionKernel { kGemm, kFlash };
AttentionKernel parse_attention_kernel(const std::string& name);  // "gemm" | "flash"; throws otherwise
std::string to_string(AttentionKernel k);

class Backend {
  public:
    virtual ~Backend() = default;
    virtual std::string name() const = 0;
    // True when buffers are host memory (pointers can go straight to MPI or std::memcpy).
    virtual bool is_host() const { return false; }

    // Precision of the matmul_* / grouped_matmul_* ops that follow (model/precision.h); fp32 by
    // default. Other ops are always fp32.
    void set_matmul_precision(MatmulPrecision p) { matmul_precision_ = p; }
    MatmulPrecision matmul_precision() const { return matmul_precision_; }

    // The attention kernel of the attention ops that follow. kFlash throws a one-line bmoe::Error
    // where the backend has none (the CPU).
    virtual void set_attention_kernel(AttentionKernel k);
    AttentionKernel attention_kernel() const { return attention_kernel_; }
    // Floats attention_forward saves for attention_backward (its att_BHTT argument): B*H*T*T
    // probabilities, or B*H*T log-sum-exps where the flash kernel runs.
    virtual size_t attention_saved_numel(int B, int T, int H, int /*Hd*/) const {
        return static_cast<size_t>(B) * H * T * T;
    }

    // ---- bf16 weight copy ---------------------------------------------------------------------
    // The owner of a weight block (Model) may keep a bf16 copy of it, rounded nearest-even: while
    // set, the GEMM ops under bf16 matmul precision read fp32 operands inside [w, w + n) from
    // w16 instead of rounding them into a copy per op (the same values: bitwise the same results).
    // The owner re-rounds the copy after every write to the weights, before a GEMM reads them.
    void set_bf16_weight_copy(const float* w, const uint16_t* w16, size_t n) { weight_copy_ = {w, w16, n}; }
    void clear_bf16_weight_copy(const float* w) {  // if w's copy is the one set
        if (weight_copy_.w == w) weight_copy_ = {};
    }
    // The copy's element for x[0], if [x, x + n) lies inside the weight block; else null.
    const uint16_t* bf16_weight_copy(const float* x, size_t n) const;

    // Bytes of this backend's own buffers (alloc minus free) now, and the most at any time: what
    // the model, optimizer and scratch hold; not the CUDA context, cuBLAS workspaces or host vectors.
    size_t allocated_bytes() const { return allocated_bytes_; }
    size_t peak_allocated_bytes() const { return peak_allocated_bytes_; }

    // ---- memory -------------------------------------------------------------------------
    virtual void* alloc(size_t bytes) = 0;  // zero-filled; throws bmoe::Error when out of memory
    virtual void free(void* ptr) = 0;
    virtual void upload(void* dst, const void* src_host, size_t bytes) = 0;
    virtual void download(void* dst_host, const void* src, size_t bytes) = 0;
    virtual void copy(void* dst, const void* src, size_t bytes) = 0;  // backend -> backend
    virtual void zero(void* ptr, size_t bytes) = 0;
    virtual void synchronize() = 0;  // wait for queued work (no-op on CPU)

    // ---- elementwise ----------------------------------------------------------------------
    // out = a + b (out may alias a or b)
    virtual void add(float* out, const float* a, const float* b, size_t n) = 0;
    // out += a
    virtual void accumulate(float* out, const float* a, size_t n) = 0;
    // x *= s
    virtual void scale(float* x, float s, size_t n) = 0;
    // out = a * b elementwise (out may alias a or b)
    virtual void mul(float* out, const float* a, const float* b, size_t n) = 0;
    // sum of x[i]^2 over n elements, accumulated in double; NaN/Inf propagate (used for grad norm)
    virtual double sum_squares(const float* x, size_t n) = 0;

    // ---- dense GEMMs ----------------------------------------------------------------------
    // out_NO = in_NI * w_OI^T (+ bias_O if not null)
    virtual void matmul_forward(
        float* out_NO, const float* in_NI, const float* w_OI, const float* bias_O, int N, int I, int O) = 0;
    // din_NI = (accumulate_din ? din_NI : 0) + dout_NO * w_OI   (skipped if din_NI is null)
    // dw_OI += dout_NO^T * in_NI;  dbias_O += sum_n dout_NO (if not null)
    virtual void matmul_backward(float* din_NI,
                                 float* dw_OI,
                                 float* dbias_O,
                                 const float* dout_NO,
                                 const float* in_NI,
                                 const float* w_OI,
                                 int N,
                                 int I,
                                 int O,
                                 bool accumulate_din) = 0;
    // Grouped GEMM: rows [offsets[g], offsets[g+1]) of in_RI use weight w_GOI[g] ([O, I]).
    // offsets_host has G+1 entries, offsets_host[0] == 0, offsets_host[G] == R. Empty groups allowed.
    virtual void grouped_matmul_forward(
        float* out_RO, const float* in_RI, const float* w_GOI, const int* offsets_host, int G, int I, int O) = 0;
    // din_RI = dout_RO * w_g (=);  dw_GOI[g] += dout_g^T * in_g
    virtual void grouped_matmul_backward(float* din_RI,
                                         float* dw_GOI,
                                         const float* dout_RO,
                                         const float* in_RI,
                                         const float* w_GOI,
                                         const int* offsets_host,
                                         int G,
                                         int I,
                                         int O) = 0;

    // ---- embeddings -----------------------------------------------------------------------
    // out_ND[n] = table_VD[tokens_N[n]]
    virtual void embedding_forward(float* out_ND, const int32_t* tokens_N, const float* table_VD, int N, int D) = 0;
    // dtable_VD[tokens_N[n]] += dout_ND[n]  (deterministic order: results must not depend on threads)
    virtual void embedding_backward(float* dtable_VD, const float* dout_ND, const int32_t* tokens_N, int N, int D) = 0;
    // x_BTD[b,t] += wpe_SD[t]   (learned absolute positions, t < S)
    virtual void position_forward(float* x_BTD, const float* wpe_SD, int B, int T, int D) = 0;
    // dwpe_SD[t] += sum_b dx_BTD[b,t]
    virtual void position_backward(float* dwpe_SD, const float* dx_BTD, int B, int T, int D) = 0;

    // ---- norms ------------------------------------------------------------------------------
    // out = in * rstd * w,  rstd_N = 1/sqrt(mean(in^2) + eps)
    virtual void rmsnorm_forward(
        float* out_ND, float* rstd_N, const float* in_ND, const float* w_D, int N, int D, float eps) = 0;
    // din_ND += ..., dw_D += ...
    virtual void rmsnorm_backward(float* din_ND,
                                  float* dw_D,
                                  const float* dout_ND,
                                  const float* in_ND,
                                  const float* w_D,
                                  const float* rstd_N,
                                  int N,
                                  int D) = 0;
    // out = (in - mean) * rstd * w + b
    virtual void layernorm_forward(float* out_ND,
                                   float* mean_N,
                                   float* rstd_N,
                                   const float* in_ND,
                                   const float* w_D,
                                   const float* b_D,
                                   int N,
                                   int D,
                                   float eps) = 0;
    // The norms with their output rounded to bf16 (nearest-even; mean, rstd fp32 as above): the
    // input of GEMMs that read only its bf16 rounding (the attention projections, the LM head).
    // bf16 matmul precision only.
    virtual void rmsnorm_forward_bf16(
        uint16_t* out16_ND, float* rstd_N, const float* in_ND, const float* w_D, int N, int D, float eps) = 0;
    virtual void layernorm_forward_bf16(uint16_t* out16_ND,
                                        float* mean_N,
                                        float* rstd_N,
                                        const float* in_ND,
                                        const float* w_D,
                                        const float* b_D,
                                        int N,
                                        int D,
                                        float eps) = 0;
    // din_ND += ..., dw_D += ..., db_D += ...
    virtual void layernorm_backward(float* din_ND,
                                    float* dw_D,
                                    float* db_D,
                                    const float* dout_ND,
                                    const float* in_ND,
                                    const float* w_D,
                                    const float* mean_N,
                                    const float* rstd_N,
                                    int N,
                                    int D) = 0;

    // ---- attention --------------------------------------------------------------------------
    // Rotary embedding in place on x [B, T, nh, Hd], position = t, HF "rotate_half" pairing:
    // element i pairs with i + Hd/2, angle = t * theta^(-2i/Hd), i < Hd/2.
    virtual void rope_forward(float* x_BTHd, int B, int T, int nh, int Hd, float theta) = 0;
    // In place: rotates gradients back (the inverse rotation).
    virtual void rope_backward(float* dx_BTHd, int B, int T, int nh, int Hd, float theta) = 0;
    // Causal grouped-query attention. q [B,T,H,Hd], k/v [B,T,KV,Hd]; query head h reads kv head
    // h / (H/KV). out [B,T,H,Hd]; att_BHTT (attention_saved_numel floats) saves what backward needs:
    // softmax(q k^T / sqrt(Hd)) [B,H,T,T] with zeros above the diagonal (kGemm), or the rows'
    // log-sum-exp of the scaled scores [B,H,T] (kFlash).
    virtual void attention_forward(float* out_BTHd,
                                   float* att_BHTT,
                                   const float* q_BTHd,
                                   const float* k_BTKVHd,
                                   const float* v_BTKVHd,
                                   int B,
                                   int T,
                                   int H,
                                   int KV,
                                   int Hd) = 0;
    // dq, dk, dv overwritten. out_BTHd: the forward's output (kFlash reads it; kGemm does not).
    virtual void attention_backward(float* dq_BTHd,
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
                                    int Hd) = 0;
    // The attention ops with q, k, v stored in bf16 (the projections' bf16 outputs, where no RoPE
    // rotates them in fp32: Model::set_bf16_gemm_inputs): what attention_forward/backward give for
    // the floats they encode, which bf16 matmul precision rounds to bf16 anyway; backward writes dq,
    // dk, dv in bf16 (rounded, nearest-even) for the projections' backward GEMMs. The flash kernel
    // reads and writes them so directly (attention_reads_bf16); these defaults widen q, k, v into
    // temporary fp32 buffers and round the d results, which costs more than the fp32 ops. bf16
    // matmul precision only.
    virtual bool attention_reads_bf16(int /*Hd*/) const { return false; }
    virtual void attention_forward_bf16(float* out_BTHd,
                                        float* att_BHTT,
                                        const uint16_t* q16_BTHd,
                                        const uint16_t* k16_BTKVHd,
                                        const uint16_t* v16_BTKVHd,
                                        int B,
                                        int T,
                                        int H,
                                        int KV,
                                        int Hd);
    virtual void attention_backward_bf16(uint16_t* dq16_BTHd,
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
                                         int Hd);

    // ---- activations ------------------------------------------------------------------------
    // out = silu(gate) * up
    virtual void swiglu_forward(float* out, const float* gate, const float* up, size_t n) = 0;
    virtual void swiglu_backward(
        float* dgate, float* dup, const float* dout, const float* gate, const float* up, size_t n) = 0;
    // GELU, tanh approximation (GPT-2)
    virtual void gelu_forward(float* out, const float* in, size_t n) = 0;
    virtual void gelu_backward(float* din, const float* dout, const float* in, size_t n) = 0;

    // ---- the expert MLP's tensors in bf16 ------------------------------------------------------
    // Under bf16 matmul precision GroupedMlp keeps its [R, F] tensors in bf16, as torch.autocast
    // does: the up/gate GEMMs write bf16 pre-activations, the activation reads them and writes a
    // bf16 activation, the down GEMM's backward writes a bf16 d activation, and the activation's
    // backward reads it and writes bf16 d pre-activations for the up/gate backward GEMMs. Math is
    // fp32 in between; each stored value is rounded once (nearest-even).
    // out16 = bf16(gelu(in16)) / bf16(silu(gate16) * up16)
    virtual void gelu_forward_bf16(uint16_t* out16, const uint16_t* in16, size_t n) = 0;
    virtual void swiglu_forward_bf16(uint16_t* out16, const uint16_t* gate16, const uint16_t* up16, size_t n) = 0;
    // gelu_backward / swiglu_backward on bf16 tensors, outputs rounded (din16; dgate16 and dup16).
    virtual void gelu_backward_bf16(uint16_t* din16, const uint16_t* dout16, const uint16_t* in16, size_t n) = 0;
    virtual void swiglu_backward_bf16(uint16_t* dgate16,
                                      uint16_t* dup16,
                                      const uint16_t* dout16,
                                      const uint16_t* gate16,
                                      const uint16_t* up16,
                                      size_t n) = 0;
    // The grouped GEMMs with each activation operand given as fp32 (rounded as usual) or as bf16,
    // and the result written as fp32 or (rounded once from the fp32 accumulator) as bf16: of each
    // pair exactly one pointer is non-null (of din/din16 at most one; of in/in16 one where dw_GOI
    // is). The weights are fp32, rounded as usual. bf16 matmul precision only (a bmoe::Error
    // otherwise).
    virtual void grouped_matmul_forward_bf16(float* out_RO,
                                             uint16_t* out16_RO,
                                             const float* in_RI,
                                             const uint16_t* in16_RI,
                                             const float* w_GOI,
                                             const int* offsets_host,
                                             int G,
                                             int I,
                                             int O) = 0;
    virtual void grouped_matmul_backward_bf16(float* din_RI,
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
                                              int O) = 0;

    // ---- loss -------------------------------------------------------------------------------
    // probs_NV = softmax(logits_NV); loss_N = -log probs[target]; targets < 0 are ignored (loss 0).
    // probs_NV may alias logits_NV (Model::set_keep_logits(false) computes it in place).
    virtual void cross_entropy_forward(
        float* loss_N, float* probs_NV, const float* logits_NV, const int32_t* targets_N, int N, int V) = 0;
    // dlogits_NV = dloss * (probs - onehot(target)) for valid targets, 0 for ignored rows.
    // dlogits_NV may alias probs_NV (Model computes it in place).
    virtual void cross_entropy_backward(
        float* dlogits_NV, const float* probs_NV, const int32_t* targets_N, float dloss, int N, int V) = 0;

    // ---- the LM head and loss on bf16 logits (training under bf16 matmul precision) ------------
    // torch.autocast's and llm.c's split: the LM head GEMM writes bf16 logits, the loss reads them
    // in fp32 math and writes bf16 d logits in place, and the d logits feed the bf16 backward GEMMs
    // directly: a third of the [N, V] traffic of the fp32 ops above. All four need bf16 matmul
    // precision (a bmoe::Error otherwise).
    // The dense GEMMs (no bias) with each activation operand given as fp32 (rounded as usual) or as
    // bf16, and the result written as fp32 or as bf16 (out16_NO = bf16_bits(in_NI w_OI^T): the
    // fp32 accumulator rounded once, nearest-even): of each pair exactly one pointer is non-null
    // (of in/in16 one where dw_OI is; din_NI may be null). The LM head writes bf16 logits and
    // reads bf16 d logits; the attention projections read the norm's bf16 output and a bf16 copy
    // of the attention output kept for backward (Model::set_bf16_gemm_inputs).
    virtual void matmul_forward_bf16(float* out_NO,
                                     uint16_t* out16_NO,
                                     const float* in_NI,
                                     const uint16_t* in16_NI,
                                     const float* w_OI,
                                     int N,
                                     int I,
                                     int O) = 0;
    virtual void matmul_backward_bf16(float* din_NI,
                                      float* dw_OI,
                                      const float* dout_NO,
                                      const uint16_t* dout16_NO,
                                      const float* in_NI,
                                      const uint16_t* in16_NI,
                                      const float* w_OI,
                                      int N,
                                      int I,
                                      int O,
                                      bool accumulate_din) = 0;
    // lse_N = logsumexp(logits16 row) (fp32 math, sum in double); loss_N = lse - logit[target], 0
    // for targets < 0. The logits are left as they are for the backward.
    virtual void cross_entropy_forward_bf16(
        float* loss_N, float* lse_N, const uint16_t* logits16_NV, const int32_t* targets_N, int N, int V) = 0;
    // dlogits16_NV = bf16_bits(dloss * (exp(logit - lse) - onehot(target))), 0 for ignored rows.
    // dlogits16_NV may alias logits16_NV (Model computes it in place).
    virtual void cross_entropy_backward_bf16(uint16_t* dlogits16_NV,
                                             const uint16_t* logits16_NV,
                                             const float* lse_N,
                                             const int32_t* targets_N,
                                             float dloss,
                                             int N,
                                             int V) = 0;

    // ---- MoE router and token permutation ---------------------------------------------------
    // probs_NE = softmax(logits_NE) (fp32, max-subtracted), lse_N = logsumexp(logits_NE).
    // topk_idx_NK = the K largest probs per token in descending order; ties go to the lower index.
    // topk_weight_NK = those probs, divided by their sum when renormalize.
    virtual void router_topk_forward(float* probs_NE,
                                     float* lse_N,
                                     int32_t* topk_idx_NK,
                                     float* topk_weight_NK,
                                     const float* logits_NE,
                                     int N,
                                     int E,
                                     int K,
                                     bool renormalize) = 0;
    // dlogits_NE (=) from three sources:
    //   gates:  dtopk_weight_NK through the (optionally renormalised) top-k probs;
    //   aux:    dprobs[n, e] += aux_dprobs_E[e] for every token (load-balancing loss gradient);
    //   z-loss: d/dlogits of zloss_coef * lse_n^2 for every token (zloss_coef includes 1/N).
    virtual void router_topk_backward(float* dlogits_NE,
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
                                      bool renormalize) = 0;
    // The routing plan (model/routing_plan.h, plan_routing) built where the selection is, so only
    // the counts travel to the host: groups the N*K copies of topk_idx_NK by expert, stable in
    // token order, each expert keeping at most `capacity` (< 0: all). Writes counts_E[e] (copies
    // routed to e, before dropping), row_src_R (its first R = sum_e min(count, capacity) entries;
    // room for N*K) and slot_row_NK (-1 for dropped copies). Indices must lie in [0, E) (the router
    // writes no other; the CPU throws on one, CUDA leaves such a copy out).
    virtual void moe_plan_routing(int32_t* row_src_R,
                                  int32_t* slot_row_NK,
                                  int32_t* counts_E,
                                  const int32_t* topk_idx_NK,
                                  int N,
                                  int K,
                                  int E,
                                  int capacity) = 0;
    // Routed rows r are grouped by expert. row_src_R[r] = n*K + k: the (token, slot) copy that row
    // r carries. slot_row_NK[n*K + k] = r, or -1 when that copy was dropped (capacity).
    // x_RD[r] = x_ND[row_src_R[r] / K]
    virtual void moe_gather_forward(float* x_RD, const float* x_ND, const int32_t* row_src_R, int R, int K, int D) = 0;
    // dx_ND[n] += sum_k dx_RD[slot_row_NK[n,k]]  (skips -1)
    virtual void moe_gather_backward(
        float* dx_ND, const float* dx_RD, const int32_t* slot_row_NK, int N, int K, int D) = 0;
    // y_ND[n] = sum_k topk_weight_NK[n,k] * y_RD[slot_row_NK[n,k]]  (=, skips -1)
    virtual void moe_combine_forward(float* y_ND,
                                     const float* y_RD,
                                     const int32_t* slot_row_NK,
                                     const float* topk_weight_NK,
                                     int N,
                                     int K,
                                     int D) = 0;
    // dy_RD[r] = topk_weight[src] * dy_ND[src / K]   (=)
    // dtopk_weight_NK[n,k] = dot(dy_ND[n], y_RD[slot_row_NK[n,k]])  (=, 0 for dropped copies)
    virtual void moe_combine_backward(float* dy_RD,
                                      float* dtopk_weight_NK,
                                      const float* dy_ND,
                                      const float* y_RD,
                                      const int32_t* row_src_R,
                                      const int32_t* slot_row_NK,
                                      const float* topk_weight_NK,
                                      int N,
                                      int R,
                                      int K,
                                      int D) = 0;
    // The same with the rows written as bf16 (each value rounded, nearest-even): the experts' input
    // rows and d output rows where the experts read only their rounding (GroupedMlp storing bf16
    // tensors, no expert exchange; Model::set_bf16_gemm_inputs). bf16 matmul precision only.
    virtual void moe_gather_forward_bf16(
        uint16_t* x16_RD, const float* x_ND, const int32_t* row_src_R, int R, int K, int D) = 0;
    virtual void moe_combine_backward_bf16(uint16_t* dy16_RD,
                                           float* dtopk_weight_NK,
                                           const float* dy_ND,
                                           const float* y_RD,
                                           const int32_t* row_src_R,
                                           const int32_t* slot_row_NK,
                                           const float* topk_weight_NK,
                                           int N,
                                           int R,
                                           int K,
                                           int D) = 0;
    // out16_LD[l] = in16_RD[src_L[l]]: bf16 rows moved as they are (the expert-parallel exchange's
    // regrouping of received bf16 rows, model/expert_exchange.h).
    virtual void gather_rows_bf16(uint16_t* out16_LD, const uint16_t* in16_RD, const int32_t* src_L, int L, int D) = 0;

    // ---- optimizer --------------------------------------------------------------------------
    // AdamW on one tensor, decoupled weight decay (PyTorch semantics), g = grad * grad_scale:
    //   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
    //   param -= lr * (m / (1-b1^step) / (sqrt(v / (1-b2^step)) + eps) + weight_decay * param)
    // param16 (may be null): the updated param rounded to bf16, for the model's bf16 weight copy
    // (Model::weights_for_update), so no second pass over the weights re-rounds them.
    virtual void adamw_update(float* param,
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
                              int step) = 0;

    // ---- router families' per-token math (model/router_rows.h) --------------------------------
    // router_row(stage, rows, n) for every token n < rows.N; every pointer in rows is backend memory.
    virtual void router_rows(RouterStage stage, const RouterRows& rows) = 0;

    // ---- router noise: counter-based, so every backend draws the same bits --------------------
    // mask[n, d] = dropout_mask_value(rng, counter0 + n * row_stride + d, drop, keep_scale) (model/rng.h)
    virtual void dropout_mask(float* mask_ND, int N, int D, const DropoutMaskDraw& draw) = 0;
    // Evaluation (routing stability): out_ND = x_ND + scale * RMS(x_n) * rng.normal(counter0 + n D + d),
    // RMS over the row in double. out_ND may alias x_ND.
    virtual void add_input_noise(
        float* out_ND, const float* x_ND, int N, int D, const CounterRng& rng, uint64_t counter0, float scale) = 0;

    // ---- bf16 transport (expert-parallel rows that only feed bf16 GEMMs) --------------------
    // out[i] = bf16_bits(in[i]) (nearest-even, model/precision.h); out[i] -> the float it encodes.
    virtual void float_to_bf16(uint16_t* out, const float* in, size_t n) = 0;
    virtual void bf16_to_float(float* out, const uint16_t* in, size_t n) = 0;

  protected:
    // alloc()/free() implementations report here (free of an unknown pointer is ignored).
    void note_alloc(const void* ptr, size_t bytes);
    void note_free(const void* ptr);
    // The bf16 tensor ops' argument rules, one-line bmoe::Errors shared by every backend: bf16
    // matmul precision, and one pointer of each fp32/bf16 pair of the GEMMs (op names the caller).
    void require_bf16_precision(const char* op) const;
    static void require_forward_bf16_pairs(
        const char* op, const void* out, const void* out16, const void* in, const void* in16);
    // din_optional: the dense GEMM, whose din may be null (no din16); the grouped one needs one.
    static void require_backward_bf16_pairs(const char* op,
                                            bool din_optional,
                                            const void* din,
                                            const void* din16,
                                            const void* dw,
                                            const void* dout,
                                            const void* dout16,
                                            const void* in,
                                            const void* in16);

    MatmulPrecision matmul_precision_ = MatmulPrecision::kFp32;
    AttentionKernel attention_kernel_ = AttentionKernel::kGemm;

  private:
    struct WeightCopy {
        const float* w = nullptr;
        const uint16_t* w16 = nullptr;
        size_t n = 0;
    };
    WeightCopy weight_copy_;
    std::unordered_map<const void*, size_t> live_bytes_;
    size_t allocated_bytes_ = 0, peak_allocated_bytes_ = 0;
};

// Sets a backend's matmul precision for one scope (e.g. fp32 router GEMMs inside a bf16 model).
class ScopedMatmulPrecision {
  public:
    ScopedMatmulPrecision(Backend* backend, MatmulPrecision p)
        : backend_(backend), saved_(backend->matmul_precision()) {
        backend_->set_matmul_precision(p);
    }
    ~ScopedMatmulPrecision() { backend_->set_matmul_precision(saved_); }
    ScopedMatmulPrecision(const ScopedMatmulPrecision&) = delete;
    ScopedMatmulPrecision& operator=(const ScopedMatmulPrecision&) = delete;

  private:
    Backend* backend_;
    MatmulPrecision saved_;
};

// Factory: "cpu" always works; "cuda" when built with CUDA and a device is present
// (throws bmoe::Error with a hint otherwise); it uses GPU local_rank % (visible GPUs).
std::unique_ptr<Backend> make_backend(const std::string& name, int local_rank = 0);
// True when this build contains the CUDA backend (it may still find no device at run time).
bool cuda_backend_compiled();

}  // namespace bmoe::model
