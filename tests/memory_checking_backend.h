// memory_checking_backend.h -- a CpuBackend that checks each op's pointers are backend memory of the right size.
//
// On the CUDA backend a host pointer, or a backend buffer shorter than the op touches, is an illegal address or a
// silent overrun, and there is no GPU in CI. This backend records its allocations and, in every op that takes backend
// pointers, checks that each non-null pointer lies inside ONE live allocation with room for the elements the op
// reads or writes (the shapes of model/backend.h). It records "op: arg" in `violations` for each that does not and
// skips that op (run on the CPU, a short buffer would corrupt the heap and crash the test before it reports);
// otherwise it runs the op. Pointers backend.h documents as host memory (upload's source, grouped GEMM offsets) are
// not checked. Operands whose row count is no size argument (embedding table, gather sources) must hold every row the
// op's indices address (read here: backend memory is host RAM). A GEMM weight read through a bf16 weight copy
// (Backend::set_bf16_weight_copy) must equal the weights rounded now: a stale copy is a violation too.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "model/cpu_backend.h"

namespace bmoe::model {

class MemoryCheckingBackend : public CpuBackend {
  public:
    // The bf16 attention ops (Backend's widening defaults) run where a model without RoPE trains in bf16,
    // as on a GPU with the flash kernel, so their temporaries are checked too.
    bool attention_reads_bf16(int) const override { return true; }

    // act_as_device: is_host() says false, so callers treat its buffers as device memory, as with
    // CUDA (communicators stage them through host copies instead of reading them directly).
    explicit MemoryCheckingBackend(bool act_as_device = false) : act_as_device_(act_as_device) {}
    bool is_host() const override { return !act_as_device_; }

    std::vector<std::string> violations;  // "op: arg", in call order
    std::set<std::string> checked_ops;    // every op called (what a test covered)

    void* alloc(size_t bytes) override {
        void* p = CpuBackend::alloc(bytes);
        live_[static_cast<const char*>(p)] = bytes;  // the bytes asked for, not CpuBackend's rounded size
        return p;
    }
    void free(void* ptr) override {
        live_.erase(static_cast<const char*>(ptr));
        CpuBackend::free(ptr);
    }

    // ---- memory ---------------------------------------------------------------------------------
    void upload(void* dst, const void* src_host, size_t bytes) override {
        if (check("upload", {{"dst", as_bytes(dst), bytes}})) CpuBackend::upload(dst, src_host, bytes);
    }
    void download(void* dst_host, const void* src, size_t bytes) override {
        if (check("download", {{"src", as_bytes(src), bytes}})) CpuBackend::download(dst_host, src, bytes);
    }
    void copy(void* dst, const void* src, size_t bytes) override {
        if (check("copy", {{"dst", as_bytes(dst), bytes}, {"src", as_bytes(src), bytes}}))
            CpuBackend::copy(dst, src, bytes);
    }
    void zero(void* ptr, size_t bytes) override {
        if (check("zero", {{"ptr", as_bytes(ptr), bytes}})) CpuBackend::zero(ptr, bytes);
    }

    // ---- elementwise ----------------------------------------------------------------------------
    void add(float* out, const float* a, const float* b, size_t n) override {
        if (check("add", {{"out", out, n}, {"a", a, n}, {"b", b, n}})) CpuBackend::add(out, a, b, n);
    }
    void accumulate(float* out, const float* a, size_t n) override {
        if (check("accumulate", {{"out", out, n}, {"a", a, n}})) CpuBackend::accumulate(out, a, n);
    }
    void scale(float* x, float s, size_t n) override {
        if (check("scale", {{"x", x, n}})) CpuBackend::scale(x, s, n);
    }
    void mul(float* out, const float* a, const float* b, size_t n) override {
        if (check("mul", {{"out", out, n}, {"a", a, n}, {"b", b, n}})) CpuBackend::mul(out, a, b, n);
    }
    double sum_squares(const float* x, size_t n) override {
        return check("sum_squares", {{"x", x, n}}) ? CpuBackend::sum_squares(x, n) : NAN;
    }

