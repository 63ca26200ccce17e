// bench_train.cpp -- bmoe training throughput against the machine's peak, in one process.
//
//   bench_train [--steps N] [--warmup N] [--threads N] [--gemm N]
//               [--backend cpu|cuda] [--precision fp32|bf16] [--model default|gpt2-moe|large]
//               [--batch B] [--peak-tflops X] [--recompute none|attention|mlp|attention,mlp]
//               [--profile STEPS]
//               [--router TYPE] [--attention gemm|flash] [--accumulate K]
//
// (a) Peak. CPU: the best of a few cblas_sgemm runs of an N x N x N product (default 2048): the
//     FLOP/s a well-tuned GEMM reaches on this machine, the practical ceiling for a CPU trainer.
//     CUDA: --peak-tflops, the card's dense peak for the precision (default 989 for bf16 and 67
//     for fp32: H100/H200 SXM datasheet figures without sparsity), so "% peak" is MFU.
// (b) bmoe: warm-up steps, then timed steps of forward + backward + AdamW (trainer/optimizer.h)
//     on random tokens, for one of the model presets (bench/model_presets.h: default, gpt2-moe, large).
//     Model FLOP/s = tokens/s * (6 * active_matmul_params + 12 * L * T * d) (PaLM-style: matmul
//     FLOPs of the active parameters plus attention scores).
//     --router TYPE: the preset with that router.type (default topk) at its defaults, e.g. logit_mf
//     to see what a Bayesian router costs at this scale; the MFU still counts expert FLOPs only.
//     --attention flash: the fused attention kernel (cuda, bf16; model/backend.h AttentionKernel).
//     --accumulate K: K micro-batches of B x T tokens per optimizer step (gradient accumulation, as
//     train.grad_accum; bench/torch_bench.py takes the same flag): AdamW's fixed cost per step is
//     spread over K times the tokens, as in training with a realistic global batch.
// (c) --profile STEPS (cuda): that many more steps with the op profiler on (model/cuda/op_profiler.h),
//     then a table of GPU time and GPU idle time per backend op (matmuls named by shape), each op
//     beside its roofline time: the same step costed by model/op_cost_backend.h for the card
//     (H200 when the device name says so, else H100; bench_roofline prints the whole model).
// Prints human-readable lines and one line "JSON {...}" for scripts (bench/run_bench.sh).
#include <cblas.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bench/model_presets.h"
#include "bench/train_step.h"
#include "model/backend.h"
#include "model/cpu_backend.h"
#ifdef BMOE_HAVE_CUDA
#include "model/cuda/cuda_backend.h"
#endif
#include "model/cpu_threads.h"
#include "model/model.h"
#include "model/op_cost_backend.h"
#include "model/rng.h"
#include "trainer/optimizer.h"
#include "trainer/run_config.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

struct Options {
    int steps = 10;
    int warmup = 2;
    int threads = 0;  // 0 = all cores
    int gemm = 2048;
    int gemm_reps = 4;
    std::string backend = "cpu";
    std::string precision = "fp32";
    std::string model = "default";
    int batch = 0;             // 0 = the preset's
    std::string recompute = "none";  // attention and/or mlp (Model::set_attention/mlp_recompute)
    std::string router = "topk";     // router.type
    std::string attention = "gemm";  // Backend::set_attention_kernel
    double peak_tflops = 0.0;  // 0 = the default for the backend and precision
    int profile = 0;           // CUDA: steps run after the timed ones with the op profiler on
    int accumulate = 1;        // micro-batches per optimizer step
};

