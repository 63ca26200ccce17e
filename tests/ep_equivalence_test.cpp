// ep_equivalence_test.cpp -- distributed training equals single-process training.
//
// Under mpiexec -n N, every rank trains the same config with expert parallelism `ep` (and data
// parallelism N/ep) on the same GLOBAL batch; rank 0 also trains it alone. Losses and every
// parameter (each rank checks its own slice: dense tensors whole, its experts' rows) must agree
// within fp32 reduction-order tolerance after several AdamW steps (Adam turns tiny gradient
// differences into updates of up to lr, so parameters get a looser bound than losses).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>

#include "model/cpu_backend.h"
#ifdef BMOE_HAVE_CUDA
#include "model/cuda/cuda_backend.h"
#endif
#include "parallel/check.h"
#include "parallel/mpi_comm.h"
#include "trainer/grad_sync.h"
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
    // One directory per world size: ctest runs the np1/np2/np4 variants concurrently.
    int world_size = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    c.train.out_dir =
        (std::filesystem::temp_directory_path() / ("bmoe_ep_equivalence_np" + std::to_string(world_size))).string();
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
    // Bayesian routers: noise keyed by global token id, global KL normalisers, the weight-space KL
    // held by every rank, and the selection bias moved by global loads.
    RunConfig fc = base_config();
    fc.model.router.type = model::RouterType::kLogitFc;
    fc.model.router.train_samples = 2;
    fc.loss.router_reg_coef = 0.05f;
    v.push_back({"logit_fc_two_samples", fc});
    RunConfig mfvi = base_config();
    mfvi.model.router.type = model::RouterType::kWeightMfvi;
    mfvi.model.router.selection_bias_rate = 0.01f;
    mfvi.loss.router_reg_coef = 0.05f;
    v.push_back({"weight_mfvi_selection_bias", mfvi});
    RunConfig vtsr = base_config();
    vtsr.model.router.type = model::RouterType::kVtsr;
    vtsr.loss.router_reg_coef = 0.05f;
    v.push_back({"vtsr", vtsr});
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
        EXPECT_LE(max_diff, 2e-3 * (max_ref + 1e-3))
            << name << " ep " << ep << " rank " << world.rank() << " " << p.name;
    }
}

// One forward/backward on a global batch: after the gradient all-reduce, every rank's gradient
// slice equals the single-process gradient (itself checked against finite differences and
// PyTorch), i.e. gradients pass through dispatch/combine and the aux-loss statistics intact.
TEST(EpEquivalence, GradientsThroughTheExchangeMatchSingleProcess) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    const model::ModelConfig cfg = base_config().model;
    const int B = 8, T = 8, N = B * T, W = world.size();
    std::vector<int32_t> tokens(N), targets(N);
    for (int i = 0; i < N; ++i) tokens[i] = (i * 37 + 11) % cfg.vocab_size, targets[i] = (i * 53 + 7) % cfg.vocab_size;
    const model::LossWeights weights{0.1f, 0.01f};
    model::CpuBackend cpu;
    model::Model single(cfg, &cpu);
    single.init_weights(3);
    single.zero_grad();
    single.forward(tokens.data(), targets.data(), B, T, weights);
    single.backward(1.0f);
    const std::vector<float> ref = single.grads_to_host();
    for (int ep = 1; ep <= W; ep *= 2)
        for (bool overlap : {false, true}) {
            if (W % ep != 0) continue;
            parallel::ProcessGrid grid(world, ep);
            const parallel::ExpertRange experts = grid.expert_range(cfg.num_experts);
            model::ParallelContext ctx{W > 1 ? &world : nullptr, &grid.ep(), experts.first, experts.count};
            model::Model dist(cfg, &cpu, ctx);
            dist.init_weights(3);
            dist.zero_grad();
            const size_t begin = static_cast<size_t>(world.rank()) * (B / W) * T;
            dist.forward(tokens.data() + begin, targets.data() + begin, B / W, T, weights);
            GradientSync sync(dist, grid, overlap);  // overlap: reductions start inside backward
            EXPECT_EQ(sync.overlapping(), overlap && W > 1);
            sync.before_last_backward();
            dist.backward(1.0f);
            sync.finish();
            const std::vector<float> got = dist.grads_to_host();
            for (const model::ParamInfo& p : dist.layout().params()) {
                const model::ParamInfo& r = single.layout().params()[single.layout().find(p.name)];
                double num = 0.0, den = 0.0;
                for (size_t j = 0; j < p.numel; ++j) {
                    const double a = got[p.offset + j], b = ref[r.offset + p.global_offset + j];
                    num += (a - b) * (a - b);
                    den += b * b;
                }
                EXPECT_LE(std::sqrt(num), 1e-5 * std::sqrt(den) + 1e-9)
                    << "ep " << ep << " overlap " << overlap << " rank " << world.rank() << " " << p.name;
            }
        }
}

