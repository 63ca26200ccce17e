#include "trainer/optimizer.h"

#include <cmath>

namespace bmoe::trainer {

AdamW::AdamW(const OptimConfig& config, model::Model& model) : config_(config), model_(model) {
    for (const model::ParamInfo& p : model.layout().params()) {
        moment_offset_.push_back(p.trainable ? moments_numel_ : kFrozen);
        if (p.trainable) moments_numel_ += (p.numel + 15) / 16 * 16;  // aligned like the parameters
    }
    m_ = model::Buffer<float>(model.backend(), moments_numel_);
    v_ = model::Buffer<float>(model.backend(), moments_numel_);
}

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
    const auto& params = model_.layout().params();
    const model::Model::WeightsForUpdate w = model_.weights_for_update();  // and the bf16 weight copy
    for (size_t i = 0; i < params.size(); ++i) {
        const model::ParamInfo& p = params[i];
        if (!p.trainable) continue;
        const size_t mo = moment_offset_[i];
        const float wd = p.weight_decay ? config_.weight_decay : 0.0f;
        const float tensor_lr = p.variance_head ? lr * config_.router_variance_lr_scale : lr;
        be->adamw_update(w.params + p.offset, model_.grads() + p.offset, m_.data() + mo, v_.data() + mo,
                         w.params16 ? w.params16 + p.offset : nullptr, p.numel, tensor_lr, config_.beta1, config_.beta2,
                         config_.eps, wd, grad_scale, step_);
    }
}

}  // namespace bmoe::trainer