Options parse_options(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto text = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "bench_train: %s needs a value\n", arg.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        auto value = [&]() -> int { return std::atoi(text().c_str()); };
        if (arg == "--steps")
            o.steps = value();
        else if (arg == "--warmup")
            o.warmup = value();
        else if (arg == "--threads")
            o.threads = value();
        else if (arg == "--gemm")
            o.gemm = value();
        else if (arg == "--backend")
            o.backend = text();
        else if (arg == "--precision")
            o.precision = text();
        else if (arg == "--model")
            o.model = text();
        else if (arg == "--batch")
            o.batch = value();
        else if (arg == "--recompute")
            o.recompute = text();
        else if (arg == "--peak-tflops")
            o.peak_tflops = std::atof(text().c_str());
        else if (arg == "--profile")
            o.profile = value();
        else if (arg == "--accumulate")
            o.accumulate = value();
        else if (arg == "--router")
            o.router = text();
        else if (arg == "--attention")
            o.attention = text();
        else {
            std::fprintf(stderr,
                         "usage: bench_train [--steps N] [--warmup N] [--threads N] [--gemm N] [--backend cpu|cuda]\n"
                         "                   [--precision fp32|bf16] [--model default|gpt2-moe|large] [--batch B]\n"
                         "                   [--peak-tflops X] [--recompute none|attention|mlp|attention,mlp]\n"
                         "                   [--profile STEPS]"
                         "                   [--router TYPE] [--attention gemm|flash] [--accumulate K]\n");
            std::exit(arg == "--help" || arg == "-h" ? 0 : 2);
        }
    }
    if (o.accumulate < 1) {
        std::fprintf(stderr, "bench_train: --accumulate must be at least 1 (micro-batches per optimizer step)\n");
        std::exit(2);
    }
    return o;
}

// Best-of-reps FLOP/s of C = A * B with N x N fp32 matrices.
double sgemm_peak_flops(int n, int reps) {
    const size_t nn = static_cast<size_t>(n) * n;
    std::vector<float> a(nn), b(nn), c(nn, 0.0f);
    bmoe::model::CounterRng rng(1, 2);
    for (size_t i = 0; i < nn; ++i) {
        a[i] = rng.uniform(2 * i) - 0.5f;
        b[i] = rng.uniform(2 * i + 1) - 0.5f;
    }
    double best = 1e30;
    for (int r = 0; r < reps + 1; ++r) {  // +1: the first run pays for thread start-up and page faults
        const auto start = Clock::now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(),
                    n);
        if (r > 0) best = std::min(best, seconds_since(start));
    }
    return 2.0 * n * static_cast<double>(n) * n / best;
}

double peak_rss_mib() {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return static_cast<double>(usage.ru_maxrss) / 1024.0;  // Linux: kilobytes
}

// Roofline seconds per profiled op name of one step of `config` (model/op_cost_backend.h) on the
// card `gpu`, with the backend settings of the measured run.
std::map<std::string, double> roofline_by_op(const bmoe::model::ModelConfig& config,
                                             const std::string& gpu,
                                             const bmoe::model::Backend& measured,
                                             bool recompute_attention,
                                             bool recompute_mlp,
                                             int B,
                                             int T,
                                             int accumulate) {
    using namespace bmoe;
    model::CostModel cost;
    cost.gpu = model::gpu_spec(gpu);
    model::OpCostBackend backend(cost);
    backend.set_matmul_precision(measured.matmul_precision());
    backend.set_attention_kernel(measured.attention_kernel());
    model::Model net(config, &backend);
    net.init_weights(/*seed=*/0);
    net.set_attention_recompute(recompute_attention);
    net.set_mlp_recompute(recompute_mlp);
    net.set_keep_logits(false);
    trainer::OptimConfig optim;
    trainer::AdamW adamw(optim, net);
    const std::vector<int32_t> tokens(static_cast<size_t>(B) * T, 1), targets(static_cast<size_t>(B) * T, 2);
    bench::train_step(net, adamw, optim, tokens, targets, B, T, accumulate);  // the first step allocates
    backend.clear_ledger();
    bench::train_step(net, adamw, optim, tokens, targets, B, T, accumulate);
    return backend.seconds_by_profiled_op();
}

const char* env_or_unset(const char* name) {
    const char* v = std::getenv(name);
    return v != nullptr ? v : "(unset)";
}

}  // namespace

