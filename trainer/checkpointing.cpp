#include "trainer/checkpointing.h"

#include <map>
#include <vector>

#include "checkpoints/checkpoint.h"

namespace bmoe::trainer {

namespace {

// Host copies of the three flat blocks (params, m, v), in the model's layout.
struct HostState {
    std::vector<float> params, m, v;
};

// One view per parameter tensor of `block`; replicated tensors are stored from world rank 0,
// expert slices from the first data-parallel replica of each EP rank.
std::vector<checkpoints::TensorView> views_of(const model::ParameterLayout& layout,
                                              std::vector<float>& block,
                                              const parallel::ProcessGrid* grid) {
    std::vector<checkpoints::TensorView> views;
    for (const model::ParamInfo& p : layout.params()) {
        checkpoints::TensorView v;
        v.name = p.name;
        v.global_shape = p.global_shape;
        v.global_offset = p.global_offset;
        v.numel = p.numel;
        v.data = block.data() + p.offset;
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

std::map<std::string, std::vector<checkpoints::TensorView>> groups_of(model::Model& model,
                                                                      HostState& host,
                                                                      const parallel::ProcessGrid* grid) {
    const model::ParameterLayout& layout = model.layout();
    std::map<std::string, std::vector<checkpoints::TensorView>> groups = {
        {"model", views_of(layout, host.params, grid)},
        {"optimizer/m", views_of(layout, host.m, grid)},
        {"optimizer/v", views_of(layout, host.v, grid)}};
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
    const size_t n = model.layout().total_numel();
    HostState host{model.params_to_host(), std::vector<float>(n), std::vector<float>(n)};
    be->download(host.m.data(), optimizer.m(), n * sizeof(float));
    be->download(host.v.data(), optimizer.v(), n * sizeof(float));
    checkpoints::CheckpointInfo info;
    info.step = step;
    info.config_toml = config.to_toml();
    info.parent = parent;
    info.extra["world_size"] = std::to_string(grid.world_size());
    info.extra["ep_size"] = std::to_string(grid.ep_size());
    checkpoints::write_checkpoint(path, info, groups_of(model, host, &grid), grid.world());
}

int64_t load_training_checkpoint(const std::string& path, model::Model& model, AdamW& optimizer) {
    const checkpoints::CheckpointInfo info = checkpoints::read_checkpoint_info(path);
    const size_t n = model.layout().total_numel();
    HostState host{std::vector<float>(n), std::vector<float>(n), std::vector<float>(n)};
    checkpoints::read_checkpoint_tensors(path, groups_of(model, host, nullptr));
    model.params_from_host(host.params);
    model::Backend* be = model.backend();
    be->upload(optimizer.m(), host.m.data(), n * sizeof(float));
    be->upload(optimizer.v(), host.v.data(), n * sizeof(float));
    optimizer.set_num_steps(static_cast<int>(info.step));
    return info.step;
}

}  // namespace bmoe::trainer
