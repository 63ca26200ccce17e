// eval_metrics_test.cpp -- bmoe_eval (eval/metrics.h): calibration (accuracy, ECE, MCE, Brier,
// NLL, bins, bootstrap SE, noise floor), OoD detection (AUROC with ties, AUPR, FPR@95, ROC),
// Jaccard and entropy on small hand-computed inputs, their error messages, and one cross-check
// against an independent numpy computation (tests/eval_metrics_reference.py). The cross-check
// skips when BMOE_PYTHON cannot import numpy, unless BMOE_REQUIRE_TORCH is set (then it fails).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <limits>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "eval/metrics.h"
#include "parallel/check.h"
#include "tests/process_util.h"

namespace bmoe::eval {
namespace {

using bmoe::testing::run_command;
using bmoe::testing::TempDir;

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using Probs = std::vector<std::vector<double>>;

constexpr double kEps = 1e-12;

// Expects `fn` to throw bmoe::Error whose message contains `part`.
template <typename Fn>
void expect_error(Fn fn, const std::string& part) {
    try {
        fn();
        ADD_FAILURE() << "expected bmoe::Error containing \"" << part << "\"";
    } catch (const Error& e) {
        EXPECT_THAT(e.what(), HasSubstr(part));
    }
}

// ----------------------------------------------------------------------------
// Calibration

// Six questions, three options, three bins [0,1/3) [1/3,2/3) [2/3,1]:
//   q  probs               label pred conf correct bin
//   0  .9  .05 .05         0     0    .9   1       2
//   1  .8  .1  .1          1     0    .8   0       2
//   2  .1  .7  .2          1     1    .7   1       2
//   3  .5  .3  .2          0     0    .5   1       1
//   4  .2  .4  .4          2     1    .4   0       1   (tie .4/.4: the lower option is predicted)
//   5  1   0   0           0     0    1.0  1       2   (confidence 1.0 lands in the last bin)
Probs six_probs() {
    return {{0.9, 0.05, 0.05}, {0.8, 0.1, 0.1}, {0.1, 0.7, 0.2}, {0.5, 0.3, 0.2}, {0.2, 0.4, 0.4}, {1.0, 0.0, 0.0}};
}
std::vector<int> six_labels() { return {0, 1, 1, 0, 2, 0}; }

TEST(EvalCalibration, HandComputedSixQuestionsThreeBins) {
    const Calibration c = calibration(six_probs(), six_labels(), /*num_bins=*/3);
    EXPECT_EQ(c.n, 6);
    EXPECT_NEAR(c.accuracy, 4.0 / 6.0, kEps);
    // bin 0: empty. bin 1: {q3, q4}: acc 1/2, conf (.5 + .4)/2 = .45, gap .05.
    // bin 2: {q0, q1, q2, q5}: acc 3/4, conf (.9 + .8 + .7 + 1)/4 = .85, gap .10.
    // ECE = 2/6 * .05 + 4/6 * .10 = .5/6; MCE = .10 (the empty bin does not count).
    ASSERT_EQ(c.bins.size(), 3u);
    EXPECT_EQ(c.bins[0].count, 0);
    EXPECT_EQ(c.bins[1].count, 2);
    EXPECT_EQ(c.bins[2].count, 4);
    EXPECT_NEAR(c.bins[1].accuracy, 0.5, kEps);
    EXPECT_NEAR(c.bins[1].confidence, 0.45, kEps);
    EXPECT_NEAR(c.bins[2].accuracy, 0.75, kEps);
    EXPECT_NEAR(c.bins[2].confidence, 0.85, kEps);
    EXPECT_NEAR(c.bins[0].lower, 0.0, kEps);
    EXPECT_NEAR(c.bins[1].lower, 1.0 / 3.0, kEps);
    EXPECT_NEAR(c.bins[2].upper, 1.0, kEps);
    EXPECT_NEAR(c.ece, 0.5 / 6.0, kEps);
    EXPECT_NEAR(c.mce, 0.10, kEps);
    // Brier per question: q0 .01+.0025+.0025 = .015; q1 .64+.81+.01 = 1.46; q2 .01+.09+.04 = .14;
    // q3 .25+.09+.04 = .38; q4 .04+.16+.36 = .56; q5 0. Mean 2.555/6.
    EXPECT_NEAR(c.brier, 2.555 / 6.0, kEps);
    // NLL: p_y = .9 .1 .7 .5 .4 1 -> (.105361 + 2.302585 + .356675 + .693147 + .916291 + 0)/6 = .729010
    const double nll = -(std::log(0.9) + std::log(0.1) + std::log(0.7) + std::log(0.5) + std::log(0.4)) / 6.0;
    EXPECT_NEAR(c.nll, nll, kEps);
    EXPECT_NEAR(c.nll, 0.729010, 1e-6);
}

TEST(EvalCalibration, ConfidenceEdgesAndZeroProbabilityLabel) {
    // Four bins. q0: confidence exactly 1.0 -> last bin [.75, 1], wrong, and p_y = 0 exactly
    // (NLL clamps it at 1e-12). q1: confidence exactly .5 = a bin edge -> bin 2 = [.5, .75), right.
    const Calibration c = calibration({{1.0, 0.0}, {0.5, 0.5}}, {1, 0}, /*num_bins=*/4);
    ASSERT_EQ(c.bins.size(), 4u);
    EXPECT_EQ(c.bins[3].count, 1);
    EXPECT_EQ(c.bins[2].count, 1);
    EXPECT_EQ(c.bins[1].count, 0);
    EXPECT_DOUBLE_EQ(c.bins[2].lower, 0.5);
    EXPECT_DOUBLE_EQ(c.bins[2].upper, 0.75);
    EXPECT_NEAR(c.accuracy, 0.5, kEps);
    EXPECT_NEAR(c.ece, 0.5 * 1.0 + 0.5 * 0.5, kEps);  // gaps 1 (bin 3) and .5 (bin 2)
    EXPECT_NEAR(c.mce, 1.0, kEps);
    EXPECT_NEAR(c.brier, (2.0 + 0.5) / 2.0, kEps);  // (1 + 1) and (.25 + .25)
    EXPECT_NEAR(c.nll, (-std::log(1e-12) + std::log(2.0)) / 2.0, kEps);
    EXPECT_TRUE(std::isfinite(c.nll));
    // One bin: ECE is |accuracy - mean confidence|.
    const Calibration one = calibration(six_probs(), six_labels(), /*num_bins=*/1);
    EXPECT_NEAR(one.ece, std::abs(4.0 / 6.0 - 4.3 / 6.0), kEps);
}

// n two-option questions with confidences spread over [.5, 1) and labels that follow them.
void spread_questions(int n, uint64_t seed, Probs* probs, std::vector<int>* labels) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    probs->clear();
    labels->clear();
    for (int i = 0; i < n; ++i) {
        const double c = 0.5 + 0.5 * u(rng);
        probs->push_back({c, 1.0 - c});
        labels->push_back(u(rng) < c ? 0 : 1);
    }
}

TEST(EvalCalibration, FloorIsZeroWhenEveryConfidenceIsOne) {
    // One-hot predictions, two of five wrong: ECE = 2/5, but a calibrated model with confidence 1
    // is always right, so the floor is exactly 0.
    const Probs probs = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}, {1, 0, 0}, {0, 1, 0}};
    const Calibration c = calibration(probs, {0, 1, 2, 1, 0});
    EXPECT_NEAR(c.ece, 0.4, kEps);
    EXPECT_EQ(c.ece_floor, 0.0);
}

