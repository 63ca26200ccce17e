#include "eval/mcqa_scoring.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "data/tokenizer.h"
#include "parallel/check.h"

namespace bmoe::eval {

namespace {

// -sum p log p (nats) of n floats, 0 log 0 = 0.
double entropy_f(const float* p, int n) {
    double h = 0.0;
    for (int i = 0; i < n; ++i)
        if (p[i] > 0.0f) h -= static_cast<double>(p[i]) * std::log(static_cast<double>(p[i]));
    return h;
}

enum class Score { kGateEntropy, kRouterMi, kMeanSigma2, kTraceCov, kMeanTemperature };

Score score_of(const std::string& name) {
    if (name == "gate_entropy") return Score::kGateEntropy;
    if (name == "router_mi") return Score::kRouterMi;
    if (name == "mean_sigma2") return Score::kMeanSigma2;
    if (name == "trace_cov") return Score::kTraceCov;
    BMOE_ASSERT(name == "mean_temperature", "unknown router score ", name);
    return Score::kMeanTemperature;
}

// The score of token n in one layer's router outputs.
double token_score(Score s, const model::RouterOutputs& o, size_t n) {
    const int E = o.E;
    const size_t NE = static_cast<size_t>(o.N) * E;
    switch (s) {
        case Score::kGateEntropy:
            return entropy_f(o.probs.data() + n * E, E);
        case Score::kRouterMi: {
            double mean_h = 0.0;
            for (int k = 0; k < o.S; ++k) mean_h += entropy_f(o.sample_probs.data() + k * NE + n * E, E);
            return entropy_f(o.probs.data() + n * E, E) - mean_h / o.S;
        }
        case Score::kMeanSigma2: {
            double v = 0.0;
            for (int e = 0; e < E; ++e) v += static_cast<double>(o.sigma[n * E + e]) * o.sigma[n * E + e];
            return v / E;
        }
        case Score::kTraceCov: {  // tr(L L^T) = sum of squares of every entry of L
            const size_t P = static_cast<size_t>(E) * (E + 1) / 2;
            double v = 0.0;
            for (size_t q = 0; q < P; ++q) v += static_cast<double>(o.chol[n * P + q]) * o.chol[n * P + q];
            return v / E;
        }
        case Score::kMeanTemperature:
            return o.temperature[n];
    }
    return 0.0;
}

}  // namespace

int routing_samples(const model::RouterConfig& router, model::RouterMode mode, int requested) {
    using model::RouterType;
    int S = requested > 0 ? requested : router.eval_samples;
    switch (router.type) {
        case RouterType::kTopK:
        case RouterType::kTempSampling:
        case RouterType::kVtsr:
            return 1;
        case RouterType::kEnsemble:
            return router.ensemble_size;
        default:
            break;
    }
    return mode == model::RouterMode::kMean ? 1 : S;
}

std::vector<std::string> router_score_names(model::RouterType type, int samples) {
    using model::RouterType;
    std::vector<std::string> names{"gate_entropy"};
    if (samples >= 2) names.push_back("router_mi");
    if (type == RouterType::kLogitMf || type == RouterType::kWeightMfvi) names.push_back("mean_sigma2");
    if (type == RouterType::kLogitFc) names.push_back("trace_cov");
    if (type == RouterType::kVtsr) names.push_back("mean_temperature");
    return names;
}

McqaScores score_mcqa_set(EvalModel& em,
                          const data::McqaSet& set,
                          const model::RoutingContext& routing,
                          int samples,
                          int questions_per_batch) {
    model::Model& m = em.model();
    const model::ModelConfig& mc = m.config();
    const int V = mc.vocab_size, L = em.num_moe_layers();
    const int n = static_cast<int>(set.questions.size());
    BMOE_REQUIRE(n > 0, "MCQA set '", set.name, "' holds no questions: an empty evaluation set; pass --questions N (N >= 1)");
    BMOE_REQUIRE(V > 'D', "model.vocab_size ", V, " has no letter tokens 'A'..'D': MCQA needs the byte tokenizer");
    McqaScores out;
    out.name = set.name;
    out.ood = set.ood;
    out.score_names = router_score_names(mc.router.type, samples);
    if (L == 0) out.score_names.clear();  // a model without MoE layers has no router
    std::vector<Score> scores;
    for (const std::string& s : out.score_names) scores.push_back(score_of(s));
    const int num_scores = static_cast<int>(scores.size());

    // Prompts as tokens, cut from the left where learned positions cannot hold them (the end, with
    // "Answer: ", is what matters).
    const data::ByteTokenizer tok;
    const size_t max_len = mc.position == model::PositionType::kLearned ? static_cast<size_t>(mc.max_seq_len)
                                                                        : static_cast<size_t>(1) << 30;
    std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(n));
    out.labels.resize(static_cast<size_t>(n));
    size_t longest = 1;
    for (int i = 0; i < n; ++i) {
        std::vector<int32_t> p = tok.encode(set.questions[i].prompt);
        BMOE_REQUIRE(!p.empty(), "MCQA set '", set.name, "' question ", i, " has an empty prompt");
        if (p.size() > max_len) {
            p.erase(p.begin(), p.end() - static_cast<long>(max_len));
            ++out.truncated;
        }
        longest = std::max(longest, p.size());
        prompts[i] = std::move(p);
        out.labels[i] = set.questions[i].answer;
    }
    // Batches of similar length (sorted, ties by index): fixed whatever the number of ranks.
    std::vector<int> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return prompts[a].size() < prompts[b].size(); });

    std::vector<double> probs(static_cast<size_t>(n) * 4, 0.0);
    std::vector<double> router(static_cast<size_t>(num_scores) * n, 0.0);
    const int64_t Tmax = static_cast<int64_t>(longest) + 16;  // > any batch's padded length
    for (int first = 0; first < n; first += questions_per_batch) {
        const int count = std::min(questions_per_batch, n - first);
        std::vector<std::span<const int32_t>> rows;
        int T = 1;
        for (int j = 0; j < count; ++j) {
            const std::vector<int32_t>& p = prompts[order[first + j]];
            rows.emplace_back(p.data(), p.size());
            T = std::max(T, static_cast<int>(p.size()));
        }
        // Round the padded length up (within what the positions allow) so that consecutive batches of
        // sorted prompts share one shape and the model keeps its activation buffers.
        T = static_cast<int>(std::min<size_t>((static_cast<size_t>(T) + 15) / 16 * 16, std::max<size_t>(max_len, T)));
        // Token ids: question slot `first + row` owns [ (first) * Tmax + row * T, ... ), unique over batches.
        const LocalRows local = em.forward(rows, T, static_cast<int64_t>(first) * Tmax, routing);
        const std::vector<float> logits = m.logits_to_host();
        for (int l = 0; l < L; ++l)
            BMOE_ASSERT(m.moe_block(l).router().outputs().S == samples, "router drew ",
                        m.moe_block(l).router().outputs().S, " samples, expected ", samples);
        for (int b = 0; b < local.count; ++b) {
            const int g = local.first + b;
            if (g >= count) continue;  // dummy row
            const int q = order[first + g];
            const int len = static_cast<int>(prompts[q].size());
            const float* lg = logits.data() + (static_cast<size_t>(b) * T + (len - 1)) * V;
            double mx = -INFINITY;
            for (int c = 0; c < 4; ++c) mx = std::max(mx, static_cast<double>(lg['A' + c]));
            double z = 0.0;
            double e4[4];
            for (int c = 0; c < 4; ++c) z += e4[c] = std::exp(lg['A' + c] - mx);
            for (int c = 0; c < 4; ++c) probs[static_cast<size_t>(q) * 4 + c] = e4[c] / z;
            for (int s = 0; s < num_scores; ++s) {
                double sum = 0.0;
                for (int l = 0; l < L; ++l) {
                    const model::RouterOutputs& o = m.moe_block(l).router().outputs();
                    for (int t = 0; t < len; ++t) sum += token_score(scores[s], o, static_cast<size_t>(b) * T + t);
                }
                router[static_cast<size_t>(s) * n + q] = sum / (static_cast<double>(L) * len);
            }
        }
    }
    all_reduce_sum(em.world(), probs);
    all_reduce_sum(em.world(), router);
    out.probs.assign(static_cast<size_t>(n), std::vector<double>(4));
    for (int i = 0; i < n; ++i)
        for (int c = 0; c < 4; ++c) out.probs[i][c] = probs[static_cast<size_t>(i) * 4 + c];
    out.router_scores.assign(static_cast<size_t>(num_scores), std::vector<double>(static_cast<size_t>(n)));
    for (int s = 0; s < num_scores; ++s)
        for (int i = 0; i < n; ++i) out.router_scores[s][i] = router[static_cast<size_t>(s) * n + i];
    return out;
}

}  // namespace bmoe::eval
