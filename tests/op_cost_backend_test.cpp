// op_cost_backend_test.cpp -- OpCostBackend (model/op_cost_backend.h): the FLOPs and bytes it
// books for whole training steps match independent counts, its roofline arithmetic is the formula,
// and a model runs on it without reading a buffer.
#include "model/op_cost_backend.h"

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "model/cpu_backend.h"
#include "model/model.h"
#include "parallel/check.h"
#include "router_test_util.h"
#include "trainer/optimizer.h"

namespace bmoe::model {
namespace {

constexpr int kB = 2, kT = 8;

// Sum of a ledger's rows whose key starts with one of the prefixes.
OpCost rows_starting_with(const OpCostBackend& be, std::initializer_list<const char*> prefixes) {
    OpCost sum;
    for (const auto& [key, row] : be.ledger())
        for (const char* p : prefixes)
            if (key.rfind(p, 0) == 0) {
                sum.calls += row.calls;
                sum.flops += row.flops;
                sum.bytes += row.bytes;
                sum.seconds += row.seconds;
            }
    return sum;
}

// One training step (forward, backward, AdamW) of `config` on `be`; the ledger then holds the
// second step only (the first allocates what later steps reuse).
struct Step {
    Step(const ModelConfig& config, Backend* be) : net(config, be), adamw(optim, net) {
        net.init_weights(/*seed=*/1);
        net.set_keep_logits(false);
        for (int i = 0; i < kB * kT; ++i) {
            tokens.push_back(i * 7 % config.vocab_size);
            targets.push_back(i * 5 % config.vocab_size);
        }
    }
    void forward() { net.forward(tokens.data(), targets.data(), kB, kT, LossWeights{}); }
    void train() {
        net.zero_grad();
        forward();
        net.backward(1.0f);
        adamw.step(optim.lr, adamw.clip_scale(adamw.grad_norm()));
    }
    Model net;
    trainer::OptimConfig optim;
    trainer::AdamW adamw;
    std::vector<int32_t> tokens, targets;
};

TEST(OpCostBackend, GemmFlopsAreTheActiveMatmulParametersTimesTwoPerTokenAndPass) {
    for (const int moe_every : {1, 2}) {  // all MoE layers; a dense layer, then an MoE one
        ModelConfig c = tiny_model_config();
        c.moe_every = moe_every;
        OpCostBackend be;
        Step step(c, &be);
        step.train();
        be.clear_ledger();
        step.forward();
        const double active = static_cast<double>(step.net.layout().active_matmul_params());
        const double tokens = kB * kT;
        EXPECT_DOUBLE_EQ(rows_starting_with(be, {"matmul_forward", "grouped_matmul_forward"}).flops,
                         2.0 * active * tokens)
            << "moe_every " << moe_every;
        // attention scores: Q K^T and P V over the full T x T squares, per layer and head
        EXPECT_DOUBLE_EQ(rows_starting_with(be, {"attention_forward"}).flops,
                         4.0 * c.num_layers * kB * c.num_heads * kT * kT * c.head_dim());

        be.clear_ledger();
        step.net.backward(1.0f);
        // every weight trains and every activation gradient flows: d input and d weight per product
        EXPECT_DOUBLE_EQ(rows_starting_with(be, {"matmul_backward", "grouped_matmul_backward"}).flops,
                         4.0 * active * tokens)
            << "moe_every " << moe_every;
    }
}

TEST(OpCostBackend, AdamWMovesSevenFloatsPerParameterAndPeakMemoryIsTheCpuBackends) {
    const ModelConfig c = tiny_model_config();
    OpCostBackend cost;
    Step on_cost(c, &cost);
    on_cost.train();
    cost.clear_ledger();
    on_cost.train();
    const double params = static_cast<double>(on_cost.net.layout().total_numel());
    EXPECT_DOUBLE_EQ(rows_starting_with(cost, {"adamw_update"}).bytes, 28.0 * params);

    CpuBackend cpu;
    Step on_cpu(c, &cpu);
    on_cpu.train();
    on_cpu.train();
    // the same buffers; the CPU backend counts each rounded up to its 64-byte alignment
    EXPECT_LE(cost.peak_allocated_bytes(), cpu.peak_allocated_bytes());
    EXPECT_GE(static_cast<double>(cost.peak_allocated_bytes()), 0.99 * static_cast<double>(cpu.peak_allocated_bytes()));
}

TEST(OpCostBackend, OneBf16GemmIsItsOperandCopiesAndTheSlowerOfComputeAndMemory) {
    CostModel m;
    m.gpu = {"test card", 100e12, 10e12, 1e12};
    m.gemm_efficiency = 0.5;
    m.bandwidth_efficiency = 0.5;
    m.min_kernel_seconds = 0.0;
    OpCostBackend be(m);
    be.set_matmul_precision(MatmulPrecision::kBf16);
    const int N = 4096, I = 512, O = 1024;
    be.matmul_forward(nullptr, nullptr, nullptr, nullptr, N, I, O);
    const double in = double(N) * I, w = double(O) * I, out = double(N) * O;
    const OpCost& in_copy = be.ledger().at("bf16 copies, activation: matmul_forward 4096x512x1024");
    const OpCost& w_copy = be.ledger().at("bf16 copies, weight: matmul_forward 4096x512x1024");
    EXPECT_EQ(in_copy.calls + w_copy.calls, 2);  // each rounded once
    EXPECT_DOUBLE_EQ(in_copy.bytes, in * 6.0);
    EXPECT_DOUBLE_EQ(w_copy.bytes, w * 6.0);
    EXPECT_DOUBLE_EQ(in_copy.seconds + w_copy.seconds, (in + w) * 6.0 / 0.5e12);
    const OpCost& gemm = be.ledger().at("matmul_forward 4096x512x1024");
    EXPECT_DOUBLE_EQ(gemm.flops, 2.0 * N * I * O);
    EXPECT_DOUBLE_EQ(gemm.bytes, (in + w) * 2.0 + out * 4.0);
    EXPECT_DOUBLE_EQ(gemm.seconds, std::max(2.0 * N * I * O / 50e12, gemm.bytes / 0.5e12));

    // fp32: no copies, fp32 operands, the CUDA cores' peak
    OpCostBackend fp32(m);
    fp32.matmul_forward(nullptr, nullptr, nullptr, nullptr, N, I, O);
    EXPECT_EQ(fp32.ledger().size(), 1u);
    EXPECT_DOUBLE_EQ(fp32.total().seconds, std::max(2.0 * N * I * O / 5e12, (in + w + out) * 4.0 / 0.5e12));

    // bf16 activation storage (what-if): the activation needs no copy, the weight still does
    m.activation_bytes = 2;
    OpCostBackend stored(m);
    stored.set_matmul_precision(MatmulPrecision::kBf16);
    stored.matmul_forward(nullptr, nullptr, nullptr, nullptr, N, I, O);
    EXPECT_EQ(stored.ledger().count("bf16 copies, activation: matmul_forward 4096x512x1024"), 0u);
    EXPECT_DOUBLE_EQ(stored.ledger().at("bf16 copies, weight: matmul_forward 4096x512x1024").bytes, w * 6.0);
}

// The LM head and loss of a training step on bf16 logits: the GEMM writes 2 bytes per logit, the
// loss reads them once and writes d logits once, and no d logits copy precedes the backward GEMMs.
// With fp32 logits (set_bf16_logits(false)) the loss moves 20 bytes per logit against 6.
TEST(OpCostBackend, TheLossOnBf16LogitsMovesAThirdOfTheFp32LogitsBytes) {
    ModelConfig c = tiny_model_config();
    const double N = kB * kT, V = c.vocab_size, D = c.d_model;
    const std::string head =
        std::to_string(kB * kT) + "x" + std::to_string(c.d_model) + "x" + std::to_string(c.vocab_size);
    double loss_bytes[2];  // bf16 logits, fp32 logits
    for (const bool bf16_logits : {true, false}) {
        OpCostBackend be;
        be.set_matmul_precision(MatmulPrecision::kBf16);
        Step step(c, &be);
        step.net.set_bf16_logits(bf16_logits);
        step.train();
        be.clear_ledger();
        step.train();
        const std::map<std::string, OpCost>& rows = be.ledger();
        // the backward's activation copy: the d logits with fp32 logits (the final norm writes the
        // head's input in bf16)
        EXPECT_EQ(rows.count("bf16 copies, activation: matmul_backward " + head), bf16_logits ? 0u : 1u);
        if (!bf16_logits) {
            EXPECT_DOUBLE_EQ(rows.at("bf16 copies, activation: matmul_backward " + head).bytes, 6.0 * N * V);
        }
        EXPECT_EQ(rows.count("cross_entropy_forward_bf16"), bf16_logits ? 1u : 0u);
        // the forward GEMM: bf16 operands, then N x V outputs of 2 (bf16) or 4 bytes
        EXPECT_DOUBLE_EQ(rows.at("matmul_forward " + head).bytes,
                         (N * D + V * D) * 2.0 + N * V * (bf16_logits ? 2 : 4));
        loss_bytes[bf16_logits ? 0 : 1] = rows_starting_with(be, {"cross_entropy"}).bytes;
    }
    EXPECT_DOUBLE_EQ(loss_bytes[0], 6.0 * N * V + 20.0 * N);
    EXPECT_DOUBLE_EQ(loss_bytes[1], 20.0 * N * V + 12.0 * N);
}

// With the model's bf16 weight copy (the default) no GEMM op rounds a weight: AdamW writes the copy as
// it updates the weights (2 bytes more per parameter), so after the first forward's rounding the copy
// needs no pass of its own. Without it, each GEMM op rounds its weight.
TEST(OpCostBackend, TheBf16WeightCopyReplacesThePerOpWeightCopies) {
    const ModelConfig c = tiny_model_config();
    for (const bool copy : {true, false}) {
        OpCostBackend be;
        be.set_matmul_precision(MatmulPrecision::kBf16);
        Step step(c, &be);
        step.net.set_bf16_weights(copy);
        step.train();
        be.clear_ledger();
        step.train();
        const OpCost per_op = rows_starting_with(be, {"bf16 copies, weight: matmul", "bf16 copies, weight: grouped"});
        const OpCost whole = rows_starting_with(be, {"bf16 copies, weight: the model's weight copy"});
        const double adamw_bytes = rows_starting_with(be, {"adamw_update"}).bytes;
        size_t params = 0;  // AdamW's: every tensor is trainable here
        for (const ParamInfo& p : step.net.layout().params()) params += p.numel;
        EXPECT_EQ(whole.calls, 0) << "the copy re-rounded in a pass of its own";
        if (copy) {
            EXPECT_EQ(per_op.calls, 0) << "a GEMM rounded a weight the copy holds";
            EXPECT_DOUBLE_EQ(adamw_bytes, 30.0 * static_cast<double>(params));
        } else {
            EXPECT_GT(per_op.calls, 0);
            EXPECT_DOUBLE_EQ(adamw_bytes, 28.0 * static_cast<double>(params));
        }
    }
}

// bf16 GEMM inputs (the default): per layer the attention norm's bf16 output feeds Q, K and V and
// the attention output is rounded once for its projection, forward and backward; the final norm's
// feeds the LM head. Per op rounding copies them 4 times per layer forward (plus the head's) and 4
// times backward (plus the head's). Without RoPE attention's backward writes bf16 dq, dk, dv, so
// only the output projection's d output is still rounded per op (with RoPE, which rotates them in
// fp32, all four are). The MoE blocks gather their experts' rows and write their d rows in bf16:
// no rounding pass for the rows, none in the down projection's backward.
TEST(OpCostBackend, Bf16GemmInputsRoundEachDenseGemmInputOnce) {
    for (const PositionType position : {PositionType::kRope, PositionType::kLearned}) {
        ModelConfig c = tiny_model_config();
        c.position = position;
        const int L = c.num_layers, moe_layers = c.num_moe_layers();
        const bool rope = position == PositionType::kRope;
        ASSERT_GT(moe_layers, 0);
        int explicit_copies[2] = {0, 0};  // float_to_bf16 calls per step: bf16 GEMM inputs, rounded per op
        for (const bool inputs16 : {true, false}) {
            OpCostBackend be;
            be.set_matmul_precision(MatmulPrecision::kBf16);
            be.set_attention_kernel(AttentionKernel::kFlash);
            Step step(c, &be);
            step.net.set_bf16_gemm_inputs(inputs16);
            step.train();
            be.clear_ledger();
            step.train();
            const std::string at = std::string(inputs16 ? " (bf16 GEMM inputs" : " (rounded per op") +
                                   (rope ? ", RoPE)" : ", learned positions)");
            EXPECT_EQ(rows_starting_with(be, {"bf16 copies, activation: matmul_forward"}).calls,
                      inputs16 ? 0 : 4 * L + 1)
                << at;
            // backward: the head's d logits are bf16 either way
            EXPECT_EQ(rows_starting_with(be, {"bf16 copies, activation: matmul_backward"}).calls,
                      inputs16 ? (rope ? 4 : 1) * L : 8 * L + 1)
                << at;
            EXPECT_EQ(be.seconds_by_profiled_op().count("attention_backward_bf16"), inputs16 && !rope ? 1u : 0u) << at;
            explicit_copies[inputs16 ? 0 : 1] =
                rows_starting_with(be, {"bf16 copies, activation: float_to_bf16"}).calls;
            EXPECT_EQ(rows_starting_with(be, {"moe_gather_forward_bf16"}).calls, inputs16 ? moe_layers : 0) << at;
            EXPECT_EQ(rows_starting_with(be, {"moe_combine_backward_bf16"}).calls, inputs16 ? moe_layers : 0) << at;
            EXPECT_EQ(rows_starting_with(be, {"bf16 copies, activation: grouped_matmul_backward"}).calls,
                      inputs16 ? 0 : moe_layers)
                << at << ": the down projection's d rows";
        }
        // one rounding of the attention output per layer; none of the MoE blocks' gathered rows
        EXPECT_EQ(explicit_copies[0] - explicit_copies[1], L - moe_layers);
    }
}

TEST(OpCostBackend, FlashAttentionCostsTheCausalHalfAndSavesOnlyTheLse) {
    OpCostBackend be;
    be.set_matmul_precision(MatmulPrecision::kBf16);
    const int B = 2, T = 1024, H = 4, Hd = 64;
    EXPECT_EQ(be.attention_saved_numel(B, T, H, Hd), size_t{B} * H * T * T);
    be.attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, B, T, H, H, Hd);
    be.set_attention_kernel(AttentionKernel::kFlash);
    EXPECT_EQ(be.attention_saved_numel(B, T, H, Hd), size_t{B} * H * T);
    be.attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, B, T, H, H, Hd);
    const OpCost& gemm = be.ledger().at("attention_forward");
    const OpCost& flash = be.ledger().at("attention_forward (flash)");
    EXPECT_DOUBLE_EQ(flash.flops * 2.0, gemm.flops);
    EXPECT_LT(flash.bytes * 10.0, gemm.bytes);  // no [B, H, T, T] scores through memory
}