TEST(EvalCalibration, FloorShrinksLikeInverseSqrtN) {
    Probs probs;
    std::vector<int> labels;
    spread_questions(500, 3, &probs, &labels);
    const double small = calibration(probs, labels).ece_floor;
    spread_questions(8000, 4, &probs, &labels);
    const double large = calibration(probs, labels).ece_floor;
    // 16x the questions -> about 1/4 of the floor (each bin's |mean noise| ~ 1/sqrt(count)).
    EXPECT_GT(small, 0.0);
    EXPECT_GT(small / large, 3.3) << small << " vs " << large;
    EXPECT_LT(small / large, 4.8) << small << " vs " << large;
    // 15 bins at n = 500 put the floor in the few-percent range (docs/comparison.md: ~.03 at n = 1000).
    EXPECT_GT(small, 0.02);
    EXPECT_LT(small, 0.08);
}

TEST(EvalCalibration, BootstrapSeIsPositiveAndDeterministic) {
    Probs probs;
    std::vector<int> labels;
    spread_questions(1000, 5, &probs, &labels);
    const Calibration a = calibration(probs, labels, 15, 200, /*seed=*/7);
    const Calibration b = calibration(probs, labels, 15, 200, /*seed=*/7);
    const Calibration other = calibration(probs, labels, 15, 200, /*seed=*/8);
    EXPECT_GT(a.ece_se, 0.0);
    EXPECT_LT(a.ece_se, 0.05);
    EXPECT_EQ(a.ece_se, b.ece_se);
    EXPECT_EQ(a.ece_floor, b.ece_floor);
    EXPECT_NE(a.ece_se, other.ece_se);
    EXPECT_EQ(a.ece, other.ece);  // the point estimate does not depend on the seed
    // Labels drawn from the confidences: this model is calibrated, so its ECE sits near the floor.
    EXPECT_LT(std::abs(a.ece - a.ece_floor), 4.0 * a.ece_se) << a.ece << " floor " << a.ece_floor;
}

