// synthetic_corpus.h -- the built-in multi-domain corpus, generated deterministically from a seed.
//
// Five in-distribution domains with very different byte statistics (arithmetic, english, code,
// json, dna) so that MoE routers can specialise, and three held-out OoD domains (roman, morse,
// conlang) that appear only in the ood split. Each document is 100-400 bytes ending in '\n';
// optionally a share of train / validation documents are MCQA questions (data/mcqa.h).
// Output depends only on the seed (own PRNG, data/rng.h), never on the standard library.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "data/rng.h"
#include "data/token_data.h"

namespace bmoe::data {

// All synthetic domains, in-distribution first; the index is the domain id in every split.
const std::vector<DomainInfo>& synthetic_domains();
std::vector<int> synthetic_domain_ids(bool ood);

// One document of synthetic domain `domain` (an index into synthetic_domains()), ending in '\n'.
std::string generate_synthetic_document(int domain, Rng& rng);

// One of the units a document is made of, for short snippets in a domain's style (data/mcqa.h):
// an arithmetic / roman / morse line (ending in '\n'), an english sentence (no '\n'), a code
// snippet or a json record (ending in '\n'), a whole dna record, a conlang sentence (ending in
// ". " or "? ").
std::string generate_synthetic_unit(int domain, Rng& rng);

// The domains' vocabularies, so questions about a snippet can be answered exactly.
std::string roman_numeral(int64_t n);             // 1..3999: 14 -> "XIV"
std::string morse_encode(std::string_view text);  // letters ' '-separated, words " / "-separated
enum class WordClass { kNoun, kVerb, kAdjective, kAdverb, kOther };
WordClass english_word_class(std::string_view word);  // of the english domain's word lists, any case

struct SyntheticCorpusOptions {
    uint64_t seed = 1234;
    uint64_t train_tokens = 2'000'000;
    uint64_t val_tokens = 100'000;
    uint64_t ood_tokens = 100'000;
    // Share of train / validation documents that are MCQA training questions with their answer
    // (data/mcqa.h), in [0, 1); the ood split never holds questions. `bmoe data` defaults to 0.2.
    double mcqa_fraction = 0.0;
};

// Random streams of the three splits (Rng(seed, stream)): never shared between splits.
inline constexpr uint64_t kTrainStream = 1, kValidationStream = 2, kOodStream = 3;

// Documents drawn from `domain_ids` (one uniformly random domain per document) until the split
// holds at least `num_tokens` tokens (whole documents only, so it may overshoot by < 1 document).
// With mcqa_fraction > 0 each document is, with that probability, an MCQA training question
// (prompt + answer letter + '\n', labelled with the question's domain) drawn from its own stream
// Rng(seed, kMcqaMixStream + stream): the plain documents stay the same sequence, questions between.
TokenData generate_synthetic_split(const std::string& split,
                                   const std::vector<int>& domain_ids,
                                   uint64_t num_tokens,
                                   uint64_t seed,
                                   uint64_t stream,
                                   double mcqa_fraction = 0.0);

// train + validation from the in-distribution domains (with options.mcqa_fraction questions), ood
// from the OoD domains. Throws bmoe::Error when train_tokens or val_tokens is 0 (ood_tokens 0 gives
// an empty ood split) or mcqa_fraction is outside [0, 1).
CorpusSplits build_synthetic_corpus(const SyntheticCorpusOptions& options);

}  // namespace bmoe::data