TEST(OpCostBackend, EveryRouterFamilyTrainsWithoutReadingABufferAndDownloadsAreZeros) {
    // The backend's addresses have no memory behind them: a host read of a buffer would crash.
    for (const RouterType type : kAllTypes) {
        ModelConfig c = tiny_model_config();
        c.router.type = type;
        c.router.swag_every = 1;
        OpCostBackend be;
        be.set_matmul_precision(MatmulPrecision::kBf16);
        Step step(c, &be);
        step.train();
        step.train();
        EXPECT_GT(rows_starting_with(be, {"router"}).calls, 0) << to_string(type);
    }
    OpCostBackend be;
    void* buffer = be.alloc(16);
    std::vector<unsigned char> host(16, 0xab);
    be.download(host.data(), buffer, host.size());
    EXPECT_EQ(host, std::vector<unsigned char>(16, 0));
    EXPECT_EQ(be.ledger().at("host transfers").calls, 1);
    EXPECT_THROW(gpu_spec("a100"), bmoe::Error);
}

// The host's work after synchronising downloads (the GPU idles meanwhile) is measured from the first
// of consecutive downloads to the next kernel: one gap per MoE layer's routing at least, within the
// step's wall time, outside the ledger, and reset with it.
TEST(OpCostBackend, HostWorkAfterSynchronisingDownloadsIsMeasuredOutsideTheLedger) {
    const ModelConfig c = tiny_model_config();
    OpCostBackend be;
    Step step(c, &be);
    step.train();
    be.clear_ledger();
    EXPECT_EQ(be.host_after_sync().syncs, 0);
    const auto start = std::chrono::steady_clock::now();
    step.train();
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const OpCostBackend::HostGaps& gaps = be.host_after_sync();
    int moe_layers = 0;
    for (int l = 0; l < c.num_layers; ++l) moe_layers += c.is_moe_layer(l) ? 1 : 0;
    EXPECT_GE(gaps.syncs, moe_layers);
    EXPECT_GT(gaps.seconds, 0.0);
    EXPECT_LT(gaps.seconds, wall);
    const OpCost before = be.total();
    step.forward();  // the ledger grows by the forward's ops only: no row for host time
    for (const auto& [key, row] : be.ledger()) EXPECT_EQ(key.find("host work"), std::string::npos) << key;
    EXPECT_GT(be.total().seconds, before.seconds);
}

