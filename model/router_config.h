// router_config.h -- RouterConfig: which router family an MoE layer uses and its hyperparameters.
//
// The families (docs/routers.md has the equations and the choices behind the defaults):
//   topk           deterministic softmax top-k (the baseline)
//   temp_sampling  one fixed global temperature, experts sampled with the Gumbel-top-k trick
//   mc_dropout     weight space: dropout on the router input, kept at inference (MCDR)
//   swag           weight space: SWAG moments of the router weights, sampled at inference (SWAGR)
//   ensemble       weight space: M independently initialised routers (DER)
//   weight_mfvi    weight space: mean-field Gaussian over the router weights, local reparameterisation
//   logit_mf       logit space: N(l_det + dmu(u), diag sigma(u)^2)   (MFVR / VGLR-MF)
//   logit_fc       logit space: N(l_det + dmu(u), L(u) L(u)^T)       (FCVR / VGLR-FC)
//   vtsr           selection space: per-token temperature T(u), Sample-K from softmax(l / T)
// Every field is a CLI flag / TOML key under [router] and is stored with the checkpoint.
#pragma once

#include <string>

namespace bmoe::model {

enum class RouterType {
    kTopK,
    kTempSampling,
    kMcDropout,
    kSwag,
    kEnsemble,
    kWeightMfvi,
    kLogitMf,
    kLogitFc,
    kVtsr,
};

struct RouterConfig {
    RouterType type = RouterType::kTopK;
    int train_samples = 1;  // S Monte-Carlo routing samples per token in training
    int eval_samples = 8;   // S at evaluation: probabilities averaged inside the router, then one top-k
    // temp_sampling
    float temperature = 1.5f;  // fixed global temperature T
    // mc_dropout
    float dropout = 0.1f;  // drop probability of each router input feature
    // ensemble
    int ensemble_size = 4;  // M routers; member 0 is gate.weight
    // swag
    int swag_rank = 8;    // K deviation columns kept (low-rank part of the covariance)
    int swag_every = 10;  // collect a snapshot of the router weights every N optimizer steps
    int swag_start = 0;   // ... from this step on
    // weight_mfvi
    float weight_sigma_init = 1e-3f;  // initial posterior std of each router weight
    float weight_prior_std = 0.1f;    // prior N(0, weight_prior_std^2) on each router weight
    // logit_mf / logit_fc
    int hidden = 32;          // width r of the inference network trunk (cost ~ 2 D r per token)
    float sigma_init = 0.1f;  // initial logit std (MF) / Cholesky diagonal (FC)
    float sigma_min = 1e-4f;  // floor of sigma and of diag(L): keeps log sigma finite
    float prior_std = 1.0f;   // prior N(l_det, prior_std^2 I) on the logits
    // vtsr
    float temp_min = 0.5f;  // T = temp_min + (temp_max - temp_min) * sigmoid(u w + b), T = 1 at init
    float temp_max = 2.0f;
    // auxiliary-loss-free balancing (DeepSeek-V3): per-expert selection bias b, moved by
    // selection_bias_rate * sign(mean load - load) after every optimizer step; 0 = off
    float selection_bias_rate = 0.0f;

    bool is_stochastic() const { return type != RouterType::kTopK; }
    // Number of packed lower-triangular entries of the logit_fc Cholesky factor.
    static int packed_size(int num_experts) { return num_experts * (num_experts + 1) / 2; }
    void validate() const;  // throws bmoe::Error naming the field
};

const char* to_string(RouterType v);
RouterType parse_router_type(const std::string& s);  // throws bmoe::Error listing the valid names

}  // namespace bmoe::model