// A 4-step bf16 training run with the given row transports: its losses, final parameters and
// the exchange bytes of step 1 (metrics.jsonl, rank 0 only).
struct TransportRun {
    std::vector<double> losses;
    std::vector<float> start, params;  // this rank's parameters before and after
    double first_step_bytes = 0.0;
};
TransportRun train_with_transport(parallel::MpiComm& world,
                                  bool exchange_bf16,
                                  bool gemm_inputs16,
                                  bool combine_bf16,
                                  const std::string& backend = "cpu") {
    RunConfig c = base_config();
    c.train.backend = backend;
    c.train.precision = "bf16";
    c.train.steps = 4;
    c.parallel.exchange_bf16 = exchange_bf16;
    c.parallel.combine_bf16 = combine_bf16;
    c.train.out_dir += "_rows" + std::to_string(exchange_bf16) + std::to_string(gemm_inputs16) +
                       std::to_string(combine_bf16) + backend;
    std::ostringstream log;
    Trainer trainer(c, log, &world);
    trainer.model().set_bf16_gemm_inputs(gemm_inputs16);
    TransportRun run;
    run.start = trainer.model().params_to_host();
    run.losses = trainer.run().losses;
    run.params = trainer.model().params_to_host();
    if (world.rank() == 0) {
        std::ifstream metrics(std::filesystem::path(c.train.out_dir) / "metrics.jsonl");
        std::string line;
        std::getline(metrics, line);
        const size_t at = line.find("\"exchange_bytes\":");
        EXPECT_NE(at, std::string::npos) << line;
        if (at != std::string::npos) run.first_step_bytes = std::stod(line.substr(at + 17));
    }
    return run;
}

// With bf16 GEMMs, sending x and dy rows as bf16 is lossless: the expert GEMMs round them the same
// way, so training is bitwise the same as with fp32 rows, while the rows' bytes drop by a quarter.
// Both bf16 transports: the rows gathered in bf16 and received into the experts' bf16 copy
// (Model::set_bf16_gemm_inputs, the default), and fp32 rows rounded for the trip and widened after.
TEST(EpEquivalence, Bf16RowTransportTrainsBitwiseLikeFp32Rows) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    if (world.size() == 1) GTEST_SKIP() << "needs expert parallelism";
    const TransportRun fp32 = train_with_transport(world, false, true, false);
    const TransportRun gathered16 = train_with_transport(world, true, true, false);
    const TransportRun rounded16 = train_with_transport(world, true, false, false);
    for (const TransportRun* r : {&gathered16, &rounded16}) {
        EXPECT_EQ(fp32.losses, r->losses) << (r == &gathered16 ? "gathered in bf16" : "rounded for the trip");
        EXPECT_TRUE(fp32.params == r->params) << (r == &gathered16 ? "gathered in bf16" : "rounded for the trip");
    }
    if (world.rank() == 0) {  // x and dy at 2 bytes, y and dx at 4: 12 of 16 bytes per row
        EXPECT_GT(fp32.first_step_bytes, 0.0);
        EXPECT_DOUBLE_EQ(gathered16.first_step_bytes, 0.75 * fp32.first_step_bytes);
        EXPECT_DOUBLE_EQ(rounded16.first_step_bytes, gathered16.first_step_bytes);
    }
}

// parallel.combine_bf16: the experts' outputs (y, dx) return as bf16 too. That rounds them, so
// training changes, but only by that rounding: losses within 1e-2 relative of the fp32 returns
// over 4 steps, and the two runs' parameters apart by under 5% of how far they moved (2% measured
// with 2 and 4 ranks: AdamW's normalised steps turn tiny gradient differences on near-zero
// gradients into whole steps; wrong rows would put them ~100% apart); and half of fp32's bytes.
TEST(EpEquivalence, Bf16CombineTrainsWithinItsRoundingOfFp32Returns) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    if (world.size() == 1) GTEST_SKIP() << "needs expert parallelism";
    const TransportRun fp32 = train_with_transport(world, false, true, false);
    const TransportRun returns16 = train_with_transport(world, true, true, true);
    ASSERT_EQ(fp32.losses.size(), returns16.losses.size());
    EXPECT_NE(fp32.losses, returns16.losses) << "the bf16 returns must round something";
    for (size_t s = 0; s < fp32.losses.size(); ++s)
        EXPECT_NEAR(returns16.losses[s], fp32.losses[s], 1e-2 * std::abs(fp32.losses[s])) << "step " << s + 1;
    ASSERT_EQ(fp32.start, returns16.start);
    double moved = 0.0, apart = 0.0;  // |update| and |difference of the two runs|, summed
    for (size_t i = 0; i < fp32.params.size(); ++i) {
        moved += std::abs(fp32.params[i] - fp32.start[i]);
        apart += std::abs(fp32.params[i] - returns16.params[i]);
    }
    EXPECT_LE(apart, 5e-2 * moved) << "the runs moved apart by more than a rounding of the updates";
    if (world.rank() == 0) {
        EXPECT_DOUBLE_EQ(returns16.first_step_bytes, 0.5 * fp32.first_step_bytes);
    }
}

