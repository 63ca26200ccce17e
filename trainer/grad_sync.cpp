#include "trainer/grad_sync.h"

#include <cmath>
#include <vector>

namespace bmoe::trainer {

namespace {

// Sums [offset, offset + count) of the gradient block over `comm`.
void reduce_range(
    model::Model& model, parallel::Communicator& comm, size_t offset, size_t count, std::vector<float>& staging) {
    if (comm.size() == 1 || count == 0) return;
    float* grads = model.grads() + offset;
    model::Backend* be = model.backend();
    if (be->is_host()) {
        comm.all_reduce_sum(grads, count);
        return;
    }
    staging.resize(count);
    be->download(staging.data(), grads, count * sizeof(float));
    comm.all_reduce_sum(staging.data(), count);
    be->upload(grads, staging.data(), count * sizeof(float));
}

// Calls fn(is_expert, offset, count) for each run of adjacent trainable tensors of the same kind
// (padding between tensors included: it is zero in the gradient block). Frozen tensors are skipped:
// their gradients are neither summed nor counted in the norm.
template <typename Fn>
void for_each_run(const model::ParameterLayout& layout, Fn fn) {
    const auto& params = layout.params();
    size_t i = 0;
    while (i < params.size()) {
        const bool expert = params[i].group == model::ParamGroup::kExpert, trainable = params[i].trainable;
        size_t j = i + 1;
        while (j < params.size() && (params[j].group == model::ParamGroup::kExpert) == expert &&
               params[j].trainable == trainable)
            ++j;
        const size_t end = j < params.size() ? params[j].offset : layout.total_numel();
        if (trainable) fn(expert, params[i].offset, end - params[i].offset);
        i = j;
    }
}

}  // namespace

void all_reduce_gradients(model::Model& model, const parallel::ProcessGrid& grid) {
    if (grid.world_size() == 1) return;
    std::vector<float> staging;
    for_each_run(model.layout(), [&](bool expert, size_t offset, size_t count) {
        reduce_range(model, expert ? grid.dp() : grid.world(), offset, count, staging);
    });
}

double global_grad_norm(model::Model& model, const parallel::ProcessGrid& grid) {
    double sums[2] = {0.0, 0.0};  // replicated, this rank's experts
    for_each_run(model.layout(), [&](bool expert, size_t offset, size_t count) {
        sums[expert ? 1 : 0] += model.backend()->sum_squares(model.grads() + offset, count);
    });
    if (grid.ep_size() > 1) grid.ep().all_reduce_sum(&sums[1], 1);
    return std::sqrt(sums[0] + sums[1]);
}

}  // namespace bmoe::trainer
