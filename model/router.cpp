#include "model/router.h"

#include <algorithm>
#include <cmath>

#include "model/cpu_backend.h"
#include "model/rng.h"
#include "parallel/check.h"

namespace bmoe::model {

namespace {

using idx_t = long;  // OpenMP loop index

// One noise stream per (seed, step, layer, purpose); counters index tokens, samples and elements.
enum NoiseTag : uint64_t { kEpsNoise = 1, kDropoutNoise = 2, kGumbelNoise = 3, kMemberNoise = 4, kSwagNoise = 5 };
CounterRng noise_rng(const RoutingContext& ctx, int layer, NoiseTag tag) {
    const uint64_t stream = mix64(mix64(mix64(static_cast<uint64_t>(ctx.step)) ^ static_cast<uint64_t>(layer)) ^ tag);
    return CounterRng(ctx.seed, stream);
}

// Threads only for loops big enough to pay for waking them: many small parallel regions per
// layer crawl when the cores are shared (a 9 s test took 240 s next to another process).
bool parallel_worth(size_t work) { return work > (size_t{1} << 14); }

float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }
float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// log sum_i exp(v[i * stride]) over n values, in double.
double logsumexp(const float* v, int n, int stride = 1) {
    double m = -INFINITY;
    for (int i = 0; i < n; ++i) m = std::max(m, static_cast<double>(v[i * stride]));
    if (m == -INFINITY) return m;
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += std::exp(v[i * stride] - m);
    return m + std::log(s);
}

void download_to(Backend* be, std::vector<float>& dst, const float* src, size_t n) {
    dst.resize(n);
    if (n > 0) be->download(dst.data(), src, n * sizeof(float));
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

float* Router::to_backend(Buffer<float>& dst, const std::vector<float>& src) {
    dst.ensure(backend_, std::max<size_t>(src.size(), 1));
    if (!src.empty()) backend_->upload(dst.data(), src.data(), src.size() * sizeof(float));
    return dst.data();
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
    out_.N = N;
    out_.E = E;
    out_.K = K;
    out_.S = S;
    topk_idx_NK_.ensure(backend_, static_cast<size_t>(N) * K);
    topk_weight_NK_.ensure(backend_, static_cast<size_t>(N) * K);
    ldet_NE_.ensure(backend_, static_cast<size_t>(N) * E);
    backend_->matmul_forward(ldet_NE_.data(), x_ND, w.router_w, nullptr, N, config_.d_model, E);
    if (fast_path()) {
        forward_fast(N);
        return;
    }
    download_to(backend_, ldet_, ldet_NE_.data(), static_cast<size_t>(N) * E);
    sample_logits(x_ND, w, ctx);
    select_and_gate(ctx);
    upload_decision();
}

// topk without a selection bias: the backend's fused softmax/top-k, then host copies.
void Router::forward_fast(int N) {
    const int E = config_.num_experts, K = config_.top_k;
    probs_NE_.ensure(backend_, static_cast<size_t>(N) * E);
    lse_N_.ensure(backend_, N);
    backend_->router_topk_forward(probs_NE_.data(), lse_N_.data(), topk_idx_NK_.data(), topk_weight_NK_.data(),
                                  ldet_NE_.data(), N, E, K, config_.router_renormalize);
    download_to(backend_, out_.mu, ldet_NE_.data(), static_cast<size_t>(N) * E);
    download_to(backend_, out_.probs, probs_NE_.data(), static_cast<size_t>(N) * E);
    download_to(backend_, lse_, lse_N_.data(), N);
    download_to(backend_, out_.topk_weight, topk_weight_NK_.data(), static_cast<size_t>(N) * K);
    out_.topk_idx.resize(static_cast<size_t>(N) * K);
    backend_->download(out_.topk_idx.data(), topk_idx_NK_.data(), out_.topk_idx.size() * sizeof(int32_t));
    out_.sample_probs = out_.probs;
    out_.sample_logits = out_.mu;
    out_.sigma.clear();
    out_.chol.clear();
    out_.temperature.clear();
    out_.reg.clear();
    weight_kl_ = 0.0;
}

// Fills out_.sample_logits [S, N, E] (before the temperature), out_.mu and the family's own outputs.
void Router::sample_logits(const float* x_ND, const LayerTensors& w, const RoutingContext& ctx) {
    const int N = N_, E = config_.num_experts, D = config_.d_model, S = S_;
    const size_t NE = static_cast<size_t>(N) * E, ND = static_cast<size_t>(N) * D;
    const bool sample = ctx.mode == RouterMode::kSample;
    out_.sample_logits.assign(static_cast<size_t>(S) * NE, 0.0f);
    out_.mu = ldet_;
    out_.sigma.clear();
    out_.chol.clear();
    out_.temperature.clear();
    out_.reg.clear();
    noise_ = RouterNoise{};
    std::vector<float>& eps = noise_.eps;
    weight_kl_ = 0.0;
    auto fill_eps = [&]() {  // eps[s, n, e] ~ N(0, 1), keyed by the global token id; pairs share a draw
        eps.assign(static_cast<size_t>(S) * NE, 0.0f);
        const CounterRng rng = noise_rng(ctx, layer_, kEpsNoise);
        const int pairs = (E + 1) / 2;
#pragma omp parallel for schedule(static) if (parallel_worth(static_cast <size_t>(N) * S * E * 8))
        for (idx_t n = 0; n < N; ++n)
            for (int s = 0; s < S; ++s) {
                const uint64_t token = static_cast<uint64_t>(ctx.first_token + n);
                float* row = eps.data() + (s * static_cast<size_t>(N) + n) * E;
                for (int p = 0; p < pairs; ++p) {
                    float second = 0.0f;
                    rng.normal_pair((token * S + s) * pairs + p, &row[2 * p], &second);
                    if (2 * p + 1 < E) row[2 * p + 1] = second;
                }
            }
    };
    auto run_matmul = [&](std::vector<float>& dst, const float* in, const float* weight, const float* bias, int rows,
                          int I, int O, Buffer<float>& out_buf) {
        out_buf.ensure(backend_, static_cast<size_t>(rows) * O);
        backend_->matmul_forward(out_buf.data(), in, weight, bias, rows, I, O);
        download_to(backend_, dst, out_buf.data(), static_cast<size_t>(rows) * O);
    };

    switch (rc_.type) {
        case RouterType::kTopK:
            std::copy(ldet_.begin(), ldet_.end(), out_.sample_logits.begin());
            break;
        case RouterType::kTempSampling:
            std::copy(ldet_.begin(), ldet_.end(), out_.sample_logits.begin());
            out_.temperature.assign(N, rc_.temperature);
            break;
        case RouterType::kMcDropout: {
            if (!sample) {
                std::copy(ldet_.begin(), ldet_.end(), out_.sample_logits.begin());
                break;
            }
            // Masks are drawn on the backend (counter-based: the same bits anywhere) and redrawn in
            // backward, so x never leaves the device and no [S, N, D] mask is kept.
            dropout_ = DropoutDraw{noise_rng(ctx, layer_, kDropoutNoise), static_cast<uint64_t>(ctx.first_token)};
            std::vector<float> ls;
            for (int s = 0; s < S; ++s) {
                const float* xs = dropout_input(x_ND, s);
                run_matmul(ls, xs, w.router_w, nullptr, N, D, E, scratch_b_);
                std::copy(ls.begin(), ls.end(), out_.sample_logits.begin() + static_cast<long>(s * NE));
            }
            break;
        }
        case RouterType::kSwag: {
            const float count = swag_count_[0];
            if (training_ || (!sample && count == 0.0f)) {  // training, or no snapshot yet: the weights
                std::copy(ldet_.begin(), ldet_.end(), out_.sample_logits.begin());
                break;
            }
            BMOE_REQUIRE(!sample || count >= 2.0f, "router.type=swag layer ", layer_, " has ", count,
                         " SWAG snapshot(s); sampling needs >= 2: train longer than router.swag_start + ",
                         "2 * router.swag_every steps, or evaluate in mean mode");
            const size_t P = static_cast<size_t>(E) * D;
            const int cols = static_cast<int>(std::min<float>(count, static_cast<float>(rc_.swag_rank)));
            const CounterRng rng = noise_rng(ctx, layer_, kSwagNoise);
            std::vector<float> ws(P), ls;
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
                run_matmul(ls, x_ND, to_backend(scratch_w_, ws), nullptr, N, D, E, scratch_b_);
                std::copy(ls.begin(), ls.end(), out_.sample_logits.begin() + static_cast<long>(s * NE));
            }
            break;
        }
        case RouterType::kEnsemble: {
            const int M = rc_.ensemble_size;
            run_matmul(all_members_, x_ND, w.router_ensemble_w, nullptr, N, D, (M - 1) * E, scratch_b_);
            auto member_logit = [&](int m, idx_t n, int e) {
                return m == 0 ? ldet_[n * E + e] : all_members_[(n * (M - 1) + (m - 1)) * E + e];
            };
            if (S == 1) {  // training: each token is routed by one member, drawn per token
                const CounterRng rng = noise_rng(ctx, layer_, kMemberNoise);
                std::vector<int32_t>& member = noise_.member;
                member.resize(N);
                for (idx_t n = 0; n < N; ++n) {
                    member[n] = static_cast<int32_t>(rng.bits(static_cast<uint64_t>(ctx.first_token + n)) % M);
                    for (int e = 0; e < E; ++e)
                        out_.sample_logits[n * E + e] = out_.mu[n * E + e] = member_logit(member[n], n, e);
                }
            } else {  // inference: every member is one sample; mu = the members' mean logits
                for (idx_t n = 0; n < N; ++n)
                    for (int e = 0; e < E; ++e) {
                        double mean = 0.0;
                        for (int m = 0; m < M; ++m) {
                            out_.sample_logits[(m * static_cast<size_t>(N) + n) * E + e] = member_logit(m, n, e);
                            mean += member_logit(m, n, e);
                        }
                        out_.mu[n * E + e] = static_cast<float>(mean / M);
                    }
            }
            break;
        }
        case RouterType::kWeightMfvi: {
            // Local reparameterisation: l = x mu^T + sqrt((x*x) (sigma^2)^T) * eps, sigma = softplus(rho)
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
            run_matmul(var_, x2.data(), to_backend(scratch_w_, sigma2), nullptr, N, D, E, scratch_b_);
            out_.sigma.resize(NE);
            for (size_t i = 0; i < NE; ++i) out_.sigma[i] = std::sqrt(var_[i] + 1e-12f);
            if (sample) fill_eps();
            for (int s = 0; s < S; ++s)
                for (size_t i = 0; i < NE; ++i)
                    out_.sample_logits[s * NE + i] = ldet_[i] + (sample ? out_.sigma[i] * eps[s * NE + i] : 0.0f);
            break;
        }
        case RouterType::kLogitMf:
        case RouterType::kLogitFc: {
            const bool fc = rc_.type == RouterType::kLogitFc;
            const int R = rc_.hidden, P = fc ? RouterConfig::packed_size(E) : E;
            trunk_pre_.ensure(backend_, static_cast<size_t>(N) * R);
            trunk_out_.ensure(backend_, static_cast<size_t>(N) * R);
            backend_->matmul_forward(trunk_pre_.data(), x_ND, w.router_trunk_w, nullptr, N, D, R);
            backend_->gelu_forward(trunk_out_.data(), trunk_pre_.data(), static_cast<size_t>(N) * R);
            run_matmul(dmu_, trunk_out_.data(), w.router_mean_w, nullptr, N, R, E, scratch_b_);
            run_matmul(raw_, trunk_out_.data(), w.router_scale_w, w.router_scale_b, N, R, P, scratch_c_);
            for (size_t i = 0; i < NE; ++i) out_.mu[i] = ldet_[i] + dmu_[i];
            if (sample) fill_eps();
            const double sp = rc_.prior_std;
            out_.reg.assign(N, 0.0f);
            if (fc)
                out_.chol.assign(static_cast<size_t>(N) * P, 0.0f);
            else
                out_.sigma.assign(NE, 0.0f);
#pragma omp parallel for schedule(static) if (parallel_worth(static_cast <size_t>(N) * S * (fc ? P : E)))
            for (idx_t n = 0; n < N; ++n) {
                const float* mu = out_.mu.data() + n * E;
                const float* dm = dmu_.data() + n * E;
                const float* raw = raw_.data() + n * P;
                // KL(N(dmu, Sigma) || N(0, sp^2 I)) = sum_e [log sp - log L_ee + (Sigma_ee + dmu_e^2)/(2 sp^2) - 1/2]
                double kl = 0.0;
                for (int e = 0; e < E; ++e)
                    kl += (static_cast<double>(dm[e]) * dm[e]) / (2 * sp * sp) + std::log(sp) - 0.5;
                if (fc) {
                    float* L = out_.chol.data() + n * P;
                    for (int i = 0; i < E; ++i)
                        for (int j = 0; j <= i; ++j) {
                            const int q = i * (i + 1) / 2 + j;
                            L[q] = i == j ? softplus(raw[q]) + rc_.sigma_min : raw[q];
                            kl += static_cast<double>(L[q]) * L[q] / (2 * sp * sp) - (i == j ? std::log(L[q]) : 0.0);
                        }
                    for (int s = 0; s < S; ++s) {
                        float* l = out_.sample_logits.data() + s * NE + n * E;
                        const float* ep = sample ? eps.data() + s * NE + n * E : nullptr;
                        for (int i = 0; i < E; ++i) {
                            double v = mu[i];
                            if (ep)
                                for (int j = 0; j <= i; ++j) v += static_cast<double>(L[i * (i + 1) / 2 + j]) * ep[j];
                            l[i] = static_cast<float>(v);
                        }
                    }
                } else {
                    float* sg = out_.sigma.data() + n * E;
                    for (int e = 0; e < E; ++e) {
                        sg[e] = softplus(raw[e]) + rc_.sigma_min;
                        kl += static_cast<double>(sg[e]) * sg[e] / (2 * sp * sp) - std::log(sg[e]);
                    }
                    for (int s = 0; s < S; ++s) {
                        float* l = out_.sample_logits.data() + s * NE + n * E;
                        for (int e = 0; e < E; ++e) l[e] = mu[e] + (sample ? sg[e] * eps[s * NE + n * E + e] : 0.0f);
                    }
                }
                out_.reg[n] = static_cast<float>(kl);
            }
            break;
        }
        case RouterType::kVtsr: {
            // T = temp_min + (temp_max - temp_min) * sigmoid(x w_T + b_T): bounded on both sides
            run_matmul(temp_raw_, x_ND, w.router_temp_w, w.router_temp_b, N, D, 1, scratch_b_);
            std::copy(ldet_.begin(), ldet_.end(), out_.sample_logits.begin());
            out_.temperature.resize(N);
            out_.reg.resize(N);
            for (idx_t n = 0; n < N; ++n) {
                out_.temperature[n] = rc_.temp_min + (rc_.temp_max - rc_.temp_min) * sigmoid(temp_raw_[n]);
                out_.reg[n] = -std::log(out_.temperature[n]);
            }
            break;
        }
    }
}

// p^s = softmax(l^s / T), pbar, the selection and the gates; lse(mu) for the z-loss.
void Router::select_and_gate(const RoutingContext& ctx) {
    const int N = N_, E = config_.num_experts, K = config_.top_k, S = S_;
    const size_t NE = static_cast<size_t>(N) * E;
    const bool gumbel =
        ctx.mode == RouterMode::kSample && (rc_.type == RouterType::kTempSampling || rc_.type == RouterType::kVtsr);
    const bool renormalize = config_.router_renormalize;
    const CounterRng gumbel_rng = noise_rng(ctx, layer_, kGumbelNoise);
    if (gumbel) noise_.gumbel.resize(NE);
    out_.sample_probs.resize(static_cast<size_t>(S) * NE);
    out_.probs.resize(NE);
    log_pbar_.resize(NE);
    sample_logp_.resize(static_cast<size_t>(S) * NE);
    out_.topk_idx.resize(static_cast<size_t>(N) * K);
    out_.topk_weight.resize(static_cast<size_t>(N) * K);
    lse_.resize(N);
#pragma omp parallel for schedule(static) if (parallel_worth(static_cast <size_t>(S) * NE))
    for (idx_t n = 0; n < N; ++n) {
        const float T = out_.temperature.empty() ? 1.0f : out_.temperature[n];
        std::vector<float> logp(static_cast<size_t>(S) * E), score(E);
        for (int s = 0; s < S; ++s) {
            const float* l = out_.sample_logits.data() + s * NE + n * E;
            float* lp = logp.data() + s * E;
            for (int e = 0; e < E; ++e) lp[e] = l[e] / T;
            const double lse = logsumexp(lp, E);
            float* p = out_.sample_probs.data() + s * NE + n * E;
            for (int e = 0; e < E; ++e) {
                lp[e] = static_cast<float>(lp[e] - lse);
                p[e] = std::exp(lp[e]);
                sample_logp_[s * NE + n * E + e] = lp[e];
            }
        }
        float* lpbar = log_pbar_.data() + n * E;
        for (int e = 0; e < E; ++e) {
            lpbar[e] = S == 1 ? logp[e] : static_cast<float>(logsumexp(logp.data() + e, S, E) - std::log(S));
            out_.probs[n * E + e] = std::exp(lpbar[e]);
        }
        // Select on log-probabilities or scores, never on probabilities that may underflow to 0.
        const uint64_t token = static_cast<uint64_t>(ctx.first_token + n);
        for (int e = 0; e < E; ++e) {
            score[e] = lpbar[e];
            if (gumbel) {
                noise_.gumbel[n * E + e] = -std::log(-std::log(gumbel_rng.uniform(token * E + e)));
                score[e] += noise_.gumbel[n * E + e];
            }
            if (!selection_bias_.empty()) score[e] += selection_bias_[e];
        }
        int32_t* idx = out_.topk_idx.data() + n * K;
        for (int k = 0; k < K; ++k) {  // strict '>' keeps the lower index on ties
            int best = -1;
            for (int e = 0; e < E; ++e) {
                if (std::find(idx, idx + k, e) != idx + k) continue;
                if (best < 0 || score[e] > score[best]) best = e;
            }
            idx[k] = best;
        }
        float* g = out_.topk_weight.data() + n * K;
        double m = -INFINITY, sum = 0.0;
        for (int k = 0; k < K; ++k) m = std::max(m, static_cast<double>(lpbar[idx[k]]));
        for (int k = 0; k < K; ++k) sum += std::exp(lpbar[idx[k]] - m);
        for (int k = 0; k < K; ++k)
            g[k] = renormalize ? static_cast<float>(std::exp(lpbar[idx[k]] - m) / sum) : std::exp(lpbar[idx[k]]);
        lse_[n] = static_cast<float>(logsumexp(out_.mu.data() + n * E, E));
    }
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

const RouterNoise& Router::noise() const {
    // mc_dropout's masks live on the backend only while used; the host copy is drawn on request.
    if (rc_.type == RouterType::kMcDropout && mode_ == RouterMode::kSample && noise_.dropout_mask.empty() && N_ > 0) {
        const int N = N_, D = config_.d_model;
        noise_.dropout_mask.resize(static_cast<size_t>(S_) * N * D);
        CpuBackend host;  // the CPU implementation of the same op
        for (int s = 0; s < S_; ++s)
            host.dropout_mask(noise_.dropout_mask.data() + static_cast<size_t>(s) * N * D, N, D, dropout_draw(s));
    }
    return noise_;
}

void Router::upload_decision() {
    const size_t NK = static_cast<size_t>(N_) * config_.top_k;
    backend_->upload(topk_idx_NK_.data(), out_.topk_idx.data(), NK * sizeof(int32_t));
    backend_->upload(topk_weight_NK_.data(), out_.topk_weight.data(), NK * sizeof(float));
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
    const size_t NE = static_cast<size_t>(N) * E, ND = static_cast<size_t>(N) * D;
    Buffer<float>& dtrunk = scratch_->router_dtrunk;
    Buffer<float>& x2 = scratch_->router_x_ND;
    Buffer<float>& mask = scratch_->router_mask_ND;
    if (fast_path()) {
        probs_NE_.ensure(backend_, NE);
        scratch_a_.ensure(backend_, NE);
        Buffer<float>& aux_dev = scratch_c_;
        to_backend(aux_dev, aux_dprobs_E);
        backend_->router_topk_backward(scratch_a_.data(), dtopk_weight_NK, probs_NE_.data(), lse_N_.data(),
                                       topk_idx_NK_.data(), topk_weight_NK_.data(), aux_dev.data(), z_coef, N, E, K,
                                       config_.router_renormalize);
        backend_->matmul_backward(dx_ND, dw.router_w, nullptr, scratch_a_.data(), x_ND, w.router_w, N, D, E, true);
        return;
    }
    BMOE_REQUIRE(training_, "router backward after an evaluation forward: forward with RoutingContext.training");
    std::vector<float> dgate;
    download_to(backend_, dgate, dtopk_weight_NK, static_cast<size_t>(N) * K);

    // ---- 1. gates -> d logits of every sample (dl_), d temperature, z-loss -> d mu ----
    std::vector<float> dl(static_cast<size_t>(S) * NE), dmu_z(NE), dtemp(out_.temperature.empty() ? 0 : N);
    const bool renormalize = config_.router_renormalize;
#pragma omp parallel for schedule(static) if (parallel_worth(static_cast <size_t>(S) * NE))
    for (idx_t n = 0; n < N; ++n) {
        const int32_t* idx = out_.topk_idx.data() + n * K;
        const float* g = out_.topk_weight.data() + n * K;
        const float* lpbar = log_pbar_.data() + n * E;
        // d log pbar[idx_k]: renormalised gates are a softmax over the selected log pbar
        std::vector<double> dlsel(K);
        double dgg = 0.0;
        for (int k = 0; k < K; ++k) dgg += static_cast<double>(dgate[n * K + k]) * g[k];
        for (int k = 0; k < K; ++k)
            dlsel[k] = renormalize ? g[k] * (dgate[n * K + k] - dgg) : static_cast<double>(dgate[n * K + k]) * g[k];
        const float T = out_.temperature.empty() ? 1.0f : out_.temperature[n];
        double dT = 0.0;
        std::vector<double> a(E);
        for (int s = 0; s < S; ++s) {
            const float* p = out_.sample_probs.data() + s * NE + n * E;
            const float* l = out_.sample_logits.data() + s * NE + n * E;
            // a_e = p^s_e * d loss / d p^s_e: aux through pbar (1/S each), gates through log pbar
            for (int e = 0; e < E; ++e) a[e] = static_cast<double>(p[e]) * aux_dprobs_E[e] / S;
            for (int k = 0; k < K; ++k) {
                const int e = idx[k];
                // p^s / (S pbar): this sample's share of pbar, from log-probabilities (no underflow)
                a[e] += dlsel[k] * std::exp(sample_logp_[s * NE + n * E + e] - lpbar[e]) / S;
            }
            double sa = 0.0;
            for (int e = 0; e < E; ++e) sa += a[e];
            float* d = dl.data() + s * NE + n * E;
            for (int e = 0; e < E; ++e) {
                const double dz = a[e] - p[e] * sa;  // d loss / d (l_e / T)
                d[e] = static_cast<float>(dz / T);
                dT -= dz * l[e] / (static_cast<double>(T) * T);
            }
        }
        if (!dtemp.empty()) dtemp[n] = static_cast<float>(dT);
        // z-loss on mu: d (c lse^2) / d mu_e = 2 c lse softmax(mu)_e
        const float* mu = out_.mu.data() + n * E;
        for (int e = 0; e < E; ++e)
            dmu_z[n * E + e] = static_cast<float>(2.0 * z_coef * lse_[n] * std::exp(mu[e] - lse_[n]));
    }

    // ---- 2. the family's own chain to its parameters and to x ----
    std::vector<float> dldet = dmu_z;  // d loss / d (x W_r^T)
    auto add_samples = [&](std::vector<float>& dst) {
        for (int s = 0; s < S; ++s)
            for (size_t i = 0; i < NE; ++i) dst[i] += dl[s * NE + i];
    };
    auto accumulate_host = [&](float* dst, const std::vector<float>& src) {  // backend dst += host src
        if (dst != nullptr) backend_->accumulate(dst, to_backend(scratch_w_, src), src.size());  // null: frozen
    };
    switch (rc_.type) {
        case RouterType::kTopK:
        case RouterType::kTempSampling:
        case RouterType::kSwag:
            add_samples(dldet);
            break;
        case RouterType::kMcDropout: {
            if (mode_ != RouterMode::kSample) {
                add_samples(dldet);
                break;
            }
            std::vector<float> dls(NE);
            dtrunk.ensure(backend_, ND);
            for (int s = 0; s < S; ++s) {  // dx += (dl^s W) * mask^s, the mask redrawn as in forward
                const float* xs = dropout_input(x_ND, s);
                std::copy(dl.begin() + static_cast<long>(s * NE), dl.begin() + static_cast<long>((s + 1) * NE),
                          dls.begin());
                backend_->matmul_backward(dtrunk.data(), dw.router_w, nullptr, to_backend(scratch_b_, dls), xs,
                                          w.router_w, N, D, E, false);
                backend_->mul(dtrunk.data(), dtrunk.data(), mask.data(), ND);
                if (dx_ND != nullptr) backend_->accumulate(dx_ND, dtrunk.data(), ND);
            }
            break;
        }
        case RouterType::kEnsemble: {
            const int M = rc_.ensemble_size;
            std::vector<float> dmembers(static_cast<size_t>(N) * (M - 1) * E, 0.0f);
            if (noise_.member.empty()) {  // every member was a sample; mu = the members' mean
                for (idx_t n = 0; n < N; ++n)
                    for (int e = 0; e < E; ++e) {
                        dldet[n * E + e] = dl[n * E + e] + dmu_z[n * E + e] / M;
                        for (int m = 1; m < M; ++m)
                            dmembers[(n * (M - 1) + (m - 1)) * E + e] =
                                dl[(m * static_cast<size_t>(N) + n) * E + e] + dmu_z[n * E + e] / M;
                    }
            }
            for (idx_t n = 0; n < N && !noise_.member.empty(); ++n) {
                const int m = noise_.member[n];
                for (int e = 0; e < E; ++e) {
                    const float d = dl[n * E + e] + dmu_z[n * E + e];
                    if (m == 0)
                        dldet[n * E + e] = d;
                    else {
                        dldet[n * E + e] = 0.0f;
                        dmembers[(n * (M - 1) + (m - 1)) * E + e] = d;
                    }
                }
            }
            backend_->matmul_backward(dx_ND, dw.router_ensemble_w, nullptr, to_backend(scratch_b_, dmembers), x_ND,
                                      w.router_ensemble_w, N, D, (M - 1) * E, true);
            break;
        }
        case RouterType::kWeightMfvi: {
            add_samples(dldet);
            const size_t P = static_cast<size_t>(E) * D;
            // d var_e = sum_s dl^s_e eps^s_e / (2 sd_e);  var = (x*x) (sigma^2)^T
            std::vector<float> dvar(NE, 0.0f);
            const std::vector<float>& eps = noise_.eps;
            if (!eps.empty())
                for (int s = 0; s < S; ++s)
                    for (size_t i = 0; i < NE; ++i)
                        dvar[i] += dl[s * NE + i] * eps[s * NE + i] / (2.0f * out_.sigma[i]);
            std::vector<float> rho, wmu, sigma2(P);
            download_to(backend_, rho, w.router_rho, P);
            download_to(backend_, wmu, w.router_w, P);
            for (size_t j = 0; j < P; ++j) sigma2[j] = softplus(rho[j]) * softplus(rho[j]);
            x2.ensure(backend_, ND);
            backend_->mul(x2.data(), x_ND, x_ND, ND);
            dsigma2_.ensure(backend_, P);
            dsigma2_.zero();  // matmul_backward adds into dW
            dtrunk.ensure(backend_, ND);
            // dtrunk = d loss / d (x*x), dsigma2 = d loss / d sigma^2
            backend_->matmul_backward(dtrunk.data(), dsigma2_.data(), nullptr, to_backend(scratch_b_, dvar), x2.data(),
                                      to_backend(scratch_w_, sigma2), N, D, E, false);
            std::vector<float> ds2;
            download_to(backend_, ds2, dsigma2_.data(), P);
            backend_->mul(dtrunk.data(), dtrunk.data(), x_ND, ND);  // d x = 2 x d(x*x)
            backend_->scale(dtrunk.data(), 2.0f, ND);
            if (dx_ND != nullptr) backend_->accumulate(dx_ND, dtrunk.data(), ND);
            std::vector<float> drho(P), dwmu(P);
            const double sp2 = static_cast<double>(rc_.weight_prior_std) * rc_.weight_prior_std;
            for (size_t j = 0; j < P; ++j) {  // + the weight KL: d/dsigma = sigma/sp^2 - 1/sigma, d/dmu = mu/sp^2
                const double sigma = softplus(rho[j]);
                const double dsigma = ds2[j] * 2.0 * sigma + weight_reg_coef * (sigma / sp2 - 1.0 / sigma);
                drho[j] = static_cast<float>(dsigma * sigmoid(rho[j]));
                dwmu[j] = static_cast<float>(weight_reg_coef * wmu[j] / sp2);
            }
            accumulate_host(dw.router_rho, drho);
            accumulate_host(dw.router_w, dwmu);
            break;
        }
        case RouterType::kLogitMf:
        case RouterType::kLogitFc: {
            add_samples(dldet);
            const bool fc = rc_.type == RouterType::kLogitFc;
            const int R = rc_.hidden, P = fc ? RouterConfig::packed_size(E) : E;
            const double sp2 = static_cast<double>(rc_.prior_std) * rc_.prior_std;
            std::vector<float> ddmu(NE), draw(static_cast<size_t>(N) * P);
            const std::vector<float>& eps = noise_.eps;
#pragma omp parallel for schedule(static) if (parallel_worth(static_cast <size_t>(N) * S * P))
            for (idx_t n = 0; n < N; ++n) {
                for (int e = 0; e < E; ++e)
                    ddmu[n * E + e] = dldet[n * E + e] + static_cast<float>(reg_coef * dmu_[n * E + e] / sp2);
                const float* raw = raw_.data() + n * P;
                float* dr = draw.data() + n * P;
                if (fc) {
                    const float* L = out_.chol.data() + n * P;
                    for (int i = 0; i < E; ++i)
                        for (int j = 0; j <= i; ++j) {
                            const int q = i * (i + 1) / 2 + j;
                            double dL = reg_coef * (L[q] / sp2 - (i == j ? 1.0 / L[q] : 0.0));
                            if (!eps.empty())
                                for (int s = 0; s < S; ++s)
                                    dL += static_cast<double>(dl[s * NE + n * E + i]) * eps[s * NE + n * E + j];
                            dr[q] = static_cast<float>(i == j ? dL * sigmoid(raw[q]) : dL);
                        }
                } else {
                    const float* sg = out_.sigma.data() + n * E;
                    for (int e = 0; e < E; ++e) {
                        double ds = reg_coef * (sg[e] / sp2 - 1.0 / sg[e]);
                        if (!eps.empty())
                            for (int s = 0; s < S; ++s)
                                ds += static_cast<double>(dl[s * NE + n * E + e]) * eps[s * NE + n * E + e];
                        dr[e] = static_cast<float>(ds * sigmoid(raw[e]));
                    }
                }
            }
            dtrunk.ensure(backend_, static_cast<size_t>(N) * R);
            backend_->matmul_backward(dtrunk.data(), dw.router_mean_w, nullptr, to_backend(scratch_b_, ddmu),
                                      trunk_out_.data(), w.router_mean_w, N, R, E, false);
            backend_->matmul_backward(dtrunk.data(), dw.router_scale_w, dw.router_scale_b, to_backend(scratch_c_, draw),
                                      trunk_out_.data(), w.router_scale_w, N, R, P, true);
            scratch_a_.ensure(backend_, static_cast<size_t>(N) * R);
            backend_->gelu_backward(scratch_a_.data(), dtrunk.data(), trunk_pre_.data(), static_cast<size_t>(N) * R);
            backend_->matmul_backward(dx_ND, dw.router_trunk_w, nullptr, scratch_a_.data(), x_ND, w.router_trunk_w, N,
                                      D, R, true);
            break;
        }
        case RouterType::kVtsr: {
            add_samples(dldet);
            std::vector<float> dt(N);
            for (idx_t n = 0; n < N; ++n) {  // + d(-log T)/dT = -1/T; T = lo + (hi - lo) sigmoid(t)
                const float sg = sigmoid(temp_raw_[n]);
                const double dT = dtemp[n] - reg_coef / out_.temperature[n];
                dt[n] = static_cast<float>(dT * (rc_.temp_max - rc_.temp_min) * sg * (1.0f - sg));
            }
            backend_->matmul_backward(dx_ND, dw.router_temp_w, dw.router_temp_b, to_backend(scratch_b_, dt), x_ND,
                                      w.router_temp_w, N, D, 1, true);
            break;
        }
    }
    backend_->matmul_backward(dx_ND, dw.router_w, nullptr, to_backend(scratch_a_, dldet), x_ND, w.router_w, N, D, E,
                              true);
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
