// token_data.h -- TokenData: one split of a corpus in memory (token ids grouped into documents,
// each document labelled with a domain), and CorpusSplits: the train / validation / ood triple.
//
// Every split of one corpus carries the same domain list, so a domain id means the same domain in
// train.bin, val.bin and ood.bin. This is what token files store (data/FORMAT.md) and what the
// loaders (data/data_loader.h) read.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace bmoe::data {

struct DomainInfo {
    std::string name;         // short label used in metrics: "arithmetic", "english", ...
    std::string description;  // one line for humans
    bool is_ood = false;      // held out: appears only in the ood split
};

struct TokenData {
    std::string split;   // "train", "validation", "ood" (free text)
    std::string source;  // "synthetic", "text" or the text file it came from
    std::string tokenizer = "byte";
    uint64_t seed = 0;  // seed the corpus was generated / split with
    int vocab_size = 256;
    std::vector<DomainInfo> domains;       // index = domain id
    std::vector<int32_t> tokens;           // all documents, concatenated
    std::vector<uint64_t> doc_offsets{0};  // [num_documents + 1]: document d is tokens[off[d], off[d+1])
    std::vector<uint16_t> doc_domains;     // [num_documents]: domain id of each document
    std::string origin;                    // file this was read from ("" when built in memory); used in error messages

    uint64_t num_tokens() const { return tokens.size(); }
    size_t num_documents() const { return doc_domains.size(); }
    int num_domains() const { return static_cast<int>(domains.size()); }
    std::vector<std::string> domain_names() const;
    // Domain id by name, or -1.
    int find_domain(const std::string& name) const;

    void add_document(std::span<const int32_t> doc_tokens, int domain);
    // Index of the document holding token `pos` (binary search over doc_offsets).
    size_t document_at(uint64_t pos) const;
    int domain_at(uint64_t pos) const { return doc_domains[document_at(pos)]; }
    std::vector<uint64_t> tokens_per_domain() const;
    std::vector<uint64_t> documents_per_domain() const;

    // "split 'validation' (file 'out/val.bin')": how error messages name this data.
    std::string describe() const;
    // Internal consistency (offsets monotone, domains and token ids in range); throws bmoe::Error.
    void validate() const;
};

struct CorpusSplits {
    TokenData train, validation, ood;  // ood may be empty (e.g. a single user text file)
};

// The documents of one domain only, in their original order (for per-domain validation loss).
// Throws bmoe::Error when the domain id is out of range or the split holds no such document.
TokenData select_domain(const TokenData& data, int domain);

// An empty split sharing `like`'s domain list, vocabulary and provenance.
TokenData empty_split_like(const TokenData& like, const std::string& split);

}  // namespace bmoe::data
