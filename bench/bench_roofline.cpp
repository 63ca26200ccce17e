// bench_roofline.cpp -- the best step time and MFU bmoe's GPU op sequence allows, without a GPU.
//
//   bench_roofline [--model default|gpt2-moe|large] [--batch B] [--gpu h100|h200]
//                  [--precision bf16|fp32] [--attention gemm|flash] [--recompute none|attention|mlp|attention,mlp]
//                  [--router TYPE] [--gemm-efficiency F] [--attention-efficiency F]
//                  [--bandwidth-efficiency F] [--activation-bytes 4|2] [--accumulate K] [--rows N]
//
// Runs one training step (forward, backward, AdamW: what bench_train times) of a preset
// (bench/model_presets.h) on model/op_cost_backend.h, which executes nothing and costs every op at
// its roofline on the card: max(FLOPs / (peak * efficiency), bytes / (bandwidth * efficiency)) per
// kernel. The sum is the step time the CUDA backend's current decomposition into ops could reach if
// every kernel ran at the roofline; with the model FLOPs (6 x active matmul params + attention
// scores, as bench_train) it gives the MFU ceiling of that design. Prints the ops by time, the time
// per kind of work, and one line "JSON {...}". --activation-bytes 2 is a what-if: activations
// stored in bf16. --accumulate K: K micro-batches of the preset's batch per optimizer step
// (gradient accumulation, as train.grad_accum), which spreads AdamW's fixed cost. The peak allocated figure is exact
// (the buffers any backend allocates for the step), less what the CUDA backend adds: bf16 operand copies, cuBLAS
// workspaces, the context.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/model_presets.h"
#include "bench/train_step.h"
#include "model/model.h"
#include "model/op_cost_backend.h"
#include "model/rng.h"
#include "trainer/optimizer.h"
#include "trainer/run_config.h"

namespace {

struct Options {
    std::string model = "gpt2-moe";
    int batch = 0;  // 0 = the preset's
    std::string gpu = "h100";
    std::string precision = "bf16";
    std::string attention = "gemm";
    std::string recompute = "none";
    std::string router = "topk";
    bmoe::model::CostModel cost;
    int accumulate = 1;  // micro-batches per optimizer step
    int rows = 25;
};

Options parse_options(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto text = [&]() -> std::string {
            if (i + 1 >= argc) throw bmoe::Error(arg + " needs a value (bench_roofline --help lists the flags)");
            return argv[++i];
        };
        auto number = [&]() -> double {
            const std::string t = text();
            char* end = nullptr;
            const double v = std::strtod(t.c_str(), &end);
            if (end == t.c_str() || *end != '\0' || !(v > 0))
                throw bmoe::Error(arg + " needs a positive number, got '" + t + "'");
            return v;
        };
        if (arg == "--model")
            o.model = text();
        else if (arg == "--batch")
            o.batch = static_cast<int>(number());
        else if (arg == "--gpu")
            o.gpu = text();
        else if (arg == "--precision")
            o.precision = text();
        else if (arg == "--attention")
            o.attention = text();
        else if (arg == "--recompute")
            o.recompute = text();
        else if (arg == "--router")
            o.router = text();
        else if (arg == "--gemm-efficiency")
            o.cost.gemm_efficiency = number();
        else if (arg == "--attention-efficiency")
            o.cost.attention_efficiency = number();
        else if (arg == "--bandwidth-efficiency")
            o.cost.bandwidth_efficiency = number();
        else if (arg == "--activation-bytes")
            o.cost.activation_bytes = static_cast<int>(number());
        else if (arg == "--accumulate")
            o.accumulate = static_cast<int>(number());
        else if (arg == "--rows")
            o.rows = static_cast<int>(number());
        else if (arg == "--help" || arg == "-h") {
            std::printf(
                "usage: bench_roofline [--model default|gpt2-moe|large] [--batch B] [--gpu h100|h200]\n"
                "                      [--precision bf16|fp32] [--attention gemm|flash]\n"
                "                      [--recompute none|attention|mlp|attention,mlp] [--router TYPE]\n"
                "                      [--gemm-efficiency F] [--attention-efficiency F] [--bandwidth-efficiency F]\n"
                "                      [--activation-bytes 4|2] [--accumulate K] [--rows N]\n");
            std::exit(0);
        } else {
            throw bmoe::Error("unknown flag '" + arg + "' (bench_roofline --help lists the flags)");
        }
    }
    if (o.cost.activation_bytes != 4 && o.cost.activation_bytes != 2)
        throw bmoe::Error("--activation-bytes must be 4 (fp32, as built) or 2 (bf16 what-if)");
    for (double f : {o.cost.gemm_efficiency, o.cost.attention_efficiency, o.cost.bandwidth_efficiency})
        if (f > 1.0) throw bmoe::Error("efficiencies are fractions of the peak: give a number in (0, 1]");
    return o;
}

