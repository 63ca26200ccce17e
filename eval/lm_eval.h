// lm_eval.h -- language-modelling evaluation: loss, perplexity and expert usage per domain.
//
// The windows of each domain (trainer::DomainEval: the checkpoint corpus's validation split for
// in-distribution domains, its ood split for held-out ones, or a token file given with --data) are
// regrouped into global batches of a fixed row count, so the batches and the routing-noise ids are
// the same for any number of ranks. Loss = mean next-token cross-entropy (nats) over every window
// position; expert usage = each expert's share of the routed top-k copies of the domain's tokens per
// MoE layer (the same quantity as trainer::evaluate_domains' expert_share, dummy rows excluded).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "eval/eval_model.h"
#include "model/router.h"
#include "trainer/datasets.h"

namespace bmoe::eval {

// One domain's windows and where they come from.
struct LmDomain {
    trainer::DomainEval eval;  // name, is_ood, global batches, unigram_loss
    std::string source;        // "checkpoint corpus (synthetic)" or the --data path
    bool has_unigram = false;  // eval.unigram_loss is meaningful (the corpus has a train split)
};

struct LmDomainResult {
    std::string name, source;
    bool ood = false;
    int64_t tokens = 0;  // scored positions
    double loss = 0.0;   // nats / token
    double perplexity = 0.0;
    bool has_unigram = false;
    double unigram_loss = 0.0;
    std::vector<std::vector<double>> expert_share;  // [MoE layer][expert]
};

// The per-domain windows of a token file (every domain it holds at least one window of T + 1 tokens
// of), or of a directory's val.bin and ood.bin. `max_windows` per domain (0 = all). Throws a one-line
// bmoe::Error naming `path` and the fix when it is missing or holds no window.
std::vector<LmDomain> lm_domains_from_path(const std::string& path, int batch_rows, int T, size_t max_windows);

// Evaluates every domain; `rows_per_batch` rows per global forward. Collective.
std::vector<LmDomainResult> evaluate_lm(EvalModel& model,
                                        const std::vector<LmDomain>& domains,
                                        const model::RoutingContext& routing,
                                        int rows_per_batch);

}  // namespace bmoe::eval
