// evaluator.h -- `bmoe eval`: evaluate any checkpoint (deterministic or Bayesian router).
//
// Sections (eval/metrics.h defines the metrics):
//   lm         loss and perplexity per domain of the checkpoint's corpus (validation split for the
//              in-distribution domains, ood split for the held-out ones) and of every --data file/dir
//   mcqa       accuracy, ECE (equal-width bins, bootstrap SE, noise floor), MCE, Brier, NLL of the
//              synthetic-id / synthetic-ood sets and, when the text corpus is installed, cloze-id /
//              cloze-ood; each set says whether its accuracy is above chance (> 0.25 + 3 SE)
//   ood        AUROC / AUPR / FPR@95 and ROC curves of ID vs OoD for every uncertainty score
//              (predictive entropy, 1 - max pi, router gate entropy, router MI when S >= 2, and the
//              router's own variance or temperature where the family has one)
//   stability  Jaccard of top-k sets under input noise, per MoE layer and mean, and the noise scale
//              where the mean falls to 0.7
//   experts    each domain's share of routed tokens per expert and MoE layer
// Every rank builds its shard of the model (expert parallelism like training); the batch rows are
// split over the ranks and per-question results combined with all-reduces, so the numbers do not
// depend on the number of ranks (routing is dropless at evaluation, whatever model.capacity_factor the
// checkpoint trained with). Same checkpoint + options -> identical JSON. Rank 0 writes
// <out>/eval.json (schema: tests/data/eval_sample.json plus "config"), <out>/eval.md and the PNGs
// of tools/plot_eval.py. Bad options and empty evaluation sets are one-line bmoe::Errors.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "parallel/communicator.h"

namespace bmoe::eval {

struct EvalOptions {
    std::string checkpoint;          // .h5 file, or a checkpoint directory (its `latest`)
    std::vector<std::string> data;   // extra token files / `bmoe data` directories for the LM section
    int samples = 0;                 // routing samples S; 0 = the checkpoint's router.eval_samples
    std::string mode = "sample";     // "sample" (S samples averaged in the router) | "mean" (l = mu)
    int questions = 5000;            // questions per MCQA set
    int bins = 15;                   // ECE bins
    int bootstrap = 200;             // bootstrap resamples behind ece_se and ece_floor
    std::string out_dir;             // "" = <checkpoint dir>/<checkpoint stem>_eval
    std::string backend = "cpu";     // cpu | cuda
    int ep = 0;                      // expert-parallel group size (0 = all ranks)
    int threads = 0;                 // CPU threads (0 = all cores)
    bool has_seed = false;           // false: the checkpoint's train.seed
    uint64_t seed = 0;               // question sets and routing noise
    std::vector<double> noise_scales = {0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5};  // x RMS of the hidden state
    int stability_sequences = 8;     // validation sequences (data.seq_len tokens) for the stability sweep
    int batch_questions = 32;        // prompts per global forward
    std::string cloze = "auto";      // auto (skip with a warning when the text corpus is missing) | required | off
    bool lm = true;                  // the LM section on the checkpoint's corpus
    bool plot = true;                // run tools/plot_eval.py
    bool write_files = true;         // eval.json / eval.md (rank 0)
};

struct EvalReport {
    nlohmann::json json;                // what eval.json holds
    std::string markdown;               // what eval.md holds
    std::string summary;                // the human summary printed at the end
    std::vector<std::string> warnings;  // every warning line printed
    std::string out_dir;                // where the files went ("" when none were written)
    std::vector<std::string> files;     // files written (rank 0)
};

// Checks the options that need no checkpoint (one-line bmoe::Error naming the flag and the fix).
void validate_options(const EvalOptions& options);

// Runs every section. Collective over `world` (nullptr = this process alone); `log` gets the
// progress lines, warnings and the summary (rank 0 only). Throws bmoe::Error on bad input.
EvalReport run_evaluation(const EvalOptions& options, parallel::Communicator* world, std::ostream& log);

}  // namespace bmoe::eval
