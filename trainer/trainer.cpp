#include "trainer/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <ostream>

#include "checkpoints/checkpoint.h"
#include "data/mcqa.h"
#include "model/cpu_threads.h"
#include "parallel/check.h"
#include "parallel/mpi_env.h"
#include "trainer/checkpointing.h"
#include "trainer/data_comm.h"
#include "trainer/grad_sync.h"
#include "trainer/lr_schedule.h"
#include "trainer/report.h"

namespace bmoe::trainer {

using Clock = std::chrono::steady_clock;

namespace {
parallel::Communicator& world_or_local(parallel::Communicator* world, parallel::LocalComm& local) {
    return world != nullptr ? *world : local;
}
}  // namespace

Trainer::Trainer(const RunConfig& config,
                 std::ostream& log,
                 parallel::Communicator* world,
                 std::unique_ptr<model::Backend> backend)
    : config_(config), log_(world == nullptr || world->rank() == 0 ? log : null_log_), backend_(std::move(backend)) {
    config_.validate();
    parallel::Communicator& comm = world_or_local(world, local_comm_);
    const int ep = config_.parallel.ep == 0 ? comm.size() : config_.parallel.ep;
    grid_ = std::make_unique<parallel::ProcessGrid>(comm, ep);
    const int W = grid_->world_size();
    BMOE_REQUIRE(config_.data.batch_size % W == 0, "data.batch_size (", config_.data.batch_size,
                 ") is the global batch and must divide evenly over the ", W, " ranks: use a multiple of ", W);
    const parallel::ExpertRange experts = grid_->expert_range(config_.model.num_experts);
    model::set_cpu_threads(config_.train.threads);
    const std::filesystem::path out_dir(config_.train.out_dir);
    if (is_root()) {
        std::filesystem::create_directories(out_dir);
        std::ofstream(out_dir / "config.toml") << config_.to_toml();
    }
    datasets_ = load_datasets(config_.data, config_.model.vocab_size, config_.train.seed, config_.train.eval_batches,
                              grid_->world_rank(), W, log_);
    if (!backend_)
        backend_ = model::make_backend(config_.train.backend, W > 1 ? parallel::launch_info().local_rank : 0);
    backend_->set_matmul_precision(matmul_precision(config_.train));
    backend_->set_attention_kernel(model::parse_attention_kernel(config_.train.attention));
    const std::string data_comm = setup_data_comm(config_.parallel, *backend_, *grid_);
    model::ParallelContext parallel_context = model::make_parallel_context(*grid_, config_.model.num_experts);
    parallel_context.exchange_bf16 = config_.parallel.exchange_bf16;
    parallel_context.combine_bf16 = config_.parallel.combine_bf16;
    model_ = std::make_unique<model::Model>(config_.model, backend_.get(), parallel_context);
    model_->init_weights(config_.train.seed);
    model_->set_attention_recompute(recomputes(config_.train, "attention"));
    model_->set_mlp_recompute(recomputes(config_.train, "mlp"));
    model_->set_keep_logits(false);  // training reads only the loss: probabilities over the logits
    const int trainable = model_->set_trainable(split_patterns(config_.train.trainable));
    optimizer_ = std::make_unique<AdamW>(config_.optim, *model_);
    const std::string& overlap = config_.parallel.overlap_grad_reduce;
    grad_sync_ = std::make_unique<GradientSync>(
        *model_, *grid_, overlap == "true" || (overlap == "auto" && grid_->data_world().device_memory()));
    resume_if_asked();
    if (parent_checkpoint_.empty() && !config_.train.init.empty()) {
        const int loaded = init_from_checkpoint(config_.train.init, *model_);
        parent_checkpoint_ = config_.train.init;
        log_ << "init: " << loaded << " of " << model_->layout().params().size() << " tensors from "
             << config_.train.init << " (the others keep their initialisation)\n";
    }
    if (!config_.train.trainable.empty()) {
        size_t trained = 0;
        for (const model::ParamInfo& p : model_->layout().params()) trained += p.trainable ? p.numel : 0;
        log_ << "trainable: " << trainable << " of " << model_->layout().params().size() << " tensors, " << trained
             << " parameters ('" << config_.train.trainable << "'); the rest are frozen, optimizer state "
             << optimizer_->moments_numel() << " floats per moment\n";
    }
    metrics_ = std::make_unique<MetricsLog>(is_root() ? (out_dir / "metrics.jsonl").string() : "",
                                            /*append=*/start_step_ > 0);
    log_ << "parallel: world " << W << " = dp " << grid_->dp_size() << " x ep " << grid_->ep_size() << " | comm "
         << data_comm << (grad_sync_->overlapping() ? " (overlapped grad all-reduce)" : "") << " | " << experts.count
         << " of " << config_.model.num_experts << " experts per rank | batch " << config_.data.batch_size / W << " of "
         << config_.data.batch_size << " sequences per rank\n"
         << config_.model.describe() << "\n"
         << "params: " << model_->layout().total_numel() << " on rank 0, " << model_->layout().active_matmul_params()
         << " active matmul per token | backend " << backend_->name() << " ("
         << model::to_string(backend_->matmul_precision()) << " GEMMs, " << config_.train.attention << " attention)"
         << " | threads " << model::cpu_threads() << " (OpenBLAS " << model::openblas_kernels() << " kernels)\n";
}

void Trainer::resume_if_asked() {
    const std::string& resume = config_.checkpoint.resume;
    if (resume.empty()) return;
    std::string path = resume;
    if (resume == "auto") {
        path = checkpoints::latest_checkpoint(config_.checkpoint_dir());
        if (path.empty()) {
            log_ << "resume: no checkpoint in " << config_.checkpoint_dir() << ", starting fresh\n";
            return;
        }
    }
    start_step_ = static_cast<int>(load_training_checkpoint(path, *model_, *optimizer_));
    BMOE_REQUIRE(start_step_ <= config_.train.steps, "checkpoint '", path, "' is at step ", start_step_,
                 ", beyond train.steps=", config_.train.steps, ": raise --train.steps to continue training");
    parent_checkpoint_ = path;
    datasets_.train_loader->seek(static_cast<uint64_t>(start_step_) * config_.train.grad_accum);
    log_ << "resume: " << path << " at step " << start_step_ << "\n";
}

data::Batch Trainer::local_rows(const data::Batch& global) const {
    const int W = grid_->world_size(), r = grid_->world_rank();
    if (W == 1) return global;
    data::Batch b;
    b.B = global.B / W;
    b.T = global.T;
    const size_t begin = static_cast<size_t>(r) * b.B * b.T, n = static_cast<size_t>(b.B) * b.T;
    b.tokens.assign(global.tokens.begin() + begin, global.tokens.begin() + begin + n);
    b.targets.assign(global.targets.begin() + begin, global.targets.begin() + begin + n);
    b.domains.assign(global.domains.begin() + begin, global.domains.begin() + begin + n);
    return b;
}

Trainer::~Trainer() = default;

void Trainer::apply_loss_mask(data::Batch& batch) const {
    if (config_.data.loss_on == "answers")
        data::keep_answer_targets_only(batch.tokens.data(), batch.targets.data(), batch.targets.size(), batch.T);
}

namespace {
// Testing hook for job teardown: BMOE_FAIL_AT=RANK:STEP makes that rank fail in that step.
void maybe_inject_failure(int rank, int step) {
    const char* spec = std::getenv("BMOE_FAIL_AT");
    if (spec == nullptr) return;
    int fail_rank = -1, fail_step = -1;
    if (std::sscanf(spec, "%d:%d", &fail_rank, &fail_step) == 2 && fail_rank == rank && fail_step == step)
        throw Error(concat("injected failure in step ", step, " (BMOE_FAIL_AT=", spec, ")"));
}
}  // namespace

StepMetrics Trainer::train_step(int step) {
    maybe_inject_failure(grid_->world_rank(), step + 1);
    const DataConfig& d = config_.data;
    const int accum = config_.train.grad_accum;
    const model::LossWeights weights{config_.loss.aux_coef, config_.loss.zloss_coef, config_.loss.router_reg_at(step)};
    StepMetrics m;
    m.beta = weights.router_reg_coef;
    m.step = step + 1;
    m.total_steps = config_.train.steps;
    model_->zero_grad();
    for (int micro = 0; micro < accum; ++micro) {
        data::Batch batch = datasets_.train_loader->next_batch();  // this rank's rows
        apply_loss_mask(batch);
        // Routing noise is keyed by the token's id in the global batch of this micro-step.
        model::RoutingContext routing;
        routing.seed = config_.train.seed;
        routing.step = step;
        routing.first_token = (static_cast<int64_t>(step) * accum + micro) * d.batch_size * d.seq_len +
                              static_cast<int64_t>(grid_->world_rank()) * batch.B * d.seq_len;
        model_->set_routing(routing);
        const model::ForwardStats s =
            model_->forward(batch.tokens.data(), batch.targets.data(), batch.B, d.seq_len, weights);
        if (micro == accum - 1) grad_sync_->before_last_backward();
        model_->backward(1.0f / static_cast<float>(accum));
        m.loss += s.total_loss / accum;
        m.ce += s.ce_loss / accum;
        m.aux += s.aux_loss / accum;
        m.z += s.z_loss / accum;
        m.reg += s.router_reg / accum;
        if (config_.train.log_layers) {
            m.aux_layers.resize(s.moe_layers.size(), 0.0);
            m.z_layers.resize(s.moe_layers.size(), 0.0);
            m.reg_layers.resize(s.moe_layers.size(), 0.0);
            for (size_t l = 0; l < s.moe_layers.size(); ++l) {
                m.aux_layers[l] += s.moe_layers[l].aux_loss / accum;
                m.z_layers[l] += s.moe_layers[l].z_loss / accum;
                m.reg_layers[l] += s.moe_layers[l].reg / accum;
            }
        }
        if (config_.model.router.is_stochastic()) {
            m.router_sigma.resize(s.moe_layers.size(), 0.0);
            m.router_temperature.resize(s.moe_layers.size(), 0.0);
            for (size_t l = 0; l < s.moe_layers.size(); ++l) {
                m.router_sigma[l] += s.moe_layers[l].mean_sigma / accum;
                m.router_temperature[l] += s.moe_layers[l].mean_temperature / accum;
            }
        }
        if (m.expert_load.empty()) m.expert_load.assign(s.moe_layers.size(), {});
        for (size_t l = 0; l < s.moe_layers.size(); ++l) {
            auto& load = m.expert_load[l];
            load.resize(s.moe_layers[l].tokens_per_expert.size(), 0);
            for (size_t e = 0; e < load.size(); ++e) load[e] += s.moe_layers[l].tokens_per_expert[e];
            m.num_dropped += s.moe_layers[l].num_dropped;
            m.num_copies += s.moe_layers[l].num_copies;
        }
    }
    const model::ExchangeStats x = model_->take_exchange_stats();
    m.exchange_s = x.seconds;
    double traffic[2] = {x.bytes_sent, x.min_bytes};  // x and y forward, dy and dx backward
    if (grid_->world_size() > 1) {
        grid_->world().all_reduce_max(&m.exchange_s, 1);
        grid_->world().all_reduce_sum(traffic, 2);
    }
    m.exchange_bytes = traffic[0];
    m.exchange_min_bytes = traffic[1];
    const auto sync_start = Clock::now();
    grad_sync_->finish();
    m.grad_sync_s = std::chrono::duration<double>(Clock::now() - sync_start).count();
    m.grad_norm = global_grad_norm(*model_, *grid_);
    BMOE_REQUIRE(std::isfinite(m.grad_norm) && std::isfinite(m.loss), "step ", m.step,
                 ": loss or gradient is NaN/Inf (loss ", m.loss, ", grad norm ", m.grad_norm,
                 "); lower optim.lr or raise optim.warmup_steps");
    const OptimConfig& o = config_.optim;
    m.lr = lr_at_step(step, config_.train.steps, o.lr, o.warmup_steps, o.min_lr_ratio);
    optimizer_->step(static_cast<float>(m.lr), optimizer_->clip_scale(m.grad_norm));
    model_->end_step(step + 1);  // selection bias, SWAG snapshots
    // Families without sigma (or T) report none.
    auto all_zero = [](const std::vector<double>& v) {
        return std::all_of(v.begin(), v.end(), [](double x) { return x == 0.0; });
    };
    if (all_zero(m.router_sigma)) m.router_sigma.clear();
    if (all_zero(m.router_temperature)) m.router_temperature.clear();
    return m;
}

model::RoutingContext Trainer::eval_routing() const {
    // Validation routes deterministically (l = mu): comparable across steps and router families.
    model::RoutingContext ctx;
    ctx.seed = config_.train.seed;
    ctx.training = false;
    ctx.mode = model::RouterMode::kMean;
    return ctx;
}

double Trainer::evaluate() {
    const model::LossWeights weights{config_.loss.aux_coef, config_.loss.zloss_coef};
    model_->set_routing(eval_routing());
    double sum = 0.0;
    int64_t count = 0;
    for (const data::Batch& global : datasets_.val_batches) {
        if (global.B % grid_->world_size() != 0) continue;  // a short last batch cannot be split evenly
        data::Batch batch = local_rows(global);
        apply_loss_mask(batch);
        const model::ForwardStats s = model_->forward(batch.tokens.data(), batch.targets.data(), batch.B, batch.T,
                                                      weights);  // global CE over all ranks' rows
        sum += s.ce_loss * static_cast<double>(s.num_valid_targets);
        count += s.num_valid_targets;
    }
    return count > 0 ? sum / static_cast<double>(count) : 0.0;
}

namespace {

// SIGTERM / SIGUSR1 (Slurm's notice before a preemption or the time limit) ask the run to save
// a checkpoint at the end of the current step and stop; the handler only sets a flag.
volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void request_stop(int signal_number) { g_stop_signal = signal_number; }

struct StopSignalGuard {
    struct sigaction old_term {
    }, old_usr1{};
    StopSignalGuard() {
        g_stop_signal = 0;
        struct sigaction sa {};
        sa.sa_handler = request_stop;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGTERM, &sa, &old_term);
        sigaction(SIGUSR1, &sa, &old_usr1);
    }
    ~StopSignalGuard() {
        sigaction(SIGTERM, &old_term, nullptr);
        sigaction(SIGUSR1, &old_usr1, nullptr);
    }
};

}  // namespace

