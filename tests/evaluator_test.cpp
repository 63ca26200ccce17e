// evaluator_test.cpp -- `bmoe eval` (eval/evaluator.h) on tiny checkpoints trained in-process.
//
// Built twice (tests/CMakeLists.txt): evaluator_test (GoogleTest main) and, with
// BMOE_EVALUATOR_MPI_TEST defined, evaluator_mpi_test (run under mpiexec -n 1 / 2).
//   - a topk checkpoint: eval.json holds every field of tests/data/eval_sample.json (+ config and
//     above_chance), every value is in range, the stability check passes (clean Jaccard 1), no router
//     MI at S = 1, --samples 8 is a warning and S = 1, the same flags give an identical JSON, the
//     plot script draws non-empty PNGs; bad input (missing checkpoint, --questions 0, an empty --data
//     directory) is a one-line error naming it;
//   - a logit_mf router fine-tuned on top of it: the mean_sigma2 score, and router_mi with S >= 2 only;
//   - MPI: the JSON numbers with W ranks (ep W, batches padded with dummy rows) equal one process's.
#include "eval/evaluator.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "checkpoints/checkpoint.h"
#include "parallel/check.h"
#include "trainer/trainer.h"

#ifdef BMOE_EVALUATOR_MPI_TEST
#include <mpi.h>

#include "parallel/mpi_comm.h"
#else
#include <sys/wait.h>
#endif

