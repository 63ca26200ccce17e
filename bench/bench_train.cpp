// bench_train.cpp -- bmoe CPU training throughput against the machine's sgemm peak, in one process.
//
//   bench_train [--steps N] [--warmup N] [--threads N] [--gemm N]
//
// (a) Peak: the best of a few cblas_sgemm runs of an N x N x N product (default 2048): the FLOP/s
//     a well-tuned GEMM reaches on this machine, the practical ceiling for a CPU trainer.
// (b) bmoe: the default comparison model (vocab 256, seq 256, batch 8, d 256, 4 layers, 4 heads,
//     8 experts top-2, expert hidden 512, SwiGLU, RMSNorm, RoPE, untied) on the CPU backend:
//     warm-up steps, then timed steps of forward + backward + AdamW (trainer/optimizer.h) on
//     random tokens. Model FLOP/s = tokens/s * (6 * active_matmul_params + 12 * L * T * d)
//     (PaLM-style: matmul FLOPs of the active parameters plus attention scores).
// Prints human-readable lines and one line "JSON {...}" for scripts (bench/run_bench.sh).
#include <cblas.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "model/cpu_backend.h"
#include "model/cpu_threads.h"
#include "model/model.h"
#include "model/rng.h"
#include "trainer/optimizer.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

struct Options {
    int steps = 10;
    int warmup = 2;
    int threads = 0;  // 0 = all cores
    int gemm = 2048;
    int gemm_reps = 4;
};

Options parse_options(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto value = [&]() -> int {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "bench_train: %s needs a value\n", arg.c_str());
                std::exit(2);
            }
            return std::atoi(argv[++i]);
        };
        if (arg == "--steps")
            o.steps = value();
        else if (arg == "--warmup")
            o.warmup = value();
        else if (arg == "--threads")
            o.threads = value();
        else if (arg == "--gemm")
            o.gemm = value();
        else {
            std::fprintf(stderr, "usage: bench_train [--steps N] [--warmup N] [--threads N] [--gemm N]\n");
            std::exit(arg == "--help" || arg == "-h" ? 0 : 2);
        }
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

const char* env_or_unset(const char* name) {
    const char* v = std::getenv(name);
    return v != nullptr ? v : "(unset)";
}

}  // namespace

int main(int argc, char** argv) {
    using namespace bmoe;
    const Options opt = parse_options(argc, argv);
    model::set_cpu_threads(opt.threads);
    const int threads = model::cpu_threads();

    std::printf("bench_train: %d threads, OpenBLAS %s (core %s), OPENBLAS_CORETYPE=%s OPENBLAS_L2_SIZE=%s\n", threads,
                openblas_get_config(), openblas_get_corename(), env_or_unset("OPENBLAS_CORETYPE"),
                env_or_unset("OPENBLAS_L2_SIZE"));

    // (a) sgemm peak
    const double peak = sgemm_peak_flops(opt.gemm, opt.gemm_reps);
    std::printf("sgemm %dx%dx%d: %.1f GFLOP/s (best of %d)\n", opt.gemm, opt.gemm, opt.gemm, peak / 1e9, opt.gemm_reps);

    // (b) bmoe training steps on the comparison config
    model::ModelConfig config;  // defaults are the comparison model; set explicitly so they cannot drift
    config.vocab_size = 256;
    config.max_seq_len = 256;
    config.d_model = 256;
    config.num_layers = 4;
    config.num_heads = 4;
    config.num_kv_heads = 4;
    config.num_experts = 8;
    config.top_k = 2;
    config.expert_hidden = 512;
    config.moe_every = 1;
    config.tie_embeddings = false;
    config.norm = model::NormType::kRmsNorm;
    config.position = model::PositionType::kRope;
    config.activation = model::Activation::kSwiGlu;
    const int B = 8, T = 256, N = B * T;

    model::CpuBackend backend;
    model::Model net(config, &backend);
    net.init_weights(/*seed=*/0);
    trainer::OptimConfig optim;
    trainer::AdamW adamw(optim, net);
    const model::LossWeights loss_weights;

    std::vector<int32_t> tokens(N), targets(N);
    auto fill_batch = [&](int step) {
        model::CounterRng rng(/*seed=*/42, /*stream=*/static_cast<uint64_t>(step));
        for (int i = 0; i < N; ++i) {
            tokens[i] = static_cast<int32_t>(rng.bits(2 * i) % config.vocab_size);
            targets[i] = static_cast<int32_t>(rng.bits(2 * i + 1) % config.vocab_size);
        }
    };
    double last_loss = 0.0;
    auto train_step = [&](int step) {
        fill_batch(step);
        net.zero_grad();
        last_loss = net.forward(tokens.data(), targets.data(), B, T, loss_weights).total_loss;
        net.backward(1.0f);
        adamw.step(optim.lr, adamw.clip_scale(adamw.grad_norm()));
    };
    for (int s = 0; s < opt.warmup; ++s) train_step(s);
    backend.synchronize();
    const auto start = Clock::now();
    for (int s = 0; s < opt.steps; ++s) train_step(opt.warmup + s);
    backend.synchronize();
    const double elapsed = seconds_since(start);

    const double tokens_per_s = static_cast<double>(N) * opt.steps / elapsed;
    const double active = static_cast<double>(net.layout().active_matmul_params());
    const double flops_per_token = 6.0 * active + 12.0 * config.num_layers * T * config.d_model;
    const double model_flops = tokens_per_s * flops_per_token;
    const double rss = peak_rss_mib();
    std::printf("bmoe cpu: %d steps of %dx%d tokens in %.2f s (%.3f s/step, loss %.4f)\n", opt.steps, B, T, elapsed,
                elapsed / opt.steps, last_loss);
    std::printf(
        "bmoe cpu: %.0f tokens/s, %.1f GFLOP/s model (%.1f%% of sgemm peak), %.2fM active matmul params, "
        "peak RSS %.0f MiB\n",
        tokens_per_s, model_flops / 1e9, 100.0 * model_flops / peak, active / 1e6, rss);
    std::printf(
        "JSON {\"impl\": \"bmoe\", \"threads\": %d, \"sgemm_flops\": %.6g, \"tokens_per_s\": %.6g, \"model_flops\": "
        "%.6g, \"fraction_of_peak\": %.6g, \"flops_per_token\": %.6g, \"active_matmul_params\": %.0f, \"steps\": %d, "
        "\"seconds\": %.6g, \"peak_rss_mib\": %.1f, \"openblas_coretype\": \"%s\", \"openblas_l2_size\": \"%s\", "
        "\"openblas_core\": \"%s\"}\n",
        threads, peak, tokens_per_s, model_flops, model_flops / peak, flops_per_token, active, opt.steps, elapsed, rss,
        env_or_unset("OPENBLAS_CORETYPE"), env_or_unset("OPENBLAS_L2_SIZE"), openblas_get_corename());
    return 0;
}
