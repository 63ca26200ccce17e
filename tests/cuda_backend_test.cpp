// cuda_backend_test.cpp -- CudaBackend parity against the CpuBackend oracle, every op of backend.h.
//
// Each test feeds the same random inputs to both backends through the Backend API (upload, op,
// download) and compares every output tensor with a max-norm relative error:
//     max_i |cuda_i - cpu_i| <= 1e-4 * (max_i |cpu_i| + 1e-6)
// Integer outputs (top-k indices) must match exactly. Outputs documented as "=" are pre-filled
// with garbage and "+=" outputs with random values, so both conventions are checked too.
// Every test skips cleanly on machines without a CUDA device (label: gpu).
#include "model/cuda/cuda_backend.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "model/buffer.h"
#include "model/cpu_backend.h"
#include "parallel/check.h"
#include "tests/test_util.h"

namespace bmoe::model {
namespace {

using bmoe::testing::IVec;
using bmoe::testing::randint;
using bmoe::testing::randn;
using bmoe::testing::Vec;

constexpr double kTol = 1e-4;
constexpr int kCpu = 0, kGpu = 1;

// One tensor mirrored on both backends: side[kCpu], side[kGpu].
template <typename T>
struct Pair {
    Buffer<T> side[2];
    T* operator[](int s) { return side[s].data(); }
};

// The two backends under comparison. Declare it first in a test: its Pairs must die before it.
class Dual {
  public:
    Dual() : gpu_(make_cuda_backend()) {}
    Backend& be(int s) { return s == kCpu ? static_cast<Backend&>(cpu_) : *gpu_; }
    template <typename T>
    Pair<T> make(const std::vector<T>& host) {
        Pair<T> p;
        for (int s : {kCpu, kGpu}) {
            p.side[s] = Buffer<T>(&be(s), host.size());
            p.side[s].upload(host);
        }
        return p;
    }
    Pair<float> garbage(size_t n, uint32_t seed = 999) { return make(randn(n, seed, 7.0f)); }
    // Runs f(backend, side) on the CPU, then on the GPU.
    template <typename F>
    void run(F f) {
        for (int s : {kCpu, kGpu}) f(be(s), s);
    }

  private:
    CpuBackend cpu_;
    std::unique_ptr<Backend> gpu_;
};

void expect_close(Pair<float>& p, const std::string& what, double tol = kTol) {
    const Vec c = p.side[kCpu].download(), g = p.side[kGpu].download();
    ASSERT_EQ(c.size(), g.size()) << what;
    double scale = 0.0, worst = 0.0;
    size_t wi = 0;
    for (float x : c) scale = std::max(scale, std::abs(static_cast<double>(x)));
    for (size_t i = 0; i < c.size(); ++i) {
        const double err = std::abs(static_cast<double>(c[i]) - g[i]);
        if (!(err <= worst)) worst = err, wi = i;  // NaN counts as the worst
    }
    EXPECT_LE(worst, tol * (scale + 1e-6)) << what << ": element " << wi << " cpu " << c[wi] << " cuda " << g[wi]
                                           << " (max |cpu| " << scale << ", n " << c.size() << ")";
}

// bf16 results reached through roundings of intermediates (attention's P and dS): a 1e-7 change
// upstream can move an intermediate across a bf16 rounding boundary (one ulp, 2^-8), so a few
// elements may differ by more. Inputs left unrounded would make nearly every element differ
// (the rounding error is ~1e-3 of each value); at most max_share of them may differ by > tol.
void expect_mostly_exact(Pair<float>& p, const std::string& what, double tol = kTol, double max_share = 0.1) {
    const Vec c = p.side[kCpu].download(), g = p.side[kGpu].download();
    ASSERT_EQ(c.size(), g.size()) << what;
    double scale = 0.0;
    for (float x : c) scale = std::max(scale, std::abs(static_cast<double>(x)));
    size_t off = 0;
    for (size_t i = 0; i < c.size(); ++i) off += !(std::abs(static_cast<double>(c[i]) - g[i]) <= tol * (scale + 1e-6));
    EXPECT_LE(static_cast<double>(off), max_share * static_cast<double>(c.size()))
        << what << ": " << off << " of " << c.size() << " elements differ by more than " << tol << " of max |cpu| "
        << scale;
}

// bf16 results rounded from fp32 values the two backends compute in different orders: each within
// one bf16 step of max(floor, |cpu value|) (floor: where cancellation leaves small values only
// absolutely accurate), and at most 1% of them rounded differently.
void expect_bf16_close(Pair<uint16_t>& p, const std::string& what, float floor) {
    const std::vector<uint16_t> cpu = p.side[kCpu].download(), gpu = p.side[kGpu].download();
    ASSERT_EQ(cpu.size(), gpu.size()) << what;
    size_t differ = 0;
    for (size_t i = 0; i < cpu.size(); ++i) {
        const float a = bf16_to_float(cpu[i]), b = bf16_to_float(gpu[i]);
        ASSERT_LE(std::abs(a - b), 1e-2 * std::max(floor, std::abs(a))) << what << ": element " << i;
        differ += cpu[i] != gpu[i];
    }
    EXPECT_LE(differ, cpu.size() / 100) << what << ": bf16 values rounded differently";
}

void expect_equal(Pair<int32_t>& p, const std::string& what) {
    EXPECT_EQ(p.side[kCpu].download(), p.side[kGpu].download()) << what;
}

// Small model shapes (N = B*T tokens).
constexpr int B = 2, T = 17, H = 4, KV = 2, Hd = 16, D = 64, V = 50, E = 4, K = 2, N = B * T;

// ---- memory and elementwise -------------------------------------------------------------------

TEST(CudaBackend, FactoryNameAndNoDeviceMessage) {
    if (!bmoe::model::cuda_device_available()) {
        EXPECT_THROW(make_cuda_backend(), Error);  // the hint path; then skip the rest
        GTEST_SKIP() << "no CUDA device";
    }
    EXPECT_EQ(make_backend("cuda")->name(), "cuda");
}

TEST(CudaBackend, MemoryRoundTrip) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    auto gpu = make_cuda_backend();
    constexpr size_t n = 1001;
    auto* a = static_cast<float*>(gpu->alloc(n * sizeof(float)));
    auto* b = static_cast<float*>(gpu->alloc(n * sizeof(float)));
    Vec host(n, 1.0f);
    gpu->download(host.data(), a, n * sizeof(float));
    EXPECT_EQ(host, Vec(n, 0.0f)) << "alloc must zero-fill";
    const Vec x = randn(n, 1);
    gpu->upload(a, x.data(), n * sizeof(float));
    gpu->copy(b, a, n * sizeof(float));
    gpu->download(host.data(), b, n * sizeof(float));
    EXPECT_EQ(host, x);
    gpu->zero(b, 10 * sizeof(float));
    gpu->synchronize();
    gpu->download(host.data(), b, n * sizeof(float));
    EXPECT_EQ(host[9], 0.0f);
    EXPECT_EQ(host[10], x[10]);
    EXPECT_EQ(gpu->allocated_bytes(), 2 * n * sizeof(float));
    gpu->free(a);
    gpu->free(b);
    gpu->free(gpu->alloc(0));  // zero-byte allocations are valid handles
    EXPECT_EQ(gpu->allocated_bytes(), 0u);
    EXPECT_EQ(gpu->peak_allocated_bytes(), 2 * n * sizeof(float));
}

TEST(CudaBackend, Elementwise) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    constexpr size_t n = 3000;
    auto a = d.make(randn(n, 1)), b = d.make(randn(n, 2)), out = d.garbage(n), acc = d.make(randn(n, 3));
    auto prod = d.garbage(n);
    d.run([&](Backend& be, int s) {
        be.add(out[s], a[s], b[s], n);
        be.add(a[s], a[s], b[s], n);  // out aliases a
        be.accumulate(acc[s], b[s], n);
        be.scale(b[s], -0.37f, n);
        be.mul(prod[s], acc[s], b[s], n);
    });
    expect_close(out, "add");
    expect_close(a, "add (aliased)");
    expect_close(acc, "accumulate");
    expect_close(b, "scale");
    expect_close(prod, "mul");
}

