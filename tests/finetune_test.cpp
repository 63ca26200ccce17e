// finetune_test.cpp -- router fine-tuning (`bmoe finetune-router`, train.init + train.trainable).
//
// A deterministic topk model is trained briefly; a variational router is then fine-tuned on top of
// it: every non-router tensor stays bitwise unchanged, the ELBO falls, the optimizer state holds
// the router parameters only (in memory and in the checkpoint), the checkpoint records its parent,
// and bad patterns / missing parents are clear errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <sstream>

#include "checkpoints/checkpoint.h"
#include "parallel/check.h"
#include "tests/trainer_test_util.h"
#include "trainer/trainer.h"

namespace bmoe::trainer {
namespace {

namespace fs = std::filesystem;

RunConfig small_run(const std::string& name) {
    RunConfig c = small_training_run("finetune_test_" + name);
    c.model.d_model = 48;
    c.model.expert_hidden = 64;
    c.data.train_tokens = 100'000;
    c.optim.warmup_steps = 5;
    c.train.steps = 30;
    c.train.eval_batches = 2;
    c.train.log_every = 100;
    fs::remove_all(c.train.out_dir);
    return c;
}

// The trained base model (topk), once per test process. One directory per test: ctest runs the
// tests of this binary as concurrent processes.
const std::string& base_checkpoint() {
    static const std::string path = [] {
        RunConfig c = small_run(std::string("base_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
        std::ostringstream log;
        Trainer(c, log).run();
        return checkpoints::checkpoint_path(c.checkpoint_dir(), c.train.steps);
    }();
    return path;
}

bool is_router_tensor(const std::string& name) {
    return name.find(".block_sparse_moe.gate.") != std::string::npos ||
           name.find(".block_sparse_moe.router.") != std::string::npos;
}

TEST(FinetuneRouter, FreezesEverythingButTheRouterAndTheElboFalls) {
    const std::string parent = base_checkpoint();
    RunConfig requested = small_run("logit_fc");
    requested.model.d_model = 999;  // ignored: the architecture comes from the parent
    requested.model.router.type = model::RouterType::kLogitFc;
    requested.loss.router_reg_coef = 0.05f;
    requested.train.steps = 40;
    const RunConfig config = finetune_router_config(requested, parent);
    EXPECT_EQ(config.model.d_model, 48);
    EXPECT_EQ(config.model.router.type, model::RouterType::kLogitFc);
    EXPECT_EQ(config.train.init, parent);

    // the parent's tensors, by name
    const model::ParameterLayout parent_layout(small_run("x").model);
    std::vector<float> parent_params(parent_layout.total_numel());
    std::vector<checkpoints::TensorView> views;
    for (const model::ParamInfo& p : parent_layout.params())
        views.push_back({p.name, p.global_shape, 0, p.numel, parent_params.data() + p.offset, true});
    checkpoints::read_checkpoint_tensors(parent, {{"model", views}});

    std::ostringstream log;
    Trainer trainer(config, log);
    // the ELBO (CE + beta KL + aux + z) of one fixed validation batch with fixed routing noise
    const data::Batch& batch = trainer.datasets().val_batches.front();
    const model::LossWeights weights{config.loss.aux_coef, config.loss.zloss_coef, config.loss.router_reg_coef};
    auto elbo_loss = [&] {
        trainer.model().set_routing(model::RoutingContext{/*seed=*/7, /*step=*/0, /*first_token=*/0});
        return trainer.model().forward(batch.tokens.data(), batch.targets.data(), batch.B, batch.T, weights).total_loss;
    };
    const double before = elbo_loss();
    trainer.run();
    EXPECT_LT(elbo_loss(), before - 0.01) << log.str();
    const model::ParameterLayout& layout = trainer.model().layout();
    const std::vector<float> params = trainer.model().params_to_host();
    size_t router_numel = 0;
    int frozen_checked = 0, router_changed = 0;
    for (const model::ParamInfo& p : layout.params()) {
        const bool router = is_router_tensor(p.name);
        EXPECT_EQ(p.trainable, router) << p.name;
        if (router) router_numel += (p.numel + 15) / 16 * 16;
        const int i = parent_layout.find(p.name);
        if (i < 0) continue;
        const model::ParamInfo& q = parent_layout.params()[i];
        const bool same = std::equal(params.begin() + p.offset, params.begin() + p.offset + p.numel,
                                     parent_params.begin() + q.offset);
        if (router) {
            router_changed += same ? 0 : 1;
        } else {
            EXPECT_TRUE(same) << p.name << " changed although frozen";
            ++frozen_checked;
        }
    }
    EXPECT_GT(frozen_checked, 10);
    EXPECT_EQ(router_changed, 2) << "gate.weight of both MoE layers trains";
    EXPECT_EQ(trainer.optimizer().moments_numel(), router_numel) << "optimizer state = router parameters only";

    // the checkpoint: parent recorded, optimizer groups hold router tensors only
    const std::string ckpt = checkpoints::checkpoint_path(config.checkpoint_dir(), config.train.steps);
    EXPECT_EQ(checkpoints::read_checkpoint_info(ckpt).parent, parent);
    std::vector<std::string> names;
    for (const model::ParamInfo& p : layout.params()) names.push_back(p.name);
    const std::vector<bool> in_m = checkpoints::checkpoint_has_tensors(ckpt, "optimizer/m", names);
    for (size_t i = 0; i < names.size(); ++i) EXPECT_EQ(in_m[i], is_router_tensor(names[i])) << names[i];
    EXPECT_THAT(log.str(), ::testing::HasSubstr("init: 23 of 31 tensors"));
}

TEST(FinetuneRouter, ResumesBitwise) {
    const std::string parent = base_checkpoint();
    RunConfig requested = small_run("resume");
    requested.model.router.type = model::RouterType::kLogitMf;
    requested.train.steps = 8;
    requested.checkpoint.every = 4;
    RunConfig config = finetune_router_config(requested, parent);
    std::ostringstream log1, log2;
    const TrainResult full = Trainer(config, log1).run();
    fs::remove(checkpoints::checkpoint_path(config.checkpoint_dir(), 8));
    checkpoints::update_latest(config.checkpoint_dir(), checkpoints::checkpoint_path(config.checkpoint_dir(), 4));
    config.checkpoint.resume = "auto";
    const TrainResult resumed = Trainer(config, log2).run();
    ASSERT_EQ(resumed.losses.size(), 4u) << log2.str();
    for (int i = 0; i < 4; ++i) EXPECT_EQ(resumed.losses[i], full.losses[4 + i]) << "step " << 5 + i;
}

TEST(FinetuneRouter, BadInputIsAClearError) {
    RunConfig requested = small_run("bad");
    EXPECT_THAT([&] { finetune_router_config(requested, "/nonexistent/parent.h5"); },
                ::testing::ThrowsMessage<Error>(::testing::HasSubstr("/nonexistent/parent.h5")));
    requested.train.trainable = "(unclosed";
    EXPECT_THAT(
        [&] {
            std::ostringstream log;
            Trainer t(requested, log);
        },
        ::testing::ThrowsMessage<Error>(::testing::HasSubstr("is not a valid regex")));
    requested.train.trainable = "no_such_tensor";
    EXPECT_THAT(
        [&] {
            std::ostringstream log;
            Trainer t(requested, log);
        },
        ::testing::ThrowsMessage<Error>(::testing::HasSubstr("matches no parameter")));
}

}  // namespace
}  // namespace bmoe::trainer