    // ---- dense and grouped GEMMs ----------------------------------------------------------------
    void matmul_forward(float* out, const float* in, const float* w, const float* bias, int N, int I, int O) override {
        if (check(
                "matmul_forward",
                {{"out", out, numel(N, O)}, {"in", in, numel(N, I)}, {"w", w, numel(O, I)}, {"bias", bias, numel(O)}}))
            CpuBackend::matmul_forward(out, in, w, bias, N, I, O);
    }
    void matmul_backward(float* din,
                         float* dw,
                         float* dbias,
                         const float* dout,
                         const float* in,
                         const float* w,
                         int N,
                         int I,
                         int O,
                         bool accumulate_din) override {
        if (check("matmul_backward", {{"din", din, numel(N, I)},
                                      {"dw", dw, numel(O, I)},
                                      {"dbias", dbias, numel(O)},
                                      {"dout", dout, numel(N, O)},
                                      {"in", in, numel(N, I)},
                                      {"w", w, numel(O, I)}}))
            CpuBackend::matmul_backward(din, dw, dbias, dout, in, w, N, I, O, accumulate_din);
    }
    // R = offsets_host[G] (host memory, read here, never checked as backend memory).
    void grouped_matmul_forward(
        float* out, const float* in, const float* w, const int* offsets_host, int G, int I, int O) override {
        const int R = offsets_host[G];
        if (check("grouped_matmul_forward",
                  {{"out", out, numel(R, O)}, {"in", in, numel(R, I)}, {"w", w, numel(G, O, I)}}))
            CpuBackend::grouped_matmul_forward(out, in, w, offsets_host, G, I, O);
    }
    void grouped_matmul_backward(float* din,
                                 float* dw,
                                 const float* dout,
                                 const float* in,
                                 const float* w,
                                 const int* offsets_host,
                                 int G,
                                 int I,
                                 int O) override {
        const int R = offsets_host[G];
        if (check("grouped_matmul_backward", {{"din", din, numel(R, I)},
                                              {"dw", dw, numel(G, O, I)},
                                              {"dout", dout, numel(R, O)},
                                              {"in", in, numel(R, I)},
                                              {"w", w, numel(G, O, I)}}))
            CpuBackend::grouped_matmul_backward(din, dw, dout, in, w, offsets_host, G, I, O);
    }

    // Of each operand pair the non-null one is checked (backend.h: exactly one is given).
    void grouped_matmul_forward_bf16(float* out,
                                     uint16_t* out16,
                                     const float* in,
                                     const uint16_t* in16,
                                     const float* w,
                                     const int* offsets_host,
                                     int G,
                                     int I,
                                     int O) override {
        const int R = offsets_host[G];
        if (check("grouped_matmul_forward_bf16", {{"out", out, numel(R, O)},
                                                  {"out16", out16, numel(R, O)},
                                                  {"in", in, numel(R, I)},
                                                  {"in16", in16, numel(R, I)},
                                                  {"w", w, numel(G, O, I)}}))
            CpuBackend::grouped_matmul_forward_bf16(out, out16, in, in16, w, offsets_host, G, I, O);
    }
    void grouped_matmul_backward_bf16(float* din,
                                      uint16_t* din16,
                                      float* dw,
                                      const float* dout,
                                      const uint16_t* dout16,
                                      const float* in,
                                      const uint16_t* in16,
                                      const float* w,
                                      const int* offsets_host,
                                      int G,
                                      int I,
                                      int O) override {
        const int R = offsets_host[G];
        if (check("grouped_matmul_backward_bf16", {{"din", din, numel(R, I)},
                                                   {"din16", din16, numel(R, I)},
                                                   {"dw", dw, numel(G, O, I)},
                                                   {"dout", dout, numel(R, O)},
                                                   {"dout16", dout16, numel(R, O)},
                                                   {"in", dw ? in : nullptr, numel(R, I)},
                                                   {"in16", dw ? in16 : nullptr, numel(R, I)},
                                                   {"w", w, numel(G, O, I)}}))
            CpuBackend::grouped_matmul_backward_bf16(din, din16, dw, dout, dout16, in, in16, w, offsets_host, G, I, O);
    }

    // ---- embeddings (table rows: as many as the largest token addresses; V is no argument) --------
    void embedding_forward(float* out, const int32_t* tokens, const float* table, int N, int D) override {
        const size_t V = rows_addressed("embedding_forward", "tokens", tokens, N, 1, false);
        if (check("embedding_forward",
                  {{"out", out, numel(N, D)}, {"tokens", tokens, numel(N)}, {"table", table, V * D}}))
            CpuBackend::embedding_forward(out, tokens, table, N, D);
    }
    void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int N, int D) override {
        const size_t V = rows_addressed("embedding_backward", "tokens", tokens, N, 1, false);
        if (check("embedding_backward",
                  {{"dtable", dtable, V * D}, {"dout", dout, numel(N, D)}, {"tokens", tokens, numel(N)}}))
            CpuBackend::embedding_backward(dtable, dout, tokens, N, D);
    }
    // positions t < T of the [S, D] table
    void position_forward(float* x, const float* wpe, int B, int T, int D) override {
        if (check("position_forward", {{"x", x, numel(B, T, D)}, {"wpe", wpe, numel(T, D)}}))
            CpuBackend::position_forward(x, wpe, B, T, D);
    }
    void position_backward(float* dwpe, const float* dx, int B, int T, int D) override {
        if (check("position_backward", {{"dwpe", dwpe, numel(T, D)}, {"dx", dx, numel(B, T, D)}}))
            CpuBackend::position_backward(dwpe, dx, B, T, D);
    }

