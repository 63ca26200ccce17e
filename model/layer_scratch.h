// layer_scratch.h -- LayerScratch: the buffers a layer needs only while it runs (mostly its
// backward), shared by every layer of a Model. Layers run one after another on one stream, so one
// copy per model serves them all; kept per layer they cost L copies (gpt2-moe at 8 x 1024 tokens:
// ~5 GB). Buffers grow to the largest layer's need (Buffer::ensure) and stay.
#pragma once

#include "model/buffer.h"

namespace bmoe::model {

struct LayerScratch {
    // GroupedMlp backward: d activation and d pre-activations [R, F] (bf16 with bf16 activation
    // storage), SwiGLU's second dx [R, D]
    Buffer<float> mlp_dact_RF, mlp_dh_up_RF, mlp_dh_gate_RF, mlp_dx_RD;
    Buffer<uint16_t> mlp_dact16_RF, mlp_dh_up16_RF, mlp_dh_gate16_RF;
    // GroupedMlp with activation recompute: the activation [R, F], in forward and again in backward
    // (bf16 when stored as bf16), and the input rows rounded to bf16 [R, D]
    Buffer<float> mlp_act_RF;
    Buffer<uint16_t> mlp_act16_RF, mlp_x16_RD;
    // MoeBlock backward: d rows [R, D] around the experts, and this rank's share of them (EP)
    Buffer<float> moe_dy_RD, moe_dx_RD, moe_dy_local, moe_dx_local;
    // the d rows in bf16 (MoeBlock::set_bf16_gemm_inputs), and this rank's share of them (EP)
    Buffer<uint16_t> moe_dy16_RD, moe_dy16_local;
    // MoeBlock forward (EP): the gathered rows until dispatched, and this rank's experts' outputs
    // until they are sent back
    Buffer<float> moe_x_RD, moe_y_local;
    // MoeBlock forward (EP): the received rows, where the experts keep their own bf16 copy of them
    Buffer<float> moe_x_local;
    // MoeBlock forward (EP, bf16 GEMM inputs and exchange): the gathered rows in bf16 until dispatched
    Buffer<uint16_t> moe_x16_RD;
    // Router temporaries, redrawn or recomputed in backward: mc_dropout's mask and x * mask, or
    // weight_mfvi's x * x [N, D]; d trunk [N, max(D, hidden)]
    Buffer<float> router_mask_ND, router_x_ND, router_dtrunk;
};

}  // namespace bmoe::model