TEST(EvalCalibration, RejectsBadInputWithAFix) {
    const Probs probs = six_probs();
    const std::vector<int> labels = six_labels();
    expect_error([] { calibration({}, {}); }, "no questions");
    expect_error([&] { calibration(probs, {0, 1}); }, "6 probability rows but 2 labels");
    expect_error([&] { calibration(probs, labels, 0); }, "num_bins is 0");
    expect_error([&] { calibration(probs, labels, 15, 1); }, "bootstrap_samples is 1");
    expect_error([&] { calibration(probs, {0, 1, 1, 0, 3, 0}); }, "label 3 of question 4 is outside [0, 3)");
    expect_error([&] { calibration(probs, {0, 1, 1, 0, -1, 0}); }, "label -1 of question 4");
    Probs ragged = probs;
    ragged[2].push_back(0.0);
    expect_error([&] { calibration(ragged, labels); }, "question 2 has 4 options but question 0 has 3");
    Probs nan = probs;
    nan[1][2] = std::numeric_limits<double>::quiet_NaN();
    expect_error([&] { calibration(nan, labels); }, "probability 2 of question 1 is nan");
}

// ----------------------------------------------------------------------------
// OoD detection

TEST(EvalDetection, HandComputedWithTies) {
    // ID {.1, .4, .4}, OoD {.4, .9}. Pairs (ood, id): .9 beats all 3; .4 beats .1 and ties twice:
    // AUROC = (3 + 1 + 2 * 1/2) / 6 = 5/6.
    // Descending tie groups: .9 {ood} -> tp 1 fp 0 (P 1, R 1/2); .4 {ood, id, id} -> tp 2 fp 2 (P 1/2, R 1);
    // .1 {id} -> tp 2 fp 3. AP = 1/2 * 1 + 1/2 * 1/2 = 3/4. TPR >= .95 first at .4: FPR = 2/3.
    const Detection d = ood_detection({0.1, 0.4, 0.4}, {0.4, 0.9});
    EXPECT_NEAR(d.auroc, 5.0 / 6.0, kEps);
    EXPECT_NEAR(d.aupr, 0.75, kEps);
    EXPECT_NEAR(d.fpr_at_95_tpr, 2.0 / 3.0, kEps);
    const std::vector<double> fpr = {0.0, 0.0, 2.0 / 3.0, 1.0}, tpr = {0.0, 0.5, 1.0, 1.0};
    ASSERT_EQ(d.roc_fpr.size(), fpr.size());
    ASSERT_EQ(d.roc_tpr.size(), tpr.size());
    for (size_t i = 0; i < fpr.size(); ++i) {
        EXPECT_NEAR(d.roc_fpr[i], fpr[i], kEps) << i;
        EXPECT_NEAR(d.roc_tpr[i], tpr[i], kEps) << i;
    }
}

