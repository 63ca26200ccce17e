// stability.h -- routing stability under input noise (the README's "Evaluate a checkpoint").
//
// On a fixed set of sequences: one clean forward, then one forward per noise scale sigma with
// RoutingContext.input_noise = sigma (Gaussian noise of std sigma * RMS(x_n) added to the hidden
// state entering every MoE block) and otherwise the SAME RoutingContext (seed, step, token ids), so
// the clean and the perturbed pass share every routing random number (common random numbers) and
// only the input noise moves the selection. Per MoE layer: the mean over tokens of the Jaccard index
// |A cap B| / |A cup B| of the clean and perturbed top-k sets; the mean curve averages the layers.
// A second clean pass checks the common random numbers: its Jaccard with the first must be 1.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "eval/eval_model.h"
#include "model/router.h"

namespace bmoe::eval {

struct StabilityResult {
    std::vector<double> noise_scales;              // ascending, > 0
    std::vector<double> mean_jaccard;              // [scale]: mean over MoE layers
    std::vector<std::vector<double>> per_layer;    // [MoE layer][scale]
    std::optional<double> scale_at_0p7;            // where the mean curve crosses 0.7 (log-linear); none if it never does
    double clean_jaccard = 0.0;                    // clean pass vs a second clean pass (1 with common random numbers)
    int sequences = 0;
    int64_t tokens = 0;                            // per pass
};

// The first scale at which `mean` (over ascending `scales`) falls to 0.7 or below, interpolated
// linearly in log(scale) between the two scales around the crossing; none when the curve stays
// above 0.7, or starts at or below it (the crossing is then below the smallest scale).
std::optional<double> crossing_scale(const std::vector<double>& scales, const std::vector<double>& mean, double level = 0.7);

// Runs the sweep on `rows` (each T tokens). Collective.
StabilityResult routing_stability(EvalModel& model,
                                  const std::vector<std::span<const int32_t>>& rows,
                                  const std::vector<double>& noise_scales,
                                  const model::RoutingContext& routing);

}  // namespace bmoe::eval
