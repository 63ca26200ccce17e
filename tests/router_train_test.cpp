// router_train_test.cpp -- every router family trains the built-in corpus from scratch to a
// validation loss within 5% of the deterministic topk router's (same model, data and steps),
// with its regulariser on (beta = the default). Validation routes in mean mode (l = mu).
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <sstream>

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

}  // namespace
}  // namespace bmoe::trainer
