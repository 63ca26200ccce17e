// tokenizer.cpp -- ByteTokenizer: bytes are their own token ids.
#include "data/tokenizer.h"

#include "parallel/check.h"

namespace bmoe::data {

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
    std::vector<int32_t> out;
    encode_append(text, out);
    return out;
}

void ByteTokenizer::encode_append(std::string_view text, std::vector<int32_t>& out) const {
    out.reserve(out.size() + text.size());
    for (char c : text) out.push_back(static_cast<int32_t>(static_cast<unsigned char>(c)));
}

std::string ByteTokenizer::decode(std::span<const int32_t> ids) const {
    std::string out;
    out.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
        BMOE_REQUIRE(ids[i] >= 0 && ids[i] < kVocabSize, "token id ", ids[i], " at position ", i,
                     " is outside the byte vocabulary 0..255; decode only ids produced by the byte tokenizer");
        out.push_back(static_cast<char>(static_cast<unsigned char>(ids[i])));
    }
    return out;
}

}  // namespace bmoe::data
