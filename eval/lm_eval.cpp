#include "eval/lm_eval.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "data/data_loader.h"
#include "data/token_file.h"
#include "parallel/check.h"

namespace bmoe::eval {

namespace fs = std::filesystem;

namespace {

// Every domain of `data` with at least one window, named "<prefix>/<domain>".
void add_domains(std::vector<LmDomain>& out,
                 const data::TokenData& data,
                 const std::string& prefix,
                 const std::string& source,
                 int batch_rows,
                 int T,
                 size_t max_windows) {
    const std::vector<uint64_t> docs = data.documents_per_domain();
    for (int d = 0; d < data.num_domains(); ++d) {
        if (docs[d] == 0) continue;
        const data::TokenData one = data::select_domain(data, d);
        if (one.num_tokens() < static_cast<uint64_t>(T) + 1) continue;
        LmDomain e;
        e.eval.name = concat(prefix, "/", data.domains[d].name);
        e.eval.is_ood = data.domains[d].is_ood || data.split == "ood";
        e.eval.batches = data::EvalLoader(one, batch_rows, T, max_windows).all_batches();
        e.source = source;
        out.push_back(std::move(e));
    }
}

}  // namespace

std::vector<LmDomain> lm_domains_from_path(const std::string& path, int batch_rows, int T, size_t max_windows) {
    std::error_code ec;
    BMOE_REQUIRE(fs::exists(path, ec), "--data '", path,
                 "' does not exist: pass a token file (.bin) or a directory written by `bmoe data --out DIR`");
    const std::string prefix = fs::path(path).lexically_normal().filename().empty()
                                   ? fs::path(path).lexically_normal().parent_path().filename().string()
                                   : fs::path(path).lexically_normal().filename().string();
    std::vector<LmDomain> out;
    uint64_t tokens = 0;
    if (fs::is_directory(path, ec)) {
        bool any_file = false;
        for (const char* name : {"val.bin", "ood.bin"}) {
            const fs::path file = fs::path(path) / name;
            if (!fs::exists(file, ec)) continue;
            any_file = true;
            const data::TokenData d = data::read_token_file(file.string());
            tokens += d.num_tokens();
            add_domains(out, d, prefix, file.string(), batch_rows, T, max_windows);
        }
        BMOE_REQUIRE(any_file, "--data directory '", path,
                     "' has no val.bin or ood.bin to evaluate: write them with `bmoe data --out ", path,
                     "` or pass a token file");
    } else {
        const data::TokenData d = data::read_token_file(path);
        tokens = d.num_tokens();
        add_domains(out, d, fs::path(path).stem().string(), path, batch_rows, T, max_windows);
    }
    BMOE_REQUIRE(tokens > 0, "--data '", path, "' holds no tokens: an empty evaluation set; write tokens with ",
                 "`bmoe data --out DIR` or drop this --data");
    BMOE_REQUIRE(!out.empty(), "--data '", path, "' holds no domain with a full window of ", T + 1,
                 " tokens (data.seq_len + 1 of the checkpoint): an empty evaluation set; pass more text or drop this "
                 "--data");
    return out;
}

std::vector<LmDomainResult> evaluate_lm(EvalModel& em,
                                        const std::vector<LmDomain>& domains,
                                        const model::RoutingContext& routing,
                                        int rows_per_batch) {
    model::Model& m = em.model();
    const int V = m.config().vocab_size, E = m.config().num_experts, L = em.num_moe_layers();
    std::vector<LmDomainResult> results;
    for (size_t di = 0; di < domains.size(); ++di) {
        const LmDomain& dom = domains[di];
        std::vector<std::span<const int32_t>> rows, targets;
        int T = 0;
        for (const data::Batch& b : dom.eval.batches) {
            T = b.T;
            for (int r = 0; r < b.B; ++r) {
                rows.emplace_back(b.tokens.data() + static_cast<size_t>(r) * b.T, b.T);
                targets.emplace_back(b.targets.data() + static_cast<size_t>(r) * b.T, b.T);
            }
        }
        LmDomainResult res;
        res.name = dom.eval.name;
        res.source = dom.source;
        res.ood = dom.eval.is_ood;
        res.has_unigram = dom.has_unigram;
        res.unigram_loss = dom.eval.unigram_loss;
        if (rows.empty()) continue;
        const int R = static_cast<int>(rows.size());
        std::vector<double> row_loss(static_cast<size_t>(R), 0.0), row_count(static_cast<size_t>(R), 0.0);
        std::vector<int64_t> copies(static_cast<size_t>(L) * E, 0);
        model::RoutingContext ctx = routing;
        ctx.step = routing.step + static_cast<int64_t>(di);
        for (int first = 0; first < R; first += rows_per_batch) {
            const int n = std::min(rows_per_batch, R - first);
            const std::vector<std::span<const int32_t>> batch(rows.begin() + first, rows.begin() + first + n);
            const LocalRows local = em.forward(batch, T, static_cast<int64_t>(first) * T, ctx);
            const std::vector<float> logits = m.logits_to_host();
            for (int b = 0; b < local.count; ++b) {
                const int g = local.first + b;
                if (g >= n) continue;
                const std::span<const int32_t> tgt = targets[first + g];
                double sum = 0.0, count = 0.0;
                for (int t = 0; t < T; ++t) {
                    if (tgt[t] < 0) continue;
                    const float* lg = logits.data() + (static_cast<size_t>(b) * T + t) * V;
                    double mx = lg[0];
                    for (int v = 1; v < V; ++v) mx = std::max(mx, static_cast<double>(lg[v]));
                    double s = 0.0;
                    for (int v = 0; v < V; ++v) s += std::exp(lg[v] - mx);
                    sum += mx + std::log(s) - lg[tgt[t]];
                    count += 1.0;
                }
                row_loss[first + g] = sum;
                row_count[first + g] = count;
                for (int l = 0; l < L; ++l) {
                    const model::RouterOutputs& o = m.moe_block(l).router().outputs();
                    const int K = o.K;
                    for (int t = 0; t < T; ++t)
                        for (int k = 0; k < K; ++k) {
                            const int32_t e = o.topk_idx[(static_cast<size_t>(b) * T + t) * K + k];
                            if (e >= 0 && e < E) ++copies[static_cast<size_t>(l) * E + e];
                        }
                }
            }
        }
        all_reduce_sum(em.world(), row_loss);
        all_reduce_sum(em.world(), row_count);
        all_reduce_sum(em.world(), copies);
        double loss = 0.0, count = 0.0;
        for (int r = 0; r < R; ++r) {
            loss += row_loss[r];
            count += row_count[r];
        }
        res.tokens = static_cast<int64_t>(count);
        res.loss = count > 0 ? loss / count : 0.0;
        res.perplexity = std::exp(res.loss);
        for (int l = 0; l < L; ++l) {
            int64_t total = 0;
            for (int e = 0; e < E; ++e) total += copies[static_cast<size_t>(l) * E + e];
            std::vector<double> share(static_cast<size_t>(E), 0.0);
            for (int e = 0; e < E; ++e)
                share[e] = total > 0 ? static_cast<double>(copies[static_cast<size_t>(l) * E + e]) / total : 0.0;
            res.expert_share.push_back(std::move(share));
        }
        results.push_back(std::move(res));
    }
    return results;
}

}  // namespace bmoe::eval
