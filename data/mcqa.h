// mcqa.h -- multiple-choice questions (MCQA) for calibration and OoD evaluation, and the training
// documents that teach a base model their format.
//
// Every question has one surface format; the prompt ends with "Answer: " (a space after the
// colon) and the model's next token is the letter X:
//
//   <snippet in a domain's style>
//   Question: <question>
//   A) <option>
//   B) <option>
//   C) <option>
//   D) <option>
//   Answer: X
//
// Synthetic questions come from the built-in domains (data/synthetic_corpus.h): ten types on the
// five in-distribution domains, five on the three OoD domains. Each type has a FIXED option list
// (in a reference experiment a 3-layer byte-level model could not learn to copy the letter of
// shuffled options, and learnt fixed lists fine) and the answer follows from the prompt; easy types
// (which kind of text) sit beside hard ones (next base after a 6-mer, last digit of a sum) so a
// small model makes errors to calibrate. Cloze questions come from real text (data/text_corpus.h):
// a sentence with one word masked as "____", the word and three words of the same domain as options.
//
// Evaluation and training questions never coincide: a question's prompt hash puts it on the
// evaluation or the training side (so no seed pairing can share a prompt), and each set draws from
// its own random stream. Everything is deterministic from the seed (data/rng.h).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "data/rng.h"
#include "data/text_corpus.h"
#include "data/token_data.h"

namespace bmoe::data {

struct McqaQuestion {
    std::string prompt;                  // full text up to and including "Answer: "
    std::array<std::string, 4> options;  // as listed after "A) ".."D) "
    int answer = 0;                      // 0..3 = 'A'..'D'
    int domain = 0;                      // id into the domain list of its set
    std::string type;                    // question type: "arith_operator", "cloze", ...
};

struct McqaSet {
    std::string name;                 // "synthetic-id", "synthetic-ood", "cloze-id", "cloze-ood"
    bool ood = false;                 // every question is from an OoD domain (else every one is in-distribution)
    std::vector<DomainInfo> domains;  // synthetic_domains() or text_domains(): ids as in the corpus
    std::vector<McqaQuestion> questions;
};

// Random streams Rng(seed, stream) of the question sets; none is shared with another set or with the
// corpus splits (data/synthetic_corpus.h uses 1..3, data/text_corpus.cpp 100..104).
inline constexpr uint64_t kMcqaEvalStream = 300, kMcqaOodEvalStream = 301;      // generate_synthetic_mcqa
inline constexpr uint64_t kMcqaClozeStream = 302, kMcqaOodClozeStream = 303;    // generate_text_cloze
inline constexpr uint64_t kMcqaTrainStream = 310, kMcqaValidationStream = 311;  // mcqa_training_split
inline constexpr uint64_t kMcqaMixStream = 320;  // + split stream: questions inside the synthetic corpus

// The text every prompt ends with; the next token is the answer letter.
inline constexpr const char* kMcqaAnswerCue = "Answer: ";

// MCQA fine-tuning loss on the answer only (data.loss_on = "answers"): sets targets[i] = -1 (ignored)
// for every position whose input tokens do not end with kMcqaAnswerCue within the same row of T
// tokens. tokens/targets: [n] with n a multiple of T (byte tokenizer ids).
void keep_answer_targets_only(const int32_t* tokens, int32_t* targets, size_t n, int T);

// 'A' + answer.
inline char mcqa_letter(int answer) { return static_cast<char>('A' + answer); }

// The training document of a question: prompt + answer letter + '\n'.
std::string mcqa_document(const McqaQuestion& q);

// `num_questions` synthetic questions (evaluation side) of the in-distribution (ood = false) or OoD
// types, each type and answer letter uniformly random; about 0.1 s for 5000. Throws bmoe::Error
// for num_questions <= 0.
McqaSet generate_synthetic_mcqa(bool ood, int num_questions, uint64_t seed);

// `num_questions` cloze questions from the "text" corpus built with `corpus`: in-distribution
// (english fortunes, C headers) from its validation split, OoD (german, spanish, russian fortunes)
// from its ood split, so no question is from text the corpus trains on; domains uniformly random.
// `seed` draws the questions, corpus.seed the split. Throws bmoe::Error for num_questions <= 0, for
// missing packages (naming them, as build_text_corpus does) and for ood with corpus.ood_tokens 0.
McqaSet generate_text_cloze(bool ood, int num_questions, uint64_t seed, const TextCorpusOptions& corpus = {});

// One in-distribution synthetic question from the training side (never an evaluation question).
McqaQuestion draw_mcqa_training_question(Rng& rng);

// `num_questions` training documents (mcqa_document) for split "train" (stream kMcqaTrainStream) or
// "validation" (kMcqaValidationStream), labelled with their synthetic domain; domains are
// synthetic_domains(), source "mcqa". Throws bmoe::Error for num_questions <= 0 or another split.
TokenData mcqa_training_split(const std::string& split, int num_questions, uint64_t seed);

}  // namespace bmoe::data