TEST(EvalDetection, PerfectAndInvertedSeparation) {
    const Detection perfect = ood_detection({0.1, 0.2}, {0.3, 0.4});
    EXPECT_DOUBLE_EQ(perfect.auroc, 1.0);
    EXPECT_DOUBLE_EQ(perfect.aupr, 1.0);
    EXPECT_DOUBLE_EQ(perfect.fpr_at_95_tpr, 0.0);
    // Inverted: descending .4 id, .3 id, .2 ood (P 1/3, R 1/2), .1 ood (P 2/4, R 1): AP = 1/6 + 1/4.
    const Detection inverted = ood_detection({0.3, 0.4}, {0.1, 0.2});
    EXPECT_DOUBLE_EQ(inverted.auroc, 0.0);
    EXPECT_NEAR(inverted.aupr, 5.0 / 12.0, kEps);
    EXPECT_DOUBLE_EQ(inverted.fpr_at_95_tpr, 1.0);
    // All scores equal: chance level; AP = base rate.
    const Detection flat = ood_detection({1.0, 1.0, 1.0}, {1.0});
    EXPECT_DOUBLE_EQ(flat.auroc, 0.5);
    EXPECT_DOUBLE_EQ(flat.aupr, 0.25);
}

TEST(EvalDetection, FprAt95IsTakenWhereTprFirstReaches95) {
    // 20 OoD scores 1..20, ID {.5, 1.5, 10.5}. TPR >= .95 needs 19 of 20: threshold 2, where only
    // 10.5 of the ID scores is above: FPR = 1/3 (requiring TPR > .95 would give 2/3).
    std::vector<double> ood;
    for (int s = 1; s <= 20; ++s) ood.push_back(s);
    const Detection d = ood_detection({0.5, 1.5, 10.5}, ood);
    EXPECT_NEAR(d.fpr_at_95_tpr, 1.0 / 3.0, kEps);
    // AUROC: .5 loses to all 20, 1.5 to 19, 10.5 to 10 -> 49/60.
    EXPECT_NEAR(d.auroc, 49.0 / 60.0, kEps);
}

TEST(EvalDetection, RocCurveIsThinnedTo200Points) {
    std::vector<double> id, ood;
    for (int i = 0; i < 700; ++i) id.push_back(i * 0.001);
    for (int i = 0; i < 600; ++i) ood.push_back(0.3 + i * 0.001 + 0.0005);
    const Detection d = ood_detection(id, ood);
    ASSERT_EQ(d.roc_fpr.size(), static_cast<size_t>(kMaxRocPoints));
    ASSERT_EQ(d.roc_tpr.size(), static_cast<size_t>(kMaxRocPoints));
    EXPECT_EQ(d.roc_fpr.front(), 0.0);
    EXPECT_EQ(d.roc_tpr.front(), 0.0);
    EXPECT_EQ(d.roc_fpr.back(), 1.0);
    EXPECT_EQ(d.roc_tpr.back(), 1.0);
    for (size_t i = 1; i < d.roc_fpr.size(); ++i) {
        EXPECT_GE(d.roc_fpr[i], d.roc_fpr[i - 1]);
        EXPECT_GE(d.roc_tpr[i], d.roc_tpr[i - 1]);
    }
    // Every OoD score beats ID scores below .3 + i/1000 + .0005: (300 + i + 1) of them for i < 400, all 700 after.
    double wins = 0.0;
    for (int i = 0; i < 600; ++i) wins += std::min(300 + i + 1, 700);
    EXPECT_NEAR(d.auroc, wins / (700.0 * 600.0), 1e-12);
}

