// unigram_baseline.h -- the loss of a unigram model: what a language model must beat.
//
// An add-one smoothed unigram distribution estimated on the train split, scored on another split:
// its cross-entropy in nats/token. A model that learned nothing about context lands here.
#pragma once

#include <vector>

#include "data/token_data.h"

namespace bmoe::data {

// Token probabilities (count + 1) / (N + V) over train's vocabulary.
std::vector<double> unigram_distribution(const TokenData& train);

// Cross-entropy (nats/token) of the smoothed train unigram on `eval`'s tokens; with domain >= 0,
// only on the tokens of that domain. Throws bmoe::Error when nothing is left to score or the
// vocabularies differ.
double unigram_cross_entropy(const TokenData& train, const TokenData& eval, int domain = -1);

}  // namespace bmoe::data
