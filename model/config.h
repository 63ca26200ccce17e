// config.h -- ModelConfig: the shape of a bmoe MoE transformer, validated once.
//
// The defaults describe Mixtral/OLMoE-shaped models (RMSNorm, RoPE, grouped-query attention,
// SwiGLU experts, softmax top-k router). GPT-2 style pieces (LayerNorm, learned positions, GELU)
// are options. Every field is also a CLI flag / TOML key under [model] (see trainer/run_config).
#pragma once

#include <string>

#include "model/router_config.h"

namespace bmoe::model {

enum class NormType { kRmsNorm, kLayerNorm };
enum class PositionType { kRope, kLearned };
enum class Activation { kSwiGlu, kGelu };

struct ModelConfig {
    int vocab_size = 256;         // byte-level tokenizer by default
    int max_seq_len = 256;        // longest sequence (learned positions table size; RoPE has no limit)
    int d_model = 256;            // D
    int num_layers = 4;           // L
    int num_heads = 4;            // H query heads; head_dim = D / H
    int num_kv_heads = 4;         // KV heads (grouped-query attention); must divide H
    int num_experts = 8;          // E routed experts per MoE layer
    int top_k = 2;                // K experts per token
    int expert_hidden = 512;      // F hidden width of each expert
    int moe_every = 1;            // layer l is MoE when (l % moe_every) == moe_every - 1; others dense FFN
    int dense_hidden = 1024;      // hidden width of the dense FFN layers
    bool tie_embeddings = false;  // LM head shares the token embedding
    NormType norm = NormType::kRmsNorm;
    PositionType position = PositionType::kRope;
    Activation activation = Activation::kSwiGlu;  // experts and dense FFN
    float norm_eps = 1e-5f;
    float rope_theta = 10000.0f;
    bool router_renormalize = true;  // gates = top-k probs / their sum (Mixtral, OLMoE); else raw probs
    // Expert capacity = ceil(capacity_factor * N * K / E) copies per expert and micro-batch (N =
    // this rank's tokens); copies beyond it are dropped (in token order) and the token passes
    // through the residual. 0 = dropless (default): every copy is computed.
    float capacity_factor = 0.0f;
    RouterConfig router;     // router family of every MoE layer ([router] section)
    float init_std = 0.02f;  // N(0, init_std) for weights; output projections scaled by 1/sqrt(2L)

    int head_dim() const { return d_model / num_heads; }
    bool is_moe_layer(int layer) const { return moe_every > 0 && layer % moe_every == moe_every - 1; }
    int num_moe_layers() const;

    // Throws bmoe::Error naming the bad field and how to fix it.
    void validate() const;
    // Multi-line human readable summary (printed at start of training).
    std::string describe() const;
};

// String <-> enum, for config files and CLI; parse_* throw bmoe::Error on unknown names.
const char* to_string(NormType v);
const char* to_string(PositionType v);
const char* to_string(Activation v);
NormType parse_norm_type(const std::string& s);
PositionType parse_position_type(const std::string& s);
Activation parse_activation(const std::string& s);

}  // namespace bmoe::model
