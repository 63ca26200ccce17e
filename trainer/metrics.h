// metrics.h -- MetricsLog: one JSON object per line (metrics.jsonl) and the human progress line.
// The JSONL file is the machine-readable record of a run (tools/plot_loss.py reads it); the
// progress line is what a person watches. Only rank 0 writes either.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "model/model.h"

namespace bmoe::trainer {

struct StepMetrics {
    int step = 0;  // 1-based, after the update
    int total_steps = 0;
    double loss = 0.0, ce = 0.0, aux = 0.0, z = 0.0;  // means over the step's micro-batches
    double reg = 0.0;                                 // router regulariser (KL / -log T), summed over layers
    double beta = 0.0;                                // its weight this step (after warm-up)
    std::vector<double> router_sigma;                 // [moe layer] mean logit std (variational routers)
    std::vector<double> router_temperature;           // [moe layer] mean T (vtsr, temp_sampling)
    // [moe layer] each loss term per layer (train.log_layers; empty otherwise)
    std::vector<double> aux_layers, z_layers, reg_layers;
    double lr = 0.0, grad_norm = 0.0;
    double tokens_per_s = 0.0;
    double elapsed_s = 0.0;
    std::vector<std::vector<int64_t>> expert_load;  // [moe layer][expert] routed copies this step
    int64_t num_dropped = 0;                        // copies dropped by expert capacity (all ranks, all MoE layers)
    int64_t num_copies = 0;                         // routed copies (all ranks, all MoE layers)
    double step_s = 0.0;                            // wall time of the step
    double peak_memory_gib = 0.0;  // this rank's backend buffers at their most (Backend::peak_allocated_bytes)
    double exchange_s = 0.0;                        // of which in expert-parallel all-to-alls (max over ranks)
    // of which waiting for gradient all-reduces after backward (this rank; with overlap only the
    // part backward did not hide; on GPUs the wait moves to the next device sync)
    double grad_sync_s = 0.0;
    // Bytes all ranks sent to other ranks for the token exchange this step (x, y, dy, dx), and the
    // minimum with one row per (token, destination rank).
    double exchange_bytes = 0.0, exchange_min_bytes = 0.0;
};

struct EvalMetrics {
    int step = 0;
    double val_loss = 0.0;      // mean CE over the validation windows
    double unigram_loss = 0.0;  // baseline: unigram model of the training data
};

class MetricsLog {
  public:
    // Opens path (truncated, or appended to when resuming); an empty path logs nothing to a file.
    explicit MetricsLog(const std::string& path, bool append = false);
    void write(const StepMetrics& m);
    void write(const EvalMetrics& m);
    const std::string& path() const { return path_; }

  private:
    std::string path_;
    std::ofstream out_;
};

// "step   10/300 | loss 3.2101 (ce 3.2001 aux 1.004 z 0.512) | lr 1.50e-03 | gnorm 0.83 | ... | mem 412 MiB"
std::string format_progress(const StepMetrics& m);
// "1h02m", "3m05s", "12s"
std::string format_duration(double seconds);

}  // namespace bmoe::trainer
