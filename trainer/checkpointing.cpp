#include "trainer/checkpointing.h"

#include <map>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "parallel/check.h"

namespace bmoe::trainer {

namespace {

// Host copies of the three flat blocks (params, m, v), in the model's layout.
struct HostState {
    std::vector<float> params, m, v;
};

// One view per parameter tensor of `block` (offsets: where each tensor starts in the block;
// AdamW::kFrozen = not stored); replicated tensors are stored from world rank 0, expert slices
// from the first data-parallel replica of each EP rank.
std::vector<checkpoints::TensorView> views_of(const model::ParameterLayout& layout,
                                              std::vector<float>& block,
                                              const std::vector<size_t>& offsets,
                                              const parallel::ProcessGrid* grid) {
    std::vector<checkpoints::TensorView> views;
    for (size_t i = 0; i < layout.params().size(); ++i) {
        const model::ParamInfo& p = layout.params()[i];
        if (offsets[i] == AdamW::kFrozen) continue;
        checkpoints::TensorView v;
        v.name = p.name;
        v.global_shape = p.global_shape;
        v.global_offset = p.global_offset;
        v.numel = p.numel;
        v.data = block.data() + offsets[i];
        if (grid != nullptr)
            v.contribute = p.group == model::ParamGroup::kExpert ? grid->dp_rank() == 0 : grid->world_rank() == 0;
        views.push_back(std::move(v));
    }
    return views;
}

// Router state (selection bias, SWAG moments): replicated host tensors, stored from world rank 0.
std::vector<checkpoints::TensorView> router_state_views(model::Model& model, const parallel::ProcessGrid* grid) {
    std::vector<checkpoints::TensorView> views;
    for (const model::RouterStateTensor& t : model.router_state()) {
        checkpoints::TensorView v;
        v.name = t.name;
        v.global_shape = t.shape;
        v.numel = t.values->size();
        v.data = t.values->data();
        if (grid != nullptr) v.contribute = grid->world_rank() == 0;
        views.push_back(std::move(v));
    }
    return views;
}

std::vector<size_t> param_offsets(const model::ParameterLayout& layout) {
    std::vector<size_t> offsets;
    for (const model::ParamInfo& p : layout.params()) offsets.push_back(p.offset);
    return offsets;
}

std::vector<size_t> moment_offsets(const model::ParameterLayout& layout, const AdamW& optimizer) {
    std::vector<size_t> offsets;
    for (size_t i = 0; i < layout.params().size(); ++i) offsets.push_back(optimizer.moment_offset(i));
    return offsets;
}

// Frozen tensors have no optimizer state, so the optimizer groups hold the trainable tensors only.
std::map<std::string, std::vector<checkpoints::TensorView>> groups_of(model::Model& model,
                                                                      const AdamW& optimizer,
                                                                      HostState& host,
                                                                      const parallel::ProcessGrid* grid) {
    const model::ParameterLayout& layout = model.layout();
    const std::vector<size_t> moments = moment_offsets(layout, optimizer);
    std::map<std::string, std::vector<checkpoints::TensorView>> groups = {
        {"model", views_of(layout, host.params, param_offsets(layout), grid)},
        {"optimizer/m", views_of(layout, host.m, moments, grid)},
        {"optimizer/v", views_of(layout, host.v, moments, grid)}};
    std::vector<checkpoints::TensorView> state = router_state_views(model, grid);
    if (!state.empty()) groups["router_state"] = std::move(state);
    return groups;
}

}  // namespace

void save_training_checkpoint(const std::string& path,
                              int64_t step,
                              const RunConfig& config,
                              const std::string& parent,
                              model::Model& model,
                              AdamW& optimizer,
                              const parallel::ProcessGrid& grid) {
    model::Backend* be = model.backend();
    const size_t n = optimizer.moments_numel();
    HostState host{model.params_to_host(), std::vector<float>(n), std::vector<float>(n)};
    be->download(host.m.data(), optimizer.m(), n * sizeof(float));
    be->download(host.v.data(), optimizer.v(), n * sizeof(float));
    checkpoints::CheckpointInfo info;
    info.step = step;
    info.config_toml = config.to_toml();
    info.parent = parent;
    info.extra["world_size"] = std::to_string(grid.world_size());
    info.extra["ep_size"] = std::to_string(grid.ep_size());
    checkpoints::write_checkpoint(path, info, groups_of(model, optimizer, host, &grid), grid.world());
}

int64_t load_training_checkpoint(const std::string& path, model::Model& model, AdamW& optimizer) {
    const checkpoints::CheckpointInfo info = checkpoints::read_checkpoint_info(path);
    const size_t n = optimizer.moments_numel();
    HostState host{std::vector<float>(model.layout().total_numel()), std::vector<float>(n), std::vector<float>(n)};
    checkpoints::read_checkpoint_tensors(path, groups_of(model, optimizer, host, nullptr));
    model.params_from_host(host.params);
    model::Backend* be = model.backend();
    be->upload(optimizer.m(), host.m.data(), n * sizeof(float));
    be->upload(optimizer.v(), host.v.data(), n * sizeof(float));
    optimizer.set_num_steps(static_cast<int>(info.step));
    return info.step;
}

int init_from_checkpoint(const std::string& path, model::Model& model) {
    const model::ParameterLayout& layout = model.layout();
    std::vector<std::string> names;
    for (const model::ParamInfo& p : layout.params()) names.push_back(p.name);
    const std::vector<bool> present = checkpoints::checkpoint_has_tensors(path, "model", names);
    std::vector<float> params = model.params_to_host();
    std::vector<checkpoints::TensorView> views;
    for (checkpoints::TensorView& v : views_of(layout, params, param_offsets(layout), nullptr))
        if (present[static_cast<size_t>(layout.find(v.name))]) views.push_back(v);
    BMOE_REQUIRE(!views.empty(), "checkpoint ", path, " holds none of this model's tensors: is it a bmoe checkpoint ",
                 "of the same architecture? (bmoe ckpt inspect ", path, ")");
    checkpoints::read_checkpoint_tensors(path, {{"model", views}});
    // A variational router starts from the deterministic one: ensemble members 1..M-1 become the
    // pretrained router plus their own small random init, so the members differ from the start.
    const model::ModelTensors t = layout.views(params.data());
    const model::ModelConfig& c = model.config();
    for (int l = 0; l < c.num_layers; ++l) {
        const model::LayerTensors& w = t.layers[l];
        if (w.router_ensemble_w == nullptr || present[static_cast<size_t>(layout.find(concat(
                                                  "model.layers.", l, ".block_sparse_moe.router.ensemble.weight")))])
            continue;
        const size_t ED = static_cast<size_t>(c.num_experts) * c.d_model;
        for (int m = 0; m < c.router.ensemble_size - 1; ++m)
            for (size_t j = 0; j < ED; ++j) w.router_ensemble_w[m * ED + j] += w.router_w[j];
    }
    model.params_from_host(params);
    // Router state (SWAG moments, selection bias) when the checkpoint has it for this router.
    std::vector<checkpoints::TensorView> state = router_state_views(model, nullptr);
    std::vector<std::string> state_names;
    for (const checkpoints::TensorView& v : state) state_names.push_back(v.name);
    const std::vector<bool> state_present = checkpoints::checkpoint_has_tensors(path, "router_state", state_names);
    std::vector<checkpoints::TensorView> found;
    for (size_t i = 0; i < state.size(); ++i)
        if (state_present[i]) found.push_back(state[i]);
    if (!found.empty()) checkpoints::read_checkpoint_tensors(path, {{"router_state", found}});
    return static_cast<int>(views.size());
}

}  // namespace bmoe::trainer
