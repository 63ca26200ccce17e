// metrics.cpp -- see metrics.h. N = questions, C = options, M = confidence bins, K = top-k.
#include "eval/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <utility>

#include "parallel/check.h"

namespace bmoe::eval {
namespace {

// splitmix64 (Steele, Lea & Flood 2014): tiny and well mixed; each Monte-Carlo loop below gets its
// own stream so adding draws to one does not shift the other.
class SplitMix64 {
  public:
    explicit SplitMix64(uint64_t seed) : state_(seed) {}
    uint64_t next() {
        uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }
    // Uniform in [0, 1) with 53 random bits.
    double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
    // Uniform integer in [0, n) for 0 < n < 2^32 (Lemire's multiply-shift; bias < n / 2^32).
    int below(int n) { return static_cast<int>(((next() >> 32) * static_cast<uint64_t>(n)) >> 32); }

  private:
    uint64_t state_;
};

// Equal-width bin of a confidence in [0, 1]: floor(c * M), with c = 1.0 in the last bin.
int confidence_bin(double c, int num_bins) { return std::clamp(static_cast<int>(c * num_bins), 0, num_bins - 1); }

// ECE from per-bin sums: sum_m (|B_m|/n) |acc_m - conf_m| = sum_m |sum correct - sum conf| / n.
double ece_from_sums(const std::vector<double>& correct_sum_M, const std::vector<double>& conf_sum_M, int n) {
    double ece = 0.0;
    for (size_t m = 0; m < conf_sum_M.size(); ++m) ece += std::abs(correct_sum_M[m] - conf_sum_M[m]);
    return ece / n;
}

void check_calibration_inputs(const std::vector<std::vector<double>>& probs,
                              const std::vector<int>& labels,
                              int num_bins,
                              int bootstrap_samples) {
    BMOE_REQUIRE(!probs.empty(), "calibration: no questions to score: pass at least one row of option probabilities");
    BMOE_REQUIRE(labels.size() == probs.size(), "calibration: ", probs.size(), " probability rows but ", labels.size(),
                 " labels: pass exactly one label per question");
    BMOE_REQUIRE(num_bins >= 1, "calibration: num_bins is ", num_bins, ": use at least 1 bin (15 is the usual choice)");
    BMOE_REQUIRE(bootstrap_samples >= 2, "calibration: bootstrap_samples is ", bootstrap_samples,
                 ": use at least 2 resamples for ece_se and ece_floor (200 is the default)");
    const size_t num_options = probs[0].size();
    BMOE_REQUIRE(num_options >= 1, "calibration: question 0 has no options: every question needs >= 1 option");
    for (size_t i = 0; i < probs.size(); ++i) {
        BMOE_REQUIRE(probs[i].size() == num_options, "calibration: question ", i, " has ", probs[i].size(),
                     " options but question 0 has ", num_options, ": score sets with one option count at a time");
        BMOE_REQUIRE(labels[i] >= 0 && static_cast<size_t>(labels[i]) < num_options, "calibration: label ", labels[i],
                     " of question ", i, " is outside [0, ", num_options, "): labels must be option indices");
        for (size_t c = 0; c < num_options; ++c)
            BMOE_REQUIRE(std::isfinite(probs[i][c]), "calibration: probability ", c, " of question ", i, " is ",
                         probs[i][c], " (NaN or inf): check the model's option logits before scoring");
    }
}

}  // namespace

// ----------------------------------------------------------------------------
// Calibration

Calibration calibration(const std::vector<std::vector<double>>& probs,
                        const std::vector<int>& labels,
                        int num_bins,
                        int bootstrap_samples,
                        uint64_t seed) {
    check_calibration_inputs(probs, labels, num_bins, bootstrap_samples);
    const int n = static_cast<int>(probs.size());
    const int M = num_bins;

    // Per question: confidence, correctness and bin; everything below works on these three.
    std::vector<double> conf_N(n), correct_N(n);
    std::vector<int> bin_N(n);
    Calibration out;
    out.n = n;
    double nll = 0.0, brier = 0.0, num_correct = 0.0;
    for (int i = 0; i < n; ++i) {
        const std::vector<double>& p = probs[i];
        const int y = labels[i];
        const int pred = static_cast<int>(std::max_element(p.begin(), p.end()) - p.begin());  // first max wins
        conf_N[i] = p[pred];
        correct_N[i] = pred == y ? 1.0 : 0.0;
        bin_N[i] = confidence_bin(conf_N[i], M);
        num_correct += correct_N[i];
        nll -= std::log(std::max(p[y], 1e-12));  // clamp: one p_y = 0 would make the mean infinite
        for (size_t c = 0; c < p.size(); ++c) {
            const double d = p[c] - (static_cast<int>(c) == y ? 1.0 : 0.0);
            brier += d * d;
        }
    }
    out.accuracy = num_correct / n;
    out.nll = nll / n;
    out.brier = brier / n;

    // Reliability bins, ECE and MCE.
    std::vector<double> count_M(M, 0.0), conf_sum_M(M, 0.0), correct_sum_M(M, 0.0);
    for (int i = 0; i < n; ++i) {
        count_M[bin_N[i]] += 1.0;
        conf_sum_M[bin_N[i]] += conf_N[i];
        correct_sum_M[bin_N[i]] += correct_N[i];
    }
    out.bins.resize(M);
    for (int m = 0; m < M; ++m) {
        ReliabilityBin& b = out.bins[m];
        b.lower = static_cast<double>(m) / M;
        b.upper = static_cast<double>(m + 1) / M;
        b.count = static_cast<int64_t>(count_M[m]);
        if (b.count == 0) continue;
        b.accuracy = correct_sum_M[m] / count_M[m];
        b.confidence = conf_sum_M[m] / count_M[m];
        const double gap = std::abs(b.accuracy - b.confidence);
        out.ece += count_M[m] / n * gap;
        out.mce = std::max(out.mce, gap);
    }

    // NOTES: ECE is biased upwards at finite n (|mean of noise| > 0), so a number is only readable
    // next to its sampling spread (bootstrap SE) and the value a perfectly calibrated model with the
    // same confidences would score at this n (the floor). Both loops cost O(bootstrap_samples * n).
    SplitMix64 seeder(seed);
    SplitMix64 boot_rng(seeder.next());
    SplitMix64 floor_rng(seeder.next());
    std::vector<double> ece_B(bootstrap_samples);
    for (int s = 0; s < bootstrap_samples; ++s) {
        std::fill(conf_sum_M.begin(), conf_sum_M.end(), 0.0);
        std::fill(correct_sum_M.begin(), correct_sum_M.end(), 0.0);
        for (int i = 0; i < n; ++i) {
            const int j = boot_rng.below(n);
            conf_sum_M[bin_N[j]] += conf_N[j];
            correct_sum_M[bin_N[j]] += correct_N[j];
        }
        ece_B[s] = ece_from_sums(correct_sum_M, conf_sum_M, n);
    }
    double mean = 0.0;
    for (double e : ece_B) mean += e;
    mean /= bootstrap_samples;
    double var = 0.0;
    for (double e : ece_B) var += (e - mean) * (e - mean);
    out.ece_se = std::sqrt(var / (bootstrap_samples - 1));

    // Floor: the same questions and confidences, with correct_i ~ Bernoulli(c_i) (calibrated by construction).
    std::fill(conf_sum_M.begin(), conf_sum_M.end(), 0.0);
    for (int i = 0; i < n; ++i) conf_sum_M[bin_N[i]] += conf_N[i];
    double floor_sum = 0.0;
    for (int s = 0; s < bootstrap_samples; ++s) {
        std::fill(correct_sum_M.begin(), correct_sum_M.end(), 0.0);
        for (int i = 0; i < n; ++i) correct_sum_M[bin_N[i]] += floor_rng.uniform() < conf_N[i] ? 1.0 : 0.0;
        floor_sum += ece_from_sums(correct_sum_M, conf_sum_M, n);
    }
    out.ece_floor = floor_sum / bootstrap_samples;
    return out;
}

// ----------------------------------------------------------------------------
// OoD detection

Detection ood_detection(const std::vector<double>& id_scores, const std::vector<double>& ood_scores) {
    BMOE_REQUIRE(!id_scores.empty(), "ood_detection: no in-distribution scores: score at least one ID question");
    BMOE_REQUIRE(!ood_scores.empty(), "ood_detection: no OoD scores: score at least one OoD question");
    // (score, is_ood), sorted by descending score: walking it lowers the threshold one tie group at a time.
    std::vector<std::pair<double, int>> items;
    items.reserve(id_scores.size() + ood_scores.size());
    for (size_t i = 0; i < id_scores.size(); ++i) {
        BMOE_REQUIRE(!std::isnan(id_scores[i]), "ood_detection: ID score ", i,
                     " is NaN: check the uncertainty score for 0/0 or log(0) before ranking");
        items.emplace_back(id_scores[i], 0);
    }
    for (size_t i = 0; i < ood_scores.size(); ++i) {
        BMOE_REQUIRE(!std::isnan(ood_scores[i]), "ood_detection: OoD score ", i,
                     " is NaN: check the uncertainty score for 0/0 or log(0) before ranking");
        items.emplace_back(ood_scores[i], 1);
    }
    std::sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first > b.first; });

    const int64_t num_id = static_cast<int64_t>(id_scores.size());
    const int64_t num_ood = static_cast<int64_t>(ood_scores.size());
    Detection out;
    std::vector<double> fpr{0.0}, tpr{0.0};
    int64_t tp = 0, fp = 0;
    int64_t twice_wins = 0;  // 2 * (#(ood, id) pairs with s_ood > s_id) + #ties: exact in integers
    bool reached_95 = false;
    for (size_t g = 0; g < items.size();) {
        int64_t a = 0, b = 0;  // OoD / ID items in this tie group
        size_t end = g;
        for (; end < items.size() && items[end].first == items[g].first; ++end) (items[end].second ? a : b) += 1;
        g = end;
        // The group's OoD items beat every ID item below the group and tie with its b ID items.
        twice_wins += 2 * a * (num_id - fp - b) + a * b;
        tp += a;
        fp += b;
        if (a > 0) out.aupr += static_cast<double>(a) / num_ood * (static_cast<double>(tp) / (tp + fp));
        if (!reached_95 && tp * 100 >= 95 * num_ood) {  // integer test: 0.95 * n is not exact in floating point
            out.fpr_at_95_tpr = static_cast<double>(fp) / num_id;
            reached_95 = true;
        }
        fpr.push_back(static_cast<double>(fp) / num_id);
        tpr.push_back(static_cast<double>(tp) / num_ood);
    }
    out.auroc = static_cast<double>(twice_wins) / (2.0 * static_cast<double>(num_id) * static_cast<double>(num_ood));

    // Thin the curve to kMaxRocPoints evenly spaced points, keeping (0,0) and (1,1).
    const int64_t num_points = static_cast<int64_t>(fpr.size());
    if (num_points <= kMaxRocPoints) {
        out.roc_fpr = std::move(fpr);
        out.roc_tpr = std::move(tpr);
    } else {
        for (int64_t j = 0; j < kMaxRocPoints; ++j) {
            const int64_t idx = j * (num_points - 1) / (kMaxRocPoints - 1);
            out.roc_fpr.push_back(fpr[idx]);
            out.roc_tpr.push_back(tpr[idx]);
        }
    }
    return out;
}

