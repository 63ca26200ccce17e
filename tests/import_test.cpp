// import_test.cpp -- external checkpoints in Hugging Face layout (Mixtral and OLMoE-style names,
// per-expert tensors) written by PyTorch are imported into bmoe and give PyTorch's logits.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "checkpoints/safetensors.h"
#include "model/cpu_backend.h"
#include "parallel/check.h"
#include "trainer/checkpointing.h"
#include "trainer/hf_import.h"

namespace bmoe::trainer {
namespace {

namespace fs = std::filesystem;

RunConfig small_config() {
    RunConfig c;
    c.model.vocab_size = 41;
    c.model.d_model = 32;
    c.model.num_layers = 2;
    c.model.num_heads = 4;
    c.model.num_kv_heads = 2;
    c.model.num_experts = 4;
    c.model.top_k = 2;
    c.model.expert_hidden = 24;
    c.model.init_std = 0.1f;
    return c;
}

bool torch_available() {
    return std::system((std::string(BMOE_PYTHON) + " -c 'import torch' >/dev/null 2>&1").c_str()) == 0;
}

// Runs the PyTorch fixture writer; returns its output directory.
fs::path make_fixture(const std::string& style, const RunConfig& c) {
    const fs::path dir = fs::temp_directory_path() / ("bmoe_import_" + style);
    const std::string config_json = "{\"vocab_size\": " + std::to_string(c.model.vocab_size) +
                                    ", \"d_model\": 32, \"num_layers\": 2, \"num_heads\": 4, \"num_kv_heads\": 2, "
                                    "\"num_experts\": 4, \"top_k\": 2, \"expert_hidden\": 24, \"init_std\": 0.1}";
    const std::string cmd = std::string(BMOE_PYTHON) + " " + BMOE_SOURCE_DIR + "/tests/make_hf_checkpoint.py " +
                            dir.string() + " " + style + " '" + config_json + "'";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
    return dir;
}

class ImportTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ImportTest, ImportedModelReproducesPyTorchLogits) {
    if (!torch_available()) {
        if (std::getenv("BMOE_REQUIRE_TORCH") != nullptr) FAIL() << "torch is required (BMOE_REQUIRE_TORCH)";
        GTEST_SKIP() << "python3-torch missing: run tools/install-deps.sh --tests";
    }
    const RunConfig c = small_config();
    const fs::path dir = make_fixture(GetParam(), c);
    const fs::path ckpt = dir / "imported.h5";
    write_imported_checkpoint({(dir / "model.safetensors").string()}, c, ckpt.string());

    model::CpuBackend cpu;
    model::Model m(c.model, &cpu);
    AdamW optimizer(c.optim, m);
    EXPECT_EQ(load_training_checkpoint(ckpt.string(), m, optimizer), 0);
    const checkpoints::SafetensorsFile expected =
        checkpoints::read_safetensors((dir / "expected.safetensors").string());
    const std::vector<int64_t> tokens64 = checkpoints::tensor_to_int64(expected.at("tokens"));
    const std::vector<int32_t> tokens(tokens64.begin(), tokens64.end());
    const std::vector<float> want = checkpoints::tensor_to_float(expected.at("logits"));
    m.forward(tokens.data(), nullptr, 2, 9, model::LossWeights{});
    const std::vector<float> got = m.logits_to_host();
    ASSERT_EQ(got.size(), want.size());
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < got.size(); ++i) num += (got[i] - want[i]) * (got[i] - want[i]), den += want[i] * want[i];
    EXPECT_LT(std::sqrt(num / den), 1e-5) << GetParam();
}

INSTANTIATE_TEST_SUITE_P(Styles, ImportTest, ::testing::Values("mixtral", "olmoe"));

TEST(ImportErrors, UnknownAndMissingTensorsAreNamed) {
    const RunConfig c = small_config();
    const fs::path dir = fs::temp_directory_path() / "bmoe_import_errors";
    fs::create_directories(dir);
    checkpoints::SafetensorsFile f;
    f.tensors["model.layers.0.self_attn.q_norm.weight"] = checkpoints::make_tensor_f32(std::vector<float>(32), {32});
    checkpoints::write_safetensors((dir / "extra.safetensors").string(), f);
    try {
        import_hf_safetensors({(dir / "extra.safetensors").string()}, c.model);
        FAIL() << "expected an error";
    } catch (const bmoe::Error& e) {
        EXPECT_NE(std::string(e.what()).find("q_norm"), std::string::npos) << e.what();
    }
    checkpoints::SafetensorsFile g;
    g.tensors["model.norm.weight"] = checkpoints::make_tensor_f32(std::vector<float>(32), {32});
    checkpoints::write_safetensors((dir / "partial.safetensors").string(), g);
    try {
        import_hf_safetensors({(dir / "partial.safetensors").string()}, c.model);
        FAIL() << "expected an error";
    } catch (const bmoe::Error& e) {
        EXPECT_NE(std::string(e.what()).find("has no tensor for"), std::string::npos) << e.what();
    }
}

}  // namespace
}  // namespace bmoe::trainer