// Router noise: the same counter-based bits on both backends (bitwise).
TEST(CudaBackend, DropoutMaskIsBitwiseTheCpuOne) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    constexpr int rows = 257, cols = 96;
    const bmoe::model::CounterRng rng(3, 5);
    auto mask = d.garbage(static_cast<size_t>(rows) * cols);
    d.run([&](Backend& be, int s) { be.dropout_mask(mask[s], rows, cols, {rng, 99, 4 * cols, 0.3f, 1.0f / 0.7f}); });
    EXPECT_EQ(mask.side[kCpu].download(), mask.side[kGpu].download());
}

// Stability evaluation's input noise: the same counter-based normals, scaled by each row's RMS (the
// GPU's block reduction sums in another order: within fp32 rounding).
TEST(CudaBackend, AddInputNoiseMatchesTheCpu) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    constexpr int rows = 131, cols = 768;
    const bmoe::model::CounterRng rng(3, 5);
    auto x = d.make(randn(static_cast<size_t>(rows) * cols, 11)), out = d.garbage(static_cast<size_t>(rows) * cols);
    d.run([&](Backend& be, int s) { be.add_input_noise(out[s], x[s], rows, cols, rng, 777, 0.2f); });
    expect_close(out, "add_input_noise");
}

TEST(CudaBackend, SumSquares) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    for (size_t n : {size_t{1}, size_t{777}, (size_t{1} << 20) + 7}) {
        auto x = d.make(randn(n, 4));
        const double c = d.be(kCpu).sum_squares(x[kCpu], n), g = d.be(kGpu).sum_squares(x[kGpu], n);
        EXPECT_NEAR(g, c, 1e-9 * c) << "n " << n;
        EXPECT_EQ(g, d.be(kGpu).sum_squares(x[kGpu], n)) << "sum_squares must be deterministic";
    }
    Vec bad = randn(5000, 5);
    bad[4321] = std::numeric_limits<float>::quiet_NaN();
    auto x = d.make(bad);
    EXPECT_TRUE(std::isnan(d.be(kGpu).sum_squares(x[kGpu], bad.size())));
    bad[4321] = std::numeric_limits<float>::infinity();
    x = d.make(bad);
    EXPECT_TRUE(std::isinf(d.be(kGpu).sum_squares(x[kGpu], bad.size())));
}

// ---- dense and grouped GEMMs ----------------------------------------------------------------------

TEST(CudaBackend, MatmulForward) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    constexpr int I = 64, O = 48;
    auto in = d.make(randn(N * I, 1)), w = d.make(randn(O * I, 2, 0.1f)), bias = d.make(randn(O, 3));
    auto out = d.garbage(N * O), out_nb = d.garbage(N * O);
    d.run([&](Backend& be, int s) {
        be.matmul_forward(out[s], in[s], w[s], bias[s], N, I, O);
        be.matmul_forward(out_nb[s], in[s], w[s], nullptr, N, I, O);
    });
    expect_close(out, "out (bias)");
    expect_close(out_nb, "out (no bias)");
}

TEST(CudaBackend, MatmulBackward) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    constexpr int I = 64, O = 48;
    auto dout = d.make(randn(N * O, 1)), in = d.make(randn(N * I, 2)), w = d.make(randn(O * I, 3, 0.1f));
    auto din_acc = d.make(randn(N * I, 4)), din_set = d.garbage(N * I);
    auto dw = d.make(randn(O * I, 5)), dbias = d.make(randn(O, 6)), dw2 = d.make(randn(O * I, 7));
    d.run([&](Backend& be, int s) {
        be.matmul_backward(din_acc[s], dw[s], dbias[s], dout[s], in[s], w[s], N, I, O, true);
        be.matmul_backward(din_set[s], dw[s], nullptr, dout[s], in[s], w[s], N, I, O, false);
        be.matmul_backward(nullptr, dw2[s], nullptr, dout[s], in[s], w[s], N, I, O, false);
    });
    expect_close(din_acc, "din (accumulate)");
    expect_close(din_set, "din (overwrite)");
    expect_close(dw, "dw (+= twice)");
    expect_close(dbias, "dbias (+=)");
    expect_close(dw2, "dw (no din)");
}

// Routing with expert `empty` never chosen and every `drop_every`-th copy dropped; rows grouped by
// expert in (token, slot) order, as routing_plan.cpp lays them out.
struct Plan {
    IVec topk_idx, row_src, slot_row;
    std::vector<int> offsets;
    int R = 0;
};

Plan make_plan(int n_tok, int k, int n_exp, int empty, int drop_every, uint32_t seed) {
    std::mt19937 rng(seed);
    Plan p;
    p.topk_idx.resize(static_cast<size_t>(n_tok) * k);
    p.slot_row.assign(p.topk_idx.size(), -1);
    std::vector<int> experts;
    for (int e = 0; e < n_exp; ++e)
        if (e != empty) experts.push_back(e);
    for (int t = 0; t < n_tok; ++t) {
        std::shuffle(experts.begin(), experts.end(), rng);
        for (int j = 0; j < k; ++j) p.topk_idx[t * k + j] = experts[j];
    }
    p.offsets.assign(n_exp + 1, 0);
    for (int e = 0; e < n_exp; ++e) {
        for (int nk = 0; nk < n_tok * k; ++nk) {
            if (p.topk_idx[nk] != e || nk % drop_every == drop_every - 1) continue;
            p.slot_row[nk] = static_cast<int32_t>(p.row_src.size());
            p.row_src.push_back(nk);
        }
        p.offsets[e + 1] = static_cast<int>(p.row_src.size());
    }
    p.R = static_cast<int>(p.row_src.size());
    return p;
}

TEST(CudaBackend, GroupedMatmulWithEmptyGroup) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    constexpr int I = 64, O = 40;
    const Plan plan = make_plan(N, K, E, /*empty=*/2, /*drop_every=*/7, 11);
    ASSERT_EQ(plan.offsets[2], plan.offsets[3]) << "expert 2 must be empty";
    const int R = plan.R;
    auto in = d.make(randn(R * I, 1)), w = d.make(randn(E * O * I, 2, 0.1f)), dout = d.make(randn(R * O, 3));
    auto out = d.garbage(R * O), din = d.garbage(R * I), dw = d.make(randn(E * O * I, 4));
    d.run([&](Backend& be, int s) {
        be.grouped_matmul_forward(out[s], in[s], w[s], plan.offsets.data(), E, I, O);
        be.grouped_matmul_backward(din[s], dw[s], dout[s], in[s], w[s], plan.offsets.data(), E, I, O);
    });
    expect_close(out, "grouped out");
    expect_close(din, "grouped din (=)");
    expect_close(dw, "grouped dw (+=, empty group untouched)");
}

