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

struct Datasets {
    std::shared_ptr<const data::TokenData> train, val;
    std::unique_ptr<data::DataLoader> train_loader;
    std::vector<data::Batch> val_batches;  // fixed validation windows (same every evaluation)
    double unigram_loss = 0.0;             // nats/token of a unigram model of train, on val
    std::vector<std::string> domain_names;
};

Datasets load_datasets(const DataConfig& config, int vocab_size, uint64_t seed, int eval_batches, std::ostream& log);

}  // namespace bmoe::trainer
