#include "model/moe_block.h"

#include <cmath>

namespace bmoe::model {

MoeBlock::MoeBlock(const ModelConfig& config, Backend* backend)
    : config_(config), backend_(backend), experts_(backend, config.activation, config.d_model, config.expert_hidden) {}

MoeLayerStats MoeBlock::forward(float* out_ND, const float* x_ND, const LayerTensors& w, int N) {
    const int D = config_.d_model, E = config_.num_experts, K = config_.top_k;
    N_ = N;
    logits_NE_.ensure(backend_, static_cast<size_t>(N) * E);
    probs_NE_.ensure(backend_, static_cast<size_t>(N) * E);
    lse_N_.ensure(backend_, N);
    topk_idx_NK_.ensure(backend_, static_cast<size_t>(N) * K);
    topk_weight_NK_.ensure(backend_, static_cast<size_t>(N) * K);

    // 1. route
    backend_->matmul_forward(logits_NE_.data(), x_ND, w.router_w, nullptr, N, D, E);
    backend_->router_topk_forward(probs_NE_.data(), lse_N_.data(), topk_idx_NK_.data(), topk_weight_NK_.data(),
                                  logits_NE_.data(), N, E, K, config_.router_renormalize);

    // 2. plan the permutation on the host (N*K ints down, R + N*K ints up)
    std::vector<int32_t> idx_host(static_cast<size_t>(N) * K);
    backend_->download(idx_host.data(), topk_idx_NK_.data(), idx_host.size() * sizeof(int32_t));
    plan_ = plan_routing(idx_host.data(), N, K, E);
    const int R = plan_.num_rows();
    row_src_R_.ensure(backend_, R);
    slot_row_NK_.ensure(backend_, idx_host.size());
    if (R > 0) backend_->upload(row_src_R_.data(), plan_.row_src.data(), R * sizeof(int32_t));
    backend_->upload(slot_row_NK_.data(), plan_.slot_row.data(), plan_.slot_row.size() * sizeof(int32_t));

    // 3. gather -> experts -> combine
    x_RD_.ensure(backend_, static_cast<size_t>(R) * D);
    y_RD_.ensure(backend_, static_cast<size_t>(R) * D);
    backend_->moe_gather_forward(x_RD_.data(), x_ND, row_src_R_.data(), R, K, D);
    MlpWeights mw{w.ffn_gate, w.ffn_up, w.ffn_down};
    experts_.forward(y_RD_.data(), x_RD_.data(), mw, plan_.expert_offsets);
    backend_->moe_combine_forward(out_ND, y_RD_.data(), slot_row_NK_.data(), topk_weight_NK_.data(), N, K, D);

    // 4. auxiliary losses (host: E + N floats)
    std::vector<float> probs_host(static_cast<size_t>(N) * E), lse_host(N);
    backend_->download(probs_host.data(), probs_NE_.data(), probs_host.size() * sizeof(float));
    backend_->download(lse_host.data(), lse_N_.data(), lse_host.size() * sizeof(float));
    MoeLayerStats stats;
    stats.tokens_per_expert = plan_.tokens_per_expert;
    stats.num_dropped = plan_.num_dropped;
    aux_dprobs_host_.assign(E, 0.0f);
    for (int e = 0; e < E; ++e) {
        double P = 0.0;
        for (int n = 0; n < N; ++n) P += probs_host[static_cast<size_t>(n) * E + e];
        P /= N;
        const double f = static_cast<double>(plan_.tokens_per_expert[e]) / (static_cast<double>(N) * K);
        stats.aux_loss += E * f * P;
        aux_dprobs_host_[e] = static_cast<float>(E * f / N);
    }
    for (int n = 0; n < N; ++n) stats.z_loss += static_cast<double>(lse_host[n]) * lse_host[n];
    stats.z_loss /= N;
    return stats;
}

void MoeBlock::backward(float* dx_ND, const LayerTensors& dw, const float* dout_ND, const float* x_ND,
                        const LayerTensors& w, float aux_weight, float z_weight) {
    const int N = N_, D = config_.d_model, E = config_.num_experts, K = config_.top_k, R = plan_.num_rows();
    dy_RD_.ensure(backend_, static_cast<size_t>(R) * D);
    dx_RD_.ensure(backend_, static_cast<size_t>(R) * D);
    dtopk_weight_NK_.ensure(backend_, static_cast<size_t>(N) * K);
    dlogits_NE_.ensure(backend_, static_cast<size_t>(N) * E);
    aux_dprobs_E_.ensure(backend_, E);

    backend_->moe_combine_backward(dy_RD_.data(), dtopk_weight_NK_.data(), dout_ND, y_RD_.data(), row_src_R_.data(),
                                   slot_row_NK_.data(), topk_weight_NK_.data(), N, R, K, D);
    MlpWeights mw{w.ffn_gate, w.ffn_up, w.ffn_down};
    MlpGrads mg{dw.ffn_gate, dw.ffn_up, dw.ffn_down};
    experts_.backward(dx_RD_.data(), mg, dy_RD_.data(), x_RD_.data(), mw);
    backend_->zero(dx_ND, static_cast<size_t>(N) * D * sizeof(float));
    backend_->moe_gather_backward(dx_ND, dx_RD_.data(), slot_row_NK_.data(), N, K, D);

    std::vector<float> aux_dprobs(E);
    for (int e = 0; e < E; ++e) aux_dprobs[e] = aux_weight * aux_dprobs_host_[e];
    backend_->upload(aux_dprobs_E_.data(), aux_dprobs.data(), E * sizeof(float));
    backend_->router_topk_backward(dlogits_NE_.data(), dtopk_weight_NK_.data(), probs_NE_.data(), lse_N_.data(),
                                   topk_idx_NK_.data(), topk_weight_NK_.data(), aux_dprobs_E_.data(),
                                   z_weight / static_cast<float>(N), N, E, K, config_.router_renormalize);
    backend_->matmul_backward(dx_ND, dw.router_w, nullptr, dlogits_NE_.data(), x_ND, w.router_w, N, D, E,
                              /*accumulate_din=*/true);
}

}  // namespace bmoe::model
