// token_file.cpp -- the BMOETOK1 token file: little-endian encode/decode plus validation.
#include "data/token_file.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "parallel/check.h"

namespace bmoe::data {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kRegenerate = "regenerate it with `bmoe data`";

uint64_t align8(uint64_t n) { return (n + 7) & ~uint64_t{7}; }

void put_le(std::vector<unsigned char>& buf, uint64_t offset, uint64_t value, int num_bytes) {
    for (int i = 0; i < num_bytes; ++i) buf[offset + i] = static_cast<unsigned char>(value >> (8 * i));
}

uint64_t get_le(const std::vector<unsigned char>& buf, uint64_t offset, int num_bytes) {
    uint64_t v = 0;
    for (int i = 0; i < num_bytes; ++i) v |= static_cast<uint64_t>(buf[offset + i]) << (8 * i);
    return v;
}

// Byte offsets of every section for the given header values (see FORMAT.md).
struct Layout {
    uint64_t meta, doc_offsets, doc_domains, tokens, end;
};

Layout layout_for(uint64_t meta_bytes, uint64_t num_documents, uint64_t num_tokens, uint64_t bytes_per_token) {
    Layout l;
    l.meta = kTokenFileHeaderBytes;
    l.doc_offsets = align8(l.meta + meta_bytes);
    l.doc_domains = l.doc_offsets + 8 * (num_documents + 1);
    l.tokens = align8(l.doc_domains + 2 * num_documents);
    l.end = l.tokens + bytes_per_token * num_tokens;
    return l;
}

std::string printable(const unsigned char* bytes, size_t n) {
    std::string s;
    for (size_t i = 0; i < n; ++i) s += (bytes[i] >= 32 && bytes[i] < 127) ? static_cast<char>(bytes[i]) : '?';
    return s;
}

std::vector<unsigned char> slurp_file(const std::string& path) {
    std::error_code ec;
    const fs::file_status st = fs::status(path, ec);
    BMOE_REQUIRE(fs::exists(st), "token file '", path,
                 "' does not exist; create it with `bmoe data --out DIR` (writes train.bin, val.bin, ood.bin)");
    BMOE_REQUIRE(!fs::is_directory(st), "token file '", path,
                 "' is a directory; pass the .bin file inside it (train.bin, val.bin or ood.bin)");
    std::ifstream in(path, std::ios::binary);
    BMOE_REQUIRE(in.good(), "cannot open token file '", path, "': ", std::strerror(errno),
                 "; check the file's permissions");
    std::vector<unsigned char> buf;
    const uint64_t size = fs::file_size(path, ec);
    BMOE_REQUIRE(!ec, "cannot read the size of token file '", path, "': ", ec.message(),
                 "; check the file's permissions");
    buf.resize(size);
    in.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(size));
    BMOE_REQUIRE(static_cast<uint64_t>(in.gcount()) == size, "cannot read token file '", path, "': read only ",
                 in.gcount(), " of ", size, " bytes; check the disk and ", kRegenerate);
    return buf;
}

}  // namespace

