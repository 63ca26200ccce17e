#include "eval/eval_report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "parallel/check.h"

namespace bmoe::eval {

namespace {

using nlohmann::json;

// A finite number, or null (JSON has no NaN/Inf).
json num(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

std::string fmt(const char* f, double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, f, v);
    return buf;
}

double predictive_entropy(const std::vector<double>& p) {
    double h = 0.0;
    for (double x : p)
        if (x > 0.0) h -= x * std::log(x);
    return h;
}

std::string chance_warning(const McqaSetResult& s) {
    return concat(s.scores.name, " accuracy ", fmt("%.3f", s.calibration.accuracy),
                  " is NOT above chance (needs > ", fmt("%.3f", s.chance_threshold), " = 0.25 + 3 SE at n = ",
                  s.calibration.n, "): its calibration numbers mean little");
}

}  // namespace

double chance_threshold(int n) { return 0.25 + 3.0 * std::sqrt(0.25 * 0.75 / std::max(n, 1)); }

McqaSetResult calibrate_set(McqaScores scores, int bins, int bootstrap, uint64_t seed) {
    McqaSetResult r;
    r.calibration = calibration(scores.probs, scores.labels, bins, bootstrap, seed);
    r.chance_threshold = chance_threshold(r.calibration.n);
    r.above_chance = r.calibration.accuracy > r.chance_threshold;
    r.scores = std::move(scores);
    return r;
}

OodPairResult detect_ood(const McqaScores& id, const McqaScores& ood) {
    OodPairResult pair;
    pair.id_set = id.name;
    pair.ood_set = ood.name;
    auto add = [&](const std::string& name, const std::vector<double>& a, const std::vector<double>& b) {
        pair.scores.push_back({name, ood_detection(a, b)});
    };
    auto from_probs = [](const McqaScores& s, bool entropy) {
        std::vector<double> v;
        for (const std::vector<double>& p : s.probs)
            v.push_back(entropy ? predictive_entropy(p) : 1.0 - *std::max_element(p.begin(), p.end()));
        return v;
    };
    add("predictive_entropy", from_probs(id, true), from_probs(ood, true));
    add("one_minus_max_prob", from_probs(id, false), from_probs(ood, false));
    for (size_t i = 0; i < id.score_names.size(); ++i) {
        const auto it = std::find(ood.score_names.begin(), ood.score_names.end(), id.score_names[i]);
        if (it == ood.score_names.end()) continue;
        add(id.score_names[i], id.router_scores[i], ood.router_scores[it - ood.score_names.begin()]);
    }
    return pair;
}

json report_json(const EvalResults& r) {
    json out;
    out["config"] = r.config;

    json domains = json::array();
    for (const LmDomainResult& d : r.lm) {
        json j{{"name", d.name},   {"source", d.source},         {"ood", d.ood},
               {"tokens", d.tokens}, {"loss", num(d.loss)}, {"perplexity", num(d.perplexity)}};
        if (d.has_unigram) j["unigram_loss"] = num(d.unigram_loss);
        domains.push_back(std::move(j));
    }
    if (!r.lm.empty()) out["lm"] = {{"domains", domains}};

    json sets = json::array();
    for (const McqaSetResult& s : r.mcqa) {
        const Calibration& c = s.calibration;
        json rel{{"lower", json::array()},
                 {"upper", json::array()},
                 {"count", json::array()},
                 {"accuracy", json::array()},
                 {"confidence", json::array()}};
        for (const ReliabilityBin& b : c.bins) {
            rel["lower"].push_back(b.lower);
            rel["upper"].push_back(b.upper);
            rel["count"].push_back(b.count);
            rel["accuracy"].push_back(b.accuracy);
            rel["confidence"].push_back(b.confidence);
        }
        sets.push_back({{"name", s.scores.name},
                        {"ood", s.scores.ood},
                        {"n", c.n},
                        {"accuracy", c.accuracy},
                        {"above_chance", s.above_chance},
                        {"chance_threshold", s.chance_threshold},
                        {"ece", c.ece},
                        {"ece_se", c.ece_se},
                        {"ece_floor", c.ece_floor},
                        {"mce", c.mce},
                        {"brier", c.brier},
                        {"nll", c.nll},
                        {"truncated", s.scores.truncated},
                        {"reliability", rel}});
    }
    if (!r.mcqa.empty()) out["mcqa"] = {{"sets", sets}};

    json pairs = json::array();
    for (const OodPairResult& p : r.ood) {
        json scores = json::array();
        for (const OodScoreResult& s : p.scores) {
            const Detection& d = s.detection;
            scores.push_back({{"name", s.name},
                              {"auroc", d.auroc},
                              {"aupr", d.aupr},
                              {"fpr95", d.fpr_at_95_tpr},
                              {"roc", {{"fpr", d.roc_fpr}, {"tpr", d.roc_tpr}}}});
        }
        pairs.push_back({{"id_set", p.id_set}, {"ood_set", p.ood_set}, {"scores", scores}});
    }
    if (!r.ood.empty()) out["ood"] = {{"pairs", pairs}};

    if (r.stability) {
        const StabilityResult& s = *r.stability;
        out["stability"] = {{"noise_scales", s.noise_scales},
                            {"mean_jaccard", s.mean_jaccard},
                            {"per_layer", s.per_layer},
                            {"scale_at_0p7", s.scale_at_0p7 ? json(*s.scale_at_0p7) : json(nullptr)},
                            {"clean_jaccard", s.clean_jaccard},
                            {"sequences", s.sequences},
                            {"tokens", s.tokens}};
    }

    if (!r.lm.empty()) {
        json names = json::array(), layers = json::array();
        for (const LmDomainResult& d : r.lm) names.push_back(d.name);
        const size_t L = r.lm.front().expert_share.size();
        for (size_t l = 0; l < L; ++l) {
            json usage = json::array();
            for (const LmDomainResult& d : r.lm) usage.push_back(d.expert_share[l]);
            layers.push_back({{"layer", l}, {"usage", usage}});
        }
        out["experts"] = {{"domains", names}, {"num_experts", r.num_experts}, {"layers", layers}};
    }
    if (!r.skipped.empty()) out["skipped"] = r.skipped;
    return out;
}

std::string report_markdown(const EvalResults& r) {
    std::string md = "# bmoe eval\n\n";
    const json& c = r.config;
    md += concat("- checkpoint: `", c.value("checkpoint", std::string()), "` (step ", c.value("step", 0), ")\n",
                 "- router: ", c.value("router", std::string()), ", mode ", c.value("mode", std::string()),
                 ", S = ", c.value("samples", 0), " routing samples\n", "- seed ", c.value("seed", uint64_t{0}),
                 ", ", c.value("questions", 0), " questions per MCQA set, ", c.value("num_bins", 0), " ECE bins\n\n");

    if (!r.lm.empty()) {
        md += "## Language modelling\n\n| domain | split | tokens | loss (nats) | perplexity | unigram | source |\n"
              "|---|---|---|---|---|---|---|\n";
        for (const LmDomainResult& d : r.lm)
            md += concat("| ", d.name, " | ", d.ood ? "ood" : "val", " | ", d.tokens, " | ", fmt("%.4f", d.loss), " | ",
                         fmt("%.3f", d.perplexity), " | ", d.has_unigram ? fmt("%.4f", d.unigram_loss) : "-", " | ",
                         d.source, " |\n");
        md += "\n";
    }
    if (!r.mcqa.empty()) {
        md += "## MCQA calibration\n\n| set | n | accuracy | above chance | ECE | ECE SE | ECE floor | MCE | Brier | "
              "NLL |\n|---|---|---|---|---|---|---|---|---|---|\n";
        for (const McqaSetResult& s : r.mcqa) {
            const Calibration& k = s.calibration;
            md += concat("| ", s.scores.name, s.scores.ood ? " (OoD)" : "", " | ", k.n, " | ", fmt("%.4f", k.accuracy),
                         " | ", s.above_chance ? "yes" : "**NO**", " | ", fmt("%.4f", k.ece), " | ",
                         fmt("%.4f", k.ece_se), " | ", fmt("%.4f", k.ece_floor), " | ", fmt("%.4f", k.mce), " | ",
                         fmt("%.4f", k.brier), " | ", fmt("%.4f", k.nll), " |\n");
        }
        md += "\n";
        for (const McqaSetResult& s : r.mcqa)
            if (!s.above_chance) md += concat("> **WARNING**: ", chance_warning(s), ".\n\n");
    }
    if (!r.ood.empty()) {
        md += "## OoD detection\n\n| ID vs OoD | score | AUROC | AUPR | FPR@95 |\n|---|---|---|---|---|\n";
        for (const OodPairResult& p : r.ood)
            for (const OodScoreResult& s : p.scores)
                md += concat("| ", p.id_set, " vs ", p.ood_set, " | ", s.name, " | ", fmt("%.4f", s.detection.auroc),
                             " | ", fmt("%.4f", s.detection.aupr), " | ", fmt("%.4f", s.detection.fpr_at_95_tpr),
                             " |\n");
        md += "\n";
    }
    if (r.stability) {
        const StabilityResult& s = *r.stability;
        md += concat("## Routing stability\n\n", s.sequences, " sequences, ", s.tokens,
                     " tokens; noise std = scale x RMS of the hidden state; clean-vs-clean Jaccard ",
                     fmt("%.4f", s.clean_jaccard), ".\n\n| noise scale | mean Jaccard |");
        for (size_t l = 0; l < s.per_layer.size(); ++l) md += concat(" layer ", l, " |");
        md += "\n|---|---|";
        for (size_t l = 0; l < s.per_layer.size(); ++l) md += "---|";
        md += "\n";
        for (size_t i = 0; i < s.noise_scales.size(); ++i) {
            md += concat("| ", fmt("%g", s.noise_scales[i]), " | ", fmt("%.4f", s.mean_jaccard[i]), " |");
            for (const auto& layer : s.per_layer) md += concat(" ", fmt("%.4f", layer[i]), " |");
            md += "\n";
        }
        md += s.scale_at_0p7 ? concat("\nThe mean Jaccard falls to 0.7 at noise scale ", fmt("%.4g", *s.scale_at_0p7),
                                      ".\n\n")
                             : std::string("\nThe mean Jaccard does not cross 0.7 inside the scanned scales.\n\n");
    }
    if (!r.lm.empty() && !r.lm.front().expert_share.empty()) {
        md += "## Expert usage (share of routed tokens)\n\n| domain | MoE layer | top experts |\n|---|---|---|\n";
        for (const LmDomainResult& d : r.lm)
            for (size_t l = 0; l < d.expert_share.size(); ++l) {
                const std::vector<double>& share = d.expert_share[l];
                std::vector<int> order(share.size());
                std::iota(order.begin(), order.end(), 0);
                std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return share[a] > share[b]; });
                std::string top;
                for (size_t i = 0; i < std::min<size_t>(3, order.size()); ++i)
                    top += concat(i ? ", " : "", "e", order[i], " ", fmt("%.0f%%", 100.0 * share[order[i]]));
                md += concat("| ", d.name, " | ", l, " | ", top, " |\n");
            }
        md += "\n";
    }
    if (!r.skipped.empty()) {
        md += "## Skipped\n\n";
        for (const auto& [section, why] : r.skipped) md += concat("- ", section, ": ", why, "\n");
        md += "\n";
    }
    return md;
}

