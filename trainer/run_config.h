// run_config.h -- RunConfig: every setting of a training run, grouped by component.
//
// Each field is a dotted CLI flag (--model.num_experts=8, torchtitan style) and a TOML key
// ([model] num_experts = 8) read with --config FILE; flags given on the command line win over
// the file. validate() checks everything once; describe()/to_toml() print the resolved config.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/precision.h"

namespace CLI {
class App;
}

namespace bmoe::trainer {

struct OptimConfig {
    float lr = 3e-3f;           // peak learning rate
    float min_lr_ratio = 0.1f;  // cosine decays to lr * min_lr_ratio
    int warmup_steps = 20;      // linear warm-up from 0
    float beta1 = 0.9f;
    float beta2 = 0.95f;
    float eps = 1e-8f;
    float weight_decay = 0.1f;  // decoupled (AdamW); never applied to norms/biases
    float grad_clip = 1.0f;     // global L2 grad-norm clip; <= 0 disables
    // Learning-rate multiplier of the router's variance/temperature heads (sigma, L, T, weight rho):
    // under Adam, beta alone is a coarse knob on how fast sigma moves (docs/routers.md).
    float router_variance_lr_scale = 0.1f;
};

struct LossConfig {
    float aux_coef = 0.01f;     // Switch/GShard load-balancing loss weight
    float zloss_coef = 0.001f;  // router z-loss weight
    // beta: weight of the router regulariser (KL of the variational routers, -log T of vtsr),
    // summed over MoE layers, each a mean over tokens; ramped linearly from 0 over router_reg_warmup steps.
    float router_reg_coef = 1e-3f;
    int router_reg_warmup = 0;
    // beta after `steps_done` optimizer steps.
    float router_reg_at(int steps_done) const {
        if (router_reg_warmup <= 0 || steps_done >= router_reg_warmup) return router_reg_coef;
        return router_reg_coef * static_cast<float>(steps_done + 1) / static_cast<float>(router_reg_warmup);
    }
};

struct DataConfig {
    // "synthetic" (built-in multi-domain corpus), "text" (Debian fortunes + C headers), or a
    // directory holding train.bin / val.bin (and optionally ood.bin) written by `bmoe data`.
    std::string dataset = "synthetic";
    int batch_size = 8;                 // sequences per micro-batch, GLOBAL: split evenly over the ranks
    int seq_len = 128;                  // tokens per sequence
    uint64_t train_tokens = 2'000'000;  // size of generated corpora (synthetic/text)
    // Which targets count in the loss: "all" next tokens, or only the answer letter of multiple-choice
    // questions ("answers": the token after "Answer: ", MCQA fine-tuning as in the papers).
    std::string loss_on = "all";
};

struct ParallelConfig {
    // Expert-parallel group size: experts are split over `ep` consecutive ranks; the world is
    // dp x ep. 0 = the whole world (pure expert parallelism).
    int ep = 0;
    // Communicator for token rows and gradients: mpi (host memory; GPU data staged through the
    // host), nccl (GPU memory; one GPU per rank), auto (nccl when the backend is cuda, bmoe was
    // built with NCCL and every rank has its own GPU, else mpi).
    std::string comm = "auto";
    // Start each layer's gradient all-reduce as soon as backward finishes it (last micro-batch):
    // true | false | auto (= with NCCL only: NCCL progresses on its own stream, while Open MPI's
    // non-blocking all-reduce advances only inside MPI calls -- measured slower on CPUs,
    // bench/bench_overlap.sh).
    std::string overlap_grad_reduce = "auto";
    // With train.precision=bf16: token rows that only feed expert GEMMs (x, dy) travel as bf16 --
    // lossless, since the GEMMs round them the same way (model/parallel_context.h).
    bool exchange_bf16 = true;
    // With train.precision=bf16: the experts' outputs (y, dx) travel back as bf16 too -- half their
    // bytes, rounded on the way (not lossless; off by default).
    bool combine_bf16 = false;
};

struct CheckpointConfig {
    std::string dir;             // "" = <train.out_dir>/checkpoints
    int every = 0;               // save every N steps (0 = only at the end)
    float every_minutes = 0.0f;  // also save when this many minutes passed since the last save (0 = off)
    int keep = 3;                // newest checkpoints kept
    std::string resume;          // "" (start fresh) | "auto" (latest in dir, if any) | a checkpoint file
};

struct TrainConfig {
    int steps = 300;                       // optimizer steps
    int grad_accum = 1;                    // micro-batches per step
    uint64_t seed = 1234;                  // weights, data order, everything random
    int log_every = 10;                    // progress line every N steps
    int eval_every = 100;                  // validation every N steps (and at the end); 0 = only at the end
    int eval_batches = 8;                  // validation micro-batches per evaluation
    std::string out_dir = "runs/default";  // metrics.jsonl, loss curve, config.toml
    std::string backend = "cpu";           // cpu | cuda
    // GEMM precision (model/precision.h): fp32, or bf16 inputs with fp32 accumulation (master
    // weights, activations, router and KL stay fp32). auto = bf16 on cuda, fp32 on cpu (where bf16
    // is an exact emulation, for tests: slower, not faster).
    std::string precision = "auto";
    // Activation recomputation: none, or a comma list of attention (keep one [B, H, T, T] score
    // buffer for all layers and recompute each layer's scores in backward:
    // Model::set_attention_recompute) and mlp (recompute the experts' activation in backward:
    // Model::set_mlp_recompute).
    std::string recompute = "none";
    // Attention kernel (model/backend.h AttentionKernel): gemm (batched GEMMs + fused softmax; saves
    // [B, H, T, T] probabilities per layer) | flash (fused tiled kernel on bf16 tensor cores; saves
    // [B, H, T]; cuda with bf16 precision, head_dim <= 128).
    std::string attention = "gemm";
    int threads = 0;          // CPU threads; 0 = all cores
    bool plot = true;         // write loss_curve.png (needs python3-matplotlib)
    bool log_layers = false;  // metrics.jsonl: aux, z and router regulariser per MoE layer
    // Start from another run's checkpoint (tensors matched by name; missing ones keep their init)
    // instead of random weights; recorded as the new checkpoints' parent. `bmoe finetune-router` sets it.
    std::string init;
    // Comma-separated regexes: only parameters whose names match are trained (no optimizer state
    // for the others, which stay bitwise unchanged). Empty = train everything.
    std::string trainable;
};

// Whether train.recompute lists `what` ("attention" or "mlp").
bool recomputes(const TrainConfig& train, const std::string& what);

// train.precision resolved for train.backend.
model::MatmulPrecision matmul_precision(const TrainConfig& train);

struct RunConfig {
    model::ModelConfig model;
    OptimConfig optim;
    LossConfig loss;
    DataConfig data;
    ParallelConfig parallel;
    CheckpointConfig checkpoint;
    TrainConfig train;

