// router_train_test.cpp -- every router family trains the built-in corpus from scratch to a
// validation loss within 5% of the deterministic topk router's (same model, data and steps),
// with its regulariser on (beta = the default). Validation routes in mean mode (l = mu).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "checkpoints/checkpoint.h"
#include "tests/trainer_test_util.h"
#include "trainer/trainer.h"

namespace bmoe::trainer {
namespace {

RunConfig small_run(model::RouterType type) {
    RunConfig c = small_training_run(std::string("router_train_") + model::to_string(type));
    c.model.router.type = type;
    c.model.router.swag_every = 5;
    c.train.steps = 120;
    c.train.log_every = 120;
    return c;
}

double final_val_loss(model::RouterType type, std::string* log_text) {
    std::ostringstream log;
    Trainer trainer(small_run(type), log);
    const TrainResult r = trainer.run();
    *log_text = log.str();
    return r.evals.back().val_loss;
}

TEST(RouterTraining, EveryFamilyWithinFivePercentOfTopk) {
    std::string log;
    const double topk = final_val_loss(model::RouterType::kTopK, &log);
    for (const model::RouterType type :
         {model::RouterType::kTempSampling, model::RouterType::kMcDropout, model::RouterType::kSwag,
          model::RouterType::kEnsemble, model::RouterType::kWeightMfvi, model::RouterType::kLogitMf,
          model::RouterType::kLogitFc, model::RouterType::kVtsr}) {
        const double loss = final_val_loss(type, &log);
        std::cout << model::to_string(type) << ": val loss " << loss << " (topk " << topk << ", "
                  << 100.0 * (loss / topk - 1.0) << "%)\n";
        EXPECT_LT(loss, 1.05 * topk) << model::to_string(type) << "\n" << log;
    }
}

// Router state that is not a parameter (the aux-free selection bias, SWAG moments) is checkpointed:
// resuming from the middle gives bitwise the same losses and the same final state.
TEST(RouterTraining, RouterStateResumesBitwise) {
    RunConfig c = small_training_run("router_state_resume");
    std::filesystem::remove_all(c.train.out_dir);
    c.model.router.type = model::RouterType::kSwag;
    c.model.router.swag_every = 2;
    c.model.router.selection_bias_rate = 0.01f;
    c.train.steps = 10;
    c.checkpoint.every = 5;
    c.train.log_layers = true;
    std::ostringstream log1, log2;
    Trainer full(c, log1);
    const TrainResult a = full.run();
    {  // every loss term per layer, on request
        std::ifstream metrics(std::filesystem::path(c.train.out_dir) / "metrics.jsonl");
        std::string first;
        std::getline(metrics, first);
        for (const char* key : {"\"aux_layers\":[", "\"z_layers\":[", "\"reg_layers\":["})
            EXPECT_NE(first.find(key), std::string::npos) << key << " missing in " << first;
    }
    std::vector<std::vector<float>> state_full;
    for (const model::RouterStateTensor& t : full.model().router_state()) state_full.push_back(*t.values);
    ASSERT_EQ(state_full.size(), 2u * (1 + 4)) << "selection bias + 4 SWAG tensors per MoE layer";

    std::filesystem::remove(checkpoints::checkpoint_path(c.checkpoint_dir(), 10));
    checkpoints::update_latest(c.checkpoint_dir(), checkpoints::checkpoint_path(c.checkpoint_dir(), 5));
    c.checkpoint.resume = "auto";
    Trainer resumed(c, log2);
    const TrainResult b = resumed.run();
    ASSERT_EQ(b.losses.size(), 5u) << log2.str();
    for (int i = 0; i < 5; ++i) EXPECT_EQ(b.losses[i], a.losses[5 + i]) << "step " << 6 + i;
    size_t i = 0;
    for (const model::RouterStateTensor& t : resumed.model().router_state())
        EXPECT_EQ(*t.values, state_full[i++]) << t.name;
}

}  // namespace
}  // namespace bmoe::trainer
