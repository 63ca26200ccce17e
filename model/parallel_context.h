// parallel_context.h -- how a Model is spread over ranks: which communicators reduce its global
// statistics and exchange its tokens, and which experts this rank holds.
// A default-constructed context is a single process holding every expert.
#pragma once

#include "parallel/communicator.h"
#include "parallel/process_grid.h"

namespace bmoe::model {

struct ParallelContext {
    // Every rank of the job (data-parallel over tokens): reduces the loss normalisers and the
    // router statistics so the objective is that of the GLOBAL batch. nullptr = single process.
    parallel::Communicator* world = nullptr;
    // This rank's expert-parallel group: tokens travel to the experts' owners. nullptr or size 1 =
    // all experts local.
    parallel::Communicator* ep = nullptr;
    int first_expert = 0;        // this rank's experts: [first_expert, first_expert + num_local_experts)
    int num_local_experts = -1;  // -1 = all
    // The communicator that moves token rows within the EP group (same ranks as ep): an NCCL one
    // on GPUs, else ep itself. nullptr = ep.
    parallel::Communicator* ep_rows = nullptr;
    // With bf16 GEMMs, move the expert-GEMM inputs (x forward, dy backward) as bf16: lossless (the
    // GEMMs round them the same way) and half their bytes.
    bool exchange_bf16 = true;
    // With bf16 GEMMs, also return the experts' outputs (y forward, dx backward) as bf16: half their
    // bytes, at the cost of rounding them (as torch.autocast rounds a bf16 GEMM's output, and as
    // DeepEP's combine sends). Off: they travel as fp32, and expert parallelism trains like one rank.
    bool combine_bf16 = false;

    bool expert_parallel() const { return ep != nullptr && ep->size() > 1; }
};

// The context of this rank in a dp x ep grid (world = nullptr when the grid is one process).
inline ParallelContext make_parallel_context(parallel::ProcessGrid& grid, int num_experts) {
    const parallel::ExpertRange experts = grid.expert_range(num_experts);
    ParallelContext ctx;
    if (grid.world_size() > 1) ctx.world = &grid.world();
    ctx.ep = &grid.ep();
    ctx.ep_rows = &grid.data_ep();
    ctx.first_expert = experts.first;
    ctx.num_local_experts = experts.count;
    return ctx;
}

}  // namespace bmoe::model
