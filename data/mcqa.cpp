// mcqa.cpp -- the synthetic question types, cloze questions from real text, the evaluation /
// training sides of the question space and the sets built from them.
#include "data/mcqa.h"

#include <algorithm>
#include <set>
#include <string_view>
#include <tuple>
#include <utility>

#include "data/synthetic_corpus.h"
#include "data/tokenizer.h"
#include "parallel/check.h"

namespace bmoe::data {
namespace {

// Longest prompt: model.max_seq_len's default, so a whole question fits one sequence.
constexpr size_t kMaxPromptBytes = 256;
// Longest snippet of the types that take a whole unit (code snippet, json record).
constexpr size_t kMaxSnippetBytes = 120;

bool starts_with(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }

std::string format_prompt(const std::string& snippet,
                          const std::string& question,
                          const std::array<std::string, 4>& options) {
    std::string p = snippet + "Question: " + question + "\n";
    for (int i = 0; i < 4; ++i) p += std::string(1, mcqa_letter(i)) + ") " + options[i] + "\n";
    return p + "Answer: ";
}

// The side of the question space a prompt belongs to (FNV-1a, then mixed): evaluation sets keep
// only even hashes, training documents only odd ones, so they never share a question.
enum class Side { kEval, kTrain };

Side side_of(std::string_view prompt) {
    uint64_t h = 0xCBF29CE484222325ull;
    for (unsigned char c : prompt) h = (h ^ c) * 0x100000001B3ull;
    return (mix64(h) & 1) == 0 ? Side::kEval : Side::kTrain;
}

// Synthetic domain ids by name (the enum of synthetic_corpus.cpp is private to it).
struct DomainIds {
    int arithmetic, english, code, json, dna, roman, morse, conlang;
};

const DomainIds& ids() {
    static const DomainIds k = [] {
        auto id = [](const char* name) {
            const std::vector<DomainInfo>& d = synthetic_domains();
            for (size_t i = 0; i < d.size(); ++i)
                if (d[i].name == name) return static_cast<int>(i);
            BMOE_ASSERT(false, "synthetic domain '", name, "' missing");
            return -1;
        };
        return DomainIds{id("arithmetic"), id("english"), id("code"),  id("json"),
                         id("dna"),        id("roman"),   id("morse"), id("conlang")};
    }();
    return k;
}

// ----------------------------------------------------------------------------
// Synthetic question types. Each maker writes a snippet whose answer is option `answer` of the
// type's fixed list, so letters are uniform whatever the natural distribution of answers.

struct Draft {
    std::string snippet;  // ends in '\n'
    std::string question;
    int domain = 0;
};

using Maker = Draft (*)(Rng&, int answer);

struct QuestionType {
    const char* name;
    std::array<const char*, 4> options;
    Maker make;
};

std::string quoted(std::string_view s) { return "\"" + std::string(s) + "\""; }

// ---- which kind of text (arithmetic / english / code / json) -----------------------------------
Draft text_kind(Rng& rng, int answer) {
    const std::array<int, 4> domains = {ids().arithmetic, ids().english, ids().code, ids().json};
    const int domain = domains[answer];
    for (;;) {
        std::string s = generate_synthetic_unit(domain, rng);
        if (domain == ids().arithmetic) s += generate_synthetic_unit(domain, rng);  // two short lines
        if (domain == ids().english) s += "\n";
        if (s.size() <= kMaxSnippetBytes) return {s, "Which kind of text is this?", domain};
    }
}

// ---- which operator a '#' hides: a#b=c with exactly one of + - * / fitting -----------------------
struct Equation {
    int64_t a, b, c;
};

Equation equation_with(Rng& rng, int op) {
    for (;;) {
        int64_t a = 0, b = 0, c = 0;
        if (op == 0) {
            a = rng.uniform_int(1, 999), b = rng.uniform_int(1, 999), c = a + b;
        } else if (op == 1) {
            a = rng.uniform_int(10, 999), b = rng.uniform_int(1, a - 1), c = a - b;
        } else if (op == 2) {
            a = rng.uniform_int(2, 99), b = rng.uniform_int(2, 20), c = a * b;
            if (rng.coin(0.5)) std::swap(a, b);
        } else {
            b = rng.uniform_int(2, 20), c = rng.uniform_int(2, 99), a = b * c;
        }
        const int fits = (a + b == c) + (a - b == c) + (a * b == c) + (a % b == 0 && a / b == c);
        if (fits == 1) return {a, b, c};  // 2#2=4 fits + and *: ambiguous, drawn again
    }
}

Draft arith_operator(Rng& rng, int answer) {
    const Equation e = equation_with(rng, answer);
    return {std::to_string(e.a) + "#" + std::to_string(e.b) + "=" + std::to_string(e.c) + "\n",
            "Which operator does # stand for?", ids().arithmetic};
}

Draft roman_operator(Rng& rng, int answer) {
    const Equation e = equation_with(rng, answer);
    return {roman_numeral(e.a) + "#" + roman_numeral(e.b) + "=" + roman_numeral(e.c) + "\n",
            "Which operator does # stand for?", ids().roman};
}

// ---- last digit of a sum (hard: carry-free digit addition mod 10) ------------------------------
Draft arith_last_digit(Rng& rng, int answer) {
    const int64_t a = rng.uniform_int(10, 999);
    int64_t b = rng.uniform_int(10, 999);
    b += ((answer - a % 10 - b % 10) % 10 + 10) % 10;  // now (a + b) % 10 == answer
    if (b > 999) b -= 10;
    return {std::to_string(a) + "+" + std::to_string(b) + "=?\n", "What is the last digit of the result?",
            ids().arithmetic};
}

// ---- part of speech of a word of an english sentence (plain or in morse code) ------------------
struct SentenceWord {
    std::string sentence, word;
};

SentenceWord sentence_with_word(Rng& rng, WordClass word_class) {
    for (;;) {
        const std::string s = generate_synthetic_unit(ids().english, rng);
        std::vector<std::string> candidates;
        std::string word;
        for (size_t i = 0; i <= s.size(); ++i) {
            const char c = i < s.size() ? s[i] : ' ';
            if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
                word += c;
                continue;
            }
            if (!word.empty() && english_word_class(word) == word_class &&
                std::find(candidates.begin(), candidates.end(), word) == candidates.end())
                candidates.push_back(word);
            word.clear();
        }
        if (!candidates.empty()) return {s, candidates[rng.uniform(candidates.size())]};
    }
}

constexpr std::array<WordClass, 4> kWordClasses = {WordClass::kNoun, WordClass::kVerb, WordClass::kAdjective,
                                                   WordClass::kAdverb};

Draft english_word_class_question(Rng& rng, int answer) {
    const SentenceWord sw = sentence_with_word(rng, kWordClasses[answer]);
    return {sw.sentence + "\n", "What kind of word is " + quoted(sw.word) + "?", ids().english};
}

Draft morse_word_class_question(Rng& rng, int answer) {
    for (;;) {
        const SentenceWord sw = sentence_with_word(rng, kWordClasses[answer]);
        const std::string line = morse_encode(sw.sentence);
        if (line.size() <= 140)
            return {line + "\n", "What kind of word is " + quoted(morse_encode(sw.word)) + "?", ids().morse};
    }
}

// ---- code: kind of snippet, range of the number in an if condition -----------------------------
Draft code_kind(Rng& rng, int answer) {
    static constexpr std::array<std::string_view, 4> kStarts = {"static ", "if (", "while (", "struct "};
    for (;;) {
        std::string s = generate_synthetic_unit(ids().code, rng);
        if (s.size() <= kMaxSnippetBytes && starts_with(s, kStarts[answer]))
            return {std::move(s), "What kind of code is this?", ids().code};
    }
}

Draft code_range(Rng& rng, int answer) {
    for (;;) {
        std::string s = generate_synthetic_unit(ids().code, rng);
        if (!starts_with(s, "if (")) continue;
        const size_t gt = s.find(" > ");
        const int n = std::stoi(s.substr(gt + 3));  // "if (a > N) {": N in 1..64
        if ((n - 1) / 16 == answer) return {std::move(s), "In which range is the number in the condition?", ids().code};
    }
}

// ---- json: the key after "name", the number of tags ---------------------------------------------
Draft json_key_after_name(Rng& rng, int answer) {
    static constexpr std::array<std::string_view, 4> kKeys = {"city", "age", "active", "score"};
    for (;;) {
        std::string r = generate_synthetic_unit(ids().json, rng);
        if (r.size() > kMaxSnippetBytes) continue;
        const size_t name = r.find("\"name\": \"");
        const size_t next = r.find("\", \"", name + 9);  // end of the name value, start of the next key
        if (next != std::string::npos &&
            starts_with(std::string_view(r).substr(next + 4), std::string(kKeys[answer]) + "\""))
            return {std::move(r), "Which key follows \"name\"?", ids().json};
    }
}

Draft json_tag_count(Rng& rng, int answer) {
    for (;;) {
        std::string r = generate_synthetic_unit(ids().json, rng);
        if (r.size() > kMaxSnippetBytes) continue;
        const size_t tags = r.find("\"tags\": [");
        const int count =
            tags == std::string::npos ? 0 : static_cast<int>(std::count(r.begin() + tags + 9, r.end(), '"') / 2);
        if (count == answer) return {std::move(r), "How many tags does the record have?", ids().json};
    }
}

// ---- dna: the base after a 6-mer (needs a look-up in context), the stop codon ------------------
Draft dna_next_base(Rng& rng, int answer) {
    constexpr size_t kK = 6;
    for (;;) {
        const std::string doc = generate_synthetic_unit(ids().dna, rng);
        const size_t header_end = doc.find('\n') + 1;
        const std::string line = doc.substr(header_end, doc.find('\n', header_end) - header_end);
        if (line.size() < 30) continue;
        const size_t num_positions = line.size() - kK;
        const size_t start = rng.uniform(num_positions);
        for (size_t i = 0; i < num_positions; ++i) {
            const size_t p = (start + i) % num_positions;
            if (line[p + kK] != "ACGT"[answer]) continue;
            const std::string kmer = line.substr(p, kK);
            if (line.find(kmer) != p || line.find(kmer, p + 1) != std::string::npos) continue;  // must be unique
            return {doc.substr(0, header_end) + line + "\n", "Which base follows " + quoted(kmer) + "?", ids().dna};
        }
    }
}

Draft dna_stop_codon(Rng& rng, int answer) {
    static constexpr std::array<std::string_view, 3> kStops = {"TAA", "TAG", "TGA"};
    for (;;) {
        const std::string doc = generate_synthetic_unit(ids().dna, rng);
        const size_t header_end = doc.find('\n') + 1;
        std::string seq;
        for (size_t i = header_end; i < doc.size(); ++i)
            if (doc[i] != '\n') seq += doc[i];
        const size_t num_codons = static_cast<size_t>(rng.uniform_int(8, 16));
        if (seq.size() < 3 * num_codons + 3) continue;
        std::string orf = seq.substr(0, 3 * num_codons);  // never holds a stop codon in frame
        if (answer < 3) orf += kStops[answer];
        return {doc.substr(0, header_end) + orf + "\n", "Which stop codon ends the sequence?", ids().dna};
    }
}

// ---- roman: the range of the first number ---------------------------------------------------
Draft roman_range(Rng& rng, int answer) {
    const int64_t a = rng.uniform_int(125 * answer + 1, 125 * (answer + 1)), b = rng.uniform_int(1, 500);
    const bool minus = rng.coin(0.5) && a > b;
    return {
        roman_numeral(a) + (minus ? "-" : "+") + roman_numeral(b) + "=" + roman_numeral(minus ? a - b : a + b) + "\n",
        "In which range is the first number?", ids().roman};
}

// ---- conlang: words in a sentence, the vowel after a 4-gram --------------------------------------
std::string conlang_line(Rng& rng, int num_sentences) {
    std::string s;
    for (int i = 0; i < num_sentences; ++i) s += generate_synthetic_unit(ids().conlang, rng);
    s.back() = '\n';  // as documents end
    return s;
}

Draft conlang_word_count(Rng& rng, int answer) {
    for (;;) {
        std::string s = conlang_line(rng, 1);
        if (std::count(s.begin(), s.end(), ' ') + 1 == answer + 3)
            return {std::move(s), "How many words are in this sentence?", ids().conlang};
    }
}

Draft conlang_next_letter(Rng& rng, int answer) {
    constexpr size_t kK = 4;
    for (;;) {
        const std::string s = conlang_line(rng, 2);
        const size_t num_positions = s.size() - kK - 1;  // the 4-gram and its next letter before '\n'
        const size_t start = rng.uniform(num_positions);
        for (size_t i = 0; i < num_positions; ++i) {
            const size_t p = (start + i) % num_positions;
            if (s[p + kK] != "aiuo"[answer]) continue;
            const std::string gram = s.substr(p, kK);
            if (!std::all_of(gram.begin(), gram.end(), [](char c) { return (c >= 'a' && c <= 'z') || c == ' '; }))
                continue;
            if (s.find(gram) != p || s.find(gram, p + 1) != std::string::npos) continue;  // must be unique
            return {s, "Which letter follows " + quoted(gram) + "?", ids().conlang};
        }
    }
}

const std::vector<QuestionType>& question_types(bool ood) {
    static const std::vector<QuestionType> kInDistribution = {
        {"text_kind", {"arithmetic", "english", "code", "json"}, text_kind},
        {"arith_operator", {"+", "-", "*", "/"}, arith_operator},
        {"arith_last_digit", {"0", "1", "2", "3"}, arith_last_digit},
        {"english_word_class", {"noun", "verb", "adjective", "adverb"}, english_word_class_question},
        {"code_kind", {"function", "condition", "loop", "struct"}, code_kind},
        {"code_range", {"1-16", "17-32", "33-48", "49-64"}, code_range},
        {"json_key_after_name", {"city", "age", "active", "score"}, json_key_after_name},
        {"json_tag_count", {"0", "1", "2", "3"}, json_tag_count},
        {"dna_next_base", {"A", "C", "G", "T"}, dna_next_base},
        {"dna_stop_codon", {"TAA", "TAG", "TGA", "none"}, dna_stop_codon},
    };
    static const std::vector<QuestionType> kOod = {
        {"roman_operator", {"+", "-", "*", "/"}, roman_operator},
        {"roman_range", {"1-125", "126-250", "251-375", "376-500"}, roman_range},
        {"morse_word_class", {"noun", "verb", "adjective", "adverb"}, morse_word_class_question},
        {"conlang_word_count", {"3", "4", "5", "6"}, conlang_word_count},
        {"conlang_next_letter", {"a", "i", "u", "o"}, conlang_next_letter},
    };
    return ood ? kOod : kInDistribution;
}

// A question of a uniformly random type and answer, redrawn until it lies on `side`.
McqaQuestion draw_synthetic_question(bool ood, Side side, Rng& rng) {
    const std::vector<QuestionType>& types = question_types(ood);
    for (;;) {
        const QuestionType& type = types[rng.uniform(types.size())];
        const int answer = static_cast<int>(rng.uniform(4));
        const Draft d = type.make(rng, answer);
        McqaQuestion q;
        for (int i = 0; i < 4; ++i) q.options[i] = type.options[i];
        q.prompt = format_prompt(d.snippet, d.question, q.options);
        if (q.prompt.size() > kMaxPromptBytes || side_of(q.prompt) != side) continue;
        q.answer = answer;
        q.domain = d.domain;
        q.type = type.name;
        return q;
    }
}

void require_num_questions(int num_questions, const char* what) {
    BMOE_REQUIRE(num_questions > 0, what, ": num_questions is ", num_questions,
                 "; ask for at least one question (evaluation sets: a few thousand)");
}

// ----------------------------------------------------------------------------
// Cloze questions: a sentence (fortunes) or a code line (C headers) with one word masked.

struct Passage {
    std::string text;
    std::vector<std::pair<size_t, size_t>> words;  // [begin, end) byte spans that may be masked
};

struct ClozeDomain {
    int domain = 0;
    std::vector<Passage> passages;
    std::vector<std::string> vocabulary;  // every maskable word of the domain, sorted, distinct
};

// Code point of the UTF-8 sequence at s[i] and its length (a stray byte counts as itself).
std::pair<uint32_t, size_t> decode_utf8(std::string_view s, size_t i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (len == 1 || i + len > s.size()) return {c, 1};
    uint32_t cp = c & (0x3F >> (len - 1));
    for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    return {cp, len};
}

// Letters of natural text: ASCII letters and non-ASCII letters (Latin-1 accents, Cyrillic, ...),
// not the punctuation, spaces and symbols above 0x7F (dashes, guillemets, inverted marks).
bool is_letter(uint32_t cp) {
    if (cp < 0x80) return (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z');
    return cp >= 0xC0 && cp != 0xD7 && cp != 0xF7 && !(cp >= 0x2000 && cp <= 0x2BFF) && !(cp >= 0x3000 && cp <= 0x303F);
}

// Words of >= 3 letters (an apostrophe between letters belongs to the word: "don't").
std::vector<std::pair<size_t, size_t>> text_words(std::string_view s) {
    std::vector<std::pair<size_t, size_t>> words;
    size_t i = 0;
    while (i < s.size()) {
        auto [cp, len] = decode_utf8(s, i);
        if (!is_letter(cp)) {
            i += len;
            continue;
        }
        const size_t begin = i;
        int letters = 0;
        while (i < s.size()) {
            std::tie(cp, len) = decode_utf8(s, i);
            if (is_letter(cp)) {
                ++letters, i += len;
            } else if (cp == '\'' && i + 1 < s.size() && is_letter(decode_utf8(s, i + 1).first)) {
                i += len;
            } else {
                break;
            }
        }
        if (letters >= 3) words.emplace_back(begin, i);
    }
    return words;
}

// C identifiers of >= 3 characters.
std::vector<std::pair<size_t, size_t>> code_words(std::string_view s) {
    auto ident = [](char c, bool first) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (!first && c >= '0' && c <= '9');
    };
    std::vector<std::pair<size_t, size_t>> words;
    size_t i = 0;
    while (i < s.size()) {
        if (!ident(s[i], true) || (i > 0 && ident(s[i - 1], false))) {
            ++i;
            continue;
        }
        const size_t begin = i;
        while (i < s.size() && ident(s[i], false)) ++i;
        if (i - begin >= 3) words.emplace_back(begin, i);
    }
    return words;
}

std::string trimmed(std::string_view s) {
    const size_t b = s.find_first_not_of(" \t\r\n");
    if (b == std::string_view::npos) return {};
    return std::string(s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1));
}

