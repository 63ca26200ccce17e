#include "trainer/hf_import.h"

#include <algorithm>
#include <regex>

#include "checkpoints/safetensors.h"
#include "model/cpu_backend.h"
#include "model/params.h"
#include "parallel/check.h"
#include "parallel/local_comm.h"
#include "trainer/checkpointing.h"

namespace bmoe::trainer {

namespace {

// An external tensor's place in bmoe: which parameter, and which expert row (-1 = whole tensor).
struct Target {
    std::string name;
    int expert = -1;
};

Target map_name(const std::string& hf) {
    static const std::regex mixtral(R"(model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight)");
    static const std::regex mlp_expert(
        R"(model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight)");
    static const std::regex mlp_router(R"(model\.layers\.(\d+)\.mlp\.gate\.weight)");
    std::smatch m;
    if (std::regex_match(hf, m, mixtral))
        return {"model.layers." + m[1].str() + ".block_sparse_moe.experts." + m[3].str(), std::stoi(m[2].str())};
    if (std::regex_match(hf, m, mlp_expert)) {
        const std::string proj = m[3].str();
        const std::string w = proj == "gate_proj" ? "w1" : proj == "up_proj" ? "w3" : "w2";
        return {"model.layers." + m[1].str() + ".block_sparse_moe.experts." + w, std::stoi(m[2].str())};
    }
    if (std::regex_match(hf, m, mlp_router)) return {"model.layers." + m[1].str() + ".block_sparse_moe.gate.weight"};
    return {hf};
}

std::string shape_string(const std::vector<int64_t>& s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
}

}  // namespace

std::map<std::string, std::vector<float>> import_hf_safetensors(const std::vector<std::string>& files,
                                                                const model::ModelConfig& config) {
    BMOE_REQUIRE(!files.empty(), "no safetensors file given: pass the model's *.safetensors shards");
    const model::ParameterLayout layout(config);
    std::map<std::string, std::vector<float>> out;
    std::map<std::string, std::vector<int>> experts_seen;  // stacked tensors: which experts arrived
    for (const std::string& file : files) {
        const checkpoints::SafetensorsFile st = checkpoints::read_safetensors(file);
        for (const auto& [hf_name, entry] : st.tensors) {
            const Target t = map_name(hf_name);
            const int index = layout.find(t.name);
            BMOE_REQUIRE(index >= 0, file, ": tensor '", hf_name,
                         "' has no counterpart in this bmoe model (check [model] in the config: layers, experts, "
                         "tie_embeddings, moe_every; QK-norm and shared experts are not supported)");
            const model::ParamInfo& p = layout.params()[index];
            std::vector<int64_t> expected = p.global_shape;
            if (t.expert >= 0) {
                BMOE_REQUIRE(t.expert < config.num_experts, file, ": '", hf_name, "' is expert ", t.expert,
                             " but model.num_experts is ", config.num_experts);
                expected.erase(expected.begin());
            }
            BMOE_REQUIRE(entry.shape == expected, file, ": '", hf_name, "' has shape ", shape_string(entry.shape),
                         ", bmoe expects ", shape_string(expected), " for ", t.name, ": check the [model] config");
            std::vector<float> values = checkpoints::tensor_to_float(entry);
            std::vector<float>& dst = out[t.name];
            if (t.expert < 0) {
                BMOE_REQUIRE(dst.empty(), file, ": '", t.name, "' appears twice");
                dst = std::move(values);
                continue;
            }
            dst.resize(p.numel);
            std::copy(values.begin(), values.end(), dst.begin() + static_cast<long>(values.size()) * t.expert);
            experts_seen[t.name].push_back(t.expert);
        }
    }
    for (const model::ParamInfo& p : layout.params()) {
        BMOE_REQUIRE(out.count(p.name) > 0, "the checkpoint has no tensor for '", p.name,
                     "': check the [model] config against the checkpoint (layers, experts, norm, tie_embeddings)");
        if (p.group == model::ParamGroup::kExpert && experts_seen.count(p.name) > 0)
            BMOE_REQUIRE(static_cast<int>(experts_seen[p.name].size()) == config.num_experts, "'", p.name,
                         "': the checkpoint holds ", experts_seen[p.name].size(), " of ", config.num_experts,
                         " experts");
    }
    return out;
}

void write_imported_checkpoint(const std::vector<std::string>& files,
                               const RunConfig& config,
                               const std::string& out_path) {
    config.validate();
    const auto tensors = import_hf_safetensors(files, config.model);
    model::CpuBackend cpu;
    model::Model model(config.model, &cpu);
    std::vector<float> block(model.layout().total_numel(), 0.0f);
    for (const model::ParamInfo& p : model.layout().params()) {
        const std::vector<float>& src = tensors.at(p.name);
        std::copy(src.begin(), src.end(), block.begin() + static_cast<long>(p.offset));
    }
    model.params_from_host(block);
    AdamW optimizer(config.optim, model);  // zero moments, step 0
    parallel::LocalComm local;
    parallel::ProcessGrid grid(local, 1);
    std::string parent;
    for (const std::string& f : files) parent += (parent.empty() ? "" : ",") + f;
    save_training_checkpoint(out_path, 0, config, parent, model, optimizer, grid);
}

}  // namespace bmoe::trainer
