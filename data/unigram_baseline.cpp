// unigram_baseline.cpp -- add-one smoothed unigram cross-entropy.
#include "data/unigram_baseline.h"

#include <cmath>

#include "parallel/check.h"

namespace bmoe::data {

std::vector<double> unigram_distribution(const TokenData& train) {
    std::vector<uint64_t> counts(static_cast<size_t>(train.vocab_size), 0);
    for (int32_t t : train.tokens) ++counts[static_cast<size_t>(t)];
    const double denom = static_cast<double>(train.num_tokens()) + train.vocab_size;
    std::vector<double> p(counts.size());
    for (size_t i = 0; i < counts.size(); ++i) p[i] = (static_cast<double>(counts[i]) + 1.0) / denom;
    return p;
}

double unigram_cross_entropy(const TokenData& train, const TokenData& eval, int domain) {
    BMOE_REQUIRE(train.vocab_size == eval.vocab_size, "cannot score ", eval.describe(), " with a unigram of ",
                 train.describe(), ": vocab sizes differ (", eval.vocab_size, " vs ", train.vocab_size,
                 "); build both splits with the same tokenizer");
    std::vector<double> neg_log_p = unigram_distribution(train);
    for (double& p : neg_log_p) p = -std::log(p);
    double sum = 0.0;
    uint64_t count = 0;
    for (size_t d = 0; d < eval.num_documents(); ++d) {
        if (domain >= 0 && eval.doc_domains[d] != domain) continue;
        for (uint64_t i = eval.doc_offsets[d]; i < eval.doc_offsets[d + 1]; ++i) {
            sum += neg_log_p[static_cast<size_t>(eval.tokens[i])];
            ++count;
        }
    }
    BMOE_REQUIRE(count > 0, eval.describe(), " has no tokens", (domain >= 0 ? concat(" of domain ", domain) : ""),
                 " to score the unigram baseline on; use a non-empty split");
    return sum / static_cast<double>(count);
}

}  // namespace bmoe::data