// Sentences of a fortune, whitespace collapsed, ending at . ! ? followed by a space or the end.
std::vector<std::string> sentences(std::string_view doc) {
    std::string flat;
    for (char c : doc) {
        const bool space = c == ' ' || c == '\n' || c == '\t' || c == '\r';
        if (!space)
            flat += c;
        else if (!flat.empty() && flat.back() != ' ')
            flat += ' ';
    }
    std::vector<std::string> out;
    size_t begin = 0;
    for (size_t i = 0; i < flat.size(); ++i) {
        const char c = flat[i];
        if ((c == '.' || c == '!' || c == '?') && (i + 1 == flat.size() || flat[i + 1] == ' ')) {
            out.push_back(trimmed(std::string_view(flat).substr(begin, i + 1 - begin)));
            begin = i + 1;
        }
    }
    return out;
}

// Code lines of a C header chunk: no comments, no blank lines.
std::vector<std::string> code_lines(std::string_view doc) {
    std::vector<std::string> out;
    size_t pos = 0;
    while (pos < doc.size()) {
        size_t end = doc.find('\n', pos);
        if (end == std::string_view::npos) end = doc.size();
        std::string line = trimmed(doc.substr(pos, end - pos));
        pos = end + 1;
        if (line.empty() || starts_with(line, "/*") || starts_with(line, "*") || starts_with(line, "//")) continue;
        out.push_back(std::move(line));
    }
    return out;
}

