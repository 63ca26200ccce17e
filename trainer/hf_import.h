// hf_import.h -- external MoE checkpoints (Hugging Face safetensors layout) -> bmoe tensors.
//
// Name mapping (layer l, expert e; bmoe stacks experts as [E, ...]):
//   Mixtral:   model.layers.l.block_sparse_moe.gate.weight          -> ...block_sparse_moe.gate.weight
//              model.layers.l.block_sparse_moe.experts.e.w1.weight  -> ...experts.w1[e]   (gate proj)
//              model.layers.l.block_sparse_moe.experts.e.w3.weight  -> ...experts.w3[e]   (up proj)
//              model.layers.l.block_sparse_moe.experts.e.w2.weight  -> ...experts.w2[e]   (down proj)
//   OLMoE / Granite-MoE / Qwen-MoE style (per-expert MLP names under `mlp`):
//              model.layers.l.mlp.gate.weight                       -> ...block_sparse_moe.gate.weight
//              model.layers.l.mlp.experts.e.gate_proj.weight        -> ...experts.w1[e]
//              model.layers.l.mlp.experts.e.up_proj.weight          -> ...experts.w3[e]
//              model.layers.l.mlp.experts.e.down_proj.weight        -> ...experts.w2[e]
//   Everything else keeps its name (embeddings, norms, attention, dense MLPs, lm_head), and bmoe's
//   own stacked names are accepted as they are. RoPE: both use the rotate_half convention.
// A tensor with no bmoe counterpart (e.g. OLMoE's q_norm/k_norm, Qwen's shared experts) or a
// missing/misshaped one is a one-line bmoe::Error naming it. F32, F16, BF16 and F64 are read.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "model/config.h"
#include "trainer/run_config.h"

namespace bmoe::trainer {

// Global tensors by bmoe parameter name, for `config` (all experts). `files`: one or more shards.
std::map<std::string, std::vector<float>> import_hf_safetensors(const std::vector<std::string>& files,
                                                                const model::ModelConfig& config);

// `bmoe ckpt import`: the imported weights as a step-0 training checkpoint (zero optimizer
// moments) that `bmoe train --checkpoint.resume=FILE` starts from. Single process.
void write_imported_checkpoint(const std::vector<std::string>& files,
                               const RunConfig& config,
                               const std::string& out_path);

}  // namespace bmoe::trainer
