#include "eval/evaluator.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <ostream>

#include "data/mcqa.h"
#include "eval/eval_model.h"
#include "eval/eval_report.h"
#include "eval/lm_eval.h"
#include "eval/mcqa_scoring.h"
#include "eval/stability.h"
#include "parallel/check.h"
#include "trainer/datasets.h"

namespace bmoe::eval {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
    return std::chrono::duration<double>(Clock::now() - start).count();
}

// Noise streams of the sections (RoutingContext.step): no two sections share routing noise.
constexpr int64_t kLmStep = 1'000'000, kMcqaStep = 2'000'000, kStabilityStep = 3'000'000;

std::string default_out_dir(const std::string& checkpoint) {
    const fs::path p(checkpoint);
    return (p.parent_path() / concat(p.stem().string(), "_eval")).string();
}

// The text corpus's splits as the training run built them (trainer/datasets.cpp), so cloze questions
// come from text the checkpoint did not train on.
data::TextCorpusOptions text_corpus_of(const trainer::RunConfig& c) {
    data::TextCorpusOptions o;
    o.seed = c.train.seed;
    o.train_tokens = c.data.train_tokens;
    o.val_tokens = std::clamp<uint64_t>(c.data.train_tokens / 10, 20'000, 100'000);
    o.ood_tokens = o.val_tokens;
    return o;
}

}  // namespace

void validate_options(const EvalOptions& o) {
    BMOE_REQUIRE(!o.checkpoint.empty(), "no checkpoint given: pass --ckpt FILE (a .h5 file a training run wrote)");
    BMOE_REQUIRE(o.mode == "sample" || o.mode == "mean", "--mode '", o.mode,
                 "' is unknown: use sample (S routing samples averaged in the router) or mean (l = mu)");
    BMOE_REQUIRE(o.samples >= 0, "--samples ", o.samples, " must be >= 1 (or 0 = the router's eval_samples)");
    BMOE_REQUIRE(o.questions >= 1, "--questions ", o.questions,
                 " leaves the MCQA sets empty (an empty evaluation set): pass --questions N with N >= 1 (default 5000)");
    BMOE_REQUIRE(o.bins >= 1, "--bins ", o.bins, " must be >= 1 (ECE bins; default 15)");
    BMOE_REQUIRE(o.bootstrap >= 2, "--bootstrap ", o.bootstrap, " must be >= 2 (default 200)");
    BMOE_REQUIRE(o.batch_questions >= 1, "--batch ", o.batch_questions, " must be >= 1 (prompts per forward)");
    BMOE_REQUIRE(o.stability_sequences >= 0, "--stability-seqs ", o.stability_sequences,
                 " must be >= 0 (0 skips the stability sweep)");
    BMOE_REQUIRE(o.cloze == "auto" || o.cloze == "required" || o.cloze == "off", "--cloze '", o.cloze,
                 "' is unknown: use auto (skip with a warning when the text corpus is missing), required or off");
    BMOE_REQUIRE(o.ep >= 0, "--ep ", o.ep, " must be >= 0 (0 = all ranks)");
    for (size_t i = 0; i < o.noise_scales.size(); ++i) {
        BMOE_REQUIRE(o.noise_scales[i] > 0.0 && std::isfinite(o.noise_scales[i]), "--noise-scales: ",
                     o.noise_scales[i], " is not a positive noise scale (x RMS of the hidden state), e.g. 0.01,0.1,0.5");
        BMOE_REQUIRE(i == 0 || o.noise_scales[i] > o.noise_scales[i - 1],
                     "--noise-scales must be strictly increasing (got ", o.noise_scales[i - 1], " then ",
                     o.noise_scales[i], ")");
    }
}