// bf16 matmul precision: cuBLAS bf16 x bf16 -> fp32 on copies rounded to nearest-even, against the
// CPU emulation (the same rounding, then an fp32 sgemm). The products of bf16 values are exact in
// fp32, so only the summation order differs: the fp32 tolerance (1e-4), which unrounded inputs
// (~1e-3 off) fail.
TEST(CudaBackend, Bf16MatmulsMatchCpuEmulation) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    constexpr int I = 256, O = 96;
    const Plan plan = make_plan(N, K, E, /*empty=*/1, /*drop_every=*/5, 13);
    const int R = plan.R;
    auto in = d.make(randn(N * I, 1)), w = d.make(randn(O * I, 2, 0.1f)), dout = d.make(randn(N * O, 3));
    auto out = d.garbage(N * O), din = d.garbage(N * I), dw = d.make(randn(O * I, 4));
    auto gin = d.make(randn(R * I, 5)), gw = d.make(randn(E * O * I, 6, 0.1f)), gdout = d.make(randn(R * O, 7));
    auto gout = d.garbage(R * O), gdin = d.garbage(R * I), gdw = d.make(randn(E * O * I, 8));
    d.run([&](Backend& be, int s) {
        const ScopedMatmulPrecision bf16(&be, MatmulPrecision::kBf16);
        be.matmul_forward(out[s], in[s], w[s], nullptr, N, I, O);
        be.matmul_backward(din[s], dw[s], nullptr, dout[s], in[s], w[s], N, I, O, false);
        be.grouped_matmul_forward(gout[s], gin[s], gw[s], plan.offsets.data(), E, I, O);
        be.grouped_matmul_backward(gdin[s], gdw[s], gdout[s], gin[s], gw[s], plan.offsets.data(), E, I, O);
    });
    for (auto* p : {&out, &din, &dw, &gout, &gdin, &gdw}) expect_close(*p, "bf16 GEMM");
}

// The expert MLP's bf16 tensors: the activation kernels on bf16 inputs (forward and backward) give
// the CPU's bf16 outputs (fp32 math within 1e-4, then the same rounding: equal but for values near
// a rounding boundary), and the grouped GEMMs reading bf16 operands or writing bf16 results match
// the CPU emulation (fp32 results to 1e-4, bf16 ones to a rounding step).
TEST(CudaBackend, Bf16MlpTensorOpsMatchCpu) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    constexpr size_t n = 3001;
    auto bf16_of = [](const Vec& x) {
        std::vector<uint16_t> b(x.size());
        for (size_t i = 0; i < x.size(); ++i) b[i] = bf16_bits(x[i]);
        return b;
    };
    auto gate = d.make(bf16_of(randn(n, 1, 3.0f))), up = d.make(bf16_of(randn(n, 2)));
    auto dout_act = d.make(bf16_of(randn(n, 3)));
    Pair<uint16_t> g16, s16, dg16, dgate16, dup16;
    for (Pair<uint16_t>* p : {&g16, &s16, &dg16, &dgate16, &dup16})
        for (int s : {kCpu, kGpu}) p->side[s] = Buffer<uint16_t>(&d.be(s), n);
    constexpr int I = 256, O = 96;
    const Plan plan = make_plan(N, K, E, /*empty=*/1, /*drop_every=*/5, 13);
    const int R = plan.R;
    auto in16 = d.make(bf16_of(randn(R * I, 5)));
    auto dout16 = d.make(bf16_of(randn(R * O, 9)));
    auto w = d.make(randn(E * O * I, 6, 0.1f)), dout = d.make(randn(R * O, 7)), in = d.make(randn(R * I, 10));
    auto out = d.garbage(R * O), din = d.garbage(R * I), dw = d.make(randn(E * O * I, 8));
    auto dw2 = d.make(randn(E * O * I, 11));
    Pair<uint16_t> h16, dact16;  // the MLP's bf16 GEMM results: pre-activation, d activation
    for (int s : {kCpu, kGpu}) h16.side[s] = Buffer<uint16_t>(&d.be(s), static_cast<size_t>(R) * O);
    for (int s : {kCpu, kGpu}) dact16.side[s] = Buffer<uint16_t>(&d.be(s), static_cast<size_t>(R) * I);
    d.run([&](Backend& be, int s) {
        be.gelu_forward_bf16(g16[s], gate[s], n);
        be.swiglu_forward_bf16(s16[s], gate[s], up[s], n);
        be.gelu_backward_bf16(dg16[s], dout_act[s], gate[s], n);
        be.swiglu_backward_bf16(dgate16[s], dup16[s], dout_act[s], gate[s], up[s], n);
        const ScopedMatmulPrecision bf16(&be, MatmulPrecision::kBf16);
        // the MLP's uses: up/gate (fp32 x -> bf16 h), down (bf16 act -> fp32 y) and their backward
        be.grouped_matmul_forward_bf16(nullptr, h16[s], in[s], nullptr, w[s], plan.offsets.data(), E, I, O);
        be.grouped_matmul_forward_bf16(out[s], nullptr, nullptr, in16[s], w[s], plan.offsets.data(), E, I, O);
        be.grouped_matmul_backward_bf16(nullptr, dact16[s], dw[s], dout[s], nullptr, nullptr, in16[s], w[s],
                                        plan.offsets.data(), E, I, O);
        be.grouped_matmul_backward_bf16(din[s], nullptr, dw2[s], nullptr, dout16[s], in[s], nullptr, w[s],
                                        plan.offsets.data(), E, I, O);
    });
    for (auto* p : {&g16, &s16, &dg16, &dgate16, &dup16}) expect_bf16_close(*p, "bf16 activation", 1.0f);
    expect_bf16_close(h16, "grouped GEMM, bf16 out", 1.0f);
    expect_bf16_close(dact16, "grouped GEMM backward, bf16 din", 1.0f);
    for (auto* p : {&out, &din, &dw, &dw2}) expect_close(*p, "bf16-operand grouped GEMM");
}

// BMOE_CUDA_BF16_GEMM=fast16bf: the fp32-input CUBLAS_COMPUTE_32F_FAST_16BF path kept for A/B
// benchmarks agrees within bf16 error (cuBLAS may keep shapes in fp32, so not to the rounding); a
// bad value is a one-line error naming both choices.
TEST(CudaBackend, Fast16BfGemmModeAgreesWithinBf16Error) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    constexpr int I = 256, O = 96;
    ::setenv("BMOE_CUDA_BF16_GEMM", "fast16bf", 1);
    CpuBackend cpu;
    std::unique_ptr<Backend> gpu;
    try {
        gpu = make_cuda_backend();
    } catch (...) {
        ::unsetenv("BMOE_CUDA_BF16_GEMM");
        throw;
    }
    ::setenv("BMOE_CUDA_BF16_GEMM", "fp8", 1);
    try {
        make_cuda_backend();
        ADD_FAILURE() << "BMOE_CUDA_BF16_GEMM=fp8 was accepted";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("copies (default) or fast16bf"), std::string::npos) << e.what();
    }
    ::unsetenv("BMOE_CUDA_BF16_GEMM");
    const Vec in = randn(N * I, 1), w = randn(O * I, 2, 0.1f);
    Vec out[2];
    for (Backend* be : {static_cast<Backend*>(&cpu), gpu.get()}) {
        be->set_matmul_precision(MatmulPrecision::kBf16);
        Buffer<float> bin(be, in.size()), bw(be, w.size()), bout(be, static_cast<size_t>(N) * O);
        bin.upload(in);
        bw.upload(w);
        be->matmul_forward(bout.data(), bin.data(), bw.data(), nullptr, N, I, O);
        out[be == gpu.get() ? kGpu : kCpu] = bout.download();
    }
    double scale = 0.0, worst = 0.0;
    for (float x : out[kCpu]) scale = std::max(scale, std::abs(static_cast<double>(x)));
    for (size_t i = 0; i < out[kCpu].size(); ++i)
        worst = std::max(worst, std::abs(static_cast<double>(out[kCpu][i]) - out[kGpu][i]));
    EXPECT_LE(worst, 1e-2 * scale);
}

