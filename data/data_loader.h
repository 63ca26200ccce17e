// data_loader.h -- Batch, DataLoader (random training windows), EvalLoader (fixed eval windows).
//
// DataLoader: global sample i is the window at hash64(seed, i) mod (N - T), so any position is
// reachable in O(1) (exact resume via position()/seek()); data-parallel rank r draws rows
// step*B*num_shards + r*B + b of the global batch. EvalLoader: evenly spaced, non-overlapping
// windows, identical in every run, so validation losses are comparable.
#pragma once

#include <cstdint>
#include <vector>

#include "data/token_data.h"

namespace bmoe::data {

struct Batch {
    int B = 0, T = 0;
    std::vector<int32_t> tokens;   // [B*T] row-major input ids
    std::vector<int32_t> targets;  // [B*T] next token: targets[b*T+t] = token after tokens[b*T+t]
    std::vector<int32_t> domains;  // [B*T] domain id of the input token at each position
};

// Copies the window tokens[start, start+T] of `data` into one batch row: inputs, targets and
// domains of T positions each. Requires start + T < data.num_tokens().
void fill_window(const TokenData& data, uint64_t start, int T, int32_t* tokens, int32_t* targets, int32_t* domains);

// Throws a one-line bmoe::Error when `data` holds fewer than T + 1 tokens.
void require_window_fits(const TokenData& data, int T);

class DataLoader {
  public:
    // `data` must outlive the loader. Throws bmoe::Error for bad sizes, a bad shard, or data with
    // fewer than T + 1 tokens.
    DataLoader(const TokenData& data, int B, int T, uint64_t seed, int shard_rank = 0, int num_shards = 1);
    DataLoader(TokenData&&, int, int, uint64_t, int = 0, int = 1) = delete;  // would dangle

    Batch next_batch();
    void next_batch(Batch& out);  // reuses out's buffers

    // Number of batches drawn so far (the step); seek(p) makes the next batch the one drawn at step p.
    uint64_t position() const { return step_; }
    void seek(uint64_t step) { step_ = step; }

    // Global sample index of row b at `step`, and the window start of any global sample.
    uint64_t global_sample(uint64_t step, int b) const;
    uint64_t window_start(uint64_t global_sample) const;

    int batch_size() const { return B_; }
    int seq_len() const { return T_; }
    int shard_rank() const { return shard_rank_; }
    int num_shards() const { return num_shards_; }
    const TokenData& data() const { return *data_; }

  private:
    const TokenData* data_;
    int B_, T_;
    uint64_t seed_;
    int shard_rank_, num_shards_;
    uint64_t step_ = 0;
};

// Window starts of the fixed evaluation set: non-overlapping windows of T inputs (+1 target),
// evenly spread over the whole stream; all of them when max_windows is 0 or exceeds what fits.
std::vector<uint64_t> evaluation_window_starts(uint64_t num_tokens, int T, size_t max_windows);

class EvalLoader {
  public:
    // Windows are dealt round-robin to shards (window i goes to rank i % num_shards). For the loss
    // of one domain, build the loader over select_domain(data, d). `data` must outlive the loader.
    EvalLoader(const TokenData& data, int B, int T, size_t max_windows = 0, int shard_rank = 0, int num_shards = 1);
    EvalLoader(TokenData&&, int, int, size_t = 0, int = 0, int = 1) = delete;  // would dangle

    size_t num_windows() const { return starts_.size(); }  // this shard's windows
    size_t num_batches() const { return (starts_.size() + B_ - 1) / B_; }
    // Batch i of this shard; the last batch may hold fewer than B rows (its Batch::B says how many).
    Batch batch(size_t i) const;
    std::vector<Batch> all_batches() const;
    const std::vector<uint64_t>& window_starts() const { return starts_; }

  private:
    const TokenData* data_;
    int B_, T_;
    std::vector<uint64_t> starts_;
};

}  // namespace bmoe::data
