// tokenizer.h -- ByteTokenizer: text <-> token ids, one token per byte (vocab 256).
//
// Works for any byte string (UTF-8 or not): a multi-byte UTF-8 character becomes several
// tokens, and decode(encode(s)) == s always.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace bmoe::data {

class ByteTokenizer {
  public:
    static constexpr int kVocabSize = 256;

    static constexpr int vocab_size() { return kVocabSize; }
    static const char* name() { return "byte"; }

    std::vector<int32_t> encode(std::string_view text) const;
    // Appends the tokens of `text` to `out` (no separator is added).
    void encode_append(std::string_view text, std::vector<int32_t>& out) const;
    // Throws bmoe::Error when an id is outside 0..255.
    std::string decode(std::span<const int32_t> ids) const;
};

}  // namespace bmoe::data