TEST(EvalDetection, RejectsBadInputWithAFix) {
    expect_error([] { ood_detection({}, {1.0}); }, "no in-distribution scores");
    expect_error([] { ood_detection({1.0}, {}); }, "no OoD scores");
    const double nan = std::numeric_limits<double>::quiet_NaN();
    expect_error([&] { ood_detection({1.0, nan}, {1.0}); }, "ID score 1 is NaN");
    expect_error([&] { ood_detection({1.0}, {nan}); }, "OoD score 0 is NaN");
}

// ----------------------------------------------------------------------------
// Jaccard and entropy

TEST(EvalJaccard, TopKSets) {
    const int32_t a[] = {1, 2}, b[] = {2, 3}, c[] = {2, 1}, d[] = {4, 5};
    EXPECT_NEAR(jaccard(a, b, 2), 1.0 / 3.0, kEps);  // {2} / {1, 2, 3}
    EXPECT_DOUBLE_EQ(jaccard(a, c, 2), 1.0);         // order does not matter
    EXPECT_DOUBLE_EQ(jaccard(a, d, 2), 0.0);
    // Two tokens: 1/3 and 1 -> 2/3.
    EXPECT_NEAR(mean_jaccard({1, 2, 0, 5}, {2, 3, 5, 0}, 2), 2.0 / 3.0, kEps);
    EXPECT_DOUBLE_EQ(mean_jaccard({7}, {7}, 1), 1.0);
    expect_error([] { mean_jaccard({1, 2}, {1, 2, 3, 4}, 2); }, "hold 2 and 4 indices");
    expect_error([] { mean_jaccard({1, 2, 3}, {1, 2, 3}, 2); }, "not a non-zero multiple of K = 2");
    expect_error([] { mean_jaccard({}, {}, 2); }, "not a non-zero multiple");
    expect_error([] { mean_jaccard({1}, {1}, 0); }, "K is 0");
}

TEST(EvalEntropy, NatsWithZeroLogZero) {
    const double uniform[] = {0.25, 0.25, 0.25, 0.25}, sure[] = {1.0, 0.0, 0.0}, half[] = {0.5, 0.0, 0.5};
    EXPECT_NEAR(entropy(uniform, 4), std::log(4.0), kEps);
    EXPECT_EQ(entropy(sure, 3), 0.0);
    EXPECT_NEAR(entropy(half, 3), std::log(2.0), kEps);
}

// ----------------------------------------------------------------------------
// Cross-check against tests/eval_metrics_reference.py (numpy, different formulas)