int run(int argc, char** argv) {
    using namespace bmoe;
    const Options opt = parse_options(argc, argv);
    model::set_cpu_threads(opt.threads);
    const int threads = model::cpu_threads();

    std::printf("bench_train: %d threads, OpenBLAS %s (core %s), OPENBLAS_CORETYPE=%s OPENBLAS_L2_SIZE=%s\n", threads,
                openblas_get_config(), openblas_get_corename(), env_or_unset("OPENBLAS_CORETYPE"),
                env_or_unset("OPENBLAS_L2_SIZE"));
    const bool cuda = opt.backend == "cuda";
    const model::MatmulPrecision precision = model::parse_matmul_precision(opt.precision);
    const model::RouterType router_type = model::parse_router_type(opt.router);  // before the slow peak run
    const model::AttentionKernel attention = model::parse_attention_kernel(opt.attention);
    trainer::RunConfig checked;  // --recompute parsed and checked as bmoe's train.recompute
    checked.train.recompute = opt.recompute;
    checked.validate();
    const trainer::TrainConfig& recompute = checked.train;

    // (a) peak: measured sgemm on the CPU, the datasheet figure on the GPU
    double peak = 0.0;
    if (cuda) {
        const double tflops =
            opt.peak_tflops > 0 ? opt.peak_tflops : (precision == model::MatmulPrecision::kBf16 ? 989.0 : 67.0);
        peak = tflops * 1e12;
        std::printf("peak: %.0f TFLOP/s (%s dense, %s)\n", tflops, opt.precision.c_str(),
                    opt.peak_tflops > 0 ? "--peak-tflops" : "H100/H200 SXM datasheet");
    } else {
        peak = sgemm_peak_flops(opt.gemm, opt.gemm_reps);
        std::printf("sgemm %dx%dx%d: %.1f GFLOP/s (best of %d)\n", opt.gemm, opt.gemm, opt.gemm, peak / 1e9,
                    opt.gemm_reps);
    }

    // (b) bmoe training steps on the preset
    int B = 0, T = 0;
    model::ModelConfig config = bench::model_preset(opt.model, B, T);
    config.router.type = router_type;
    if (opt.batch > 0) B = opt.batch;
    const int N = B * T;

    std::unique_ptr<model::Backend> backend_ptr = model::make_backend(opt.backend);
    model::Backend& backend = *backend_ptr;
    backend.set_matmul_precision(precision);
    backend.set_attention_kernel(attention);
    model::Model net(config, &backend);
    net.init_weights(/*seed=*/0);
    net.set_attention_recompute(trainer::recomputes(recompute, "attention"));
    net.set_mlp_recompute(trainer::recomputes(recompute, "mlp"));
    net.set_keep_logits(false);  // as the trainer runs it
    trainer::OptimConfig optim;
    trainer::AdamW adamw(optim, net);

    std::vector<int32_t> tokens(N), targets(N);
    auto fill_batch = [&](int step) {
        model::CounterRng rng(/*seed=*/42, /*stream=*/static_cast<uint64_t>(step));
        for (int i = 0; i < N; ++i) {
            tokens[i] = static_cast<int32_t>(rng.bits(2 * i) % config.vocab_size);
            targets[i] = static_cast<int32_t>(rng.bits(2 * i + 1) % config.vocab_size);
        }
    };
    double last_loss = 0.0;
    auto step_on_batch = [&](int step) {
        fill_batch(step);
        last_loss = bench::train_step(net, adamw, optim, tokens, targets, B, T, opt.accumulate);
    };
    for (int s = 0; s < opt.warmup; ++s) step_on_batch(s);
    backend.synchronize();
    const auto start = Clock::now();
    for (int s = 0; s < opt.steps; ++s) step_on_batch(opt.warmup + s);
    backend.synchronize();
    const double elapsed = seconds_since(start);

    const double tokens_per_s = static_cast<double>(N) * opt.accumulate * opt.steps / elapsed;
    const double active = static_cast<double>(net.layout().active_matmul_params());
    const double flops_per_token = bench::model_flops_per_token(config, net.layout(), T);
    const double model_flops = tokens_per_s * flops_per_token;
    const double rss = peak_rss_mib();
    double device_mib = 0.0;
#ifdef BMOE_HAVE_CUDA
    if (cuda) device_mib = static_cast<double>(model::cuda_memory_in_use()) / (1024.0 * 1024.0);
#endif
    const char* be = opt.backend.c_str();
    std::printf(
        "bmoe %s (%s, model %s, router %s, attention %s, %.1fM params, %.1fM active matmul): %d steps of %d x %dx%d "
        "tokens "
        "in %.2f s "
        "(%.3f s/step, loss %.4f)\n",
        be, opt.precision.c_str(), opt.model.c_str(), opt.router.c_str(), opt.attention.c_str(),
        net.layout().total_numel() / 1e6, active / 1e6, opt.steps, opt.accumulate, B, T, elapsed, elapsed / opt.steps,
        last_loss);
    std::printf("bmoe %s: %.0f tokens/s, %.1f GFLOP/s model (%.1f%% of %s), peak RSS %.0f MiB", be, tokens_per_s,
                model_flops / 1e9, 100.0 * model_flops / peak, cuda ? "peak: MFU" : "sgemm peak", rss);
    std::printf(", peak allocated %.0f MiB", static_cast<double>(backend.peak_allocated_bytes()) / (1024.0 * 1024.0));
    if (cuda) std::printf(", device memory in use %.0f MiB", device_mib);
    std::printf("\n");
    // the bf16 storage modes this run had (each BMOE_BF16_* = 0 turns one off for A/B runs)
    char bf16_modes[96] = "";
    if (opt.precision == "bf16") {
        std::snprintf(bf16_modes, sizeof(bf16_modes), "mlp_activations=%d logits=%d weights=%d gemm_inputs=%d",
                      model::bf16_mode_default("BMOE_BF16_MLP_ACTIVATIONS"),
                      model::bf16_mode_default("BMOE_BF16_LOGITS"), model::bf16_mode_default("BMOE_BF16_WEIGHTS"),
                      model::bf16_mode_default("BMOE_BF16_GEMM_INPUTS"));
        std::printf("bmoe %s: bf16 storage %s\n", be, bf16_modes);
    }
    std::printf(
        "JSON {\"impl\": \"bmoe\", \"backend\": \"%s\", \"precision\": \"%s\", \"model\": \"%s\", \"router\": \"%s\", "
        "\"attention\": \"%s\", \"threads\": %d, "
        "\"sgemm_flops\": %.6g, \"tokens_per_s\": %.6g, \"model_flops\": %.6g, \"fraction_of_peak\": %.6g, "
        "\"flops_per_token\": %.6g, \"active_matmul_params\": %.0f, \"steps\": %d, \"accumulate\": %d, "
        "\"seconds\": %.6g, \"bf16_modes\": \"%s\", "
        "\"peak_rss_mib\": %.1f, \"peak_allocated_mib\": %.1f, \"device_mib\": %.1f, \"openblas_coretype\": \"%s\", "
        "\"openblas_l2_size\": \"%s\", "
        "\"openblas_core\": \"%s\"}\n",
        be, opt.precision.c_str(), opt.model.c_str(), opt.router.c_str(), opt.attention.c_str(), threads, peak,
        tokens_per_s, model_flops, model_flops / peak, flops_per_token, active, opt.steps, opt.accumulate, elapsed,
        bf16_modes, rss, static_cast<double>(backend.peak_allocated_bytes()) / (1024.0 * 1024.0), device_mib,
        env_or_unset("OPENBLAS_CORETYPE"), env_or_unset("OPENBLAS_L2_SIZE"), openblas_get_corename());
#ifdef BMOE_HAVE_CUDA
    if (cuda && opt.profile > 0) {
        model::OpProfiler& profiler = dynamic_cast<model::CudaBackend&>(backend).profiler();
        profiler.set_enabled(true);
        const auto profile_start = Clock::now();
        for (int s = 0; s < opt.profile; ++s) step_on_batch(opt.warmup + opt.steps + s);
        backend.synchronize();
        std::printf("profiled steps: %.3f s/step wall (events add host time)\n",
                    seconds_since(profile_start) / opt.profile);
        const std::string device = model::cuda_device_name();
        const std::string card = device.find("H200") != std::string::npos ? "h200" : "h100";
        std::printf("roofline card: %s (device %s)\n", card.c_str(), device.c_str());
        const std::map<std::string, double> roofline =
            roofline_by_op(config, card, backend, trainer::recomputes(recompute, "attention"),
                           trainer::recomputes(recompute, "mlp"), B, T, opt.accumulate);
        std::printf("%s", profiler.report(opt.profile, roofline).c_str());
        profiler.set_enabled(false);
    }
#endif
    return 0;
}

int main(int argc, char** argv) {
    bmoe::model::use_fast_openblas_kernels(argv);
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {  // bmoe::Error messages name the problem and the fix
        std::fprintf(stderr, "bench_train: error: %s\n", e.what());
        return 1;
    }
}