void write_token_file(const std::string& path, const TokenData& data, int bytes_per_token) {
    data.validate();
    if (bytes_per_token == 0) bytes_per_token = data.vocab_size <= 65536 ? 2 : 4;
    BMOE_REQUIRE(bytes_per_token == 2 || bytes_per_token == 4, "cannot write token file '", path,
                 "': bytes_per_token must be 2 or 4 (or 0 for automatic), got ", bytes_per_token);
    BMOE_REQUIRE(bytes_per_token == 4 || data.vocab_size <= 65536, "cannot write token file '", path,
                 "' with 2 bytes per token: vocab_size ", data.vocab_size, " needs 4; use bytes_per_token 4 or 0");
    BMOE_REQUIRE(data.num_documents() <= UINT32_MAX, "cannot write token file '", path, "': ", data.num_documents(),
                 " documents exceed the format's limit of 2^32-1; split the corpus into several files");

    json meta;
    meta["format"] = "bmoe-tokens";
    meta["split"] = data.split;
    meta["source"] = data.source;
    meta["tokenizer"] = data.tokenizer;
    meta["seed"] = data.seed;
    meta["domains"] = json::array();
    for (const DomainInfo& d : data.domains)
        meta["domains"].push_back({{"name", d.name}, {"description", d.description}, {"ood", d.is_ood}});
    const std::string meta_text = meta.dump(-1, ' ', false, json::error_handler_t::replace);

    const uint64_t num_docs = data.num_documents(), num_tokens = data.num_tokens();
    const Layout l = layout_for(meta_text.size(), num_docs, num_tokens, bytes_per_token);
    std::vector<unsigned char> buf(l.end, 0);
    std::memcpy(buf.data(), kTokenFileMagic, 8);
    put_le(buf, 8, kTokenFileVersion, 4);
    put_le(buf, 12, static_cast<uint32_t>(data.vocab_size), 4);
    put_le(buf, 16, static_cast<uint32_t>(bytes_per_token), 4);
    put_le(buf, 20, num_docs, 4);
    put_le(buf, 24, num_tokens, 8);
    put_le(buf, 32, meta_text.size(), 4);
    put_le(buf, 36, data.domains.size(), 4);
    std::memcpy(buf.data() + l.meta, meta_text.data(), meta_text.size());
    for (uint64_t d = 0; d <= num_docs; ++d) put_le(buf, l.doc_offsets + 8 * d, data.doc_offsets[d], 8);
    for (uint64_t d = 0; d < num_docs; ++d) put_le(buf, l.doc_domains + 2 * d, data.doc_domains[d], 2);
    for (uint64_t i = 0; i < num_tokens; ++i)
        put_le(buf, l.tokens + bytes_per_token * i, static_cast<uint32_t>(data.tokens[i]), bytes_per_token);

    const std::string tmp = path + ".tmp";
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        BMOE_REQUIRE(out.good(), "cannot write token file '", path, "': ", std::strerror(errno),
                     "; check that its directory exists and is writable");
        out.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
        out.flush();
        BMOE_REQUIRE(out.good(), "cannot write token file '", path, "': writing ", buf.size(),
                     " bytes failed; check the free disk space");
    }
    std::error_code ec;
    fs::rename(tmp, path, ec);
    BMOE_REQUIRE(!ec, "cannot write token file '", path, "': renaming '", tmp, "' failed (", ec.message(),
                 "); check that the directory is writable");
}

