#include "trainer/run_config.h"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "checkpoints/checkpoint.h"
#include "parallel/check.h"

namespace bmoe::trainer {

void RunConfig::validate() const {
    model.validate();
    BMOE_REQUIRE(optim.lr > 0.0f, "optim.lr must be > 0 (got ", optim.lr, ")");
    BMOE_REQUIRE(optim.min_lr_ratio >= 0.0f && optim.min_lr_ratio <= 1.0f, "optim.min_lr_ratio must be in [0, 1] (got ",
                 optim.min_lr_ratio, ")");
    BMOE_REQUIRE(optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0 (got ", optim.warmup_steps, ")");
    BMOE_REQUIRE(optim.beta1 >= 0.0f && optim.beta1 < 1.0f, "optim.beta1 must be in [0, 1) (got ", optim.beta1, ")");
    BMOE_REQUIRE(optim.beta2 >= 0.0f && optim.beta2 < 1.0f, "optim.beta2 must be in [0, 1) (got ", optim.beta2, ")");
    BMOE_REQUIRE(optim.eps > 0.0f, "optim.eps must be > 0 (got ", optim.eps, ")");
    BMOE_REQUIRE(optim.weight_decay >= 0.0f, "optim.weight_decay must be >= 0 (got ", optim.weight_decay, ")");
    BMOE_REQUIRE(loss.aux_coef >= 0.0f, "loss.aux_coef must be >= 0 (got ", loss.aux_coef, ")");
    BMOE_REQUIRE(loss.zloss_coef >= 0.0f, "loss.zloss_coef must be >= 0 (got ", loss.zloss_coef, ")");
    BMOE_REQUIRE(loss.router_reg_coef >= 0.0f, "loss.router_reg_coef (beta) must be >= 0 (got ", loss.router_reg_coef,
                 ")");
    BMOE_REQUIRE(loss.router_reg_warmup >= 0, "loss.router_reg_warmup must be >= 0 (got ", loss.router_reg_warmup, ")");
    BMOE_REQUIRE(optim.router_variance_lr_scale >= 0.0f, "optim.router_variance_lr_scale must be >= 0 (got ",
                 optim.router_variance_lr_scale, ")");
    BMOE_REQUIRE(data.batch_size >= 1, "data.batch_size must be >= 1 (got ", data.batch_size, ")");
    BMOE_REQUIRE(data.seq_len >= 1, "data.seq_len must be >= 1 (got ", data.seq_len, ")");
    BMOE_REQUIRE(model.position != model::PositionType::kLearned || data.seq_len <= model.max_seq_len, "data.seq_len (",
                 data.seq_len, ") exceeds model.max_seq_len (", model.max_seq_len,
                 ") with learned positions: raise model.max_seq_len or shorten data.seq_len");
    BMOE_REQUIRE(data.loss_on == "all" || data.loss_on == "answers", "data.loss_on must be 'all' or 'answers' (got '",
                 data.loss_on, "')");
    BMOE_REQUIRE(data.train_tokens >= 1000, "data.train_tokens must be >= 1000 (got ", data.train_tokens, ")");
    BMOE_REQUIRE(parallel.ep >= 0, "parallel.ep must be >= 0 (0 = all ranks; got ", parallel.ep, ")");
    BMOE_REQUIRE(parallel.comm == "auto" || parallel.comm == "mpi" || parallel.comm == "nccl",
                 "parallel.comm must be 'auto', 'mpi' or 'nccl' (got '", parallel.comm, "')");
    BMOE_REQUIRE(parallel.overlap_grad_reduce == "auto" || parallel.overlap_grad_reduce == "true" ||
                     parallel.overlap_grad_reduce == "false",
                 "parallel.overlap_grad_reduce must be 'auto', 'true' or 'false' (got '", parallel.overlap_grad_reduce,
                 "')");
    BMOE_REQUIRE(parallel.comm != "nccl" || train.backend == "cuda",
                 "parallel.comm=nccl moves GPU memory and needs --train.backend=cuda (or use --parallel.comm=mpi)");
    BMOE_REQUIRE(checkpoint.every >= 0, "checkpoint.every must be >= 0 (0 = only at the end; got ", checkpoint.every,
                 ")");
    BMOE_REQUIRE(checkpoint.every_minutes >= 0.0f, "checkpoint.every_minutes must be >= 0 (0 = off; got ",
                 checkpoint.every_minutes, ")");
    BMOE_REQUIRE(checkpoint.keep >= 1, "checkpoint.keep must be >= 1 (got ", checkpoint.keep, ")");
    BMOE_REQUIRE(train.steps >= 1, "train.steps must be >= 1 (got ", train.steps, ")");
    BMOE_REQUIRE(train.grad_accum >= 1, "train.grad_accum must be >= 1 (got ", train.grad_accum, ")");
    BMOE_REQUIRE(train.log_every >= 1, "train.log_every must be >= 1 (got ", train.log_every, ")");
    BMOE_REQUIRE(train.eval_every >= 0, "train.eval_every must be >= 0 (got ", train.eval_every, ")");
    BMOE_REQUIRE(train.eval_batches >= 1, "train.eval_batches must be >= 1 (got ", train.eval_batches, ")");
    BMOE_REQUIRE(train.threads >= 0, "train.threads must be >= 0 (got ", train.threads, ")");
    BMOE_REQUIRE(train.backend == "cpu" || train.backend == "cuda", "train.backend must be 'cpu' or 'cuda' (got '",
                 train.backend, "')");
    BMOE_REQUIRE(train.precision == "auto" || train.precision == "fp32" || train.precision == "bf16",
                 "train.precision must be 'auto', 'fp32' or 'bf16' (got '", train.precision, "')");
    if (train.recompute != "none") {
        std::stringstream items(train.recompute);
        for (std::string item; std::getline(items, item, ',');)
            BMOE_REQUIRE(item == "attention" || item == "mlp", "train.recompute must be 'none' or a comma list of ",
                         "'attention' and 'mlp' (got '", train.recompute, "')");
    }
    BMOE_REQUIRE(train.attention == "gemm" || train.attention == "flash",
                 "train.attention must be 'gemm' or 'flash' (got '", train.attention, "')");
    if (train.attention == "flash") {
        BMOE_REQUIRE(train.backend == "cuda",
                     "train.attention=flash runs on GPUs: add --train.backend=cuda or use "
                     "--train.attention=gemm");
        BMOE_REQUIRE(matmul_precision(train) == model::MatmulPrecision::kBf16,
                     "train.attention=flash runs bf16 tensor cores: use --train.precision=bf16 (or auto), or "
                     "--train.attention=gemm for fp32");
        BMOE_REQUIRE(model.head_dim() <= 128,
                     "train.attention=flash supports head_dim <= 128 (model.d_model / "
                     "model.num_heads = ",
                     model.head_dim(), "): use --train.attention=gemm");
    }
    BMOE_REQUIRE(!train.out_dir.empty(), "train.out_dir must not be empty");
}

bool recomputes(const TrainConfig& train, const std::string& what) {
    std::stringstream items(train.recompute);
    for (std::string item; std::getline(items, item, ',');)
        if (item == what) return true;
    return false;
}

model::MatmulPrecision matmul_precision(const TrainConfig& train) {
    if (train.precision == "auto")
        return train.backend == "cuda" ? model::MatmulPrecision::kBf16 : model::MatmulPrecision::kFp32;
    return model::parse_matmul_precision(train.precision);
}

void add_run_options(CLI::App& app, RunConfig& c, RunConfigCli& cli) {
    auto opt = [&](const std::string& name, auto& field, const std::string& help) {
        app.add_option("--" + name, field, help)->capture_default_str()->group("Options");
    };
    model::ModelConfig& m = c.model;
    opt("model.vocab_size", m.vocab_size, "vocabulary size (256 for the byte tokenizer)");
    opt("model.max_seq_len", m.max_seq_len, "longest sequence (size of the learned position table)");
    opt("model.d_model", m.d_model, "hidden size D");
    opt("model.num_layers", m.num_layers, "transformer layers");
    opt("model.num_heads", m.num_heads, "query heads (head_dim = d_model / num_heads)");
    opt("model.num_kv_heads", m.num_kv_heads, "key/value heads (grouped-query attention); divides num_heads");
    opt("model.num_experts", m.num_experts, "experts per MoE layer");
    opt("model.top_k", m.top_k, "experts per token");
    opt("model.expert_hidden", m.expert_hidden, "hidden width of each expert");
    opt("model.moe_every", m.moe_every, "every Nth layer is MoE, the others dense (1 = all MoE, 0 = none)");
    opt("model.dense_hidden", m.dense_hidden, "hidden width of dense FFN layers");
    opt("model.tie_embeddings", m.tie_embeddings, "share the token embedding with the LM head");
    opt("model.norm", cli.norm, "rmsnorm | layernorm");
    opt("model.position", cli.position, "rope | learned");
    opt("model.activation", cli.activation, "swiglu | gelu (experts and dense FFN)");
    opt("model.norm_eps", m.norm_eps, "epsilon of the norms");
    opt("model.rope_theta", m.rope_theta, "RoPE base");
    opt("model.router_renormalize", m.router_renormalize, "renormalise the top-k gate weights to sum to 1");
    opt("model.capacity_factor", m.capacity_factor,
        "expert capacity factor; copies beyond it are dropped (0 = dropless)");
    opt("model.init_std", m.init_std, "std of the normal weight init");
    model::RouterConfig& r = m.router;
    opt("router.type", cli.router_type,
        "topk | temp_sampling | mc_dropout | swag | ensemble | weight_mfvi | logit_mf | logit_fc | vtsr");
    opt("router.train_samples", r.train_samples, "routing samples S per token in training");
    opt("router.eval_samples", r.eval_samples, "routing samples S at evaluation (probabilities averaged)");
    opt("router.temperature", r.temperature, "temp_sampling: fixed global temperature");
    opt("router.dropout", r.dropout, "mc_dropout: drop probability of router inputs");
    opt("router.ensemble_size", r.ensemble_size, "ensemble: number of routers M");
    opt("router.swag_rank", r.swag_rank, "swag: deviation columns kept (low-rank covariance)");
    opt("router.swag_every", r.swag_every, "swag: collect a snapshot every N steps");
    opt("router.swag_start", r.swag_start, "swag: first step that collects");
    opt("router.weight_sigma_init", r.weight_sigma_init, "weight_mfvi: initial posterior std of the weights");
    opt("router.weight_prior_std", r.weight_prior_std, "weight_mfvi: prior std of the weights");
    opt("router.hidden", r.hidden, "logit_mf/fc: width of the inference network");
    opt("router.sigma_init", r.sigma_init, "logit_mf/fc: initial logit std");
    opt("router.sigma_min", r.sigma_min, "logit_mf/fc: floor of sigma / diag(L)");
    opt("router.prior_std", r.prior_std, "logit_mf/fc: prior std around the deterministic logits");
    opt("router.temp_min", r.temp_min, "vtsr: lower bound of T (< 1)");
    opt("router.temp_max", r.temp_max, "vtsr: upper bound of T (> 1)");
    opt("router.selection_bias_rate", r.selection_bias_rate,
        "aux-loss-free balancing: per-step move of the expert selection bias (0 = off)");
    opt("optim.lr", c.optim.lr, "peak learning rate");
    opt("optim.min_lr_ratio", c.optim.min_lr_ratio, "final lr = lr * min_lr_ratio (cosine)");
    opt("optim.warmup_steps", c.optim.warmup_steps, "linear warm-up steps");
    opt("optim.beta1", c.optim.beta1, "AdamW beta1");
    opt("optim.beta2", c.optim.beta2, "AdamW beta2");
    opt("optim.eps", c.optim.eps, "AdamW epsilon");
    opt("optim.weight_decay", c.optim.weight_decay, "decoupled weight decay (not on norms/biases)");
    opt("optim.grad_clip", c.optim.grad_clip, "global grad-norm clip (<= 0 disables)");
    opt("optim.router_variance_lr_scale", c.optim.router_variance_lr_scale,
        "lr multiplier of the router variance/temperature heads");
    opt("loss.aux_coef", c.loss.aux_coef, "load-balancing loss weight");
    opt("loss.zloss_coef", c.loss.zloss_coef, "router z-loss weight");
    opt("loss.router_reg_coef", c.loss.router_reg_coef, "beta: weight of the router KL / -log T regulariser");
    opt("loss.router_reg_warmup", c.loss.router_reg_warmup, "steps over which beta ramps up from 0");
    opt("data.dataset", c.data.dataset, "synthetic | text | DIR with train.bin/val.bin from `bmoe data`");
    opt("data.batch_size", c.data.batch_size, "sequences per micro-batch (global: split over the ranks)");
    opt("data.seq_len", c.data.seq_len, "tokens per sequence");
    opt("data.train_tokens", c.data.train_tokens, "tokens to generate for the built-in corpora");
    opt("data.loss_on", c.data.loss_on, "all | answers (only the letter after 'Answer: ': MCQA fine-tuning)");
    app.add_option("--parallel.ep,--ep", c.parallel.ep,
                   "expert-parallel size (experts split over this many ranks; 0 = all ranks)")
        ->capture_default_str()
        ->group("Options");
    app.add_option("--parallel.comm,--comm", c.parallel.comm,
                   "auto | mpi | nccl: communicator for token rows and gradients (auto: nccl on GPUs when possible)")
        ->capture_default_str()
        ->group("Options");
    opt("parallel.exchange_bf16", c.parallel.exchange_bf16,
        "with bf16 GEMMs, send expert-GEMM input rows (x, dy) as bf16: lossless, half their bytes");
    opt("parallel.combine_bf16", c.parallel.combine_bf16,
        "with bf16 GEMMs, return the experts' output rows (y, dx) as bf16: half their bytes, rounded on the way");
    opt("parallel.overlap_grad_reduce", c.parallel.overlap_grad_reduce,
        "true | false | auto (with NCCL): start each layer's gradient all-reduce as soon as its backward is done");
    opt("checkpoint.dir", c.checkpoint.dir, "checkpoint directory (empty = <train.out_dir>/checkpoints)");
    opt("checkpoint.every", c.checkpoint.every, "save every N steps (0 = only at the end)");
    opt("checkpoint.every_minutes", c.checkpoint.every_minutes,
        "also save when this many minutes passed since the last save (0 = off)");
    opt("checkpoint.keep", c.checkpoint.keep, "newest checkpoints to keep");
    opt("checkpoint.resume", c.checkpoint.resume, "'' = start fresh, 'auto' = latest in checkpoint.dir, or a file");
    opt("train.steps", c.train.steps, "optimizer steps");
    opt("train.grad_accum", c.train.grad_accum, "micro-batches per optimizer step");
    opt("train.seed", c.train.seed, "seed for weights, data order and all randomness");
    opt("train.log_every", c.train.log_every, "progress line every N steps");
    opt("train.eval_every", c.train.eval_every, "validation every N steps (0 = only at the end)");
    opt("train.eval_batches", c.train.eval_batches, "validation micro-batches per evaluation");
    opt("train.out_dir", c.train.out_dir, "output directory (metrics.jsonl, loss_curve.png, config.toml)");
    app.add_option("--train.backend,--backend", c.train.backend, "cpu | cuda")->capture_default_str()->group("Options");
    opt("train.recompute", c.train.recompute,
        "none | attention,mlp (either or both): recompute attention scores / the experts' activation in "
        "backward instead of keeping every layer's");
    opt("train.attention", c.train.attention,
        "gemm | flash: attention as batched GEMMs (saves [B,H,T,T]) or one fused bf16 kernel (cuda, bf16)");
    opt("train.precision", c.train.precision,
        "auto | fp32 | bf16: GEMM inputs in bf16 with fp32 accumulation and master weights (auto: bf16 on cuda)");
    opt("train.threads", c.train.threads, "CPU threads per rank (0 = OMP_NUM_THREADS if set, else all cores)");
    opt("train.plot", c.train.plot, "write loss_curve.png at the end (python3-matplotlib)");
    opt("train.log_layers", c.train.log_layers, "log aux, z and the router regulariser per MoE layer");
    opt("train.init", c.train.init, "initialise from this checkpoint's tensors (matched by name) instead of random");
    opt("train.trainable", c.train.trainable, "comma-separated regexes: train only matching parameters (empty = all)");
}

void finish_cli_parse(RunConfig& c, const RunConfigCli& cli) {
    c.model.norm = model::parse_norm_type(cli.norm);
    c.model.position = model::parse_position_type(cli.position);
    c.model.activation = model::parse_activation(cli.activation);
    c.model.router.type = model::parse_router_type(cli.router_type);
}

std::string RunConfig::to_toml() const {
    std::ostringstream os;
    auto b = [](bool v) { return v ? "true" : "false"; };
    const model::ModelConfig& m = model;
    os << "[model]\nvocab_size = " << m.vocab_size << "\nmax_seq_len = " << m.max_seq_len << "\nd_model = " << m.d_model
       << "\nnum_layers = " << m.num_layers << "\nnum_heads = " << m.num_heads << "\nnum_kv_heads = " << m.num_kv_heads
       << "\nnum_experts = " << m.num_experts << "\ntop_k = " << m.top_k << "\nexpert_hidden = " << m.expert_hidden
       << "\nmoe_every = " << m.moe_every << "\ndense_hidden = " << m.dense_hidden
       << "\ntie_embeddings = " << b(m.tie_embeddings) << "\nnorm = \"" << model::to_string(m.norm)
       << "\"\nposition = \"" << model::to_string(m.position) << "\"\nactivation = \"" << model::to_string(m.activation)
       << "\"\nnorm_eps = " << m.norm_eps << "\nrope_theta = " << m.rope_theta
       << "\nrouter_renormalize = " << b(m.router_renormalize) << "\ncapacity_factor = " << m.capacity_factor
       << "\ninit_std = " << m.init_std;
    const model::RouterConfig& r = m.router;
    os << "\n\n[router]\ntype = \"" << model::to_string(r.type) << "\"\ntrain_samples = " << r.train_samples
       << "\neval_samples = " << r.eval_samples << "\ntemperature = " << r.temperature << "\ndropout = " << r.dropout
       << "\nensemble_size = " << r.ensemble_size << "\nswag_rank = " << r.swag_rank
       << "\nswag_every = " << r.swag_every << "\nswag_start = " << r.swag_start
       << "\nweight_sigma_init = " << r.weight_sigma_init << "\nweight_prior_std = " << r.weight_prior_std
       << "\nhidden = " << r.hidden << "\nsigma_init = " << r.sigma_init << "\nsigma_min = " << r.sigma_min
       << "\nprior_std = " << r.prior_std << "\ntemp_min = " << r.temp_min << "\ntemp_max = " << r.temp_max
       << "\nselection_bias_rate = " << r.selection_bias_rate;
    os << "\n\n[optim]\nlr = " << optim.lr << "\nmin_lr_ratio = " << optim.min_lr_ratio
       << "\nwarmup_steps = " << optim.warmup_steps << "\nbeta1 = " << optim.beta1 << "\nbeta2 = " << optim.beta2
       << "\neps = " << optim.eps << "\nweight_decay = " << optim.weight_decay << "\ngrad_clip = " << optim.grad_clip
       << "\nrouter_variance_lr_scale = " << optim.router_variance_lr_scale;
    os << "\n\n[loss]\naux_coef = " << loss.aux_coef << "\nzloss_coef = " << loss.zloss_coef
       << "\nrouter_reg_coef = " << loss.router_reg_coef << "\nrouter_reg_warmup = " << loss.router_reg_warmup;
    os << "\n\n[data]\ndataset = \"" << data.dataset << "\"\nbatch_size = " << data.batch_size
       << "\nseq_len = " << data.seq_len << "\ntrain_tokens = " << data.train_tokens << "\nloss_on = \"" << data.loss_on
       << "\"";
    os << "\n\n[parallel]\nep = " << parallel.ep << "\ncomm = \"" << parallel.comm << "\"\noverlap_grad_reduce = \""
       << parallel.overlap_grad_reduce << "\"\nexchange_bf16 = " << b(parallel.exchange_bf16)
       << "\ncombine_bf16 = " << b(parallel.combine_bf16);
    os << "\n\n[checkpoint]\ndir = \"" << checkpoint.dir << "\"\nevery = " << checkpoint.every
       << "\nevery_minutes = " << checkpoint.every_minutes << "\nkeep = " << checkpoint.keep << "\nresume = \""
       << checkpoint.resume << "\"";
    os << "\n\n[train]\nsteps = " << train.steps << "\ngrad_accum = " << train.grad_accum << "\nseed = " << train.seed
       << "\nlog_every = " << train.log_every << "\neval_every = " << train.eval_every
       << "\neval_batches = " << train.eval_batches << "\nout_dir = \"" << train.out_dir << "\"\nbackend = \""
       << train.backend << "\"\nprecision = \"" << train.precision << "\"\nrecompute = \"" << train.recompute
       << "\"\nattention = \"" << train.attention << "\"\nthreads = " << train.threads << "\nplot = " << b(train.plot)
       << "\nlog_layers = " << b(train.log_layers) << "\ninit = \"" << train.init << "\"\ntrainable = \""
       << train.trainable << "\"\n";
    return os.str();
}

std::string RunConfig::checkpoint_dir() const {
    return checkpoint.dir.empty() ? (std::filesystem::path(train.out_dir) / "checkpoints").string() : checkpoint.dir;
}

namespace {
// TOML items as "--section.key=value" flags.
std::vector<std::string> config_items_to_flags(const std::vector<CLI::ConfigItem>& items) {
    std::vector<std::string> flags;
    for (const CLI::ConfigItem& item : items) {
        if (item.name == "++" || item.name == "--") continue;  // section open/close markers
        std::string value;
        for (size_t j = 0; j < item.inputs.size(); ++j) value += (j ? "," : "") + item.inputs[j];
        // `key = ""`: CLI11 would read "--key=" as a flag missing its value (and eat the next
        // argument); every string option whose empty value means something defaults to it.
        if (value.empty()) continue;
        flags.push_back("--" + item.fullname() + "=" + value);
    }
    return flags;
}
}  // namespace

RunConfig parse_config_toml(const std::string& toml, const std::string& origin) {
    std::vector<CLI::ConfigItem> items;
    try {
        std::istringstream in(toml);
        items = CLI::ConfigTOML().from_config(in);
    } catch (const std::exception& e) {
        throw Error(concat("config of ", origin, " is not valid TOML: ", e.what()));
    }
    RunConfig config;
    RunConfigCli cli;
    CLI::App app;
    app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    add_run_options(app, config, cli);
    std::vector<std::string> args = config_items_to_flags(items);
    std::reverse(args.begin(), args.end());  // CLI11 parses a vector from the back
    try {
        app.parse(args);
    } catch (const CLI::ParseError& e) {
        throw Error(concat("config of ", origin, " does not match this bmoe version: ", e.what()));
    }
    finish_cli_parse(config, cli);
    return config;
}

RunConfig finetune_router_config(const RunConfig& requested, const std::string& parent) {
    const RunConfig parent_config =
        parse_config_toml(checkpoints::read_checkpoint_info(parent).config_toml, "checkpoint " + parent);
    RunConfig c = requested;
    c.model = parent_config.model;
    c.model.router = requested.model.router;
    c.train.init = parent;
    if (c.train.trainable.empty()) c.train.trainable = kRouterParamsPattern;
    c.validate();
    return c;
}

std::vector<std::string> split_patterns(const std::string& patterns) {
    std::vector<std::string> out;
    std::stringstream ss(patterns);
    for (std::string p; std::getline(ss, p, ',');)
        if (!p.empty()) out.push_back(p);
    return out;
}

std::vector<std::string> expand_config_file(int argc, const char* const* argv) {
    std::vector<std::string> args(argv, argv + argc);
    std::string path;
    for (size_t i = 1; i < args.size(); ++i) {
        if (args[i] == "--config") {
            BMOE_REQUIRE(i + 1 < args.size(), "--config needs a file name: --config run.toml");
            path = args[i + 1];
            args.erase(args.begin() + static_cast<long>(i), args.begin() + static_cast<long>(i) + 2);
            break;
        }
        if (args[i].rfind("--config=", 0) == 0) {
            path = args[i].substr(9);
            args.erase(args.begin() + static_cast<long>(i));
            break;
        }
    }
    if (path.empty()) return args;
    BMOE_REQUIRE(std::filesystem::is_regular_file(path), "config file '", path,
                 "' not found: pass an existing TOML file (bmoe train --print-config writes one)");
    std::vector<CLI::ConfigItem> items;
    try {
        items = CLI::ConfigTOML().from_file(path);
    } catch (const std::exception& e) {
        throw Error(concat("config file '", path, "' is not valid TOML: ", e.what()));
    }
    std::vector<std::string> from_file = config_items_to_flags(items);
    // Insert after the subcommand words ("train", "ckpt import ...") so that flags given on the
    // command line come later and win.
    size_t insert_at = 1;
    while (insert_at < args.size() && args[insert_at].rfind("-", 0) != 0) ++insert_at;
    args.insert(args.begin() + static_cast<long>(insert_at), from_file.begin(), from_file.end());
    return args;
}

}  // namespace bmoe::trainer
