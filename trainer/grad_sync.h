// grad_sync.h -- sums gradients across ranks after backward, so every replica applies the
// gradient of the GLOBAL batch (the loss is already normalised by global token counts).
//   dense + router parameters: replicated on every rank -> all-reduce over the world
//   expert parameters: each expert lives on one rank per EP group -> all-reduce over its DP
//   replicas only (ranks with the same EP rank)
// Frozen tensors are neither summed nor counted in the norm.
//
// Overlap (DDP/Megatron style): with GradientSync::overlap, the last micro-batch's backward starts
// the all-reduce of each backward stage (LM head, layer L-1, ..., layer 0, embeddings; see
// ParamInfo::backward_stage) as soon as its gradients are final, so communication runs under the
// rest of backward (NCCL: on its own stream; MPI: MPI_Iallreduce, advanced between layers).
// It needs communicators that read the backend's memory (CPU + MPI, CUDA + NCCL); CUDA + MPI
// stages every gradient through host memory after backward instead.
#pragma once

#include <vector>

#include "model/model.h"
#include "parallel/process_grid.h"

namespace bmoe::trainer {

class GradientSync {
  public:
    // The model and grid must outlive this object. overlap is a request: overlapping() says
    // whether it is possible with this backend and these communicators.
    GradientSync(model::Model& model, const parallel::ProcessGrid& grid, bool overlap);
    ~GradientSync();
    GradientSync(const GradientSync&) = delete;
    GradientSync& operator=(const GradientSync&) = delete;

    bool overlapping() const { return overlap_; }
    // Call before the backward of the last micro-batch: that backward starts the reductions.
    void before_last_backward();
    // After that backward: completes the reductions (or, without overlap, does them all).
    // Afterwards grads() hold the global sums on every rank.
    void finish();

  private:
    struct Run {  // adjacent trainable tensors of one kind and (with overlap) one backward stage
        bool expert;
        int stage;
        size_t offset, count;
    };
    void on_stage_ready(int stage);
    parallel::Communicator& comm_for(const Run& run) const;
    void reduce_blocking(const Run& run);

    model::Model& model_;
    const parallel::ProcessGrid& grid_;
    bool overlap_;
    std::vector<Run> runs_;
    size_t started_ = 0;  // runs started by the current backward
    bool armed_ = false;
    std::vector<float> staging_;
};

// One-shot blocking form: sums the gradients now (what GradientSync::finish does without overlap).
void all_reduce_gradients(model::Model& model, const parallel::ProcessGrid& grid);

// L2 norm of the whole model's gradient after the sums: the replicated part counted once, plus
// every EP rank's own experts. Same value on every rank.
double global_grad_norm(model::Model& model, const parallel::ProcessGrid& grid);

}  // namespace bmoe::trainer