    // ---- norms ----------------------------------------------------------------------------------
    void rmsnorm_forward(float* out, float* rstd, const float* in, const float* w, int N, int D, float eps) override {
        if (check("rmsnorm_forward",
                  {{"out", out, numel(N, D)}, {"rstd", rstd, numel(N)}, {"in", in, numel(N, D)}, {"w", w, numel(D)}}))
            CpuBackend::rmsnorm_forward(out, rstd, in, w, N, D, eps);
    }
    void rmsnorm_backward(float* din,
                          float* dw,
                          const float* dout,
                          const float* in,
                          const float* w,
                          const float* rstd,
                          int N,
                          int D) override {
        if (check("rmsnorm_backward", {{"din", din, numel(N, D)},
                                       {"dw", dw, numel(D)},
                                       {"dout", dout, numel(N, D)},
                                       {"in", in, numel(N, D)},
                                       {"w", w, numel(D)},
                                       {"rstd", rstd, numel(N)}}))
            CpuBackend::rmsnorm_backward(din, dw, dout, in, w, rstd, N, D);
    }
    void layernorm_forward(
        float* out, float* mean, float* rstd, const float* in, const float* w, const float* b, int N, int D, float eps)
        override {
        if (check("layernorm_forward", {{"out", out, numel(N, D)},
                                        {"mean", mean, numel(N)},
                                        {"rstd", rstd, numel(N)},
                                        {"in", in, numel(N, D)},
                                        {"w", w, numel(D)},
                                        {"b", b, numel(D)}}))
            CpuBackend::layernorm_forward(out, mean, rstd, in, w, b, N, D, eps);
    }
    void rmsnorm_forward_bf16(
        uint16_t* out16, float* rstd, const float* in, const float* w, int N, int D, float eps) override {
        if (check(
                "rmsnorm_forward_bf16",
                {{"out16", out16, numel(N, D)}, {"rstd", rstd, numel(N)}, {"in", in, numel(N, D)}, {"w", w, numel(D)}}))
            CpuBackend::rmsnorm_forward_bf16(out16, rstd, in, w, N, D, eps);
    }
    void layernorm_forward_bf16(uint16_t* out16,
                                float* mean,
                                float* rstd,
                                const float* in,
                                const float* w,
                                const float* b,
                                int N,
                                int D,
                                float eps) override {
        if (check("layernorm_forward_bf16", {{"out16", out16, numel(N, D)},
                                             {"mean", mean, numel(N)},
                                             {"rstd", rstd, numel(N)},
                                             {"in", in, numel(N, D)},
                                             {"w", w, numel(D)},
                                             {"b", b, numel(D)}}))
            CpuBackend::layernorm_forward_bf16(out16, mean, rstd, in, w, b, N, D, eps);
    }
    void layernorm_backward(float* din,
                            float* dw,
                            float* db,
                            const float* dout,
                            const float* in,
                            const float* w,
                            const float* mean,
                            const float* rstd,
                            int N,
                            int D) override {
        if (check("layernorm_backward", {{"din", din, numel(N, D)},
                                         {"dw", dw, numel(D)},
                                         {"db", db, numel(D)},
                                         {"dout", dout, numel(N, D)},
                                         {"in", in, numel(N, D)},
                                         {"w", w, numel(D)},
                                         {"mean", mean, numel(N)},
                                         {"rstd", rstd, numel(N)}}))
            CpuBackend::layernorm_backward(din, dw, db, dout, in, w, mean, rstd, N, D);
    }

