// trainer.h -- Trainer: the training loop of one bmoe run.
//
// step(): for each of grad_accum micro-batches { forward (CE + aux + z) ; backward (scaled by
// 1/grad_accum) } -> global grad norm -> finite check -> clip -> AdamW at the scheduled lr ->
// metrics. Validation every train.eval_every steps and at the end, against the unigram baseline.
// Deterministic: the same config (seed) gives a bitwise-identical loss sequence.
#pragma once

#include <iosfwd>
#include <memory>
#include <vector>

#include "model/backend.h"
#include "model/model.h"
#include "trainer/datasets.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/run_config.h"

namespace bmoe::trainer {

struct TrainResult {
    std::vector<double> losses;     // total loss per step
    std::vector<EvalMetrics> evals;  // every validation
    double tokens_per_s = 0.0;       // training throughput over the whole run
};

class Trainer {
  public:
    // `log` receives the progress lines (rank 0); metrics go to <out_dir>/metrics.jsonl.
    Trainer(const RunConfig& config, std::ostream& log);
    ~Trainer();

    TrainResult run();
    // Mean CE over the fixed validation windows.
    double evaluate();

    model::Model& model() { return *model_; }
    const Datasets& datasets() const { return datasets_; }

  private:
    StepMetrics train_step(int step);
    void plot_loss_curve();

    RunConfig config_;
    std::ostream& log_;
    std::unique_ptr<model::Backend> backend_;
    std::unique_ptr<model::Model> model_;
    std::unique_ptr<AdamW> optimizer_;
    Datasets datasets_;
    std::unique_ptr<MetricsLog> metrics_;
};

}  // namespace bmoe::trainer
