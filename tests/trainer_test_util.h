// trainer_test_util.h -- the small training run the trainer-level tests start from.
#pragma once

#include <filesystem>
#include <string>

#include "trainer/run_config.h"

namespace bmoe::trainer {

// A 2-layer, 4-expert model on 200k tokens of the built-in corpus: 150 steps take a few seconds on
// 2 cores. Outputs go to <tmp>/bmoe_<name> (one directory per test: ctest runs tests in parallel).
inline RunConfig small_training_run(const std::string& name) {
    RunConfig c;
    c.model.d_model = 64;
    c.model.num_layers = 2;
    c.model.num_heads = 4;
    c.model.num_kv_heads = 2;
    c.model.num_experts = 4;
    c.model.top_k = 2;
    c.model.expert_hidden = 128;
    c.data.batch_size = 8;
    c.data.seq_len = 64;
    c.data.train_tokens = 200'000;
    c.optim.lr = 3e-3f;
    c.optim.warmup_steps = 10;
    c.train.steps = 150;
    c.train.eval_every = 0;
    c.train.eval_batches = 4;
    c.train.log_every = 50;
    c.train.plot = false;
    c.train.out_dir = (std::filesystem::temp_directory_path() / ("bmoe_" + name)).string();
    return c;
}

}  // namespace bmoe::trainer
