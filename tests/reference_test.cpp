// reference_test.cpp -- the C++ model against an independent float64 PyTorch implementation.
//
// For each model variant (Mixtral-like, GPT-2-like, dense+MoE with raw top-1 gates, and every
// router family of docs/routers.md in training mode) on tiny shapes, the test initialises the
// C++ model on the CPU backend, runs its forward + backward, then writes its weights, tokens,
// targets and the routing noise each MoE layer drew (Router::noise(): eps, dropout masks, Gumbel
// noise, ensemble members) to a safetensors file, runs tools/torch_reference.py
// (tools/bmoe_torch.py in float64, gradients by autograd) on it, and compares the logits, every
// loss part (ce, aux, z, reg, total) and EVERY parameter gradient of the total loss: per tensor
// ||cpp - torch|| / max(||torch||, tiny) <= 1e-4.
// Router variants overwrite the family's own tensors (...block_sparse_moe.router.*) with random
// values after init so the variational heads are not at their trivial start (dmu = 0, L diagonal,
// T = 1), and use a nonzero router_reg_coef.
// Skips when torch is not importable by BMOE_PYTHON (tools/install-deps.sh --tests installs it)
// unless BMOE_REQUIRE_TORCH is set in the environment, in which case that is a failure.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoints/safetensors.h"
#include "model/cpu_backend.h"
#include "model/model.h"
#include "model/rng.h"
#include "tests/process_util.h"

