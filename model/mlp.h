// mlp.h -- GroupedMlp: G independent feed-forward networks over row groups (experts).
//
// Rows [offsets[g], offsets[g+1]) of x_RD run through MLP g. A MoE block uses G = E experts;
// a dense FFN layer is the same code with G = 1, so both share one forward/backward.
//   swiglu: y = (silu(x W1_g^T) * (x W3_g^T)) W2_g^T      W1, W3 [G, F, D], W2 [G, D, F]
//   gelu:   y = gelu(x W3_g^T) W2_g^T
// Saves its hidden activations for backward (sized for the largest R seen); its backward-only
// buffers come from the model's LayerScratch, shared with every other layer. Under bf16 matmul
// precision every [R, F] tensor is stored as bf16, as torch.autocast keeps them (backend.h, "the
// expert MLP's tensors in bf16"): half their memory and traffic, no rounding pass per GEMM; the
// GELU/SwiGLU then sees bf16-rounded pre-activations.
#pragma once

#include <vector>

#include "model/backend.h"
#include "model/buffer.h"
#include "model/config.h"
#include "model/layer_scratch.h"

namespace bmoe::model {

struct MlpWeights {
    const float* gate = nullptr;  // [G, F, D] (swiglu only)
    const float* up = nullptr;    // [G, F, D]
    const float* down = nullptr;  // [G, D, F]
};
struct MlpGrads {
    float* gate = nullptr;
    float* up = nullptr;
    float* down = nullptr;
};

class GroupedMlp {
  public:
    // scratch: shared backward buffers; must outlive this MLP.
    GroupedMlp(Backend* backend, Activation activation, int d_model, int hidden, LayerScratch* scratch)
        : backend_(backend),
          activation_(activation),
          D_(d_model),
          F_(hidden),
          scratch_(scratch),
          bf16_storage_(bf16_mode_default("BMOE_BF16_MLP_ACTIVATIONS")) {}

    // y_RD (=) from x_RD; offsets_host [G+1] stays referenced until backward. x_RD may be null
    // where keeps_input(): the caller has written the rows rounded to bf16 into input16_rows(R).
    void forward(float* y_RD, const float* x_RD, const MlpWeights& w, const std::vector<int>& offsets_host);
    // dx_RD (=), weight grads (+=), from dy_RD, or from dy16_RD (its bf16 rounding: only where the
    // forward stored bf16 tensors, stores_bf16(); one of the two is given). x_RD must be the forward
    // input, except where keeps_input() (it is then not read: give any [R, D] buffer, or null).
    void backward(float* dx_RD,
                  const MlpGrads& dw,
                  const float* dy_RD,
                  const uint16_t* dy16_RD,
                  const float* x_RD,
                  const MlpWeights& w);
    // True when the next forward keeps its own bf16 copy of x_RD for backward (bf16 storage without
    // recompute): the caller need not keep x_RD.
    bool keeps_input() const;
    // Where keeps_input(): that copy's buffer for R rows, for a caller that writes the rows in bf16
    // itself (a bf16 gather) and then calls forward with x_RD null.
    uint16_t* input16_rows(int R);
    // The last forward stored its [R, F] tensors in bf16 (bf16 storage under bf16 precision): its
    // backward reads only the rounding of dy, so the caller may give dy16_RD.
    bool stores_bf16() const { return stored16_; }
    // Activation recompute: keep only the pre-activations and recompute the activation (gelu or
    // silu * up, the same kernel: bitwise the same gradients) in backward, in shared scratch.
    // Saves one [R, F] per layer for one activation kernel per layer.
    void set_recompute_activation(bool on);
    // bf16 storage of the [R, F] tensors (pre-activations, activation and their gradients) under
    // bf16 matmul precision: on by default; off (or BMOE_BF16_MLP_ACTIVATIONS=0 in the environment)
    // keeps them fp32, for A/B runs. The mode is fixed at forward: keep the precision until
    // backward. (CUDA's BMOE_CUDA_BF16_GEMM=fast16bf A/B mode runs the MLP's GEMMs on explicit bf16
    // copies while this is on: set both to compare the earlier path.)
    void set_bf16_activation_storage(bool on) { bf16_storage_ = on; }

  private:
    // act = gelu(h_up) or silu(h_gate) * h_up from the saved pre-activations, fp32 or bf16
    void activation_forward(float* act_RF, size_t RF);
    void activation_forward16(uint16_t* act16_RF, size_t RF);
    // the activation's storage: saved, or the shared scratch (recompute)
    float* activation_buffer(size_t RF);
    uint16_t* activation_buffer16(size_t RF);

    Backend* backend_;
    Activation activation_;
    int D_, F_;
    LayerScratch* scratch_;
    bool recompute_activation_ = false;
    bool bf16_storage_;
    bool stored16_ = false;  // this forward (and its backward) stores the [R, F] tensors as bf16
    std::vector<int> offsets_;
    Buffer<float> h_gate_RF_, h_up_RF_, act_RF_;           // saved
    Buffer<uint16_t> h_gate16_RF_, h_up16_RF_, act16_RF_;  // saved (bf16 storage)
    Buffer<uint16_t> x16_RD_;  // the input rows rounded once for the up/gate GEMMs (saved: bf16 storage)
    // x_RD rounded to bf16 into the saved copy, or with recompute the shared scratch
    const uint16_t* round_input(const float* x_RD, size_t RD);
};

}  // namespace bmoe::model
