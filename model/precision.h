// precision.h -- matmul precision: fp32, or bf16 inputs with fp32 accumulation and output.
//
// Mixed precision in bmoe (Megatron/torch.autocast style, for the GEMMs that dominate the FLOPs):
// weights, gradients and optimizer moments stay fp32 (the master copy), activations fp32 except as below; with
// kBf16 the dense and expert GEMMs (matmul_* and grouped_matmul_* ops) round their two inputs to
// bf16 and accumulate in fp32 -- bf16 tensor cores on GPUs (bf16 copies rounded to nearest-even,
// then cuBLAS bf16 x bf16 -> fp32), an exact emulation on the CPU (the same rounding, then sgemm).
// Router GEMMs and all router/KL math stay fp32 (Router holds a ScopedMatmulPrecision): the
// uncertainty terms are precision-sensitive. Attention scores, norms, softmax and losses compute in
// fp32. Under kBf16, tensors only GEMMs read may be stored as bf16 (the expert MLP's tensors, the
// model's weight copy, a training step's logits, the norms' outputs ahead of Q/K/V and the LM head,
// the MoE rows, q/k/v for the flash kernel): docs/design.md, "Precision".
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace bmoe::model {

enum class MatmulPrecision { kFp32, kBf16 };

// "fp32" | "bf16"; throws a one-line bmoe::Error naming the valid values otherwise.
MatmulPrecision parse_matmul_precision(const std::string& name);
std::string to_string(MatmulPrecision p);

// The bf16 bit pattern nearest to x (ties to even). NaN stays a (quiet) NaN; values beyond the
// bf16 range round to +-Inf like a hardware conversion.
inline uint16_t bf16_bits(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0)
        return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

// The float with bf16 bit pattern b (exact).
inline float bf16_to_float(uint16_t b) {
    const uint32_t bits = static_cast<uint32_t>(b) << 16;
    float y;
    std::memcpy(&y, &bits, sizeof(y));
    return y;
}

// x rounded to the nearest bf16 (ties to even), returned as a float.
inline float round_to_bf16(float x) { return bf16_to_float(bf16_bits(x)); }

// An A/B switch's default: on, unless the environment sets env_name to "0"; a value other than 0
// or 1 is a one-line bmoe::Error naming both (`on` and `off` say what they select).
bool env_switch(const char* env_name, const char* on, const char* off);
// A bf16 storage mode's default: env_switch(env_name, "bf16", "fp32").
bool bf16_mode_default(const char* env_name);

}  // namespace bmoe::model
