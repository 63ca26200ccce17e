#include "model/router_config.h"

#include "parallel/check.h"

namespace bmoe::model {

namespace {
struct TypeName {
    RouterType type;
    const char* name;
};
constexpr TypeName kTypeNames[] = {
    {RouterType::kTopK, "topk"},
    {RouterType::kTempSampling, "temp_sampling"},
    {RouterType::kMcDropout, "mc_dropout"},
    {RouterType::kSwag, "swag"},
    {RouterType::kEnsemble, "ensemble"},
    {RouterType::kWeightMfvi, "weight_mfvi"},
    {RouterType::kLogitMf, "logit_mf"},
    {RouterType::kLogitFc, "logit_fc"},
    {RouterType::kVtsr, "vtsr"},
};
}  // namespace

const char* to_string(RouterType v) {
    for (const TypeName& t : kTypeNames)
        if (t.type == v) return t.name;
    return "?";
}

RouterType parse_router_type(const std::string& s) {
    std::string names;
    for (const TypeName& t : kTypeNames) {
        if (s == t.name) return t.type;
        names += names.empty() ? t.name : concat(", ", t.name);
    }
    throw Error(concat("router.type '", s, "' is unknown; valid types: ", names));
}

void RouterConfig::validate() const {
    BMOE_REQUIRE(train_samples >= 1, "router.train_samples must be >= 1 (got ", train_samples, ")");
    BMOE_REQUIRE(eval_samples >= 1, "router.eval_samples must be >= 1 (got ", eval_samples, ")");
    BMOE_REQUIRE(temperature > 0.0f, "router.temperature must be > 0 (got ", temperature, ")");
    BMOE_REQUIRE(dropout >= 0.0f && dropout < 1.0f, "router.dropout must be in [0, 1) (got ", dropout, ")");
    BMOE_REQUIRE(ensemble_size >= 2 || type != RouterType::kEnsemble, "router.ensemble_size must be >= 2 (got ",
                 ensemble_size, ")");
    BMOE_REQUIRE(swag_rank >= 2, "router.swag_rank must be >= 2 (got ", swag_rank, ")");
    BMOE_REQUIRE(swag_every >= 1, "router.swag_every must be >= 1 (got ", swag_every, ")");
    BMOE_REQUIRE(swag_start >= 0, "router.swag_start must be >= 0 (got ", swag_start, ")");
    BMOE_REQUIRE(weight_sigma_init > 0.0f, "router.weight_sigma_init must be > 0 (got ", weight_sigma_init, ")");
    BMOE_REQUIRE(weight_prior_std > 0.0f, "router.weight_prior_std (prior sigma) must be > 0 (got ", weight_prior_std,
                 ")");
    BMOE_REQUIRE(hidden >= 1, "router.hidden must be >= 1 (got ", hidden, ")");
    BMOE_REQUIRE(sigma_min >= 0.0f, "router.sigma_min must be >= 0 (got ", sigma_min, ")");
    BMOE_REQUIRE(sigma_init > sigma_min, "router.sigma_init (", sigma_init, ") must be > router.sigma_min (", sigma_min,
                 ")");
    BMOE_REQUIRE(prior_std > 0.0f, "router.prior_std (prior sigma) must be > 0 (got ", prior_std, ")");
    BMOE_REQUIRE(temp_min > 0.0f && temp_min < 1.0f && temp_max > 1.0f, "router temperature bounds must satisfy 0 < ",
                 "router.temp_min < 1 < router.temp_max (T starts at 1; got temp_min ", temp_min, ", temp_max ",
                 temp_max, ")");
    BMOE_REQUIRE(selection_bias_rate >= 0.0f, "router.selection_bias_rate must be >= 0 (0 = off, got ",
                 selection_bias_rate, ")");
}

}  // namespace bmoe::model