// The kind of work an op row is, for the summary.
const char* kind_of(const std::string& key) {
    auto starts = [&key](const char* prefix) { return key.rfind(prefix, 0) == 0; };
    if (starts("grouped_matmul")) return "expert GEMMs";
    if (starts("matmul_")) return "dense GEMMs";
    if (starts("attention")) return "attention";
    if (starts("bf16 copies, weight")) return "bf16 copies of weights";
    if (starts("bf16 copies")) return "bf16 copies of activations";
    if (starts("adamw") || starts("sum_squares")) return "optimizer";
    if (starts("cross_entropy")) return "loss";
    if (starts("host transfers")) return "host transfers";
    if (starts("router")) return "router";
    return "other memory-bound";
}

}  // namespace

int run(int argc, char** argv) {
    using namespace bmoe;
    Options opt = parse_options(argc, argv);
    opt.cost.gpu = model::gpu_spec(opt.gpu);
    const model::MatmulPrecision precision = model::parse_matmul_precision(opt.precision);
    trainer::RunConfig checked;  // --recompute parsed and checked as bmoe's train.recompute
    checked.train.recompute = opt.recompute;
    checked.validate();

    int B = 0, T = 0;
    model::ModelConfig config = bench::model_preset(opt.model, B, T);
    config.router.type = model::parse_router_type(opt.router);
    if (opt.batch > 0) B = opt.batch;
    const int N = B * T * opt.accumulate;  // tokens per optimizer step

    model::OpCostBackend backend(opt.cost);
    backend.set_matmul_precision(precision);
    backend.set_attention_kernel(model::parse_attention_kernel(opt.attention));
    model::Model net(config, &backend);
    net.init_weights(/*seed=*/0);
    net.set_attention_recompute(trainer::recomputes(checked.train, "attention"));
    net.set_mlp_recompute(trainer::recomputes(checked.train, "mlp"));
    net.set_keep_logits(false);  // as the trainer runs it
    trainer::OptimConfig optim;
    trainer::AdamW adamw(optim, net);

    std::vector<int32_t> tokens(B * T), targets(B * T);
    model::CounterRng rng(/*seed=*/42, /*stream=*/0);
    for (int i = 0; i < B * T; ++i) {
        tokens[i] = static_cast<int32_t>(rng.bits(2 * i) % config.vocab_size);
        targets[i] = static_cast<int32_t>(rng.bits(2 * i + 1) % config.vocab_size);
    }
    bench::train_step(net, adamw, optim, tokens, targets, B, T, opt.accumulate);  // the first allocates
    backend.clear_ledger();
    bench::train_step(net, adamw, optim, tokens, targets, B, T, opt.accumulate);

    const model::CostModel& cm = backend.cost_model();
    const model::OpCost total = backend.total();
    const double flops_per_token = bench::model_flops_per_token(config, net.layout(), T);
    const double peak = precision == model::MatmulPrecision::kBf16 ? cm.gpu.bf16_flops : cm.gpu.fp32_flops;
    const double tokens_per_s = N / total.seconds;
    const double mfu = tokens_per_s * flops_per_token / peak;

    std::printf(
        "bench_roofline: %s (%s, attention %s, router %s, recompute %s, activations %s), %d x %dx%d tokens/step, %s\n",
        opt.model.c_str(), opt.precision.c_str(), opt.attention.c_str(), opt.router.c_str(), opt.recompute.c_str(),
        cm.activation_bytes == 2 ? "bf16 (what-if)" : "fp32", opt.accumulate, B, T, cm.gpu.name.c_str());
    std::printf(
        "assumed: GEMMs at %.0f%% of %.0f TFLOP/s, attention products at %.0f%%, memory-bound kernels at %.0f%% of "
        "%.2f TB/s, >= %.0f us per kernel, PCIe %.0f GB/s, %.0f us per synchronising download\n",
        100 * cm.gemm_efficiency, peak / 1e12, 100 * cm.attention_efficiency, 100 * cm.bandwidth_efficiency,
        cm.gpu.hbm_bytes_per_s / 1e12, cm.min_kernel_seconds * 1e6, cm.pcie_bytes_per_s / 1e9, cm.sync_seconds * 1e6);

    std::vector<std::pair<std::string, model::OpCost>> rows(backend.ledger().begin(), backend.ledger().end());
    std::sort(rows.begin(), rows.end(),
              [](const auto& a, const auto& b) { return a.second.seconds > b.second.seconds; });
    std::printf("%-48s %7s %10s %9s %9s %6s\n", "op (GEMMs: N x I x O)", "calls", "GFLOP", "GB", "ms", "share");
    for (size_t i = 0; i < rows.size() && static_cast<int>(i) < opt.rows; ++i) {
        const model::OpCost& c = rows[i].second;
        std::printf("%-48s %7lld %10.1f %9.2f %9.3f %5.1f%%\n", rows[i].first.c_str(), static_cast<long long>(c.calls),
                    c.flops / 1e9, c.bytes / 1e9, c.seconds * 1e3, 100 * c.seconds / total.seconds);
    }
    if (rows.size() > static_cast<size_t>(opt.rows))
        std::printf("(%zu more rows; --rows N shows them)\n", rows.size() - static_cast<size_t>(opt.rows));

    std::vector<std::pair<std::string, double>> kinds;
    for (const auto& [key, c] : rows) {
        const std::string kind = kind_of(key);
        auto it = std::find_if(kinds.begin(), kinds.end(), [&](const auto& k) { return k.first == kind; });
        if (it == kinds.end())
            kinds.emplace_back(kind, c.seconds);
        else
            it->second += c.seconds;
    }
    std::sort(kinds.begin(), kinds.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
    std::printf("by kind:");
    for (const auto& [kind, s] : kinds)
        std::printf("  %s %.2f ms (%.0f%%)", kind.c_str(), s * 1e3, 100 * s / total.seconds);
    std::printf("\n");

    double gemm_seconds = 0.0;
    for (const auto& [kind, s] : kinds)
        if (kind == std::string("expert GEMMs") || kind == std::string("dense GEMMs")) gemm_seconds += s;
    // the GEMMs' share of the model FLOPs (6 x active matmul params) over their time alone
    const double gemm_flops_per_token = 6.0 * static_cast<double>(net.layout().active_matmul_params());
    const double gemm_only_mfu = N * gemm_flops_per_token / gemm_seconds / peak;
    const double gib = static_cast<double>(backend.peak_allocated_bytes()) / (1024.0 * 1024.0 * 1024.0);
    std::printf(
        "step at the roofline: %.2f ms, %.0f tokens/s, MFU ceiling %.1f%% (%.3g model FLOP/token; the GEMMs "
        "alone: %.2f ms at %.1f%% of the peak); %lld kernels and transfers, %.1f GB moved; peak allocated %.2f GiB\n",
        total.seconds * 1e3, tokens_per_s, 100 * mfu, flops_per_token, gemm_seconds * 1e3, 100 * gemm_only_mfu,
        static_cast<long long>(total.calls), total.bytes / 1e9, gib);
    // The GPU idles while the host works between a synchronising download and the next launch:
    // measured on this CPU (a GPU server's host may be faster), added to the roofline step.
    const model::OpCostBackend::HostGaps& gaps = backend.host_after_sync();
    const double mfu_with_host = N / (total.seconds + gaps.seconds) * flops_per_token / peak;
    std::printf(
        "host work after synchronising downloads (measured on this CPU, not in the step above): %.2f ms over %lld "
        "syncs (%.0f us each); with it the step takes %.2f ms, MFU %.1f%%\n",
        gaps.seconds * 1e3, static_cast<long long>(gaps.syncs), gaps.syncs ? 1e6 * gaps.seconds / gaps.syncs : 0.0,
        (total.seconds + gaps.seconds) * 1e3, 100 * mfu_with_host);
    std::printf(
        "JSON {\"model\": \"%s\", \"gpu\": \"%s\", \"precision\": \"%s\", \"attention\": \"%s\", \"router\": \"%s\", "
        "\"recompute\": \"%s\", \"activation_bytes\": %d, \"accumulate\": %d, \"tokens_per_step\": %d, \"step_ms\": "
        "%.6g, "
        "\"tokens_per_s\": %.6g, \"mfu_ceiling\": %.6g, \"gemm_only_mfu\": %.6g, \"bytes\": %.6g, "
        "\"peak_allocated_gib\": %.6g, \"host_after_sync_ms\": %.6g, \"mfu_with_host\": %.6g}\n",
        opt.model.c_str(), opt.gpu.c_str(), opt.precision.c_str(), opt.attention.c_str(), opt.router.c_str(),
        opt.recompute.c_str(), cm.activation_bytes, opt.accumulate, N, total.seconds * 1e3, tokens_per_s, mfu,
        gemm_only_mfu, total.bytes, gib, gaps.seconds * 1e3, mfu_with_host);
    return 0;
}

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {  // bmoe::Error messages name the problem and the fix
        std::fprintf(stderr, "bench_roofline: error: %s\n", e.what());
        return 1;
    }
}