// ---- embeddings ---------------------------------------------------------------------------------

void check_embedding(int n_tok, int vocab, int dim, uint32_t seed) {
    Dual d;
    auto tokens = d.make(randint(n_tok, 0, vocab, seed));  // repeats guaranteed for n_tok > vocab
    auto table = d.make(randn(static_cast<size_t>(vocab) * dim, seed + 1));
    auto dout = d.make(randn(static_cast<size_t>(n_tok) * dim, seed + 2));
    auto out = d.garbage(static_cast<size_t>(n_tok) * dim), dtable = d.make(randn(table.side[0].size(), seed + 3));
    d.run([&](Backend& be, int s) {
        be.embedding_forward(out[s], tokens[s], table[s], n_tok, dim);
        be.embedding_backward(dtable[s], dout[s], tokens[s], n_tok, dim);
    });
    expect_close(out, "embedding out");
    expect_close(dtable, "embedding dtable (+=)");
    // Deterministic: a second pass from the same start gives identical bits.
    auto again = d.make(randn(table.side[0].size(), seed + 3));
    d.be(kGpu).embedding_backward(again[kGpu], dout[kGpu], tokens[kGpu], n_tok, dim);
    EXPECT_EQ(again.side[kGpu].download(), dtable.side[kGpu].download());
}

TEST(CudaBackend, Embedding) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    check_embedding(N, V, D, 10);
    check_embedding(4096, 1000, 200, 20);  // several column tiles, many repeats
}

TEST(CudaBackend, Position) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    constexpr int S = T + 3;  // table longer than the sequence
    auto x = d.make(randn(N * D, 1)), wpe = d.make(randn(S * D, 2)), dx = d.make(randn(N * D, 3));
    auto dwpe = d.make(randn(S * D, 4));
    d.run([&](Backend& be, int s) {
        be.position_forward(x[s], wpe[s], B, T, D);
        be.position_backward(dwpe[s], dx[s], B, T, D);
    });
    expect_close(x, "x += wpe");
    expect_close(dwpe, "dwpe (+=)");
}

// ---- norms --------------------------------------------------------------------------------------

TEST(CudaBackend, RmsNorm) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    for (int dim : {D, 1000}) {
        Dual d;
        const size_t n = static_cast<size_t>(N) * dim;
        auto in = d.make(randn(n, 1)), w = d.make(randn(dim, 2)), dout = d.make(randn(n, 3));
        auto out = d.garbage(n), rstd = d.garbage(N), din = d.make(randn(n, 4)), dw = d.make(randn(dim, 5));
        auto rstd16 = d.garbage(N);
        Pair<uint16_t> out16;
        for (int s : {kCpu, kGpu}) out16.side[s] = Buffer<uint16_t>(&d.be(s), n);
        d.run([&](Backend& be, int s) {
            be.rmsnorm_forward(out[s], rstd[s], in[s], w[s], N, dim, 1e-5f);
            be.rmsnorm_backward(din[s], dw[s], dout[s], in[s], w[s], rstd[s], N, dim);
            const ScopedMatmulPrecision bf16(&be, MatmulPrecision::kBf16);
            be.rmsnorm_forward_bf16(out16[s], rstd16[s], in[s], w[s], N, dim, 1e-5f);
        });
        const std::string at = " (D=" + std::to_string(dim) + ")";
        expect_close(out, "rmsnorm out" + at);
        expect_bf16_close(out16, "rmsnorm bf16 out" + at, 0.0f);
        expect_close(rstd16, "rmsnorm rstd, bf16 out" + at);
        expect_close(rstd, "rmsnorm rstd" + at);
        expect_close(din, "rmsnorm din (+=)" + at);
        expect_close(dw, "rmsnorm dw (+=)" + at);
    }
}

TEST(CudaBackend, LayerNorm) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    for (int dim : {D, 1000}) {
        Dual d;
        const size_t n = static_cast<size_t>(N) * dim;
        auto in = d.make(randn(n, 1, 2.0f)), w = d.make(randn(dim, 2)), b = d.make(randn(dim, 3));
        auto dout = d.make(randn(n, 4)), out = d.garbage(n), mean = d.garbage(N), rstd = d.garbage(N);
        auto din = d.make(randn(n, 5)), dw = d.make(randn(dim, 6)), db = d.make(randn(dim, 7));
        auto mean16 = d.garbage(N), rstd16 = d.garbage(N);
        Pair<uint16_t> out16;
        for (int s : {kCpu, kGpu}) out16.side[s] = Buffer<uint16_t>(&d.be(s), n);
        d.run([&](Backend& be, int s) {
            be.layernorm_forward(out[s], mean[s], rstd[s], in[s], w[s], b[s], N, dim, 1e-5f);
            be.layernorm_backward(din[s], dw[s], db[s], dout[s], in[s], w[s], mean[s], rstd[s], N, dim);
            const ScopedMatmulPrecision bf16(&be, MatmulPrecision::kBf16);
            be.layernorm_forward_bf16(out16[s], mean16[s], rstd16[s], in[s], w[s], b[s], N, dim, 1e-5f);
        });
        const std::string at = " (D=" + std::to_string(dim) + ")";
        expect_close(out, "layernorm out" + at);
        expect_bf16_close(out16, "layernorm bf16 out" + at, 1.0f);  // + b: cancellation
        expect_close(mean16, "layernorm mean, bf16 out" + at);
        expect_close(rstd16, "layernorm rstd, bf16 out" + at);
        expect_close(mean, "layernorm mean" + at);
        expect_close(rstd, "layernorm rstd" + at);
        expect_close(din, "layernorm din (+=)" + at);
        expect_close(dw, "layernorm dw (+=)" + at);
        expect_close(db, "layernorm db (+=)" + at);
    }
}

// ---- attention ----------------------------------------------------------------------------------

TEST(CudaBackend, Rope) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    constexpr int n = N * H * Hd;
    auto x = d.make(randn(n, 1)), dx = d.make(randn(n, 2));
    d.run([&](Backend& be, int s) {
        be.rope_forward(x[s], B, T, H, Hd, 10000.0f);
        be.rope_backward(dx[s], B, T, H, Hd, 10000.0f);
    });
    expect_close(x, "rope forward");
    expect_close(dx, "rope backward");
}