    void validate() const;
    std::string to_toml() const;         // resolved config, loadable again with --config
    std::string checkpoint_dir() const;  // checkpoint.dir or <train.out_dir>/checkpoints
};

// Registers every RunConfig field as a --section.key option on `app` (defaults shown in --help).
// String-valued enums (model.norm, ...) are written into `config` by finish_cli_parse().
struct RunConfigCli {
    std::string norm = "rmsnorm", position = "rope", activation = "swiglu", router_type = "topk";
};
void add_run_options(CLI::App& app, RunConfig& config, RunConfigCli& cli);
void finish_cli_parse(RunConfig& config, const RunConfigCli& cli);

// A RunConfig from TOML text (a checkpoint's config_toml attribute, or a --config file's content):
// every key goes through the same CLI options as the command line. `origin` names it in errors.
RunConfig parse_config_toml(const std::string& toml, const std::string& origin);

// The run config of `bmoe finetune-router --init parent`: the model architecture comes from the
// parent checkpoint, the router section (and everything else) from `requested`; train.init = the
// parent, and train.trainable defaults to the router parameters. Validated.
RunConfig finetune_router_config(const RunConfig& requested, const std::string& parent);

// The comma-separated train.trainable patterns as a list.
std::vector<std::string> split_patterns(const std::string& patterns);

// The train.trainable default of `bmoe finetune-router`: the router of every MoE layer.
inline constexpr const char* kRouterParamsPattern = "block_sparse_moe\\.(gate|router)\\.";

// Expands "--config FILE" (TOML) into dotted flags placed before the user's own flags, so the
// command line overrides the file. Returns the new argv (argv[0] and the subcommand kept).
// Throws bmoe::Error for a missing or malformed file.
std::vector<std::string> expand_config_file(int argc, const char* const* argv);

}  // namespace bmoe::trainer
