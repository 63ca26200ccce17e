// backend_memory_mpi_test.cpp -- under expert parallelism, every pointer the model hands its backend
// is backend memory of the right extent.
//
// backend_memory_test covers one process; this covers what only expert parallelism runs: the
// dispatch/combine staging through host copies, the bf16 row transport (rows gathered in bf16 and
// regrouped by gather_rows_bf16, or float_to_bf16 / bf16_to_float around the trip), the
// received rows in the shared layer scratch, and the gradient all-reduce overlapped with backward.
// Under mpiexec -n 2 or 4 every rank trains two steps on a MemoryCheckingBackend
// (tests/memory_checking_backend.h), once as host memory (MPI reads the buffers directly) and once
// acting as device memory (MPI gets host-staged copies: the path of CUDA ranks on the MPI
// communicator); none may record a violation.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <set>
#include <string>
#include <vector>

#include "model/model.h"
#include "model/parallel_context.h"
#include "parallel/mpi_comm.h"
#include "parallel/process_grid.h"
#include "tests/memory_checking_backend.h"
#include "tests/router_test_util.h"
#include "trainer/grad_sync.h"
#include "trainer/optimizer.h"

namespace bmoe::model {
namespace {

struct EpVariant {
    std::string name;
    RouterType router = RouterType::kTopK;
    bool bf16 = false;       // bf16 GEMMs, so the x and dy rows travel as bf16
    bool recompute = false;  // MLP and attention recompute
    bool overlap = false;    // gradient all-reduce started inside backward
    bool gemm_inputs16 = true;  // Model::set_bf16_gemm_inputs: the rows travel from and into bf16 copies
    bool combine16 = false;     // ParallelContext::combine_bf16: y and dx return as bf16
};

TEST(BackendMemoryMpi, ExpertParallelTrainingPassesOnlyBackendMemoryOfTheRightSize) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    if (world.size() == 1) GTEST_SKIP() << "needs expert parallelism (mpiexec -n 2 or 4)";
    const std::vector<EpVariant> variants = {
        {"topk_fp32"},
        {"topk_bf16_rows", RouterType::kTopK, true},
        {"topk_bf16_rows_rounded_per_op", RouterType::kTopK, true, false, false, false},
        {"topk_bf16_rows_and_returns", RouterType::kTopK, true, false, false, true, true},
        {"logit_fc_bf16_recompute_overlap", RouterType::kLogitFc, true, true, true},
        {"mc_dropout_fp32_overlap", RouterType::kMcDropout, false, false, true},
    };
    std::set<std::string> ops;
    for (const EpVariant& v : variants) {
        ModelConfig cfg = tiny_model_config();
        cfg.router.type = v.router;
        cfg.router.train_samples = 2;
        for (const int ep : {2, world.size()})
            for (const bool act_as_device : {false, true}) {
                if (world.size() % ep != 0) continue;
                MemoryCheckingBackend backend(act_as_device);
                backend.set_matmul_precision(v.bf16 ? MatmulPrecision::kBf16 : MatmulPrecision::kFp32);
                parallel::ProcessGrid grid(world, ep);
                ParallelContext parallel = make_parallel_context(grid, cfg.num_experts);
                parallel.combine_bf16 = v.combine16;
                Model model(cfg, &backend, parallel);
                model.init_weights(5);
                model.set_mlp_recompute(v.recompute);
                model.set_attention_recompute(v.recompute);
                model.set_bf16_gemm_inputs(v.gemm_inputs16);
                model.set_keep_logits(false);
                trainer::AdamW optimizer(trainer::OptimConfig{}, model);
                const int B = 2, T = 6, V = cfg.vocab_size;
                for (int step = 1; step <= 2; ++step) {
                    std::vector<int32_t> tokens(B * T), targets(B * T);
                    for (int i = 0; i < B * T; ++i) {
                        tokens[i] = (5 * i + 3 * world.rank() + step) % V;
                        targets[i] = (7 * i + world.rank()) % V;
                    }
                    model.set_routing(RoutingContext{7, step, static_cast<int64_t>(world.rank()) * B * T});
                    model.zero_grad();
                    model.forward(tokens.data(), targets.data(), B, T, LossWeights{0.01f, 0.001f, 0.01f});
                    trainer::GradientSync sync(model, grid, v.overlap);
                    sync.before_last_backward();
                    model.backward(1.0f);
                    sync.finish();
                    optimizer.step(1e-3f, 1.0f);
                    model.end_step(step);
                }
                EXPECT_THAT(backend.violations, ::testing::IsEmpty())
                    << v.name << " ep " << ep << (act_as_device ? " device" : " host") << " rank " << world.rank();
                ops.insert(backend.checked_ops.begin(), backend.checked_ops.end());
            }
    }
    // the expert-parallel-only ops were exercised (and so checked)
    for (const char* op :
         {"float_to_bf16", "bf16_to_float", "gather_rows_bf16", "moe_gather_forward_bf16", "moe_combine_backward_bf16"})
        EXPECT_TRUE(ops.count(op)) << op << " never ran on rank " << world.rank();
}

}  // namespace
}  // namespace bmoe::model
