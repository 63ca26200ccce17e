// op_cost_backend.cpp -- OpCostBackend: the FLOPs and bytes of each op, and their roofline time.
#include "model/op_cost_backend.h"

#include <algorithm>
#include <cstring>

#include "parallel/check.h"

namespace bmoe::model {

GpuSpec gpu_spec(const std::string& name) {
    if (name == "h100") return {"H100 SXM", 989e12, 67e12, 3.35e12};
    if (name == "h200") return {"H200 SXM", 989e12, 67e12, 4.8e12};
    throw Error("unknown GPU '" + name + "': use h100 or h200");
}

OpCost OpCostBackend::total() const {
    OpCost sum;
    for (const auto& [key, row] : ledger_) {
        sum.calls += row.calls;
        sum.flops += row.flops;
        sum.bytes += row.bytes;
        sum.seconds += row.seconds;
    }
    return sum;
}

size_t OpCostBackend::attention_saved_numel(int B, int T, int H, int Hd) const {
    if (attention_kernel_ == AttentionKernel::kFlash) return static_cast<size_t>(B) * H * T;  // lse rows
    return Backend::attention_saved_numel(B, T, H, Hd);
}

// ---- the roofline ---------------------------------------------------------------------------------

void OpCostBackend::kernel(const std::string& key, double bytes, double flops) {
    const double memory = bytes / (model_.gpu.hbm_bytes_per_s * model_.bandwidth_efficiency);
    const double compute = flops / model_.gpu.fp32_flops;  // elementwise math: CUDA cores
    book(key, flops, bytes, std::max({memory, compute, model_.min_kernel_seconds}));
}

double OpCostBackend::weight_to_round(const float* w, double n) const {
    return bf16_weight_copy(w, static_cast<size_t>(n)) != nullptr ? 0.0 : n;
}

void OpCostBackend::operand_copies(const std::string& key, std::initializer_list<Operand> operands) {
    if (!bf16()) return;
    for (const Operand& op : operands)
        if (op.elements > 0 && (op.weight || model_.activation_bytes == 4))
            kernel(std::string("bf16 copies, ") + (op.weight ? "weight: " : "activation: ") + key, op.elements * 6.0);
}

void OpCostBackend::gemm(const std::string& key,
                         double flops,
                         std::initializer_list<Operand> inputs,
                         double outputs,
                         bool accumulate,
                         double output_bytes) {
    double bytes = outputs * output_bytes * (accumulate ? 2.0 : 1.0);  // dW accumulates: read and write
    for (const Operand& in : inputs) bytes += in.elements * (bf16() ? 2.0 : in.weight ? 4.0 : model_.activation_bytes);
    book(key, flops, bytes, product_seconds(flops, bytes, model_.gemm_efficiency));
}

void OpCostBackend::attention_products(const std::string& key, double flops, double bytes) {
    book(key, flops, bytes, product_seconds(flops, bytes, model_.attention_efficiency));
}

double OpCostBackend::product_seconds(double flops, double bytes, double efficiency) const {
    const double rate = (bf16() ? model_.gpu.bf16_flops : model_.gpu.fp32_flops) * efficiency;
    const double memory = bytes / (model_.gpu.hbm_bytes_per_s * model_.bandwidth_efficiency);
    return std::max({flops / rate, memory, model_.min_kernel_seconds});
}

void OpCostBackend::host_transfer(size_t bytes, bool synchronizes) {
    const double b = static_cast<double>(bytes);
    book("host transfers", 0.0, b, b / model_.pcie_bytes_per_s + (synchronizes ? model_.sync_seconds : 0.0));
}

void OpCostBackend::book(const std::string& key, double flops, double bytes, double seconds) {
    if (queue_empty_ && key != "host transfers") {  // the first kernel after a synchronisation
        host_after_sync_.seconds +=
            std::chrono::duration<double>(std::chrono::steady_clock::now() - synced_at_).count();
        queue_empty_ = false;
    }
    OpCost& row = ledger_[key];
    row.calls += 1;
    row.flops += flops;
    row.bytes += bytes;
    row.seconds += seconds;
    profiled_[op_name_.empty() ? key : op_name_] += seconds;
}

namespace {
// "op AxBxC", the shape names of the ledger's GEMM rows and of CUDA's op profiler
std::string shaped(const char* op, double a, long b, long c) {
    return std::string(op) + " " + std::to_string(static_cast<long long>(a)) + "x" + std::to_string(b) + "x" +
           std::to_string(c);
}
}  // namespace

OpCostBackend::ProfiledName::ProfiledName(OpCostBackend* be, const char* name, long a, long b, long c)
    : be_(be), outermost_(be->op_name_.empty()) {
    if (outermost_) be_->op_name_ = shaped(name, static_cast<double>(a), b, c);
}

// ---- memory ---------------------------------------------------------------------------------------

void* OpCostBackend::alloc(size_t bytes) {
    void* p = reinterpret_cast<void*>(next_address_);
    next_address_ += (bytes + 511) / 256 * 256;  // 256-aligned, at least 256 bytes apart
    note_alloc(p, bytes);
    return p;
}
void OpCostBackend::free(void* ptr) { note_free(ptr); }
void OpCostBackend::upload(void*, const void*, size_t bytes) {
    const ProfiledName op(this, "upload");
    host_transfer(bytes, false);
}
void OpCostBackend::download(void* dst_host, const void* src, size_t bytes) {
    const ProfiledName op(this, "download");
    if (bytes > 0) std::memset(dst_host, 0, bytes);  // what the caller reads: zeros, as alloc promises
    if (src == planned_.counts && bytes == planned_.experts * sizeof(int32_t)) {  // a balanced routing
        auto* counts = static_cast<int32_t*>(dst_host);
        for (int e = 0; e < planned_.experts; ++e)
            counts[e] =
                static_cast<int32_t>(planned_.copies / planned_.experts + (e < planned_.copies % planned_.experts));
    }
    // a download right after another finds the queue empty: no wait to book (nor a new idle start)
    host_transfer(bytes, /*synchronizes=*/!queue_empty_);
    if (!queue_empty_) {
        host_after_sync_.syncs += 1;
        synced_at_ = std::chrono::steady_clock::now();
    }
    queue_empty_ = true;
}
void OpCostBackend::copy(void*, const void*, size_t bytes) { kernel("copy", 2.0 * bytes); }
void OpCostBackend::zero(void*, size_t bytes) { kernel("zero", static_cast<double>(bytes)); }

// ---- elementwise ----------------------------------------------------------------------------------

void OpCostBackend::add(float*, const float*, const float*, size_t n) { kernel("add", act(3.0 * n), n); }
void OpCostBackend::accumulate(float*, const float*, size_t n) { kernel("accumulate", act(3.0 * n), n); }
void OpCostBackend::scale(float*, float, size_t n) { kernel("scale", act(2.0 * n), n); }
void OpCostBackend::mul(float*, const float*, const float*, size_t n) { kernel("mul", act(3.0 * n), n); }
double OpCostBackend::sum_squares(const float*, size_t n) {
    kernel("sum_squares", 4.0 * n, 2.0 * n);
    return 0.0;
}

// ---- GEMMs ----------------------------------------------------------------------------------------

void OpCostBackend::matmul_forward(float*, const float*, const float* w, const float* bias, int N, int I, int O) {
    const ProfiledName op(this, "matmul_fwd", N, I, O);
    dense_forward_cost(w, N, I, O, bias != nullptr, 4.0, /*in_stored_bf16=*/false);
}

void OpCostBackend::matmul_backward(float* din,
                                    float* dw,
                                    float* dbias,
                                    const float*,
                                    const float*,
                                    const float* w,
                                    int N,
                                    int I,
                                    int O,
                                    bool accumulate_din) {
    const ProfiledName op(this, "matmul_bwd", N, I, O);
    dense_backward_cost(w, din != nullptr, dw != nullptr, dbias != nullptr, N, I, O, accumulate_din, false, false);
}

void OpCostBackend::matmul_forward_bf16(
    float*, uint16_t* out16, const float*, const uint16_t* in16, const float* w, int N, int I, int O) {
    const ProfiledName op(this, "matmul_fwd_bf16", N, I, O);
    dense_forward_cost(w, N, I, O, /*bias=*/false, out16 != nullptr ? 2.0 : 4.0, in16 != nullptr);
}

void OpCostBackend::matmul_backward_bf16(float* din,
                                         float* dw,
                                         const float*,
                                         const uint16_t* dout16,
                                         const float*,
                                         const uint16_t* in16,
                                         const float* w,
                                         int N,
                                         int I,
                                         int O,
                                         bool accumulate_din) {
    const ProfiledName op(this, "matmul_bwd_bf16", N, I, O);
    dense_backward_cost(w, din != nullptr, dw != nullptr, false, N, I, O, accumulate_din, dout16 != nullptr,
                        in16 != nullptr);
}

// Operands stored as bf16 are read at 2 bytes without a copy; the rest are rounded into copies.
void OpCostBackend::dense_forward_cost(
    const float* w, int N, int I, int O, bool bias, double output_bytes, bool in_stored_bf16) {
    const double n = N, flops = 2.0 * n * I * O;
    // A bias is broadcast into out first; the GEMM then reads it back (beta = 1).
    if (bias) kernel("matmul bias", 4.0 * O + act(n * O));
    const std::string key = shaped("matmul_forward", n, I, O);
    operand_copies(key, {{in_stored_bf16 ? 0.0 : n * I, false}, {weight_to_round(w, double(O) * I), true}});
    gemm(key, flops, {{n * I, false}, {double(O) * I, true}}, n * O, bias, output_bytes);
}

void OpCostBackend::dense_backward_cost(const float* w,
                                        bool din,
                                        bool dw,
                                        bool dbias,
                                        int N,
                                        int I,
                                        int O,
                                        bool accumulate_din,
                                        bool dout_stored_bf16,
                                        bool in_stored_bf16) {
    const double n = N, flops = 2.0 * n * I * O;
    const std::string key = shaped("matmul_backward", n, I, O);
    operand_copies(key, {{dout_stored_bf16 ? 0.0 : n * O, false},
                         {dw && !in_stored_bf16 ? n * I : 0.0, false},
                         {din ? weight_to_round(w, double(O) * I) : 0.0, true}});
    if (din) gemm(key, flops, {{n * O, false}, {double(O) * I, true}}, n * I, accumulate_din);
    if (dw) gemm(key, flops, {{n * O, false}, {n * I, false}}, double(O) * I, /*accumulate=*/true);
    if (dbias) kernel("matmul bias", act(n * O) + 8.0 * O, n * O);
}

void OpCostBackend::grouped_matmul_forward(
    float*, const float*, const float* w, const int* offsets_host, int G, int I, int O) {
    const ProfiledName op(this, "grouped_matmul_fwd", G, I, O);
    grouped_forward_cost(w, offsets_host[G], G, I, O, /*in_stored_bf16=*/false, 4.0);
}

void OpCostBackend::grouped_matmul_backward(
    float* din, float* dw, const float*, const float*, const float* w, const int* offsets_host, int G, int I, int O) {
    const ProfiledName op(this, "grouped_matmul_bwd", G, I, O);
    grouped_backward_cost(w, din != nullptr, dw != nullptr, offsets_host[G], G, I, O, false, false, 4.0);
}

void OpCostBackend::grouped_matmul_forward_bf16(float*,
                                                uint16_t* out16,
                                                const float*,
                                                const uint16_t* in16,
                                                const float* w,
                                                const int* offsets_host,
                                                int G,
                                                int I,
                                                int O) {
    const ProfiledName op(this, "grouped_matmul_fwd_bf16", G, I, O);
    grouped_forward_cost(w, offsets_host[G], G, I, O, in16 != nullptr, out16 != nullptr ? 2.0 : 4.0);
}

void OpCostBackend::grouped_matmul_backward_bf16(float* din,
                                                 uint16_t* din16,
                                                 float* dw,
                                                 const float*,
                                                 const uint16_t* dout16,
                                                 const float*,
                                                 const uint16_t* in16,
                                                 const float* w,
                                                 const int* offsets_host,
                                                 int G,
                                                 int I,
                                                 int O) {
    const ProfiledName op(this, "grouped_matmul_bwd_bf16", G, I, O);
    grouped_backward_cost(w, din != nullptr || din16 != nullptr, dw != nullptr, offsets_host[G], G, I, O,
                          dout16 != nullptr, in16 != nullptr, din16 != nullptr ? 2.0 : 4.0);
}

// Operands stored as bf16 are read at 2 bytes without a copy; the rest are rounded into copies.
void OpCostBackend::grouped_forward_cost(
    const float* w, double r, int G, int I, int O, bool in_stored_bf16, double out_bytes) {
    const std::string key = shaped("grouped_matmul_forward", r, I, O);
    operand_copies(key, {{in_stored_bf16 ? 0.0 : r * I, false}, {weight_to_round(w, double(G) * O * I), true}});
    gemm(key, 2.0 * r * I * O, {{r * I, false}, {double(G) * O * I, true}}, r * O, false, out_bytes);
}

void OpCostBackend::grouped_backward_cost(const float* w,
                                          bool din,
                                          bool dw,
                                          double r,
                                          int G,
                                          int I,
                                          int O,
                                          bool dout_stored_bf16,
                                          bool in_stored_bf16,
                                          double din_bytes) {
    const double flops = 2.0 * r * I * O, weights = double(G) * O * I;
    const std::string key = shaped("grouped_matmul_backward", r, I, O);
    operand_copies(key, {{dout_stored_bf16 ? 0.0 : r * O, false},
                         {dw && !in_stored_bf16 ? r * I : 0.0, false},
                         {din ? weight_to_round(w, weights) : 0.0, true}});
    if (din) gemm(key, flops, {{r * O, false}, {weights, true}}, r * I, false, din_bytes);
    if (dw) gemm(key, flops, {{r * O, false}, {r * I, false}}, weights, /*accumulate=*/true);
}

// ---- embeddings and norms ---------------------------------------------------------------------------

void OpCostBackend::embedding_forward(float*, const int32_t*, const float*, int N, int D) {
    kernel("embedding_forward", 4.0 * N + 4.0 * N * D + act(double(N) * D));
}
void OpCostBackend::embedding_backward(float*, const float*, const int32_t*, int N, int D) {
    kernel("embedding_backward", 4.0 * N + act(double(N) * D) + 8.0 * N * D, double(N) * D);
}
void OpCostBackend::position_forward(float*, const float*, int B, int T, int D) {
    kernel("position_forward", act(2.0 * B * T * D) + 4.0 * T * D, double(B) * T * D);
}
void OpCostBackend::position_backward(float*, const float*, int B, int T, int D) {
    kernel("position_backward", act(double(B) * T * D) + 8.0 * T * D, double(B) * T * D);
}

void OpCostBackend::rmsnorm_forward(float*, float*, const float*, const float*, int N, int D, float) {
    kernel("rmsnorm_forward", act(2.0 * N * D) + 4.0 * (D + N), 4.0 * N * D);
}
void OpCostBackend::rmsnorm_forward_bf16(uint16_t*, float*, const float*, const float*, int N, int D, float) {
    kernel("rmsnorm_forward_bf16", act(double(N) * D) + 2.0 * N * D + 4.0 * (D + N), 4.0 * N * D);
}
void OpCostBackend::rmsnorm_backward(
    float*, float* dw, const float*, const float*, const float*, const float*, int N, int D) {
    // dout, in and din (+=: read and write), rstd; dw from per-block partial sums.
    kernel("rmsnorm_backward", act(4.0 * N * D) + 4.0 * N + (dw != nullptr ? 8.0 * D : 0.0), 8.0 * N * D);
}
void OpCostBackend::layernorm_forward(
    float*, float*, float*, const float*, const float*, const float*, int N, int D, float) {
    kernel("layernorm_forward", act(2.0 * N * D) + 4.0 * (2.0 * D + 2.0 * N), 6.0 * N * D);
}
void OpCostBackend::layernorm_forward_bf16(
    uint16_t*, float*, float*, const float*, const float*, const float*, int N, int D, float) {
    kernel("layernorm_forward_bf16", act(double(N) * D) + 2.0 * N * D + 4.0 * (2.0 * D + 2.0 * N), 6.0 * N * D);
}
void OpCostBackend::layernorm_backward(
    float*, float* dw, float*, const float*, const float*, const float*, const float*, const float*, int N, int D) {
    kernel("layernorm_backward", act(4.0 * N * D) + 8.0 * N + (dw != nullptr ? 16.0 * D : 0.0), 10.0 * N * D);
}

// ---- attention --------------------------------------------------------------------------------------

void OpCostBackend::rope_forward(float*, int B, int T, int nh, int Hd, float) {
    kernel("rope_forward", act(2.0 * B * T * nh * Hd), 3.0 * B * T * nh * Hd);
}
void OpCostBackend::rope_backward(float*, int B, int T, int nh, int Hd, float) {
    kernel("rope_backward", act(2.0 * B * T * nh * Hd), 3.0 * B * T * nh * Hd);
}

// q, k, v and out each once. kGemm: the full T x T products (the upper triangle's work is wasted)
// and the scores through memory: S written, the softmax reading it and writing the saved P (plus a
// bf16 P for the second GEMM), the P V product reading P. kFlash: the causal half of the products,
// no scores in memory.
void OpCostBackend::attention_forward(
    float*, float*, const float*, const float*, const float*, int B, int T, int H, int KV, int Hd) {
    const double q = double(B) * T * H * Hd, kv = double(B) * T * KV * Hd, scores = double(B) * H * T * T;
    double operands = 2.0 * q + 2.0 * kv;  // q and out, k and v
    const bool flash = attention_kernel_ == AttentionKernel::kFlash;
    const ProfiledName op(this, flash ? "flash_attention_forward" : "attention_forward");
    if (flash) {
        attention_products("attention_forward (flash)", 2.0 * scores * Hd, act(operands) + 4.0 * B * H * T);
        return;
    }
    if (bf16()) kernel("bf16 copies, activation: attention_forward", (q + 2.0 * kv) * 6.0);
    const double operand_bytes = bf16() ? 2.0 * (q + 2.0 * kv) + 4.0 * q : act(operands);
    const double score_bytes = scores * (bf16() ? 4.0 + 4.0 + 4.0 + 2.0 + 2.0 : 16.0);
    attention_products("attention_forward", 4.0 * scores * Hd, operand_bytes + score_bytes);
}

// kGemm: dP = dout V^T written; the softmax backward reads dP and P and writes dS (bf16 too); the
// dq, dk, dv products read dS twice and P once (P's bf16 copy rounded from the fp32 saved P).
// kFlash: the five causal products of FlashAttention-2's backward (S and P recomputed).
void OpCostBackend::attention_backward(float*,
                                       float*,
                                       float*,
                                       const float*,
                                       const float*,
                                       const float*,
                                       const float*,
                                       const float*,
                                       const float*,
                                       int B,
                                       int T,
                                       int H,
                                       int KV,
                                       int Hd) {
    const double q = double(B) * T * H * Hd, kv = double(B) * T * KV * Hd, scores = double(B) * H * T * T;
    const bool flash = attention_kernel_ == AttentionKernel::kFlash;
    const ProfiledName op(this, flash ? "flash_attention_backward" : "attention_backward");
    if (flash) {
        // reads q, out, dout, k, v, lse; writes dq, dk, dv
        attention_products("attention_backward (flash)", 5.0 * scores * Hd, act(4.0 * q + 4.0 * kv) + 4.0 * B * H * T);
        return;
    }
    if (bf16()) kernel("bf16 copies, activation: attention_backward", (2.0 * q + 2.0 * kv + scores) * 6.0);
    const double operand_bytes = bf16() ? 2.0 * (2.0 * q + 2.0 * kv) + 4.0 * (q + 2.0 * kv) : act(4.0 * q + 4.0 * kv);
    const double score_bytes = scores * (bf16() ? 4.0 + (4.0 + 4.0 + 4.0 + 2.0) + 2.0 + 2.0 + 2.0 : 28.0);
    attention_products("attention_backward", 8.0 * scores * Hd, operand_bytes + score_bytes);
}

// The _bf16 attention ops: the flash kernel reads q, k, v (and writes dq, dk, dv) at 2 bytes; the
// gemm kernel runs Backend's defaults (q, k, v widened into fp32 temporaries, d results rounded).
void OpCostBackend::attention_forward_bf16(float* out,
                                           float* att,
                                           const uint16_t* q16,
                                           const uint16_t* k16,
                                           const uint16_t* v16,
                                           int B,
                                           int T,
                                           int H,
                                           int KV,
                                           int Hd) {
    const ProfiledName op(this, "attention_forward_bf16");
    if (attention_kernel_ != AttentionKernel::kFlash)
        return Backend::attention_forward_bf16(out, att, q16, k16, v16, B, T, H, KV, Hd);
    require_bf16_precision("attention_forward_bf16");
    const double q = double(B) * T * H * Hd, kv = double(B) * T * KV * Hd, scores = double(B) * H * T * T;
    // reads q, k, v (bf16); writes out and the lse
    attention_products("attention_forward (flash)", 2.0 * scores * Hd, 2.0 * (q + 2.0 * kv) + act(q) + 4.0 * B * H * T);
}

void OpCostBackend::attention_backward_bf16(uint16_t* dq16,
                                            uint16_t* dk16,
                                            uint16_t* dv16,
                                            const float* dout,
                                            const float* out,
                                            const uint16_t* q16,
                                            const uint16_t* k16,
                                            const uint16_t* v16,
                                            const float* att,
                                            int B,
                                            int T,
                                            int H,
                                            int KV,
                                            int Hd) {
    const ProfiledName op(this, "attention_backward_bf16");
    if (attention_kernel_ != AttentionKernel::kFlash)
        return Backend::attention_backward_bf16(dq16, dk16, dv16, dout, out, q16, k16, v16, att, B, T, H, KV, Hd);
    require_bf16_precision("attention_backward_bf16");
    const double q = double(B) * T * H * Hd, kv = double(B) * T * KV * Hd, scores = double(B) * H * T * T;
    // reads out, dout (fp32), q, k, v and the lse; writes dq, dk, dv (bf16)
    attention_products("attention_backward (flash)", 5.0 * scores * Hd,
                       act(2.0 * q) + 2.0 * (2.0 * q + 4.0 * kv) + 4.0 * B * H * T);
}

// ---- activations and loss -------------------------------------------------------------------------

void OpCostBackend::swiglu_forward(float*, const float*, const float*, size_t n) {
    kernel("swiglu_forward", act(3.0 * n), 8.0 * n);
}
void OpCostBackend::swiglu_backward(float*, float*, const float*, const float*, const float*, size_t n) {
    kernel("swiglu_backward", act(5.0 * n), 12.0 * n);
}
void OpCostBackend::gelu_forward(float*, const float*, size_t n) { kernel("gelu_forward", act(2.0 * n), 12.0 * n); }
// The MLP's bf16 [R, F] tensors: 2 bytes per element read or written.
void OpCostBackend::gelu_forward_bf16(uint16_t*, const uint16_t*, size_t n) {
    kernel("gelu_forward_bf16", 4.0 * n, 12.0 * n);
}
void OpCostBackend::swiglu_forward_bf16(uint16_t*, const uint16_t*, const uint16_t*, size_t n) {
    kernel("swiglu_forward_bf16", 6.0 * n, 8.0 * n);
}
void OpCostBackend::gelu_backward_bf16(uint16_t*, const uint16_t*, const uint16_t*, size_t n) {
    kernel("gelu_backward_bf16", 6.0 * n, 20.0 * n);
}
void OpCostBackend::swiglu_backward_bf16(
    uint16_t*, uint16_t*, const uint16_t*, const uint16_t*, const uint16_t*, size_t n) {
    kernel("swiglu_backward_bf16", 10.0 * n, 12.0 * n);
}
void OpCostBackend::gelu_backward(float*, const float*, const float*, size_t n) {
    kernel("gelu_backward", act(3.0 * n), 20.0 * n);
}

// The CUDA kernel's passes: an online max/sum over each row, then the probabilities written.
void OpCostBackend::cross_entropy_forward(float*, float*, const float*, const int32_t*, int N, int V) {
    kernel("cross_entropy_forward", act(3.0 * N * V) + 8.0 * N, 6.0 * N * V);
}
void OpCostBackend::cross_entropy_backward(float*, const float*, const int32_t*, float, int N, int V) {
    kernel("cross_entropy_backward", act(2.0 * N * V) + 4.0 * N, 2.0 * N * V);
}
// One online pass over the bf16 row; then d logits written over it from the saved lse.
void OpCostBackend::cross_entropy_forward_bf16(float*, float*, const uint16_t*, const int32_t*, int N, int V) {
    kernel("cross_entropy_forward_bf16", 2.0 * N * V + 12.0 * N, 6.0 * N * V);
}
void OpCostBackend::cross_entropy_backward_bf16(
    uint16_t*, const uint16_t*, const float*, const int32_t*, float, int N, int V) {
    kernel("cross_entropy_backward_bf16", 4.0 * N * V + 8.0 * N, 4.0 * N * V);
}

// ---- router and permutation ------------------------------------------------------------------------

void OpCostBackend::router_topk_forward(float*, float*, int32_t*, float*, const float*, int N, int E, int K, bool) {
    kernel("router_topk_forward", 4.0 * (2.0 * N * E + N + 2.0 * N * K), 6.0 * N * E);
}
void OpCostBackend::router_topk_backward(float*,
                                         const float*,
                                         const float*,
                                         const float*,
                                         const int32_t*,
                                         const float*,
                                         const float*,
                                         float,
                                         int N,
                                         int E,
                                         int K,
                                         bool) {
    kernel("router_topk_backward", 4.0 * (2.0 * N * E + N + 3.0 * N * K + E), 6.0 * N * E);
}

void OpCostBackend::moe_gather_forward(float*, const float*, const int32_t*, int R, int, int D) {
    kernel("moe_gather_forward", act(2.0 * R * D) + 4.0 * R);  // each routed row read and written
}
void OpCostBackend::moe_gather_backward(float*, const float*, const int32_t*, int N, int K, int D) {
    kernel("moe_gather_backward", act(double(N) * K * D + 2.0 * N * D) + 4.0 * N * K, double(N) * K * D);
}
void OpCostBackend::moe_combine_forward(float*, const float*, const int32_t*, const float*, int N, int K, int D) {
    kernel("moe_combine_forward", act(double(N) * K * D + double(N) * D) + 8.0 * N * K, 2.0 * N * K * D);
}
void OpCostBackend::moe_combine_backward(float*,
                                         float*,
                                         const float*,
                                         const float*,
                                         const int32_t*,
                                         const int32_t*,
                                         const float*,
                                         int N,
                                         int R,
                                         int K,
                                         int D) {
    // dy rows read per copy, y_RD read for the gate gradients, dy_RD written
    kernel("moe_combine_backward", act(3.0 * R * D) + 4.0 * (2.0 * R + 3.0 * N * K), 3.0 * R * D);
}
void OpCostBackend::moe_gather_forward_bf16(uint16_t*, const float*, const int32_t*, int R, int, int D) {
    kernel("moe_gather_forward_bf16", act(double(R) * D) + 2.0 * R * D + 4.0 * R);  // bf16 rows written
}
void OpCostBackend::moe_plan_routing(int32_t*, int32_t*, int32_t* counts_E, const int32_t*, int N, int K, int E, int) {
    planned_ = {counts_E, static_cast<int64_t>(N) * K, E};
    // the selection read twice (count, place), row_src and slot_row written, per-tile counts
    const double NK = static_cast<double>(N) * K;
    kernel("moe_plan_routing", 4.0 * (4.0 * NK + 2.0 * E * (NK / 256 + 1)));
}
void OpCostBackend::gather_rows_bf16(uint16_t*, const uint16_t*, const int32_t*, int L, int D) {
    kernel("gather_rows_bf16", 4.0 * L * D + 4.0 * L);  // bf16 rows read and written, indices
}
void OpCostBackend::moe_combine_backward_bf16(uint16_t*,
                                              float*,
                                              const float*,
                                              const float*,
                                              const int32_t*,
                                              const int32_t*,
                                              const float*,
                                              int N,
                                              int R,
                                              int K,
                                              int D) {
    kernel("moe_combine_backward_bf16", act(2.0 * R * D) + 2.0 * R * D + 4.0 * (2.0 * R + 3.0 * N * K), 3.0 * R * D);
}

// ---- optimizer --------------------------------------------------------------------------------------

void OpCostBackend::adamw_update(
    float*, const float*, float*, float*, uint16_t* param16, size_t n, float, float, float, float, float, float, int) {
    // param, m, v read and written; grad read; the bf16 weight copy written
    kernel("adamw_update", (param16 != nullptr ? 30.0 : 28.0) * n, 15.0 * n);
}

// ---- router rows and noise ---------------------------------------------------------------------------

// Every buffer the rows name, once (the stages share one RouterRows, so this counts a stage's
// neighbours' buffers too: an overestimate of an op that is small next to the GEMMs).
void OpCostBackend::router_rows(RouterStage stage, const RouterRows& r) {
    const double N = r.N, E = r.E, SNE = double(r.S) * N * E, NE = N * E;
    double floats = 0.0;
    auto add = [&floats](const void* p, double n) { floats += p != nullptr ? n : 0.0; };
    add(r.ldet_NE, NE), add(r.dmu_NE, NE), add(r.raw_NP, N * r.P), add(r.var_NE, NE), add(r.temp_raw_N, N);
    add(r.members_NME, N * (r.M - 1) * E), add(r.sample_logits_SNE, SNE), add(r.mu_NE, NE), add(r.sigma_NE, NE);
    add(r.chol_NP, N * r.P), add(r.eps_SNE, SNE), add(r.temperature_N, N), add(r.reg_N, N), add(r.member_N, N);
    add(r.sample_logp_SNE, SNE), add(r.sample_probs_SNE, SNE), add(r.log_pbar_NE, NE), add(r.probs_NE, NE);
    add(r.gumbel_NE, NE), add(r.lse_N, N), add(r.topk_idx_NK, N * r.K), add(r.topk_weight_NK, N * r.K);
    add(r.stats_NC, N * (E + static_cast<int>(kStatsExtra))), add(r.dgate_NK, N * r.K), add(r.dl_SNE, SNE),
        add(r.dtemp_N, N);
    add(r.dmu_z_NE, NE), add(r.dldet_NE, NE), add(r.ddmu_NE, NE), add(r.draw_NP, N * r.P), add(r.dvar_NE, NE);
    add(r.dtemp_raw_N, N), add(r.dmembers_NME, N * (r.M - 1) * E);
    static const char* const kNames[] = {"router_sample", "router_select", "router_gate_backward",
                                         "router_family_backward"};
    kernel(kNames[static_cast<int>(stage)], 4.0 * floats, 40.0 * SNE);
}

void OpCostBackend::dropout_mask(float*, int N, int D, const DropoutMaskDraw&) {
    kernel("dropout_mask", 4.0 * N * D, 10.0 * N * D);
}
void OpCostBackend::add_input_noise(float*, const float*, int N, int D, const CounterRng&, uint64_t, float) {
    kernel("add_input_noise", act(3.0 * N * D), 20.0 * N * D);  // RMS pass, then read and write
}
void OpCostBackend::float_to_bf16(uint16_t* out, const float* in, size_t n) {
    // the model re-rounding its bf16 weight copy is a weight copy; any other rounding an activation's
    const ProfiledName op(this, "float_to_bf16");
    kernel(bf16_weight_copy(in, n) == out ? "bf16 copies, weight: the model's weight copy"
                                          : "bf16 copies, activation: float_to_bf16",
           6.0 * n);
}
void OpCostBackend::bf16_to_float(float*, const uint16_t*, size_t n) { kernel("bf16_to_float", 6.0 * n); }

}  // namespace bmoe::model
