// token_file.h -- reading and writing token files (train.bin / val.bin / ood.bin).
//
// A token file holds one TokenData: a 64-byte little-endian header ("BMOETOK1"), JSON metadata
// (split, source, domain names), the document table and the token ids as uint16 or uint32.
// The byte layout is specified in data/FORMAT.md. The reader loads the whole file into memory and
// rejects anything malformed with a one-line bmoe::Error naming the file and the fix.
#pragma once

#include <cstdint>
#include <string>

#include "data/token_data.h"

namespace bmoe::data {

inline constexpr char kTokenFileMagic[9] = "BMOETOK1";
inline constexpr uint32_t kTokenFileVersion = 1;
inline constexpr uint64_t kTokenFileHeaderBytes = 64;

// Writes `data` to `path` (via a temporary file renamed into place). bytes_per_token: 2 (uint16),
// 4 (uint32), or 0 to pick the smallest that holds vocab_size (2 when vocab_size <= 65536).
void write_token_file(const std::string& path, const TokenData& data, int bytes_per_token = 0);

// Reads and validates a whole token file. The result's `origin` is `path`.
TokenData read_token_file(const std::string& path);

}  // namespace bmoe::data
