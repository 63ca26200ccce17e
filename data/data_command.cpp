// data_command.cpp -- `bmoe data`: options, corpus dispatch, writing and the summary lines.
#include "data/data_command.h"

#include <CLI/CLI.hpp>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "data/mcqa.h"
#include "data/synthetic_corpus.h"
#include "data/text_corpus.h"
#include "data/token_file.h"
#include "data/unigram_baseline.h"
#include "parallel/check.h"

namespace bmoe::data {

namespace fs = std::filesystem;

void add_data_options(CLI::App& sub, DataCommandOptions& opts) {
    sub.add_option("--source", opts.source,
                   "corpus: 'synthetic' (built-in 5 domains + 3 OoD), 'text' (Debian fortunes + C headers, OoD "
                   "German/Spanish/Russian fortunes), 'mcqa' (only MCQA training questions with answers, for "
                   "fine-tuning) or the path of a UTF-8 text file")
        ->capture_default_str();
    sub.add_option("-o,--out", opts.out_dir, "directory to write train.bin, val.bin and ood.bin into")
        ->capture_default_str();
    sub.add_option("--seed", opts.seed, "seed of generation and of the train/validation/ood split")
        ->capture_default_str();
    sub.add_option("--train-tokens", opts.train_tokens,
                   "tokens (bytes) in the train split; for text sources 0 means all available")
        ->capture_default_str();
    sub.add_option("--val-tokens", opts.val_tokens, "tokens in the validation split (in-distribution domains)")
        ->capture_default_str();
    sub.add_option("--ood-tokens", opts.ood_tokens, "tokens in the ood split (held-out domains only); 0 = none")
        ->capture_default_str();
    sub.add_option("--fortunes-dir", opts.fortunes_dir,
                   "fortune files for --source text (packages fortunes, fortunes-de, fortunes-es, fortunes-ru)")
        ->capture_default_str();
    sub.add_option("--include-dir", opts.include_dir, "C headers for --source text (package libc6-dev)")
        ->capture_default_str();
    sub.add_option("--mcqa-fraction", opts.mcqa_fraction,
                   "--source synthetic: share of train/validation documents that are multiple-choice questions with "
                   "their answer letter (teaches a base model the MCQA format), in [0, 1)")
        ->capture_default_str();
    sub.add_option("--questions", opts.questions, "--source mcqa: training questions in train.bin")
        ->capture_default_str();
    sub.add_option("--val-questions", opts.val_questions, "--source mcqa: other questions in val.bin")
        ->capture_default_str();
}

CorpusSplits build_corpus(const DataCommandOptions& opts) {
    if (opts.source == "synthetic") {
        SyntheticCorpusOptions o;
        o.seed = opts.seed;
        o.train_tokens = opts.train_tokens;
        o.val_tokens = opts.val_tokens;
        o.ood_tokens = opts.ood_tokens;
        o.mcqa_fraction = opts.mcqa_fraction;
        return build_synthetic_corpus(o);
    }
    if (opts.source == "mcqa") {
        BMOE_REQUIRE(opts.questions > 0, "--questions (", opts.questions,
                     ") must be at least 1: the number of MCQA training questions in train.bin (e.g. 300)");
        BMOE_REQUIRE(opts.val_questions > 0, "--val-questions (", opts.val_questions,
                     ") must be at least 1: the number of MCQA questions in val.bin (e.g. 100)");
        CorpusSplits s;
        s.train = mcqa_training_split("train", opts.questions, opts.seed);
        s.validation = mcqa_training_split("validation", opts.val_questions, opts.seed);
        s.ood = empty_split_like(s.train, "ood");  // OoD questions are for evaluation only
        return s;
    }
    TextCorpusOptions o;
    o.seed = opts.seed;
    o.train_tokens = opts.train_tokens;
    o.val_tokens = opts.val_tokens;
    o.ood_tokens = opts.ood_tokens;
    o.fortunes_dir = opts.fortunes_dir;
    o.include_dir = opts.include_dir;
    if (opts.source == "text") return build_text_corpus(o);
    BMOE_REQUIRE(!opts.source.empty(),
                 "--source is empty; pass 'synthetic', 'text', 'mcqa' or the path of a UTF-8 text file");
    return build_file_corpus(opts.source, o);
}

std::string summarize_split(const TokenData& data) {
    std::ostringstream os;
    const std::vector<uint64_t> per_domain = data.tokens_per_domain();
    int present = 0;
    for (uint64_t n : per_domain) present += n > 0;
    os << data.split << ": " << data.num_tokens() << " tokens, " << data.num_documents() << " documents, " << present
       << (present == 1 ? " domain" : " domains");
    if (present > 0) {
        os << " (";
        bool first = true;
        for (size_t d = 0; d < per_domain.size(); ++d) {
            if (per_domain[d] == 0) continue;
            os << (first ? "" : ", ") << data.domains[d].name << " " << std::fixed << std::setprecision(1)
               << 100.0 * static_cast<double>(per_domain[d]) / static_cast<double>(data.num_tokens()) << "%";
            first = false;
        }
        os << ")";
    }
    return os.str();
}

int run_data_command(const DataCommandOptions& opts, std::ostream& out) {
    const CorpusSplits splits = build_corpus(opts);
    std::error_code ec;
    fs::create_directories(opts.out_dir, ec);
    BMOE_REQUIRE(!ec && fs::is_directory(opts.out_dir), "cannot create output directory '", opts.out_dir, "' (",
                 ec ? ec.message() : std::string("a file is in the way"), "); pass a writable directory with --out");
    const fs::path dir = opts.out_dir;
    auto write = [&](const TokenData& data, const char* name) {
        const std::string path = (dir / name).string();
        write_token_file(path, data);
        out << summarize_split(data) << " -> " << path << "\n";
    };
    write(splits.train, "train.bin");
    write(splits.validation, "val.bin");
    if (splits.ood.num_tokens() > 0) {
        write(splits.ood, "ood.bin");
    } else {
        fs::remove(dir / "ood.bin", ec);  // never leave a stale ood.bin from an earlier corpus
        const char* why = opts.source == "mcqa"  ? "MCQA training questions are in-distribution only"
                          : opts.ood_tokens == 0 ? "--ood-tokens is 0"
                                                 : "this source has no held-out domains";
        out << "ood: none (" << why << "); ood.bin not written\n";
    }
    out << "unigram baseline: " << std::fixed << std::setprecision(4)
        << unigram_cross_entropy(splits.train, splits.validation) << " nats/token (train unigram on validation)"
        << std::endl;
    return 0;
}

int run_data_command(const DataCommandOptions& opts) { return run_data_command(opts, std::cout); }

}  // namespace bmoe::data
