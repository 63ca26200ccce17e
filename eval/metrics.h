// metrics.h -- evaluation metrics: MCQA calibration, OoD detection, routing stability.
//
// Plain structs and pure functions on host vectors; no model, no I/O. Definitions: the README's
// "Evaluate a checkpoint" (ECE with equal-width bins as in Guo et al. 2017, MCE, Brier, NLL, AUROC,
// Jaccard), plus the ECE noise floor and bootstrap SE, without which a small ECE difference cannot
// be read.
// Every random quantity (bootstrap, floor) is deterministic from its seed.
// Shape legend: N = questions (or tokens), C = answer options, K = top-k experts.
#pragma once

#include <cstdint>
#include <vector>

namespace bmoe::eval {

// ----------------------------------------------------------------------------
// Calibration (multiple-choice QA)

// One equal-width confidence bin [lower, upper); the last bin also holds confidence 1.0.
// accuracy / confidence are the bin's means, 0 when count == 0.
struct ReliabilityBin {
    double lower = 0.0, upper = 0.0;
    int64_t count = 0;
    double accuracy = 0.0, confidence = 0.0;
};

struct Calibration {
    int n = 0;                         // questions scored
    double accuracy = 0.0;             // (1/n) sum 1{argmax p = y}, ties to the lower option
    double ece = 0.0;                  // sum_m (|B_m|/n) |acc(B_m) - conf(B_m)|, confidence c = max p
    double ece_se = 0.0;               // bootstrap standard deviation of ece over resampled question sets
    double ece_floor = 0.0;            // expected ece of a perfectly calibrated model with these confidences and n
    double mce = 0.0;                  // max_m |acc(B_m) - conf(B_m)| over non-empty bins
    double brier = 0.0;                // (1/n) sum_i sum_c (p_ic - 1{y_i = c})^2
    double nll = 0.0;                  // -(1/n) sum_i log max(p_{i,y_i}, 1e-12)
    std::vector<ReliabilityBin> bins;  // [num_bins], empty bins included
};

// Calibration of option probabilities probs [N][C] (rows sum to 1) against labels [N] in [0, C).
// Bins are equal-width on the confidence: bin i = [i/M, (i+1)/M), confidence 1.0 in the last.
// bootstrap_samples is both the number of bootstrap resamples behind ece_se (sample standard
// deviation) and the number of Monte-Carlo draws behind ece_floor (correct_i ~ Bernoulli(c_i));
// both are deterministic from seed. Throws bmoe::Error on empty input, mismatched sizes, ragged
// rows, num_bins < 1, bootstrap_samples < 2, labels out of range or non-finite probabilities.
Calibration calibration(const std::vector<std::vector<double>>& probs,
                        const std::vector<int>& labels,
                        int num_bins = 15,
                        int bootstrap_samples = 200,
                        uint64_t seed = 1);

// ----------------------------------------------------------------------------
// OoD detection: OoD is the positive class, a higher score means "more OoD".

struct Detection {
    double auroc = 0.0;          // P(s_ood > s_id) + 1/2 P(s_ood = s_id)  (Mann-Whitney)
    double aupr = 0.0;           // average precision, OoD positive: sum_k (R_k - R_{k-1}) P_k over distinct scores
    double fpr_at_95_tpr = 0.0;  // FPR at the highest threshold whose TPR >= 0.95
    std::vector<double> roc_fpr, roc_tpr;  // [<= 200] ROC points from (0,0) to (1,1), one per distinct score
};

// Separation of id_scores [N_id] from ood_scores [N_ood]. The metrics use every point; only the
// returned ROC curve is thinned to at most kMaxRocPoints (first and last kept) for JSON and plots.
// Throws bmoe::Error when either set is empty or holds a NaN.
Detection ood_detection(const std::vector<double>& id_scores, const std::vector<double>& ood_scores);

constexpr int kMaxRocPoints = 200;

// ----------------------------------------------------------------------------
// Routing stability and small helpers

// |a intersect b| / |a union b| of two top-K expert index sets a [K], b [K] (no duplicates within a set).
double jaccard(const int32_t* a, const int32_t* b, int K);

// Mean Jaccard over N rows of two top-K selections a_NK, b_NK [N*K]. Throws bmoe::Error when the
// sizes differ, K < 1 or the selections are empty or not a multiple of K.
double mean_jaccard(const std::vector<int32_t>& a_NK, const std::vector<int32_t>& b_NK, int K);

// Entropy -sum p log p (nats) of p [n], with 0 log 0 = 0.
double entropy(const double* p, int n);

}  // namespace bmoe::eval
