// cuda_train_test.cpp -- a whole training run on the CUDA backend tracks the CPU backend.
// Same config, seed and data: the loss sequences agree to fp32 reduction-order tolerance
// (differences grow slowly through AdamW, so the bound loosens with the step).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <sstream>

#include "model/cuda/cuda_backend.h"
#include "trainer/trainer.h"

namespace bmoe::trainer {
namespace {

TEST(CudaTrainTest, LossesMatchCpuBackend) {
    if (!model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    RunConfig c;
    c.model.d_model = 64;
    c.model.num_layers = 2;
    c.model.num_heads = 4;
    c.model.num_kv_heads = 2;
    c.model.num_experts = 4;
    c.model.expert_hidden = 96;
    c.data.batch_size = 4;
    c.data.seq_len = 32;
    c.data.train_tokens = 50'000;
    c.train.steps = 10;
    c.train.eval_batches = 2;
    c.train.plot = false;
    c.train.out_dir = (std::filesystem::temp_directory_path() / "bmoe_cuda_train_cpu").string();
    std::ostringstream log_cpu, log_gpu;
    const TrainResult cpu = Trainer(c, log_cpu).run();
    c.train.backend = "cuda";
    c.train.out_dir = (std::filesystem::temp_directory_path() / "bmoe_cuda_train_gpu").string();
    const TrainResult gpu = Trainer(c, log_gpu).run();
    ASSERT_EQ(cpu.losses.size(), gpu.losses.size());
    for (size_t i = 0; i < cpu.losses.size(); ++i)
        EXPECT_NEAR(gpu.losses[i], cpu.losses[i], 1e-4 * (1 + static_cast<double>(i)) * std::abs(cpu.losses[i]))
            << "step " << i;
    EXPECT_NEAR(gpu.evals.back().val_loss, cpu.evals.back().val_loss, 1e-2);
}

}  // namespace
}  // namespace bmoe::trainer