TEST(EvalCrossCheck, MatchesNumpyReference) {
    TempDir dir("bmoe_eval");
    std::string probe;
    if (run_command(std::string("'") + BMOE_PYTHON + "' -c 'import numpy'", dir.path / "probe.txt", &probe) != 0) {
        // Keep the last line, e.g. "ModuleNotFoundError: No module named 'numpy'".
        while (!probe.empty() && (probe.back() == '\n' || probe.back() == ' ')) probe.pop_back();
        const size_t last_line = probe.find_last_of('\n');
        if (last_line != std::string::npos) probe = probe.substr(last_line + 1);
        const std::string reason = std::string("numpy not importable by ") + BMOE_PYTHON + " (" + probe +
                                   "): run `bash tools/install-deps.sh --tests`";
        const char* require = std::getenv("BMOE_REQUIRE_TORCH");
        if (require != nullptr && *require != '\0') FAIL() << reason;
        GTEST_SKIP() << reason;
    }

    // 700 four-option questions: softmax of random logits at random temperatures (confidences over
    // the whole range), labels drawn from a sharpened copy (so the model is miscalibrated), plus a
    // one-hot row and a row whose label has probability 0. Scores rounded to 0.01 so ties occur.
    std::mt19937_64 rng(2024);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    const int n = 700, C = 4, M = 15;
    Probs probs;
    std::vector<int> labels;
    for (int i = 0; i < n; ++i) {
        const double scale = 4.0 * u(rng);
        std::vector<double> p(C), sharp(C);
        double sum = 0.0, sharp_sum = 0.0;
        for (int c = 0; c < C; ++c) {
            const double logit = scale * normal(rng);
            p[c] = std::exp(logit);
            sharp[c] = std::exp(1.5 * logit);
            sum += p[c];
            sharp_sum += sharp[c];
        }
        double r = u(rng) * sharp_sum;
        int y = 0;
        while (y < C - 1 && r >= sharp[y]) r -= sharp[y++];
        for (double& x : p) x /= sum;
        probs.push_back(p);
        labels.push_back(y);
    }
    probs[10] = {0.0, 1.0, 0.0, 0.0};
    labels[10] = 1;
    probs[11] = {0.0, 0.0, 0.3, 0.7};
    labels[11] = 0;
    std::vector<double> id_scores, ood_scores;
    for (int i = 0; i < 300; ++i) id_scores.push_back(std::round(100.0 * (1.0 + normal(rng))) / 100.0);
    for (int i = 0; i < 250; ++i) ood_scores.push_back(std::round(100.0 * (1.8 + 1.2 * normal(rng))) / 100.0);

    const fs::path in_path = dir.path / "in.txt", out_path = dir.path / "out.txt";
    {
        std::ofstream in(in_path);
        in << std::setprecision(17) << "calibration " << n << " " << C << " " << M << "\n";
        for (int i = 0; i < n; ++i) {
            for (double x : probs[i]) in << x << " ";
            in << labels[i] << "\n";
        }
        in << "id " << id_scores.size() << "\n";
        for (double s : id_scores) in << s << "\n";
        in << "ood " << ood_scores.size() << "\n";
        for (double s : ood_scores) in << s << "\n";
    }
    const std::string command = std::string("'") + BMOE_PYTHON + "' '" + BMOE_SOURCE_DIR +
                                "/tests/eval_metrics_reference.py' '" + in_path.string() + "' '" + out_path.string() +
                                "'";
    std::string output;
    ASSERT_EQ(run_command(command, dir.path / "log.txt", &output), 0) << command << "\n" << output;
    std::map<std::string, double> ref;
    std::ifstream out(out_path);
    std::string name;
    double value = 0.0;
    while (out >> name >> value) ref[name] = value;
    ASSERT_EQ(ref.size(), 8u) << output;

    const Calibration c = calibration(probs, labels, M);
    const Detection d = ood_detection(id_scores, ood_scores);
    constexpr double kTol = 1e-9;
    EXPECT_NEAR(c.accuracy, ref.at("accuracy"), kTol);
    EXPECT_NEAR(c.ece, ref.at("ece"), kTol);
    EXPECT_NEAR(c.mce, ref.at("mce"), kTol);
    EXPECT_NEAR(c.brier, ref.at("brier"), kTol);
    EXPECT_NEAR(c.nll, ref.at("nll"), kTol);
    EXPECT_NEAR(d.auroc, ref.at("auroc"), kTol);
    EXPECT_NEAR(d.aupr, ref.at("aupr"), kTol);
    EXPECT_NEAR(d.fpr_at_95_tpr, ref.at("fpr95"), kTol);
    // The inputs are not degenerate: a miscalibrated model, separable but overlapping scores.
    EXPECT_GT(c.ece, 0.02);
    EXPECT_GT(d.auroc, 0.6);
    EXPECT_LT(d.auroc, 0.95);
}

}  // namespace
}  // namespace bmoe::eval
