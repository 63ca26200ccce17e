// router_rows.h -- the per-token math of every router family ([S, N, E] work: sampling, KL, softmax,
// selection, gates and their gradients), one function per stage, one definition for both backends:
// the CPU runs it in an OpenMP loop over tokens, CUDA in one thread per token (E, K, S are small).
//
// Router (model/router.cpp) owns the buffers and runs the GEMMs around these stages; the stages
// only read and write the buffers named in RouterRows. docs/routers.md has the equations.
// Noise is drawn here from CounterRng keyed by the GLOBAL token id, so the CPU and the GPU draw the
// same values (to a few ulps of their log/cos) whatever the threads, ranks or sharding.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "model/rng.h"
#include "model/router_config.h"

namespace bmoe::model {

enum class RouterStage {
    kSample,          // l^s (unless GEMMs wrote them), mu, sigma or L, T, eps, member, regulariser
    kSelect,          // log p^s, p^s, pbar, Gumbel noise, top-k / Sample-K, gates, lse(mu), token stats
    kGateBackward,    // d gates, aux and z-loss -> d l^s, d T, d mu (z-loss)
    kFamilyBackward,  // -> d ldet and the family's head gradients (d dmu, d raw, d var, d T-pre, d members)
};

// Columns of the token statistics row kSelect writes (after the E columns of pbar).
enum RouterStatsColumn { kStatsLse = 0, kStatsReg = 1, kStatsSigma = 2, kStatsTemperature = 3, kStatsExtra = 4 };

// One stage's arguments. Every pointer is backend memory, null where the family or the mode has
// no such tensor. P = packed L size E(E+1)/2 (logit_fc) or E (logit_mf); M = ensemble members.
struct RouterRows {
    RouterType type = RouterType::kTopK;
    int N = 0, E = 0, K = 0, S = 1, P = 0, M = 1;
    bool logits_given = false;      // l^s already written by GEMMs (mc_dropout and SWAG samples)
    bool member_per_token = false;  // ensemble training: each token routed by one drawn member
    bool renormalize = true;        // gates renormalised over the K selected
    float fixed_temperature = 1.0f, temp_min = 0.5f, temp_max = 2.0f, sigma_min = 0.0f, prior_std = 1.0f;
    uint64_t first_token = 0;  // global id of token 0
    // Noise streams; eps_SNE / gumbel_NE non-null means "draw" (sampling mode only).
    CounterRng eps_rng{0, 0}, gumbel_rng{0, 0}, member_rng{0, 0};

