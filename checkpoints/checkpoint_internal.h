// checkpoint_internal.h -- helpers shared by checkpoint.cpp and checkpoint_describe.cpp (not public API).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "checkpoints/h5_handles.h"

namespace bmoe::checkpoints::detail {

inline constexpr const char* kMagic = "bmoe-checkpoint";
inline constexpr const char* kChecksumAttr = "crc32";  // zlib/IEEE CRC-32 of the little-endian float32 bytes

uint32_t crc32_bytes(const void* data, size_t num_bytes);

// Opens an existing checkpoint read-only with one-line errors for: missing file, not HDF5, truncated.
H5File open_for_read(const std::string& path);

}  // namespace bmoe::checkpoints::detail
