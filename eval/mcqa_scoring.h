// mcqa_scoring.h -- runs a multiple-choice question set through the model: the option
// probabilities pi of every question and the router's uncertainty scores over its prompt.
//
// Each prompt ends with "Answer: "; the model's next-token logits at the LAST prompt position,
// restricted to the letter tokens 'A'..'D' and softmaxed, give pi [4]. Prompts are batched (sorted
// by length, a fixed number of questions per global forward, right-padded: causal attention makes
// padding harmless) and split over the ranks like every evaluation batch (eval_model.h).
// Router scores (higher = more uncertain) are the mean over ALL of a question's prompt tokens and
// ALL MoE layers of a per-token, per-layer value read from Router::outputs():
//   gate_entropy      H[pbar]                                 every router
//   router_mi         H[pbar] - (1/S) sum_s H[p^s]            only when the router draws S >= 2 samples
//   mean_sigma2       (1/E) sum_e sigma_e^2                   logit_mf, weight_mfvi
//   trace_cov         tr(L L^T) / E = (1/E) sum_{i>=j} L_ij^2 logit_fc
//   mean_temperature  T                                       vtsr
#pragma once

#include <array>
#include <string>
#include <vector>

#include "data/mcqa.h"
#include "eval/eval_model.h"
#include "model/router.h"

namespace bmoe::eval {

// The router scores this router family produces with S samples per token (S from routing_samples).
std::vector<std::string> router_score_names(model::RouterType type, int samples);

// The number of logit samples S the router draws per token at evaluation, given the requested
// samples (0 = router.eval_samples) and mode (mirrors model/router.cpp).
int routing_samples(const model::RouterConfig& router, model::RouterMode mode, int requested);

struct McqaScores {
    std::string name;  // "synthetic-id", ...
    bool ood = false;
    std::vector<std::vector<double>> probs;  // [n][4] option probabilities pi
    std::vector<int> labels;                 // [n] the answer 0..3
    std::vector<std::string> score_names;    // router scores, as router_score_names
    std::vector<std::vector<double>> router_scores;  // [score][n]
    int truncated = 0;  // prompts cut from the left to model.max_seq_len (learned positions only)
};

// Scores every question of `set`; questions_per_batch prompts per global forward. Collective.
McqaScores score_mcqa_set(EvalModel& model,
                          const data::McqaSet& set,
                          const model::RoutingContext& routing,
                          int samples,
                          int questions_per_batch);

}  // namespace bmoe::eval
