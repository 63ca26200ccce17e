// train_step.h -- one optimizer step of the benchmarks (bench_train, bench_roofline): what bmoe's
// trainer does per step, without data loading or metrics.
#pragma once

#include <cstdint>
#include <vector>

#include "model/model.h"
#include "trainer/optimizer.h"

namespace bmoe::bench {

// `accumulate` micro-batches of forward + backward on tokens/targets [B, T] (loss scaled by
// 1/accumulate, as train.grad_accum), then the gradient norm, clipping and one AdamW update.
// Returns the last micro-batch's loss.
inline double train_step(model::Model& net,
                         trainer::AdamW& adamw,
                         const trainer::OptimConfig& optim,
                         const std::vector<int32_t>& tokens,
                         const std::vector<int32_t>& targets,
                         int B,
                         int T,
                         int accumulate = 1) {
    net.zero_grad();
    double loss = 0.0;
    for (int k = 0; k < accumulate; ++k) {
        loss = net.forward(tokens.data(), targets.data(), B, T, model::LossWeights{}).total_loss;
        net.backward(1.0f / static_cast<float>(accumulate));
    }
    adamw.step(optim.lr, adamw.clip_scale(adamw.grad_norm()));
    return loss;
}

}  // namespace bmoe::bench