bool Trainer::stop_requested() {
    // Any rank's signal stops every rank at the same step.
    double flag = g_stop_signal != 0 ? 1.0 : 0.0;
    if (grid_->world_size() > 1) grid_->world().all_reduce_max(&flag, 1);
    return flag > 0.0;
}

bool Trainer::save_due_by_time(Clock::time_point last_save) {
    // Rank 0's clock decides, so every rank saves at the same step.
    if (config_.checkpoint.every_minutes <= 0.0f) return false;
    const double minutes = std::chrono::duration<double>(Clock::now() - last_save).count() / 60.0;
    double due = minutes >= config_.checkpoint.every_minutes ? 1.0 : 0.0;
    if (grid_->world_size() > 1) grid_->world().broadcast(&due, sizeof(due), 0);
    return due > 0.0;
}

double Trainer::save_checkpoint(int step) {
    const std::string dir = config_.checkpoint_dir();
    if (is_root()) std::filesystem::create_directories(dir);
    const std::string path = checkpoints::checkpoint_path(dir, step);
    const auto start = Clock::now();
    save_training_checkpoint(path, step, config_, parent_checkpoint_, *model_, *optimizer_, *grid_);
    if (is_root()) {
        checkpoints::update_latest(dir, path);
        checkpoints::prune_checkpoints(dir, config_.checkpoint.keep);
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    checkpoint_seconds_ += seconds;
    log_ << "checkpoint: " << path << " (" << format_duration(seconds) << ")" << std::endl;
    return seconds;
}

TrainResult Trainer::run() {
    TrainResult result;
    const TrainConfig& t = config_.train;
    const double tokens_per_step = static_cast<double>(config_.data.batch_size) * config_.data.seq_len * t.grad_accum;
    auto run_eval = [&](int step) {
        EvalMetrics e{step, evaluate(), datasets_.unigram_loss};
        metrics_->write(e);
        result.evals.push_back(e);
        log_ << "eval step " << step << " | val loss " << e.val_loss << " | unigram baseline " << e.unigram_loss
             << std::endl;
    };
    StopSignalGuard signals;
    const auto start = Clock::now();
    auto window_start = start;
    auto last_save = start;
    int window_steps = 0;
    for (int step = start_step_; step < t.steps; ++step) {
        const auto step_start = Clock::now();
        StepMetrics m = train_step(step);
        ++window_steps;
        const auto now = Clock::now();
        m.step_s = std::chrono::duration<double>(now - step_start).count();
        m.peak_memory_gib = static_cast<double>(backend_->peak_allocated_bytes()) / (1u << 30);
        m.elapsed_s = std::chrono::duration<double>(now - start).count();
        const double window_s = std::chrono::duration<double>(now - window_start).count();
        m.tokens_per_s = window_s > 0 ? tokens_per_step * window_steps / window_s : 0.0;
        result.losses.push_back(m.loss);
        metrics_->write(m);
        if (m.step % t.log_every == 0 || m.step == t.steps || m.step == start_step_ + 1) {
            log_ << format_progress(m) << std::endl;
            window_start = now;
            window_steps = 0;
        }
        const bool stop = stop_requested();
        const bool periodic =
            (config_.checkpoint.every > 0 && m.step % config_.checkpoint.every == 0) || save_due_by_time(last_save);
        if (stop || periodic || m.step == t.steps) {
            const double seconds = save_checkpoint(m.step);
            last_save = Clock::now();
            window_start += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
        }
        if (stop) {
            log_ << "stop signal received: checkpoint saved at step " << m.step
                 << "; resume with --checkpoint.resume=auto" << std::endl;
            result.stopped_early = true;
            return result;
        }
        if (t.eval_every > 0 && m.step % t.eval_every == 0 && m.step != t.steps) run_eval(m.step);
    }
    // Throughput counts training only (not checkpoint writes).
    const double total_s = std::chrono::duration<double>(Clock::now() - start).count() - checkpoint_seconds_;
    result.tokens_per_s = total_s > 0 ? tokens_per_step * (t.steps - start_step_) / total_s : 0.0;
    run_eval(t.steps);
    log_ << "trained " << t.steps << " steps in " << format_duration(total_s) << " ("
         << static_cast<long>(result.tokens_per_s) << " tok/s); metrics: " << metrics_->path() << std::endl;
    final_report();
    return result;
}

void Trainer::final_report() {
    std::vector<DomainEval> local_domains = datasets_.domain_evals;
    for (DomainEval& d : local_domains) {
        std::vector<data::Batch> rows;
        for (const data::Batch& b : d.batches)
            if (b.B % grid_->world_size() == 0) rows.push_back(local_rows(b));
        d.batches = std::move(rows);
    }
    model_->set_routing(eval_routing());
    const auto reports =
        evaluate_domains(*model_, local_domains, model::LossWeights{config_.loss.aux_coef, config_.loss.zloss_coef});
    if (!is_root()) return;
    const TrainConfig& t = config_.train;
    const std::string report_path = (std::filesystem::path(t.out_dir) / "report.json").string();
    write_report_json(report_path, t.steps, reports);
    log_ << "\nevaluation report (" << report_path << ")\n" << format_report(reports) << std::endl;
    if (t.plot) plot_loss_curve();
}

void Trainer::plot_loss_curve() {
    // Drawn by matplotlib (tools/plot_loss.py); a missing Python is a warning, not a failure.
    const std::string cmd = std::string("/usr/bin/python3 '") + BMOE_TOOLS_DIR + "/plot_loss.py' '" + metrics_->path() +
                            "' >/dev/null 2>&1";
    if (std::system(cmd.c_str()) == 0)
        log_ << "loss curve: " << (std::filesystem::path(config_.train.out_dir) / "loss_curve.png").string()
             << std::endl;
    else
        log_ << "warning: loss curve not drawn (needs /usr/bin/python3 with matplotlib: "
             << "apt-get install python3-matplotlib)" << std::endl;
}

}  // namespace bmoe::trainer