void check_attention(int b, int t, int h, int kv, int hd, MatmulPrecision precision = MatmulPrecision::kFp32) {
    Dual d;
    const double tol = precision == MatmulPrecision::kBf16 ? 1e-2 : kTol;
    const size_t nq = static_cast<size_t>(b) * t * h * hd, nkv = static_cast<size_t>(b) * t * kv * hd;
    const size_t natt = static_cast<size_t>(b) * h * t * t;
    auto q = d.make(randn(nq, 1)), k = d.make(randn(nkv, 2)), v = d.make(randn(nkv, 3));
    auto dout = d.make(randn(nq, 4)), out = d.garbage(nq), att = d.garbage(natt);
    auto dq = d.garbage(nq), dk = d.garbage(nkv), dv = d.garbage(nkv);
    d.run([&](Backend& be, int s) {
        const ScopedMatmulPrecision scoped(&be, precision);
        be.attention_forward(out[s], att[s], q[s], k[s], v[s], b, t, h, kv, hd);
        be.attention_backward(dq[s], dk[s], dv[s], dout[s], out[s], q[s], k[s], v[s], att[s], b, t, h, kv, hd);
    });
    const std::string at = " (B=" + std::to_string(b) + " T=" + std::to_string(t) + " H=" + std::to_string(h) +
                           " KV=" + std::to_string(kv) + " Hd=" + std::to_string(hd) +
                           (precision == MatmulPrecision::kBf16 ? " bf16)" : ")");
    for (auto [p, what] : {std::pair{&out, "attention out"},
                           {&att, "attention att (zeros above the diagonal)"},
                           {&dq, "attention dq"},
                           {&dk, "attention dk"},
                           {&dv, "attention dv"}}) {
        const std::string label = std::string(what) + at;
        expect_close(*p, label, tol);
        if (precision == MatmulPrecision::kBf16) expect_mostly_exact(*p, label);
    }
    // Deterministic GQA sums: a second backward gives identical bits.
    const ScopedMatmulPrecision scoped(&d.be(kGpu), precision);
    auto dk2 = d.garbage(nkv, 5), dv2 = d.garbage(nkv, 6), dq2 = d.garbage(nq, 7);
    d.be(kGpu).attention_backward(dq2[kGpu], dk2[kGpu], dv2[kGpu], dout[kGpu], out[kGpu], q[kGpu], k[kGpu], v[kGpu],
                                  att[kGpu], b, t, h, kv, hd);
    EXPECT_EQ(dk2.side[kGpu].download(), dk.side[kGpu].download()) << at;
    EXPECT_EQ(dv2.side[kGpu].download(), dv.side[kGpu].download()) << at;
}

TEST(CudaBackend, Attention) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    check_attention(B, T, H, KV, Hd);   // GQA
    check_attention(1, 70, 2, 1, 128);  // MQA, head_dim 128, several warps of keys
    check_attention(1, 33, 3, 3, 40);   // MHA, head_dim not a multiple of 32
}

// bf16 attention GEMMs: CUDA (bf16 copies of q, k, v, dout, P and dS) against the CPU's emulation
// (the same operands rounded). Every element within bf16 error (1e-2), and nearly every one within
// the fp32 tolerance (expect_mostly_exact): intermediates may round the other way. The earlier
// CUBLAS_COMPUTE_32F_FAST_16BF path failed this: on an H200 it kept these small shapes in fp32.
TEST(CudaBackend, AttentionBf16MatchesCpuEmulation) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    check_attention(B, T, H, KV, Hd, MatmulPrecision::kBf16);
    check_attention(1, 70, 2, 1, 128, MatmulPrecision::kBf16);
}

// The fused flash kernel (AttentionKernel::kFlash, bf16 tensor cores) against the CPU's bf16
// emulation of the gemm kernel. It saves [B, H, T] log-sum-exps instead of [B, H, T, T]
// probabilities, feeds P V with unnormalised P and rounds dS per tile: agreement within bf16
// error (2e-2 of the largest value), not bit for bit. A second backward gives identical bits.
void check_flash_attention(int b, int t, int h, int kv, int hd) {
    CpuBackend cpu;
    const std::unique_ptr<Backend> gpu = make_cuda_backend();
    gpu->set_attention_kernel(AttentionKernel::kFlash);
    cpu.set_matmul_precision(MatmulPrecision::kBf16);
    gpu->set_matmul_precision(MatmulPrecision::kBf16);
    ASSERT_EQ(gpu->attention_saved_numel(b, t, h, hd), static_cast<size_t>(b) * h * t);
    const size_t nq = static_cast<size_t>(b) * t * h * hd, nkv = static_cast<size_t>(b) * t * kv * hd;
    const Vec q = randn(nq, 1), k = randn(nkv, 2), v = randn(nkv, 3), dout = randn(nq, 4);
    std::vector<Vec> results[2];
    for (Backend* be : {static_cast<Backend*>(&cpu), gpu.get()}) {
        Buffer<float> dq_(be, nq), dk_(be, nkv), dv_(be, nkv), out(be, nq), dq(be, nq), dk(be, nkv), dv(be, nkv);
        Buffer<float> saved(be, be->attention_saved_numel(b, t, h, hd));
        dq_.upload(q);
        dk_.upload(k);
        dv_.upload(v);
        Buffer<float> g(be, nq);
        g.upload(dout);
        be->attention_forward(out.data(), saved.data(), dq_.data(), dk_.data(), dv_.data(), b, t, h, kv, hd);
        be->attention_backward(dq.data(), dk.data(), dv.data(), g.data(), out.data(), dq_.data(), dk_.data(),
                               dv_.data(), saved.data(), b, t, h, kv, hd);
        std::vector<Vec>& r = results[be == gpu.get() ? kGpu : kCpu];
        for (Buffer<float>* x : {&out, &dq, &dk, &dv}) r.push_back(x->download());
        if (be == gpu.get()) {  // determinism: the same backward again
            be->attention_backward(dq.data(), dk.data(), dv.data(), g.data(), out.data(), dq_.data(), dk_.data(),
                                   dv_.data(), saved.data(), b, t, h, kv, hd);
            EXPECT_EQ(dq.download(), r[1]);
            EXPECT_EQ(dk.download(), r[2]);
            EXPECT_EQ(dv.download(), r[3]);
            // q, k, v stored in bf16 (Model::set_bf16_gemm_inputs): the kernels read the values they
            // rounded on load before, so the output and lse are bitwise the same, and dq, dk, dv are
            // the same sums, each stored rounded
            Buffer<uint16_t> q16(be, nq), k16(be, nkv), v16(be, nkv), dq16(be, nq), dk16(be, nkv), dv16(be, nkv);
            be->float_to_bf16(q16.data(), dq_.data(), nq);
            be->float_to_bf16(k16.data(), dk_.data(), nkv);
            be->float_to_bf16(v16.data(), dv_.data(), nkv);
            Buffer<float> out16in(be, nq), saved16in(be, saved.size());
            be->attention_forward_bf16(out16in.data(), saved16in.data(), q16.data(), k16.data(), v16.data(), b, t, h,
                                       kv, hd);
            EXPECT_EQ(out16in.download(), r[0]) << "flash forward on bf16 q, k, v";
            EXPECT_EQ(saved16in.download(), saved.download()) << "flash lse on bf16 q, k, v";
            be->attention_backward_bf16(dq16.data(), dk16.data(), dv16.data(), g.data(), out.data(), q16.data(),
                                        k16.data(), v16.data(), saved.data(), b, t, h, kv, hd);
            int i = 1;
            for (Buffer<uint16_t>* x16 : {&dq16, &dk16, &dv16}) {
                const std::vector<uint16_t> got = x16->download();
                for (size_t j = 0; j < got.size(); ++j)
                    ASSERT_EQ(got[j], bf16_bits(r[i][j])) << "bf16 d input " << i << " element " << j;
                ++i;
            }
        }
    }
    const char* names[] = {"flash out", "flash dq", "flash dk", "flash dv"};
    for (int i = 0; i < 4; ++i) {
        const Vec &c = results[kCpu][i], &g = results[kGpu][i];
        double scale = 0.0, worst = 0.0;
        for (float x : c) scale = std::max(scale, std::abs(static_cast<double>(x)));
        for (size_t j = 0; j < c.size(); ++j) {
            const double err = std::abs(static_cast<double>(c[j]) - g[j]);
            if (!(err <= worst)) worst = err;  // NaN counts as the worst
        }
        EXPECT_LE(worst, 2e-2 * (scale + 1e-6)) << names[i] << " (B=" << b << " T=" << t << " H=" << h << " KV=" << kv
                                                << " Hd=" << hd << "), max |cpu| " << scale;
    }
}