    // ---- attention ------------------------------------------------------------------------------
    void rope_forward(float* x, int B, int T, int nh, int Hd, float theta) override {
        if (check("rope_forward", {{"x", x, numel(B, T, nh, Hd)}})) CpuBackend::rope_forward(x, B, T, nh, Hd, theta);
    }
    void rope_backward(float* dx, int B, int T, int nh, int Hd, float theta) override {
        if (check("rope_backward", {{"dx", dx, numel(B, T, nh, Hd)}}))
            CpuBackend::rope_backward(dx, B, T, nh, Hd, theta);
    }
    void attention_forward(
        float* out, float* att, const float* q, const float* k, const float* v, int B, int T, int H, int KV, int Hd)
        override {
        if (check("attention_forward", {{"out", out, numel(B, T, H, Hd)},
                                        {"att", att, attention_saved_numel(B, T, H, Hd)},
                                        {"q", q, numel(B, T, H, Hd)},
                                        {"k", k, numel(B, T, KV, Hd)},
                                        {"v", v, numel(B, T, KV, Hd)}}))
            CpuBackend::attention_forward(out, att, q, k, v, B, T, H, KV, Hd);
    }
    void attention_backward(float* dq,
                            float* dk,
                            float* dv,
                            const float* dout,
                            const float* out,
                            const float* q,
                            const float* k,
                            const float* v,
                            const float* att,
                            int B,
                            int T,
                            int H,
                            int KV,
                            int Hd) override {
        const size_t q_n = numel(B, T, H, Hd), kv_n = numel(B, T, KV, Hd);
        if (check("attention_backward", {{"dq", dq, q_n},
                                         {"dk", dk, kv_n},
                                         {"dv", dv, kv_n},
                                         {"dout", dout, q_n},
                                         {"out", out, q_n},
                                         {"q", q, q_n},
                                         {"k", k, kv_n},
                                         {"v", v, kv_n},
                                         {"att", att, attention_saved_numel(B, T, H, Hd)}}))
            CpuBackend::attention_backward(dq, dk, dv, dout, out, q, k, v, att, B, T, H, KV, Hd);
    }

    // ---- activations ----------------------------------------------------------------------------
    void swiglu_forward(float* out, const float* gate, const float* up, size_t n) override {
        if (check("swiglu_forward", {{"out", out, n}, {"gate", gate, n}, {"up", up, n}}))
            CpuBackend::swiglu_forward(out, gate, up, n);
    }
    void swiglu_backward(
        float* dgate, float* dup, const float* dout, const float* gate, const float* up, size_t n) override {
        if (check("swiglu_backward",
                  {{"dgate", dgate, n}, {"dup", dup, n}, {"dout", dout, n}, {"gate", gate, n}, {"up", up, n}}))
            CpuBackend::swiglu_backward(dgate, dup, dout, gate, up, n);
    }
    void gelu_forward_bf16(uint16_t* out16, const uint16_t* in16, size_t n) override {
        if (check("gelu_forward_bf16", {{"out16", out16, n}, {"in16", in16, n}}))
            CpuBackend::gelu_forward_bf16(out16, in16, n);
    }
    void swiglu_forward_bf16(uint16_t* out16, const uint16_t* gate16, const uint16_t* up16, size_t n) override {
        if (check("swiglu_forward_bf16", {{"out16", out16, n}, {"gate16", gate16, n}, {"up16", up16, n}}))
            CpuBackend::swiglu_forward_bf16(out16, gate16, up16, n);
    }
    void gelu_backward_bf16(uint16_t* din16, const uint16_t* dout16, const uint16_t* in16, size_t n) override {
        if (check("gelu_backward_bf16", {{"din16", din16, n}, {"dout16", dout16, n}, {"in16", in16, n}}))
            CpuBackend::gelu_backward_bf16(din16, dout16, in16, n);
    }
    void swiglu_backward_bf16(uint16_t* dgate16,
                              uint16_t* dup16,
                              const uint16_t* dout16,
                              const uint16_t* gate16,
                              const uint16_t* up16,
                              size_t n) override {
        if (check("swiglu_backward_bf16", {{"dgate16", dgate16, n},
                                           {"dup16", dup16, n},
                                           {"dout16", dout16, n},
                                           {"gate16", gate16, n},
                                           {"up16", up16, n}}))
            CpuBackend::swiglu_backward_bf16(dgate16, dup16, dout16, gate16, up16, n);
    }
    void gelu_forward(float* out, const float* in, size_t n) override {
        if (check("gelu_forward", {{"out", out, n}, {"in", in, n}})) CpuBackend::gelu_forward(out, in, n);
    }
    void gelu_backward(float* din, const float* dout, const float* in, size_t n) override {
        if (check("gelu_backward", {{"din", din, n}, {"dout", dout, n}, {"in", in, n}}))
            CpuBackend::gelu_backward(din, dout, in, n);
    }

    // ---- loss -----------------------------------------------------------------------------------
    void cross_entropy_forward(
        float* loss, float* probs, const float* logits, const int32_t* targets, int N, int V) override {
        if (check("cross_entropy_forward", {{"loss", loss, numel(N)},
                                            {"probs", probs, numel(N, V)},
                                            {"logits", logits, numel(N, V)},
                                            {"targets", targets, numel(N)}}))
            CpuBackend::cross_entropy_forward(loss, probs, logits, targets, N, V);
    }
    void cross_entropy_backward(
        float* dlogits, const float* probs, const int32_t* targets, float dloss, int N, int V) override {
        if (check("cross_entropy_backward",
                  {{"dlogits", dlogits, numel(N, V)}, {"probs", probs, numel(N, V)}, {"targets", targets, numel(N)}}))
            CpuBackend::cross_entropy_backward(dlogits, probs, targets, dloss, N, V);
    }

