// reshard_test.cpp -- checkpoints are independent of the expert-parallel layout that wrote them.
// Under mpiexec -n 4: train with ep 4, resume its step-4 checkpoint with ep 2 (dp 2), that run's
// step-8 checkpoint with ep 1 (dp 4), and that run's step-12 checkpoint with ep 4 again. Every
// phase's losses match one uninterrupted single-process run within fp32 reduction-order tolerance.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <filesystem>
#include <sstream>

#include "checkpoints/checkpoint.h"
#include "parallel/mpi_comm.h"
#include "trainer/trainer.h"

namespace bmoe::trainer {
namespace {

namespace fs = std::filesystem;

RunConfig phase_config(const std::string& name, int ep) {
    RunConfig c;
    c.model.d_model = 32;
    c.model.num_layers = 2;
    c.model.num_heads = 4;
    c.model.num_experts = 8;
    c.model.expert_hidden = 24;
    c.data.batch_size = 8;
    c.data.seq_len = 16;
    c.data.train_tokens = 20'000;
    c.train.steps = 16;
    c.train.eval_batches = 1;
    c.train.eval_every = 0;
    c.train.plot = false;
    c.checkpoint.every = 4;
    c.checkpoint.keep = 10;
    c.parallel.ep = ep;
    c.train.out_dir = (fs::temp_directory_path() / ("bmoe_reshard_" + name)).string();
    return c;
}

TEST(Reshard, ExpertParallelSizeChangesAcrossResumes) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    if (world.size() != 4) GTEST_SKIP() << "needs 4 ranks";
    std::ostringstream log;
    if (world.rank() == 0)
        for (const char* name : {"ref", "ep4", "ep2", "ep1", "ep4b"})
            fs::remove_all(phase_config(name, 1).train.out_dir);
    world.barrier();

    std::vector<double> ref(16);
    if (world.rank() == 0) ref = Trainer(phase_config("ref", 1), log).run().losses;
    world.broadcast(ref.data(), ref.size() * sizeof(double), 0);

    struct Phase {
        const char* name;
        int ep;
        const char* from;
        int from_step;
    };
    const Phase phases[] = {{"ep4", 4, nullptr, 0}, {"ep2", 2, "ep4", 4}, {"ep1", 1, "ep2", 8}, {"ep4b", 4, "ep1", 12}};
    for (const Phase& p : phases) {
        RunConfig c = phase_config(p.name, p.ep);
        if (p.from != nullptr)
            c.checkpoint.resume = checkpoints::checkpoint_path(phase_config(p.from, 1).checkpoint_dir(), p.from_step);
        const TrainResult r = Trainer(c, log, &world).run();
        ASSERT_EQ(r.losses.size(), static_cast<size_t>(16 - p.from_step)) << p.name;
        for (int i = 0; i < 4; ++i)  // the steps this phase is responsible for
            EXPECT_NEAR(r.losses[i], ref[p.from_step + i], 5e-5 * std::abs(ref[p.from_step + i]))
                << p.name << " step " << p.from_step + i + 1;
    }
}

}  // namespace
}  // namespace bmoe::trainer
