// datasets.h -- Datasets: the token data a run trains and validates on, resolved from DataConfig.
// "synthetic" and "text" are generated in memory from the seed; a directory is read from the
// train.bin / val.bin token files that `bmoe data` writes.
#pragma once

#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "data/data_loader.h"
#include "trainer/run_config.h"

namespace bmoe::trainer {

// Fixed evaluation windows of one domain (validation split for in-distribution domains, the ood
// split for held-out ones), for the per-domain report at the end of a run.
struct DomainEval {
    std::string name;
    bool is_ood = false;
    std::vector<data::Batch> batches;
    double unigram_loss = 0.0;  // train unigram on this domain's tokens
};

struct Datasets {
    std::shared_ptr<const data::TokenData> train, val;
    std::unique_ptr<data::DataLoader> train_loader;  // this rank's shard
    std::vector<data::Batch> val_batches;            // fixed validation windows (same every evaluation)
    double unigram_loss = 0.0;                       // nats/token of a unigram model of train, on val
    std::vector<std::string> domain_names;
    std::vector<DomainEval> domain_evals;  // every domain present in validation or ood
};

// The train loader draws this rank's rows (batch_size / num_ranks) of each global batch; the
// evaluation batches are global (the trainer takes its rows from them).
Datasets load_datasets(const DataConfig& config,
                       int vocab_size,
                       uint64_t seed,
                       int eval_batches,
                       int rank,
                       int num_ranks,
                       std::ostream& log);

}  // namespace bmoe::trainer