TEST(CudaBackend, FlashAttentionMatchesCpuEmulation) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    check_flash_attention(B, T, H, KV, Hd);   // GQA, one tile
    check_flash_attention(1, 70, 2, 1, 128);  // MQA, head_dim 128, two tiles
    check_flash_attention(1, 150, 3, 3, 40);  // MHA, head_dim padded to 48, three tiles
    check_flash_attention(2, 130, 4, 1, 64);  // GQA group of 4, last tile of 2 rows
}

// The gemm kernel's attention on bf16 q, k, v (for direct callers: the model uses these ops only
// where the flash kernel runs). It widens q, k, v into scratch and runs the fp32-input path, so
// from inputs that hold the same (bf16) values the output and saved probabilities agree with the
// fp32 ops, and dq, dk, dv are those gradients rounded (within one bf16 step: cuBLAS may pick
// another kernel for other addresses).
TEST(CudaBackend, GemmAttentionOnBf16QkvMatchesFp32Inputs) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    const std::unique_ptr<Backend> gpu = make_cuda_backend();
    gpu->set_attention_kernel(AttentionKernel::kGemm);
    gpu->set_matmul_precision(MatmulPrecision::kBf16);
    const int b = 1, t = 70, h = 2, kv = 1, hd = 128;
    const size_t nq = static_cast<size_t>(b) * t * h * hd, nkv = static_cast<size_t>(b) * t * kv * hd;
    const size_t nsaved = gpu->attention_saved_numel(b, t, h, hd);
    Vec q = randn(nq, 1), k = randn(nkv, 2), v = randn(nkv, 3);
    for (Vec* x : {&q, &k, &v})
        for (float& e : *x) e = round_to_bf16(e);
    Backend* be = gpu.get();
    Buffer<float> q32(be, nq), k32(be, nkv), v32(be, nkv), g(be, nq), out(be, nq), saved(be, nsaved);
    Buffer<float> dq(be, nq), dk(be, nkv), dv(be, nkv), out_b(be, nq), saved_b(be, nsaved);
    Buffer<uint16_t> q16(be, nq), k16(be, nkv), v16(be, nkv), dq16(be, nq), dk16(be, nkv), dv16(be, nkv);
    q32.upload(q);
    k32.upload(k);
    v32.upload(v);
    g.upload(randn(nq, 4));
    be->float_to_bf16(q16.data(), q32.data(), nq);
    be->float_to_bf16(k16.data(), k32.data(), nkv);
    be->float_to_bf16(v16.data(), v32.data(), nkv);
    be->attention_forward(out.data(), saved.data(), q32.data(), k32.data(), v32.data(), b, t, h, kv, hd);
    be->attention_backward(dq.data(), dk.data(), dv.data(), g.data(), out.data(), q32.data(), k32.data(), v32.data(),
                           saved.data(), b, t, h, kv, hd);
    be->attention_forward_bf16(out_b.data(), saved_b.data(), q16.data(), k16.data(), v16.data(), b, t, h, kv, hd);
    be->attention_backward_bf16(dq16.data(), dk16.data(), dv16.data(), g.data(), out.data(), q16.data(), k16.data(),
                                v16.data(), saved.data(), b, t, h, kv, hd);
    for (auto [want, got, what] : {std::tuple{&out, &out_b, "out"}, {&saved, &saved_b, "saved probabilities"}}) {
        const Vec a = want->download(), c = got->download();
        for (size_t i = 0; i < a.size(); ++i)
            ASSERT_NEAR(c[i], a[i], 1e-5 * (1.0 + std::abs(a[i]))) << what << " element " << i;
    }
    for (auto [want, got, what] : {std::tuple{&dq, &dq16, "dq"}, {&dk, &dk16, "dk"}, {&dv, &dv16, "dv"}}) {
        const Vec a = want->download();
        const std::vector<uint16_t> c = got->download();
        for (size_t i = 0; i < a.size(); ++i)
            ASSERT_NEAR(bf16_to_float(c[i]), a[i], 1.0 / 128 * std::abs(a[i]) + 1e-6) << what << " element " << i;
    }
}

// ---- activations and loss -----------------------------------------------------------------------

TEST(CudaBackend, Activations) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    constexpr size_t n = 3001;
    auto gate = d.make(randn(n, 1, 3.0f)), up = d.make(randn(n, 2)), dout = d.make(randn(n, 3));
    auto out = d.garbage(n), dgate = d.garbage(n), dup = d.garbage(n), gout = d.garbage(n), gdin = d.garbage(n);
    d.run([&](Backend& be, int s) {
        be.swiglu_forward(out[s], gate[s], up[s], n);
        be.swiglu_backward(dgate[s], dup[s], dout[s], gate[s], up[s], n);
        be.gelu_forward(gout[s], gate[s], n);
        be.gelu_backward(gdin[s], dout[s], gate[s], n);
    });
    expect_close(out, "swiglu out");
    expect_close(dgate, "swiglu dgate");
    expect_close(dup, "swiglu dup");
    expect_close(gout, "gelu out");
    expect_close(gdin, "gelu din");
}

TEST(CudaBackend, CrossEntropy) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    for (int vocab : {V, 5000}) {
        Dual d;
        IVec targets = randint(N, 0, vocab, 3);
        targets[0] = targets[7] = -1;  // ignored rows
        const size_t n = static_cast<size_t>(N) * vocab;
        auto logits = d.make(randn(n, 1, 3.0f));
        auto tg = d.make(targets);
        auto loss = d.garbage(N), probs = d.garbage(n), dlogits = d.garbage(n);
        d.run([&](Backend& be, int s) {
            be.cross_entropy_forward(loss[s], probs[s], logits[s], tg[s], N, vocab);
            be.cross_entropy_backward(dlogits[s], probs[s], tg[s], 1.0f / N, N, vocab);
        });
        const std::string at = " (V=" + std::to_string(vocab) + ")";
        expect_close(loss, "ce loss" + at);
        expect_close(probs, "ce probs" + at);
        expect_close(dlogits, "ce dlogits" + at);
        // In place, as Model runs it: d logits overwrites probs.
        d.run([&](Backend& be, int s) { be.cross_entropy_backward(probs[s], probs[s], tg[s], 1.0f / N, N, vocab); });
        EXPECT_EQ(probs.side[kGpu].download(), dlogits.side[kGpu].download()) << "in-place ce backward" << at;
        // The forward in place (Model::set_keep_logits(false)): probabilities over the logits.
        auto inplace_loss = d.garbage(N);
        d.run([&](Backend& be, int s) {
            be.cross_entropy_forward(inplace_loss[s], logits[s], logits[s], tg[s], N, vocab);
        });
        expect_close(logits, "ce probs in place" + at);
        expect_close(inplace_loss, "ce loss in place" + at);
        EXPECT_EQ(inplace_loss.side[kGpu].download(), loss.side[kGpu].download()) << "in-place ce forward" << at;
    }
}