TokenData read_token_file(const std::string& path) {
    const std::vector<unsigned char> buf = slurp_file(path);
    const uint64_t size = buf.size();
    const std::string file = "token file '" + path + "'";
    BMOE_REQUIRE(size > 0, file, " is empty (0 bytes); ", kRegenerate);
    BMOE_REQUIRE(size >= 8 && std::memcmp(buf.data(), kTokenFileMagic, 8) == 0, file,
                 " is not a bmoe token file (its first bytes are '", printable(buf.data(), std::min<size_t>(size, 8)),
                 "' instead of '", kTokenFileMagic, "'); pass a train.bin/val.bin/ood.bin written by `bmoe data`");
    BMOE_REQUIRE(size >= kTokenFileHeaderBytes, file, " is truncated: ", size, " bytes is shorter than the ",
                 kTokenFileHeaderBytes, "-byte header; ", kRegenerate);
    const uint64_t version = get_le(buf, 8, 4);
    BMOE_REQUIRE(version == kTokenFileVersion, file, " has format version ", version, " but this bmoe reads version ",
                 kTokenFileVersion, "; regenerate it with this bmoe's `bmoe data`");

    const uint64_t vocab_size = get_le(buf, 12, 4), bytes_per_token = get_le(buf, 16, 4);
    const uint64_t num_docs = get_le(buf, 20, 4), num_tokens = get_le(buf, 24, 8);
    const uint64_t meta_bytes = get_le(buf, 32, 4), num_domains = get_le(buf, 36, 4);
    BMOE_REQUIRE(bytes_per_token == 2 || bytes_per_token == 4, file, " is corrupt: bytes_per_token is ",
                 bytes_per_token, " (must be 2 or 4); ", kRegenerate);
    BMOE_REQUIRE(vocab_size > 0 && vocab_size <= INT32_MAX && (bytes_per_token == 4 || vocab_size <= 65536), file,
                 " is corrupt: vocab_size ", vocab_size, " is invalid for ", bytes_per_token, "-byte tokens; ",
                 kRegenerate);
    BMOE_REQUIRE(num_domains <= 65536, file, " is corrupt: it claims ", num_domains, " domains; ", kRegenerate);
    // meta_bytes and num_docs are 32-bit, so this cannot overflow; num_tokens is bounded by `held`.
    const uint64_t tables_end = layout_for(meta_bytes, num_docs, 0, 0).tokens;
    BMOE_REQUIRE(tables_end <= size, file, " is truncated: its header describes ", num_docs, " documents and ",
                 meta_bytes, " bytes of metadata, which need ", tables_end, " bytes, but the file has ", size, "; ",
                 kRegenerate);
    const uint64_t held = (size - tables_end) / bytes_per_token;
    BMOE_REQUIRE(num_tokens <= held, file, " is truncated: header says ", num_tokens, " tokens but file holds ", held,
                 "; ", kRegenerate);
    const Layout l = layout_for(meta_bytes, num_docs, num_tokens, bytes_per_token);
    BMOE_REQUIRE(l.end == size, file, " has ", size - l.end, " unexpected trailing bytes after its ", num_tokens,
                 " tokens; ", kRegenerate);

    TokenData data;
    data.origin = path;
    data.vocab_size = static_cast<int>(vocab_size);
    json meta;
    try {
        meta = json::parse(buf.begin() + static_cast<std::ptrdiff_t>(l.meta),
                           buf.begin() + static_cast<std::ptrdiff_t>(l.meta + meta_bytes));
        data.split = meta.value("split", std::string());
        data.source = meta.value("source", std::string());
        data.tokenizer = meta.value("tokenizer", std::string("byte"));
        data.seed = meta.value("seed", uint64_t{0});
        for (const json& d : meta.at("domains")) {
            DomainInfo info;
            info.name = d.at("name").get<std::string>();
            info.description = d.value("description", std::string());
            info.is_ood = d.value("ood", false);
            data.domains.push_back(std::move(info));
        }
    } catch (const json::exception& e) {
        throw Error(concat(file, " is corrupt: its metadata is not the expected JSON (", e.what(), "); ", kRegenerate));
    }
    BMOE_REQUIRE(data.domains.size() == num_domains, file, " is corrupt: the header counts ", num_domains,
                 " domains but the metadata names ", data.domains.size(), "; ", kRegenerate);

    data.doc_offsets.resize(num_docs + 1);
    for (uint64_t d = 0; d <= num_docs; ++d) data.doc_offsets[d] = get_le(buf, l.doc_offsets + 8 * d, 8);
    BMOE_REQUIRE(data.doc_offsets.front() == 0 && data.doc_offsets.back() == num_tokens, file,
                 " is corrupt: its document table spans tokens ", data.doc_offsets.front(), "..",
                 data.doc_offsets.back(), " but the file holds ", num_tokens, " tokens; ", kRegenerate);
    data.doc_domains.resize(num_docs);
    for (uint64_t d = 0; d < num_docs; ++d) {
        BMOE_REQUIRE(data.doc_offsets[d] <= data.doc_offsets[d + 1], file,
                     " is corrupt: document offsets decrease at document ", d, "; ", kRegenerate);
        data.doc_domains[d] = static_cast<uint16_t>(get_le(buf, l.doc_domains + 2 * d, 2));
        BMOE_REQUIRE(data.doc_domains[d] < num_domains, file, " is corrupt: document ", d, " has domain id ",
                     data.doc_domains[d], " but only ", num_domains, " domains are named; ", kRegenerate);
    }

    data.tokens.resize(num_tokens);
    const unsigned char* p = buf.data() + l.tokens;
    for (uint64_t i = 0; i < num_tokens; ++i) {
        const uint64_t id =
            bytes_per_token == 2 ? uint64_t{p[2 * i]} | uint64_t{p[2 * i + 1]} << 8 : get_le(buf, l.tokens + 4 * i, 4);
        BMOE_REQUIRE(id < vocab_size, file, " is corrupt: token ", i, " has id ", id, " >= vocab_size ", vocab_size,
                     "; ", kRegenerate, " (with the same tokenizer)");
        data.tokens[i] = static_cast<int32_t>(id);
    }
    return data;
}

}  // namespace bmoe::data
