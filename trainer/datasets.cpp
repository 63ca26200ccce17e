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
                 "' is neither 'synthetic', 'text', a text file nor a directory: write one with `bmoe data --out ", ds,
                 "`");
    const fs::path train = fs::path(ds) / "train.bin", val = fs::path(ds) / "val.bin";
    BMOE_REQUIRE(fs::exists(train), "data.dataset directory '", ds, "' has no train.bin: write it with `bmoe data`");
    BMOE_REQUIRE(fs::exists(val), "data.dataset directory '", ds, "' has no val.bin: write it with `bmoe data`");
    data::CorpusSplits splits;
    splits.train = data::read_token_file(train.string());
    splits.validation = data::read_token_file(val.string());
    const fs::path ood = fs::path(ds) / "ood.bin";  // optional: a single text file has no OoD domains
    if (fs::exists(ood)) splits.ood = data::read_token_file(ood.string());
    return splits;
}

// Per-domain windows: up to `max_windows` of each domain's documents, concatenated.
std::vector<DomainEval> domain_evaluations(
    const data::TokenData& train, const data::TokenData& split, int B, int T, size_t max_windows) {
    std::vector<DomainEval> out;
    const std::vector<uint64_t> docs = split.documents_per_domain();
    for (int d = 0; d < split.num_domains(); ++d) {
        if (docs[d] == 0) continue;
        const data::TokenData one = data::select_domain(split, d);
        if (one.num_tokens() < static_cast<uint64_t>(T) + 1) continue;
        DomainEval e;
        e.name = split.domains[d].name;
        e.is_ood = split.domains[d].is_ood;
        e.batches = data::EvalLoader(one, B, T, max_windows).all_batches();
        e.unigram_loss = data::unigram_cross_entropy(train, one);
        out.push_back(std::move(e));
    }
    return out;
}

}  // namespace

Datasets load_datasets(const DataConfig& config,
                       int vocab_size,
                       uint64_t seed,
                       int eval_batches,
                       int rank,
                       int num_ranks,
                       std::ostream& log) {
    data::CorpusSplits splits = load_splits(config, seed);
    for (const data::TokenData* d : {&splits.train, &splits.validation})
        BMOE_REQUIRE(d->vocab_size <= vocab_size, d->describe(), " has vocab size ", d->vocab_size,
                     " but model.vocab_size is ", vocab_size, ": set --model.vocab_size=", d->vocab_size);
    Datasets ds;
    ds.domain_names = splits.train.domain_names();
    const size_t windows_per_domain = static_cast<size_t>(std::max(1, eval_batches / 2)) * config.batch_size;
    ds.domain_evals =
        domain_evaluations(splits.train, splits.validation, config.batch_size, config.seq_len, windows_per_domain);
    if (splits.ood.num_tokens() > 0) {
        std::vector<DomainEval> ood =
            domain_evaluations(splits.train, splits.ood, config.batch_size, config.seq_len, windows_per_domain);
        for (DomainEval& e : ood) ds.domain_evals.push_back(std::move(e));
    }
    ds.unigram_loss = data::unigram_cross_entropy(splits.train, splits.validation);
    ds.train = std::make_shared<const data::TokenData>(std::move(splits.train));
    ds.val = std::make_shared<const data::TokenData>(std::move(splits.validation));
    ds.train_loader = std::make_unique<data::DataLoader>(*ds.train, config.batch_size / num_ranks, config.seq_len, seed,
                                                         rank, num_ranks);
    data::EvalLoader val(*ds.val, config.batch_size, config.seq_len,
                         static_cast<size_t>(eval_batches) * config.batch_size);
    ds.val_batches = val.all_batches();
    log << "data: " << config.dataset << " | train " << ds.train->num_tokens() << " tokens, val "
        << ds.val->num_tokens() << " tokens, " << ds.domain_names.size() << " domains | unigram baseline "
        << ds.unigram_loss << " nats/token\n";
    return ds;
}

}  // namespace bmoe::trainer
