// synthetic_corpus.h -- the built-in multi-domain corpus, generated deterministically from a seed.
//
// Five in-distribution domains with very different byte statistics (arithmetic, english, code,
// json, dna) so that MoE routers can specialise, and three held-out OoD domains (roman, morse,
// conlang) that appear only in the ood split. Each document is 100-400 bytes ending in '\n'.
// Output depends only on the seed (own PRNG, data/rng.h), never on the standard library.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/rng.h"
#include "data/token_data.h"

namespace bmoe::data {

// All synthetic domains, in-distribution first; the index is the domain id in every split.
const std::vector<DomainInfo>& synthetic_domains();
std::vector<int> synthetic_domain_ids(bool ood);

// One document of synthetic domain `domain` (an index into synthetic_domains()), ending in '\n'.
std::string generate_synthetic_document(int domain, Rng& rng);

struct SyntheticCorpusOptions {
    uint64_t seed = 1234;
    uint64_t train_tokens = 2'000'000;
    uint64_t val_tokens = 100'000;
    uint64_t ood_tokens = 100'000;
};

// Random streams of the three splits (Rng(seed, stream)): never shared between splits.
inline constexpr uint64_t kTrainStream = 1, kValidationStream = 2, kOodStream = 3;

// Documents drawn from `domain_ids` (one uniformly random domain per document) until the split
// holds at least `num_tokens` tokens (whole documents only, so it may overshoot by < 1 document).
TokenData generate_synthetic_split(
    const std::string& split, const std::vector<int>& domain_ids, uint64_t num_tokens, uint64_t seed, uint64_t stream);

// train + validation from the in-distribution domains, ood from the OoD domains.
// Throws bmoe::Error when train_tokens or val_tokens is 0 (ood_tokens 0 gives an empty ood split).
CorpusSplits build_synthetic_corpus(const SyntheticCorpusOptions& options);

}  // namespace bmoe::data