// The LM head and loss on bf16 logits (Model::set_bf16_logits): the bf16-output GEMM, the loss and
// its in-place bf16 d logits, and the bf16-d-out GEMMs, against the CPU; the GEMMs read the input
// as the final norm writes it with bf16 GEMM inputs (Model::set_bf16_gemm_inputs), as fp32 for V =
// 50 and as bf16 for V = 5000. V = 50 takes the loss kernels' scalar path, 5000 their 4-wide one.
TEST(CudaBackend, LossOnBf16LogitsMatchesCpu) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    for (int vocab : {V, 5000}) {
        Dual d;
        IVec targets = randint(N, 0, vocab, 3);
        targets[0] = targets[7] = -1;  // ignored rows
        const size_t n = static_cast<size_t>(N) * vocab;
        auto x = d.make(randn(static_cast<size_t>(N) * D, 1)), w = d.make(randn(static_cast<size_t>(vocab) * D, 2));
        auto tg = d.make(targets);
        auto loss = d.garbage(N), lse = d.garbage(N), dx = d.garbage(static_cast<size_t>(N) * D);
        auto dw = d.make(randn(static_cast<size_t>(vocab) * D, 4));
        Pair<uint16_t> logits16, x16;
        for (int s : {kCpu, kGpu}) logits16.side[s] = Buffer<uint16_t>(&d.be(s), n);
        for (int s : {kCpu, kGpu}) x16.side[s] = Buffer<uint16_t>(&d.be(s), static_cast<size_t>(N) * D);
        const bool input16 = vocab != V;
        const std::string at = " (V=" + std::to_string(vocab) + ")";
        d.run([&](Backend& be, int s) {
            const ScopedMatmulPrecision bf16(&be, MatmulPrecision::kBf16);
            be.float_to_bf16(x16[s], x[s], static_cast<size_t>(N) * D);
            be.matmul_forward_bf16(nullptr, logits16[s], input16 ? nullptr : x[s], input16 ? x16[s] : nullptr, w[s], N,
                                   D, vocab);
        });
        expect_bf16_close(logits16, "bf16 logits" + at, 1.0f);
        // from here both sides read the CPU's logits, so the loss ops are compared on the same input
        logits16.side[kGpu].upload(logits16.side[kCpu].download());
        d.run([&](Backend& be, int s) {
            const ScopedMatmulPrecision bf16(&be, MatmulPrecision::kBf16);
            be.cross_entropy_forward_bf16(loss[s], lse[s], logits16[s], tg[s], N, vocab);
            be.cross_entropy_backward_bf16(logits16[s], logits16[s], lse[s], tg[s], 1.0f / N, N, vocab);
        });
        expect_close(loss, "bf16-logit loss" + at);
        expect_close(lse, "bf16-logit lse" + at);
        expect_bf16_close(logits16, "bf16 d logits" + at, 0.0f);
        logits16.side[kGpu].upload(logits16.side[kCpu].download());
        d.run([&](Backend& be, int s) {
            const ScopedMatmulPrecision bf16(&be, MatmulPrecision::kBf16);
            be.matmul_backward_bf16(dx[s], dw[s], nullptr, logits16[s], input16 ? nullptr : x[s],
                                    input16 ? x16[s] : nullptr, w[s], N, D, vocab, false);
        });
        expect_close(dx, "LM head dx from bf16 d logits" + at);
        expect_close(dw, "LM head dw from bf16 d logits" + at);
    }
}

// ---- MoE router and permutation -----------------------------------------------------------------

void check_router(int n_exp, int k, bool renormalize, bool aux) {
    Dual d;
    Vec logits = randn(static_cast<size_t>(N) * n_exp, 1, 2.0f);
    std::fill(logits.begin(), logits.begin() + n_exp, 0.5f);  // row 0: all tied
    logits[n_exp + 1] = logits[n_exp + 3] = 9.0f;             // row 1: tied maximum
    auto lg = d.make(logits), dgate = d.make(randn(static_cast<size_t>(N) * k, 2));
    auto aux_dp = d.make(randn(n_exp, 3, 0.1f));
    auto probs = d.garbage(static_cast<size_t>(N) * n_exp), lse = d.garbage(N),
         w = d.garbage(static_cast<size_t>(N) * k);
    auto idx = d.make(IVec(static_cast<size_t>(N) * k, -7));
    auto dlogits = d.garbage(static_cast<size_t>(N) * n_exp);
    d.run([&](Backend& be, int s) {
        be.router_topk_forward(probs[s], lse[s], idx[s], w[s], lg[s], N, n_exp, k, renormalize);
        be.router_topk_backward(dlogits[s], dgate[s], probs[s], lse[s], idx[s], w[s], aux ? aux_dp[s] : nullptr,
                                1e-3f / N, N, n_exp, k, renormalize);
    });
    const std::string at = " (E=" + std::to_string(n_exp) + " K=" + std::to_string(k) +
                           (renormalize ? " renorm" : " raw") + (aux ? " aux)" : ")");
    expect_close(probs, "router probs" + at);
    expect_close(lse, "router lse" + at);
    expect_equal(idx, "router topk idx" + at);
    expect_close(w, "router topk weight" + at);
    expect_close(dlogits, "router dlogits" + at);
    const IVec got = idx.side[kGpu].download();
    EXPECT_EQ(got[0], 0) << "ties go to the lower index" << at;
    EXPECT_EQ(got[k], 1) << "ties go to the lower index" << at;
}

TEST(CudaBackend, RouterTopK) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    for (bool renormalize : {true, false}) {
        check_router(E, K, renormalize, true);
        check_router(E, K, renormalize, false);
        check_router(64, 8, renormalize, true);
    }
}

// The routing plan on the GPU (three kernels: per-tile counts, a scan, the placement) against the
// CPU's plan_routing: identical rows, slots and counts. Tiles of 256 copies, so N*K past one and
// several tiles with a partial last one; a capacity that drops; many experts; and more experts
// than the kernels' shared histograms hold (the host fallback).
TEST(CudaBackend, PlanRoutingMatchesTheHostPlan) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    struct Case {
        int N, K, E, capacity;
    };
    for (const Case c : {Case{5, 2, 4, -1}, Case{300, 2, 8, -1}, Case{1000, 2, 8, 200}, Case{4099, 4, 64, -1},
                         Case{777, 1, 300, 2}, Case{513, 2, 2000, -1}, Case{0, 2, 4, -1}, Case{300, 2, 8, 0},
                         Case{900, 2, 1536, 1}, Case{900, 2, 1537, -1}}) {
        Dual d;
        const Plan plan = make_plan(c.N, c.K, c.E, /*empty=*/1, /*drop_every=*/1 << 30, 17);
        auto idx = d.make(plan.topk_idx);
        const size_t NK = static_cast<size_t>(c.N) * c.K;
        auto row_src = d.make(IVec(NK, -5)), slot_row = d.make(IVec(NK, -5)), counts = d.make(IVec(c.E, -5));
        d.run([&](Backend& be, int s) {
            be.moe_plan_routing(row_src[s], slot_row[s], counts[s], idx[s], c.N, c.K, c.E, c.capacity);
        });
        const std::string at = "N " + std::to_string(c.N) + " K " + std::to_string(c.K) + " E " + std::to_string(c.E) +
                               " capacity " + std::to_string(c.capacity);
        EXPECT_EQ(counts.side[kGpu].download(), counts.side[kCpu].download()) << at;
        EXPECT_EQ(slot_row.side[kGpu].download(), slot_row.side[kCpu].download()) << at;
        const IVec cpu_rows = row_src.side[kCpu].download(), gpu_rows = row_src.side[kGpu].download();
        const IVec cpu_slots = slot_row.side[kCpu].download();
        const size_t R =
            static_cast<size_t>(std::count_if(cpu_slots.begin(), cpu_slots.end(), [](int32_t r) { return r >= 0; }));
        EXPECT_EQ(IVec(gpu_rows.begin(), gpu_rows.begin() + R), IVec(cpu_rows.begin(), cpu_rows.begin() + R)) << at;
    }
}