// ----------------------------------------------------------------------------
// Routing stability and helpers

double jaccard(const int32_t* a, const int32_t* b, int K) {
    BMOE_REQUIRE(K >= 1, "jaccard: K is ", K, ": top-k sets need K >= 1");
    int common = 0;
    for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j)
            if (a[i] == b[j]) {
                ++common;
                break;
            }
    return static_cast<double>(common) / (2 * K - common);  // |a union b| = 2K - |a intersect b|
}

double mean_jaccard(const std::vector<int32_t>& a_NK, const std::vector<int32_t>& b_NK, int K) {
    BMOE_REQUIRE(K >= 1, "mean_jaccard: K is ", K, ": top-k sets need K >= 1");
    BMOE_REQUIRE(a_NK.size() == b_NK.size(), "mean_jaccard: the selections hold ", a_NK.size(), " and ", b_NK.size(),
                 " indices: compare the same tokens before and after the perturbation");
    BMOE_REQUIRE(!a_NK.empty() && a_NK.size() % K == 0, "mean_jaccard: ", a_NK.size(),
                 " indices is not a non-zero multiple of K = ", K, ": pass [N, K] selections");
    const size_t N = a_NK.size() / K;
    double sum = 0.0;
    for (size_t t = 0; t < N; ++t) sum += jaccard(a_NK.data() + t * K, b_NK.data() + t * K, K);
    return sum / static_cast<double>(N);
}

double entropy(const double* p, int n) {
    double h = 0.0;
    for (int i = 0; i < n; ++i)
        if (p[i] > 0.0) h -= p[i] * std::log(p[i]);
    return h;
}

}  // namespace bmoe::eval
