// bench_routers.cpp -- step time and router FLOPs of every router family against topk.
//
//   bench_routers [--steps N] [--warmup N] [--samples S] [--backend cpu|cuda] [--types a,b,...]
//
// --steps N interleaved rounds (each family one training step and one evaluation forward per
// round; the table shows each family's median), after --warmup training steps per family.
//
// The default comparison model (vocab 256, seq 256, batch 8, d 256, 4 layers, 8 experts top-2,
// expert hidden 512; bench_train's model) with each router.type at its defaults:
//   train: forward + backward + AdamW of one micro-batch (S = router.train_samples = 1);
//   eval:  forward only, S = --samples routing samples averaged inside the router (mean of
//          probabilities, one expert pass).
// Router FLOPs per token per MoE layer are counted analytically (GEMMs and the FC triangular
// product) and reported against the layer's expert FLOPs (2 * 3 * D * F * K, SwiGLU).
// The goal (issue 3): logit-space and selection-space routers cost < 3% extra step time.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "model/backend.h"
#include "model/cpu_threads.h"
#include "model/model.h"
#include "model/rng.h"
#include "trainer/optimizer.h"

namespace {

using Clock = std::chrono::steady_clock;
using namespace bmoe;

struct Options {
    int steps = 9;
    int warmup = 2;
    int samples = 8;
    std::string backend = "cpu";
    std::vector<std::string> types = {"topk",        "temp_sampling", "mc_dropout", "swag", "ensemble",
                                      "weight_mfvi", "logit_mf",      "logit_fc",   "vtsr"};
};

Options parse_options(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "bench_routers: %s needs a value\n", arg.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (arg == "--steps")
            o.steps = std::atoi(value().c_str());
        else if (arg == "--warmup")
            o.warmup = std::atoi(value().c_str());
        else if (arg == "--samples")
            o.samples = std::atoi(value().c_str());
        else if (arg == "--backend")
            o.backend = value();
        else if (arg == "--types") {
            o.types.clear();
            std::stringstream ss(value());
            for (std::string t; std::getline(ss, t, ',');) o.types.push_back(t);
        } else {
            std::fprintf(stderr,
                         "usage: bench_routers [--steps N] [--warmup N] [--samples S] [--backend cpu|cuda] "
                         "[--types topk,logit_mf,...]\n");
            std::exit(arg == "--help" || arg == "-h" ? 0 : 2);
        }
    }
    return o;
}

// Router FLOPs per token and MoE layer (multiply-adds x 2), training forward (S = 1) and
// evaluation forward (S samples).
double router_flops(const model::ModelConfig& c, int S) {
    const double D = c.d_model, E = c.num_experts, r = c.router.hidden, P = E * (E + 1) / 2;
    const double det = 2 * D * E;
    switch (c.router.type) {
        case model::RouterType::kMcDropout:
            return det * (1 + S);  // l_det (z-loss) + S masked GEMMs
        case model::RouterType::kSwag:
            return det * S;
        case model::RouterType::kEnsemble:
            return det * c.router.ensemble_size;
        case model::RouterType::kWeightMfvi:
            return 2 * det;  // mean and variance GEMMs
        case model::RouterType::kLogitMf:
            return det + 2 * D * r + 2 * 2 * r * E;
        case model::RouterType::kLogitFc:
            return det + 2 * D * r + 2 * r * E + 2 * r * P + 2 * P * S;
        case model::RouterType::kVtsr:
            return det + 2 * D;
        default:
            return det;
    }
}

}  // namespace

