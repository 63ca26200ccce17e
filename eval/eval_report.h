// eval_report.h -- the results of `bmoe eval` as eval.json, eval.md and the printed summary.
//
// eval.json follows tests/data/eval_sample.json (what tools/plot_eval.py reads):
//   config     {checkpoint, step, router, mode, samples, requested_samples, num_bins, bootstrap, seed,
//               questions, noise_scales, backend, bmoe_version}
//   lm         {domains: [{name, source, ood, tokens, loss, perplexity, unigram_loss?}]}
//   mcqa       {sets: [{name, ood, n, accuracy, above_chance, chance_threshold, ece, ece_se, ece_floor,
//               mce, brier, nll, truncated, reliability: {lower, upper, count, accuracy, confidence}}]}
//   ood        {pairs: [{id_set, ood_set, scores: [{name, auroc, aupr, fpr95, roc: {fpr, tpr}}]}]}
//   stability  {noise_scales, mean_jaccard, per_layer [layer][scale], scale_at_0p7 (or null),
//               clean_jaccard, sequences, tokens}
//   experts    {domains, num_experts, layers: [{layer, usage [domain][expert]}]}
//   skipped    {section: why} for every section that did not run (absent when none)
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "eval/lm_eval.h"
#include "eval/mcqa_scoring.h"
#include "eval/metrics.h"
#include "eval/stability.h"

namespace bmoe::eval {

struct McqaSetResult {
    McqaScores scores;
    Calibration calibration;
    double chance_threshold = 0.0;  // 0.25 + 3 sqrt(0.25 * 0.75 / n)
    bool above_chance = false;      // accuracy > chance_threshold
};

struct OodScoreResult {
    std::string name;
    Detection detection;
};

struct OodPairResult {
    std::string id_set, ood_set;
    std::vector<OodScoreResult> scores;
};

struct EvalResults {
    nlohmann::json config;
    int num_experts = 0;
    std::vector<LmDomainResult> lm;
    std::vector<McqaSetResult> mcqa;
    std::vector<OodPairResult> ood;
    std::optional<StabilityResult> stability;
    std::map<std::string, std::string> skipped;  // section -> reason
};

// Accuracy threshold above which a 4-option set is read as better than chance.
double chance_threshold(int n);

// Calibration + the chance check of one scored set.
McqaSetResult calibrate_set(McqaScores scores, int bins, int bootstrap, uint64_t seed);

// ID vs OoD detection for every score both sets share: predictive entropy, 1 - max pi, router scores.
OodPairResult detect_ood(const McqaScores& id, const McqaScores& ood);

nlohmann::json report_json(const EvalResults& r);
std::string report_markdown(const EvalResults& r);
// A few lines: accuracy/ECE per set, AUROC per score, the stability crossing; loud chance warnings.
std::string report_summary(const EvalResults& r);

}  // namespace bmoe::eval
