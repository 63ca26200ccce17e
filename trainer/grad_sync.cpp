#include "trainer/grad_sync.h"

#include <cmath>

#include "parallel/check.h"

namespace bmoe::trainer {

namespace {

// Calls fn(is_expert, stage, offset, count) for each run of adjacent trainable tensors of the same
// kind (and, when by_stage, the same backward stage). Padding between tensors is included: it is
// zero in the gradient block.
template <typename Fn>
void for_each_run(const model::ParameterLayout& layout, bool by_stage, Fn fn) {
    const auto& params = layout.params();
    size_t i = 0;
    while (i < params.size()) {
        const bool expert = params[i].group == model::ParamGroup::kExpert, trainable = params[i].trainable;
        const int stage = params[i].backward_stage;
        size_t j = i + 1;
        while (j < params.size() && (params[j].group == model::ParamGroup::kExpert) == expert &&
               params[j].trainable == trainable && (!by_stage || params[j].backward_stage == stage))
            ++j;
        const size_t end = j < params.size() ? params[j].offset : layout.total_numel();
        if (trainable) fn(expert, stage, params[i].offset, end - params[i].offset);
        i = j;
    }
}

// Whether `comm` can read `backend`'s memory directly.
bool reads_backend_memory(const parallel::Communicator& comm, const model::Backend& backend) {
    return backend.is_host() != comm.device_memory();
}

}  // namespace

GradientSync::GradientSync(model::Model& model, const parallel::ProcessGrid& grid, bool overlap)
    : model_(model),
      grid_(grid),
      overlap_(overlap && grid.world_size() > 1 && reads_backend_memory(grid.data_world(), *model.backend()) &&
               reads_backend_memory(grid.data_dp(), *model.backend())) {
    for_each_run(model.layout(), overlap_, [&](bool expert, int stage, size_t offset, size_t count) {
        runs_.push_back(Run{expert, stage, offset, count});
    });
}

GradientSync::~GradientSync() {
    if (armed_) model_.set_gradients_ready_hook({});  // an exception between backward and finish()
}

parallel::Communicator& GradientSync::comm_for(const Run& run) const {
    return run.expert ? grid_.data_dp() : grid_.data_world();
}

void GradientSync::before_last_backward() {
    if (!overlap_) return;
    started_ = 0;
    armed_ = true;
    model_.set_gradients_ready_hook([this](int stage) { on_stage_ready(stage); });
}

void GradientSync::on_stage_ready(int stage) {
    // Runs are in layout order (embeddings, layers 0.., head) and backward finishes stages in the
    // reverse order, so the runs of `stage` are the last ones not yet started.
    while (started_ < runs_.size() && runs_[runs_.size() - 1 - started_].stage == stage) {
        const Run& run = runs_[runs_.size() - 1 - started_++];
        parallel::Communicator& comm = comm_for(run);
        if (comm.size() > 1 && run.count > 0) comm.start_all_reduce_sum(model_.grads() + run.offset, run.count);
    }
    grid_.data_world().progress();
    grid_.data_dp().progress();
}

void GradientSync::reduce_blocking(const Run& run) {
    parallel::Communicator& comm = comm_for(run);
    if (comm.size() == 1 || run.count == 0) return;
    float* grads = model_.grads() + run.offset;
    model::Backend* be = model_.backend();
    if (reads_backend_memory(comm, *be)) {
        comm.all_reduce_sum(grads, run.count);
        return;
    }
    staging_.resize(run.count);
    be->download(staging_.data(), grads, run.count * sizeof(float));
    comm.all_reduce_sum(staging_.data(), run.count);
    be->upload(grads, staging_.data(), run.count * sizeof(float));
}

void GradientSync::finish() {
    if (grid_.world_size() == 1) return;
    if (!overlap_) {
        for (const Run& run : runs_) reduce_blocking(run);
        return;
    }
    BMOE_ASSERT(armed_, "GradientSync::finish without before_last_backward");
    model_.set_gradients_ready_hook({});
    armed_ = false;
    BMOE_ASSERT(started_ == runs_.size(), "backward started ", started_, " of ", runs_.size(),
                " gradient reductions (a backward stage was not reported)");
    grid_.data_world().wait_reductions();
    grid_.data_dp().wait_reductions();
}

void all_reduce_gradients(model::Model& model, const parallel::ProcessGrid& grid) {
    GradientSync(model, grid, /*overlap=*/false).finish();
}

double global_grad_norm(model::Model& model, const parallel::ProcessGrid& grid) {
    double sums[2] = {0.0, 0.0};  // replicated, this rank's experts
    for_each_run(model.layout(), false, [&](bool expert, int, size_t offset, size_t count) {
        sums[expert ? 1 : 0] += model.backend()->sum_squares(model.grads() + offset, count);
    });
    if (grid.ep_size() > 1) grid.ep().all_reduce_sum(&sums[1], 1);
    return std::sqrt(sums[0] + sums[1]);
}

}  // namespace bmoe::trainer
