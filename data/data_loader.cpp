// data_loader.cpp -- window sampling (counter-based, seekable) and the fixed evaluation windows.
#include "data/data_loader.h"

#include <algorithm>

#include "data/rng.h"
#include "parallel/check.h"

namespace bmoe::data {

void require_window_fits(const TokenData& data, int T) {
    BMOE_REQUIRE(T > 0, "sequence length T must be positive, got ", T);
    BMOE_REQUIRE(data.num_tokens() >= static_cast<uint64_t>(T) + 1, data.describe(), " holds ", data.num_tokens(),
                 " tokens but a window of sequence length ", T, " needs at least ", T + 1,
                 "; generate more tokens (`bmoe data --train-tokens/--val-tokens`) or lower the sequence length");
}

void fill_window(const TokenData& data, uint64_t start, int T, int32_t* tokens, int32_t* targets, int32_t* domains) {
    BMOE_ASSERT(start + static_cast<uint64_t>(T) < data.num_tokens(), "window ", start, "+", T, " of ",
                data.num_tokens());
    const int32_t* src = data.tokens.data() + start;
    size_t doc = data.document_at(start);
    for (int t = 0; t < T; ++t) {
        const uint64_t pos = start + static_cast<uint64_t>(t);
        while (data.doc_offsets[doc + 1] <= pos) ++doc;  // walk forward past document ends
        tokens[t] = src[t];
        targets[t] = src[t + 1];
        domains[t] = data.doc_domains[doc];
    }
}

DataLoader::DataLoader(const TokenData& data, int B, int T, uint64_t seed, int shard_rank, int num_shards)
    : data_(&data), B_(B), T_(T), seed_(seed), shard_rank_(shard_rank), num_shards_(num_shards) {
    BMOE_REQUIRE(B > 0, "batch size must be positive, got ", B);
    BMOE_REQUIRE(num_shards > 0 && shard_rank >= 0 && shard_rank < num_shards, "data shard ", shard_rank, " of ",
                 num_shards, " is invalid; the rank must be in 0..num_shards-1 and num_shards >= 1");
    require_window_fits(data, T);
}

uint64_t DataLoader::global_sample(uint64_t step, int b) const {
    const uint64_t global_batch = static_cast<uint64_t>(B_) * static_cast<uint64_t>(num_shards_);
    return step * global_batch + static_cast<uint64_t>(shard_rank_) * B_ + static_cast<uint64_t>(b);
}

uint64_t DataLoader::window_start(uint64_t global_sample) const {
    const uint64_t num_starts = data_->num_tokens() - static_cast<uint64_t>(T_);  // starts 0..N-T-1
    return reduce_to_range(hash64(seed_, global_sample), num_starts);
}

void DataLoader::next_batch(Batch& out) {
    out.B = B_;
    out.T = T_;
    const size_t n = static_cast<size_t>(B_) * T_;
    out.tokens.resize(n);
    out.targets.resize(n);
    out.domains.resize(n);
    for (int b = 0; b < B_; ++b) {
        const size_t row = static_cast<size_t>(b) * T_;
        fill_window(*data_, window_start(global_sample(step_, b)), T_, out.tokens.data() + row,
                    out.targets.data() + row, out.domains.data() + row);
    }
    ++step_;
}

Batch DataLoader::next_batch() {
    Batch out;
    next_batch(out);
    return out;
}

std::vector<uint64_t> evaluation_window_starts(uint64_t num_tokens, int T, size_t max_windows) {
    BMOE_ASSERT(T > 0 && num_tokens >= static_cast<uint64_t>(T) + 1);
    const uint64_t fit = (num_tokens - 1) / static_cast<uint64_t>(T);  // non-overlapping windows that fit
    const uint64_t count = (max_windows == 0 || max_windows >= fit) ? fit : max_windows;
    // Stride >= T keeps the windows disjoint; the last one ends at or before token N-1.
    const uint64_t stride = count == fit ? static_cast<uint64_t>(T) : (num_tokens - 1) / count;
    std::vector<uint64_t> starts(count);
    for (uint64_t i = 0; i < count; ++i) starts[i] = i * stride;
    return starts;
}

EvalLoader::EvalLoader(const TokenData& data, int B, int T, size_t max_windows, int shard_rank, int num_shards)
    : data_(&data), B_(B), T_(T) {
    BMOE_REQUIRE(B > 0, "evaluation batch size must be positive, got ", B);
    BMOE_REQUIRE(num_shards > 0 && shard_rank >= 0 && shard_rank < num_shards, "evaluation shard ", shard_rank, " of ",
                 num_shards, " is invalid; the rank must be in 0..num_shards-1 and num_shards >= 1");
    require_window_fits(data, T);
    const std::vector<uint64_t> all = evaluation_window_starts(data.num_tokens(), T, max_windows);
    for (size_t i = static_cast<size_t>(shard_rank); i < all.size(); i += static_cast<size_t>(num_shards))
        starts_.push_back(all[i]);
}

Batch EvalLoader::batch(size_t i) const {
    BMOE_ASSERT(i < num_batches(), "batch ", i, " of ", num_batches());
    const size_t first = i * static_cast<size_t>(B_);
    const int rows = static_cast<int>(std::min<size_t>(B_, starts_.size() - first));
    Batch out;
    out.B = rows;
    out.T = T_;
    const size_t n = static_cast<size_t>(rows) * T_;
    out.tokens.resize(n);
    out.targets.resize(n);
    out.domains.resize(n);
    for (int b = 0; b < rows; ++b) {
        const size_t row = static_cast<size_t>(b) * T_;
        fill_window(*data_, starts_[first + b], T_, out.tokens.data() + row, out.targets.data() + row,
                    out.domains.data() + row);
    }
    return out;
}

std::vector<Batch> EvalLoader::all_batches() const {
    std::vector<Batch> out;
    out.reserve(num_batches());
    for (size_t i = 0; i < num_batches(); ++i) out.push_back(batch(i));
    return out;
}

}  // namespace bmoe::data
