#include "checkpoints/safetensors.h"

#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "parallel/check.h"

namespace bmoe::checkpoints {

static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

namespace {

using nlohmann::json;

// The reference implementation refuses headers above 100 MB; so do we (a corrupt length field
// should not make us allocate gigabytes).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

// Bytes per element, 0 for names safetensors does not define.
size_t known_dtype_size(const std::string& dtype) {
    static const std::map<std::string, size_t> sizes = {
        {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
        {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},     {"I64", 8},     {"U64", 8}, {"F64", 8},
    };
    auto it = sizes.find(dtype);
    return it == sizes.end() ? 0 : it->second;
}
constexpr const char* kDtypeNames = "F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL F8_E5M2 F8_E4M3";

std::string shape_string(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

int64_t checked_numel(const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) {
        if (d < 0 || (d > 0 && n > std::numeric_limits<int64_t>::max() / d)) return -1;
        n *= d;
    }
    return n;
}

template <typename T>
std::vector<T> copy_as(const TensorEntry& t) {
    std::vector<T> out(t.bytes.size() / sizeof(T));
    if (!out.empty()) std::memcpy(out.data(), t.bytes.data(), out.size() * sizeof(T));
    return out;
}

float half_to_float(uint16_t h) {
    const int sign = (h >> 15) & 1, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float v;
    if (exponent == 0)
        v = std::ldexp(static_cast<float>(mantissa), -24);  // zero / subnormal
    else if (exponent == 31)
        v = mantissa == 0 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
    else
        v = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
    return sign ? -v : v;
}

float bf16_to_float(uint16_t b) {
    const uint32_t bits = static_cast<uint32_t>(b) << 16;
    return std::bit_cast<float>(bits);
}

// Converts any numeric dtype to T (double or int64 or float), element by element.
template <typename T>
std::vector<T> convert(const TensorEntry& t, bool allow_float) {
    const std::string& d = t.dtype;
    auto from = [&](auto tag) {
        using S = decltype(tag);
        std::vector<S> src = copy_as<S>(t);
        return std::vector<T>(src.begin(), src.end());
    };
    if (d == "I64") return from(int64_t{});
    if (d == "I32") return from(int32_t{});
    if (d == "I16") return from(int16_t{});
    if (d == "I8") return from(int8_t{});
    if (d == "U64") return from(uint64_t{});
    if (d == "U32") return from(uint32_t{});
    if (d == "U16") return from(uint16_t{});
    if (d == "U8" || d == "BOOL") return from(uint8_t{});
    if (allow_float) {
        if (d == "F32") return from(float{});
        if (d == "F64") return from(double{});
        if (d == "F16" || d == "BF16") {
            std::vector<uint16_t> src = copy_as<uint16_t>(t);
            std::vector<T> out(src.size());
            for (size_t i = 0; i < src.size(); ++i)
                out[i] = static_cast<T>(d == "F16" ? half_to_float(src[i]) : bf16_to_float(src[i]));
            return out;
        }
    }
    throw Error(
        concat("safetensors: cannot convert a ", d, " tensor to ", allow_float ? "floating point" : "integers"));
}

TensorEntry make_tensor(const void* data, size_t count, const std::string& dtype, std::vector<int64_t> shape) {
    const int64_t numel = checked_numel(shape);
    BMOE_REQUIRE(numel >= 0 && static_cast<size_t>(numel) == count, "safetensors: shape ", shape_string(shape),
                 " holds ", numel, " elements but ", count, " values were given");
    TensorEntry t;
    t.dtype = dtype;
    t.shape = std::move(shape);
    t.bytes.resize(count * dtype_size(dtype));
    if (!t.bytes.empty()) std::memcpy(t.bytes.data(), data, t.bytes.size());
    return t;
}

}  // namespace

int64_t TensorEntry::numel() const { return checked_numel(shape); }

const TensorEntry& SafetensorsFile::at(const std::string& name) const {
    auto it = tensors.find(name);
    BMOE_REQUIRE(it != tensors.end(), "safetensors: no tensor named '", name, "' (the file has ", tensors.size(),
                 " tensors)");
    return it->second;
}

size_t dtype_size(const std::string& dtype) {
    const size_t size = known_dtype_size(dtype);
    BMOE_REQUIRE(size > 0, "safetensors: unknown dtype '", dtype, "' (expected one of ", kDtypeNames, ")");
    return size;
}

TensorEntry make_tensor_f32(const std::vector<float>& data, std::vector<int64_t> shape) {
    return make_tensor(data.data(), data.size(), "F32", std::move(shape));
}
TensorEntry make_tensor_f64(const std::vector<double>& data, std::vector<int64_t> shape) {
    return make_tensor(data.data(), data.size(), "F64", std::move(shape));
}
TensorEntry make_tensor_i32(const std::vector<int32_t>& data, std::vector<int64_t> shape) {
    return make_tensor(data.data(), data.size(), "I32", std::move(shape));
}
TensorEntry make_tensor_i64(const std::vector<int64_t>& data, std::vector<int64_t> shape) {
    return make_tensor(data.data(), data.size(), "I64", std::move(shape));
}

std::vector<float> tensor_to_float(const TensorEntry& t) {
    if (t.dtype == "F32") return copy_as<float>(t);
    return convert<float>(t, /*allow_float=*/true);
}
std::vector<double> tensor_to_double(const TensorEntry& t) {
    if (t.dtype == "F64") return copy_as<double>(t);
    return convert<double>(t, /*allow_float=*/true);
}
std::vector<int64_t> tensor_to_int64(const TensorEntry& t) { return convert<int64_t>(t, /*allow_float=*/false); }

// ---------------------------------------------------------------------------------------------
// write

void write_safetensors(const std::string& path, const SafetensorsFile& file) {
    json header = json::object();
    if (!file.metadata.empty()) {
        json meta = json::object();
        for (const auto& [key, value] : file.metadata) meta[key] = value;
        header["__metadata__"] = meta;
    }
    uint64_t offset = 0;
    for (const auto& [name, t] : file.tensors) {
        BMOE_REQUIRE(name != "__metadata__", "safetensors: '", path, "': a tensor may not be named __metadata__");
        const int64_t numel = t.numel();
        BMOE_REQUIRE(numel >= 0 && t.bytes.size() == static_cast<size_t>(numel) * dtype_size(t.dtype), "safetensors: '",
                     path, "': tensor '", name, "' (", t.dtype, " ", shape_string(t.shape), ") has ", t.bytes.size(),
                     " bytes, expected ", numel * static_cast<int64_t>(dtype_size(t.dtype)));
        header[name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
        offset += t.bytes.size();
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');  // data section starts 8-byte aligned

    const std::string tmp = path + ".tmp";
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        BMOE_REQUIRE(out.is_open(), "safetensors: cannot create '", tmp, "': ", std::strerror(errno));
        const uint64_t n = text.size();
        out.write(reinterpret_cast<const char*>(&n), sizeof(n));
        out.write(text.data(), static_cast<std::streamsize>(text.size()));
        for (const auto& [name, t] : file.tensors)
            out.write(reinterpret_cast<const char*>(t.bytes.data()), static_cast<std::streamsize>(t.bytes.size()));
        out.flush();
        BMOE_REQUIRE(out.good(), "safetensors: writing '", tmp, "' failed (disk full?)");
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    BMOE_REQUIRE(!ec, "safetensors: cannot rename '", tmp, "' to '", path, "': ", ec.message());
}

// ---------------------------------------------------------------------------------------------
// read

SafetensorsFile read_safetensors(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    BMOE_REQUIRE(in.is_open(), "safetensors: cannot open '", path, "': ", std::strerror(errno));
    std::error_code ec;
    const uint64_t file_size = std::filesystem::file_size(path, ec);
    BMOE_REQUIRE(!ec, "safetensors: cannot stat '", path, "': ", ec.message());
    BMOE_REQUIRE(file_size >= 8, "safetensors: '", path, "' is ", file_size,
                 " bytes, too short for the 8-byte header length: not a safetensors file");

    uint64_t header_len = 0;
    in.read(reinterpret_cast<char*>(&header_len), sizeof(header_len));
    BMOE_REQUIRE(in.good(), "safetensors: cannot read the header length of '", path, "'");
    BMOE_REQUIRE(header_len <= file_size - 8, "safetensors: '", path, "' declares a ", header_len,
                 "-byte header but only ", file_size - 8, " bytes follow: truncated or not a safetensors file");
    BMOE_REQUIRE(header_len <= kMaxHeaderBytes, "safetensors: '", path, "' declares a ", header_len,
                 "-byte header (limit ", kMaxHeaderBytes, "): corrupt file");
    std::string text(header_len, '\0');
    in.read(text.data(), static_cast<std::streamsize>(header_len));
    BMOE_REQUIRE(in.good(), "safetensors: cannot read the header of '", path, "'");

    json header;
    try {
        header = json::parse(text);
    } catch (const json::exception& e) {
        throw Error(concat("safetensors: '", path, "' has a header that is not valid JSON (", e.what(), ")"));
    }
    BMOE_REQUIRE(header.is_object(), "safetensors: '", path, "': the header is JSON but not an object");

    const uint64_t data_start = 8 + header_len, data_size = file_size - data_start;
    SafetensorsFile file;
    for (const auto& [name, item] : header.items()) {
        const std::string where = concat("safetensors: '", path, "': ");
        if (name == "__metadata__") {
            BMOE_REQUIRE(item.is_object(), where, "__metadata__ must be an object of strings");
            for (const auto& [key, value] : item.items()) {
                BMOE_REQUIRE(value.is_string(), where, "__metadata__['", key, "'] is not a string");
                file.metadata[key] = value.get<std::string>();
            }
            continue;
        }
        BMOE_REQUIRE(
            item.is_object() && item.contains("dtype") && item.contains("shape") && item.contains("data_offsets"),
            where, "tensor '", name, "' needs dtype, shape and data_offsets");
        const json &dtype = item["dtype"], &shape = item["shape"], &offsets = item["data_offsets"];
        BMOE_REQUIRE(dtype.is_string(), where, "tensor '", name, "': dtype is not a string");
        BMOE_REQUIRE(shape.is_array(), where, "tensor '", name, "': shape is not an array");
        BMOE_REQUIRE(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
                         offsets[1].is_number_unsigned(),
                     where, "tensor '", name, "': data_offsets must be two non-negative integers");
        TensorEntry t;
        t.dtype = dtype.get<std::string>();
        for (const json& d : shape) {
            BMOE_REQUIRE(d.is_number_integer() && d.get<int64_t>() >= 0, where, "tensor '", name,
                         "': shape entries must be non-negative integers");
            t.shape.push_back(d.get<int64_t>());
        }
        const size_t elem = known_dtype_size(t.dtype);
        BMOE_REQUIRE(elem > 0, where, "tensor '", name, "' has unknown dtype '", t.dtype, "' (expected one of ",
                     kDtypeNames, ")");
        const uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
        BMOE_REQUIRE(begin <= end && end <= data_size, where, "tensor '", name, "' has data_offsets [", begin, ", ",
                     end, "] outside the ", data_size, "-byte data section");
        const int64_t numel = t.numel();
        BMOE_REQUIRE(numel >= 0 && static_cast<uint64_t>(numel) <= data_size / elem &&
                         end - begin == static_cast<uint64_t>(numel) * elem,
                     where, "tensor '", name, "' (", t.dtype, " ", shape_string(t.shape), ") spans ", end - begin,
                     " bytes, but its shape needs ", numel, " x ", elem);
        t.bytes.resize(end - begin);
        in.seekg(static_cast<std::streamoff>(data_start + begin));
        in.read(reinterpret_cast<char*>(t.bytes.data()), static_cast<std::streamsize>(t.bytes.size()));
        BMOE_REQUIRE(in.good(), where, "cannot read the data of tensor '", name, "'");
        file.tensors.emplace(name, std::move(t));
    }
    return file;
}

}  // namespace bmoe::checkpoints