EvalReport run_evaluation(const EvalOptions& opts, parallel::Communicator* world, std::ostream& log_in) {
    validate_options(opts);
    const bool root = world == nullptr || world->rank() == 0;
    std::ostream null_log(nullptr);
    std::ostream& log = root ? log_in : null_log;
    EvalReport report;
    auto warn = [&](const std::string& w) {
        report.warnings.push_back(w);
        log << "warning: " << w << std::endl;
    };
    const auto start = Clock::now();

    const CheckpointSource src = read_checkpoint_source(opts.checkpoint);
    const trainer::RunConfig& cfg = src.config;
    const model::RouterConfig& rc = cfg.model.router;
    const uint64_t seed = opts.has_seed ? opts.seed : cfg.train.seed;
    const model::RouterMode mode = opts.mode == "mean" ? model::RouterMode::kMean : model::RouterMode::kSample;
    using model::RouterType;
    if (opts.samples > 1) {
        if (rc.type == RouterType::kTopK)
            warn(concat("router topk is deterministic: --samples ", opts.samples, " ignored, evaluating with S = 1"));
        else if (rc.type == RouterType::kTempSampling || rc.type == RouterType::kVtsr)
            warn(concat("router ", model::to_string(rc.type), " draws its randomness in the selection, not the "
                        "probabilities: --samples ", opts.samples, " ignored, S = 1"));
        else if (rc.type == RouterType::kEnsemble) {
            if (opts.samples != rc.ensemble_size)
                warn(concat("router ensemble averages its ", rc.ensemble_size, " members: --samples ", opts.samples,
                            " ignored, S = ", rc.ensemble_size));
        } else if (mode == model::RouterMode::kMean)
            warn(concat("--mode mean routes with l = mu: --samples ", opts.samples, " ignored, S = 1"));
    }
    const int S = routing_samples(rc, mode, opts.samples);
    const std::string out_dir = opts.out_dir.empty() ? default_out_dir(src.path) : opts.out_dir;

    EvalResults results;
    results.num_experts = cfg.model.num_experts;

    // ---- evaluation data first (bad --data fails before the model loads) ----
    std::vector<LmDomain> lm_domains;
    std::vector<std::vector<int32_t>> stability_rows;
    const int T = cfg.data.seq_len;
    const size_t max_windows = static_cast<size_t>(std::max(1, cfg.train.eval_batches / 2)) * cfg.data.batch_size;
    if (opts.lm) {
        try {
            const trainer::Datasets ds = trainer::load_datasets(cfg.data, cfg.model.vocab_size, cfg.train.seed,
                                                                cfg.train.eval_batches, 0, 1, null_log);
            for (const trainer::DomainEval& d : ds.domain_evals)
                lm_domains.push_back({d, concat("checkpoint corpus (", cfg.data.dataset, ")"), true});
            for (const data::Batch& b : ds.val_batches)
                for (int r = 0; r < b.B && static_cast<int>(stability_rows.size()) < opts.stability_sequences; ++r)
                    stability_rows.emplace_back(b.tokens.begin() + static_cast<long>(r) * b.T,
                                                b.tokens.begin() + static_cast<long>(r + 1) * b.T);
        } catch (const Error& e) {
            results.skipped["lm (checkpoint corpus)"] = e.what();
            warn(concat("LM evaluation on the checkpoint's corpus '", cfg.data.dataset, "' skipped: ", e.what(),
                        " (pass its token files with --data)"));
        }
    } else {
        results.skipped["lm (checkpoint corpus)"] = "--no-lm";
    }
    for (const std::string& path : opts.data) {
        std::vector<LmDomain> more = lm_domains_from_path(path, cfg.data.batch_size, T, max_windows);
        if (stability_rows.empty())
            for (const LmDomain& d : more)
                for (const data::Batch& b : d.eval.batches)
                    for (int r = 0; r < b.B && static_cast<int>(stability_rows.size()) < opts.stability_sequences; ++r)
                        stability_rows.emplace_back(b.tokens.begin() + static_cast<long>(r) * b.T,
                                                    b.tokens.begin() + static_cast<long>(r + 1) * b.T);
        for (LmDomain& d : more) lm_domains.push_back(std::move(d));
    }
    EvalModel em(src, opts.backend, opts.ep, opts.threads, world);
    const size_t num_tensors = em.model().layout().params().size();
    log << "eval: " << src.path << " (step " << src.step << ") | router " << model::to_string(rc.type) << " | mode "
        << opts.mode << ", S " << S << " | world " << em.world_size() << " = dp " << em.grid().dp_size() << " x ep "
        << em.grid().ep_size() << " | backend " << opts.backend << "\n"
        << em.config().model.describe() << std::endl;
    if (em.trained_capacity_factor() > 0.0f)
        warn(concat("the checkpoint trained with model.capacity_factor ", em.trained_capacity_factor(),
                    "; evaluation routes dropless (no token is dropped), so results do not depend on the batching"));
    if (em.tensors_loaded() < static_cast<int>(num_tensors))
        warn(concat("checkpoint ", src.path, " holds ", em.tensors_loaded(), " of the model's ", num_tensors,
                    " tensors; the others keep their initialisation (bmoe ckpt inspect ", src.path, ")"));

    model::RoutingContext routing;
    routing.seed = seed;
    routing.training = false;
    routing.mode = mode;
    routing.samples = S;

    results.config = {{"checkpoint", src.path},
                      {"step", src.step},
                      {"router", model::to_string(rc.type)},
                      {"mode", opts.mode},
                      {"samples", S},
                      {"requested_samples", opts.samples},
                      {"num_bins", opts.bins},
                      {"bootstrap", opts.bootstrap},
                      {"seed", seed},
                      {"questions", opts.questions},
                      {"noise_scales", opts.noise_scales},
                      {"backend", opts.backend},
                      {"bmoe_version", BMOE_VERSION}};

    // ---- language modelling: the checkpoint's corpus and every --data ----
    if (!lm_domains.empty()) {
        const auto t0 = Clock::now();
        model::RoutingContext ctx = routing;
        ctx.step = kLmStep;
        results.lm = evaluate_lm(em, lm_domains, ctx, cfg.data.batch_size);
        int64_t tokens = 0;
        for (const LmDomainResult& d : results.lm) tokens += d.tokens;
        log << "lm: " << results.lm.size() << " domains, " << tokens << " tokens ("
            << concat(static_cast<int>(seconds_since(t0) * 10) / 10.0) << " s)" << std::endl;
    }

    // ---- MCQA: question sets ----
    std::vector<data::McqaSet> sets;
    sets.push_back(data::generate_synthetic_mcqa(false, opts.questions, seed));
    sets.push_back(data::generate_synthetic_mcqa(true, opts.questions, seed));
    if (opts.cloze != "off") {
        try {
            const data::TextCorpusOptions corpus = text_corpus_of(cfg);
            data::McqaSet id = data::generate_text_cloze(false, opts.questions, seed, corpus);
            data::McqaSet ood = data::generate_text_cloze(true, opts.questions, seed, corpus);
            sets.push_back(std::move(id));
            sets.push_back(std::move(ood));
        } catch (const Error& e) {
            BMOE_REQUIRE(opts.cloze != "required", "--cloze=required but the cloze sets cannot be built: ", e.what());
            results.skipped["cloze MCQA"] = e.what();
            warn(concat("cloze MCQA skipped: ", e.what(), " (--cloze=required makes this an error)"));
        }
    } else {
        results.skipped["cloze MCQA"] = "--cloze=off";
    }
    std::vector<McqaScores> scored;
    for (size_t i = 0; i < sets.size(); ++i) {
        const auto t0 = Clock::now();
        model::RoutingContext ctx = routing;
        ctx.step = kMcqaStep + static_cast<int64_t>(i);
        scored.push_back(score_mcqa_set(em, sets[i], ctx, S, opts.batch_questions));
        if (scored.back().truncated > 0)
            warn(concat(sets[i].name, ": ", scored.back().truncated, " prompts longer than model.max_seq_len (",
                        cfg.model.max_seq_len, ") were cut from the left"));
        log << "mcqa " << sets[i].name << ": " << sets[i].questions.size() << " questions ("
            << concat(static_cast<int>(seconds_since(t0) * 10) / 10.0) << " s)" << std::endl;
    }
    for (const McqaScores& s : scored) {
        results.mcqa.push_back(calibrate_set(s, opts.bins, opts.bootstrap, seed));
        if (!results.mcqa.back().above_chance)  // printed loudly with the summary
            report.warnings.push_back(concat(s.name, " accuracy is not above chance"));
    }
    auto find_set = [&](const std::string& name) -> const McqaScores* {
        for (const McqaScores& s : scored)
            if (s.name == name) return &s;
        return nullptr;
    };
    for (const auto& [id, ood] : {std::pair<std::string, std::string>{"synthetic-id", "synthetic-ood"},
                                  std::pair<std::string, std::string>{"cloze-id", "cloze-ood"}}) {
        const McqaScores *a = find_set(id), *b = find_set(ood);
        if (a != nullptr && b != nullptr) results.ood.push_back(detect_ood(*a, *b));
    }

    // ---- routing stability ----
    if (opts.stability_sequences == 0 || opts.noise_scales.empty()) {
        results.skipped["stability"] = "--stability-seqs 0 or no --noise-scales";
    } else if (stability_rows.empty()) {
        results.skipped["stability"] = "no validation sequences (the checkpoint's corpus is unavailable; pass --data)";
        warn("routing stability skipped: no validation sequences (the checkpoint's corpus is unavailable; pass --data)");
    } else if (em.num_moe_layers() == 0) {
        results.skipped["stability"] = "the model has no MoE layer";
    } else {
        const auto t0 = Clock::now();
        std::vector<std::span<const int32_t>> rows;
        for (const std::vector<int32_t>& r : stability_rows) rows.emplace_back(r.data(), r.size());
        model::RoutingContext ctx = routing;
        ctx.step = kStabilityStep;
        results.stability = routing_stability(em, rows, opts.noise_scales, ctx);
        log << "stability: " << rows.size() << " sequences x " << opts.noise_scales.size() << " noise scales ("
            << concat(static_cast<int>(seconds_since(t0) * 10) / 10.0) << " s)" << std::endl;
        if (results.stability->clean_jaccard != 1.0)
            warn(concat("routing stability: two clean passes with the same routing noise disagree (Jaccard ",
                        results.stability->clean_jaccard, "): the router's noise is not reproducible"));
    }

    // ---- outputs ----
    report.json = report_json(results);
    report.markdown = report_markdown(results);
    report.summary = report_summary(results);
    if (root && opts.write_files) {
        std::error_code ec;
        fs::create_directories(out_dir, ec);
        BMOE_REQUIRE(fs::is_directory(out_dir), "cannot create the output directory '", out_dir,
                     "': pass a writable --out DIR");
        const std::string json_path = (fs::path(out_dir) / "eval.json").string();
        const std::string md_path = (fs::path(out_dir) / "eval.md").string();
        {
            std::ofstream f(json_path);
            f << report.json.dump(2) << "\n";
            BMOE_REQUIRE(f.good(), "cannot write '", json_path, "': pass a writable --out DIR");
        }
        {
            std::ofstream f(md_path);
            f << report.markdown;
            BMOE_REQUIRE(f.good(), "cannot write '", md_path, "': pass a writable --out DIR");
        }
        report.out_dir = out_dir;
        report.files = {json_path, md_path};
        if (opts.plot) {
            const char* pngs[] = {"reliability.png", "roc.png", "stability.png", "expert_usage.png"};
            for (const char* p : pngs) fs::remove(fs::path(out_dir) / p, ec);  // no stale figures
            const std::string cmd = concat("/usr/bin/python3 '", BMOE_TOOLS_DIR, "/plot_eval.py' '", json_path, "' '",
                                           out_dir, "' >/dev/null 2>&1");
            if (std::system(cmd.c_str()) == 0) {
                for (const char* p : pngs)
                    if (fs::exists(fs::path(out_dir) / p)) report.files.push_back((fs::path(out_dir) / p).string());
            } else {
                warn("figures not drawn (tools/plot_eval.py needs /usr/bin/python3 with matplotlib: apt-get install "
                     "python3-matplotlib)");
            }
        }
    }
    log << "\n" << report.summary;
    if (!report.files.empty()) {
        log << "files     ";
        for (size_t i = 0; i < report.files.size(); ++i) log << (i ? " " : "") << report.files[i];
        log << "\n";
    }
    log << "evaluated in " << concat(static_cast<int>(seconds_since(start) * 10) / 10.0) << " s" << std::endl;
    return report;
}

}  // namespace bmoe::eval
