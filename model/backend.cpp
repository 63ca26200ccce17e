#include "model/backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "model/buffer.h"
#include "model/cpu_backend.h"
#include "parallel/check.h"
#ifdef BMOE_HAVE_CUDA
#include "model/cuda/cuda_backend.h"
#endif

namespace bmoe::model {

void Backend::note_alloc(const void* ptr, size_t bytes) {
    live_bytes_[ptr] = bytes;
    allocated_bytes_ += bytes;
    peak_allocated_bytes_ = std::max(peak_allocated_bytes_, allocated_bytes_);
}

void Backend::note_free(const void* ptr) {
    const auto it = live_bytes_.find(ptr);
    if (it == live_bytes_.end()) return;
    allocated_bytes_ -= it->second;
    live_bytes_.erase(it);
}

const uint16_t* Backend::bf16_weight_copy(const float* x, size_t n) const {
    if (weight_copy_.w16 == nullptr || x == nullptr) return nullptr;
    // integer addresses: x may belong to an unrelated allocation
    const uintptr_t begin = reinterpret_cast<uintptr_t>(weight_copy_.w), at = reinterpret_cast<uintptr_t>(x);
    if (at < begin || (at - begin) / sizeof(float) + n > weight_copy_.n) return nullptr;
    return weight_copy_.w16 + (at - begin) / sizeof(float);
}

void Backend::require_bf16_precision(const char* op) const {
    BMOE_REQUIRE(matmul_precision_ == MatmulPrecision::kBf16, op,
                 " reads or writes bf16 tensors: it needs bf16 matmul precision (set_matmul_precision)");
}

void Backend::require_forward_bf16_pairs(
    const char* op, const void* out, const void* out16, const void* in, const void* in16) {
    BMOE_REQUIRE((out != nullptr) != (out16 != nullptr) && (in != nullptr) != (in16 != nullptr), op,
                 ": give exactly one of out / out16 and one of in / in16");
}

void Backend::require_backward_bf16_pairs(const char* op,
                                          bool din_optional,
                                          const void* din,
                                          const void* din16,
                                          const void* dw,
                                          const void* dout,
                                          const void* dout16,
                                          const void* in,
                                          const void* in16) {
    const bool din_ok = din_optional ? din16 == nullptr : (din != nullptr) != (din16 != nullptr);
    BMOE_REQUIRE((dout != nullptr) != (dout16 != nullptr) && din_ok && (!dw || (in != nullptr) != (in16 != nullptr)),
                 op, ": give exactly one of dout / dout16, ",
                 din_optional ? "din or none (fp32)" : "one of din / din16", ", and one of in / in16 with dw");
}

bool cuda_backend_compiled() {
#ifdef BMOE_HAVE_CUDA
    return true;
#else
    return false;
#endif
}

MatmulPrecision parse_matmul_precision(const std::string& name) {
    if (name == "fp32") return MatmulPrecision::kFp32;
    if (name == "bf16") return MatmulPrecision::kBf16;
    throw Error(concat("matmul precision '", name, "' is unknown: use fp32 or bf16"));
}

namespace {
// q, k, v widened from bf16 into temporary fp32 buffers of `be` (the attention ops' defaults)
struct WidenedQkv {
    WidenedQkv(Backend* be, const uint16_t* q16, const uint16_t* k16, const uint16_t* v16, size_t nq, size_t nkv)
        : q(be, nq), k(be, nkv), v(be, nkv) {
        be->bf16_to_float(q.data(), q16, nq);
        be->bf16_to_float(k.data(), k16, nkv);
        be->bf16_to_float(v.data(), v16, nkv);
    }
    Buffer<float> q, k, v;
};
}  // namespace

void Backend::attention_forward_bf16(float* out_BTHd,
                                     float* att_BHTT,
                                     const uint16_t* q16_BTHd,
                                     const uint16_t* k16_BTKVHd,
                                     const uint16_t* v16_BTKVHd,
                                     int B,
                                     int T,
                                     int H,
                                     int KV,
                                     int Hd) {
    require_bf16_precision("attention_forward_bf16");
    const size_t nq = static_cast<size_t>(B) * T * H * Hd, nkv = static_cast<size_t>(B) * T * KV * Hd;
    const WidenedQkv x(this, q16_BTHd, k16_BTKVHd, v16_BTKVHd, nq, nkv);
    attention_forward(out_BTHd, att_BHTT, x.q.data(), x.k.data(), x.v.data(), B, T, H, KV, Hd);
}

void Backend::attention_backward_bf16(uint16_t* dq16_BTHd,
                                      uint16_t* dk16_BTKVHd,
                                      uint16_t* dv16_BTKVHd,
                                      const float* dout_BTHd,
                                      const float* out_BTHd,
                                      const uint16_t* q16_BTHd,
                                      const uint16_t* k16_BTKVHd,
                                      const uint16_t* v16_BTKVHd,
                                      const float* att_BHTT,
                                      int B,
                                      int T,
                                      int H,
                                      int KV,
                                      int Hd) {
    require_bf16_precision("attention_backward_bf16");
    const size_t nq = static_cast<size_t>(B) * T * H * Hd, nkv = static_cast<size_t>(B) * T * KV * Hd;
    const WidenedQkv x(this, q16_BTHd, k16_BTKVHd, v16_BTKVHd, nq, nkv);
    Buffer<float> dq(this, nq), dk(this, nkv), dv(this, nkv);
    attention_backward(dq.data(), dk.data(), dv.data(), dout_BTHd, out_BTHd, x.q.data(), x.k.data(), x.v.data(),
                       att_BHTT, B, T, H, KV, Hd);
    float_to_bf16(dq16_BTHd, dq.data(), nq);
    float_to_bf16(dk16_BTKVHd, dk.data(), nkv);
    float_to_bf16(dv16_BTKVHd, dv.data(), nkv);
}

bool env_switch(const char* env_name, const char* on, const char* off) {
    const char* v = std::getenv(env_name);
    if (v == nullptr || std::strcmp(v, "1") == 0) return true;
    if (std::strcmp(v, "0") == 0) return false;
    throw Error(concat(env_name, "='", v, "' is not a switch: set it to 1 (the default, ", on, ") or 0 (", off,
                       ", for A/B runs)"));
}

bool bf16_mode_default(const char* env_name) { return env_switch(env_name, "bf16", "fp32"); }

std::string to_string(MatmulPrecision p) { return p == MatmulPrecision::kBf16 ? "bf16" : "fp32"; }

AttentionKernel parse_attention_kernel(const std::string& name) {
    if (name == "gemm") return AttentionKernel::kGemm;
    if (name == "flash") return AttentionKernel::kFlash;
    throw Error(concat("attention kernel '", name, "' is unknown: use gemm or flash"));
}

std::string to_string(AttentionKernel k) { return k == AttentionKernel::kFlash ? "flash" : "gemm"; }

void Backend::set_attention_kernel(AttentionKernel k) {
    BMOE_REQUIRE(k == AttentionKernel::kGemm, "the flash attention kernel runs on the cuda backend only (this is '",
                 name(), "'): use --train.attention=gemm");
    attention_kernel_ = k;
}

std::unique_ptr<Backend> make_backend(const std::string& name, int local_rank) {
    if (name == "cpu") return std::make_unique<CpuBackend>();
    if (name == "cuda") {
#ifdef BMOE_HAVE_CUDA
        return make_cuda_backend(local_rank);  // throws with a hint when no device is visible
#else
        throw Error("--backend=cuda: this bmoe was built without CUDA; rebuild with nvcc installed (-DBMOE_CUDA=ON)");
#endif
    }
    throw Error(concat("unknown backend '", name, "': use --backend=cpu or --backend=cuda"));
}

}  // namespace bmoe::model
