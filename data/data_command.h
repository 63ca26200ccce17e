// data_command.h -- `bmoe data`: build a corpus and write train.bin / val.bin / ood.bin.
//
// build_corpus() is the one place that turns a source name ("synthetic", "text", "mcqa" or a text
// file) into CorpusSplits, so `bmoe data` and in-memory training runs see identical data for a seed.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>

#include "data/token_data.h"

namespace CLI {
class App;
}

namespace bmoe::data {

struct DataCommandOptions {
    std::string source = "synthetic";  // "synthetic" | "text" | "mcqa" | path of a UTF-8 text file
    std::string out_dir = "out/data";
    uint64_t seed = 1234;
    uint64_t train_tokens = 2'000'000;  // text sources: 0 = all available
    uint64_t val_tokens = 100'000;
    uint64_t ood_tokens = 100'000;
    std::string fortunes_dir = "/usr/share/games/fortunes";  // source "text" only
    std::string include_dir = "/usr/include";                // source "text" only
    double mcqa_fraction = 0.2;  // source "synthetic": share of train/validation documents that are MCQA questions
    int questions = 300;         // source "mcqa": training questions in train.bin
    int val_questions = 100;     // source "mcqa": other questions in val.bin
};

// Registers every option above on the `data` subcommand (descriptions and defaults in --help).
void add_data_options(CLI::App& sub, DataCommandOptions& opts);

// The splits of `opts.source` (out_dir is ignored). Throws bmoe::Error for an unknown source.
CorpusSplits build_corpus(const DataCommandOptions& opts);

// Builds the corpus, writes <out_dir>/train.bin, val.bin and ood.bin (ood.bin only when the
// source has OoD domains) and prints one summary line per split to `out`. Returns 0.
int run_data_command(const DataCommandOptions& opts, std::ostream& out);
int run_data_command(const DataCommandOptions& opts);  // prints to std::cout

// "train: 2000047 tokens, 8012 documents, 5 domains (arithmetic 20.1%, ...)"
std::string summarize_split(const TokenData& data);

}  // namespace bmoe::data