std::string ascii_lower(std::string s) {
    for (char& c : s)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    return s;
}

constexpr size_t kMinPassageBytes = 24, kMaxPassageBytes = 140, kMaxWordBytes = 24;

std::vector<ClozeDomain> cloze_domains(const TokenData& split, const std::vector<int>& domain_ids) {
    const int c_headers = split.find_domain("c_headers");
    std::vector<ClozeDomain> out;
    for (int domain : domain_ids) {
        ClozeDomain cd;
        cd.domain = domain;
        std::set<std::string> vocabulary;
        for (size_t d = 0; d < split.num_documents(); ++d) {
            if (split.doc_domains[d] != domain) continue;
            std::string doc;
            for (uint64_t t = split.doc_offsets[d]; t < split.doc_offsets[d + 1]; ++t)
                doc += static_cast<char>(split.tokens[t]);
            const bool code = domain == c_headers;
            for (std::string& text : code ? code_lines(doc) : sentences(doc)) {
                if (text.size() < kMinPassageBytes || text.size() > kMaxPassageBytes) continue;
                if (text.find("____") != std::string::npos) continue;
                Passage p;
                for (const auto& [b, e] : code ? code_words(text) : text_words(text))
                    if (e - b <= kMaxWordBytes) p.words.emplace_back(b, e);
                if (p.words.empty()) continue;
                for (const auto& [b, e] : p.words) vocabulary.insert(text.substr(b, e - b));
                p.text = std::move(text);
                cd.passages.push_back(std::move(p));
            }
        }
        cd.vocabulary.assign(vocabulary.begin(), vocabulary.end());
        std::set<std::string> distinct;  // draw_cloze_question needs 4 words that differ ignoring case
        for (const std::string& w : cd.vocabulary) distinct.insert(ascii_lower(w));
        BMOE_REQUIRE(!cd.passages.empty() && distinct.size() >= 4, "cloze questions: ", split.describe(),
                     " holds no usable sentences of domain '", split.domains[domain].name,
                     "'; raise the text corpus budget (val_tokens / ood_tokens)");
        out.push_back(std::move(cd));
    }
    return out;
}

