// lr_schedule.h -- learning rate at a step: linear warm-up, then cosine decay to a floor.
//   step < warmup:  lr * (step + 1) / warmup
//   after:          floor + (lr - floor) * 0.5 * (1 + cos(pi * progress)),  floor = lr * min_ratio
// Pure function of (step, config): resuming at any step needs no schedule state.
#pragma once

#include <algorithm>
#include <cmath>

namespace bmoe::trainer {

inline float lr_at_step(int step, int total_steps, float lr, int warmup_steps, float min_lr_ratio) {
    if (step < warmup_steps) return lr * static_cast<float>(step + 1) / static_cast<float>(warmup_steps);
    const float floor = lr * min_lr_ratio;
    const int decay_steps = std::max(1, total_steps - warmup_steps);
    const float progress = std::min(1.0f, static_cast<float>(step - warmup_steps) / static_cast<float>(decay_steps));
    return floor + (lr - floor) * 0.5f * (1.0f + std::cos(3.14159265358979f * progress));
}

}  // namespace bmoe::trainer