    // ---- the bf16 dense GEMMs (of each operand pair the non-null one is checked), the loss on bf16 logits
    void matmul_forward_bf16(float* out,
                             uint16_t* out16,
                             const float* in,
                             const uint16_t* in16,
                             const float* w,
                             int N,
                             int I,
                             int O) override {
        if (check("matmul_forward_bf16", {{"out", out, numel(N, O)},
                                          {"out16", out16, numel(N, O)},
                                          {"in", in, numel(N, I)},
                                          {"in16", in16, numel(N, I)},
                                          {"w", w, numel(O, I)}}))
            CpuBackend::matmul_forward_bf16(out, out16, in, in16, w, N, I, O);
    }
    void matmul_backward_bf16(float* din,
                              float* dw,
                              const float* dout,
                              const uint16_t* dout16,
                              const float* in,
                              const uint16_t* in16,
                              const float* w,
                              int N,
                              int I,
                              int O,
                              bool accumulate_din) override {
        if (check("matmul_backward_bf16", {{"din", din, numel(N, I)},
                                           {"dw", dw, numel(O, I)},
                                           {"dout", dout, numel(N, O)},
                                           {"dout16", dout16, numel(N, O)},
                                           {"in", dw ? in : nullptr, numel(N, I)},
                                           {"in16", dw ? in16 : nullptr, numel(N, I)},
                                           {"w", w, numel(O, I)}}))
            CpuBackend::matmul_backward_bf16(din, dw, dout, dout16, in, in16, w, N, I, O, accumulate_din);
    }
    void cross_entropy_forward_bf16(
        float* loss, float* lse, const uint16_t* logits16, const int32_t* targets, int N, int V) override {
        if (check("cross_entropy_forward_bf16", {{"loss", loss, numel(N)},
                                                 {"lse", lse, numel(N)},
                                                 {"logits16", logits16, numel(N, V)},
                                                 {"targets", targets, numel(N)}}))
            CpuBackend::cross_entropy_forward_bf16(loss, lse, logits16, targets, N, V);
    }
    void cross_entropy_backward_bf16(uint16_t* dlogits16,
                                     const uint16_t* logits16,
                                     const float* lse,
                                     const int32_t* targets,
                                     float dloss,
                                     int N,
                                     int V) override {
        if (check("cross_entropy_backward_bf16", {{"dlogits16", dlogits16, numel(N, V)},
                                                  {"logits16", logits16, numel(N, V)},
                                                  {"lse", lse, numel(N)},
                                                  {"targets", targets, numel(N)}}))
            CpuBackend::cross_entropy_backward_bf16(dlogits16, logits16, lse, targets, dloss, N, V);
    }