    // kSample in
    const float* ldet_NE = nullptr;      // x W_r^T
    const float* dmu_NE = nullptr;       // logit_mf/fc: mean head
    const float* raw_NP = nullptr;       // logit_mf/fc: scale head (pre-softplus)
    const float* var_NE = nullptr;       // weight_mfvi: (x*x) (sigma^2)^T
    const float* temp_raw_N = nullptr;   // vtsr: pre-sigmoid temperature
    const float* members_NME = nullptr;  // ensemble: members 1..M-1, [N, M-1, E]
    // kSample out
    float* sample_logits_SNE = nullptr;
    float* mu_NE = nullptr;
    float* sigma_NE = nullptr;
    float* chol_NP = nullptr;
    float* eps_SNE = nullptr;
    float* temperature_N = nullptr;
    float* reg_N = nullptr;
    int32_t* member_N = nullptr;
    // kSelect in: selection_bias_E; out:
    const float* selection_bias_E = nullptr;
    float* sample_logp_SNE = nullptr;  // log p^s (p^s itself underflows at small T)
    float* sample_probs_SNE = nullptr;
    float* log_pbar_NE = nullptr;
    float* probs_NE = nullptr;  // pbar
    float* gumbel_NE = nullptr;
    float* lse_N = nullptr;  // lse(mu), for the z-loss
    int32_t* topk_idx_NK = nullptr;
    float* topk_weight_NK = nullptr;
    float* stats_NC = nullptr;  // [N, E + kStatsExtra]: pbar, then RouterStatsColumn
    // kGateBackward in
    const float* dgate_NK = nullptr;      // d loss / d gates
    const float* aux_dprobs_E = nullptr;  // d loss / d pbar[n, e], the same for every token
    float z_coef = 0.0f;                  // d loss / d sum_n lse_n^2
    float reg_coef = 0.0f;                // d loss / d sum_n reg_n
    // kGateBackward out
    float* dl_SNE = nullptr;    // d loss / d l^s
    float* dtemp_N = nullptr;   // d loss / d T (families with a temperature)
    float* dmu_z_NE = nullptr;  // z-loss d loss / d mu
    // kFamilyBackward out
    float* dldet_NE = nullptr;
    float* ddmu_NE = nullptr;
    float* draw_NP = nullptr;
    float* dvar_NE = nullptr;
    float* dtemp_raw_N = nullptr;
    float* dmembers_NME = nullptr;
};

namespace router_math {

BMOE_HOST_DEVICE inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }
BMOE_HOST_DEVICE inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// log sum_i exp(v[i * stride]) over n values, in double.
BMOE_HOST_DEVICE inline double logsumexp(const float* v, int n, size_t stride = 1) {
    double m = -INFINITY;
    for (int i = 0; i < n; ++i) {
        const double x = v[i * stride];
        if (x > m) m = x;
    }
    if (m == -INFINITY) return m;
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += std::exp(v[i * stride] - m);
    return m + std::log(s);
}

// ---- kSample ----------------------------------------------------------------------------------

BMOE_HOST_DEVICE inline void sample_row(const RouterRows& a, int n) {
    const int E = a.E, S = a.S;
    const size_t NE = static_cast<size_t>(a.N) * E, row = static_cast<size_t>(n) * E;
    const float* ldet = a.ldet_NE + row;
    float* mu = a.mu_NE + row;
    const uint64_t token = a.first_token + static_cast<uint64_t>(n);
    if (a.eps_SNE != nullptr) {  // eps[s, n, e] ~ N(0, 1); experts 2p and 2p+1 share one draw
        const int pairs = (E + 1) / 2;
        for (int s = 0; s < S; ++s) {
            float* eps = a.eps_SNE + s * NE + row;
            for (int p = 0; p < pairs; ++p) {
                float second = 0.0f;
                a.eps_rng.normal_pair((token * S + s) * pairs + p, &eps[2 * p], &second);
                if (2 * p + 1 < E) eps[2 * p + 1] = second;
            }
        }
    }
    const float* eps = a.eps_SNE != nullptr ? a.eps_SNE + row : nullptr;  // sample s at eps + s * NE
    for (int e = 0; e < E; ++e) mu[e] = ldet[e];
    switch (a.type) {
        case RouterType::kTopK:
        case RouterType::kTempSampling:
        case RouterType::kMcDropout:
        case RouterType::kSwag:
        case RouterType::kVtsr:
            if (!a.logits_given)
                for (int e = 0; e < E; ++e) a.sample_logits_SNE[row + e] = ldet[e];
            if (a.type == RouterType::kTempSampling) a.temperature_N[n] = a.fixed_temperature;
            if (a.type == RouterType::kVtsr) {  // T = lo + (hi - lo) sigmoid(t): bounded on both sides
                const float T = a.temp_min + (a.temp_max - a.temp_min) * sigmoid(a.temp_raw_N[n]);
                a.temperature_N[n] = T;
                a.reg_N[n] = -std::log(T);
            }
            break;
        case RouterType::kEnsemble: {
            const int M = a.M;
            const float* others = a.members_NME + static_cast<size_t>(n) * (M - 1) * E;
            if (a.member_per_token) {  // training: each token is routed by one member, drawn per token
                const int m = static_cast<int>(a.member_rng.bits(token) % static_cast<uint64_t>(M));
                a.member_N[n] = m;
                const float* l = m == 0 ? ldet : others + static_cast<size_t>(m - 1) * E;
                for (int e = 0; e < E; ++e) a.sample_logits_SNE[row + e] = mu[e] = l[e];
            } else {  // inference: every member is one sample; mu = the members' mean logits
                for (int e = 0; e < E; ++e) {
                    double mean = 0.0;
                    for (int m = 0; m < M; ++m) {
                        const float l = m == 0 ? ldet[e] : others[static_cast<size_t>(m - 1) * E + e];
                        a.sample_logits_SNE[m * NE + row + e] = l;
                        mean += l;
                    }
                    mu[e] = static_cast<float>(mean / M);
                }
            }
            break;
        }
        case RouterType::kWeightMfvi: {  // local reparameterisation: l = x mu^T + sqrt(var) eps
            float* sigma = a.sigma_NE + row;
            for (int e = 0; e < E; ++e) sigma[e] = std::sqrt(a.var_NE[row + e] + 1e-12f);
            for (int s = 0; s < S; ++s)
                for (int e = 0; e < E; ++e)
                    a.sample_logits_SNE[s * NE + row + e] = ldet[e] + (eps ? sigma[e] * eps[s * NE + e] : 0.0f);
            break;
        }
        case RouterType::kLogitMf:
        case RouterType::kLogitFc: {
            const bool fc = a.type == RouterType::kLogitFc;
            const int P = a.P;
            const float* dm = a.dmu_NE + row;
            const float* raw = a.raw_NP + static_cast<size_t>(n) * P;
            const double sp = a.prior_std;
            for (int e = 0; e < E; ++e) mu[e] = ldet[e] + dm[e];
            // KL(N(dmu, Sigma) || N(0, sp^2 I)) = sum_e [log sp - log L_ee + (Sigma_ee + dmu_e^2)/(2 sp^2) - 1/2]
            double kl = 0.0;
            for (int e = 0; e < E; ++e) kl += (static_cast<double>(dm[e]) * dm[e]) / (2 * sp * sp) + std::log(sp) - 0.5;
            if (fc) {
                float* L = a.chol_NP + static_cast<size_t>(n) * P;
                for (int i = 0; i < E; ++i)
                    for (int j = 0; j <= i; ++j) {
                        const int q = i * (i + 1) / 2 + j;
                        L[q] = i == j ? softplus(raw[q]) + a.sigma_min : raw[q];
                        kl += static_cast<double>(L[q]) * L[q] / (2 * sp * sp) - (i == j ? std::log(L[q]) : 0.0);
                    }
                for (int s = 0; s < S; ++s) {
                    float* l = a.sample_logits_SNE + s * NE + row;
                    const float* ep = eps ? eps + s * NE : nullptr;
                    for (int i = 0; i < E; ++i) {
                        double v = mu[i];
                        if (ep)
                            for (int j = 0; j <= i; ++j) v += static_cast<double>(L[i * (i + 1) / 2 + j]) * ep[j];
                        l[i] = static_cast<float>(v);
                    }
                }
            } else {
                float* sg = a.sigma_NE + row;
                for (int e = 0; e < E; ++e) {
                    sg[e] = softplus(raw[e]) + a.sigma_min;
                    kl += static_cast<double>(sg[e]) * sg[e] / (2 * sp * sp) - std::log(sg[e]);
                }
                for (int s = 0; s < S; ++s) {
                    float* l = a.sample_logits_SNE + s * NE + row;
                    for (int e = 0; e < E; ++e) l[e] = mu[e] + (eps ? sg[e] * eps[s * NE + e] : 0.0f);
                }
            }
            a.reg_N[n] = static_cast<float>(kl);
            break;
        }
    }
}

// ---- kSelect ----------------------------------------------------------------------------------

// Selection score of expert e: log pbar (+ Gumbel noise for Sample-K) (+ the aux-free selection bias).
BMOE_HOST_DEVICE inline float selection_score(const RouterRows& a, const float* lpbar, const float* gumbel, int e) {
    float score = lpbar[e];
    if (gumbel) score += gumbel[e];
    if (a.selection_bias_E) score += a.selection_bias_E[e];
    return score;
}

BMOE_HOST_DEVICE inline void select_row(const RouterRows& a, int n) {
    const int E = a.E, K = a.K, S = a.S;
    const size_t NE = static_cast<size_t>(a.N) * E, row = static_cast<size_t>(n) * E;
    const float T = a.temperature_N ? a.temperature_N[n] : 1.0f;
    for (int s = 0; s < S; ++s) {
        const float* l = a.sample_logits_SNE + s * NE + row;
        float* lp = a.sample_logp_SNE + s * NE + row;
        float* p = a.sample_probs_SNE + s * NE + row;
        for (int e = 0; e < E; ++e) lp[e] = l[e] / T;
        const double lse = logsumexp(lp, E);
        for (int e = 0; e < E; ++e) {
            lp[e] = static_cast<float>(lp[e] - lse);
            p[e] = std::exp(lp[e]);
        }
    }
    float* lpbar = a.log_pbar_NE + row;
    for (int e = 0; e < E; ++e) {
        const float* lp = a.sample_logp_SNE + row + e;
        lpbar[e] = S == 1 ? lp[0] : static_cast<float>(logsumexp(lp, S, NE) - std::log(static_cast<double>(S)));
        a.probs_NE[row + e] = std::exp(lpbar[e]);
    }
    // Select on log-probabilities or scores, never on probabilities that may underflow to 0.
    float* gumbel = a.gumbel_NE ? a.gumbel_NE + row : nullptr;
    const uint64_t token = a.first_token + static_cast<uint64_t>(n);
    for (int e = 0; gumbel && e < E; ++e) gumbel[e] = -std::log(-std::log(a.gumbel_rng.uniform(token * E + e)));
    int32_t* idx = a.topk_idx_NK + static_cast<size_t>(n) * K;
    for (int k = 0; k < K; ++k) {  // strict '>' keeps the lower index on ties
        int best = -1;
        float best_score = 0.0f;
        for (int e = 0; e < E; ++e) {
            bool taken = false;
            for (int j = 0; j < k; ++j) taken = taken || idx[j] == e;
            if (taken) continue;
            const float score = selection_score(a, lpbar, gumbel, e);
            if (best < 0 || score > best_score) {
                best = e;
                best_score = score;
            }
        }
        idx[k] = best;
    }
    float* g = a.topk_weight_NK + static_cast<size_t>(n) * K;
    double m = -INFINITY, sum = 0.0;
    for (int k = 0; k < K; ++k) m = m > lpbar[idx[k]] ? m : static_cast<double>(lpbar[idx[k]]);
    for (int k = 0; k < K; ++k) sum += std::exp(lpbar[idx[k]] - m);
    for (int k = 0; k < K; ++k)
        g[k] = a.renormalize ? static_cast<float>(std::exp(lpbar[idx[k]] - m) / sum) : std::exp(lpbar[idx[k]]);
    const float lse_mu = static_cast<float>(logsumexp(a.mu_NE + row, E));
    a.lse_N[n] = lse_mu;
    // statistics row: pbar, lse(mu), regulariser, mean sigma (or mean diag L), temperature
    float* st = a.stats_NC + static_cast<size_t>(n) * (E + kStatsExtra);
    for (int e = 0; e < E; ++e) st[e] = a.probs_NE[row + e];
    double mean_sigma = 0.0;
    for (int e = 0; a.sigma_NE && e < E; ++e) mean_sigma += a.sigma_NE[row + e] / static_cast<double>(E);
    for (int e = 0; a.chol_NP && e < E; ++e)
        mean_sigma += a.chol_NP[static_cast<size_t>(n) * a.P + e * (e + 1) / 2 + e] / static_cast<double>(E);
    st[E + kStatsLse] = lse_mu;
    st[E + kStatsReg] = a.reg_N ? a.reg_N[n] : 0.0f;
    st[E + kStatsSigma] = static_cast<float>(mean_sigma);
    st[E + kStatsTemperature] = a.temperature_N ? a.temperature_N[n] : 0.0f;
}

// ---- kGateBackward ------------------------------------------------------------------------------

// a_e = p^s_e * d loss / d p^s_e for sample s: the aux loss through pbar (1/S each), and the gate of
// expert e (when selected) through log pbar, weighted by p^s / (S pbar), this sample's share of
// pbar, from log-probabilities (no underflow). dlsel(k) = d loss / d log pbar[idx_k].
BMOE_HOST_DEVICE inline double gate_share(const RouterRows& a, int n, int s, int e, const float* p, double dgg) {
    const int E = a.E, K = a.K, S = a.S;
    const size_t NE = static_cast<size_t>(a.N) * E, row = static_cast<size_t>(n) * E;
    double share = static_cast<double>(p[e]) * (a.aux_dprobs_E ? a.aux_dprobs_E[e] : 0.0f) / S;
    const int32_t* idx = a.topk_idx_NK + static_cast<size_t>(n) * K;
    for (int k = 0; k < K; ++k) {
        if (idx[k] != e) continue;
        const float dg = a.dgate_NK[static_cast<size_t>(n) * K + k],
                    g = a.topk_weight_NK[static_cast<size_t>(n) * K + k];
        // renormalised gates are a softmax over the selected log pbar
        const double dlsel = a.renormalize ? g * (dg - dgg) : static_cast<double>(dg) * g;
        share += dlsel * std::exp(a.sample_logp_SNE[s * NE + row + e] - a.log_pbar_NE[row + e]) / S;
    }
    return share;
}

BMOE_HOST_DEVICE inline void gate_backward_row(const RouterRows& a, int n) {
    const int E = a.E, K = a.K, S = a.S;
    const size_t NE = static_cast<size_t>(a.N) * E, row = static_cast<size_t>(n) * E;
    double dgg = 0.0;
    for (int k = 0; k < K; ++k)
        dgg += static_cast<double>(a.dgate_NK[static_cast<size_t>(n) * K + k]) *
               a.topk_weight_NK[static_cast<size_t>(n) * K + k];
    const float T = a.temperature_N ? a.temperature_N[n] : 1.0f;
    double dT = 0.0;
    for (int s = 0; s < S; ++s) {
        const float* p = a.sample_probs_SNE + s * NE + row;
        const float* l = a.sample_logits_SNE + s * NE + row;
        double sa = 0.0;
        for (int e = 0; e < E; ++e) sa += gate_share(a, n, s, e, p, dgg);
        float* d = a.dl_SNE + s * NE + row;
        for (int e = 0; e < E; ++e) {
            const double dz = gate_share(a, n, s, e, p, dgg) - p[e] * sa;  // d loss / d (l_e / T)
            d[e] = static_cast<float>(dz / T);
            dT -= dz * l[e] / (static_cast<double>(T) * T);
        }
    }
    if (a.dtemp_N) a.dtemp_N[n] = static_cast<float>(dT);
    // z-loss on mu: d (c lse^2) / d mu_e = 2 c lse softmax(mu)_e
    const float* mu = a.mu_NE + row;
    const float lse = a.lse_N[n];
    for (int e = 0; e < E; ++e) a.dmu_z_NE[row + e] = static_cast<float>(2.0 * a.z_coef * lse * std::exp(mu[e] - lse));
}

// ---- kFamilyBackward ----------------------------------------------------------------------------

BMOE_HOST_DEVICE inline void family_backward_row(const RouterRows& a, int n) {
    const int E = a.E, S = a.S;
    const size_t NE = static_cast<size_t>(a.N) * E, row = static_cast<size_t>(n) * E;
    const float* dl = a.dl_SNE + row;  // sample s at dl + s * NE
    const float* dmu_z = a.dmu_z_NE + row;
    float* dldet = a.dldet_NE + row;  // d loss / d (x W_r^T)
    for (int e = 0; e < E; ++e) dldet[e] = dmu_z[e];
    // Families whose samples are l_det + noise: every sample's gradient reaches l_det. (mc_dropout's
    // and the ensemble's samples come from their own GEMMs: the Router backpropagates those.)
    const bool samples_reach_ldet =
        a.type != RouterType::kEnsemble && !(a.type == RouterType::kMcDropout && a.logits_given);
    if (samples_reach_ldet)
        for (int s = 0; s < S; ++s)
            for (int e = 0; e < E; ++e) dldet[e] += dl[s * NE + e];
    switch (a.type) {
        case RouterType::kEnsemble: {
            const int M = a.M;
            float* dm = a.dmembers_NME + static_cast<size_t>(n) * (M - 1) * E;  // members 1..M-1
            if (!a.member_per_token) {  // every member was a sample; mu = the members' mean
                for (int e = 0; e < E; ++e) {
                    dldet[e] = dl[e] + dmu_z[e] / M;
                    for (int m = 1; m < M; ++m) dm[static_cast<size_t>(m - 1) * E + e] = dl[m * NE + e] + dmu_z[e] / M;
                }
            } else {
                const int m = a.member_N[n];
                for (int e = 0; e < E; ++e) {
                    const float d = dl[e] + dmu_z[e];
                    for (int j = 1; j < M; ++j) dm[static_cast<size_t>(j - 1) * E + e] = j == m ? d : 0.0f;
                    dldet[e] = m == 0 ? d : 0.0f;
                }
            }
            break;
        }
        case RouterType::kWeightMfvi: {  // d var_e = sum_s dl^s_e eps^s_e / (2 sd_e);  var = (x*x) (sigma^2)^T
            float* dvar = a.dvar_NE + row;
            const float* sigma = a.sigma_NE + row;
            for (int e = 0; e < E; ++e) dvar[e] = 0.0f;
            if (a.eps_SNE)
                for (int s = 0; s < S; ++s)
                    for (int e = 0; e < E; ++e)
                        dvar[e] += dl[s * NE + e] * a.eps_SNE[s * NE + row + e] / (2.0f * sigma[e]);
            break;
        }
        case RouterType::kLogitMf:
        case RouterType::kLogitFc: {
            const int P = a.P;
            const double sp2 = static_cast<double>(a.prior_std) * a.prior_std;
            const float* dmu = a.dmu_NE + row;
            const float* raw = a.raw_NP + static_cast<size_t>(n) * P;
            const float* eps = a.eps_SNE ? a.eps_SNE + row : nullptr;
            float* dr = a.draw_NP + static_cast<size_t>(n) * P;
            for (int e = 0; e < E; ++e) a.ddmu_NE[row + e] = dldet[e] + static_cast<float>(a.reg_coef * dmu[e] / sp2);
            if (a.type == RouterType::kLogitFc) {
                const float* L = a.chol_NP + static_cast<size_t>(n) * P;
                for (int i = 0; i < E; ++i)
                    for (int j = 0; j <= i; ++j) {
                        const int q = i * (i + 1) / 2 + j;
                        double dL = a.reg_coef * (L[q] / sp2 - (i == j ? 1.0 / L[q] : 0.0));
                        for (int s = 0; eps && s < S; ++s) dL += static_cast<double>(dl[s * NE + i]) * eps[s * NE + j];
                        dr[q] = static_cast<float>(i == j ? dL * sigmoid(raw[q]) : dL);
                    }
            } else {
                const float* sg = a.sigma_NE + row;
                for (int e = 0; e < E; ++e) {
                    double ds = a.reg_coef * (sg[e] / sp2 - 1.0 / sg[e]);
                    for (int s = 0; eps && s < S; ++s) ds += static_cast<double>(dl[s * NE + e]) * eps[s * NE + e];
                    dr[e] = static_cast<float>(ds * sigmoid(raw[e]));
                }
            }
            break;
        }
        case RouterType::kVtsr: {  // + d(-log T)/dT = -1/T; T = lo + (hi - lo) sigmoid(t)
            const float sg = sigmoid(a.temp_raw_N[n]);
            const double dT = a.dtemp_N[n] - a.reg_coef / a.temperature_N[n];
            a.dtemp_raw_N[n] = static_cast<float>(dT * (a.temp_max - a.temp_min) * sg * (1.0f - sg));
            break;
        }
        default:
            break;
    }
}

}  // namespace router_math

// Runs one stage for token n (what each backend's router_rows loops over).
BMOE_HOST_DEVICE inline void router_row(RouterStage stage, const RouterRows& a, int n) {
    switch (stage) {
        case RouterStage::kSample:
            router_math::sample_row(a, n);
            break;
        case RouterStage::kSelect:
            router_math::select_row(a, n);
            break;
        case RouterStage::kGateBackward:
            router_math::gate_backward_row(a, n);
            break;
        case RouterStage::kFamilyBackward:
            router_math::family_backward_row(a, n);
            break;
    }
}

}  // namespace bmoe::model
