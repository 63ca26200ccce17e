// token_data.cpp -- TokenData bookkeeping: documents, domains, consistency checks.
#include "data/token_data.h"

#include <algorithm>

#include "parallel/check.h"

namespace bmoe::data {

std::vector<std::string> TokenData::domain_names() const {
    std::vector<std::string> names;
    names.reserve(domains.size());
    for (const DomainInfo& d : domains) names.push_back(d.name);
    return names;
}

int TokenData::find_domain(const std::string& name) const {
    for (size_t i = 0; i < domains.size(); ++i)
        if (domains[i].name == name) return static_cast<int>(i);
    return -1;
}

void TokenData::add_document(std::span<const int32_t> doc_tokens, int domain) {
    BMOE_ASSERT(domain >= 0 && domain < num_domains(), "domain ", domain, " of ", num_domains());
    BMOE_ASSERT(!doc_offsets.empty() && doc_offsets.back() == tokens.size());
    tokens.insert(tokens.end(), doc_tokens.begin(), doc_tokens.end());
    doc_offsets.push_back(tokens.size());
    doc_domains.push_back(static_cast<uint16_t>(domain));
}

size_t TokenData::document_at(uint64_t pos) const {
    BMOE_ASSERT(pos < tokens.size(), "position ", pos, " of ", tokens.size());
    // First offset > pos, minus one; empty documents are skipped naturally.
    const auto it = std::upper_bound(doc_offsets.begin(), doc_offsets.end(), pos);
    return static_cast<size_t>(it - doc_offsets.begin()) - 1;
}

std::vector<uint64_t> TokenData::tokens_per_domain() const {
    std::vector<uint64_t> counts(domains.size(), 0);
    for (size_t d = 0; d < doc_domains.size(); ++d) counts[doc_domains[d]] += doc_offsets[d + 1] - doc_offsets[d];
    return counts;
}

std::vector<uint64_t> TokenData::documents_per_domain() const {
    std::vector<uint64_t> counts(domains.size(), 0);
    for (uint16_t d : doc_domains) ++counts[d];
    return counts;
}

std::string TokenData::describe() const {
    std::string s = "split '" + (split.empty() ? std::string("?") : split) + "'";
    if (!origin.empty()) s += " (file '" + origin + "')";
    return s;
}

void TokenData::validate() const {
    const std::string what = describe();
    BMOE_REQUIRE(vocab_size > 0, what, " has vocab_size ", vocab_size, "; it must be positive");
    BMOE_REQUIRE(
        doc_offsets.size() == doc_domains.size() + 1 && doc_offsets.front() == 0 && doc_offsets.back() == tokens.size(),
        what, " has inconsistent document offsets (", doc_offsets.size(), " offsets for ", doc_domains.size(),
        " documents and ", tokens.size(), " tokens); rebuild it with `bmoe data`");
    for (size_t d = 0; d + 1 < doc_offsets.size(); ++d)
        BMOE_REQUIRE(doc_offsets[d] <= doc_offsets[d + 1], what, " has decreasing document offsets at document ", d,
                     "; rebuild it with `bmoe data`");
    for (size_t d = 0; d < doc_domains.size(); ++d)
        BMOE_REQUIRE(doc_domains[d] < domains.size(), what, ": document ", d, " has domain id ", doc_domains[d],
                     " but only ", domains.size(), " domains are named; rebuild it with `bmoe data`");
    for (size_t i = 0; i < tokens.size(); ++i)
        BMOE_REQUIRE(tokens[i] >= 0 && tokens[i] < vocab_size, what, ": token ", i, " has id ", tokens[i],
                     " which is >= vocab_size ", vocab_size, "; rebuild it with `bmoe data` using the same tokenizer");
}

TokenData empty_split_like(const TokenData& like, const std::string& split) {
    TokenData out;
    out.split = split;
    out.source = like.source;
    out.tokenizer = like.tokenizer;
    out.seed = like.seed;
    out.vocab_size = like.vocab_size;
    out.domains = like.domains;
    return out;
}

TokenData select_domain(const TokenData& data, int domain) {
    BMOE_REQUIRE(domain >= 0 && domain < data.num_domains(), data.describe(), " has no domain id ", domain, " (it has ",
                 data.num_domains(), " domains); pick a domain id below ", data.num_domains());
    TokenData out = empty_split_like(data, data.split + ":" + data.domains[domain].name);
    out.origin = data.origin;
    for (size_t d = 0; d < data.num_documents(); ++d) {
        if (data.doc_domains[d] != domain) continue;
        out.add_document(std::span<const int32_t>(data.tokens.data() + data.doc_offsets[d],
                                                  data.doc_offsets[d + 1] - data.doc_offsets[d]),
                         domain);
    }
    BMOE_REQUIRE(out.num_tokens() > 0, data.describe(), " holds no tokens of domain '", data.domains[domain].name,
                 "'; evaluate that domain on a split that contains it");
    return out;
}

}  // namespace bmoe::data