    // ---- MoE router and token permutation -------------------------------------------------------
    void router_topk_forward(float* probs,
                             float* lse,
                             int32_t* idx,
                             float* weight,
                             const float* logits,
                             int N,
                             int E,
                             int K,
                             bool renormalize) override {
        if (check("router_topk_forward", {{"probs", probs, numel(N, E)},
                                          {"lse", lse, numel(N)},
                                          {"idx", idx, numel(N, K)},
                                          {"weight", weight, numel(N, K)},
                                          {"logits", logits, numel(N, E)}}))
            CpuBackend::router_topk_forward(probs, lse, idx, weight, logits, N, E, K, renormalize);
    }
    void router_topk_backward(float* dlogits,
                              const float* dweight,
                              const float* probs,
                              const float* lse,
                              const int32_t* idx,
                              const float* weight,
                              const float* aux,
                              float z,
                              int N,
                              int E,
                              int K,
                              bool renormalize) override {
        if (check("router_topk_backward", {{"dlogits", dlogits, numel(N, E)},
                                           {"dweight", dweight, numel(N, K)},
                                           {"probs", probs, numel(N, E)},
                                           {"lse", lse, numel(N)},
                                           {"idx", idx, numel(N, K)},
                                           {"weight", weight, numel(N, K)},
                                           {"aux", aux, numel(E)}}))
            CpuBackend::router_topk_backward(dlogits, dweight, probs, lse, idx, weight, aux, z, N, E, K, renormalize);
    }
    // The gathered-from side has no size argument: rows up to the largest row_src / K (tokens) or
    // slot_row (routed rows, -1 = dropped copy) the op reads.
    void moe_gather_forward(float* x_RD, const float* x_ND, const int32_t* row_src, int R, int K, int D) override {
        const size_t N = rows_addressed("moe_gather_forward", "row_src", row_src, R, K, false);
        if (check("moe_gather_forward", {{"x_RD", x_RD, numel(R, D)}, {"x_ND", x_ND, N * D}, {"row_src", row_src, R}}))
            CpuBackend::moe_gather_forward(x_RD, x_ND, row_src, R, K, D);
    }
    void moe_gather_backward(float* dx_ND, const float* dx_RD, const int32_t* slot_row, int N, int K, int D) override {
        const size_t R = rows_addressed("moe_gather_backward", "slot_row", slot_row, numel(N, K), 1, true);
        if (check("moe_gather_backward",
                  {{"dx_ND", dx_ND, numel(N, D)}, {"dx_RD", dx_RD, R * D}, {"slot_row", slot_row, numel(N, K)}}))
            CpuBackend::moe_gather_backward(dx_ND, dx_RD, slot_row, N, K, D);
    }
    void moe_combine_forward(
        float* y_ND, const float* y_RD, const int32_t* slot_row, const float* weight, int N, int K, int D) override {
        const size_t R = rows_addressed("moe_combine_forward", "slot_row", slot_row, numel(N, K), 1, true);
        if (check("moe_combine_forward", {{"y_ND", y_ND, numel(N, D)},
                                          {"y_RD", y_RD, R * D},
                                          {"slot_row", slot_row, numel(N, K)},
                                          {"topk_weight", weight, numel(N, K)}}))
            CpuBackend::moe_combine_forward(y_ND, y_RD, slot_row, weight, N, K, D);
    }
    // Sizes are arguments here; the indices may still address beyond them (an overrun too).
    void moe_combine_backward(float* dy_RD,
                              float* dweight,
                              const float* dy_ND,
                              const float* y_RD,
                              const int32_t* row_src,
                              const int32_t* slot_row,
                              const float* weight,
                              int N,
                              int R,
                              int K,
                              int D) override {
        if (check_combine_backward("moe_combine_backward", {"dy_RD", dy_RD, numel(R, D)}, dweight, dy_ND, y_RD, row_src,
                                   slot_row, weight, N, R, K, D))
            CpuBackend::moe_combine_backward(dy_RD, dweight, dy_ND, y_RD, row_src, slot_row, weight, N, R, K, D);
    }
    void moe_gather_forward_bf16(
        uint16_t* x16_RD, const float* x_ND, const int32_t* row_src, int R, int K, int D) override {
        const size_t N = rows_addressed("moe_gather_forward_bf16", "row_src", row_src, R, K, false);
        if (check("moe_gather_forward_bf16",
                  {{"x16_RD", x16_RD, numel(R, D)}, {"x_ND", x_ND, N * D}, {"row_src", row_src, R}}))
            CpuBackend::moe_gather_forward_bf16(x16_RD, x_ND, row_src, R, K, D);
    }
    void moe_plan_routing(int32_t* row_src,
                          int32_t* slot_row,
                          int32_t* counts,
                          const int32_t* idx,
                          int N,
                          int K,
                          int E,
                          int capacity) override {
        if (check("moe_plan_routing", {{"row_src", row_src, numel(N, K)},
                                       {"slot_row", slot_row, numel(N, K)},
                                       {"counts", counts, static_cast<size_t>(E)},
                                       {"topk_idx", idx, numel(N, K)}}))
            CpuBackend::moe_plan_routing(row_src, slot_row, counts, idx, N, K, E, capacity);
    }
    void gather_rows_bf16(uint16_t* out16_LD, const uint16_t* in16_RD, const int32_t* src, int L, int D) override {
        const size_t R = rows_addressed("gather_rows_bf16", "src", src, L, 1, false);
        if (check("gather_rows_bf16",
                  {{"out16_LD", out16_LD, numel(L, D)}, {"in16_RD", in16_RD, R * D}, {"src", src, L}}))
            CpuBackend::gather_rows_bf16(out16_LD, in16_RD, src, L, D);
    }
    void moe_combine_backward_bf16(uint16_t* dy16_RD,
                                   float* dweight,
                                   const float* dy_ND,
                                   const float* y_RD,
                                   const int32_t* row_src,
                                   const int32_t* slot_row,
                                   const float* weight,
                                   int N,
                                   int R,
                                   int K,
                                   int D) override {
        if (check_combine_backward("moe_combine_backward_bf16", {"dy16_RD", dy16_RD, numel(R, D)}, dweight, dy_ND, y_RD,
                                   row_src, slot_row, weight, N, R, K, D))
            CpuBackend::moe_combine_backward_bf16(dy16_RD, dweight, dy_ND, y_RD, row_src, slot_row, weight, N, R, K, D);
    }

    // ---- optimizer ------------------------------------------------------------------------------
    void adamw_update(float* param,
                      const float* grad,
                      float* m,
                      float* v,
                      uint16_t* param16,
                      size_t n,
                      float lr,
                      float beta1,
                      float beta2,
                      float eps,
                      float weight_decay,
                      float grad_scale,
                      int step) override {
        if (check("adamw_update",
                  {{"param", param, n}, {"grad", grad, n}, {"m", m, n}, {"v", v, n}, {"param16", param16, n}}))
            CpuBackend::adamw_update(param, grad, m, v, param16, n, lr, beta1, beta2, eps, weight_decay, grad_scale,
                                     step);
    }

