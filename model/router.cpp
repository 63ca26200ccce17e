#include "model/router.h"

#include <algorithm>
#include <cmath>

#include "model/cpu_backend.h"
#include "model/rng.h"
#include "parallel/check.h"

namespace bmoe::model {

namespace {

using router_math::sigmoid;
using router_math::softplus;

// One noise stream per (seed, step, layer, purpose); counters index tokens, samples and elements.
enum NoiseTag : uint64_t { kEpsNoise = 1, kDropoutNoise = 2, kGumbelNoise = 3, kMemberNoise = 4, kSwagNoise = 5 };
CounterRng noise_rng(const RoutingContext& ctx, int layer, NoiseTag tag) {
    const uint64_t stream = mix64(mix64(mix64(static_cast<uint64_t>(ctx.step)) ^ static_cast<uint64_t>(layer)) ^ tag);
    return CounterRng(ctx.seed, stream);
}

template <typename T>
void download_to(Backend* be, std::vector<T>& dst, const T* src, size_t n) {
    dst.resize(n);
    if (n > 0) be->download(dst.data(), src, n * sizeof(T));
}

}  // namespace

Router::Router(const ModelConfig& config, Backend* backend, int layer, LayerScratch* scratch)
    : config_(config),
      rc_(config.router),
      backend_(backend),
      layer_(layer),
      own_scratch_(scratch ? nullptr : std::make_unique<LayerScratch>()),
      scratch_(scratch ? scratch : own_scratch_.get()) {
    const size_t E = config.num_experts, D = config.d_model;
    if (rc_.selection_bias_rate > 0.0f) selection_bias_.assign(E, 0.0f);
    if (rc_.type == RouterType::kSwag) {
        swag_mean_.assign(E * D, 0.0f);
        swag_sq_mean_.assign(E * D, 0.0f);
        swag_dev_.assign(static_cast<size_t>(rc_.swag_rank) * E * D, 0.0f);
    }
}

bool Router::fast_path() const { return rc_.type == RouterType::kTopK && rc_.selection_bias_rate == 0.0f; }

template <typename T>
T* Router::sized(Buffer<T>& b, size_t n) {
    b.ensure(backend_, std::max<size_t>(n, 1));
    return b.data();
}

float* Router::to_backend(Buffer<float>& dst, const std::vector<float>& src) {
    float* p = sized(dst, src.size());
    if (!src.empty()) backend_->upload(p, src.data(), src.size() * sizeof(float));
    return p;
}

// ---------------------------------------------------------------------------------------------
// forward

void Router::forward(const float* x_ND, const LayerTensors& w, int N, const RoutingContext& ctx) {
    const ScopedMatmulPrecision fp32(backend_, MatmulPrecision::kFp32);  // router math is never bf16
    const int E = config_.num_experts, K = config_.top_k;
    N_ = N;
    training_ = ctx.training;
    mode_ = ctx.mode;
    int S = ctx.samples > 0 ? ctx.samples : (ctx.training ? rc_.train_samples : rc_.eval_samples);
    switch (rc_.type) {
        case RouterType::kTopK:
        case RouterType::kTempSampling:
        case RouterType::kVtsr:
            S = 1;  // probabilities are deterministic; the randomness is in the selection
            break;
        case RouterType::kSwag:
            if (ctx.training) S = 1;  // SWAG trains the weights themselves and samples only at inference
            break;
        case RouterType::kEnsemble:
            S = ctx.training && ctx.mode == RouterMode::kSample ? 1 : rc_.ensemble_size;  // all members at inference
            break;
        default:
            break;
    }
    if (ctx.mode == RouterMode::kMean && rc_.type != RouterType::kEnsemble) S = 1;
    S_ = S;
    outputs_current_ = noise_current_ = false;
    out_ = RouterOutputs{};
    out_.N = N;
    out_.E = E;
    out_.K = K;
    out_.S = S;
    weight_kl_ = 0.0;
    const size_t NK = static_cast<size_t>(N) * K;
    sized(t_.topk_idx_NK, NK);
    sized(t_.topk_weight_NK, NK);
    backend_->matmul_forward(sized(t_.ldet_NE, static_cast<size_t>(N) * E), x_ND, w.router_w, nullptr, N,
                             config_.d_model, E);
    rows_ = RouterRows{};
    if (fast_path()) {
        forward_fast();
    } else {
        sample_logits(x_ND, w, ctx);
        select(ctx);
    }
    idx_current_ = stats_fetched_ = stats_current_ = false;
}

// One download, where the caller's synchronisation point is (MoeBlock: beside the plan's counts):
// the fast path's pbar and lse, or the families' statistics rows as they are.
void Router::fetch_token_stats() const {
    if (stats_fetched_) return;
    const size_t N = static_cast<size_t>(N_), E = static_cast<size_t>(config_.num_experts);
    if (fast_path())
        download_to(backend_, fast_stats_host_, static_cast<const float*>(t_.probs_NE.data()), N * E + N);
    else
        download_to(backend_, token_stats_, static_cast<const float*>(t_.stats_NC.data()), N * (E + kStatsExtra));
    stats_fetched_ = true;
}

// The fast path's [N, E] pbar and [N] lse laid out as statistics rows, on the host (after the
// caller queued the layer's GPU work, so a GPU does not wait for it).
const std::vector<float>& Router::token_stats() const {
    fetch_token_stats();
    if (!stats_current_ && fast_path()) {
        const int N = N_, E = config_.num_experts, C = E + kStatsExtra;
        const size_t NE = static_cast<size_t>(N) * E;
        token_stats_.assign(static_cast<size_t>(N) * C, 0.0f);
        for (size_t n = 0; n < static_cast<size_t>(N); ++n) {
            std::copy(fast_stats_host_.begin() + n * E, fast_stats_host_.begin() + (n + 1) * E,
                      token_stats_.begin() + n * C);
            token_stats_[n * C + E + kStatsLse] = fast_stats_host_[NE + n];
        }
    }
    stats_current_ = true;
    return token_stats_;
}

const std::vector<int32_t>& Router::topk_idx_host() const {
    if (!idx_current_)
        download_to(backend_, topk_idx_host_, t_.topk_idx_NK.data(), static_cast<size_t>(N_) * config_.top_k);
    idx_current_ = true;
    return topk_idx_host_;
}

// topk without a selection bias: the backend's fused softmax/top-k; the statistics from pbar and lse.
void Router::forward_fast() {
    const int N = N_, E = config_.num_experts, K = config_.top_k;
    const size_t NE = static_cast<size_t>(N) * E;
    float* probs = sized(t_.probs_NE, NE + N);  // pbar [N, E], then lse [N]: one download
    backend_->router_topk_forward(probs, probs + NE, t_.topk_idx_NK.data(), t_.topk_weight_NK.data(), t_.ldet_NE.data(),
                                  N, E, K, config_.router_renormalize);
}

// The family's GEMMs (on the backend), then the kSample stage: l^s [S, N, E], mu and the family's own
// outputs. Fills rows_ with every pointer the later stages read.
void Router::sample_logits(const float* x_ND, const LayerTensors& w, const RoutingContext& ctx) {
    const int N = N_, E = config_.num_experts, D = config_.d_model, S = S_;
    const size_t NE = static_cast<size_t>(N) * E, ND = static_cast<size_t>(N) * D;
    const bool sample = ctx.mode == RouterMode::kSample;
    const RouterType type = rc_.type;
    RouterRows& r = rows_;
    r.type = type;
    r.N = N;
    r.E = E;
    r.K = config_.top_k;
    r.S = S;
    r.M = rc_.ensemble_size;
    r.P = type == RouterType::kLogitFc ? RouterConfig::packed_size(E) : E;
    r.renormalize = config_.router_renormalize;
    r.fixed_temperature = rc_.temperature;
    r.temp_min = rc_.temp_min;
    r.temp_max = rc_.temp_max;
    r.sigma_min = rc_.sigma_min;
    r.prior_std = rc_.prior_std;
    r.first_token = static_cast<uint64_t>(ctx.first_token);
    r.eps_rng = noise_rng(ctx, layer_, kEpsNoise);
    r.gumbel_rng = noise_rng(ctx, layer_, kGumbelNoise);
    r.member_rng = noise_rng(ctx, layer_, kMemberNoise);
    r.ldet_NE = t_.ldet_NE.data();
    r.mu_NE = sized(t_.mu_NE, NE);
    r.sample_logits_SNE = sized(t_.sample_logits_SNE, S * NE);
    const bool draws_eps =
        type == RouterType::kWeightMfvi || type == RouterType::kLogitMf || type == RouterType::kLogitFc;
    if (sample && draws_eps) r.eps_SNE = sized(t_.eps_SNE, S * NE);

    switch (type) {
        case RouterType::kTopK:
            break;
        case RouterType::kTempSampling:
            r.temperature_N = sized(t_.temperature_N, N);
            break;
        case RouterType::kMcDropout: {
            if (!sample) break;
            // Masks are drawn on the backend (counter-based: the same bits anywhere) and redrawn in
            // backward, so x never leaves the device and no [S, N, D] mask is kept.
            dropout_ = DropoutDraw{noise_rng(ctx, layer_, kDropoutNoise), static_cast<uint64_t>(ctx.first_token)};
            r.logits_given = true;
            for (int s = 0; s < S; ++s)
                backend_->matmul_forward(r.sample_logits_SNE + s * NE, dropout_input(x_ND, s), w.router_w, nullptr, N,
                                         D, E);
            break;
        }
        case RouterType::kSwag: {
            const float count = swag_count_[0];
            if (training_ || (!sample && count == 0.0f)) break;  // training, or no snapshot yet: the weights
            BMOE_REQUIRE(!sample || count >= 2.0f, "router.type=swag layer ", layer_, " has ", count,
                         " SWAG snapshot(s); sampling needs >= 2: train longer than router.swag_start + ",
                         "2 * router.swag_every steps, or evaluate in mean mode");
            r.logits_given = true;
            const size_t P = static_cast<size_t>(E) * D;
            const int cols = static_cast<int>(std::min<float>(count, static_cast<float>(rc_.swag_rank)));
            const CounterRng rng = noise_rng(ctx, layer_, kSwagNoise);
            std::vector<float> ws(P);
            for (int s = 0; s < S; ++s) {
                // W = mean + sqrt(diag)/sqrt(2) z1 + Dhat z2 / sqrt(2 (cols - 1))   (Maddox et al. 2019)
                const uint64_t base = static_cast<uint64_t>(s) * (P + rc_.swag_rank);
                for (size_t j = 0; j < P; ++j) {
                    ws[j] = swag_mean_[j];
                    if (!sample) continue;
                    const float var = std::max(swag_sq_mean_[j] - swag_mean_[j] * swag_mean_[j], 0.0f);
                    ws[j] += std::sqrt(var / 2.0f) * rng.normal(base + j);
                }
                if (sample)
                    for (int c = 0; c < cols; ++c) {
                        const float z = rng.normal(base + P + c) / std::sqrt(2.0f * static_cast<float>(cols - 1));
                        const float* dev = swag_dev_.data() + static_cast<size_t>(c) * P;
                        for (size_t j = 0; j < P; ++j) ws[j] += z * dev[j];
                    }
                backend_->matmul_forward(r.sample_logits_SNE + s * NE, x_ND, to_backend(t_.swag_weights_ED, ws),
                                         nullptr, N, D, E);
            }
            break;
        }
        case RouterType::kEnsemble: {
            const int M = rc_.ensemble_size;
            float* members = sized(t_.members_NME, static_cast<size_t>(N) * (M - 1) * E);
            backend_->matmul_forward(members, x_ND, w.router_ensemble_w, nullptr, N, D, (M - 1) * E);
            r.members_NME = members;
            r.member_per_token = S == 1;  // training: each token routed by one drawn member
            if (r.member_per_token) r.member_N = sized(t_.member_N, N);
            break;
        }
        case RouterType::kWeightMfvi: {
            // Local reparameterisation: l = x mu^T + sqrt((x*x) (sigma^2)^T) * eps, sigma = softplus(rho).
            // The [E, D] weight terms (sigma^2 and the KL) stay on the host.
            const size_t P = static_cast<size_t>(E) * D;
            std::vector<float> rho, wmu;
            download_to(backend_, rho, w.router_rho, P);
            download_to(backend_, wmu, w.router_w, P);
            std::vector<float> sigma2(P);
            const double sp = rc_.weight_prior_std;
            double kl = 0.0;
            for (size_t j = 0; j < P; ++j) {
                const double sigma = softplus(rho[j]);
                sigma2[j] = static_cast<float>(sigma * sigma);
                kl +=
                    std::log(sp / sigma) + (sigma * sigma + static_cast<double>(wmu[j]) * wmu[j]) / (2 * sp * sp) - 0.5;
            }
            weight_kl_ = kl;
            Buffer<float>& x2 = scratch_->router_x_ND;
            x2.ensure(backend_, ND);
            backend_->mul(x2.data(), x_ND, x_ND, ND);  // on the backend: x stays on the device
            float* var = sized(t_.var_NE, NE);
            backend_->matmul_forward(var, x2.data(), to_backend(t_.sigma2_ED, sigma2), nullptr, N, D, E);
            r.var_NE = var;
            r.sigma_NE = sized(t_.sigma_NE, NE);
            break;
        }
        case RouterType::kLogitMf:
        case RouterType::kLogitFc: {
            const int R = rc_.hidden;
            float* trunk_pre = sized(t_.trunk_pre, static_cast<size_t>(N) * R);
            float* trunk_out = sized(t_.trunk_out, static_cast<size_t>(N) * R);
            backend_->matmul_forward(trunk_pre, x_ND, w.router_trunk_w, nullptr, N, D, R);
            backend_->gelu_forward(trunk_out, trunk_pre, static_cast<size_t>(N) * R);
            float* dmu = sized(t_.dmu_NE, NE);
            float* raw = sized(t_.raw_NP, static_cast<size_t>(N) * r.P);
            backend_->matmul_forward(dmu, trunk_out, w.router_mean_w, nullptr, N, R, E);
            backend_->matmul_forward(raw, trunk_out, w.router_scale_w, w.router_scale_b, N, R, r.P);
            r.dmu_NE = dmu;
            r.raw_NP = raw;
            r.reg_N = sized(t_.reg_N, N);
            if (type == RouterType::kLogitFc)
                r.chol_NP = sized(t_.chol_NP, static_cast<size_t>(N) * r.P);
            else
                r.sigma_NE = sized(t_.sigma_NE, NE);
            break;
        }
        case RouterType::kVtsr: {
            float* temp_raw = sized(t_.temp_raw_N, N);
            backend_->matmul_forward(temp_raw, x_ND, w.router_temp_w, w.router_temp_b, N, D, 1);
            r.temp_raw_N = temp_raw;
            r.temperature_N = sized(t_.temperature_N, N);
            r.reg_N = sized(t_.reg_N, N);
            break;
        }
    }
    backend_->router_rows(RouterStage::kSample, r);
}

// The kSelect stage: p^s = softmax(l^s / T), pbar, the selection and the gates; lse(mu) for the
// z-loss; the per-token statistics row.
void Router::select(const RoutingContext& ctx) {
    const int N = N_, E = config_.num_experts, S = S_;
    const size_t NE = static_cast<size_t>(N) * E;
    RouterRows& r = rows_;
    r.sample_logp_SNE = sized(t_.sample_logp_SNE, S * NE);
    r.sample_probs_SNE = sized(t_.sample_probs_SNE, S * NE);
    r.log_pbar_NE = sized(t_.log_pbar_NE, NE);
    r.probs_NE = sized(t_.probs_NE, NE);
    r.lse_N = sized(t_.lse_N, N);
    r.topk_idx_NK = t_.topk_idx_NK.data();
    r.topk_weight_NK = t_.topk_weight_NK.data();
    r.stats_NC = sized(t_.stats_NC, static_cast<size_t>(N) * (E + kStatsExtra));
    const bool gumbel =  // Sample-K: Gumbel noise on the selection score
        ctx.mode == RouterMode::kSample && (rc_.type == RouterType::kTempSampling || rc_.type == RouterType::kVtsr);
    if (gumbel) r.gumbel_NE = sized(t_.gumbel_NE, NE);
    if (!selection_bias_.empty()) r.selection_bias_E = to_backend(t_.selection_bias_E, selection_bias_);
    backend_->router_rows(RouterStage::kSelect, r);
}

// mc_dropout's mask for sample s of the last forward: element (token t, sample s, d) has counter
// (t S + s) D + d, so this batch's rows step by S D from token first_token.
DropoutMaskDraw Router::dropout_draw(int s) const {
    const uint64_t S = static_cast<uint64_t>(S_), D = static_cast<uint64_t>(config_.d_model);
    return {dropout_.rng, (dropout_.first_token * S + static_cast<uint64_t>(s)) * D, S * D, rc_.dropout,
            1.0f / (1.0f - rc_.dropout)};
}

// x * mask^s on the backend (the mask and the product in the shared scratch).
const float* Router::dropout_input(const float* x_ND, int s) {
    const int N = N_, D = config_.d_model;
    const size_t ND = static_cast<size_t>(N) * D;
    Buffer<float>& mask = scratch_->router_mask_ND;
    Buffer<float>& masked_x = scratch_->router_x_ND;
    mask.ensure(backend_, ND);
    masked_x.ensure(backend_, ND);
    backend_->dropout_mask(mask.data(), N, D, dropout_draw(s));
    backend_->mul(masked_x.data(), x_ND, mask.data(), ND);
    return masked_x.data();
}

const RouterOutputs& Router::outputs() const {
    if (outputs_current_ || N_ == 0) return out_;
    const int N = N_, E = config_.num_experts, K = config_.top_k, C = E + kStatsExtra;
    const size_t NE = static_cast<size_t>(N) * E, SNE = static_cast<size_t>(S_) * NE;
    out_.topk_idx = topk_idx_host();
    download_to(backend_, out_.topk_weight, t_.topk_weight_NK.data(), static_cast<size_t>(N) * K);
    out_.probs.resize(NE);
    out_.lse.resize(N);
    for (size_t n = 0; n < static_cast<size_t>(N); ++n) {
        std::copy(token_stats().begin() + n * C, token_stats().begin() + n * C + E, out_.probs.begin() + n * E);
        out_.lse[n] = token_stats()[n * C + E + kStatsLse];
    }
    if (fast_path()) {
        download_to(backend_, out_.mu, t_.ldet_NE.data(), NE);
        out_.sample_logits = out_.mu;
        out_.sample_probs = out_.probs;
    } else {
        const RouterRows& r = rows_;
        download_to(backend_, out_.mu, r.mu_NE, NE);
        download_to(backend_, out_.sample_logits, r.sample_logits_SNE, SNE);
        download_to(backend_, out_.sample_probs, r.sample_probs_SNE, SNE);
        download_to(backend_, out_.sigma, r.sigma_NE, r.sigma_NE ? NE : 0);
        download_to(backend_, out_.chol, r.chol_NP, r.chol_NP ? static_cast<size_t>(N) * r.P : 0);
        download_to(backend_, out_.temperature, r.temperature_N, r.temperature_N ? N : 0);
        download_to(backend_, out_.reg, r.reg_N, r.reg_N ? N : 0);
    }
    outputs_current_ = true;
    return out_;
}

const RouterNoise& Router::noise() const {
    if (noise_current_ || N_ == 0) return noise_;
    const int N = N_, D = config_.d_model;
    const size_t NE = static_cast<size_t>(N) * config_.num_experts;
    const RouterRows& r = rows_;
    noise_ = RouterNoise{};
    download_to(backend_, noise_.eps, r.eps_SNE, r.eps_SNE ? S_ * NE : 0);
    download_to(backend_, noise_.gumbel, r.gumbel_NE, r.gumbel_NE ? NE : 0);
    download_to(backend_, noise_.member, r.member_N, r.member_N ? static_cast<size_t>(N) : 0);
    // mc_dropout's masks live on the backend only while used; the host copy is drawn here.
    if (rc_.type == RouterType::kMcDropout && mode_ == RouterMode::kSample) {
        noise_.dropout_mask.resize(static_cast<size_t>(S_) * N * D);
        CpuBackend host;  // the CPU implementation of the same op
        for (int s = 0; s < S_; ++s)
            host.dropout_mask(noise_.dropout_mask.data() + static_cast<size_t>(s) * N * D, N, D, dropout_draw(s));
    }
    noise_current_ = true;
    return noise_;
}

// ---------------------------------------------------------------------------------------------
// backward

void Router::backward(float* dx_ND,
                      const LayerTensors& dw,
                      const float* dtopk_weight_NK,
                      const float* x_ND,
                      const LayerTensors& w,
                      const std::vector<float>& aux_dprobs_E,
                      float z_coef,
                      float reg_coef,
                      float weight_reg_coef) {
    BMOE_ASSERT(N_ > 0, "router backward() before forward()");
    const ScopedMatmulPrecision fp32(backend_, MatmulPrecision::kFp32);
    const int N = N_, E = config_.num_experts, K = config_.top_k, D = config_.d_model, S = S_;
    const size_t NE = static_cast<size_t>(N) * E;
    BMOE_ASSERT(aux_dprobs_E.empty() || aux_dprobs_E.size() == static_cast<size_t>(E), "aux_dprobs_E has ",
                aux_dprobs_E.size(), " values for ", E, " experts");
    const float* aux = aux_dprobs_E.empty() ? nullptr : to_backend(t_.aux_E, aux_dprobs_E);
    if (fast_path()) {
        float* dlogits = sized(t_.dlogits_NE, NE);
        backend_->router_topk_backward(dlogits, dtopk_weight_NK, t_.probs_NE.data(), t_.probs_NE.data() + NE,
                                       t_.topk_idx_NK.data(), t_.topk_weight_NK.data(), aux, z_coef, N, E, K,
                                       config_.router_renormalize);
        backend_->matmul_backward(dx_ND, dw.router_w, nullptr, dlogits, x_ND, w.router_w, N, D, E, true);
        return;
    }
    BMOE_REQUIRE(training_, "router backward after an evaluation forward: forward with RoutingContext.training");
    RouterRows& r = rows_;
    // 1. gates, aux and z-loss -> d l^s, d T, d mu
    r.dgate_NK = dtopk_weight_NK;
    r.aux_dprobs_E = aux;
    r.z_coef = z_coef;
    r.reg_coef = reg_coef;
    r.dl_SNE = sized(t_.dl_SNE, S * NE);
    r.dmu_z_NE = sized(t_.dmu_z_NE, NE);
    r.dtemp_N = r.temperature_N ? sized(t_.dtemp_N, N) : nullptr;
    backend_->router_rows(RouterStage::kGateBackward, r);
    // 2. -> d ldet and the family heads' gradients
    r.dldet_NE = sized(t_.dldet_NE, NE);
    switch (rc_.type) {
        case RouterType::kEnsemble:
            r.dmembers_NME = sized(t_.dmembers_NME, static_cast<size_t>(N) * (rc_.ensemble_size - 1) * E);
            break;
        case RouterType::kWeightMfvi:
            r.dvar_NE = sized(t_.dvar_NE, NE);
            break;
        case RouterType::kLogitMf:
        case RouterType::kLogitFc:
            r.ddmu_NE = sized(t_.ddmu_NE, NE);
            r.draw_NP = sized(t_.draw_NP, static_cast<size_t>(N) * r.P);
            break;
        case RouterType::kVtsr:
            r.dtemp_raw_N = sized(t_.dtemp_raw_N, N);
            break;
        default:
            break;
    }
    backend_->router_rows(RouterStage::kFamilyBackward, r);
    // 3. the families' GEMMs, then x W_r^T
    backward_family(dx_ND, dw, x_ND, w, weight_reg_coef);
    backend_->matmul_backward(dx_ND, dw.router_w, nullptr, r.dldet_NE, x_ND, w.router_w, N, D, E, true);
}

// Backpropagates the family heads' gradients (rows_, from kFamilyBackward) through their GEMMs.
void Router::backward_family(
    float* dx_ND, const LayerTensors& dw, const float* x_ND, const LayerTensors& w, float weight_reg_coef) {
    const int N = N_, E = config_.num_experts, D = config_.d_model, S = S_;
    const size_t NE = static_cast<size_t>(N) * E, ND = static_cast<size_t>(N) * D;
    const RouterRows& r = rows_;
    Buffer<float>& dtrunk = scratch_->router_dtrunk;
    switch (rc_.type) {
        case RouterType::kMcDropout: {
            if (!r.logits_given) break;  // mean mode: the samples were l_det itself
            dtrunk.ensure(backend_, ND);
            for (int s = 0; s < S; ++s) {  // dx += (dl^s W) * mask^s, the mask redrawn as in forward
                const float* xs = dropout_input(x_ND, s);
                backend_->matmul_backward(dtrunk.data(), dw.router_w, nullptr, r.dl_SNE + s * NE, xs, w.router_w, N, D,
                                          E, false);
                backend_->mul(dtrunk.data(), dtrunk.data(), scratch_->router_mask_ND.data(), ND);
                if (dx_ND != nullptr) backend_->accumulate(dx_ND, dtrunk.data(), ND);
            }
            break;
        }
        case RouterType::kEnsemble: {
            const int M = rc_.ensemble_size;
            backend_->matmul_backward(dx_ND, dw.router_ensemble_w, nullptr, r.dmembers_NME, x_ND, w.router_ensemble_w,
                                      N, D, (M - 1) * E, true);
            break;
        }
        case RouterType::kWeightMfvi: {
            const size_t P = static_cast<size_t>(E) * D;
            Buffer<float>& x2 = scratch_->router_x_ND;
            x2.ensure(backend_, ND);
            backend_->mul(x2.data(), x_ND, x_ND, ND);
            float* dsigma2 = sized(t_.dsigma2_ED, P);
            backend_->zero(dsigma2, P * sizeof(float));  // matmul_backward adds into dW
            dtrunk.ensure(backend_, ND);
            // dtrunk = d loss / d (x*x), dsigma2 = d loss / d sigma^2 (sigma^2 as the forward uploaded it)
            backend_->matmul_backward(dtrunk.data(), dsigma2, nullptr, r.dvar_NE, x2.data(), t_.sigma2_ED.data(), N, D,
                                      E, false);
            backend_->mul(dtrunk.data(), dtrunk.data(), x_ND, ND);  // d x = 2 x d(x*x)
            backend_->scale(dtrunk.data(), 2.0f, ND);
            if (dx_ND != nullptr) backend_->accumulate(dx_ND, dtrunk.data(), ND);
            // the [E, D] weight terms on the host, + the weight KL: d/dsigma = sigma/sp^2 - 1/sigma, d/dmu = mu/sp^2
            std::vector<float> rho, wmu, ds2;
            download_to(backend_, rho, w.router_rho, P);
            download_to(backend_, wmu, w.router_w, P);
            download_to(backend_, ds2, static_cast<const float*>(dsigma2), P);
            std::vector<float> drho(P), dwmu(P);
            const double sp2 = static_cast<double>(rc_.weight_prior_std) * rc_.weight_prior_std;
            for (size_t j = 0; j < P; ++j) {
                const double sigma = softplus(rho[j]);
                const double dsigma = ds2[j] * 2.0 * sigma + weight_reg_coef * (sigma / sp2 - 1.0 / sigma);
                drho[j] = static_cast<float>(dsigma * sigmoid(rho[j]));
                dwmu[j] = static_cast<float>(weight_reg_coef * wmu[j] / sp2);
            }
            // null: frozen
            if (dw.router_rho != nullptr) backend_->accumulate(dw.router_rho, to_backend(t_.dsigma2_ED, drho), P);
            if (dw.router_w != nullptr) backend_->accumulate(dw.router_w, to_backend(t_.dsigma2_ED, dwmu), P);
            break;
        }
        case RouterType::kLogitMf:
        case RouterType::kLogitFc: {
            const int R = rc_.hidden;
            const size_t NR = static_cast<size_t>(N) * R;
            dtrunk.ensure(backend_, NR);
            backend_->matmul_backward(dtrunk.data(), dw.router_mean_w, nullptr, r.ddmu_NE, t_.trunk_out.data(),
                                      w.router_mean_w, N, R, E, false);
            backend_->matmul_backward(dtrunk.data(), dw.router_scale_w, dw.router_scale_b, r.draw_NP,
                                      t_.trunk_out.data(), w.router_scale_w, N, R, r.P, true);
            float* dtrunk_pre = sized(t_.dtrunk_pre, NR);
            backend_->gelu_backward(dtrunk_pre, dtrunk.data(), t_.trunk_pre.data(), NR);
            backend_->matmul_backward(dx_ND, dw.router_trunk_w, nullptr, dtrunk_pre, x_ND, w.router_trunk_w, N, D, R,
                                      true);
            break;
        }
        case RouterType::kVtsr:
            backend_->matmul_backward(dx_ND, dw.router_temp_w, dw.router_temp_b, r.dtemp_raw_N, x_ND, w.router_temp_w,
                                      N, D, 1, true);
            break;
        default:
            break;
    }
}

// ---------------------------------------------------------------------------------------------
// state: aux-loss-free selection bias and SWAG moments

void Router::record_load(const std::vector<int64_t>& load) {
    if (selection_bias_.empty()) return;
    load_.resize(load.size(), 0);
    for (size_t e = 0; e < load.size(); ++e) load_[e] += load[e];
}

void Router::end_step(int step, const LayerTensors& w) {
    if (!selection_bias_.empty() && !load_.empty()) {
        // b_e += rate * sign(mean load - load_e): identical on every rank (global loads)
        double mean = 0.0;
        for (int64_t c : load_) mean += static_cast<double>(c) / static_cast<double>(load_.size());
        for (size_t e = 0; e < load_.size(); ++e) {
            const double diff = mean - static_cast<double>(load_[e]);
            selection_bias_[e] += rc_.selection_bias_rate * static_cast<float>((diff > 0) - (diff < 0));
        }
        load_.assign(load_.size(), 0);
    }
    if (rc_.type == RouterType::kSwag && step >= rc_.swag_start && (step - rc_.swag_start) % rc_.swag_every == 0) {
        const size_t P = swag_mean_.size();
        std::vector<float> theta;
        download_to(backend_, theta, w.router_w, P);
        const double n = swag_count_[0];
        for (size_t j = 0; j < P; ++j) {
            swag_mean_[j] = static_cast<float>((n * swag_mean_[j] + theta[j]) / (n + 1));
            swag_sq_mean_[j] =
                static_cast<float>((n * swag_sq_mean_[j] + static_cast<double>(theta[j]) * theta[j]) / (n + 1));
        }
        float* dev = swag_dev_.data() + static_cast<size_t>(static_cast<int64_t>(n) % rc_.swag_rank) * P;
        for (size_t j = 0; j < P; ++j) dev[j] = theta[j] - swag_mean_[j];
        swag_count_[0] = static_cast<float>(n + 1);
    }
}

std::vector<RouterStateTensor> Router::state() {
    const int64_t E = config_.num_experts, D = config_.d_model;
    std::vector<RouterStateTensor> s;
    if (!selection_bias_.empty()) s.push_back({"selection_bias", {E}, &selection_bias_});
    if (rc_.type == RouterType::kSwag) {
        s.push_back({"swag.mean", {E, D}, &swag_mean_});
        s.push_back({"swag.sq_mean", {E, D}, &swag_sq_mean_});
        s.push_back({"swag.deviations", {rc_.swag_rank, E, D}, &swag_dev_});
        s.push_back({"swag.count", {1}, &swag_count_});
    }
    return s;
}

}  // namespace bmoe::model
