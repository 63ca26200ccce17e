// params.h -- ParameterLayout: every model parameter as a named slice of ONE flat fp32 block.
//
// A flat block makes gradient all-reduce, AdamW, clipping and checkpointing one pointer and one
// length (llm.c). Names follow the Hugging Face Mixtral layout so external checkpoints map 1:1:
//   model.embed_tokens.weight                         [V, D]
//   model.embed_positions.weight                      [S, D]   (position = learned only)
//   model.layers.{l}.input_layernorm.{weight,bias}    [D]      (bias: layernorm only)
//   model.layers.{l}.self_attn.{q,k,v,o}_proj.weight  q [H*Hd, D], k/v [KV*Hd, D], o [D, H*Hd]
//   model.layers.{l}.post_attention_layernorm.{weight,bias}
//   MoE layer:   model.layers.{l}.block_sparse_moe.gate.weight     [E, D]     (router)
//                model.layers.{l}.block_sparse_moe.router.*        variational router tensors (by router.type,
//                                                                   see RouterTensors below and docs/routers.md)
//                model.layers.{l}.block_sparse_moe.experts.w1      [E, F, D]  (gate proj; swiglu only)
//                model.layers.{l}.block_sparse_moe.experts.w3      [E, F, D]  (up proj)
//                model.layers.{l}.block_sparse_moe.experts.w2      [E, D, F]  (down proj)
//   Dense layer: model.layers.{l}.mlp.{gate_proj [Fd, D] (swiglu only), up_proj [Fd, D], down_proj [D, Fd]}
//   model.norm.{weight,bias}                          [D]
//   lm_head.weight                                    [V, D]   (absent when tied)
// Experts are stored stacked ([E, ...]) with the global expert id as the leading index. Under
// expert parallelism a rank holds experts [first_expert, first_expert + num_local_experts) only;
// every element is initialised from its GLOBAL index, so any sharding starts from the same model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace bmoe::model {

// Which ranks share a parameter's gradient (used by the data/expert-parallel all-reduce).
enum class ParamGroup {
    kDense,   // replicated on every rank: attention, norms, embeddings, LM head
    kRouter,  // replicated on every rank, but the router family may treat it specially
    kExpert,  // sharded over the expert-parallel group by leading [E] index
};

enum class ParamInit {
    kNormal,        // N(0, init_std)
    kNormalScaled,  // N(0, init_std / sqrt(2 * num_layers)): residual output projections (GPT-2)
    kOnes,          // norm weights
    kZeros,         // biases
    kConstant,      // every element = init_value
    kCholeskyDiag,  // packed lower-triangular [E(E+1)/2]: init_value on the diagonal, 0 elsewhere
};

struct ParamInfo {
    std::string name;
    std::vector<int64_t> shape;         // local shape (experts: [num_local_experts, ...])
    std::vector<int64_t> global_shape;  // shape across all ranks (experts: [E, ...])
    size_t global_offset = 0;           // index of this rank's first element in the global tensor
    size_t offset = 0;                  // in floats, into the flat block
    size_t numel = 0;
    bool weight_decay = true;  // false for norms and biases (1-D tensors)
    ParamGroup group = ParamGroup::kDense;
    ParamInit init = ParamInit::kNormal;
    float init_value = 0.0f;     // kConstant / kCholeskyDiag
    bool variance_head = false;  // router variance/temperature head: trained at optim.router_variance_lr_scale * lr
    bool trainable = true;       // false: frozen (no optimizer state, gradient not synced or applied)
    // When backward finishes this tensor's gradient (Model::set_gradients_ready_hook): num_layers
    // for the final norm and LM head, l for layer l's tensors, -1 for the embeddings (a tied LM
    // head shares the token embedding, so it is final only there).
    int backward_stage = -1;
};

// Typed views into a flat block (params or grads): nullptr where the config has no such tensor.
struct LayerTensors {
    float* attn_norm_w = nullptr;  // [D]
    float* attn_norm_b = nullptr;  // [D]
    float* wq = nullptr;           // [H*Hd, D]
    float* wk = nullptr;           // [KV*Hd, D]
    float* wv = nullptr;           // [KV*Hd, D]
    float* wo = nullptr;           // [D, H*Hd]
    float* ffn_norm_w = nullptr;   // [D]
    float* ffn_norm_b = nullptr;   // [D]
    float* router_w = nullptr;     // [E, D]            MoE layers: deterministic router l_det = x W^T
    // variational router tensors (nullptr unless the router type has them; r = router.hidden,
    // P = E(E+1)/2, M = router.ensemble_size)
    float* router_ensemble_w = nullptr;  // [M-1, E, D]  ensemble members 1..M-1 (member 0 is router_w)
    float* router_rho = nullptr;         // [E, D]       weight_mfvi: sigma = softplus(rho)
    float* router_trunk_w = nullptr;     // [r, D]       logit_mf/fc: z = gelu(x A^T)
    float* router_mean_w = nullptr;      // [E, r]       logit_mf/fc: dmu = z B_mu^T (zero init)
    float* router_scale_w = nullptr;     // [E, r] | [P, r]  logit_mf: sigma head | logit_fc: Cholesky head
    float* router_scale_b = nullptr;     // [E] | [P]
    float* router_temp_w = nullptr;      // [1, D]       vtsr temperature head
    float* router_temp_b = nullptr;      // [1]
    float* ffn_gate = nullptr;           // [E, F, D] | [Fd, D]  (swiglu only)
    float* ffn_up = nullptr;             // [E, F, D] | [Fd, D]
    float* ffn_down = nullptr;           // [E, D, F] | [D, Fd]
};

struct ModelTensors {
    float* tok_emb = nullptr;       // [V, D]
    float* pos_emb = nullptr;       // [S, D]
    float* final_norm_w = nullptr;  // [D]
    float* final_norm_b = nullptr;  // [D]
    float* lm_head = nullptr;       // [V, D]  (== tok_emb when tied)
    std::vector<LayerTensors> layers;
};

class ParameterLayout {
  public:
    // first_expert/num_local_experts: this rank's slice of every expert tensor (-1: all experts).
    explicit ParameterLayout(const ModelConfig& config, int first_expert = 0, int num_local_experts = -1);

    const std::vector<ParamInfo>& params() const { return params_; }
    size_t total_numel() const { return total_numel_; }
    // Index of the parameter with this name, or -1.
    int find(const std::string& name) const;
    // Views of a flat block laid out by this layout. trainable_only: frozen tensors get nullptr (the
    // gradient views: backward skips their gradients, see backend.h).
    ModelTensors views(float* block, bool trainable_only = false) const;
    // Deterministic initialisation of a host copy of the block (same seed -> same bits).
    std::vector<float> init_host(uint64_t seed) const;
    // Number of parameters a token touches (top-k experts instead of all): for FLOP counts.
    size_t active_matmul_params() const;
    // Freezes every tensor whose name matches none of the ECMAScript regexes (searched anywhere in
    // the name); an empty list makes everything trainable. Returns the number of trainable tensors;
    // throws bmoe::Error for an invalid regex or a list that matches nothing.
    int set_trainable(const std::vector<std::string>& patterns);
    int first_expert() const { return first_expert_; }
    int num_local_experts() const { return num_local_experts_; }

  private:
    void add(const std::string& name, std::vector<int64_t> shape, ParamGroup group, ParamInit init);
    ModelConfig config_;
    int first_expert_ = 0, num_local_experts_ = 0;
    int stage_ = -1;  // backward_stage of the tensors add() appends
    std::vector<ParamInfo> params_;
    size_t total_numel_ = 0;
};

}  // namespace bmoe::model