// The bf16 transports on CUDA ranks sharing one GPU (the MPI communicator, host-staged): the
// lossless ones train like fp32 rows (within 2e-4 per step rather than bitwise: cuBLAS may pick
// another kernel for operands at other addresses), the bf16 returns within their rounding.
TEST(EpEquivalence, CudaRanksBf16TransportsTrainLikeFp32Rows) {
    if (!model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    parallel::MpiComm world(MPI_COMM_WORLD);
    if (world.size() == 1) GTEST_SKIP() << "needs expert parallelism";
    const TransportRun fp32 = train_with_transport(world, false, true, false, "cuda");
    const TransportRun gathered16 = train_with_transport(world, true, true, false, "cuda");
    const TransportRun rounded16 = train_with_transport(world, true, false, false, "cuda");
    const TransportRun returns16 = train_with_transport(world, true, true, true, "cuda");
    for (const auto& [run, tol, what] : {std::tuple{&gathered16, 2e-4, "gathered in bf16"},
                                         {&rounded16, 2e-4, "rounded for the trip"},
                                         {&returns16, 1e-2, "bf16 returns"}}) {
        ASSERT_EQ(run->losses.size(), fp32.losses.size()) << what;
        for (size_t s = 0; s < fp32.losses.size(); ++s)
            EXPECT_NEAR(run->losses[s], fp32.losses[s], tol * std::abs(fp32.losses[s])) << what << ", step " << s + 1;
    }
    if (world.rank() == 0) {
        EXPECT_DOUBLE_EQ(gathered16.first_step_bytes, 0.75 * fp32.first_step_bytes);
        EXPECT_DOUBLE_EQ(returns16.first_step_bytes, 0.5 * fp32.first_step_bytes);
    }
}

// Overlapping the gradient all-reduce with backward changes when the sums run, not what they are:
// with two ranks every sum is a + b, so training is bitwise the same.
TEST(EpEquivalence, OverlappedGradientReduceTrainsBitwiseLikeBlocking) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    if (world.size() != 2) GTEST_SKIP() << "bitwise comparison needs exactly 2 ranks";
    for (int ep : {1, 2}) {
        std::vector<std::vector<float>> params;
        std::vector<std::vector<double>> losses;
        for (bool overlap : {false, true}) {
            RunConfig c = base_config();
            c.model.tie_embeddings = true;  // the LM head's gradient is final only after the embeddings
            c.parallel.ep = ep;
            c.parallel.overlap_grad_reduce = overlap ? "true" : "false";
            c.train.out_dir += overlap ? "_overlap" : "_blocking";
            std::ostringstream log;
            Trainer trainer(c, log, &world);
            losses.push_back(trainer.run().losses);
            params.push_back(trainer.model().params_to_host());
            if (world.rank() == 0) {  // only rank 0 logs
                EXPECT_NE(log.str().find(overlap ? "overlapped grad all-reduce" : "comm mpi |"), std::string::npos)
                    << log.str();
            }
        }
        EXPECT_EQ(losses[0], losses[1]) << "ep " << ep;
        EXPECT_TRUE(params[0] == params[1]) << "ep " << ep;
    }
}

TEST(EpEquivalence, DistributedTrainingMatchesSingleProcess) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    for (const Case& c : cases())
        for (int ep = 1; ep <= world.size(); ep *= 2)
            if (world.size() % ep == 0) expect_same_training(c.config, ep, c.name);
}

#ifdef BMOE_HAVE_CUDA
// Several ranks on one GPU (host-staged MPI exchange) train like one rank on that GPU.
TEST(EpEquivalence, CudaRanksSharingOneGpuMatchSingleProcess) {
    if (!model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    parallel::MpiComm world(MPI_COMM_WORLD);
    RunConfig c = base_config();
    c.train.backend = "cuda";
    c.train.precision = "fp32";  // exchange correctness at fp32 tolerance
    expect_same_training(c, world.size(), "cuda");
}
#endif

#ifdef BMOE_HAVE_NCCL
// One GPU per rank: token rows and gradients move over NCCL (device memory, overlapped gradient
// all-reduce on the comm stream) and training still equals one process.
TEST(EpEquivalence, NcclRanksMatchSingleProcess) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    if (model::cuda_device_count() < world.size()) GTEST_SKIP() << "needs one CUDA device per rank";
    RunConfig c = base_config();
    c.train.backend = "cuda";
    c.train.precision = "fp32";
    c.parallel.comm = "nccl";
    expect_same_training(c, world.size(), "nccl");
}

// Ranks sharing a GPU: --parallel.comm=nccl is the same one-line error on every rank.
TEST(EpEquivalence, NcclOnASharedGpuIsAClearError) {
    parallel::MpiComm world(MPI_COMM_WORLD);
    const int devices = model::cuda_device_count();
    if (devices == 0 || devices >= world.size()) GTEST_SKIP() << "needs more ranks than CUDA devices";
    RunConfig c = base_config();
    c.train.backend = "cuda";
    c.parallel.comm = "nccl";
    std::ostringstream log;
    EXPECT_THAT([&] { Trainer t(c, log, &world); },
                ::testing::ThrowsMessage<bmoe::Error>(::testing::HasSubstr("needs one GPU per rank")));
}
#endif

}  // namespace
}  // namespace bmoe::trainer
