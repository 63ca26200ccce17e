// text_corpus.h -- labelled corpora from real text: Debian fortunes and C headers, or a user file.
//
// "text": in-distribution english (package fortunes) and c_headers (/usr/include/*.h, libc6-dev);
// held-out OoD german, spanish, russian (fortunes-de/-es/-ru). A seeded shuffle deals documents to
// validation / train / ood, balanced across domains. A missing package is a one-line bmoe::Error
// naming the package to install.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "data/token_data.h"

namespace bmoe::data {

struct TextCorpusOptions {
    uint64_t seed = 1234;
    uint64_t train_tokens = 2'000'000;  // 0 = every in-distribution document not used for validation
    uint64_t val_tokens = 100'000;      // in-distribution, shared evenly between domains
    uint64_t ood_tokens = 100'000;      // OoD, shared evenly between domains (0 = empty ood split)
    std::string fortunes_dir = "/usr/share/games/fortunes";
    std::string include_dir = "/usr/include";
};

// Domains of the "text" corpus, in-distribution first; the index is the domain id.
const std::vector<DomainInfo>& text_domains();

// The "text" corpus from the fortune files and C headers installed on this machine.
CorpusSplits build_text_corpus(const TextCorpusOptions& options);

// One user text file as a single in-distribution domain named after the file (its stem), cut into
// ~1 KB documents at line boundaries; the ood split is empty. Throws bmoe::Error for a missing,
// empty or too small (< 2 documents) file. fortunes_dir / include_dir are ignored.
CorpusSplits build_file_corpus(const std::string& path, const TextCorpusOptions& options);

// Documents of a fortune file: the text between lines holding only "%", each ending in '\n'.
std::vector<std::string> split_fortunes(std::string_view text);

// Cuts text into chunks of about `target_bytes` at line boundaries (a line longer than
// `max_bytes` is cut inside). Chunks concatenate back to `text`.
std::vector<std::string> split_into_chunks(std::string_view text, size_t target_bytes, size_t max_bytes);

}  // namespace bmoe::data
