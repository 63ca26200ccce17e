// safetensors.h -- reading and writing the safetensors file format (Hugging Face).
//
// Layout: an 8-byte little-endian header length n, n bytes of JSON header, then raw little-endian
// tensor data. The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
// (byte offsets relative to the start of the data section) and may hold "__metadata__", a flat
// {string: string} map. Files written here pad the header with spaces to an 8-byte boundary and
// store tensors back to back in name order, like the reference implementation.
//
// Tensors are kept as raw bytes plus dtype and shape; the helpers convert to and from typed host
// vectors. Every read is validated (missing file, truncated header, bad JSON, unknown dtype, byte
// ranges that do not match the shape or lie outside the file): errors are one-line bmoe::Error
// messages naming the file.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace bmoe::checkpoints {

// One tensor: dtype is the safetensors name ("F32", "F64", "I32", "I64", "BF16", "F16", ...).
struct TensorEntry {
    std::string dtype;
    std::vector<int64_t> shape;  // empty = scalar (1 element)
    std::vector<uint8_t> bytes;  // numel() * dtype_size(dtype) bytes, little-endian

    int64_t numel() const;
};

struct SafetensorsFile {
    std::map<std::string, TensorEntry> tensors;
    std::map<std::string, std::string> metadata;  // "__metadata__"

    bool has(const std::string& name) const { return tensors.count(name) > 0; }
    // The tensor with this name; throws bmoe::Error listing that it is missing.
    const TensorEntry& at(const std::string& name) const;
};

// Bytes per element of a safetensors dtype name; throws bmoe::Error for unknown names.
size_t dtype_size(const std::string& dtype);

// Typed tensor construction (host data is copied). shape's product must equal data.size().
TensorEntry make_tensor_f32(const std::vector<float>& data, std::vector<int64_t> shape);
TensorEntry make_tensor_f64(const std::vector<double>& data, std::vector<int64_t> shape);
TensorEntry make_tensor_i32(const std::vector<int32_t>& data, std::vector<int64_t> shape);
TensorEntry make_tensor_i64(const std::vector<int64_t>& data, std::vector<int64_t> shape);

// Typed views, converting from the stored dtype:
//   to_float / to_double: F32, F64, F16, BF16, and the integer types
//   to_int64:             the integer types (I8..I64, U8..U64, BOOL)
std::vector<float> tensor_to_float(const TensorEntry& t);
std::vector<double> tensor_to_double(const TensorEntry& t);
std::vector<int64_t> tensor_to_int64(const TensorEntry& t);

// Writes atomically enough for our use: into path + ".tmp", then renamed over path.
void write_safetensors(const std::string& path, const SafetensorsFile& file);
SafetensorsFile read_safetensors(const std::string& path);

}  // namespace bmoe::checkpoints
