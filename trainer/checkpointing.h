// checkpointing.h -- a training run's state as checkpoint tensors (checkpoints/checkpoint.h).
//
// Groups: "model" (parameters), "optimizer/m", "optimizer/v" (AdamW moments), each tensor under
// its parameter name with its GLOBAL shape, so a checkpoint does not depend on the EP size that
// wrote it. The rest of the state is derived from the step: the LR schedule is a pure function
// of it, the data loader seeks to it, and all randomness is counter-based (model/rng.h).
#pragma once

#include <cstdint>
#include <string>

#include "model/model.h"
#include "parallel/process_grid.h"
#include "trainer/optimizer.h"
#include "trainer/run_config.h"

namespace bmoe::trainer {

// Collective over the grid's world; rank 0 writes `path` atomically.
void save_training_checkpoint(const std::string& path,
                              int64_t step,
                              const RunConfig& config,
                              const std::string& parent,
                              model::Model& model,
                              AdamW& optimizer,
                              const parallel::ProcessGrid& grid);
// Reads this rank's slices (any EP/DP layout) into the model and optimizer; returns the step.
int64_t load_training_checkpoint(const std::string& path, model::Model& model, AdamW& optimizer);

// Initialises the model from another run's checkpoint (its "model" group), matching tensors by
// name: tensors the checkpoint lacks (a variational router's heads on top of a topk model) keep
// their initialisation, which starts at the deterministic router (docs/routers.md). Returns the
// number of tensors loaded; a tensor of another shape is an error naming both shapes. Router state
// (SWAG moments, selection bias) is loaded too when the checkpoint holds it.
int init_from_checkpoint(const std::string& path, model::Model& model);

}  // namespace bmoe::trainer