int run(int argc, char** argv) {
    const Options opt = parse_options(argc, argv);
    model::set_cpu_threads(0);
    model::ModelConfig base;
    base.vocab_size = 256;
    base.max_seq_len = 256;
    base.d_model = 256;
    base.num_layers = 4;
    base.num_heads = 4;
    base.num_kv_heads = 4;
    base.num_experts = 8;
    base.top_k = 2;
    base.expert_hidden = 512;
    const int B = 8, T = 256, N = B * T;
    std::unique_ptr<model::Backend> backend = model::make_backend(opt.backend);
    std::vector<int32_t> tokens(N), targets(N);
    model::CounterRng data_rng(42, 1);
    for (int i = 0; i < N; ++i) {
        tokens[i] = static_cast<int32_t>(data_rng.bits(2 * i) % 256);
        targets[i] = static_cast<int32_t>(data_rng.bits(2 * i + 1) % 256);
    }
    const double expert_flops = 2.0 * 3 * base.d_model * base.expert_hidden * base.top_k;
    std::printf(
        "bench_routers: backend %s, %d threads, model d %d, %d layers, %d experts top-%d, %dx%d tokens, "
        "eval S = %d\n",
        backend->name().c_str(), model::cpu_threads(), base.d_model, base.num_layers, base.num_experts, base.top_k, B,
        T, opt.samples);
    std::printf("%-14s %12s %9s %12s %9s %14s %14s\n", "router", "train ms", "vs topk", "eval ms", "vs topk",
                "router FLOPs", "% of experts");
    // One model per router; the families are measured in interleaved rounds and each keeps its
    // median, so slow drifts of a shared virtual machine hit every family alike.
    struct Entry {
        std::string name;
        model::ModelConfig config;
        std::unique_ptr<model::Model> net;
        std::unique_ptr<trainer::AdamW> adamw;
        std::vector<double> train_ms, eval_ms;
        int step = 0;
    };
    std::vector<Entry> entries;
    trainer::OptimConfig optim;
    model::LossWeights weights;
    weights.router_reg_coef = 1e-3f;
    for (const std::string& name : opt.types) {
        Entry e;
        e.name = name;
        e.config = base;
        e.config.router.type = model::parse_router_type(name);
        e.config.router.swag_every = 1;  // snapshots during the warm-up, so eval can sample
        e.net = std::make_unique<model::Model>(e.config, backend.get());
        e.net->init_weights(0);
        e.adamw = std::make_unique<trainer::AdamW>(optim, *e.net);
        entries.push_back(std::move(e));
    }
    auto train_step = [&](Entry& e) {
        model::RoutingContext ctx;
        ctx.step = e.step;
        e.net->set_routing(ctx);
        e.net->zero_grad();
        e.net->forward(tokens.data(), targets.data(), B, T, weights);
        e.net->backward(1.0f);
        e.adamw->step(optim.lr, e.adamw->clip_scale(e.adamw->grad_norm()));
        e.net->end_step(++e.step);
    };
    auto eval_forward = [&](Entry& e) {
        model::RoutingContext eval;
        eval.training = false;
        eval.samples = opt.samples;
        e.net->set_routing(eval);
        e.net->forward(tokens.data(), nullptr, B, T, weights);
    };
    auto timed_ms = [&](auto&& fn) {
        backend->synchronize();
        const auto start = Clock::now();
        fn();
        backend->synchronize();
        return 1e3 * std::chrono::duration<double>(Clock::now() - start).count();
    };
    for (Entry& e : entries)
        for (int s = 0; s < opt.warmup; ++s) train_step(e);
    for (int round = 0; round < opt.steps; ++round)
        for (Entry& e : entries) {
            e.train_ms.push_back(timed_ms([&] { train_step(e); }));
            e.eval_ms.push_back(timed_ms([&] { eval_forward(e); }));
        }
    auto median = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
    };
    const double topk_train = median(entries.front().train_ms), topk_eval = median(entries.front().eval_ms);
    std::string json = "[";
    for (Entry& e : entries) {
        const double train_ms = median(e.train_ms), eval_ms = median(e.eval_ms);
        const double flops = router_flops(e.config, e.config.router.type == model::RouterType::kTopK ? 1 : opt.samples);
        auto rel = [](double x, double ref) { return ref > 0 ? 100.0 * (x / ref - 1.0) : 0.0; };
        std::printf("%-14s %12.1f %+8.1f%% %12.1f %+8.1f%% %14.0f %13.2f%%\n", e.name.c_str(), train_ms,
                    rel(train_ms, topk_train), eval_ms, rel(eval_ms, topk_eval), flops, 100.0 * flops / expert_flops);
        json += (json.size() > 1 ? ", " : "") + std::string("{\"router\": \"") + e.name +
                "\", \"train_ms\": " + std::to_string(train_ms) + ", \"eval_ms\": " + std::to_string(eval_ms) +
                ", \"router_flops_per_token_layer\": " + std::to_string(flops) + "}";
    }
    std::printf("JSON %s]\n", json.c_str());
    return 0;
}

int main(int argc, char** argv) {
    bmoe::model::use_fast_openblas_kernels(argv);
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {  // bmoe::Error messages name the problem and the fix
        std::fprintf(stderr, "bench_routers: error: %s\n", e.what());
        return 1;
    }
}