std::string report_summary(const EvalResults& r) {
    const json& c = r.config;
    std::string s = concat("== bmoe eval: ", c.value("checkpoint", std::string()), " (step ", c.value("step", 0),
                           ") | router ", c.value("router", std::string()), " | mode ", c.value("mode", std::string()),
                           ", S ", c.value("samples", 0), " ==\n");
    if (!r.lm.empty()) {
        s += "LM loss   ";
        for (size_t i = 0; i < r.lm.size(); ++i)
            s += concat(i ? " | " : "", r.lm[i].name, r.lm[i].ood ? "*" : "", " ", fmt("%.3f", r.lm[i].loss));
        s += "   (* = OoD; nats/token)\n";
    }
    for (const McqaSetResult& m : r.mcqa) {
        const Calibration& k = m.calibration;
        char buf[256];
        std::snprintf(buf, sizeof buf, "MCQA      %-14s n %-5d acc %.3f  ECE %.3f +- %.3f (floor %.3f)  MCE %.3f  NLL %.3f\n",
                      m.scores.name.c_str(), k.n, k.accuracy, k.ece, k.ece_se, k.ece_floor, k.mce, k.nll);
        s += buf;
    }
    for (const McqaSetResult& m : r.mcqa)
        if (!m.above_chance) s += concat("!!! WARNING: ", chance_warning(m), " !!!\n");
    for (const OodPairResult& p : r.ood) {
        s += concat("OoD AUROC ", p.id_set, " vs ", p.ood_set, ": ");
        for (size_t i = 0; i < p.scores.size(); ++i)
            s += concat(i ? " | " : "", p.scores[i].name, " ", fmt("%.3f", p.scores[i].detection.auroc));
        s += "\n";
    }
    if (r.stability && !r.stability->mean_jaccard.empty()) {
        const StabilityResult& st = *r.stability;
        s += "Stability mean Jaccard";
        for (size_t i = 0; i < st.noise_scales.size(); ++i)
            s += concat(" ", fmt("%.3f", st.mean_jaccard[i]), "@", fmt("%g", st.noise_scales[i]));
        s += st.scale_at_0p7 ? concat("; falls to 0.7 at noise scale ", fmt("%.3g", *st.scale_at_0p7), "\n")
                             : std::string("; never crosses 0.7 in the scanned scales\n");
    }
    for (const auto& [section, why] : r.skipped) s += concat("skipped   ", section, ": ", why, "\n");
    return s;
}

}  // namespace bmoe::eval