    // ---- router families' per-token math --------------------------------------------------------
    void router_rows(RouterStage stage, const RouterRows& r) override {
        const size_t N = r.N, NE = N * r.E, SNE = r.S * NE, NP = N * r.P, NK = N * r.K;
        const size_t NME = N * (r.M - 1) * r.E, violations_before = violations.size();
        check("router_rows", {{"ldet", r.ldet_NE, NE},
                              {"dmu", r.dmu_NE, NE},
                              {"raw", r.raw_NP, NP},
                              {"var", r.var_NE, NE},
                              {"temp_raw", r.temp_raw_N, N},
                              {"members", r.members_NME, NME},
                              {"sample_logits", r.sample_logits_SNE, SNE},
                              {"mu", r.mu_NE, NE},
                              {"sigma", r.sigma_NE, NE},
                              {"chol", r.chol_NP, NP},
                              {"eps", r.eps_SNE, SNE},
                              {"temperature", r.temperature_N, N},
                              {"reg", r.reg_N, N},
                              {"member", r.member_N, N},
                              {"selection_bias", r.selection_bias_E, r.E},
                              {"sample_logp", r.sample_logp_SNE, SNE},
                              {"sample_probs", r.sample_probs_SNE, SNE},
                              {"log_pbar", r.log_pbar_NE, NE},
                              {"probs", r.probs_NE, NE},
                              {"gumbel", r.gumbel_NE, NE},
                              {"lse", r.lse_N, N},
                              {"topk_idx", r.topk_idx_NK, NK},
                              {"topk_weight", r.topk_weight_NK, NK},
                              {"stats", r.stats_NC, N * (r.E + kStatsExtra)},
                              {"dgate", r.dgate_NK, NK},
                              {"aux_dprobs", r.aux_dprobs_E, r.E},
                              {"dl", r.dl_SNE, SNE},
                              {"dtemp", r.dtemp_N, N},
                              {"dmu_z", r.dmu_z_NE, NE},
                              {"dldet", r.dldet_NE, NE},
                              {"ddmu", r.ddmu_NE, NE},
                              {"draw", r.draw_NP, NP},
                              {"dvar", r.dvar_NE, NE},
                              {"dtemp_raw", r.dtemp_raw_N, N},
                              {"dmembers", r.dmembers_NME, NME}});
        // What each stage reads must exist (a null here is a null dereference on the device).
        const bool select_ready = r.sample_logits_SNE && r.sample_logp_SNE && r.sample_probs_SNE && r.log_pbar_NE &&
                                  r.probs_NE && r.lse_N && r.topk_idx_NK && r.topk_weight_NK && r.stats_NC && r.mu_NE;
        if (stage != RouterStage::kSample && !select_ready) violations.push_back("router_rows: select buffers missing");
        if (stage == RouterStage::kGateBackward && !(r.dgate_NK && r.dl_SNE && r.dmu_z_NE))
            violations.push_back("router_rows: gate backward buffers missing");
        if (stage == RouterStage::kFamilyBackward && !r.dldet_NE)
            violations.push_back("router_rows: family backward buffers missing");
        if (violations.size() == violations_before) CpuBackend::router_rows(stage, r);
    }

    // ---- router noise and bf16 transport --------------------------------------------------------
    void dropout_mask(float* mask, int N, int D, const DropoutMaskDraw& draw) override {
        if (check("dropout_mask", {{"mask", mask, numel(N, D)}})) CpuBackend::dropout_mask(mask, N, D, draw);
    }
    void add_input_noise(
        float* out, const float* x, int N, int D, const CounterRng& rng, uint64_t counter0, float scale) override {
        if (check("add_input_noise", {{"out", out, numel(N, D)}, {"x", x, numel(N, D)}}))
            CpuBackend::add_input_noise(out, x, N, D, rng, counter0, scale);
    }
    void float_to_bf16(uint16_t* out, const float* in, size_t n) override {
        if (check("float_to_bf16", {{"out", out, n}, {"in", in, n}})) CpuBackend::float_to_bf16(out, in, n);
    }
    void bf16_to_float(float* out, const uint16_t* in, size_t n) override {
        if (check("bf16_to_float", {{"out", out, n}, {"in", in, n}})) CpuBackend::bf16_to_float(out, in, n);
    }

