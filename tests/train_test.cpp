// train_test.cpp -- end-to-end training on the built-in synthetic corpus.
// (1) the validation loss falls well below the unigram baseline (the model learns structure,
//     not just byte frequencies); (2) the same seed gives a bitwise-identical loss sequence.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "checkpoints/checkpoint.h"
#include "tests/trainer_test_util.h"
#include "trainer/trainer.h"

namespace bmoe::trainer {
namespace {

RunConfig small_run(const std::string& name) { return small_training_run("train_test_" + name); }

TEST(TrainTest, ValidationLossFallsWellBelowUnigramBaseline) {
    std::ostringstream log;
    Trainer trainer(small_run("converge"), log);
    const TrainResult r = trainer.run();
    ASSERT_FALSE(r.evals.empty());
    const EvalMetrics& last = r.evals.back();
    EXPECT_GT(last.unigram_loss, 2.0) << "the corpus should not be trivially predictable";
    EXPECT_LT(last.val_loss, 0.7 * last.unigram_loss) << log.str();
    EXPECT_LT(r.losses.back(), r.losses.front());
}

TEST(TrainTest, SameSeedGivesBitwiseIdenticalLosses) {
    RunConfig c = small_run("det");
    c.train.steps = 12;
    std::ostringstream log1, log2;
    const TrainResult a = Trainer(c, log1).run();
    const TrainResult b = Trainer(c, log2).run();
    ASSERT_EQ(a.losses.size(), b.losses.size());
    for (size_t i = 0; i < a.losses.size(); ++i) EXPECT_EQ(a.losses[i], b.losses[i]) << "step " << i;
    c.train.seed += 1;
    std::ostringstream log3;
    const TrainResult d = Trainer(c, log3).run();
    EXPECT_NE(a.losses.front(), d.losses.front()) << "another seed must give another run";
}

// The progress line and metrics.jsonl report the backend's peak memory: at least the fp32
// parameters, gradients and both AdamW moments (16 bytes per parameter), and not absurdly more.
TEST(TrainTest, ReportsPeakBackendMemory) {
    RunConfig c = small_run("memory");
    c.train.steps = 2;
    c.train.log_every = 1;
    std::ostringstream log;
    Trainer trainer(c, log);
    trainer.run();
    EXPECT_NE(log.str().find(" | mem "), std::string::npos) << log.str();
    std::ifstream metrics(std::filesystem::path(c.train.out_dir) / "metrics.jsonl");
    std::string first;
    std::getline(metrics, first);
    const nlohmann::json j = nlohmann::json::parse(first);
    const double bytes = j.at("peak_memory_gib").get<double>() * (1u << 30);
    const double state = 16.0 * static_cast<double>(trainer.model().layout().total_numel());
    EXPECT_GE(bytes, state) << first;
    EXPECT_LT(bytes, 50.0 * state) << first;
}

// bf16 GEMMs (emulated exactly on the CPU) train like fp32: the loss curve stays within 2% of the
// fp32 one at every logged point and validation lands within 2%; the first step differs (rounding
// happened) and the log says which precision ran.
TEST(TrainTest, Bf16MatmulsTrackFp32Training) {
    std::vector<TrainResult> results;
    for (const char* precision : {"fp32", "bf16"}) {
        RunConfig c = small_run(std::string("precision_") + precision);
        c.train.steps = 80;
        c.train.precision = precision;
        std::ostringstream log;
        results.push_back(Trainer(c, log).run());
        EXPECT_NE(log.str().find(std::string("(") + precision + " GEMMs, gemm attention)"), std::string::npos)
            << log.str();
    }
    const TrainResult &fp32 = results[0], &bf16 = results[1];
    ASSERT_EQ(fp32.losses.size(), bf16.losses.size());
    EXPECT_NE(fp32.losses[0], bf16.losses[0]);
    for (size_t i = 0; i < fp32.losses.size(); i += 10)
        EXPECT_NEAR(bf16.losses[i], fp32.losses[i], 0.02 * fp32.losses[i]) << "step " << i;
    EXPECT_NEAR(bf16.evals.back().val_loss, fp32.evals.back().val_loss, 0.02 * fp32.evals.back().val_loss);
    EXPECT_LT(bf16.losses.back(), 0.8 * bf16.losses.front());
}

// checkpoint.every_minutes saves when that much wall time passed since the last save (here: always).
TEST(TrainTest, TimedCheckpoints) {
    RunConfig c = small_run("timed_ckpt");
    std::filesystem::remove_all(c.train.out_dir);
    c.train.steps = 4;
    c.checkpoint.every_minutes = 1e-9f;
    c.checkpoint.keep = 10;
    std::ostringstream log;
    Trainer(c, log).run();
    for (int step = 1; step <= 4; ++step)
        EXPECT_TRUE(std::filesystem::exists(checkpoints::checkpoint_path(c.checkpoint_dir(), step))) << log.str();
}

}  // namespace
}  // namespace bmoe::trainer
