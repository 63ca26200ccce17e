// resume_test.cpp -- a run resumed from a checkpoint continues with bitwise the same losses as
// the uninterrupted run (same world size), and the checkpoint directory behaves (latest, keep).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <sstream>

#include "checkpoints/checkpoint.h"
#include "checkpoints/safetensors.h"
#include "parallel/check.h"
#include "trainer/trainer.h"

namespace bmoe::trainer {
namespace {

namespace fs = std::filesystem;

RunConfig tiny_run(const std::string& name) {
    RunConfig c;
    c.model.d_model = 32;
    c.model.num_layers = 2;
    c.model.num_heads = 4;
    c.model.num_experts = 4;
    c.model.expert_hidden = 32;
    c.data.batch_size = 4;
    c.data.seq_len = 16;
    c.data.train_tokens = 20'000;
    c.train.steps = 12;
    c.train.grad_accum = 2;
    c.train.eval_every = 0;
    c.train.eval_batches = 1;
    c.train.plot = false;
    c.train.out_dir = (fs::temp_directory_path() / ("bmoe_resume_" + name)).string();
    fs::remove_all(c.train.out_dir);
    return c;
}

TEST(ResumeTest, ResumedRunGivesBitwiseIdenticalLosses) {
    std::ostringstream log;
    const TrainResult full = Trainer(tiny_run("full"), log).run();

    RunConfig first = tiny_run("split");
    first.checkpoint.every = 5;
    first.checkpoint.keep = 2;
    Trainer(first, log).run();  // saves steps 5, 10 and 12; keeps the newest 2
    const std::string dir = first.checkpoint_dir();
    EXPECT_EQ(checkpoints::latest_checkpoint(dir), checkpoints::checkpoint_path(dir, 12));
    EXPECT_FALSE(fs::exists(checkpoints::checkpoint_path(dir, 5))) << "keep=2 prunes the oldest";
    ASSERT_TRUE(fs::exists(checkpoints::checkpoint_path(dir, 10)));

    RunConfig second = first;
    second.checkpoint.resume = checkpoints::checkpoint_path(dir, 10);
    const TrainResult rest = Trainer(second, log).run();
    ASSERT_EQ(rest.losses.size(), 2u);
    EXPECT_EQ(rest.losses[0], full.losses[10]) << "step 11 must be bitwise identical";
    EXPECT_EQ(rest.losses[1], full.losses[11]) << "step 12 must be bitwise identical";
}

// The Python loader (tools/bmoe_ckpt.py) + the PyTorch model (tools/bmoe_torch.py) give the C++
// logits from a checkpoint written by a real training run.
TEST(ResumeTest, PythonLoaderReproducesCppLogits) {
    if (std::system((std::string(BMOE_PYTHON) + " -c 'import torch, h5py' >/dev/null 2>&1").c_str()) != 0) {
        if (std::getenv("BMOE_REQUIRE_TORCH") != nullptr) FAIL() << "torch/h5py required (BMOE_REQUIRE_TORCH)";
        GTEST_SKIP() << "python3-torch/python3-h5py missing: run tools/install-deps.sh --tests";
    }
    RunConfig c = tiny_run("python");
    c.train.steps = 3;
    std::ostringstream log;
    Trainer trainer(c, log);
    trainer.run();
    const std::string ckpt = checkpoints::latest_checkpoint(c.checkpoint_dir());
    const std::vector<int32_t> tokens = {5, 17, 99, 3, 250, 42, 42, 7, 1, 0, 128, 64, 33, 200, 12, 9};
    trainer.model().forward(tokens.data(), nullptr, 2, 8, model::LossWeights{});
    const std::vector<float> want = trainer.model().logits_to_host();
    const fs::path dir(c.train.out_dir);
    checkpoints::SafetensorsFile in;
    in.tensors["tokens"] = checkpoints::make_tensor_i32(tokens, {2, 8});
    checkpoints::write_safetensors((dir / "tokens.safetensors").string(), in);
    const std::string cmd = std::string(BMOE_PYTHON) + " " + BMOE_SOURCE_DIR + "/tests/ckpt_logits.py " + ckpt + " " +
                            (dir / "tokens.safetensors").string() + " " + (dir / "logits.safetensors").string();
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    const std::vector<float> got =
        checkpoints::tensor_to_float(checkpoints::read_safetensors((dir / "logits.safetensors").string()).at("logits"));
    ASSERT_EQ(got.size(), want.size());
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < got.size(); ++i) num += (got[i] - want[i]) * (got[i] - want[i]), den += want[i] * want[i];
    EXPECT_LT(std::sqrt(num / den), 1e-5);
}

TEST(ResumeTest, AutoResumeWithoutCheckpointStartsFresh) {
    RunConfig c = tiny_run("auto_fresh");
    c.train.steps = 2;
    c.checkpoint.resume = "auto";
    std::ostringstream log;
    const TrainResult r = Trainer(c, log).run();
    EXPECT_EQ(r.losses.size(), 2u);
    EXPECT_NE(log.str().find("starting fresh"), std::string::npos) << log.str();
}

TEST(ResumeTest, CheckpointOfAnotherModelIsAClearError) {
    RunConfig c = tiny_run("mismatch");
    c.train.steps = 1;
    std::ostringstream log;
    Trainer(c, log).run();
    RunConfig other = c;
    other.model.d_model = 64;
    other.train.steps = 2;
    other.checkpoint.resume = "auto";
    EXPECT_THROW(Trainer(other, log), bmoe::Error);
}

}  // namespace
}  // namespace bmoe::trainer