// Distractors take the answer's capitalisation (ASCII), so case gives nothing away in prose.
std::string match_case(std::string word, const std::string& like) {
    if (word.empty() || like.empty()) return word;
    const bool upper = like[0] >= 'A' && like[0] <= 'Z', lower = like[0] >= 'a' && like[0] <= 'z';
    if (upper && word[0] >= 'a' && word[0] <= 'z') word[0] = static_cast<char>(word[0] - 'a' + 'A');
    if (lower && word[0] >= 'A' && word[0] <= 'Z') word[0] = static_cast<char>(word[0] - 'A' + 'a');
    return word;
}

// Options: the masked word and three other words of its domain, distinct even ignoring ASCII case.
McqaQuestion draw_cloze_question(const std::vector<ClozeDomain>& domains, int c_headers, Rng& rng) {
    for (;;) {
        const ClozeDomain& cd = domains[rng.uniform(domains.size())];
        const Passage& p = cd.passages[rng.uniform(cd.passages.size())];
        const auto [b, e] = p.words[rng.uniform(p.words.size())];
        const std::string word = p.text.substr(b, e - b);
        const bool code = cd.domain == c_headers;
        McqaQuestion q;
        q.answer = static_cast<int>(rng.uniform(4));
        q.domain = cd.domain;
        q.type = "cloze";
        std::vector<std::string> seen = {ascii_lower(word)};
        for (int i = 0; i < 4; ++i) {
            if (i == q.answer) {
                q.options[i] = word;
                continue;
            }
            std::string d;
            do {
                d = cd.vocabulary[rng.uniform(cd.vocabulary.size())];
                if (!code) d = match_case(d, word);
            } while (std::find(seen.begin(), seen.end(), ascii_lower(d)) != seen.end());
            seen.push_back(ascii_lower(d));
            q.options[i] = d;
        }
        const std::string masked = p.text.substr(0, b) + "____" + p.text.substr(e);
        q.prompt = format_prompt(masked + "\n",
                                 code ? "Which identifier fills the blank?" : "Which word fills the blank?", q.options);
        if (q.prompt.size() <= kMaxPromptBytes) return q;
    }
}

}  // namespace

