// grad_sync.h -- sums gradients across ranks after backward, so every replica applies the
// gradient of the GLOBAL batch (the loss is already normalised by global token counts).
//   dense + router parameters: replicated on every rank -> all-reduce over the world
//   expert parameters: each expert lives on one rank per EP group -> all-reduce over its DP
//   replicas only (ranks with the same EP rank)
// Adjacent tensors of the same kind are reduced in one call. Non-host backends are staged
// through host memory (the MPI communicator is not CUDA-aware).
#pragma once

#include "model/model.h"
#include "parallel/process_grid.h"

namespace bmoe::trainer {

void all_reduce_gradients(model::Model& model, const parallel::ProcessGrid& grid);

// L2 norm of the whole model's gradient after all_reduce_gradients: the replicated part counted
// once, plus every EP rank's own experts. Same value on every rank.
double global_grad_norm(model::Model& model, const parallel::ProcessGrid& grid);

}  // namespace bmoe::trainer
