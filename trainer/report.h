// report.h -- the end-of-run evaluation report: loss per domain against the unigram baseline, and
// which experts each domain's tokens use (expert specialisation), printed and saved as JSON.
#pragma once

#include <string>
#include <vector>

#include "model/model.h"
#include "trainer/datasets.h"

namespace bmoe::trainer {

struct DomainReport {
    std::string name;
    bool is_ood = false;
    double loss = 0.0;          // mean CE (nats/token)
    double unigram_loss = 0.0;  // train unigram on the same tokens
    int64_t num_tokens = 0;
    std::vector<std::vector<double>> expert_share;  // [MoE layer][expert]: share of routed copies
};

std::vector<DomainReport> evaluate_domains(model::Model& model,
                                           const std::vector<DomainEval>& domains,
                                           const model::LossWeights& weights);
// A fixed-width table, one row per domain, with the top experts of the first MoE layer.
std::string format_report(const std::vector<DomainReport>& reports);
void write_report_json(const std::string& path, int step, const std::vector<DomainReport>& reports);

}  // namespace bmoe::trainer
