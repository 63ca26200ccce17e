// bench_cuda.cpp -- CUDA backend micro-benchmarks (not a test): the grouped expert GEMM against
// one dense GEMM of the same FLOPs, and MoE permute (gather) / unpermute (combine) bandwidth.
//   ./build/bench/bench_cuda [--tokens 16384] [--d 768] [--f 3072] [--experts 8] [--topk 2] [--peak-gbs X]
// Prints one human line per measurement and a JSON line at the end. GEMMs in fp32 (no TF32) and in
// bf16 matmul precision (bf16 tensor cores, fp32 accumulation: model/precision.h; the times include
// rounding the fp32 inputs to bf16), forward and backward.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "model/buffer.h"
#include "model/cuda/cuda_backend.h"

using namespace bmoe::model;

namespace {

int arg(int argc, char** argv, const char* name, int fallback) {
    for (int i = 1; i + 1 < argc; ++i)
        if (std::strcmp(argv[i], name) == 0) return std::atoi(argv[i + 1]);
    return fallback;
}

// Mean seconds per call of fn over `reps` calls after 3 warm-ups.
template <typename Fn>
double time_it(Backend& be, int reps, Fn fn) {
    for (int i = 0; i < 3; ++i) fn();
    be.synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) fn();
    be.synchronize();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}

}  // namespace

