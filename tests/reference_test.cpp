// reference_test.cpp -- the C++ model against an independent float64 PyTorch implementation.
//
// For each model variant (Mixtral-like, GPT-2-like, dense+MoE with raw top-1 gates) on tiny
// shapes, the test initialises the C++ model on the CPU backend, writes its weights, tokens and
// targets to a safetensors file, runs tools/torch_reference.py (tools/bmoe_torch.py in float64)
// on it, and compares the logits, every loss part (ce, aux, z, total) and EVERY parameter
// gradient of the total loss: per tensor ||cpp - torch|| / max(||torch||, tiny) <= 1e-4.
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

namespace bmoe::model {
namespace {

namespace fs = std::filesystem;
using checkpoints::SafetensorsFile;

constexpr double kTolerance = 1e-4;
constexpr int kBatch = 2, kSeq = 9;

struct Variant {
    std::string name;
    ModelConfig config;
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
       << ", \"init_std\": " << c.init_std << "}";
    return os.str();
}

// Runs a shell command, returning its exit status and combined output.
int run_command(const std::string& command, const std::string& log_path, std::string* output) {
    const int status = std::system((command + " > '" + log_path + "' 2>&1").c_str());
    std::ifstream log(log_path);
    std::stringstream ss;
    ss << log.rdbuf();
    *output = ss.str();
    return status;
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

struct TempDir {
    fs::path path;
    TempDir() {
        std::string pattern = (fs::temp_directory_path() / "bmoe_reference_XXXXXX").string();
        char* made = mkdtemp(pattern.data());
        if (made == nullptr) throw std::runtime_error("mkdtemp failed");
        path = made;
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
};

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
    const LossWeights weights{0.05f, 0.01f};  // larger than the defaults so the router terms matter

    CpuBackend backend;
    Model model(config, &backend);
    model.init_weights(/*seed=*/1234);
    const std::vector<float> params = model.params_to_host();
    const ParameterLayout& layout = model.layout();

    // tokens uniform in [0, V); every 5th target ignored (-1)
    const int N = kBatch * kSeq;
    CounterRng rng(/*seed=*/99, /*stream=*/7);
    std::vector<int32_t> tokens(N), targets(N);
    for (int i = 0; i < N; ++i) {
        tokens[i] = static_cast<int32_t>(rng.bits(2 * i) % config.vocab_size);
        targets[i] = i % 5 == 3 ? -1 : static_cast<int32_t>(rng.bits(2 * i + 1) % config.vocab_size);
    }

    // ---- the reference (torch, float64) ----
    TempDir dir;
    const std::string in_path = (dir.path / "in.safetensors").string();
    const std::string out_path = (dir.path / "out.safetensors").string();
    SafetensorsFile input;
    for (const ParamInfo& p : layout.params()) {
        std::vector<float> values(params.begin() + p.offset, params.begin() + p.offset + p.numel);
        input.tensors[p.name] = checkpoints::make_tensor_f32(values, p.shape);
    }
    input.tensors["tokens"] = checkpoints::make_tensor_i32(tokens, {kBatch, kSeq});
    input.tensors["targets"] = checkpoints::make_tensor_i32(targets, {kBatch, kSeq});
    input.metadata["config"] = config_json(config);
    std::ostringstream coef;
    coef << std::setprecision(9) << weights.aux_coef;
    input.metadata["aux_coef"] = coef.str();
    coef.str("");
    coef << std::setprecision(9) << weights.zloss_coef;
    input.metadata["zloss_coef"] = coef.str();
    checkpoints::write_safetensors(in_path, input);

    const std::string command = std::string("'") + BMOE_PYTHON + "' '" + BMOE_SOURCE_DIR +
                                "/tools/torch_reference.py' '" + in_path + "' '" + out_path + "'";
    std::string output;
    const int status = run_command(command, (dir.path / "log.txt").string(), &output);
    ASSERT_EQ(status, 0) << "reference failed: " << command << "\n" << output;
    const SafetensorsFile ref = checkpoints::read_safetensors(out_path);

    // ---- the C++ model ----
    model.zero_grad();
    const ForwardStats stats = model.forward(tokens.data(), targets.data(), kBatch, kSeq, weights);
    model.backward(1.0f);
    const std::vector<float> logits = model.logits_to_host();
    const std::vector<float> grads = model.grads_to_host();

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
    compare("total", {stats.total_loss}, "total");
    for (const ParamInfo& p : layout.params()) {
        compare("grad." + p.name, std::vector<double>(grads.begin() + p.offset, grads.begin() + p.offset + p.numel),
                "grad." + p.name);
    }
    ASSERT_EQ(results.size(), 5 + layout.params().size());

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
