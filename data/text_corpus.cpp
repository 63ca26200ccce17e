// text_corpus.cpp -- reading fortune files / C headers / a user file into balanced, seeded splits.
#include "data/text_corpus.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <utility>

#include "data/rng.h"
#include "data/synthetic_corpus.h"
#include "data/tokenizer.h"
#include "parallel/check.h"

namespace bmoe::data {
namespace {

namespace fs = std::filesystem;

enum TextDomain { kEnglish, kCHeaders, kGerman, kSpanish, kRussian };

// Stream ids of Rng(seed, stream) for shuffling each domain's documents (split order uses
// kTrainStream / kValidationStream / kOodStream from synthetic_corpus.h).
constexpr uint64_t kDomainShuffleStream = 100;

constexpr size_t kHeaderChunkBytes = 2048, kFileChunkBytes = 1024, kMaxChunkBytes = 4096;

bool ends_with(const std::string& s, std::string_view suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string read_file(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    BMOE_REQUIRE(in.good(), "cannot open text file '", path.string(), "'; check that it exists and is readable");
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Regular files of `dir` (symlinks followed, duplicates removed) whose names pass `keep`, sorted
// by name so the corpus does not depend on directory order.
template <typename Keep>
std::vector<fs::path> list_files(const fs::path& dir, Keep keep) {
    std::vector<fs::path> files;
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) return files;
    std::set<fs::path> seen;
    for (const fs::directory_entry& entry :
         fs::directory_iterator(dir, fs::directory_options::skip_permission_denied, ec)) {
        const std::string name = entry.path().filename().string();
        if (name.empty() || name[0] == '.' || !keep(name)) continue;
        if (!fs::is_regular_file(entry.path(), ec)) continue;
        const fs::path real = fs::weakly_canonical(entry.path(), ec);
        if (!seen.insert(ec ? entry.path() : real).second) continue;
        files.push_back(entry.path());
    }
    std::sort(files.begin(), files.end());
    return files;
}

// A domain's documents, shuffled once, consumed front to back by the splits.
struct Pool {
    int domain = 0;
    std::vector<std::string> docs;
    size_t next = 0;
    uint64_t total_tokens = 0;
};

Pool make_pool(int domain, std::vector<std::string> docs, uint64_t seed) {
    Pool p;
    p.domain = domain;
    p.docs = std::move(docs);
    Rng rng(seed, kDomainShuffleStream + static_cast<uint64_t>(domain));
    rng.shuffle(p.docs);
    for (const std::string& d : p.docs) p.total_tokens += d.size();  // byte tokenizer: 1 token per byte
    return p;
}

Pool fortune_pool(int domain,
                  const fs::path& dir,
                  const std::string& package,
                  const std::string& what,
                  const TextCorpusOptions& options) {
    const std::vector<fs::path> files = list_files(dir, [](const std::string& n) {
        return !ends_with(n, ".dat") && !ends_with(n, ".u8") && !ends_with(n, ".sig");
    });
    BMOE_REQUIRE(!files.empty(), what, " fortunes not found: '", dir.string(),
                 "' holds no fortune files; install Debian package ", package, " (`apt-get install ", package,
                 "`) or point --fortunes-dir at a fortunes directory");
    std::vector<std::string> docs;
    for (const fs::path& f : files)
        for (std::string& d : split_fortunes(read_file(f))) docs.push_back(std::move(d));
    BMOE_REQUIRE(!docs.empty(), what, " fortune files in '", dir.string(),
                 "' hold no fortunes; reinstall Debian package ", package, " (`apt-get install --reinstall ", package,
                 "`)");
    return make_pool(domain, std::move(docs), options.seed);
}

Pool header_pool(int domain, const TextCorpusOptions& options) {
    const std::vector<fs::path> files =
        list_files(options.include_dir, [](const std::string& n) { return ends_with(n, ".h"); });
    BMOE_REQUIRE(!files.empty(), "C headers not found: '", options.include_dir,
                 "' holds no *.h files; install Debian package libc6-dev (`apt-get install libc6-dev`)");
    std::vector<std::string> docs;
    for (const fs::path& f : files)
        for (std::string& d : split_into_chunks(read_file(f), kHeaderChunkBytes, kMaxChunkBytes))
            docs.push_back(std::move(d));
    return make_pool(domain, std::move(docs), options.seed);
}

// Moves whole documents out of `pools`, each time from the pool with the fewest tokens taken so far
// (so domains stay balanced until one runs out), until `budget` tokens are taken (0 = no limit).
// A pool gives at most `cap_fraction` of its tokens and always keeps `keep_docs` documents.
std::vector<std::pair<int, const std::string*>> take_balanced(std::vector<Pool*> pools,
                                                              uint64_t budget,
                                                              double cap_fraction,
                                                              size_t keep_docs) {
    std::vector<std::pair<int, const std::string*>> out;
    std::vector<uint64_t> taken(pools.size(), 0);
    uint64_t total = 0;
    while (budget == 0 || total < budget) {
        int best = -1;
        for (size_t i = 0; i < pools.size(); ++i) {
            const Pool& p = *pools[i];
            const bool open = p.next + keep_docs < p.docs.size() &&
                              static_cast<double>(taken[i]) < cap_fraction * static_cast<double>(p.total_tokens);
            if (open && (best < 0 || taken[i] < taken[best])) best = static_cast<int>(i);
        }
        if (best < 0) break;
        Pool& p = *pools[best];
        const std::string& doc = p.docs[p.next++];
        out.emplace_back(p.domain, &doc);
        taken[best] += doc.size();
        total += doc.size();
    }
    return out;
}

TokenData make_split(const std::string& split,
                     const std::string& source,
                     const std::vector<DomainInfo>& domains,
                     std::vector<std::pair<int, const std::string*>> docs,
                     uint64_t seed,
                     uint64_t stream) {
    TokenData data;
    data.split = split;
    data.source = source;
    data.tokenizer = ByteTokenizer::name();
    data.seed = seed;
    data.vocab_size = ByteTokenizer::kVocabSize;
    data.domains = domains;
    Rng rng(seed, stream);
    rng.shuffle(docs);  // mix domains along the token stream
    const ByteTokenizer tokenizer;
    std::vector<int32_t> ids;
    for (const auto& [domain, text] : docs) {
        ids.clear();
        tokenizer.encode_append(*text, ids);
        data.add_document(ids, domain);
    }
    return data;
}

void require_budgets(const TextCorpusOptions& options, const std::string& source) {
    BMOE_REQUIRE(options.val_tokens > 0, source,
                 " corpus: val_tokens is 0; ask for some validation tokens (--val-tokens, default 100000)");
}

}  // namespace

const std::vector<DomainInfo>& text_domains() {
    static const std::vector<DomainInfo> kDomains = {
        {"english", "English fortune cookies (Debian package fortunes)", false},
        {"c_headers", "C header files from /usr/include (Debian package libc6-dev)", false},
        {"german", "OoD: German fortune cookies (Debian package fortunes-de)", true},
        {"spanish", "OoD: Spanish fortune cookies (Debian package fortunes-es)", true},
        {"russian", "OoD: Russian fortune cookies, UTF-8 Cyrillic (Debian package fortunes-ru)", true},
    };
    return kDomains;
}

std::vector<std::string> split_fortunes(std::string_view text) {
    std::vector<std::string> docs;
    std::string current;
    auto flush = [&] {
        while (!current.empty() &&
               (current.back() == '\n' || current.back() == '\r' || current.back() == ' ' || current.back() == '\t'))
            current.pop_back();
        size_t start = 0;
        while (start < current.size() && current[start] == '\n') ++start;
        if (start < current.size()) docs.push_back(current.substr(start) + "\n");
        current.clear();
    };
    size_t pos = 0;
    while (pos < text.size()) {
        size_t end = text.find('\n', pos);
        const size_t line_end = end == std::string_view::npos ? text.size() : end;
        std::string_view line = text.substr(pos, line_end - pos);
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        if (line == "%") {
            flush();
        } else {
            current.append(line);
            current += '\n';
        }
        pos = line_end + 1;
    }
    flush();
    return docs;
}

std::vector<std::string> split_into_chunks(std::string_view text, size_t target_bytes, size_t max_bytes) {
    BMOE_ASSERT(target_bytes > 0 && max_bytes >= target_bytes);
    std::vector<std::string> chunks;
    std::string current;
    size_t pos = 0;
    while (pos < text.size()) {
        const size_t nl = text.find('\n', pos);
        const size_t end = nl == std::string_view::npos ? text.size() : nl + 1;
        std::string_view line = text.substr(pos, end - pos);
        pos = end;
        while (current.size() + line.size() > max_bytes) {  // only when a line is longer than max_bytes
            if (!current.empty()) {
                chunks.push_back(std::move(current));
                current.clear();
                continue;
            }
            chunks.emplace_back(line.substr(0, max_bytes));
            line.remove_prefix(max_bytes);
        }
        current.append(line);
        if (current.size() >= target_bytes) {
            chunks.push_back(std::move(current));
            current.clear();
        }
    }
    if (!current.empty()) chunks.push_back(std::move(current));
    return chunks;
}

CorpusSplits build_text_corpus(const TextCorpusOptions& options) {
    require_budgets(options, "text");
    const fs::path fortunes = options.fortunes_dir;
    std::error_code ec;
    BMOE_REQUIRE(fs::is_directory(fortunes, ec), "fortunes directory '", options.fortunes_dir,
                 "' does not exist; install Debian packages fortunes fortunes-de fortunes-es fortunes-ru "
                 "(`apt-get install fortunes fortunes-de fortunes-es fortunes-ru`) or set --fortunes-dir");
    Pool english = fortune_pool(kEnglish, fortunes, "fortunes", "English", options);
    Pool headers = header_pool(kCHeaders, options);
    Pool german = fortune_pool(kGerman, fortunes / "de", "fortunes-de", "German", options);
    Pool spanish = fortune_pool(kSpanish, fortunes / "es", "fortunes-es", "Spanish", options);
    Pool russian = fortune_pool(kRussian, fortunes / "ru", "fortunes-ru", "Russian", options);

    const std::vector<DomainInfo>& domains = text_domains();
    CorpusSplits s;
    // Validation first (at most half of each domain), then train from what is left.
    s.validation =
        make_split("validation", "text", domains, take_balanced({&english, &headers}, options.val_tokens, 0.5, 1),
                   options.seed, kValidationStream);
    s.train = make_split("train", "text", domains, take_balanced({&english, &headers}, options.train_tokens, 1.0, 0),
                         options.seed, kTrainStream);
    s.ood =
        make_split("ood", "text", domains,
                   options.ood_tokens == 0 ? std::vector<std::pair<int, const std::string*>>{}
                                           : take_balanced({&german, &spanish, &russian}, options.ood_tokens, 1.0, 0),
                   options.seed, kOodStream);
    return s;
}

CorpusSplits build_file_corpus(const std::string& path, const TextCorpusOptions& options) {
    std::error_code ec;
    BMOE_REQUIRE(fs::exists(path, ec), "text file '", path,
                 "' does not exist; pass 'synthetic', 'text' or the path of an existing UTF-8 text file as --source");
    BMOE_REQUIRE(fs::is_regular_file(path, ec), "text file '", path,
                 "' is not a regular file; pass the path of a UTF-8 text file as --source");
    const std::string text = read_file(path);
    BMOE_REQUIRE(!text.empty(), "text file '", path, "' is empty; pass a non-empty UTF-8 text file as --source");
    require_budgets(options, "text file '" + path + "'");
    std::vector<std::string> docs = split_into_chunks(text, kFileChunkBytes, kMaxChunkBytes);
    BMOE_REQUIRE(docs.size() >= 2, "text file '", path, "' is too small (", text.size(),
                 " bytes): it must hold at least two ~1 KB documents, one for train and one for validation; "
                 "pass a larger file");
    std::string name = fs::path(path).stem().string();
    if (name.empty()) name = "text";
    const std::vector<DomainInfo> domains = {{name, "user text file '" + path + "'", false}};
    Pool pool = make_pool(0, std::move(docs), options.seed);
    CorpusSplits s;
    s.validation = make_split("validation", path, domains, take_balanced({&pool}, options.val_tokens, 0.5, 1),
                              options.seed, kValidationStream);
    s.train = make_split("train", path, domains, take_balanced({&pool}, options.train_tokens, 1.0, 0), options.seed,
                         kTrainStream);
    s.ood = make_split("ood", path, domains, {}, options.seed, kOodStream);
    return s;
}

}  // namespace bmoe::data
