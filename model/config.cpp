#include "model/config.h"

#include "parallel/check.h"

namespace bmoe::model {

int ModelConfig::num_moe_layers() const {
    int n = 0;
    for (int l = 0; l < num_layers; ++l) n += is_moe_layer(l) ? 1 : 0;
    return n;
}

void ModelConfig::validate() const {
    BMOE_REQUIRE(vocab_size >= 2, "model.vocab_size must be >= 2 (got ", vocab_size, ")");
    BMOE_REQUIRE(max_seq_len >= 1, "model.max_seq_len must be >= 1 (got ", max_seq_len, ")");
    BMOE_REQUIRE(d_model >= 2, "model.d_model must be >= 2 (got ", d_model, ")");
    BMOE_REQUIRE(num_layers >= 1, "model.num_layers must be >= 1 (got ", num_layers, ")");
    BMOE_REQUIRE(num_heads >= 1 && d_model % num_heads == 0, "model.num_heads (", num_heads,
                 ") must be >= 1 and divide model.d_model (", d_model, ")");
    BMOE_REQUIRE(head_dim() % 2 == 0 || position != PositionType::kRope, "head_dim = d_model/num_heads (", head_dim(),
                 ") must be even for RoPE; change model.num_heads or use model.position=learned");
    BMOE_REQUIRE(num_kv_heads >= 1 && num_heads % num_kv_heads == 0, "model.num_kv_heads (", num_kv_heads,
                 ") must be >= 1 and divide model.num_heads (", num_heads, ")");
    BMOE_REQUIRE(num_experts >= 1, "model.num_experts must be >= 1 (got ", num_experts, ")");
    BMOE_REQUIRE(top_k >= 1 && top_k <= num_experts, "model.top_k (", top_k,
                 ") must be between 1 and model.num_experts (", num_experts, ")");
    BMOE_REQUIRE(expert_hidden >= 1, "model.expert_hidden must be >= 1 (got ", expert_hidden, ")");
    BMOE_REQUIRE(moe_every >= 0, "model.moe_every must be >= 0 (0 = no MoE layers, got ", moe_every, ")");
    BMOE_REQUIRE(num_moe_layers() == num_layers || dense_hidden >= 1,
                 "model.dense_hidden must be >= 1 when some layers are dense (got ", dense_hidden, ")");
    BMOE_REQUIRE(norm_eps > 0.0f, "model.norm_eps must be > 0 (got ", norm_eps, ")");
    BMOE_REQUIRE(rope_theta > 0.0f, "model.rope_theta must be > 0 (got ", rope_theta, ")");
    BMOE_REQUIRE(capacity_factor >= 0.0f, "model.capacity_factor must be >= 0 (0 = dropless, got ", capacity_factor,
                 ")");
    BMOE_REQUIRE(init_std > 0.0f, "model.init_std must be > 0 (got ", init_std, ")");
    router.validate();
}

std::string ModelConfig::describe() const {
    return concat(
        "model: vocab ", vocab_size, ", seq ", max_seq_len, ", d_model ", d_model, ", layers ", num_layers, " (",
        num_moe_layers(), " MoE every ", moe_every, "), heads ", num_heads, "/", num_kv_heads, " kv (head_dim ",
        head_dim(), ")\n", "       experts ", num_experts, " top-", top_k, " (hidden ", expert_hidden, ", router ",
        to_string(router.type), ", renormalize ", router_renormalize ? "on" : "off", ", ",
        capacity_factor > 0.0f ? concat("capacity factor ", capacity_factor) : std::string("dropless"), ")",
        num_moe_layers() < num_layers ? concat(", dense hidden ", dense_hidden) : std::string(), ", ", to_string(norm),
        ", ", to_string(position), ", ", to_string(activation), ", ", tie_embeddings ? "tied" : "untied", " LM head");
}

const char* to_string(NormType v) { return v == NormType::kRmsNorm ? "rmsnorm" : "layernorm"; }
const char* to_string(PositionType v) { return v == PositionType::kRope ? "rope" : "learned"; }
const char* to_string(Activation v) { return v == Activation::kSwiGlu ? "swiglu" : "gelu"; }

NormType parse_norm_type(const std::string& s) {
    if (s == "rmsnorm") return NormType::kRmsNorm;
    if (s == "layernorm") return NormType::kLayerNorm;
    throw Error(concat("model.norm must be 'rmsnorm' or 'layernorm' (got '", s, "')"));
}
PositionType parse_position_type(const std::string& s) {
    if (s == "rope") return PositionType::kRope;
    if (s == "learned") return PositionType::kLearned;
    throw Error(concat("model.position must be 'rope' or 'learned' (got '", s, "')"));
}
Activation parse_activation(const std::string& s) {
    if (s == "swiglu") return Activation::kSwiGlu;
    if (s == "gelu") return Activation::kGelu;
    throw Error(concat("model.activation must be 'swiglu' or 'gelu' (got '", s, "')"));
}

}  // namespace bmoe::model