  private:
    bool act_as_device_;
    // One pointer argument: its name and the bytes the op touches from it.
    struct Extent {
        const char* name;
        const void* ptr;
        size_t bytes;
        template <typename T, typename Count>
        Extent(const char* arg, const T* p, Count count)
            : name(arg), ptr(p), bytes(static_cast<size_t>(count) * sizeof(T)) {}
    };

    // moe_combine_backward's operands (either d-row type): (token, slot) copies row_src addresses;
    // dy_ND holds ceil(copies / K) token rows of them.
    bool check_combine_backward(const char* op,
                                Extent dy_rows,
                                const float* dweight,
                                const float* dy_ND,
                                const float* y_RD,
                                const int32_t* row_src,
                                const int32_t* slot_row,
                                const float* weight,
                                int N,
                                int R,
                                int K,
                                int D) {
        const size_t src_copies = std::max(numel(N, K), rows_addressed(op, "row_src", row_src, R, 1, false));
        const size_t rows = std::max(numel(R), rows_addressed(op, "slot_row", slot_row, numel(N, K), 1, true));
        return check(op, {dy_rows,
                          {"dtopk_weight", dweight, numel(N, K)},
                          {"dy_ND", dy_ND, (src_copies + K - 1) / K * D},
                          {"y_RD", y_RD, rows * D},
                          {"row_src", row_src, numel(R)},
                          {"slot_row", slot_row, numel(N, K)},
                          {"topk_weight", weight, src_copies}});
    }

    // Elements of a tensor of these dimensions (a negative one wraps to a huge count: a violation).
    template <typename... Dims>
    static size_t numel(Dims... dims) {
        return (size_t{1} * ... * static_cast<size_t>(dims));
    }
    static const char* as_bytes(const void* p) { return static_cast<const char*>(p); }

    // Whether [ptr, ptr + bytes) lies inside one live allocation.
    bool inside(const void* ptr, size_t bytes) const {
        const char* p = static_cast<const char*>(ptr);
        auto it = live_.upper_bound(p);
        if (it == live_.begin()) return false;
        --it;
        const size_t offset = static_cast<size_t>(p - it->first);
        return offset <= it->second && bytes <= it->second - offset;
    }
    // Records "op: arg" for every non-null argument outside one live allocation (or shorter than it touches).
    // Returns whether the op may run (no violation, no bad index): on the CPU a short buffer would corrupt the heap
    // and crash the test before it reports.
    bool check(const char* op, std::initializer_list<Extent> args) {
        checked_ops.insert(op);
        const size_t violations_before = violations.size();
        for (const Extent& a : args)
            if (a.ptr != nullptr && a.bytes > 0 && !inside(a.ptr, a.bytes))
                violations.push_back(std::string(op) + ": " + a.name);
        if (violations.size() == violations_before && std::string(op).find("matmul") != std::string::npos)
            for (const Extent& a : args) check_weight_copy(op, a);
        return !std::exchange(bad_index_, false) && violations.size() == violations_before;
    }
    // A GEMM operand read through the model's bf16 weight copy (Backend::set_bf16_weight_copy) must
    // be the weights as they are now, rounded: a copy not re-rounded after a write is a violation.
    void check_weight_copy(const char* op, const Extent& a) {
        if (matmul_precision() != MatmulPrecision::kBf16 || a.ptr == nullptr) return;
        const float* w = static_cast<const float*>(a.ptr);  // only fp32 weights lie in the copy's block
        const size_t n = a.bytes / sizeof(float);
        const uint16_t* w16 = bf16_weight_copy(w, n);
        if (w16 == nullptr) return;
        for (size_t i = 0; i < n; ++i)
            if (w16[i] != bf16_bits(w[i])) {
                violations.push_back(std::string(op) + ": " + a.name + " (stale bf16 weight copy)");
                return;
            }
    }
    // Rows an operand needs for the n indices the op reads: 1 + max(idx / per_row). A negative index is a
    // violation unless the op skips it (dropped copies, -1); unreadable indices give 0 (check() reports them).
    size_t rows_addressed(
        const char* op, const char* arg, const int32_t* idx, size_t n, int per_row, bool skips_negative) {
        if (idx == nullptr || !inside(idx, n * sizeof(int32_t))) return 0;
        size_t rows = 0;
        bool negative = false;
        for (size_t i = 0; i < n; ++i) {
            if (idx[i] < 0)
                negative = negative || !skips_negative;
            else
                rows = std::max(rows, static_cast<size_t>(idx[i] / per_row) + 1);
        }
        if (negative) violations.push_back(std::string(op) + ": " + arg + " (negative index)");
        bad_index_ = bad_index_ || negative;
        return rows;
    }

    std::map<const char*, size_t> live_;  // start -> bytes asked for
    bool bad_index_ = false;              // rows_addressed() saw a negative index for the op being checked
};

}  // namespace bmoe::model
