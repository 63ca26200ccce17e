#include "model/moe_block.h"

#include <cmath>
#include <memory>
#include <numeric>

#include "model/rng.h"
#include "parallel/check.h"

namespace bmoe::model {

MoeBlock::MoeBlock(
    const ModelConfig& config, Backend* backend, const ParallelContext& parallel, int layer, LayerScratch* scratch)
    : config_(config),
      backend_(backend),
      parallel_(parallel),
      router_(config, backend, layer, scratch),
      layer_(layer),
      scratch_(scratch),
      experts_(backend, config.activation, config.d_model, config.expert_hidden, scratch) {
    if (parallel_.expert_parallel())
        expert_exchange_ = std::make_unique<ExpertExchange>(
            parallel_.ep_rows != nullptr ? *parallel_.ep_rows : *parallel_.ep, config.num_experts, backend,
            /*force_staging=*/false, /*counts=*/parallel_.ep);  // counts stay on the host communicator
}

// Rows leave for their experts' ranks after routing and come back before combine; on one rank
// (or EP = 1) the experts run directly on x_RD.
void MoeBlock::run_experts_forward(const LayerTensors& w) {
    const int D = config_.d_model;
    const MlpWeights mw{w.ffn_gate, w.ffn_up, w.ffn_down};
    if (!expert_exchange_) {  // x_rows() null: the rows were gathered into the experts' bf16 copy
        experts_.forward(y_RD_.data(), gather16_ ? nullptr : x_rows().data(), mw, plan_.expert_offsets);
        return;
    }
    if (experts_.keeps_input()) x_local_ = Buffer<float>();  // an earlier mode's saved rows
    const parallel::DispatchHandle& h = expert_exchange_->plan(plan_.expert_offsets);
    const float* x_local = nullptr;  // null: the rows arrive in bf16 in the experts' own copy
    if (gather16_) {
        expert_exchange_->forward(scratch_->moe_x16_RD.data(), D, experts_.input16_rows(h.num_local_rows()));
    } else {  // the received rows: kept for backward, or shared scratch where the experts keep a bf16 copy
        Buffer<float>& rows = experts_.keeps_input() ? scratch_->moe_x_local : x_local_;
        expert_exchange_->forward(x_rows().data(), D, rows, bf16_rows());
        x_local = rows.data();
    }
    count_exchange_rows();
    Buffer<float>& y_local = scratch_->moe_y_local;
    y_local.ensure(backend_, static_cast<size_t>(h.num_local_rows()) * D);
    experts_.forward(y_local.data(), x_local, mw, h.local_expert_offsets);
    expert_exchange_->combine(y_local.data(), D, y_RD_.data(), bf16_returns());
}

ExchangeStats MoeBlock::take_exchange_stats() {
    ExchangeStats s = exchange_;
    if (expert_exchange_) {
        s.seconds = expert_exchange_->take_seconds();
        s.bytes_sent = static_cast<double>(expert_exchange_->take_bytes_sent());
    }
    exchange_ = {};
    return s;
}

// The gathered rows: saved for the experts' backward on one rank; shared scratch where backward
// does not read them: with expert parallelism (backward reads the received copy, x_local_), with
// recompute (gathered again in backward), and where the experts keep their own bf16 copy.
Buffer<float>& MoeBlock::x_rows() {
    return expert_exchange_ || recompute_ || experts_.keeps_input() ? scratch_->moe_x_RD : x_RD_;
}

void MoeBlock::set_recompute_activation(bool on) {
    experts_.set_recompute_activation(on);
    recompute_ = on;
    if (on) x_RD_ = Buffer<float>();  // not kept any more
}

bool MoeBlock::dy_rows16() const { return bf16_gemm_inputs_ && experts_.stores_bf16() && rows16_reach_experts(); }

bool MoeBlock::rows16_reach_experts() const { return !expert_exchange_ || (bf16_rows() && config_.d_model % 2 == 0); }

bool MoeBlock::bf16_rows() const {
    return parallel_.exchange_bf16 && backend_->matmul_precision() == MatmulPrecision::kBf16;
}

bool MoeBlock::bf16_returns() const {
    return parallel_.combine_bf16 && backend_->matmul_precision() == MatmulPrecision::kBf16;
}

void MoeBlock::count_exchange_rows() {
    const int P = parallel_.ep->size(), me = parallel_.ep->rank(), K = config_.top_k;
    const int experts_per_rank = config_.num_experts / P;
    const parallel::DispatchHandle& h = expert_exchange_->handle();
    for (int p = 0; p < P; ++p) exchange_.rows_sent += p == me ? 0 : h.send_rows[p];
    const std::vector<int32_t>& idx_host = router_.topk_idx_host();
    std::vector<int> seen(P, -1);  // last token that sent to rank p
    for (int n = 0; n < N_; ++n)
        for (int k = 0; k < K; ++k) {
            const size_t i = static_cast<size_t>(n) * K + k;
            const int p = idx_host[i] / experts_per_rank;
            if (plan_.slot_row[i] < 0 || p == me || seen[p] == n) continue;
            seen[p] = n;
            ++exchange_.min_rows_sent;
            // x, y, dy, dx of that row (x and dy as bf16 where bf16_rows(), y and dx where
            // bf16_returns(), for even D)
            const bool even = config_.d_model % 2 == 0;
            const int bytes = (bf16_rows() && even ? 4 : 8) + (bf16_returns() && even ? 4 : 8);
            exchange_.min_bytes += static_cast<double>(config_.d_model) * bytes;
        }
}

// scratch d rows: dy_RD -> dx_RD, the mirror image of run_experts_forward (same handle, same exchanges).
void MoeBlock::run_experts_backward(const LayerTensors& dw, const LayerTensors& w) {
    const int D = config_.d_model;
    const MlpWeights mw{w.ffn_gate, w.ffn_up, w.ffn_down};
    const MlpGrads mg{dw.ffn_gate, dw.ffn_up, dw.ffn_down};
    if (!expert_exchange_) {
        const bool dy16 = dy_rows16();
        experts_.backward(scratch_->moe_dx_RD.data(), mg, dy16 ? nullptr : scratch_->moe_dy_RD.data(),
                          dy16 ? scratch_->moe_dy16_RD.data() : nullptr, gather16_ ? nullptr : x_rows().data(), mw);
        return;
    }
    const size_t L = static_cast<size_t>(expert_exchange_->handle().num_local_rows());
    Buffer<float>& dx_local = scratch_->moe_dx_local;
    dx_local.ensure(backend_, L * D);
    const float* x_local = x_local_.data();  // null where the experts keep a bf16 copy (not read)
    if (dy_rows16()) {                       // the d rows leave in bf16 as the combine's backward wrote them
        Buffer<uint16_t>& dy16_local = scratch_->moe_dy16_local;
        dy16_local.ensure(backend_, L * D);
        expert_exchange_->forward(scratch_->moe_dy16_RD.data(), D, dy16_local.data());
        experts_.backward(dx_local.data(), mg, nullptr, dy16_local.data(), x_local, mw);
    } else {
        Buffer<float>& dy_local = scratch_->moe_dy_local;
        expert_exchange_->forward(scratch_->moe_dy_RD.data(), D, dy_local, bf16_rows());
        experts_.backward(dx_local.data(), mg, dy_local.data(), nullptr, x_local, mw);
    }
    expert_exchange_->combine(dx_local.data(), D, scratch_->moe_dx_RD.data(), bf16_returns());
}

// x + input_noise * RMS(x_n) * eps, eps ~ N(0, 1) keyed by (seed, layer, global token id, feature).
const float* MoeBlock::add_input_noise(const float* x_ND, int N, const RoutingContext& ctx) {
    BMOE_REQUIRE(!ctx.training, "RoutingContext.input_noise is for evaluation only (set training = false)");
    const int D = config_.d_model;
    const CounterRng rng(ctx.seed ^ 0x5eed0f1a9e11ULL, mix64(static_cast<uint64_t>(layer_)));
    x_noisy_.ensure(backend_, static_cast<size_t>(N) * D);
    backend_->add_input_noise(x_noisy_.data(), x_ND, N, D, rng, static_cast<uint64_t>(ctx.first_token) * D,
                              ctx.input_noise);
    return x_noisy_.data();
}

MoeLayerStats MoeBlock::forward(
    float* out_ND, const float* x_ND, const LayerTensors& w, int N, const RoutingContext& ctx) {
    const int D = config_.d_model, E = config_.num_experts, K = config_.top_k;
    N_ = N;
    if (ctx.input_noise > 0.0f) x_ND = add_input_noise(x_ND, N, ctx);

    // 1. route (all routing noise is drawn here, before any exchange)
    router_.forward(x_ND, w, N, ctx);

    // 2. plan the permutation: on the backend, where only the E counts come to the host (a GPU
    // idles while the host plans); on the host under expert parallelism, whose exchange statistics
    // read every selection (R + N*K ints up), or where BMOE_DEVICE_ROUTING_PLAN=0
    const int capacity = config_.capacity_factor > 0.0f
                             ? static_cast<int>(std::ceil(config_.capacity_factor * N * K / static_cast<double>(E)))
                             : -1;
    const size_t NK = static_cast<size_t>(N) * K;
    slot_row_NK_.ensure(backend_, NK);
    if (expert_exchange_ || !plan_on_backend_) {
        const std::vector<int32_t>& idx_host = router_.topk_idx_host();
        plan_ = plan_routing(idx_host.data(), N, K, E, capacity);
        row_src_R_.ensure(backend_, static_cast<size_t>(plan_.num_rows()));
        if (plan_.num_rows() > 0)
            backend_->upload(row_src_R_.data(), plan_.row_src.data(), plan_.num_rows() * sizeof(int32_t));
        backend_->upload(slot_row_NK_.data(), plan_.slot_row.data(), NK * sizeof(int32_t));
    } else {
        row_src_R_.ensure(backend_, NK);
        expert_counts_E_.ensure(backend_, E);
        backend_->moe_plan_routing(row_src_R_.data(), slot_row_NK_.data(), expert_counts_E_.data(),
                                   router_.topk_idx_NK(), N, K, E, capacity);
        std::vector<int32_t> counts(E);
        backend_->download(counts.data(), expert_counts_E_.data(), E * sizeof(int32_t));
        plan_ = plan_from_counts(std::vector<int64_t>(counts.begin(), counts.end()), capacity);
        // the host plan asserts every index is in [0, E); the backend's skips one that is not
        const int64_t counted = std::accumulate(counts.begin(), counts.end(), int64_t{0});
        BMOE_ASSERT(counted == static_cast<int64_t>(NK), "routing plan counted ", counted, " of ", NK,
                    " selections: an expert index out of range");
    }
    router_.fetch_token_stats();  // the queue just drained: no second wait for the GPU
    const int R = plan_.num_rows();

    // 3. gather -> experts -> combine
    if (experts_.keeps_input()) x_RD_ = Buffer<float>();  // an earlier mode's saved rows
    gather16_ = bf16_gemm_inputs_ && experts_.keeps_input() && rows16_reach_experts();
    y_RD_.ensure(backend_, static_cast<size_t>(R) * D);
    if (gather16_) {  // into the experts' copy, or (EP) the rows to send
        if (expert_exchange_) scratch_->moe_x16_RD.ensure(backend_, static_cast<size_t>(R) * D);
        uint16_t* x16_RD = expert_exchange_ ? scratch_->moe_x16_RD.data() : experts_.input16_rows(R);
        backend_->moe_gather_forward_bf16(x16_RD, x_ND, row_src_R_.data(), R, K, D);
    } else {
        x_rows().ensure(backend_, static_cast<size_t>(R) * D);
        backend_->moe_gather_forward(x_rows().data(), x_ND, row_src_R_.data(), R, K, D);
    }
    run_experts_forward(w);
    backend_->moe_combine_forward(out_ND, y_RD_.data(), slot_row_NK_.data(), router_.topk_weight_NK(), N, K, D);

    // 4. auxiliary losses and router statistics of the global batch (2E+6 values reduced), from the
    // router's per-token statistics rows [N, E + kStatsExtra]
    // totals = [copies per expert (E), prob sums per expert (E), sum of lse^2, tokens, dropped, reg sum,
    //           sigma sum, temperature sum]
    std::vector<double> totals(2 * E + 6, 0.0);
    for (int e = 0; e < E; ++e) totals[e] = static_cast<double>(plan_.tokens_per_expert[e]);
    const std::vector<float>& token_stats = router_.token_stats();
    for (size_t n = 0; n < static_cast<size_t>(N); ++n) {
        const float* st = token_stats.data() + n * (E + kStatsExtra);
        for (int e = 0; e < E; ++e) totals[E + e] += st[e];
        totals[2 * E] += static_cast<double>(st[E + kStatsLse]) * st[E + kStatsLse];
        totals[2 * E + 3] += st[E + kStatsReg];
        totals[2 * E + 4] += st[E + kStatsSigma];
        totals[2 * E + 5] += st[E + kStatsTemperature];
    }
    totals[2 * E + 1] = N;
    totals[2 * E + 2] = static_cast<double>(plan_.num_dropped);
    if (parallel_.world != nullptr) parallel_.world->all_reduce_sum(totals.data(), totals.size());
    const double N_global = totals[2 * E + 1];
    num_tokens_global_ = N_global;
    MoeLayerStats stats;
    stats.tokens_per_expert.resize(E);
    for (int e = 0; e < E; ++e) stats.tokens_per_expert[e] = static_cast<int64_t>(totals[e]);
    stats.num_dropped = static_cast<int64_t>(totals[2 * E + 2]);
    stats.num_copies = static_cast<int64_t>(N_global) * K;
    aux_dprobs_host_.assign(E, 0.0f);
    for (int e = 0; e < E; ++e) {
        const double P = totals[E + e] / N_global;
        const double f = totals[e] / (N_global * K);
        stats.aux_loss += E * f * P;
        aux_dprobs_host_[e] = static_cast<float>(E * f / N_global);
    }
    stats.z_loss = totals[2 * E] / N_global;
    stats.reg = (totals[2 * E + 3] + router_.weight_kl()) / N_global;
    stats.mean_sigma = totals[2 * E + 4] / N_global;
    stats.mean_temperature = totals[2 * E + 5] / N_global;
    if (ctx.training) router_.record_load(stats.tokens_per_expert);
    return stats;
}

void MoeBlock::backward(float* dx_ND,
                        const LayerTensors& dw,
                        const float* dout_ND,
                        const float* x_ND,
                        const LayerTensors& w,
                        float aux_weight,
                        float z_weight,
                        float reg_weight) {
    const int N = N_, D = config_.d_model, E = config_.num_experts, K = config_.top_k, R = plan_.num_rows();
    Buffer<float>& dx_RD = scratch_->moe_dx_RD;
    dx_RD.ensure(backend_, static_cast<size_t>(R) * D);
    dtopk_weight_NK_.ensure(backend_, static_cast<size_t>(N) * K);

    if (dy_rows16()) {
        Buffer<uint16_t>& dy16_RD = scratch_->moe_dy16_RD;
        dy16_RD.ensure(backend_, static_cast<size_t>(R) * D);
        backend_->moe_combine_backward_bf16(dy16_RD.data(), dtopk_weight_NK_.data(), dout_ND, y_RD_.data(),
                                            row_src_R_.data(), slot_row_NK_.data(), router_.topk_weight_NK(), N, R, K,
                                            D);
    } else {
        Buffer<float>& dy_RD = scratch_->moe_dy_RD;
        dy_RD.ensure(backend_, static_cast<size_t>(R) * D);
        backend_->moe_combine_backward(dy_RD.data(), dtopk_weight_NK_.data(), dout_ND, y_RD_.data(), row_src_R_.data(),
                                       slot_row_NK_.data(), router_.topk_weight_NK(), N, R, K, D);
    }
    if (recompute_ && !expert_exchange_) {  // the experts' input rows again (a copy: bitwise the same)
        x_rows().ensure(backend_, static_cast<size_t>(R) * D);
        backend_->moe_gather_forward(x_rows().data(), x_ND, row_src_R_.data(), R, K, D);
    }
    run_experts_backward(dw, w);
    backend_->zero(dx_ND, static_cast<size_t>(N) * D * sizeof(float));
    backend_->moe_gather_backward(dx_ND, dx_RD.data(), slot_row_NK_.data(), N, K, D);

    std::vector<float> aux_dprobs(E);
    for (int e = 0; e < E; ++e) aux_dprobs[e] = aux_weight * aux_dprobs_host_[e];
    // Every rank holds the same weight-space KL: divide its gradient by the ranks that will sum it.
    const int ranks = parallel_.world != nullptr ? parallel_.world->size() : 1;
    const float per_token = static_cast<float>(1.0 / num_tokens_global_);
    router_.backward(dx_ND, dw, dtopk_weight_NK_.data(), x_ND, w, aux_dprobs, z_weight * per_token,
                     reg_weight * per_token, reg_weight * per_token / static_cast<float>(ranks));
}

}  // namespace bmoe::model
