// backend_memory_test.cpp -- every pointer the whole model hands its backend is backend memory of the right extent.
//
// On the CUDA backend a host pointer or a too-short buffer is an illegal address or a silent overrun; there is no
// GPU in CI, so two training steps (two micro-batches of different shapes, loss, backward, AdamW, router state
// update) and evaluation forwards run on a MemoryCheckingBackend (tests/memory_checking_backend.h), which checks
// every op's pointers against its live allocations. Models: every router family, GPT-2 pieces (LayerNorm, learned
// positions, GELU, tied head), dense + MoE layers with top-1 and one KV head, capacity dropping; each plain, with MLP
// and attention recompute, with the in-place loss, with bf16 GEMMs, with both (the loss on bf16 logits), as router
// fine-tuning (frozen tensors: null gradient pointers), and all of those at once; with bf16 GEMMs each weight read
// through the model's bf16 weight copy must be fresh. First: the checker itself catches what it must.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <iterator>
#include <memory>
#include <ostream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "model/buffer.h"
#include "model/model.h"
#include "tests/memory_checking_backend.h"
#include "tests/router_test_util.h"
#include "trainer/optimizer.h"
#include "trainer/trainer.h"

namespace bmoe::model {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

// A host pointer, a short buffer, a pointer running past its buffer's end, a freed buffer and an index addressing
// beyond the gathered rows are caught; host offsets of a grouped GEMM and a view inside a buffer are not.
TEST(MemoryCheckingBackend, CatchesHostPointersAndShortBuffers) {
    MemoryCheckingBackend backend;
    std::vector<float> host(8);
    Buffer<float> small(&backend, 4), big(&backend, 16);
    backend.add(big.data(), big.data(), host.data(), 8);
    backend.scale(small.data(), 2.0f, 5);
    backend.accumulate(big.data() + 12, big.data() + 4, 8);
    EXPECT_THAT(backend.violations, ElementsAre("add: b", "scale: x", "accumulate: out"));
    backend.violations.clear();

    float* freed = static_cast<float*>(backend.alloc(4 * sizeof(float)));
    backend.free(freed);
    backend.sum_squares(freed, 4);
    EXPECT_THAT(backend.violations, ElementsAre("sum_squares: x"));
    backend.violations.clear();

    // rows [0, 2) of expert 0 and [2, 4) of expert 1: the offsets are host memory, the operands views of buffers
    const std::vector<int> offsets_host = {0, 2, 4};
    Buffer<float> in(&backend, 4 * 3), w(&backend, 2 * 5 * 3), out(&backend, 4 * 5);
    backend.grouped_matmul_forward(out.data(), in.data(), w.data(), offsets_host.data(), 2, 3, 5);
    backend.grouped_matmul_forward(out.data(), in.data(), w.data() + 15, offsets_host.data(), 1, 3, 5);
    EXPECT_THAT(backend.violations, IsEmpty());
    backend.grouped_matmul_forward(out.data(), in.data(), w.data() + 1, offsets_host.data(), 2, 3, 5);
    EXPECT_THAT(backend.violations, ElementsAre("grouped_matmul_forward: w"));
    backend.violations.clear();

    // row_src 5 / K = 2 reads token row 2 of a 2-token x_ND; an embedding token 3 reads row 3 of a 3-row table
    Buffer<int32_t> row_src(&backend, 2), tokens(&backend, 1);
    row_src.upload({0, 5});
    tokens.upload({3});
    Buffer<float> x_ND(&backend, 2 * 4), x_RD(&backend, 2 * 4), table(&backend, 3 * 4);
    backend.moe_gather_forward(x_RD.data(), x_ND.data(), row_src.data(), 2, 2, 4);
    backend.embedding_forward(x_RD.data(), tokens.data(), table.data(), 1, 4);
    EXPECT_THAT(backend.violations, ElementsAre("moe_gather_forward: x_ND", "embedding_forward: table"));
}

// A weight read through the model's bf16 weight copy after a write the copy missed is caught; the copy
// re-rounded, or fp32 precision (which reads no copy), is fine.
TEST(MemoryCheckingBackend, CatchesAStaleBf16WeightCopy) {
    MemoryCheckingBackend backend;
    backend.set_matmul_precision(MatmulPrecision::kBf16);
    Buffer<float> w(&backend, 2 * 3), in(&backend, 4 * 3), out(&backend, 4 * 2);
    Buffer<uint16_t> w16(&backend, 2 * 3);
    w.upload({1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f});
    backend.set_bf16_weight_copy(w.data(), w16.data(), 6);
    backend.float_to_bf16(w16.data(), w.data(), 6);
    backend.matmul_forward(out.data(), in.data(), w.data(), nullptr, 4, 3, 2);
    EXPECT_THAT(backend.violations, IsEmpty());
    backend.scale(w.data() + 3, 0.5f, 3);  // an optimizer step the copy does not see
    backend.matmul_forward(out.data(), in.data(), w.data(), nullptr, 4, 3, 2);
    EXPECT_THAT(backend.violations, ElementsAre("matmul_forward: w (stale bf16 weight copy)"));
    backend.violations.clear();
    backend.set_matmul_precision(MatmulPrecision::kFp32);
    backend.matmul_forward(out.data(), in.data(), w.data(), nullptr, 4, 3, 2);
    backend.set_matmul_precision(MatmulPrecision::kBf16);
    backend.float_to_bf16(w16.data(), w.data(), 6);
    backend.matmul_forward(out.data(), in.data(), w.data(), nullptr, 4, 3, 2);
    EXPECT_THAT(backend.violations, IsEmpty());
}

struct Variant {
    std::string name;
    ModelConfig config;
    bool recompute = false;    // MLP and attention activation recompute
    bool keep_logits = true;   // false: the loss in place over the logits
    bool bf16 = false;         // bf16 matmul precision
    bool router_only = false;  // router fine-tuning: every other tensor frozen
};

void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

ModelConfig small_config() {
    ModelConfig c = tiny_model_config();
    c.router.hidden = 5;
    c.router.train_samples = 2;
    c.router.eval_samples = 3;
    c.router.ensemble_size = 3;
    c.router.swag_every = 1;  // two steps leave the two snapshots SWAG sampling needs
    c.router.swag_rank = 2;
    return c;
}

std::vector<Variant> variants() {
    std::vector<Variant> models;
    for (const RouterType type : kAllTypes) {
        ModelConfig c = small_config();
        c.router.type = type;
        // a selection bias moves topk off its fused router_topk ops onto router_rows (the other families' path)
        c.router.selection_bias_rate = type == RouterType::kTopK ? 0.0f : 0.01f;
        models.push_back({std::string("router_") + to_string(type), c});
        if (type != RouterType::kTopK) continue;
        c.router.selection_bias_rate = 0.01f;
        models.push_back({"router_topk_selection_bias", c});
    }
    ModelConfig gpt2 = small_config();
    gpt2.norm = NormType::kLayerNorm;
    gpt2.position = PositionType::kLearned;
    gpt2.activation = Activation::kGelu;
    gpt2.tie_embeddings = true;
    gpt2.num_kv_heads = 4;
    models.push_back({"gpt2_like", gpt2});
    ModelConfig mixed = small_config();
    mixed.moe_every = 2;  // layer 0 dense, layer 1 MoE
    mixed.top_k = 1;
    mixed.num_kv_heads = 1;
    mixed.router_renormalize = false;
    models.push_back({"dense_and_moe_top1_mqa", mixed});
    ModelConfig capped = small_config();
    capped.capacity_factor = 0.75f;  // drops copies: slot_row holds -1
    models.push_back({"capacity_dropping", capped});

    std::vector<Variant> all;
    for (const Variant& m : models) {
        all.push_back(m);
        all.push_back({.name = m.name + "_recompute", .config = m.config, .recompute = true});
        all.push_back({.name = m.name + "_in_place_loss", .config = m.config, .keep_logits = false});
        all.push_back({.name = m.name + "_bf16", .config = m.config, .bf16 = true});
        all.push_back({.name = m.name + "_bf16_logits", .config = m.config, .keep_logits = false, .bf16 = true});
        all.push_back({.name = m.name + "_router_finetune", .config = m.config, .router_only = true});
        all.push_back({.name = m.name + "_everything",
                       .config = m.config,
                       .recompute = true,
                       .keep_logits = false,
                       .bf16 = true,
                       .router_only = true});
    }
    return all;
}

// Two optimizer steps of two micro-batches (B x T = 2 x 5, then 1 x 7: the second reallocates the activations),
// then evaluation forwards in sample mode with targets (3 x 4: larger again) and in mean mode with input noise.
// Returns the backend's violations.
std::vector<std::string> train_and_evaluate(MemoryCheckingBackend& backend, const Variant& v) {
    backend.set_matmul_precision(v.bf16 ? MatmulPrecision::kBf16 : MatmulPrecision::kFp32);
    Model model(v.config, &backend);
    model.init_weights(5);
    model.set_mlp_recompute(v.recompute);
    model.set_attention_recompute(v.recompute);
    model.set_keep_logits(v.keep_logits);
    if (v.router_only) model.set_trainable({"block_sparse_moe\\.(gate|router)\\."});
    trainer::AdamW optimizer(trainer::OptimConfig{}, model);
    const LossWeights weights{0.01f, 0.001f, 0.01f};
    const int V = v.config.vocab_size;
    auto batch = [&](int n, int offset) {
        std::vector<int32_t> t(n);
        for (int i = 0; i < n; ++i) t[i] = (3 * i + offset) % V;
        return t;
    };
    for (int step = 1; step <= 2; ++step) {
        model.zero_grad();
        int first_token = 0;
        for (const auto& [B, T] : {std::pair{2, 5}, std::pair{1, 7}}) {
            std::vector<int32_t> tokens = batch(B * T, step), targets = batch(B * T, step + 1);
            targets[1] = -1;  // an ignored position
            model.set_routing(RoutingContext{7, step, first_token});
            first_token += B * T;
            const ForwardStats stats = model.forward(tokens.data(), targets.data(), B, T, weights);
            EXPECT_TRUE(std::isfinite(stats.total_loss)) << v.name;
            model.backward(0.5f);
        }
        optimizer.step(1e-3f, optimizer.clip_scale(optimizer.grad_norm()));
        model.end_step(step);
    }
    RoutingContext eval{7, 2, 0};
    eval.training = false;
    model.set_routing(eval);
    const std::vector<int32_t> tokens = batch(12, 4), targets = batch(12, 5);
    EXPECT_TRUE(std::isfinite(model.forward(tokens.data(), targets.data(), 3, 4, weights).total_loss)) << v.name;
    eval.mode = RouterMode::kMean;
    eval.input_noise = 0.1f;
    model.set_routing(eval);
    model.forward(tokens.data(), nullptr, 3, 4, weights);
    model.logits_to_host();
    return backend.violations;
}

class BackendMemoryTest : public ::testing::TestWithParam<Variant> {};

TEST_P(BackendMemoryTest, TrainingAndEvaluationPassOnlyBackendMemoryOfTheRightSize) {
    MemoryCheckingBackend backend;
    EXPECT_THAT(train_and_evaluate(backend, GetParam()), IsEmpty()) << GetParam().name;
}

INSTANTIATE_TEST_SUITE_P(Models,
                         BackendMemoryTest,
                         ::testing::ValuesIn(variants()),
                         [](const ::testing::TestParamInfo<Variant>& info) { return info.param.name; });

// The trainer on a backend acting as device memory (is_host() false, as CUDA is): training with
// gradient accumulation and clipping, validation, checkpoints (parameters, AdamW moments and router
// state downloaded), then a run resumed from one (uploaded back) and an evaluation-mode forward.
TEST(BackendMemory, TrainerCheckpointAndResumeOnDeviceMemory) {
    trainer::RunConfig c;
    c.model = small_config();
    c.model.router.type = RouterType::kLogitMf;
    c.model.router.selection_bias_rate = 0.01f;  // checkpointed router state
    c.model.vocab_size = 256;                    // the built-in byte-level corpus
    c.data.batch_size = 4;
    c.data.seq_len = 8;
    c.data.train_tokens = 5000;
    c.train.steps = 4;
    c.train.grad_accum = 2;
    c.train.eval_every = 2;
    c.train.eval_batches = 1;
    c.train.plot = false;
    c.train.out_dir = (std::filesystem::temp_directory_path() / "bmoe_backend_memory_trainer").string();
    std::filesystem::remove_all(c.train.out_dir);
    c.checkpoint.every = 2;
    std::ostringstream log;
    auto run = [&](const trainer::RunConfig& config) {
        auto backend = std::make_unique<MemoryCheckingBackend>(/*act_as_device=*/true);
        MemoryCheckingBackend* checker = backend.get();
        trainer::Trainer trainer(config, log, nullptr, std::move(backend));
        trainer.run();
        EXPECT_GT(checker->checked_ops.count("download"), 0u);
        return checker->violations;
    };
    EXPECT_THAT(run(c), IsEmpty());
    trainer::RunConfig resumed = c;
    resumed.checkpoint.resume = "auto";
    resumed.train.steps = 6;
    EXPECT_THAT(run(resumed), IsEmpty());
    EXPECT_THAT(log.str(), ::testing::HasSubstr("resum"));
    std::filesystem::remove_all(c.train.out_dir);
}

// The runs above call (and so check) every op a model on one rank calls (the CPU's bf16 attention ops are Backend's
// defaults: widened q, k, v into the fp32 ops); copy is not called by the model.
TEST(BackendMemory, TheModelsCoverEveryOp) {
    MemoryCheckingBackend backend;
    for (const Variant& v : variants())
        if (v.name.find("_everything") != std::string::npos || v.name == "router_topk" || v.name == "gpt2_like" ||
            v.name == "router_topk_bf16")  // no recompute: the bf16 gather
            train_and_evaluate(backend, v);
    std::istringstream names(
        "accumulate adamw_update add add_input_noise attention_backward attention_forward cross_entropy_backward "
        "bf16_to_float cross_entropy_backward_bf16 cross_entropy_forward cross_entropy_forward_bf16 download "
        "dropout_mask "
        "embedding_backward embedding_forward float_to_bf16 gelu_backward gelu_forward "
        "gelu_backward_bf16 gelu_forward_bf16 grouped_matmul_backward grouped_matmul_backward_bf16 "
        "grouped_matmul_forward "
        "grouped_matmul_forward_bf16 layernorm_backward layernorm_forward layernorm_forward_bf16 matmul_backward "
        "matmul_backward_bf16 matmul_forward matmul_forward_bf16 moe_combine_backward moe_combine_backward_bf16 "
        "moe_combine_forward moe_gather_backward moe_gather_forward moe_gather_forward_bf16 moe_plan_routing mul "
        "position_backward position_forward rmsnorm_backward rmsnorm_forward rmsnorm_forward_bf16 rope_backward "
        "rope_forward router_rows "
        "router_topk_backward router_topk_forward scale sum_squares swiglu_backward swiglu_backward_bf16 "
        "swiglu_forward swiglu_forward_bf16 "
        "upload zero");
    const std::set<std::string> expected{std::istream_iterator<std::string>(names), {}};
    EXPECT_EQ(backend.checked_ops, expected);
}

}  // namespace
}  // namespace bmoe::model
