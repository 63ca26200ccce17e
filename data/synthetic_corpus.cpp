// synthetic_corpus.cpp -- generators for the synthetic domains and the split builder.
#include "data/synthetic_corpus.h"

#include <algorithm>
#include <array>
#include <string_view>

#include "data/mcqa.h"
#include "data/tokenizer.h"
#include "parallel/check.h"

namespace bmoe::data {
namespace {

using Words = std::vector<std::string_view>;

enum DomainId { kArithmetic, kEnglish, kCode, kJson, kDna, kRoman, kMorse, kConlang, kNumDomains };

constexpr int kMinDocBytes = 100, kMaxDocBytes = 400;

void require_mcqa_fraction(double fraction) {
    BMOE_REQUIRE(fraction >= 0.0 && fraction < 1.0, "synthetic corpus: mcqa_fraction (", fraction,
                 ") must be in [0, 1): the share of train/validation documents that are MCQA questions "
                 "(--mcqa-fraction, default 0.2; 0 = none)");
}

int doc_target(Rng& rng) { return static_cast<int>(rng.uniform_int(kMinDocBytes, kMaxDocBytes)); }

template <typename T>
const T& pick(Rng& rng, const std::vector<T>& items) {
    return items[rng.uniform(items.size())];
}

// Integer with 1..max_digits digits (uniform digit count, then uniform value).
int64_t random_number(Rng& rng, int max_digits) {
    const int digits = static_cast<int>(rng.uniform_int(1, max_digits));
    int64_t lo = 1, hi = 9;
    for (int i = 1; i < digits; ++i) lo *= 10, hi = hi * 10 + 9;
    return rng.uniform_int(digits == 1 ? 0 : lo, hi);
}

// ---- arithmetic: "37+85=122\n", correct answers --------------------------------------------
std::string arithmetic_line(Rng& rng) {
    const int op = static_cast<int>(rng.uniform(3));
    const int64_t a = random_number(rng, op == 2 ? 2 : 3), b = random_number(rng, op == 2 ? 2 : 3);
    const int64_t c = op == 0 ? a + b : op == 1 ? a - b : a * b;
    return std::to_string(a) + "+-*"[op] + std::to_string(b) + "=" + std::to_string(c) + "\n";
}

std::string arithmetic_document(Rng& rng) {
    std::string doc;
    const int target = doc_target(rng);
    while (static_cast<int>(doc.size()) < target) doc += arithmetic_line(rng);
    return doc;
}

// ---- english: templated sentences --------------------------------------------------------
const Words kAdjectives = {"small", "old",   "quiet",  "bright",  "green",  "heavy",  "clever", "patient",
                           "young", "tired", "gentle", "strange", "narrow", "golden", "silent", "happy",
                           "dark",  "warm",  "broken", "careful", "famous", "empty",  "red",    "little"};
const Words kNouns = {"river",  "house",  "teacher",  "garden", "window",  "village", "farmer", "doctor",
                      "letter", "bridge", "forest",   "child",  "market",  "road",    "table",  "captain",
                      "horse",  "song",   "mountain", "stone",  "kitchen", "student", "lamp",   "boat",
                      "bird",   "city",   "friend",   "dog",    "book",    "train",   "island", "king"};
const Words kVerbsBase = {"find",  "paint", "watch", "carry", "open", "build", "follow", "remember",
                          "clean", "sell",  "draw",  "visit", "help", "lift",  "read",   "close"};
const Words kVerbsPast = {"found",   "painted", "watched", "carried", "opened", "built",  "followed", "remembered",
                          "cleaned", "sold",    "drew",    "visited", "helped", "lifted", "read",     "closed"};
const Words kIntransitive = {"slept", "waited", "laughed", "smiled", "arrived", "rested", "sang", "listened"};
const Words kAdverbs = {"slowly", "quietly", "happily", "early", "again", "together", "carefully", "alone"};
const Words kPrepositions = {"near", "under", "behind", "across", "beside", "above", "inside", "along"};
const Words kTimes = {"Every morning", "Last winter", "After dinner",  "On Sunday",
                      "At night",      "Long ago",    "In the spring", "Yesterday"};

std::string capitalised(std::string_view w) {
    std::string s(w);
    if (!s.empty() && s[0] >= 'a' && s[0] <= 'z') s[0] = static_cast<char>(s[0] - 'a' + 'A');
    return s;
}

std::string english_sentence(Rng& rng) {
    std::string s;
    auto w = [&](const Words& list) { return std::string(pick(rng, list)); };
    switch (rng.uniform(6)) {
        case 0:
            s = "The " + w(kAdjectives) + " " + w(kNouns) + " " + w(kVerbsPast) + " the " + w(kAdjectives) + " " +
                w(kNouns) + ".";
            break;
        case 1:
            s = "A " + w(kNouns) + " " + w(kVerbsPast) + " a " + w(kNouns) + " " + w(kPrepositions) + " the " +
                w(kNouns) + ".";
            break;
        case 2:
            s = w(kTimes) + ", the " + w(kNouns) + " " + w(kIntransitive) + " " + w(kAdverbs) + ".";
            break;
        case 3:
            s = "Why did the " + w(kNouns) + " " + w(kVerbsBase) + " the " + w(kAdjectives) + " " + w(kNouns) + "?";
            break;
        case 4:
            s = "She said that the " + w(kNouns) + " was " + w(kAdjectives) + " and " + w(kAdjectives) + ".";
            break;
        default:
            s = capitalised(w(kAdverbs)) + ", my " + w(kNouns) + " " + w(kIntransitive) + " " + w(kPrepositions) +
                " the " + w(kAdjectives) + " " + w(kNouns) + ".";
            break;
    }
    return s;
}

std::string english_document(Rng& rng) {
    std::string doc;
    const int target = doc_target(rng);
    while (static_cast<int>(doc.size()) < target) {
        if (!doc.empty()) doc += ' ';
        doc += english_sentence(rng);
    }
    return doc + "\n";
}

// ---- code: C-like snippets ------------------------------------------------------------------
const Words kVars = {"count", "total",  "index", "value", "length", "result", "sum",   "node",
                     "limit", "offset", "flag",  "width", "height", "depth",  "score", "size"};
const Words kFuncs = {"compute_sum", "find_max",   "scale_values", "update_state", "read_input", "clamp_value",
                      "count_nodes", "swap_items", "hash_key",     "parse_header", "next_token", "free_list"};
const Words kArrays = {"data", "values", "items", "buffer", "table", "weights"};
const Words kTypes = {"int", "long", "float", "double", "char", "unsigned"};

std::string code_snippet(Rng& rng) {
    auto w = [&](const Words& list) { return std::string(pick(rng, list)); };
    const std::string n = std::to_string(rng.uniform_int(1, 64));
    switch (rng.uniform(6)) {
        case 0: {
            const std::string acc = w(kVars), arr = w(kArrays);
            return "int " + w(kFuncs) + "(const int* " + arr + ", int n) {\n    int " + acc +
                   " = 0;\n    for (int i = 0; i < n; ++i) {\n        " + acc + " += " + arr + "[i];\n    }\n" +
                   "    return " + acc + ";\n}\n";
        }
        case 1:
            return "static " + w(kTypes) + " " + w(kFuncs) + "(" + w(kTypes) + " a, " + w(kTypes) +
                   " b) {\n    return a " + "+-*/%"[rng.uniform(5)] + " b;\n}\n";
        case 2: {
            const std::string a = w(kVars), b = w(kVars);
            return "if (" + a + " > " + n + ") {\n    " + b + " = " + b + " + 1;\n} else {\n    " + b + " = 0;\n}\n";
        }
        case 3: {
            const std::string a = w(kVars), c = w(kVars);
            return "while (" + a + " != 0) {\n    " + a + " = " + a + " / 2;\n    ++" + c + ";\n}\n";
        }
        case 4:
            return "struct " + w(kVars) + "_info {\n    " + w(kTypes) + " " + w(kVars) + ";\n    " + w(kTypes) + " " +
                   w(kVars) + "[" + n + "];\n};\n";
        default:
            return "printf(\"%d\\n\", " + w(kFuncs) + "(" + w(kArrays) + ", " + n + "));\n";
    }
}

std::string code_document(Rng& rng) {
    std::string doc;
    const int target = doc_target(rng);
    while (static_cast<int>(doc.size()) < target) doc += code_snippet(rng);
    return doc;
}

// ---- json: one record per line ----------------------------------------------------------------
const Words kFirstNames = {"alice", "bob",  "carol",   "dave",  "erin",  "frank", "grace",  "heidi",
                           "ivan",  "judy", "mallory", "oscar", "peggy", "trent", "victor", "wendy"};
const Words kCities = {"Paris", "Lagos", "Lima", "Oslo", "Tokyo", "Cairo", "Quito", "Perth", "Dakar", "Hanoi"};
const Words kTags = {"new", "vip", "beta", "admin", "guest", "trial", "staff", "bot"};

std::string json_record(Rng& rng) {
    auto w = [&](const Words& list) { return std::string(pick(rng, list)); };
    std::string r = "{\"id\": " + std::to_string(rng.uniform_int(1, 99999)) + ", \"name\": \"" + w(kFirstNames) + "\"";
    if (rng.coin(0.7)) r += ", \"city\": \"" + w(kCities) + "\"";
    if (rng.coin(0.7)) r += ", \"age\": " + std::to_string(rng.uniform_int(18, 90));
    if (rng.coin(0.6)) r += std::string(", \"active\": ") + (rng.coin(0.5) ? "true" : "false");
    if (rng.coin(0.6)) {
        const int64_t cents = rng.uniform_int(0, 99);
        r += ", \"score\": 0." + std::string(cents < 10 ? "0" : "") + std::to_string(cents);
    }
    if (rng.coin(0.5)) {
        r += ", \"tags\": [";
        const int k = static_cast<int>(rng.uniform_int(1, 3));
        for (int i = 0; i < k; ++i) r += (i ? ", \"" : "\"") + w(kTags) + "\"";
        r += "]";
    }
    return r + "}\n";
}

std::string json_document(Rng& rng) {
    std::string doc;
    const int target = doc_target(rng);
    while (static_cast<int>(doc.size()) < target) doc += json_record(rng);
    return doc;
}

// ---- dna: FASTA-like record of one open reading frame -----------------------------------------
std::string dna_document(Rng& rng) {
    // A biased codon table: preferred codons 80% of the time, like real codon usage bias.
    static const Words kPreferred = {"GCC", "GAA", "AAG", "CTG", "GAT", "GGC", "ATC", "ACC", "AGC", "TTC",
                                     "CAG", "GTG", "AAC", "CGC", "TAC", "CCC", "TGG", "ATG", "CAC", "TGC"};
    static const char* kBases = "ACGT";
    static const Words kStops = {"TAA", "TAG", "TGA"};
    const int target = doc_target(rng);
    std::string header = ">seq" + std::to_string(rng.uniform_int(1, 9999)) + "\n";
    std::string seq = "ATG";
    // Bytes of the finished record: header + sequence + stop codon + one '\n' per 60 bases.
    auto doc_bytes = [&] { return header.size() + seq.size() + 3 + (seq.size() + 3 + 59) / 60; };
    while (doc_bytes() < static_cast<size_t>(target)) {
        if (rng.coin(0.8)) {
            seq += pick(rng, kPreferred);
        } else {
            std::string codon;
            do {
                codon = {kBases[rng.uniform(4)], kBases[rng.uniform(4)], kBases[rng.uniform(4)]};
            } while (codon == "TAA" || codon == "TAG" || codon == "TGA");
            seq += codon;
        }
    }
    seq += pick(rng, kStops);
    std::string doc = header;
    for (size_t i = 0; i < seq.size(); i += 60) doc += seq.substr(i, 60) + "\n";
    return doc;
}

// ---- roman (OoD): arithmetic in roman numerals ------------------------------------------------
std::string roman(int64_t n) {
    static const std::array<std::pair<int, const char*>, 13> kTable = {{{1000, "M"},
                                                                        {900, "CM"},
                                                                        {500, "D"},
                                                                        {400, "CD"},
                                                                        {100, "C"},
                                                                        {90, "XC"},
                                                                        {50, "L"},
                                                                        {40, "XL"},
                                                                        {10, "X"},
                                                                        {9, "IX"},
                                                                        {5, "V"},
                                                                        {4, "IV"},
                                                                        {1, "I"}}};
    std::string s;
    for (const auto& [value, symbol] : kTable)
        while (n >= value) s += symbol, n -= value;
    return s;
}

std::string roman_line(Rng& rng) {
    int64_t a = rng.uniform_int(1, 500), b = rng.uniform_int(1, 500);
    const bool minus = rng.coin(0.5) && a != b;
    if (minus && a < b) std::swap(a, b);
    return roman(a) + (minus ? "-" : "+") + roman(b) + "=" + roman(minus ? a - b : a + b) + "\n";
}

std::string roman_document(Rng& rng) {
    std::string doc;
    const int target = doc_target(rng);
    while (static_cast<int>(doc.size()) < target) doc += roman_line(rng);
    return doc;
}

// ---- morse (OoD): english sentences in morse code ---------------------------------------------
// Letters as dot/dash codes separated by ' ', words by " / "; everything but letters and spaces dropped.
std::string morse(std::string_view text) {
    static const char* kCodes[26] = {".-",   "-...", "-.-.", "-..",  ".",   "..-.", "--.",  "....", "..",
                                     ".---", "-.-",  ".-..", "--",   "-.",  "---",  ".--.", "--.-", ".-.",
                                     "...",  "-",    "..-",  "...-", ".--", "-..-", "-.--", "--.."};
    std::string line;
    bool word_gap = false;
    for (char c : text) {
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
        if (c >= 'a' && c <= 'z') {
            if (!line.empty()) line += word_gap ? " / " : " ";
            line += kCodes[c - 'a'];
            word_gap = false;
        } else if (c == ' ') {
            word_gap = true;
        }
    }
    return line;
}

std::string morse_document(Rng& rng) {
    std::string doc;
    const int target = doc_target(rng);
    while (static_cast<int>(doc.size()) < target) doc += morse(english_sentence(rng)) + "\n";
    return doc;
}

// ---- conlang (OoD): a made-up language of consonant-vowel syllables ----------------------------
// A sentence of 3-8 words ending in ". " or "? ".
std::string conlang_sentence(Rng& rng) {
    static const char* kConsonants = "kmtnslph";
    static const char* kVowels = "aaiiuoe";  // a and i twice as frequent as o and e
    const int num_words = static_cast<int>(rng.uniform_int(3, 8));
    std::string sentence;
    for (int w = 0; w < num_words; ++w) {
        std::string word;
        const int syllables = static_cast<int>(rng.uniform_int(1, 3));
        for (int s = 0; s < syllables; ++s) {
            word += kConsonants[rng.uniform(8)];
            word += kVowels[rng.uniform(7)];
            if (rng.coin(0.15)) word += 'n';
        }
        if (w == 0) word[0] = static_cast<char>(word[0] - 'a' + 'A');
        sentence += (w ? " " : "") + word;
    }
    sentence += rng.coin(0.8) ? ". " : "? ";
    return sentence;
}

std::string conlang_document(Rng& rng) {
    std::string doc;
    const int target = doc_target(rng);
    while (static_cast<int>(doc.size()) < target) doc += conlang_sentence(rng);
    doc.back() = '\n';
    return doc;
}

}  // namespace

const std::vector<DomainInfo>& synthetic_domains() {
    static const std::vector<DomainInfo> kDomains = {
        {"arithmetic", "integer sums, differences and products with correct answers: 37+85=122", false},
        {"english", "templated English sentences from small word lists", false},
        {"code", "C-like snippets: functions, for/while loops, if/else, structs", false},
        {"json", "one JSON record per line with ids, names, cities, flags, scores and tags", false},
        {"dna", "FASTA-like open reading frames over ACGT with codon usage bias", false},
        {"roman", "OoD: arithmetic in roman numerals, XIV+VII=XXI", true},
        {"morse", "OoD: English sentences in morse code (dots, dashes, slashes)", true},
        {"conlang", "OoD: a made-up language of consonant-vowel syllables", true},
    };
    static_assert(kNumDomains == 8);
    return kDomains;
}

std::vector<int> synthetic_domain_ids(bool ood) {
    std::vector<int> ids;
    const std::vector<DomainInfo>& domains = synthetic_domains();
    for (size_t i = 0; i < domains.size(); ++i)
        if (domains[i].is_ood == ood) ids.push_back(static_cast<int>(i));
    return ids;
}

std::string generate_synthetic_unit(int domain, Rng& rng) {
    switch (domain) {
        case kArithmetic:
            return arithmetic_line(rng);
        case kEnglish:
            return english_sentence(rng);
        case kCode:
            return code_snippet(rng);
        case kJson:
            return json_record(rng);
        case kDna:
            return dna_document(rng);
        case kRoman:
            return roman_line(rng);
        case kMorse:
            return morse(english_sentence(rng)) + "\n";
        case kConlang:
            return conlang_sentence(rng);
        default:
            break;
    }
    throw Error(concat("unknown synthetic domain id ", domain, "; valid ids are 0..", kNumDomains - 1));
}

std::string roman_numeral(int64_t n) {
    BMOE_ASSERT(n >= 1 && n <= 3999);
    return roman(n);
}

std::string morse_encode(std::string_view text) { return morse(text); }

WordClass english_word_class(std::string_view word) {
    std::string lower(word);
    for (char& c : lower)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    auto in = [&](const Words& list) { return std::find(list.begin(), list.end(), lower) != list.end(); };
    if (in(kNouns)) return WordClass::kNoun;
    if (in(kVerbsBase) || in(kVerbsPast) || in(kIntransitive)) return WordClass::kVerb;
    if (in(kAdjectives)) return WordClass::kAdjective;
    if (in(kAdverbs)) return WordClass::kAdverb;
    return WordClass::kOther;
}

std::string generate_synthetic_document(int domain, Rng& rng) {
    switch (domain) {
        case kArithmetic:
            return arithmetic_document(rng);
        case kEnglish:
            return english_document(rng);
        case kCode:
            return code_document(rng);
        case kJson:
            return json_document(rng);
        case kDna:
            return dna_document(rng);
        case kRoman:
            return roman_document(rng);
        case kMorse:
            return morse_document(rng);
        case kConlang:
            return conlang_document(rng);
        default:
            break;
    }
    throw Error(concat("unknown synthetic domain id ", domain, "; valid ids are 0..", kNumDomains - 1));
}

TokenData generate_synthetic_split(const std::string& split,
                                   const std::vector<int>& domain_ids,
                                   uint64_t num_tokens,
                                   uint64_t seed,
                                   uint64_t stream,
                                   double mcqa_fraction) {
    BMOE_REQUIRE(!domain_ids.empty() || num_tokens == 0, "synthetic split '", split,
                 "' needs at least one domain; pass domain ids from synthetic_domains()");
    require_mcqa_fraction(mcqa_fraction);
    TokenData data;
    data.split = split;
    data.source = "synthetic";
    data.tokenizer = ByteTokenizer::name();
    data.seed = seed;
    data.vocab_size = ByteTokenizer::kVocabSize;
    data.domains = synthetic_domains();
    data.tokens.reserve(num_tokens + kMaxDocBytes * 2);
    Rng rng(seed, stream);
    // Questions and the choice "question or not" come from their own stream, so the plain documents
    // are the same sequence whatever the fraction (a question is inserted between them).
    Rng mcqa_rng(seed, kMcqaMixStream + stream);
    const ByteTokenizer tokenizer;
    std::vector<int32_t> doc_tokens;
    while (data.num_tokens() < num_tokens) {
        doc_tokens.clear();
        if (mcqa_fraction > 0 && mcqa_rng.coin(mcqa_fraction)) {
            const McqaQuestion q = draw_mcqa_training_question(mcqa_rng);
            tokenizer.encode_append(mcqa_document(q), doc_tokens);
            data.add_document(doc_tokens, q.domain);
            continue;
        }
        const int domain = domain_ids[rng.uniform(domain_ids.size())];
        tokenizer.encode_append(generate_synthetic_document(domain, rng), doc_tokens);
        data.add_document(doc_tokens, domain);
    }
    return data;
}

CorpusSplits build_synthetic_corpus(const SyntheticCorpusOptions& options) {
    BMOE_REQUIRE(options.train_tokens > 0,
                 "synthetic corpus: train_tokens is 0; ask for at least a few thousand "
                 "tokens (--train-tokens, default 2000000)");
    BMOE_REQUIRE(options.val_tokens > 0,
                 "synthetic corpus: val_tokens is 0; ask for at least a few thousand "
                 "tokens (--val-tokens, default 100000)");
    require_mcqa_fraction(options.mcqa_fraction);
    const std::vector<int> id = synthetic_domain_ids(false), ood = synthetic_domain_ids(true);
    CorpusSplits s;
    s.train =
        generate_synthetic_split("train", id, options.train_tokens, options.seed, kTrainStream, options.mcqa_fraction);
    s.validation = generate_synthetic_split("validation", id, options.val_tokens, options.seed, kValidationStream,
                                            options.mcqa_fraction);
    s.ood = generate_synthetic_split("ood", ood, options.ood_tokens, options.seed, kOodStream);
    return s;
}

}  // namespace bmoe::data
