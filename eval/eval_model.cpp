#include "eval/eval_model.h"

#include <algorithm>
#include <filesystem>

#include "checkpoints/checkpoint.h"
#include "model/cpu_threads.h"
#include "parallel/check.h"
#include "parallel/mpi_env.h"
#include "trainer/checkpointing.h"

namespace bmoe::eval {

namespace fs = std::filesystem;

CheckpointSource read_checkpoint_source(const std::string& path) {
    BMOE_REQUIRE(!path.empty(), "no checkpoint given: pass --ckpt FILE (a .h5 file a training run wrote, e.g. "
                                "runs/NAME/checkpoints/step_00000400.h5)");
    std::error_code ec;
    BMOE_REQUIRE(fs::exists(path, ec), "checkpoint '", path,
                 "' does not exist: pass --ckpt with a .h5 file a training run wrote (e.g. "
                 "runs/NAME/checkpoints/step_00000400.h5)");
    CheckpointSource s;
    s.path = path;
    if (fs::is_directory(path, ec)) {
        s.path = checkpoints::latest_checkpoint(path);
        BMOE_REQUIRE(!s.path.empty(), "checkpoint directory '", path,
                     "' has no 'latest' checkpoint: pass --ckpt with one of its step_*.h5 files");
    }
    const checkpoints::CheckpointInfo info = checkpoints::read_checkpoint_info(s.path);
    BMOE_REQUIRE(!info.config_toml.empty(), "checkpoint '", s.path,
                 "' stores no run config (config_toml): is it a bmoe training checkpoint? (bmoe ckpt inspect ", s.path,
                 ")");
    s.step = info.step;
    s.config = trainer::parse_config_toml(info.config_toml, concat("the config stored in checkpoint '", s.path, "'"));
    return s;
}

EvalModel::EvalModel(const CheckpointSource& source,
                     const std::string& backend,
                     int ep,
                     int threads,
                     parallel::Communicator* world)
    : config_(source.config) {
    // Evaluation routes dropless: with a capacity limit a token's output would depend on the other
    // rows of its batch (dummy rows included), so on the batching and the number of ranks.
    capacity_factor_ = config_.model.capacity_factor;
    config_.model.capacity_factor = 0.0f;
    parallel::Communicator& comm = world != nullptr ? *world : local_comm_;
    const int ep_size = ep == 0 ? comm.size() : ep;
    BMOE_REQUIRE(ep_size >= 1 && comm.size() % ep_size == 0, "--ep ", ep, " must divide the ", comm.size(),
                 " ranks: use --ep=0 (all ranks) or a divisor of the rank count");
    BMOE_REQUIRE(config_.model.num_experts % ep_size == 0, "--ep ", ep_size, " does not divide the checkpoint's ",
                 config_.model.num_experts, " experts: use a divisor of ", config_.model.num_experts);
    grid_ = std::make_unique<parallel::ProcessGrid>(comm, ep_size);
    const int W = grid_->world_size();
    model::set_cpu_threads(threads);
    config_.train.backend = backend;
    backend_ = model::make_backend(backend, W > 1 ? parallel::launch_info().local_rank : 0);
    model_ = std::make_unique<model::Model>(config_.model, backend_.get(),
                                            model::make_parallel_context(*grid_, config_.model.num_experts));
    model_->init_weights(config_.train.seed);
    tensors_loaded_ = trainer::init_from_checkpoint(source.path, *model_);
}

EvalModel::~EvalModel() = default;

const std::string& EvalModel::backend_name() const { return config_.train.backend; }

LocalRows EvalModel::forward(const std::vector<std::span<const int32_t>>& rows,
                             int T,
                             int64_t id_base,
                             model::RoutingContext ctx) {
    const int W = world_size();
    const int R = static_cast<int>(rows.size());
    BMOE_ASSERT(R >= 1 && T >= 1, "empty evaluation batch");
    const int P = (R + W - 1) / W * W;
    LocalRows local;
    local.count = P / W;
    local.first = rank() * local.count;
    local.T = T;
    tokens_.assign(static_cast<size_t>(local.count) * T, 0);
    for (int b = 0; b < local.count; ++b) {
        const int g = local.first + b;
        if (g >= R) continue;  // dummy row: all padding, its results are discarded
        BMOE_ASSERT(rows[g].size() >= 1 && static_cast<int>(rows[g].size()) <= T, "row longer than the batch");
        std::copy(rows[g].begin(), rows[g].end(), tokens_.begin() + static_cast<long>(b) * T);
    }
    ctx.training = false;
    ctx.first_token = id_base + static_cast<int64_t>(local.first) * T;
    model_->set_routing(ctx);
    model_->forward(tokens_.data(), nullptr, local.count, T, model::LossWeights{});
    return local;
}

void all_reduce_sum(parallel::Communicator& world, std::vector<double>& values) {
    if (world.size() > 1 && !values.empty()) world.all_reduce_sum(values.data(), values.size());
}

void all_reduce_sum(parallel::Communicator& world, std::vector<int64_t>& values) {
    if (world.size() > 1 && !values.empty()) world.all_reduce_sum(values.data(), values.size());
}

}  // namespace bmoe::eval