void keep_answer_targets_only(const int32_t* tokens, int32_t* targets, size_t n, int T) {
    const std::string cue = kMcqaAnswerCue;
    const int L = static_cast<int>(cue.size());
    for (size_t i = 0; i < n; ++i) {
        const int t = static_cast<int>(i % static_cast<size_t>(T));
        bool match = t + 1 >= L;
        for (int j = 0; j < L && match; ++j) match = tokens[i - L + 1 + j] == static_cast<unsigned char>(cue[j]);
        if (!match) targets[i] = -1;
    }
}

std::string mcqa_document(const McqaQuestion& q) { return q.prompt + mcqa_letter(q.answer) + "\n"; }

McqaSet generate_synthetic_mcqa(bool ood, int num_questions, uint64_t seed) {
    require_num_questions(num_questions, "synthetic MCQA");
    McqaSet set;
    set.name = ood ? "synthetic-ood" : "synthetic-id";
    set.ood = ood;
    set.domains = synthetic_domains();
    set.questions.reserve(static_cast<size_t>(num_questions));
    Rng rng(seed, ood ? kMcqaOodEvalStream : kMcqaEvalStream);
    for (int i = 0; i < num_questions; ++i) set.questions.push_back(draw_synthetic_question(ood, Side::kEval, rng));
    return set;
}

