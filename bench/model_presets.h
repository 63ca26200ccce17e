// model_presets.h -- the benchmark models (bench_train, bench_roofline) and their model FLOPs.
//
//   default : the comparison model of bench/run_bench.sh (vocab 256, seq 256, batch 8, d 256,
//             4 layers, 4 heads, 8 experts top-2, expert hidden 512, SwiGLU, RMSNorm, RoPE)
//   gpt2-moe: GPT-2-small-sized MoE (vocab 50304, seq 1024, batch 8, d 768, 12 layers, 12 heads,
//             8 experts top-2, expert hidden 3072, GELU, LayerNorm, learned positions, tied)
//   large   : a card-filling MoE (vocab 50304, seq 2048, batch 4, d 1536, 8 layers, 12 heads,
//             8 experts top-2, expert hidden 6144, SwiGLU, RMSNorm, RoPE; ~2B parameters:
//             ~32 GB of fp32 weights, gradients and moments, plus activations)
#pragma once

#include <string>

#include "model/config.h"
#include "model/params.h"
#include "parallel/check.h"

namespace bmoe::bench {

// The preset's config; B and T get its batch and sequence length. Throws bmoe::Error for an unknown name.
inline model::ModelConfig model_preset(const std::string& name, int& B, int& T) {
    using namespace bmoe::model;
    ModelConfig c;  // every field set explicitly so the presets cannot drift with the defaults
    c.moe_every = 1;
    c.num_experts = 8;
    c.top_k = 2;
    if (name == "default") {
        c.vocab_size = 256, c.d_model = 256, c.num_layers = 4, c.num_heads = 4, c.expert_hidden = 512;
        c.tie_embeddings = false, c.norm = NormType::kRmsNorm, c.position = PositionType::kRope;
        c.activation = Activation::kSwiGlu;
        B = 8, T = 256;
    } else if (name == "gpt2-moe") {
        c.vocab_size = 50304, c.d_model = 768, c.num_layers = 12, c.num_heads = 12, c.expert_hidden = 3072;
        c.tie_embeddings = true, c.norm = NormType::kLayerNorm, c.position = PositionType::kLearned;
        c.activation = Activation::kGelu;
        B = 8, T = 1024;
    } else if (name == "large") {
        c.vocab_size = 50304, c.d_model = 1536, c.num_layers = 8, c.num_heads = 12, c.expert_hidden = 6144;
        c.tie_embeddings = false, c.norm = NormType::kRmsNorm, c.position = PositionType::kRope;
        c.activation = Activation::kSwiGlu;
        B = 4, T = 2048;
    } else {
        throw Error("unknown --model '" + name + "': use default, gpt2-moe or large");
    }
    c.num_kv_heads = c.num_heads;
    c.max_seq_len = T;
    return c;
}

// Model FLOPs per trained token, PaLM-style: matmul FLOPs of the active parameters (forward and
// backward) plus the attention scores. MFU = tokens/s * this / the card's peak.
inline double model_flops_per_token(const model::ModelConfig& c, const model::ParameterLayout& layout, int T) {
    return 6.0 * static_cast<double>(layout.active_matmul_params()) + 12.0 * c.num_layers * T * c.d_model;
}

}  // namespace bmoe::bench