namespace bmoe::model {
namespace {

using bmoe::testing::run_command;
using bmoe::testing::TempDir;

namespace fs = std::filesystem;
using checkpoints::SafetensorsFile;

constexpr double kTolerance = 1e-4;
constexpr int kBatch = 2, kSeq = 9;

struct Variant {
    std::string name;
    ModelConfig config;
    bool perturb_router = false;  // random values in every ...block_sparse_moe.router.* tensor
    bool random_bias = false;     // random aux-free selection bias (router_state.selection_bias)
};
// gtest prints the variant's name (not its bytes) in failure messages.
void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

ModelConfig tiny_config() {
    ModelConfig c;
    c.vocab_size = 37;
    c.max_seq_len = 16;
    c.d_model = 32;
    c.num_layers = 2;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.num_experts = 4;
    c.top_k = 2;
    c.expert_hidden = 24;
    c.dense_hidden = 40;
    c.init_std = 0.1f;
    return c;
}

std::vector<Variant> variants() {
    std::vector<Variant> v;
    v.push_back({"mixtral_like", tiny_config()});  // rmsnorm, rope, swiglu, GQA, untied
    ModelConfig gpt2 = tiny_config();
    gpt2.norm = NormType::kLayerNorm;
    gpt2.position = PositionType::kLearned;
    gpt2.activation = Activation::kGelu;
    gpt2.tie_embeddings = true;
    gpt2.num_kv_heads = 4;
    v.push_back({"gpt2_like", gpt2});
    ModelConfig mixed = tiny_config();
    mixed.moe_every = 2;  // layer 0 dense, layer 1 MoE
    mixed.router_renormalize = false;
    mixed.top_k = 1;
    v.push_back({"dense_and_moe_raw_gates_top1", mixed});
    ModelConfig deep = tiny_config();
    deep.num_layers = 3;
    deep.num_experts = 6;
    deep.top_k = 3;
    deep.num_kv_heads = 1;
    deep.rope_theta = 500.0f;
    v.push_back({"three_layers_top3_mqa", deep});
    ModelConfig capped = tiny_config();
    capped.capacity_factor = 0.75f;  // some copies dropped: same tokens dropped on both sides
    v.push_back({"capacity_dropping", capped});

    // ---- every router family, training mode (S = router.train_samples) ----
    auto router = [&](const std::string& name, RouterType type, auto&& tweak) {
        ModelConfig c = tiny_config();
        c.router.type = type;
        c.router.hidden = 8;                 // logit_mf / logit_fc trunk width
        c.router.ensemble_size = 3;          // ensemble M
        c.router.dropout = 0.25f;            // mc_dropout: ~8 of 32 features dropped
        c.router.weight_sigma_init = 0.05f;  // weight_mfvi: logit noise comparable to the logits
        tweak(c);
        v.push_back({"router_" + name, c, true, false});
    };
    auto none = [](ModelConfig&) {};
    router("topk_selection_bias", RouterType::kTopK, [](ModelConfig& c) { c.router.selection_bias_rate = 0.01f; });
    router("temp_sampling", RouterType::kTempSampling, none);
    router("temp_sampling_cold", RouterType::kTempSampling, [](ModelConfig& c) { c.router.temperature = 0.6f; });
    router("mc_dropout", RouterType::kMcDropout, none);
    router("mc_dropout_s2", RouterType::kMcDropout, [](ModelConfig& c) { c.router.train_samples = 2; });
    router("swag", RouterType::kSwag, none);
    router("ensemble_m3", RouterType::kEnsemble, none);
    router("weight_mfvi", RouterType::kWeightMfvi, none);
    router("weight_mfvi_s2", RouterType::kWeightMfvi, [](ModelConfig& c) { c.router.train_samples = 2; });
    router("logit_mf", RouterType::kLogitMf, none);
    router("logit_mf_s2", RouterType::kLogitMf, [](ModelConfig& c) { c.router.train_samples = 2; });
    router("logit_fc", RouterType::kLogitFc, none);
    router("logit_fc_s2", RouterType::kLogitFc, [](ModelConfig& c) { c.router.train_samples = 2; });
    router("logit_fc_s3_raw_gates_capacity", RouterType::kLogitFc, [](ModelConfig& c) {
        c.router.train_samples = 3;
        c.router_renormalize = false;
        c.capacity_factor = 0.75f;
    });
    router("vtsr", RouterType::kVtsr, none);
    router("vtsr_gpt2_like_moe_every2", RouterType::kVtsr, [](ModelConfig& c) {
        c.norm = NormType::kLayerNorm;
        c.position = PositionType::kLearned;
        c.activation = Activation::kGelu;
        c.tie_embeddings = true;
        c.moe_every = 2;
    });
    // A nonzero selection bias (as after some optimizer steps) changes which experts are picked.
    ModelConfig biased = tiny_config();
    biased.router.type = RouterType::kLogitMf;
    biased.router.hidden = 8;
    biased.router.train_samples = 2;
    biased.router.selection_bias_rate = 0.01f;
    v.push_back({"router_logit_mf_s2_random_selection_bias", biased, true, true});
    ModelConfig biased_topk = tiny_config();
    biased_topk.router.selection_bias_rate = 0.01f;
    v.push_back({"router_topk_random_selection_bias", biased_topk, true, true});
    return v;
}

// The config as JSON with ModelConfig's field names (what tools/bmoe_torch.py reads).
std::string config_json(const ModelConfig& c) {
    std::ostringstream os;
    os << std::setprecision(9) << std::boolalpha;
    os << "{\"vocab_size\": " << c.vocab_size << ", \"max_seq_len\": " << c.max_seq_len
       << ", \"d_model\": " << c.d_model << ", \"num_layers\": " << c.num_layers << ", \"num_heads\": " << c.num_heads
       << ", \"num_kv_heads\": " << c.num_kv_heads << ", \"num_experts\": " << c.num_experts
       << ", \"top_k\": " << c.top_k << ", \"expert_hidden\": " << c.expert_hidden << ", \"moe_every\": " << c.moe_every
       << ", \"dense_hidden\": " << c.dense_hidden << ", \"tie_embeddings\": " << c.tie_embeddings << ", \"norm\": \""
       << to_string(c.norm) << "\", \"position\": \"" << to_string(c.position) << "\", \"activation\": \""
       << to_string(c.activation) << "\", \"norm_eps\": " << c.norm_eps << ", \"rope_theta\": " << c.rope_theta
       << ", \"router_renormalize\": " << c.router_renormalize << ", \"capacity_factor\": " << c.capacity_factor
       << ", \"init_std\": " << c.init_std;
    const RouterConfig& r = c.router;
    os << ", \"router\": {\"type\": \"" << to_string(r.type) << "\", \"train_samples\": " << r.train_samples
       << ", \"eval_samples\": " << r.eval_samples << ", \"temperature\": " << r.temperature
       << ", \"dropout\": " << r.dropout << ", \"ensemble_size\": " << r.ensemble_size
       << ", \"swag_rank\": " << r.swag_rank << ", \"swag_every\": " << r.swag_every
       << ", \"swag_start\": " << r.swag_start << ", \"weight_sigma_init\": " << r.weight_sigma_init
       << ", \"weight_prior_std\": " << r.weight_prior_std << ", \"hidden\": " << r.hidden
       << ", \"sigma_init\": " << r.sigma_init << ", \"sigma_min\": " << r.sigma_min
       << ", \"prior_std\": " << r.prior_std << ", \"temp_min\": " << r.temp_min << ", \"temp_max\": " << r.temp_max
       << ", \"selection_bias_rate\": " << r.selection_bias_rate << "}}";
    return os.str();
}

// Families that draw standard normal eps [S, N, E].
bool eps_family(RouterType t) {
    return t == RouterType::kWeightMfvi || t == RouterType::kLogitMf || t == RouterType::kLogitFc;
}

std::string decimal(double v) {
    std::ostringstream os;
    os << std::setprecision(9) << v;
    return os.str();
}

bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// After init: every ...block_sparse_moe.router.* tensor gets random values so the variational
// heads are non-trivial: weights N(0, 0.3^2), biases and weight_mfvi's rho their init + N(0, 0.3^2).
void perturb_router_tensors(const ParameterLayout& layout, std::vector<float>& params) {
    for (size_t i = 0; i < layout.params().size(); ++i) {
        const ParamInfo& p = layout.params()[i];
        if (p.name.find(".block_sparse_moe.router.") == std::string::npos) continue;
        const bool keep_init = ends_with(p.name, ".bias") || ends_with(p.name, ".weight_rho");
        CounterRng rng(/*seed=*/4321, /*stream=*/i);
        for (size_t j = 0; j < p.numel; ++j) {
            float& x = params[p.offset + j];
            x = (keep_init ? x : 0.0f) + 0.3f * rng.normal(j);
        }
    }
}

std::string torch_unavailable_reason() {
    std::string out;
    const std::string log = (fs::temp_directory_path() / ("bmoe_torch_probe_" + std::to_string(getpid()))).string();
    const int status = run_command(std::string("'") + BMOE_PYTHON + "' -c 'import torch, numpy'", log, &out);
    fs::remove(log);
    if (status == 0) return "";
    // Keep the last line of the traceback, e.g. "ModuleNotFoundError: No module named 'torch'".
    while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
    const size_t last_line = out.find_last_of('\n');
    if (last_line != std::string::npos) out = out.substr(last_line + 1);
    return std::string("torch/numpy not importable by ") + BMOE_PYTHON + " (" + out +
           "): run `bash tools/install-deps.sh --tests` (installs python3-torch)";
}

double rel_error(const std::vector<double>& a, const std::vector<double>& b) {
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < a.size(); ++i) {
        diff += (a[i] - b[i]) * (a[i] - b[i]);
        norm += b[i] * b[i];
    }
    return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
}

struct Comparison {
    std::string name;
    double rel = 0.0;
    double ref_norm = 0.0;
};

class ReferenceTest : public ::testing::TestWithParam<Variant> {};

TEST_P(ReferenceTest, MatchesTorchFloat64) {
    const std::string reason = torch_unavailable_reason();
    if (!reason.empty()) {
        const char* require = std::getenv("BMOE_REQUIRE_TORCH");
        if (require != nullptr && *require != '\0') FAIL() << reason;
        GTEST_SKIP() << reason;
    }
    const Variant& variant = GetParam();
    const ModelConfig& config = variant.config;
    // aux/z larger than the defaults so the router terms matter; beta for the regularisers
    const LossWeights weights{0.05f, 0.01f, 0.05f};

    CpuBackend backend;
    Model model(config, &backend);
    model.init_weights(/*seed=*/1234);
    const ParameterLayout& layout = model.layout();
    std::vector<float> params = model.params_to_host();
    if (variant.perturb_router) {
        perturb_router_tensors(layout, params);
        model.params_from_host(params);
    }
    if (variant.random_bias) {  // router state, as a checkpoint would restore it
        CounterRng bias_rng(/*seed=*/77, /*stream=*/3);
        uint64_t counter = 0;
        for (RouterStateTensor& t : model.router_state())
            if (ends_with(t.name, ".selection_bias"))
                for (float& b : *t.values) b = 0.5f * bias_rng.normal(counter++);
    }
    RoutingContext routing;
    routing.seed = 2024;
    routing.step = 3;
    routing.first_token = 1000;
    model.set_routing(routing);

    // tokens uniform in [0, V); every 5th target ignored (-1)
    const int N = kBatch * kSeq;
    CounterRng rng(/*seed=*/99, /*stream=*/7);
    std::vector<int32_t> tokens(N), targets(N);
    for (int i = 0; i < N; ++i) {
        tokens[i] = static_cast<int32_t>(rng.bits(2 * i) % config.vocab_size);
        targets[i] = i % 5 == 3 ? -1 : static_cast<int32_t>(rng.bits(2 * i + 1) % config.vocab_size);
    }

    // ---- the C++ model (first: its forward draws the routing noise the reference reads) ----
    model.zero_grad();
    const ForwardStats stats = model.forward(tokens.data(), targets.data(), kBatch, kSeq, weights);
    model.backward(1.0f);
    const std::vector<float> logits = model.logits_to_host();
    const std::vector<float> grads = model.grads_to_host();

    // ---- the reference (torch, float64) ----
    TempDir dir("bmoe_reference");
    const std::string in_path = (dir.path / "in.safetensors").string();
    const std::string out_path = (dir.path / "out.safetensors").string();
    SafetensorsFile input;
    for (const ParamInfo& p : layout.params()) {
        std::vector<float> values(params.begin() + p.offset, params.begin() + p.offset + p.numel);
        input.tensors[p.name] = checkpoints::make_tensor_f32(values, p.shape);
    }
    for (RouterStateTensor& t : model.router_state())
        if (ends_with(t.name, ".selection_bias"))
            input.tensors[t.name] = checkpoints::make_tensor_f32(*t.values, t.shape);
    // The noise every MoE layer drew, as "noise.{layer}.{field}"; only the fields the family uses.
    const int64_t E = config.num_experts, D = config.d_model;
    const RouterType type = config.router.type;
    for (int l = 0, moe = 0; l < config.num_layers; ++l) {
        if (!config.is_moe_layer(l)) continue;
        const Router& router = model.moe_block(moe++).router();
        const RouterNoise& noise = router.noise();
        const int64_t S = router.outputs().S;
        const std::string prefix = "noise." + std::to_string(l) + ".";
        if (!noise.eps.empty()) input.tensors[prefix + "eps"] = checkpoints::make_tensor_f32(noise.eps, {S, N, E});
        if (!noise.dropout_mask.empty())
            input.tensors[prefix + "dropout_mask"] = checkpoints::make_tensor_f32(noise.dropout_mask, {S, N, D});
        if (!noise.gumbel.empty())
            input.tensors[prefix + "gumbel"] = checkpoints::make_tensor_f32(noise.gumbel, {N, E});
        if (!noise.member.empty()) input.tensors[prefix + "member"] = checkpoints::make_tensor_i32(noise.member, {N});
        // Guard against a variant silently testing nothing: the family's noise must be there.
        const bool eps = eps_family(type);
        EXPECT_EQ(!noise.eps.empty(), eps) << "layer " << l << ": eps";
        EXPECT_EQ(!noise.dropout_mask.empty(), type == RouterType::kMcDropout) << "layer " << l << ": dropout_mask";
        EXPECT_EQ(!noise.gumbel.empty(), type == RouterType::kTempSampling || type == RouterType::kVtsr)
            << "layer " << l << ": gumbel";
        EXPECT_EQ(!noise.member.empty(), type == RouterType::kEnsemble) << "layer " << l << ": member";
        if (eps || type == RouterType::kMcDropout) {
            EXPECT_EQ(S, config.router.train_samples) << "layer " << l;
        }
        if (!noise.eps.empty()) {
            EXPECT_EQ(noise.eps.size(), static_cast<size_t>(S * N * E));
        }
        if (!noise.dropout_mask.empty()) {
            EXPECT_EQ(noise.dropout_mask.size(), static_cast<size_t>(S * N * D));
        }
    }
    if (eps_family(type) || type == RouterType::kVtsr) {
        EXPECT_NE(stats.router_reg, 0.0) << "the router regulariser should be active";
    }
    input.tensors["tokens"] = checkpoints::make_tensor_i32(tokens, {kBatch, kSeq});
    input.tensors["targets"] = checkpoints::make_tensor_i32(targets, {kBatch, kSeq});
    input.metadata["config"] = config_json(config);
    input.metadata["aux_coef"] = decimal(weights.aux_coef);
    input.metadata["zloss_coef"] = decimal(weights.zloss_coef);
    input.metadata["router_reg_coef"] = decimal(weights.router_reg_coef);
    checkpoints::write_safetensors(in_path, input);

    const std::string command = std::string("'") + BMOE_PYTHON + "' '" + BMOE_SOURCE_DIR +
                                "/tools/torch_reference.py' '" + in_path + "' '" + out_path + "'";
    std::string output;
    const int status = run_command(command, (dir.path / "log.txt").string(), &output);
    ASSERT_EQ(status, 0) << "reference failed: " << command << "\n" << output;
    const SafetensorsFile ref = checkpoints::read_safetensors(out_path);

    std::vector<Comparison> results;
    auto compare = [&](const std::string& name, const std::vector<double>& cpp, const std::string& ref_name) {
        const std::vector<double> expected = checkpoints::tensor_to_double(ref.at(ref_name));
        ASSERT_EQ(cpp.size(), expected.size()) << name;
        double norm = 0.0;
        for (double x : expected) norm += x * x;
        results.push_back({name, rel_error(cpp, expected), std::sqrt(norm)});
    };
    compare("logits", std::vector<double>(logits.begin(), logits.end()), "logits");
    compare("ce", {stats.ce_loss}, "ce");
    compare("aux", {stats.aux_loss}, "aux");
    compare("z", {stats.z_loss}, "z");
    compare("reg", {stats.router_reg}, "reg");
    compare("total", {stats.total_loss}, "total");
    for (const ParamInfo& p : layout.params()) {
        compare("grad." + p.name, std::vector<double>(grads.begin() + p.offset, grads.begin() + p.offset + p.numel),
                "grad." + p.name);
    }
    ASSERT_EQ(results.size(), 6 + layout.params().size());

    std::sort(results.begin(), results.end(), [](const Comparison& a, const Comparison& b) { return a.rel > b.rel; });
    std::ostringstream report;
    report << variant.name << ": " << results.size() << " tensors compared; worst relative errors:\n";
    for (size_t i = 0; i < std::min<size_t>(results.size(), 8); ++i)
        report << "  " << std::setw(52) << std::left << results[i].name << " rel " << std::scientific
               << std::setprecision(2) << results[i].rel << "  (|ref| " << results[i].ref_norm << ")\n";
    std::cout << report.str();
    int failures = 0;
    for (const Comparison& c : results) failures += c.rel <= kTolerance ? 0 : 1;
    EXPECT_EQ(failures, 0) << failures << " tensors exceed relative error " << kTolerance << "\n" << report.str();
}

INSTANTIATE_TEST_SUITE_P(Variants,
                         ReferenceTest,
                         ::testing::ValuesIn(variants()),
                         [](const ::testing::TestParamInfo<Variant>& info) { return info.param.name; });

}  // namespace
}  // namespace bmoe::model
