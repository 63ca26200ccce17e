// trainer.h -- Trainer: the training loop of one bmoe run.
//
// Checkpoints (trainer/checkpointing.h) are saved every checkpoint.every steps, at the end, and
// when SIGTERM/SIGUSR1 arrives (then the run stops after that step); checkpoint.resume=auto
// continues from the latest one with bitwise the same losses as an uninterrupted run.
// step(): for each of grad_accum micro-batches { forward (CE + aux + z) ; backward (scaled by
// 1/grad_accum) } -> global grad norm -> finite check -> clip -> AdamW at the scheduled lr ->
// metrics. Validation every train.eval_every steps and at the end, against the unigram baseline.
// Deterministic: the same config (seed) gives a bitwise-identical loss sequence.
// Distributed: every rank runs a Trainer over the same world communicator; data.batch_size is
// the global batch, split evenly over the ranks; experts are split over --parallel.ep ranks;
// gradients are summed across ranks (grad_sync.h); only rank 0 prints and writes files.
#pragma once

#include <chrono>
#include <iosfwd>
#include <memory>
#include <vector>

#include "model/backend.h"
#include "model/model.h"
#include "parallel/local_comm.h"
#include "parallel/process_grid.h"
#include "trainer/datasets.h"
#include "trainer/grad_sync.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/run_config.h"

namespace bmoe::trainer {

struct TrainResult {
    std::vector<double> losses;      // total loss per step
    std::vector<EvalMetrics> evals;  // every validation
    double tokens_per_s = 0.0;       // training throughput over the whole run
    bool stopped_early = false;      // SIGTERM/SIGUSR1: checkpoint saved, run incomplete
};

class Trainer {
  public:
    // `log` receives the progress lines (rank 0); metrics go to <out_dir>/metrics.jsonl.
    // world: all ranks of the job (nullptr = this process alone). backend: the compute backend to
    // use (tests pass an instrumented one); nullptr = the one train.backend names.
    Trainer(const RunConfig& config,
            std::ostream& log,
            parallel::Communicator* world = nullptr,
            std::unique_ptr<model::Backend> backend = nullptr);
    ~Trainer();

    TrainResult run();
    // Mean CE over the fixed validation windows.
    double evaluate();

    model::Model& model() { return *model_; }
    const AdamW& optimizer() const { return *optimizer_; }
    const parallel::ProcessGrid& grid() const { return *grid_; }
    const Datasets& datasets() const { return datasets_; }

  private:
    StepMetrics train_step(int step);
    model::RoutingContext eval_routing() const;
    void plot_loss_curve();
    void final_report();
    void resume_if_asked();
    bool stop_requested();
    bool save_due_by_time(std::chrono::steady_clock::time_point last_save);  // checkpoint.every_minutes
    double save_checkpoint(int step);                                        // returns the seconds it took

    bool is_root() const { return grid_->world_rank() == 0; }
    // This rank's rows of a global batch (rows split evenly; B must divide by the world size).
    data::Batch local_rows(const data::Batch& global) const;
    void apply_loss_mask(data::Batch& batch) const;  // data.loss_on

    RunConfig config_;
    std::ostream null_log_{nullptr};  // ranks != 0 print nothing
    std::ostream& log_;
    parallel::LocalComm local_comm_;
    std::unique_ptr<parallel::ProcessGrid> grid_;
    std::unique_ptr<model::Backend> backend_;
    std::unique_ptr<model::Model> model_;
    std::unique_ptr<AdamW> optimizer_;
    std::unique_ptr<GradientSync> grad_sync_;
    Datasets datasets_;
    std::unique_ptr<MetricsLog> metrics_;
    int start_step_ = 0;               // > 0 when resumed from a checkpoint
    std::string parent_checkpoint_;    // the checkpoint this run resumed from
    double checkpoint_seconds_ = 0.0;  // time spent saving, excluded from throughput
};

}  // namespace bmoe::trainer