namespace bmoe::eval {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

[[maybe_unused]] std::string slurp(const fs::path& p) {
    std::ifstream f(p);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// A tiny model on the synthetic corpus (threads 1: ctest runs tests side by side on small machines).
trainer::RunConfig tiny_run(const fs::path& out_dir, int steps) {
    trainer::RunConfig c;
    c.model.d_model = 48;
    c.model.num_layers = 2;
    c.model.num_heads = 4;
    c.model.num_kv_heads = 2;
    c.model.num_experts = 4;
    c.model.top_k = 2;
    c.model.expert_hidden = 64;
    c.data.batch_size = 8;
    c.data.seq_len = 64;
    c.data.train_tokens = 100'000;
    c.optim.warmup_steps = 5;
    c.train.steps = steps;
    c.train.eval_every = 0;
    c.train.eval_batches = 2;
    c.train.log_every = 1000;
    c.train.plot = false;
    c.train.threads = 1;
    c.train.out_dir = out_dir.string();
    return c;
}

std::string train(const trainer::RunConfig& c) {
    std::ostringstream log;
    trainer::Trainer(c, log).run();
    return checkpoints::checkpoint_path(c.checkpoint_dir(), c.train.steps);
}

// Small evaluation settings shared by the tests.
EvalOptions small_eval(const std::string& ckpt, const fs::path& out) {
    EvalOptions o;
    o.checkpoint = ckpt;
    o.out_dir = out.string();
    o.questions = 200;
    o.noise_scales = {0.05, 0.2, 0.5};
    o.threads = 1;
    o.bootstrap = 50;
    o.cloze = "off";
    o.plot = false;
    return o;
}

#ifndef BMOE_EVALUATOR_MPI_TEST

// A scratch directory per test (ctest runs tests in parallel processes), removed at the end.
class EvaluatorTest : public ::testing::Test {
  protected:
    void SetUp() override {
        const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
        dir_ = fs::temp_directory_path() / concat("bmoe_evaluator_test_", info->name(), "_", ::getpid());
        fs::remove_all(dir_);
        fs::create_directories(dir_);
    }
    void TearDown() override {
        if (!HasFailure()) fs::remove_all(dir_);
    }
    fs::path dir_;
};

// Every key of `sample` (recursively; arrays of objects: the first element) is in `got`.
void expect_has_schema(const json& sample, const json& got, const std::string& path) {
    if (sample.is_object()) {
        ASSERT_TRUE(got.is_object()) << path << " is not an object";
        for (const auto& [key, value] : sample.items()) {
            if (path == "/config" && key == "note") continue;
            ASSERT_TRUE(got.contains(key)) << path << "/" << key << " is missing";
            expect_has_schema(value, got[key], path + "/" + key);
        }
    } else if (sample.is_array()) {
        ASSERT_TRUE(got.is_array()) << path << " is not an array";
        if (!sample.empty() && sample[0].is_object()) {
            ASSERT_FALSE(got.empty()) << path << " is empty";
            for (const json& element : got) expect_has_schema(sample[0], element, path + "[]");
        }
    } else if (sample.is_number()) {
        EXPECT_TRUE(got.is_number()) << path << " is not a number: " << got;
    }
}

void expect_in(double v, double lo, double hi, const std::string& what) {
    EXPECT_TRUE(std::isfinite(v) && v >= lo && v <= hi) << what << " = " << v << " not in [" << lo << ", " << hi << "]";
}

// Ranges of every number a report holds.
void expect_values_in_range(const json& j) {
    for (const json& d : j["lm"]["domains"]) {
        expect_in(d["loss"].get<double>(), 0.0, 20.0, "lm loss");
        EXPECT_NEAR(d["perplexity"].get<double>(), std::exp(d["loss"].get<double>()),
                    1e-9 * d["perplexity"].get<double>());
        EXPECT_GT(d["tokens"].get<int64_t>(), 0);
    }
    for (const json& s : j["mcqa"]["sets"]) {
        const std::string name = s["name"];
        for (const char* key : {"accuracy", "ece", "ece_se", "ece_floor", "mce"})
            expect_in(s[key], 0.0, 1.0, name + " " + key);
        expect_in(s["brier"], 0.0, 2.0, name + " brier");
        expect_in(s["nll"], 0.0, 30.0, name + " nll");
        EXPECT_EQ(s["above_chance"].get<bool>(), s["accuracy"].get<double>() > s["chance_threshold"].get<double>());
        const json& rel = s["reliability"];
        int64_t total = 0;
        for (size_t b = 0; b < rel["count"].size(); ++b) {
            total += rel["count"][b].get<int64_t>();
            expect_in(rel["accuracy"][b], 0.0, 1.0, name + " bin accuracy");
            expect_in(rel["confidence"][b], 0.0, 1.0, name + " bin confidence");
        }
        EXPECT_EQ(total, s["n"].get<int64_t>()) << name;
    }
    for (const json& p : j["ood"]["pairs"])
        for (const json& s : p["scores"]) {
            const std::string name = s["name"];
            for (const char* key : {"auroc", "aupr", "fpr95"}) expect_in(s[key], 0.0, 1.0, name + " " + key);
            ASSERT_EQ(s["roc"]["fpr"].size(), s["roc"]["tpr"].size());
            for (size_t i = 0; i < s["roc"]["fpr"].size(); ++i) {
                expect_in(s["roc"]["fpr"][i], 0.0, 1.0, name + " roc fpr");
                expect_in(s["roc"]["tpr"][i], 0.0, 1.0, name + " roc tpr");
            }
        }
    const json& st = j["stability"];
    EXPECT_EQ(st["clean_jaccard"].get<double>(), 1.0) << "clean and re-run clean pass must route identically";
    for (const json& v : st["mean_jaccard"]) expect_in(v, 0.0, 1.0, "mean Jaccard");
    for (const json& layer : st["per_layer"]) {
        ASSERT_EQ(layer.size(), st["noise_scales"].size());
        for (const json& v : layer) expect_in(v, 0.0, 1.0, "layer Jaccard");
    }
    if (!st["scale_at_0p7"].is_null())
        expect_in(st["scale_at_0p7"], st["noise_scales"].front(), st["noise_scales"].back(), "scale_at_0p7");
    for (const json& layer : j["experts"]["layers"])
        for (const json& row : layer["usage"]) {
            double sum = 0.0;
            for (const json& v : row) sum += v.get<double>();
            EXPECT_NEAR(sum, 1.0, 1e-9);
        }
}

std::vector<std::string> score_names(const json& j) {
    std::vector<std::string> names;
    for (const json& s : j["ood"]["pairs"][0]["scores"]) names.push_back(s["name"]);
    return names;
}

bool has(const std::vector<std::string>& v, const std::string& x) {
    return std::find(v.begin(), v.end(), x) != v.end();
}

bool matplotlib_available() { return std::system("/usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1") == 0; }

TEST_F(EvaluatorTest, TopkReportFollowsTheSchemaAndIsDeterministic) {
    const std::string ckpt = train(tiny_run(dir_ / "run", 40));
    EvalOptions o = small_eval(ckpt, dir_ / "eval1");
    o.samples = 8;  // topk is deterministic: a warning and S = 1
    o.cloze = "auto";
    o.plot = true;
    std::ostringstream log;
    const EvalReport r = run_evaluation(o, nullptr, log);
    const json j = json::parse(slurp(dir_ / "eval1" / "eval.json"));
    EXPECT_EQ(j, r.json);

    const json sample = json::parse(slurp(fs::path(BMOE_SOURCE_DIR) / "tests" / "data" / "eval_sample.json"));
    expect_has_schema(sample, j, "");
    for (const char* key : {"checkpoint", "router", "mode", "samples", "num_bins", "seed", "questions"})
        EXPECT_TRUE(j["config"].contains(key)) << key;
    EXPECT_EQ(j["config"]["router"], "topk");
    EXPECT_EQ(j["config"]["samples"], 1);
    EXPECT_EQ(j["config"]["num_bins"], 15);
    ASSERT_FALSE(r.warnings.empty());
    EXPECT_NE(r.warnings.front().find("--samples 8 ignored"), std::string::npos) << r.warnings.front();
    EXPECT_NE(log.str().find("warning: router topk is deterministic"), std::string::npos) << log.str();
    expect_values_in_range(j);

    // sections: 8 synthetic domains (5 ID + 3 OoD), the two synthetic sets (+ cloze when installed)
    EXPECT_EQ(j["lm"]["domains"].size(), 8u);
    ASSERT_GE(j["mcqa"]["sets"].size(), 2u);
    EXPECT_EQ(j["mcqa"]["sets"][0]["name"], "synthetic-id");
    EXPECT_EQ(j["mcqa"]["sets"][0]["n"], 200);
    for (const json& s : j["mcqa"]["sets"]) EXPECT_TRUE(s.contains("above_chance"));
    if (j["mcqa"]["sets"].size() == 4u) {
        EXPECT_EQ(j["ood"]["pairs"].size(), 2u);
        EXPECT_EQ(j["ood"]["pairs"][1]["id_set"], "cloze-id");
    } else {
        EXPECT_TRUE(j["skipped"].contains("cloze MCQA")) << "cloze skipped without saying so";
    }
    const std::vector<std::string> names = score_names(j);
    EXPECT_EQ(names, (std::vector<std::string>{"predictive_entropy", "one_minus_max_prob", "gate_entropy"}))
        << "topk: no router MI at S = 1, no variance score";
    EXPECT_EQ(j["stability"]["noise_scales"].size(), 3u);
    EXPECT_EQ(j["stability"]["per_layer"].size(), 2u);
    EXPECT_EQ(j["experts"]["layers"].size(), 2u);
    EXPECT_EQ(j["experts"]["num_experts"], 4);
    // the summary names the sets, the scores and the stability crossing
    EXPECT_NE(r.summary.find("synthetic-id"), std::string::npos) << r.summary;
    EXPECT_NE(r.summary.find("AUROC"), std::string::npos) << r.summary;
    EXPECT_NE(r.summary.find("Stability"), std::string::npos) << r.summary;
    for (const json& s : j["mcqa"]["sets"]) {
        if (!s["above_chance"].get<bool>()) {
            EXPECT_NE(r.summary.find("WARNING: " + s["name"].get<std::string>()), std::string::npos) << r.summary;
        }
    }
    EXPECT_NE(slurp(dir_ / "eval1" / "eval.md").find("## MCQA calibration"), std::string::npos);

    // figures
    if (matplotlib_available()) {
        for (const char* png : {"reliability.png", "roc.png", "stability.png", "expert_usage.png"}) {
            const fs::path p = dir_ / "eval1" / png;
            ASSERT_TRUE(fs::exists(p)) << png << " not drawn\n" << log.str();
            EXPECT_GT(fs::file_size(p), 1024u) << png;
        }
    } else if (std::getenv("BMOE_REQUIRE_TORCH") != nullptr) {
        FAIL() << "/usr/bin/python3 cannot import matplotlib (BMOE_REQUIRE_TORCH is set)";
    }

    // same checkpoint + flags -> the identical file
    o.out_dir = (dir_ / "eval2").string();
    std::ostringstream log2;
    run_evaluation(o, nullptr, log2);
    EXPECT_EQ(slurp(dir_ / "eval1" / "eval.json"), slurp(dir_ / "eval2" / "eval.json"));

    // an empty --data directory: a clear error naming it, before the model is built
    fs::create_directories(dir_ / "empty");
    EvalOptions bad = small_eval(ckpt, dir_ / "eval3");
    bad.data = {(dir_ / "empty").string()};
    try {
        std::ostringstream l;
        run_evaluation(bad, nullptr, l);
        ADD_FAILURE() << "an empty --data directory was accepted";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find((dir_ / "empty").string()), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("bmoe data"), std::string::npos) << e.what();
    }
}

TEST_F(EvaluatorTest, LogitMfReportsSigmaAndMutualInformationOnlyWithSamples) {
    const std::string parent = train(tiny_run(dir_ / "base", 20));
    trainer::RunConfig requested = tiny_run(dir_ / "logit_mf", 6);
    requested.model.router.type = model::RouterType::kLogitMf;
    const std::string ckpt = train(trainer::finetune_router_config(requested, parent));

    EvalOptions o = small_eval(ckpt, dir_ / "sample");
    o.samples = 4;
    o.questions = 100;
    std::ostringstream log;
    const json s = run_evaluation(o, nullptr, log).json;
    EXPECT_EQ(s["config"]["router"], "logit_mf");
    EXPECT_EQ(s["config"]["samples"], 4);
    std::vector<std::string> names = score_names(s);
    EXPECT_TRUE(has(names, "mean_sigma2")) << log.str();
    EXPECT_TRUE(has(names, "router_mi")) << "S = 4 >= 2";
    EXPECT_TRUE(has(names, "gate_entropy"));
    EXPECT_FALSE(has(names, "trace_cov"));
    expect_values_in_range(s);

    o.mode = "mean";  // l = mu: S = 1, no MI, but sigma is still the router's own uncertainty
    o.out_dir = (dir_ / "mean").string();
    const json m = run_evaluation(o, nullptr, log).json;
    EXPECT_EQ(m["config"]["samples"], 1);
    EXPECT_EQ(m["config"]["mode"], "mean");
    names = score_names(m);
    EXPECT_TRUE(has(names, "mean_sigma2"));
    EXPECT_FALSE(has(names, "router_mi")) << "router MI needs S >= 2";
    expect_values_in_range(m);
}

TEST_F(EvaluatorTest, BadOptionsAreClearErrors) {
    EvalOptions o = small_eval((dir_ / "no_such_checkpoint.h5").string(), dir_ / "out");
    try {
        std::ostringstream log;
        run_evaluation(o, nullptr, log);
        ADD_FAILURE() << "a missing checkpoint was accepted";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find((dir_ / "no_such_checkpoint.h5").string()), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("does not exist"), std::string::npos) << e.what();
    }
    o.questions = 0;
    try {
        std::ostringstream log;
        run_evaluation(o, nullptr, log);
        ADD_FAILURE() << "--questions 0 was accepted";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("--questions 0"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("empty evaluation set"), std::string::npos) << e.what();
    }
    o.questions = 10;
    o.mode = "median";
    EXPECT_THROW(validate_options(o), Error);
    o.mode = "mean";
    o.noise_scales = {0.1, 0.05};
    EXPECT_THROW(validate_options(o), Error);
    o.noise_scales = {0.0, 0.1};
    EXPECT_THROW(validate_options(o), Error);
    o.noise_scales = {0.1};
    o.cloze = "maybe";
    EXPECT_THROW(validate_options(o), Error);
}

