#include "trainer/optimizer.h"

#include <cmath>

namespace bmoe::trainer {

AdamW::AdamW(const OptimConfig& config, model::Model& model)
    : config_(config),
      model_(model),
      m_(model.backend(), model.layout().total_numel()),
      v_(model.backend(), model.layout().total_numel()) {}

double AdamW::grad_norm() const {
    return std::sqrt(model_.backend()->sum_squares(model_.grads(), model_.layout().total_numel()));
}

float AdamW::clip_scale(double norm) const {
    if (config_.grad_clip <= 0.0f || !(norm > config_.grad_clip)) return 1.0f;
    return static_cast<float>(config_.grad_clip / norm);
}

void AdamW::step(float lr, float grad_scale) {
    ++step_;
    model::Backend* be = model_.backend();
    for (const model::ParamInfo& p : model_.layout().params()) {
        const float wd = p.weight_decay ? config_.weight_decay : 0.0f;
        const float tensor_lr = p.variance_head ? lr * config_.router_variance_lr_scale : lr;
        be->adamw_update(model_.params() + p.offset, model_.grads() + p.offset, m_.data() + p.offset,
                         v_.data() + p.offset, p.numel, tensor_lr, config_.beta1, config_.beta2, config_.eps, wd, grad_scale,
                         step_);
    }
}

}  // namespace bmoe::trainer
