#include "trainer/datasets.h"

#include <algorithm>
#include <filesystem>
#include <ostream>

#include "data/data_command.h"
#include "data/token_file.h"
#include "data/unigram_baseline.h"
#include "parallel/check.h"

namespace bmoe::trainer {

namespace {

data::CorpusSplits load_splits(const DataConfig& config, uint64_t seed) {
    namespace fs = std::filesystem;
    const std::string& ds = config.dataset;
    if (ds == "synthetic" || ds == "text" || fs::is_regular_file(ds)) {
        data::DataCommandOptions opts;
        opts.source = ds;
        opts.seed = seed;
        opts.train_tokens = config.train_tokens;
        opts.val_tokens = std::clamp<uint64_t>(config.train_tokens / 10, 20'000, 100'000);
        opts.ood_tokens = opts.val_tokens;
        return data::build_corpus(opts);
    }
    BMOE_REQUIRE(fs::is_directory(ds), "data.dataset '", ds,
                 "' is neither 'synthetic', 'text', a text file nor a directory: write one with `bmoe data --out ",
                 ds, "`");
    const fs::path train = fs::path(ds) / "train.bin", val = fs::path(ds) / "val.bin";
    BMOE_REQUIRE(fs::exists(train), "data.dataset directory '", ds, "' has no train.bin: write it with `bmoe data`");
    BMOE_REQUIRE(fs::exists(val), "data.dataset directory '", ds, "' has no val.bin: write it with `bmoe data`");
    data::CorpusSplits splits;
    splits.train = data::read_token_file(train.string());
    splits.validation = data::read_token_file(val.string());
    return splits;
}

}  // namespace

Datasets load_datasets(const DataConfig& config, int vocab_size, uint64_t seed, int eval_batches, std::ostream& log) {
    data::CorpusSplits splits = load_splits(config, seed);
    for (const data::TokenData* d : {&splits.train, &splits.validation})
        BMOE_REQUIRE(d->vocab_size <= vocab_size, d->describe(), " has vocab size ", d->vocab_size,
                     " but model.vocab_size is ", vocab_size, ": set --model.vocab_size=", d->vocab_size);
    Datasets ds;
    ds.domain_names = splits.train.domain_names();
    ds.unigram_loss = data::unigram_cross_entropy(splits.train, splits.validation);
    ds.train = std::make_shared<const data::TokenData>(std::move(splits.train));
    ds.val = std::make_shared<const data::TokenData>(std::move(splits.validation));
    ds.train_loader = std::make_unique<data::DataLoader>(*ds.train, config.batch_size, config.seq_len, seed);
    data::EvalLoader val(*ds.val, config.batch_size, config.seq_len,
                         static_cast<size_t>(eval_batches) * config.batch_size);
    ds.val_batches = val.all_batches();
    log << "data: " << config.dataset << " | train " << ds.train->num_tokens() << " tokens, val "
        << ds.val->num_tokens() << " tokens, " << ds.domain_names.size() << " domains | unigram baseline "
        << ds.unigram_loss << " nats/token\n";
    return ds;
}

}  // namespace bmoe::trainer
