// model_grad_test.cpp -- finite-difference checks of the whole model's backward pass.
//
// For every parameter tensor we compare the analytic directional derivative <grad, u> with
// (L(p + eps u) - L(p - eps u)) / 2 eps for a random direction u, on tiny shapes, for the model
// variants the config offers (RMSNorm/LayerNorm, RoPE/learned positions, SwiGLU/GELU, GQA, tied
// head, dense+MoE layers, renormalised or raw gates). The loss includes the aux and z losses, so
// this also checks the router's gradient paths. Top-k selection is discontinuous: eps is small
// enough that no token changes experts for these seeds (2e-3 already flips a near-tie in the
// capacity variant, where one flip also moves which copies are dropped).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "model/cpu_backend.h"
#include "model/layer_scratch.h"
#include "model/mlp.h"
#include "model/model.h"
#include "parallel/check.h"
#include "tests/memory_checking_backend.h"
#include "tests/router_test_util.h"

namespace bmoe::model {
namespace {

struct Variant {
    std::string name;
    ModelConfig config;
};

std::vector<Variant> variants() {
    std::vector<Variant> v;
    v.push_back({"mixtral_like", tiny_model_config()});
    ModelConfig gpt2 = tiny_model_config();
    gpt2.norm = NormType::kLayerNorm;
    gpt2.position = PositionType::kLearned;
    gpt2.activation = Activation::kGelu;
    gpt2.tie_embeddings = true;
    gpt2.num_kv_heads = 4;
    v.push_back({"gpt2_like", gpt2});
    ModelConfig mixed = tiny_model_config();
    mixed.moe_every = 2;  // layer 0 dense, layer 1 MoE
    mixed.router_renormalize = false;
    mixed.top_k = 1;
    mixed.num_kv_heads = 1;
    v.push_back({"dense_and_moe_raw_gates_top1_mqa", mixed});
    ModelConfig capped = tiny_model_config();
    capped.capacity_factor = 0.75f;  // drops copies: dropped tokens pass through the residual
    v.push_back({"capacity_dropping", capped});
    // every router family inside the whole model (router_test checks each router on its own)
    for (const RouterType type :
         {RouterType::kTempSampling, RouterType::kMcDropout, RouterType::kEnsemble, RouterType::kWeightMfvi,
          RouterType::kLogitMf, RouterType::kLogitFc, RouterType::kVtsr}) {
        ModelConfig c = tiny_model_config();
        c.router.type = type;
        c.router.hidden = 5;
        c.router.train_samples = type == RouterType::kLogitFc ? 2 : 1;
        c.router.weight_sigma_init = 0.2f;
        v.push_back({std::string("router_") + to_string(type), c});
    }
    return v;
}

class ModelGradTest : public ::testing::TestWithParam<Variant> {};

double loss_of(
    Model& m, const std::vector<int32_t>& tok, const std::vector<int32_t>& tgt, int B, int T, const LossWeights& w) {
    return m.forward(tok.data(), tgt.data(), B, T, w).total_loss;
}

TEST_P(ModelGradTest, DirectionalDerivativesMatchFiniteDifferences) {
    const ModelConfig cfg = GetParam().config;
    CpuBackend backend;
    Model model(cfg, &backend);
    model.init_weights(7);
    const int B = 2, T = 7;
    std::mt19937 gen(11);
    std::vector<int32_t> tokens(B * T), targets(B * T);
    for (auto& t : tokens) t = static_cast<int32_t>(gen() % cfg.vocab_size);
    for (auto& t : targets) t = static_cast<int32_t>(gen() % cfg.vocab_size);
    targets[3] = -1;                              // an ignored position
    const LossWeights weights{0.5f, 0.1f, 0.2f};  // large so the aux/z/regulariser gradients are visible
    // Fixed routing noise; stochastic routers put some tokens close to a tie between experts, and a
    // finite difference across a tie measures a jump, so pick a noise seed whose routing survives
    // perturbing every parameter at a few times the probe size.
    auto selection = [&] {
        std::vector<int32_t> all;
        for (int i = 0; i < model.num_moe_blocks(); ++i) {
            const std::vector<int32_t>& idx = model.moe_block(i).router().outputs().topk_idx;
            all.insert(all.end(), idx.begin(), idx.end());
        }
        return all;
    };
    if (cfg.router.is_stochastic()) {  // (topk's routing does not depend on the seed)
        const std::vector<float> init = model.params_to_host();
        std::normal_distribution<float> jitter(0.0f, 1e-3f);
        bool stable = false;
        for (uint64_t seed = 1; seed <= 50 && !stable; ++seed) {
            model.set_routing(RoutingContext{seed, /*step=*/2, /*first_token=*/40});
            model.params_from_host(init);
            loss_of(model, tokens, targets, B, T, weights);
            const std::vector<int32_t> reference = selection();
            stable = true;
            for (int trial = 0; trial < 4 && stable; ++trial) {
                std::vector<float> w = init;
                for (float& x : w) x += jitter(gen);
                model.params_from_host(w);
                loss_of(model, tokens, targets, B, T, weights);
                stable = selection() == reference;
            }
        }
        ASSERT_TRUE(stable) << "no routing noise seed without near-ties";
        model.params_from_host(init);
    }

    model.zero_grad();
    model.forward(tokens.data(), targets.data(), B, T, weights);
    model.backward(1.0f);
    const std::vector<float> grads = model.grads_to_host();
    const std::vector<float> base = model.params_to_host();
    const std::vector<int32_t> base_selection = selection();

    std::normal_distribution<float> normal(0.0f, 1.0f);
    int checked = 0;
    for (const ParamInfo& p : model.layout().params()) {
        std::vector<float> u(p.numel);
        double analytic = 0.0, numeric = 0.0;
        // weight_mfvi: larger, its weight KL is a large constant term (fp32 noise in the difference)
        const float eps = cfg.router.type == RouterType::kWeightMfvi ? 1e-3f : 5e-4f;
        // A direction whose +-eps probes change some token's experts crosses a jump of the loss
        // (stochastic routers sit closer to ties): draw another one.
        bool same_selection = false;
        for (int attempt = 0; attempt < 8 && !same_selection; ++attempt) {
            for (auto& x : u) x = normal(gen);
            analytic = 0.0;
            for (size_t i = 0; i < p.numel; ++i) analytic += static_cast<double>(grads[p.offset + i]) * u[i];
            same_selection = true;
            auto shifted = [&](float sign) {
                std::vector<float> w = base;
                for (size_t i = 0; i < p.numel; ++i) w[p.offset + i] += sign * eps * u[i];
                model.params_from_host(w);
                const double loss = loss_of(model, tokens, targets, B, T, weights);
                same_selection = same_selection && selection() == base_selection;
                return loss;
            };
            numeric = (shifted(+1) - shifted(-1)) / (2.0 * eps);
        }
        ASSERT_TRUE(same_selection) << GetParam().name << " " << p.name << ": every direction changed the routing";
        // The floor absorbs fp32 round-off of the loss difference (~1e-4 absolute at this eps).
        // Stochastic routers: sampled logits add curvature, so their tiny derivatives get a larger floor.
        const double scale = std::max({std::abs(analytic), std::abs(numeric), cfg.router.is_stochastic() ? 0.1 : 3e-2});
        EXPECT_LT(std::abs(analytic - numeric) / scale, 5e-3)
            << GetParam().name << " " << p.name << ": analytic " << analytic << " numeric " << numeric;
        ++checked;
    }
    model.params_from_host(base);
    EXPECT_EQ(checked, static_cast<int>(model.layout().params().size()));
}

TEST_P(ModelGradTest, GradientAccumulationAddsUp) {
    // Two backward passes with scale 0.5 equal one with scale 1 (the grad-accumulation contract).
    const ModelConfig cfg = GetParam().config;
    CpuBackend backend;
    Model model(cfg, &backend);
    model.init_weights(3);
    const int B = 1, T = 5;
    std::vector<int32_t> tokens = {1, 2, 3, 4, 5}, targets = {2, 3, 4, 5, 6};
    const LossWeights w{0.01f, 0.001f};
    model.zero_grad();
    model.forward(tokens.data(), targets.data(), B, T, w);
    model.backward(1.0f);
    const std::vector<float> once = model.grads_to_host();
    model.zero_grad();
    for (int i = 0; i < 2; ++i) {
        model.forward(tokens.data(), targets.data(), B, T, w);
        model.backward(0.5f);
    }
    const std::vector<float> twice = model.grads_to_host();
    for (size_t i = 0; i < once.size(); ++i) ASSERT_NEAR(once[i], twice[i], 1e-6f + 1e-5f * std::abs(once[i])) << i;
}

// Attention recompute trades memory for time, nothing else: the loss and every gradient are bitwise
// those of a run that keeps the scores, over two micro-batches of different shapes.
TEST_P(ModelGradTest, AttentionRecomputeGivesBitwiseTheSameGradients) {
    const ModelConfig cfg = GetParam().config;
    CpuBackend backend;
    std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, targets = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    const LossWeights w{0.01f, 0.001f, 0.05f};
    std::vector<std::vector<float>> grads;
    std::vector<double> losses;
    for (bool recompute : {false, true}) {
        Model model(cfg, &backend);
        model.init_weights(3);
        model.set_attention_recompute(recompute);
        EXPECT_EQ(model.attention_recompute(), recompute);
        model.zero_grad();
        losses.push_back(model.forward(tokens.data(), targets.data(), 2, 5, w).total_loss);
        model.backward(0.5f);
        model.forward(tokens.data(), targets.data(), 1, 7, w);  // another shape reallocates the buffers
        model.backward(0.5f);
        grads.push_back(model.grads_to_host());
    }
    EXPECT_EQ(losses[0], losses[1]);
    ASSERT_EQ(grads[0].size(), grads[1].size());
    for (size_t i = 0; i < grads[0].size(); ++i) ASSERT_EQ(grads[0][i], grads[1][i]) << i;
}

// MLP activation recompute (alone and with attention recompute) is also memory for time only:
// bitwise the same loss and gradients over two micro-batches of different shapes.
TEST_P(ModelGradTest, MlpRecomputeGivesBitwiseTheSameGradients) {
    const ModelConfig cfg = GetParam().config;
    CpuBackend backend;
    std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, targets = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    const LossWeights w{0.01f, 0.001f, 0.05f};
    std::vector<std::vector<float>> grads;
    std::vector<double> losses;
    for (int mode = 0; mode < 3; ++mode) {  // none, mlp, mlp + attention
        Model model(cfg, &backend);
        model.init_weights(3);
        model.set_mlp_recompute(mode >= 1);
        model.set_attention_recompute(mode == 2);
        EXPECT_EQ(model.mlp_recompute(), mode >= 1);
        model.zero_grad();
        losses.push_back(model.forward(tokens.data(), targets.data(), 2, 5, w).total_loss);
        model.backward(0.5f);
        model.forward(tokens.data(), targets.data(), 1, 7, w);
        model.backward(0.5f);
        grads.push_back(model.grads_to_host());
    }
    for (int mode = 1; mode < 3; ++mode) {
        EXPECT_EQ(losses[0], losses[mode]) << "mode " << mode;
        ASSERT_EQ(grads[0].size(), grads[mode].size());
        for (size_t i = 0; i < grads[0].size(); ++i)
            ASSERT_EQ(grads[0][i], grads[mode][i]) << "mode " << mode << " " << i;
    }
}

// The expert MLP's [R, F] tensors in bf16 (the default under bf16 matmul precision): the GEMMs read
// the same bf16 values either way but for the pre-activations, which the activation now sees rounded
// (as under torch.autocast), so the loss moves by a bf16 rounding's worth, the gradients stay within
// bf16 noise, and the peak memory drops. The same holds with MLP recompute, which gives bitwise the
// gradients without it.
TEST_P(ModelGradTest, MlpBf16TensorsStayWithinBf16RoundingOfFp32Ones) {
    const ModelConfig cfg = GetParam().config;
    std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, targets = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    const LossWeights w{0.01f, 0.001f, 0.05f};
    std::vector<std::vector<float>> grads16;  // bf16 tensors, without and with recompute
    for (const bool recompute : {false, true}) {
        std::vector<std::vector<float>> grads;
        std::vector<double> losses;
        std::vector<size_t> peak;
        for (const bool stored16 : {false, true}) {
            CpuBackend backend;
            backend.set_matmul_precision(MatmulPrecision::kBf16);
            Model model(cfg, &backend);
            model.init_weights(3);
            model.set_mlp_recompute(recompute);
            model.set_mlp_bf16_activations(stored16);
            model.zero_grad();
            losses.push_back(model.forward(tokens.data(), targets.data(), 2, 5, w).ce_loss);
            model.backward(0.5f);
            model.forward(tokens.data(), targets.data(), 1, 7, w);
            model.backward(0.5f);
            grads.push_back(model.grads_to_host());
            peak.push_back(backend.peak_allocated_bytes());
        }
        EXPECT_NE(losses[0], losses[1]) << "the pre-activations were not rounded";
        EXPECT_NEAR(losses[1], losses[0], 1e-3 * losses[0]) << "recompute " << recompute;
        double diff = 0.0, norm = 0.0;
        for (size_t i = 0; i < grads[0].size(); ++i) {
            diff += std::pow(double(grads[1][i]) - grads[0][i], 2);
            norm += std::pow(double(grads[0][i]), 2);
        }
        EXPECT_LT(std::sqrt(diff / norm), 1.5e-2) << "relative gradient difference, recompute " << recompute;
        EXPECT_LT(peak[1], peak[0]) << "the bf16 tensors must take less memory, recompute " << recompute;
        grads16.push_back(grads[1]);
    }
    // recompute re-rounds the input rows and the activation: bitwise what was kept
    EXPECT_EQ(grads16[0], grads16[1]);
}

// The loss in place over the logits (Model::set_keep_logits(false), as the trainer runs it) changes
// nothing but memory: bitwise the same loss and gradients, one [N, V] buffer fewer.
TEST_P(ModelGradTest, InPlaceLossGivesBitwiseTheSameGradients) {
    const ModelConfig cfg = GetParam().config;
    std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, targets = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    const LossWeights w{0.01f, 0.001f, 0.05f};
    std::vector<std::vector<float>> grads;
    std::vector<double> losses;
    std::vector<size_t> peak;
    for (bool keep : {true, false}) {
        CpuBackend backend;
        Model model(cfg, &backend);
        model.init_weights(3);
        model.set_keep_logits(keep);
        model.zero_grad();
        losses.push_back(model.forward(tokens.data(), targets.data(), 2, 5, w).total_loss);
        model.backward(1.0f);
        grads.push_back(model.grads_to_host());
        peak.push_back(backend.peak_allocated_bytes());
    }
    EXPECT_EQ(losses[0], losses[1]);
    ASSERT_EQ(grads[0].size(), grads[1].size());
    for (size_t i = 0; i < grads[0].size(); ++i) ASSERT_EQ(grads[0][i], grads[1][i]) << i;
    const size_t probs_bytes = size_t{10} * cfg.vocab_size * sizeof(float);  // N = 10 tokens
    EXPECT_GE(peak[0] - peak[1], probs_bytes);
    EXPECT_LE(peak[0] - peak[1], probs_bytes + 64);  // allocations round up to 64 bytes
}

// The bf16 weight copy (the default under bf16 matmul precision) rounds the weights once per write
// instead of once per op: bitwise the same losses and gradients over steps whose weights change
// through params() (the optimizer's access) and params_from_host (a checkpoint load).
TEST_P(ModelGradTest, Bf16WeightCopyGivesBitwiseTheSameTraining) {
    const ModelConfig cfg = GetParam().config;
    std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, targets = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    const LossWeights w{0.01f, 0.001f, 0.05f};
    std::vector<std::vector<float>> grads[2];
    std::vector<double> losses[2];
    for (const bool copy : {false, true}) {
        CpuBackend backend;
        backend.set_matmul_precision(MatmulPrecision::kBf16);
        Model model(cfg, &backend);
        model.init_weights(3);
        model.set_bf16_weights(copy);
        const size_t n = model.layout().total_numel();
        for (int step = 0; step < 3; ++step) {
            model.zero_grad();
            losses[copy].push_back(model.forward(tokens.data(), targets.data(), 2, 5, w).total_loss);
            model.backward(1.0f);
            grads[copy].push_back(model.grads_to_host());
            if (step == 1) {  // a checkpoint load: other weights
                std::vector<float> host = model.params_to_host();
                for (float& x : host) x = -x;
                model.params_from_host(host);
            } else {  // an SGD step through params()
                backend.scale(model.grads(), -0.5f, n);
                backend.accumulate(model.params(), model.grads(), n);
            }
        }
    }
    EXPECT_EQ(losses[1], losses[0]);
    for (int step = 0; step < 3; ++step) EXPECT_EQ(grads[1][step], grads[0][step]) << "step " << step;
    EXPECT_NE(losses[0][0], losses[0][1]) << "the weights did not change";
    EXPECT_NE(losses[0][1], losses[0][2]) << "the weights did not change";
}

// A CPU backend whose attention_reads_bf16 says `reads` (the CPU's own says false).
struct CpuBackendReadingBf16Attention : CpuBackend {
    explicit CpuBackendReadingBf16Attention(bool reads) : reads(reads) {}
    bool attention_reads_bf16(int) const override { return reads; }
    bool reads;
};

// bf16 GEMM inputs (the default under bf16 matmul precision): the norms ahead of the attention
// projections and the LM head write bf16 outputs, and the attention output is rounded once for its
// projection, instead of every GEMM op rounding its fp32 input. Bitwise the same losses, gradients
// and evaluation logits, with the LM head on bf16 logits (training) and on fp32 ones (keep_logits),
// and less memory: the norm outputs take 2 bytes per element instead of 4.
TEST_P(ModelGradTest, Bf16GemmInputsGiveBitwiseTheSameTraining) {
    const ModelConfig cfg = GetParam().config;
    std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, targets = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    const LossWeights w{0.01f, 0.001f, 0.05f};
    // and with an attention that reads bf16 q, k, v (as CUDA's flash kernel does): without RoPE the
    // model then stores them in bf16 (the CPU runs Backend's widening defaults)
    for (const bool keep_logits : {false, true})
        for (const bool attention16 : {false, true}) {
            std::vector<std::vector<float>> grads[2], logits[2];
            std::vector<double> losses[2];
            size_t peak[2];
            for (const bool inputs16 : {false, true}) {
                CpuBackendReadingBf16Attention backend(attention16);
                backend.set_matmul_precision(MatmulPrecision::kBf16);
                Model model(cfg, &backend);
                model.init_weights(3);
                model.set_keep_logits(keep_logits);
                model.set_bf16_gemm_inputs(inputs16);
                const size_t n = model.layout().total_numel();
                for (int step = 0; step < 2; ++step) {
                    model.zero_grad();
                    losses[inputs16].push_back(model.forward(tokens.data(), targets.data(), 2, 5, w).total_loss);
                    model.backward(1.0f);
                    grads[inputs16].push_back(model.grads_to_host());
                    backend.scale(model.grads(), -0.5f, n);  // an SGD step
                    backend.accumulate(model.params(), model.grads(), n);
                    model.forward(tokens.data(), nullptr, 1, 7, w);  // evaluation: fp32 logits
                    logits[inputs16].push_back(model.logits_to_host());
                }
                peak[inputs16] = backend.peak_allocated_bytes();
            }
            const std::string at = std::string(keep_logits ? " (fp32 logits" : " (bf16 logits") +
                                   (attention16 ? ", bf16 attention)" : ")");
            EXPECT_EQ(losses[1], losses[0]) << at;
            for (int step = 0; step < 2; ++step) {
                EXPECT_EQ(grads[1][step], grads[0][step]) << "step " << step << at;
                EXPECT_EQ(logits[1][step], logits[0][step]) << "step " << step << at;
            }
            EXPECT_NE(losses[0][0], losses[0][1]) << "the weights did not change";
            if (!attention16) {  // (the CPU widens q, k, v into temporaries)
                EXPECT_LT(peak[1], peak[0]) << at;
            }
        }
}

// Training forwards under bf16 matmul precision run the LM head and loss on bf16 logits (the
// default): the loss moves by no more than the logits' bf16 rounding can move it, the gradients stay
// within bf16 noise of the fp32-logit path, the [N, V] fp32 buffer is gone, and a forward without
// targets (evaluation) still gives fp32 logits.
TEST_P(ModelGradTest, Bf16LogitsStayWithinTheirRoundingOfTheFp32Logits) {
    const ModelConfig cfg = GetParam().config;
    const int B = 2, T = 5, N = B * T, V = cfg.vocab_size;
    std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, targets = {2, 3, 4, 5, 6, 7, 8, 9, 10, -1};
    const LossWeights w{0.01f, 0.001f, 0.05f};
    std::vector<std::vector<float>> grads;
    std::vector<double> ce;
    std::vector<size_t> peak;
    float max_logit = 0.0f;
    for (const bool bf16_logits : {false, true}) {
        CpuBackend backend;
        backend.set_matmul_precision(MatmulPrecision::kBf16);
        Model model(cfg, &backend);
        model.init_weights(3);
        model.set_keep_logits(false);
        model.set_bf16_logits(bf16_logits);
        model.zero_grad();
        ce.push_back(model.forward(tokens.data(), targets.data(), B, T, w).ce_loss);
        model.backward(1.0f);
        grads.push_back(model.grads_to_host());
        peak.push_back(backend.peak_allocated_bytes());
        if (bf16_logits) {
            EXPECT_THROW(model.logits_to_host(), bmoe::Error) << "a training forward keeps no fp32 logits";
            model.forward(tokens.data(), nullptr, B, T, w);
            for (float l : model.logits_to_host()) max_logit = std::max(max_logit, std::abs(l));
            EXPECT_GT(max_logit, 0.0f) << "a forward without targets writes fp32 logits";
        }
    }
    // |d ce| <= max |d logit[target]| + max |d lse| <= 2 max |logit| 2^-9 (nearest rounding)
    EXPECT_NE(ce[1], ce[0]) << "the bf16 logits path did not run";
    EXPECT_NEAR(ce[1], ce[0], 2.0 * max_logit * 0x1p-9);
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < grads[0].size(); ++i) {
        diff += std::pow(double(grads[1][i]) - grads[0][i], 2);
        norm += std::pow(double(grads[0][i]), 2);
    }
    EXPECT_LT(std::sqrt(diff / norm), 1e-2) << "relative gradient difference";
    // [N, V] fp32 logits replaced by [N, V] bf16 ones and an [N] lse (64-byte rounding per buffer)
    const long long saved = static_cast<long long>(peak[0]) - static_cast<long long>(peak[1]);
    EXPECT_GE(saved, 2LL * N * V - 4LL * N - 128);
    EXPECT_LE(saved, 2LL * N * V - 4LL * N + 128);
}

// Freezing skips gradients, it does not change them: with some tensors frozen (router only; the
// upper layer only, where backward stops early; embeddings only, tied to the LM head), every
// trainable tensor's gradient is bitwise the full backward's, and frozen gradients stay zero.
TEST_P(ModelGradTest, FrozenTensorsSkipGradientsWithoutChangingTheOthers) {
    ModelConfig cfg = GetParam().config;
    CpuBackend backend;
    const int B = 1, T = 5;
    std::vector<int32_t> tokens = {1, 2, 3, 4, 5}, targets = {2, 3, 4, 5, 6};
    const LossWeights w{0.01f, 0.001f, 0.05f};
    auto grads = [&](const std::vector<std::string>& trainable, std::vector<bool>* is_trainable) {
        Model model(cfg, &backend);
        model.init_weights(3);
        if (!trainable.empty()) model.set_trainable(trainable);
        model.zero_grad();
        model.forward(tokens.data(), targets.data(), B, T, w);
        model.backward(1.0f);
        if (is_trainable) {
            is_trainable->assign(model.layout().total_numel(), false);
            for (const ParamInfo& p : model.layout().params())
                for (size_t i = 0; i < p.numel; ++i) (*is_trainable)[p.offset + i] = p.trainable;
        }
        return model.grads_to_host();
    };
    const std::vector<float> full = grads({}, nullptr);
    for (const std::vector<std::string>& patterns :
         {std::vector<std::string>{"block_sparse_moe\\.(gate|router)\\."}, {"layers\\.1\\."}, {"embed_tokens"}}) {
        if (patterns[0] == "block_sparse_moe\\.(gate|router)\\." && cfg.num_moe_layers() == 0) continue;
        std::vector<bool> trainable;
        const std::vector<float> partial = grads(patterns, &trainable);
        size_t checked = 0;
        for (size_t i = 0; i < full.size(); ++i) {
            if (trainable[i]) {
                ASSERT_EQ(partial[i], full[i]) << patterns[0] << " element " << i;
                checked += full[i] != 0.0f;
            } else {
                ASSERT_EQ(partial[i], 0.0f) << patterns[0] << " frozen element " << i;
            }
        }
        EXPECT_GT(checked, 0u) << patterns[0];
    }
}

INSTANTIATE_TEST_SUITE_P(Variants, ModelGradTest, ::testing::ValuesIn(variants()), [](const auto& info) {
    return info.param.name;
});

TEST(ModelConfigTest, ValidateRejectsBadValues) {
    ModelConfig c = tiny_model_config();
    c.top_k = c.num_experts + 1;
    EXPECT_THROW(c.validate(), bmoe::Error);
    c = tiny_model_config();
    c.num_kv_heads = 3;
    EXPECT_THROW(c.validate(), bmoe::Error);
    c = tiny_model_config();
    c.d_model = 15;
    EXPECT_THROW(c.validate(), bmoe::Error);
    EXPECT_NO_THROW(tiny_model_config().validate());
}

// Backward-only buffers (the experts' d activations, the MoE block's d rows) exist once per model,
// not once per layer (model/layer_scratch.h). A model whose memory is dominated by the expert
// hidden [R, F]: each extra layer must add its saved pre-activation and activation (2 R F floats)
// (GELU) plus small change, not also the two [R, F] backward buffers (4 R F with per-layer scratch).
TEST(ModelTest, BackwardScratchIsSharedByTheLayers) {
    const int B = 8, T = 64, F = 512;
    auto peak_bytes = [&](int layers, bool mlp_recompute = false) {
        ModelConfig c;
        c.vocab_size = 16;
        c.max_seq_len = T;
        c.d_model = 8;
        c.num_layers = layers;
        c.num_heads = 1;
        c.num_kv_heads = 1;
        c.num_experts = 2;
        c.top_k = 1;
        c.expert_hidden = F;
        c.activation = Activation::kGelu;  // saves 2 [R, F] per layer (SwiGLU: 3)
        CpuBackend backend;
        Model model(c, &backend);
        model.init_weights(1);
        model.set_mlp_recompute(mlp_recompute);
        std::vector<int32_t> tokens(B * T), targets(B * T);
        for (int i = 0; i < B * T; ++i) tokens[i] = i % 16, targets[i] = (i + 1) % 16;
        model.zero_grad();
        model.forward(tokens.data(), targets.data(), B, T, LossWeights{});
        model.backward(1.0f);
        return static_cast<double>(backend.peak_allocated_bytes());
    };
    const double per_layer = peak_bytes(3) - peak_bytes(2);
    const double RF_bytes = static_cast<double>(B) * T * F * sizeof(float);  // R = N with top-1
    EXPECT_GE(per_layer, 2 * RF_bytes);                                      // the saved activations are there
    EXPECT_LT(per_layer, 3 * RF_bytes) << "each layer adds " << per_layer / RF_bytes << " R F floats";
    // With MLP activation recompute a layer keeps only the pre-activation (the activation is
    // recomputed into the shared scratch).
    const double per_layer_recompute = peak_bytes(3, true) - peak_bytes(2, true);
    EXPECT_GE(per_layer_recompute, RF_bytes);
    EXPECT_LT(per_layer_recompute, 2 * RF_bytes)
        << "with mlp recompute each layer adds " << per_layer_recompute / RF_bytes << " R F floats";
}

TEST(ModelTest, RejectsTokensOutsideVocabulary) {
    ModelConfig c = tiny_model_config();
    CpuBackend backend;
    Model model(c, &backend);
    model.init_weights(1);
    std::vector<int32_t> tokens = {1, 2, c.vocab_size}, targets = {2, 3, 4};
    EXPECT_THROW(model.forward(tokens.data(), targets.data(), 1, 3, LossWeights{}), bmoe::Error);
}

// The bf16 A/B switches take 0 or 1; anything else is a one-line error naming the variable when the
// model is built (not a silent "on").
// An expert MLP that gets no rows (an expert-parallel rank whose experts received no tokens) does
// nothing in either precision and storage mode: its buffers for zero rows are null, which the bf16
// GEMM ops' pointer pairs would reject.
TEST(GroupedMlpTest, NoRowsIsANoOpInEveryMode) {
    CpuBackend backend;
    LayerScratch scratch;
    const int D = 8, F = 16, G = 3;
    const std::vector<int> no_rows(G + 1, 0);
    std::vector<float> weights(static_cast<size_t>(G) * F * D, 0.5f);
    for (const Activation activation : {Activation::kSwiGlu, Activation::kGelu})
        for (const MatmulPrecision precision : {MatmulPrecision::kFp32, MatmulPrecision::kBf16})
            for (const bool recompute : {false, true}) {
                backend.set_matmul_precision(precision);
                GroupedMlp mlp(&backend, activation, D, F, &scratch);
                mlp.set_recompute_activation(recompute);
                Buffer<float> w(&backend, weights.size() * 3), dw(&backend, weights.size() * 3);
                w.upload(std::vector<float>(weights.size() * 3, 0.5f));
                const size_t n = weights.size();
                const MlpWeights mw{w.data(), w.data() + n, w.data() + 2 * n};
                const MlpGrads mg{dw.data(), dw.data() + n, dw.data() + 2 * n};
                EXPECT_NO_THROW(mlp.forward(nullptr, nullptr, mw, no_rows));
                EXPECT_NO_THROW(mlp.backward(nullptr, mg, nullptr, nullptr, nullptr, mw));
                for (float g : dw.download()) ASSERT_EQ(g, 0.0f);
            }
}

// BMOE_DEVICE_ROUTING_PLAN=0 plans on the host (the selection comes down, the plan goes up) instead
// of on the backend: the same plan, so bitwise the same training, with a capacity that drops too.
TEST(ModelTest, RoutingPlanOnTheHostTrainsBitwiseLikeOnTheBackend) {
    ModelConfig c = tiny_model_config();
    c.capacity_factor = 0.75f;
    std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, targets = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    std::vector<double> losses[2];
    std::vector<float> params[2];
    for (const int on_backend : {0, 1}) {
        setenv("BMOE_DEVICE_ROUTING_PLAN", on_backend ? "1" : "0", 1);
        MemoryCheckingBackend backend;
        Model model(c, &backend);
        unsetenv("BMOE_DEVICE_ROUTING_PLAN");
        model.init_weights(3);
        for (int step = 0; step < 2; ++step) {
            model.zero_grad();
            losses[on_backend].push_back(
                model.forward(tokens.data(), targets.data(), 2, 5, LossWeights{0.01f}).total_loss);
            model.backward(1.0f);
            const size_t n = model.layout().total_numel();
            backend.scale(model.grads(), -0.5f, n);
            backend.accumulate(model.params(), model.grads(), n);
        }
        params[on_backend] = model.params_to_host();
        EXPECT_EQ(backend.checked_ops.count("moe_plan_routing"), static_cast<size_t>(on_backend));
    }
    EXPECT_EQ(losses[0], losses[1]);
    EXPECT_TRUE(params[0] == params[1]);
    EXPECT_NE(losses[0][0], losses[0][1]) << "the weights did not change";
}

TEST(ModelTest, Bf16SwitchesRejectValuesOtherThanZeroAndOne) {
    const ModelConfig c = tiny_model_config();
    CpuBackend backend;
    for (const char* env : {"BMOE_BF16_LOGITS", "BMOE_BF16_WEIGHTS", "BMOE_BF16_MLP_ACTIVATIONS",
                            "BMOE_BF16_GEMM_INPUTS", "BMOE_DEVICE_ROUTING_PLAN"}) {
        for (const char* ok : {"0", "1"}) {
            setenv(env, ok, 1);
            EXPECT_NO_THROW(Model(c, &backend)) << env << "=" << ok;
        }
        setenv(env, "off", 1);
        try {
            Model model(c, &backend);
            ADD_FAILURE() << env << "=off was accepted";
        } catch (const bmoe::Error& e) {
            EXPECT_NE(std::string(e.what()).find(std::string(env) + "='off'"), std::string::npos) << e.what();
            EXPECT_NE(std::string(e.what()).find("set it to 1"), std::string::npos) << e.what();
        }
        unsetenv(env);
    }
}

}  // namespace
}  // namespace bmoe::model