// The binary: a missing checkpoint is ONE stderr line naming it, exit status 1.
TEST_F(EvaluatorTest, CommandLineErrorIsOneLine) {
    const fs::path err = dir_ / "err", out = dir_ / "out";
    const std::string cmd = concat("'", BMOE_BINARY, "' eval --ckpt '", (dir_ / "missing.h5").string(), "' >'",
                                   out.string(), "' 2>'", err.string(), "'");
    const int status = std::system(cmd.c_str());
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 1);
    const std::string e = slurp(err);
    EXPECT_EQ(std::count(e.begin(), e.end(), '\n'), 1) << e;
    EXPECT_NE(e.find("bmoe eval: error: checkpoint '" + (dir_ / "missing.h5").string() + "' does not exist"),
              std::string::npos)
        << e;
}

#else  // BMOE_EVALUATOR_MPI_TEST

// Every number of `got` within 1e-5 (relative above 1) of `ref`; strings and booleans equal.
void expect_same_numbers(const json& ref, const json& got, const std::string& path, double& max_diff) {
    ASSERT_EQ(ref.type(), got.type()) << path;
    if (ref.is_object()) {
        ASSERT_EQ(ref.size(), got.size()) << path;
        for (const auto& [key, value] : ref.items()) {
            ASSERT_TRUE(got.contains(key)) << path << "/" << key;
            expect_same_numbers(value, got[key], path + "/" + key, max_diff);
        }
    } else if (ref.is_array()) {
        ASSERT_EQ(ref.size(), got.size()) << path;
        for (size_t i = 0; i < ref.size(); ++i)
            expect_same_numbers(ref[i], got[i], concat(path, "[", i, "]"), max_diff);
    } else if (ref.is_number()) {
        const double a = ref.get<double>(), b = got.get<double>();
        max_diff = std::max(max_diff, std::abs(a - b) / std::max(1.0, std::abs(a)));
        EXPECT_LE(std::abs(a - b), 1e-5 * std::max(1.0, std::abs(a))) << path << ": " << b << " vs " << a;
    } else {
        EXPECT_EQ(ref, got) << path;
    }
}

