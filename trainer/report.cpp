#include "trainer/report.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "parallel/check.h"

namespace bmoe::trainer {

std::vector<DomainReport> evaluate_domains(model::Model& model,
                                           const std::vector<DomainEval>& domains,
                                           const model::LossWeights& weights) {
    std::vector<DomainReport> out;
    for (const DomainEval& d : domains) {
        DomainReport r{d.name, d.is_ood, 0.0, d.unigram_loss, 0, {}};
        double loss_sum = 0.0;
        std::vector<std::vector<int64_t>> counts;
        for (const data::Batch& b : d.batches) {
            const model::ForwardStats s = model.forward(b.tokens.data(), b.targets.data(), b.B, b.T, weights);
            loss_sum += s.ce_loss * static_cast<double>(s.num_valid_targets);
            r.num_tokens += s.num_valid_targets;
            counts.resize(s.moe_layers.size());
            for (size_t l = 0; l < s.moe_layers.size(); ++l) {
                counts[l].resize(s.moe_layers[l].tokens_per_expert.size(), 0);
                for (size_t e = 0; e < counts[l].size(); ++e) counts[l][e] += s.moe_layers[l].tokens_per_expert[e];
            }
        }
        r.loss = r.num_tokens > 0 ? loss_sum / static_cast<double>(r.num_tokens) : 0.0;
        for (const auto& layer : counts) {
            const double total = static_cast<double>(std::accumulate(layer.begin(), layer.end(), int64_t{0}));
            std::vector<double> share(layer.size());
            for (size_t e = 0; e < layer.size(); ++e) share[e] = total > 0 ? layer[e] / total : 0.0;
            r.expert_share.push_back(std::move(share));
        }
        out.push_back(std::move(r));
    }
    return out;
}

std::string format_report(const std::vector<DomainReport>& reports) {
    std::string s = "domain        split  loss    unigram  top experts, first MoE layer (share of routed copies)\n";
    char buf[160];
    for (const DomainReport& r : reports) {
        std::snprintf(buf, sizeof buf, "%-13s %-5s  %6.3f  %6.3f  ", r.name.c_str(), r.is_ood ? "ood" : "val", r.loss,
                      r.unigram_loss);
        s += buf;
        if (!r.expert_share.empty()) {
            const std::vector<double>& share = r.expert_share.front();
            std::vector<int> order(share.size());
            std::iota(order.begin(), order.end(), 0);
            std::sort(order.begin(), order.end(), [&](int a, int b) { return share[a] > share[b]; });
            for (size_t i = 0; i < std::min<size_t>(3, order.size()); ++i) {
                std::snprintf(buf, sizeof buf, " e%d %2.0f%%", order[i], 100.0 * share[order[i]]);
                s += buf;
            }
        }
        s += "\n";
    }
    return s;
}

void write_report_json(const std::string& path, int step, const std::vector<DomainReport>& reports) {
    nlohmann::json domains = nlohmann::json::array();
    for (const DomainReport& r : reports)
        domains.push_back({{"domain", r.name},
                           {"ood", r.is_ood},
                           {"loss", r.loss},
                           {"unigram_loss", r.unigram_loss},
                           {"tokens", r.num_tokens},
                           {"expert_share", r.expert_share}});
    std::ofstream f(path);
    BMOE_REQUIRE(f.good(), "cannot write '", path, "': check that train.out_dir is writable");
    f << nlohmann::json{{"step", step}, {"domains", domains}}.dump(2) << "\n";
}

}  // namespace bmoe::trainer
