// optimizer.h -- AdamW over a Model's flat parameter block, with global grad-norm clipping.
//
// Moments m, v live in backend memory, one slice per TRAINABLE tensor (frozen tensors get no
// optimizer state and are never updated: router fine-tuning keeps the moments of the router only). Weight decay is
// decoupled (PyTorch AdamW) and skipped for tensors whose ParamInfo says so (norms, biases).
// Clipping: g <- g * min(1, clip / ||g||_2) over ALL parameters (applied inside the update).
// Router variance/temperature heads (ParamInfo::variance_head) use lr * optim.router_variance_lr_scale.
#pragma once

#include <vector>

#include "model/buffer.h"
#include "model/model.h"
#include "trainer/run_config.h"

namespace bmoe::trainer {

class AdamW {
  public:
    AdamW(const OptimConfig& config, model::Model& model);

    // Global L2 norm of the current gradients (NaN/Inf propagate, so callers can check them).
    double grad_norm() const;
    // One update with learning rate `lr`; grad_scale multiplies every gradient (clipping).
    void step(float lr, float grad_scale);
    // Scale that clips a gradient of norm `norm` to the configured maximum (1 when no clip).
    float clip_scale(double norm) const;
    int num_steps() const { return step_; }
    // Moments in backend memory: tensor i's slice starts at moment_offset(i) (kFrozen: none).
    float* m() { return m_.data(); }
    float* v() { return v_.data(); }
    static constexpr size_t kFrozen = static_cast<size_t>(-1);
    size_t moment_offset(size_t param_index) const { return moment_offset_[param_index]; }
    size_t moments_numel() const { return moments_numel_; }  // floats in each of m and v
    void set_num_steps(int steps) { step_ = steps; }         // resume: bias corrections continue from here

  private:
    OptimConfig config_;
    model::Model& model_;
    std::vector<size_t> moment_offset_;  // per parameter tensor
    size_t moments_numel_ = 0;
    model::Buffer<float> m_, v_;
    int step_ = 0;
};

}  // namespace bmoe::trainer
