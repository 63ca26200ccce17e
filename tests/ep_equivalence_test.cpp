// ep_equivalence_test.cpp -- distributed training equals single-process training.
//
// Under mpiexec -n N, every rank trains the same config with expert parallelism `ep` (and data
// parallelism N/ep) on the same GLOBAL batch; rank 0 also trains it alone. Losses and every
// parameter (each rank checks its own slice: dense tensors whole, its experts' rows) must agree
// within fp32 reduction-order tolerance after several AdamW steps (Adam turns tiny gradient
// differences into updates of up to lr, so parameters get a looser bound than losses).
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <filesystem>
#include <sstream>

#include "parallel/mpi_comm.h"
#include "trainer/trainer.h"

namespace bmoe::trainer {
namespace {

struct Case {
    std::string name;
    RunConfig config;
};

RunConfig base_config() {
    RunConfig c;
    c.model.d_model = 32;
    c.model.num_layers = 2;
    c.model.num_heads = 4;
    c.model.num_kv_heads = 2;
    c.model.num_experts = 8;
    c.model.top_k = 2;
    c.model.expert_hidden = 24;
    c.data.batch_size = 8;
    c.data.seq_len = 16;
    c.data.train_tokens = 20'000;
    c.optim.lr = 1e-2f;
    c.optim.warmup_steps = 2;
    c.train.steps = 6;
    c.train.eval_every = 0;
    c.train.eval_batches = 2;
    c.train.plot = false;
    c.train.grad_accum = 2;
    c.train.out_dir = (std::filesystem::temp_directory_path() / "bmoe_ep_equivalence").string();
    return c;
}

std::vector<Case> cases() {
    std::vector<Case> v;
    v.push_back({"mixtral_like", base_config()});
    RunConfig mixed = base_config();
    mixed.model.moe_every = 2;
    mixed.model.top_k = 1;
    mixed.model.router_renormalize = false;
    mixed.model.activation = model::Activation::kGelu;
    mixed.model.norm = model::NormType::kLayerNorm;
    v.push_back({"dense_and_moe_gelu_top1", mixed});
    return v;
}

void expect_same_training(const RunConfig& config, int ep, const std::string& name) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    RunConfig dist = config;
    dist.parallel.ep = ep;
    std::ostringstream log;
    Trainer distributed(dist, log, &world);
    const TrainResult got = distributed.run();

    // Reference: rank 0 alone; losses and the full parameter block broadcast to every rank.
    std::vector<double> ref_losses(config.train.steps);
    std::vector<float> ref_params;
    uint64_t ref_size = 0;
    std::unique_ptr<Trainer> single;
    if (world.rank() == 0) {
        std::ostringstream single_log;
        RunConfig one = config;
        one.train.out_dir += "_single";
        single = std::make_unique<Trainer>(one, single_log);
        ref_losses = single->run().losses;
        ref_params = single->model().params_to_host();
        ref_size = ref_params.size();
    }
    world.broadcast(ref_losses.data(), ref_losses.size() * sizeof(double), 0);
    world.broadcast(&ref_size, sizeof(ref_size), 0);
    ref_params.resize(ref_size);
    world.broadcast(ref_params.data(), ref_size * sizeof(float), 0);

    for (size_t i = 0; i < got.losses.size(); ++i)
        EXPECT_NEAR(got.losses[i], ref_losses[i], 2e-5 * std::abs(ref_losses[i]))
            << name << " ep " << ep << " step " << i;
    const model::ParameterLayout full(config.model);
    const model::ParameterLayout& mine = distributed.model().layout();
    const std::vector<float> params = distributed.model().params_to_host();
    for (const model::ParamInfo& p : mine.params()) {
        const model::ParamInfo& r = full.params()[full.find(p.name)];
        double max_diff = 0.0, max_ref = 0.0;
        for (size_t j = 0; j < p.numel; ++j) {
            const double a = params[p.offset + j], b = ref_params[r.offset + p.global_offset + j];
            max_diff = std::max(max_diff, std::abs(a - b));
            max_ref = std::max(max_ref, std::abs(b));
        }
        EXPECT_LE(max_diff, 2e-3 * (max_ref + 1e-3)) << name << " ep " << ep << " rank " << world.rank() << " "
                                                     << p.name;
    }
}

TEST(EpEquivalence, DistributedTrainingMatchesSingleProcess) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    for (const Case& c : cases())
        for (int ep = 1; ep <= world.size(); ep *= 2)
            if (world.size() % ep == 0) expect_same_training(c.config, ep, c.name);
}

}  // namespace
}  // namespace bmoe::trainer