// The contract's one difference (backend.h): CUDA leaves out a copy whose expert index is out of
// range, where the CPU throws; MoeBlock then finds the counts short of N*K and stops the run.
TEST(CudaBackend, PlanRoutingLeavesOutAnExpertIndexOutOfRange) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    const std::unique_ptr<Backend> gpu = make_cuda_backend();
    const int N = 3, K = 2, E = 4;
    Buffer<int32_t> idx(gpu.get(), 6), row_src(gpu.get(), 6), slot_row(gpu.get(), 6), counts(gpu.get(), E);
    idx.upload(IVec{0, 1, 2, E, 3, 0});  // copy 3 names expert E
    gpu->moe_plan_routing(row_src.data(), slot_row.data(), counts.data(), idx.data(), N, K, E, /*capacity=*/-1);
    EXPECT_EQ(counts.download(), (IVec{2, 1, 1, 1}));
    EXPECT_EQ(slot_row.download()[3], -1);
}

TEST(CudaBackend, MoeGatherCombine) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    const Plan plan = make_plan(N, K, E, /*empty=*/2, /*drop_every=*/5, 12);
    const int R = plan.R;
    ASSERT_LT(R, N * K) << "some copies must be dropped";
    auto row_src = d.make(plan.row_src), slot_row = d.make(plan.slot_row);
    auto x = d.make(randn(N * D, 1)), gw = d.make(randn(N * K, 2)), y_rd = d.make(randn(R * D, 3));
    auto dx_rd = d.make(randn(R * D, 4)), dy = d.make(randn(N * D, 5));
    auto x_rd = d.garbage(R * D), dx = d.make(randn(N * D, 6)), y = d.garbage(N * D);
    auto dy_rd = d.garbage(R * D), dgw = d.garbage(N * K), dgw16 = d.garbage(N * K);
    Pair<uint16_t> x_rd16, dy_rd16;  // the bf16-row variants
    for (int s : {kCpu, kGpu}) x_rd16.side[s] = Buffer<uint16_t>(&d.be(s), static_cast<size_t>(R) * D);
    for (int s : {kCpu, kGpu}) dy_rd16.side[s] = Buffer<uint16_t>(&d.be(s), static_cast<size_t>(R) * D);
    d.run([&](Backend& be, int s) {
        be.moe_gather_forward(x_rd[s], x[s], row_src[s], R, K, D);
        be.moe_gather_backward(dx[s], dx_rd[s], slot_row[s], N, K, D);
        be.moe_combine_forward(y[s], y_rd[s], slot_row[s], gw[s], N, K, D);
        be.moe_combine_backward(dy_rd[s], dgw[s], dy[s], y_rd[s], row_src[s], slot_row[s], gw[s], N, R, K, D);
        const ScopedMatmulPrecision bf16(&be, MatmulPrecision::kBf16);
        be.moe_gather_forward_bf16(x_rd16[s], x[s], row_src[s], R, K, D);
        be.moe_combine_backward_bf16(dy_rd16[s], dgw16[s], dy[s], y_rd[s], row_src[s], slot_row[s], gw[s], N, R, K, D);
    });
    EXPECT_EQ(x_rd16.side[kGpu].download(), x_rd16.side[kCpu].download()) << "bf16 gather: a copy, rounded";
    // bf16 rows regrouped as they are (the EP exchange): 32-bit words for even D, 16-bit for odd D
    for (const int width : {D, D - 1}) {
        std::vector<int32_t> src_host(R);
        for (int l = 0; l < R; ++l) src_host[l] = static_cast<int32_t>((7 * l + 3) % R);
        auto src = d.make(src_host);
        Pair<uint16_t> moved;
        for (int s : {kCpu, kGpu}) moved.side[s] = Buffer<uint16_t>(&d.be(s), static_cast<size_t>(R) * width);
        d.run([&](Backend& be, int s) { be.gather_rows_bf16(moved.side[s].data(), x_rd16[s], src[s], R, width); });
        EXPECT_EQ(moved.side[kGpu].download(), moved.side[kCpu].download()) << "gather_rows_bf16 D " << width;
    }
    expect_bf16_close(dy_rd16, "combine bf16 dy_RD", 0.0f);  // one product per element: rounds alike
    expect_close(dgw16, "combine dtopk_weight, bf16 rows");
    expect_close(x_rd, "gather x_RD");
    expect_close(dx, "gather dx_ND (+=)");
    expect_close(y, "combine y_ND (=)");
    expect_close(dy_rd, "combine dy_RD (=)");
    expect_close(dgw, "combine dtopk_weight (=, 0 when dropped)");
    const Vec g = dgw.side[kGpu].download();
    for (int nk = 0; nk < N * K; ++nk) {
        if (plan.slot_row[nk] < 0) {
            EXPECT_EQ(g[nk], 0.0f) << "dropped copy " << nk;
        }
    }
}

// ---- optimizer ----------------------------------------------------------------------------------

TEST(CudaBackend, AdamW) {
    if (!bmoe::model::cuda_device_available()) GTEST_SKIP() << "no CUDA device";
    Dual d;
    constexpr size_t n = 2049;
    auto p = d.make(randn(n, 1)), m = d.make(Vec(n, 0.0f)), v = d.make(Vec(n, 0.0f));
    Pair<uint16_t> p16;  // the bf16 weight copy, written by the update
    for (int s : {kCpu, kGpu}) p16.side[s] = Buffer<uint16_t>(&d.be(s), n);
    for (int step = 1; step <= 3; ++step) {
        auto g = d.make(randn(n, 10 + step));
        d.run([&](Backend& be, int s) {
            be.adamw_update(p[s], g[s], m[s], v[s], p16[s], n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, step);
            // A tensor starting off a 16-byte boundary (the element-wise path) and one of 3 elements.
            be.adamw_update(p[s] + 1, g[s] + 1, m[s] + 1, v[s] + 1, p16[s] + 1, n - 5, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f,
                            0.5f, step);
            be.adamw_update(p[s] + 4, g[s] + 4, m[s] + 4, v[s] + 4, nullptr, 3, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f,
                            step);
        });
    }
    expect_close(p, "adamw param");
    expect_close(m, "adamw m");
    expect_close(v, "adamw v");
    // the copy: the params rounded, where the last update wrote it (elements 4..6 only got nullptr)
    const Vec gpu_p = p.side[kGpu].download();
    const std::vector<uint16_t> gpu_p16 = p16.side[kGpu].download();
    for (size_t i = 0; i < n; ++i) {
        if (i < 4 || i >= 7) {
            EXPECT_EQ(gpu_p16[i], bf16_bits(gpu_p[i])) << "bf16 weight copy " << i;
        }
    }
    expect_bf16_close(p16, "adamw bf16 weight copy", 1.0f);
}

}  // namespace
}  // namespace bmoe::model