// W ranks with ep = W (each rank holds E/W experts and 1/W of every batch's rows, batches padded
// with dummy rows) give the numbers of one process, in sample mode with S = 4 (the routing noise is
// keyed by global token ids) and with every section on.
TEST(EvaluatorMpi, RanksGiveTheSingleProcessNumbers) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    const int W = world.size();
    const fs::path dir = fs::temp_directory_path() / concat("bmoe_evaluator_mpi_np", W);
    trainer::RunConfig c = tiny_run(dir / "run", 8);
    c.model.d_model = 32;
    c.model.expert_hidden = 32;
    c.data.seq_len = 32;
    c.data.train_tokens = 40'000;
    c.model.router.type = model::RouterType::kLogitMf;
    c.loss.router_reg_coef = 0.01f;
    std::string ckpt = checkpoints::checkpoint_path(c.checkpoint_dir(), c.train.steps);
    if (world.rank() == 0) {
        fs::remove_all(dir);
        train(c);
    }
    world.barrier();

    EvalOptions o = small_eval(ckpt, dir / "eval_dist");
    o.questions = 61;       // odd
    o.batch_questions = 5;  // odd: dummy prompts pad every batch under 2 ranks
    o.stability_sequences = 3;
    o.samples = 4;
    o.ep = W;
    std::ostringstream log;
    const json dist = run_evaluation(o, &world, log).json;

    // every rank holds the same report
    std::string text = dist.dump();
    uint64_t size = text.size();
    world.broadcast(&size, sizeof size, 0);
    std::string root_text(size, '\0');
    if (world.rank() == 0) root_text = text;
    world.broadcast(root_text.data(), size, 0);
    EXPECT_EQ(text, root_text) << "rank " << world.rank() << " holds another report than rank 0";

    if (world.rank() == 0) {
        EXPECT_TRUE(fs::exists(dir / "eval_dist" / "eval.json"));
        EvalOptions single = o;
        single.ep = 0;
        single.out_dir = (dir / "eval_single").string();
        std::ostringstream log1;
        const json ref = run_evaluation(single, nullptr, log1).json;
        ASSERT_TRUE(ref["ood"]["pairs"][0]["scores"].size() >= 4u) << "entropy, 1-max, gate entropy, MI, sigma";
        double max_diff = 0.0;
        expect_same_numbers(ref, dist, "", max_diff);
        std::printf("np %d: largest relative difference to one process %.3g\n", W, max_diff);
    }
    world.barrier();
    if (world.rank() == 0) fs::remove_all(dir);
}

#endif  // BMOE_EVALUATOR_MPI_TEST

}  // namespace
}  // namespace bmoe::eval
