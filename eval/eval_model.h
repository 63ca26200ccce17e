// eval_model.h -- a trained checkpoint as a model shard on every rank, and the row-split forward
// that every evaluation section runs its global batches through.
//
// Every rank builds its shard of the model like the Trainer does (ProcessGrid dp x ep, this rank's
// experts, the backend on GPU local_rank % num_gpus) and loads the checkpoint's tensors and router
// state into it. A GLOBAL batch of R rows (each right-padded to T with token 0) is padded with dummy
// rows to a multiple of the world size W and split evenly: rank r runs rows [r P/W, (r+1) P/W) of
// the P padded rows. The routing noise is keyed by the global token id id_base + row * T + t, so a
// row's routing (and with dropless MoE its every output) does not depend on W. Callers read this
// rank's rows from the model afterwards (logits_to_host, router outputs) and combine per-row results
// with an all-reduce of fixed-size arrays (each entry written by exactly one rank, so the sum is exact).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "model/backend.h"
#include "model/model.h"
#include "parallel/communicator.h"
#include "parallel/local_comm.h"
#include "parallel/process_grid.h"
#include "trainer/run_config.h"

namespace bmoe::eval {

// A checkpoint file and the run config stored in it.
struct CheckpointSource {
    std::string path;  // the .h5 file (a directory resolves to the checkpoint its `latest` names)
    int64_t step = 0;
    trainer::RunConfig config;
};

// Reads the checkpoint's attributes and config. One-line bmoe::Error naming the path for a missing
// file, a directory without checkpoints, or a file that is not a bmoe checkpoint.
CheckpointSource read_checkpoint_source(const std::string& path);

// This rank's share of one global batch.
struct LocalRows {
    int first = 0;  // global index of this rank's first row
    int count = 0;  // rows on this rank (rows >= the batch's real row count are dummies)
    int T = 0;      // padded row length
};

class EvalModel {
  public:
    // Collective over `world` (nullptr = this process alone). ep = 0: all ranks.
    EvalModel(const CheckpointSource& source,
              const std::string& backend,
              int ep,
              int threads,
              parallel::Communicator* world);
    ~EvalModel();

    model::Model& model() { return *model_; }
    const trainer::RunConfig& config() const { return config_; }
    parallel::Communicator& world() const { return grid_->world(); }
    const parallel::ProcessGrid& grid() const { return *grid_; }
    int rank() const { return grid_->world_rank(); }
    int world_size() const { return grid_->world_size(); }
    int tensors_loaded() const { return tensors_loaded_; }
    int num_moe_layers() const { return model_->num_moe_blocks(); }
    const std::string& backend_name() const;
    // The checkpoint's model.capacity_factor; evaluation always runs dropless (0).
    float trained_capacity_factor() const { return capacity_factor_; }

    // Runs the global batch `rows` (each 1..T tokens; right-padded with token 0 to T, the batch padded
    // with dummy rows to a multiple of the world size) with routing `ctx`, whose first_token is set to
    // id_base + first * T. Afterwards the model holds this rank's rows (logits, router outputs).
    // Collective: every rank calls it with the same rows.
    LocalRows forward(const std::vector<std::span<const int32_t>>& rows,
                      int T,
                      int64_t id_base,
                      model::RoutingContext ctx);

  private:
    trainer::RunConfig config_;
    parallel::LocalComm local_comm_;
    std::unique_ptr<parallel::ProcessGrid> grid_;
    std::unique_ptr<model::Backend> backend_;
    std::unique_ptr<model::Model> model_;
    int tensors_loaded_ = 0;
    float capacity_factor_ = 0.0f;
    std::vector<int32_t> tokens_;
};

// Sums `values` over all ranks in place (doubles; entries filled by one rank each stay exact).
void all_reduce_sum(parallel::Communicator& world, std::vector<double>& values);
void all_reduce_sum(parallel::Communicator& world, std::vector<int64_t>& values);

}  // namespace bmoe::eval