McqaSet generate_text_cloze(bool ood, int num_questions, uint64_t seed, const TextCorpusOptions& corpus) {
    require_num_questions(num_questions, "cloze MCQA");
    BMOE_REQUIRE(!ood || corpus.ood_tokens > 0,
                 "cloze MCQA: OoD questions come from the text corpus's ood split but ood_tokens is 0; "
                 "ask for some OoD tokens (e.g. 100000)");
    TextCorpusOptions o = corpus;
    o.train_tokens = 1;  // the train split is never used; validation is dealt first, so unchanged
    if (!ood) o.ood_tokens = 0;
    const CorpusSplits splits = build_text_corpus(o);
    const TokenData& split = ood ? splits.ood : splits.validation;
    std::vector<int> domain_ids;
    for (size_t d = 0; d < split.domains.size(); ++d)
        if (split.domains[d].is_ood == ood) domain_ids.push_back(static_cast<int>(d));
    const std::vector<ClozeDomain> domains = cloze_domains(split, domain_ids);

    McqaSet set;
    set.name = ood ? "cloze-ood" : "cloze-id";
    set.ood = ood;
    set.domains = split.domains;
    set.questions.reserve(static_cast<size_t>(num_questions));
    Rng rng(seed, ood ? kMcqaOodClozeStream : kMcqaClozeStream);
    const int c_headers = split.find_domain("c_headers");
    for (int i = 0; i < num_questions; ++i) set.questions.push_back(draw_cloze_question(domains, c_headers, rng));
    return set;
}

McqaQuestion draw_mcqa_training_question(Rng& rng) { return draw_synthetic_question(false, Side::kTrain, rng); }

TokenData mcqa_training_split(const std::string& split, int num_questions, uint64_t seed) {
    require_num_questions(num_questions, "MCQA training split");
    BMOE_REQUIRE(split == "train" || split == "validation", "MCQA training split '", split,
                 "' is unknown; pass 'train' or 'validation'");
    TokenData data;
    data.split = split;
    data.source = "mcqa";
    data.tokenizer = ByteTokenizer::name();
    data.seed = seed;
    data.vocab_size = ByteTokenizer::kVocabSize;
    data.domains = synthetic_domains();
    Rng rng(seed, split == "train" ? kMcqaTrainStream : kMcqaValidationStream);
    const ByteTokenizer tokenizer;
    std::vector<int32_t> ids;
    for (int i = 0; i < num_questions; ++i) {
        const McqaQuestion q = draw_mcqa_training_question(rng);
        ids.clear();
        tokenizer.encode_append(mcqa_document(q), ids);
        data.add_document(ids, q.domain);
    }
    return data;
}

}  // namespace bmoe::data