int main(int argc, char** argv) {
    if (!cuda_device_available()) {
        std::printf("bench_cuda: no CUDA device\n");
        return 0;
    }
    const int N = arg(argc, argv, "--tokens", 16384), D = arg(argc, argv, "--d", 768), F = arg(argc, argv, "--f", 3072);
    const int E = arg(argc, argv, "--experts", 8), K = arg(argc, argv, "--topk", 2);
    const int R = N * K;
    auto be = make_cuda_backend();
    // Uneven expert loads (as a router produces): weights 1..E, normalised to R rows.
    std::vector<int> offsets(E + 1, 0);
    for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + R * (e + 1) / (E * (E + 1) / 2);
    offsets[E] = R;
    Buffer<float> x(be.get(), static_cast<size_t>(R) * D), w(be.get(), static_cast<size_t>(E) * F * D),
        y(be.get(), static_cast<size_t>(R) * F), wd(be.get(), static_cast<size_t>(F) * D);
    Buffer<float> dx(be.get(), static_cast<size_t>(R) * D), dw(be.get(), static_cast<size_t>(E) * F * D),
        dwd(be.get(), static_cast<size_t>(F) * D);
    std::mt19937 gen(1);
    std::normal_distribution<float> nd(0.0f, 0.02f);
    std::vector<float> host(static_cast<size_t>(E) * F * D);
    for (float& v : host) v = nd(gen);
    w.upload(host);
    host.resize(static_cast<size_t>(R) * D);
    for (float& v : host) v = nd(gen);
    x.upload(host);
    const double flops = 2.0 * R * D * F;
    double grouped_tflops[2] = {0, 0}, dense_tflops[2] = {0, 0}, grouped_bwd_tflops[2] = {0, 0},
           dense_bwd_tflops[2] = {0, 0};
    for (const MatmulPrecision p : {MatmulPrecision::kFp32, MatmulPrecision::kBf16}) {
        const ScopedMatmulPrecision scope(be.get(), p);
        const int i = p == MatmulPrecision::kBf16 ? 1 : 0;
        const double t_grouped = time_it(
            *be, 20, [&] { be->grouped_matmul_forward(y.data(), x.data(), w.data(), offsets.data(), E, D, F); });
        const double t_dense =
            time_it(*be, 20, [&] { be->matmul_forward(y.data(), x.data(), wd.data(), nullptr, R, D, F); });
        grouped_tflops[i] = flops / t_grouped / 1e12;
        dense_tflops[i] = flops / t_dense / 1e12;
        const std::string name = to_string(p);
        std::printf("%s grouped expert GEMM  %d experts, %d rows, D %d -> F %d: %.3f ms, %.1f TFLOP/s\n", name.c_str(),
                    E, R, D, F, 1e3 * t_grouped, grouped_tflops[i]);
        std::printf("%s dense GEMM, same FLOPs (%d x %d x %d): %.3f ms, %.1f TFLOP/s (grouped/dense %.2f)\n",
                    name.c_str(), R, D, F, 1e3 * t_dense, dense_tflops[i], t_dense / t_grouped);
        // Backward: din = dout w and dw += dout^T in (the transposed product), twice the FLOPs.
        const double t_grouped_bwd = time_it(*be, 20, [&] {
            be->grouped_matmul_backward(dx.data(), dw.data(), y.data(), x.data(), w.data(), offsets.data(), E, D, F);
        });
        const double t_dense_bwd = time_it(*be, 20, [&] {
            be->matmul_backward(dx.data(), dwd.data(), nullptr, y.data(), x.data(), wd.data(), R, D, F, false);
        });
        grouped_bwd_tflops[i] = 2 * flops / t_grouped_bwd / 1e12;
        dense_bwd_tflops[i] = 2 * flops / t_dense_bwd / 1e12;
        std::printf("%s grouped expert GEMM backward (din + dw): %.3f ms, %.1f TFLOP/s; dense %.3f ms, %.1f TFLOP/s\n",
                    name.c_str(), 1e3 * t_grouped_bwd, grouped_bwd_tflops[i], 1e3 * t_dense_bwd, dense_bwd_tflops[i]);
    }

    // permute = gather rows by expert; unpermute = weighted combine of K rows per token
    std::vector<int32_t> row_src(R), slot_row(static_cast<size_t>(N) * K);
    for (int r = 0; r < R; ++r) row_src[r] = static_cast<int32_t>((static_cast<int64_t>(r) * 7919) % R);
    for (int r = 0; r < R; ++r) slot_row[row_src[r]] = r;
    Buffer<int32_t> d_row_src(be.get(), R), d_slot_row(be.get(), slot_row.size());
    d_row_src.upload(row_src);
    d_slot_row.upload(slot_row);
    Buffer<float> x_ND(be.get(), static_cast<size_t>(N) * D), x_RD(be.get(), static_cast<size_t>(R) * D),
        gates(be.get(), static_cast<size_t>(N) * K);
    const double t_gather =
        time_it(*be, 50, [&] { be->moe_gather_forward(x_RD.data(), x_ND.data(), d_row_src.data(), R, K, D); });
    const double t_combine = time_it(
        *be, 50, [&] { be->moe_combine_forward(x_ND.data(), x_RD.data(), d_slot_row.data(), gates.data(), N, K, D); });
    // Bytes moved: gather reads and writes R rows; combine reads R rows and writes N.
    const double gather_gbs = 2.0 * R * D * sizeof(float) / t_gather / 1e9;
    const double combine_gbs = (static_cast<double>(R) + N) * D * sizeof(float) / t_combine / 1e9;
    // The card's memory bandwidth: --peak-gbs, else the datasheet figure for H100/H200 SXM.
    const std::string device = cuda_device_name();
    double peak_gbs = arg(argc, argv, "--peak-gbs", 0);
    if (peak_gbs <= 0)
        peak_gbs = device.find("H200") != std::string::npos   ? 4800
                   : device.find("H100") != std::string::npos ? 3350
                                                              : 0;
    auto share = [&](double gbs) { return peak_gbs > 0 ? 100.0 * gbs / peak_gbs : 0.0; };
    std::printf("permute (gather)    %.3f ms, %.0f GB/s (%.0f%% of %.0f GB/s, %s)\n", 1e3 * t_gather, gather_gbs,
                share(gather_gbs), peak_gbs, device.c_str());
    std::printf("unpermute (combine) %.3f ms, %.0f GB/s (%.0f%% of %.0f GB/s)\n", 1e3 * t_combine, combine_gbs,
                share(combine_gbs), peak_gbs);
    std::printf(
        "JSON {\"grouped_tflops\": %.2f, \"dense_tflops\": %.2f, \"grouped_tflops_bf16\": %.2f, "
        "\"dense_tflops_bf16\": %.2f, \"grouped_bwd_tflops\": %.2f, \"dense_bwd_tflops\": %.2f, "
        "\"grouped_bwd_tflops_bf16\": %.2f, \"dense_bwd_tflops_bf16\": %.2f, \"gather_gbs\": %.0f, "
        "\"combine_gbs\": %.0f}\n",
        grouped_tflops[0], dense_tflops[0], grouped_tflops[1], dense_tflops[1], grouped_bwd_tflops[0],
        dense_bwd_tflops[0], grouped_bwd_tflops[1], dense_bwd_tflops[1], gather_gbs, combine_gbs);
    return 0;
}