// bench_train --profile sets each op's measured GPU time beside seconds_by_profiled_op()[name]:
// the names must be the ones the CUDA backend's ProfiledOp scopes give (model/cuda/*.cu), and the
// per-op times must add up to the step's.
TEST(OpCostBackend, ProfiledOpNamesAreTheCudaProfilersAndAddUpToTheStep) {
    std::string cuda_sources;
    for (const auto& entry : std::filesystem::directory_iterator(std::string(BMOE_SOURCE_DIR) + "/model/cuda")) {
        if (entry.path().extension() != ".cu") continue;
        std::ifstream in(entry.path());
        std::stringstream text;
        text << in.rdbuf();
        cuda_sources += text.str();
    }
    ASSERT_FALSE(cuda_sources.empty());
    const std::regex shaped(R"((\w+) \d+x\d+x\d+)");
    for (const AttentionKernel kernel : {AttentionKernel::kGemm, AttentionKernel::kFlash}) {
        for (const RouterType type : {RouterType::kTopK, RouterType::kLogitMf}) {
            ModelConfig c = tiny_model_config();
            c.router.type = type;
            c.activation = type == RouterType::kTopK ? Activation::kGelu : Activation::kSwiGlu;
            c.norm = type == RouterType::kTopK ? NormType::kLayerNorm : NormType::kRmsNorm;
            OpCostBackend be;
            be.set_matmul_precision(MatmulPrecision::kBf16);
            be.set_attention_kernel(kernel);
            Step step(c, &be);
            step.train();
            be.clear_ledger();
            step.train();
            double sum = 0.0;
            for (const auto& [name, seconds] : be.seconds_by_profiled_op()) {
                std::smatch m;
                const std::string base = std::regex_match(name, m, shaped) ? m[1].str() : name;
                EXPECT_NE(cuda_sources.find("\"" + base + "\""), std::string::npos)
                    << "'" << name << "' is no op name of the CUDA backend's profiler";
                sum += seconds;
            }
            EXPECT_NEAR(sum, be.total().seconds, 1e-12 * be.total().calls);
            // the LM head's product (bf16 logits, as training runs it): its GEMM under the profiler's
            // name, with no copies -- the final norm wrote its input in bf16, the weight comes from
            // the model's bf16 copy
            const std::map<std::string, OpCost>& rows = be.ledger();
            EXPECT_DOUBLE_EQ(be.seconds_by_profiled_op().at("matmul_fwd_bf16 16x16x23"),
                             rows.at("matmul_forward 16x16x23").seconds);
            EXPECT_EQ(rows.count("bf16 copies, activation: matmul_forward 16x16x23"), 0u);
            EXPECT_EQ(rows.count("bf16 copies, weight: matmul_forward 16x16x23"), 0u);
        }
    }
}

}  // namespace
}  // namespace bmoe::model
