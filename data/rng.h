// rng.h -- deterministic random numbers for data generation and sampling (bmoe::data::Rng).
//
// Same output on every compiler and standard library: xoshiro256** seeded through splitmix64,
// plus the stateless mix64/hash64 used for counter-based sampling (sample i of seed s is
// hash64(s, i), so a loader can jump to any sample in O(1)). Never use std::*_distribution here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace bmoe::data {

// splitmix64 finaliser: a bijective, well-mixed 64-bit hash.
constexpr uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Counter-based hash of (key, counter): independent-looking values for every counter.
constexpr uint64_t hash64(uint64_t key, uint64_t counter) {
    return mix64(mix64(key) ^ (counter * 0xD1B54A32D192ED03ull + 0x8CB92BA72F3D8DD7ull));
}

// Maps a uniform 64-bit value to [0, n) (multiply-shift; bias below 2^-32 for n < 2^32).
constexpr uint64_t reduce_to_range(uint64_t x, uint64_t n) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(x) * n) >> 64);
}

class Rng {
  public:
    // `stream` selects an independent sequence for the same seed (e.g. train vs validation).
    explicit Rng(uint64_t seed, uint64_t stream = 0) {
        uint64_t s = hash64(seed, stream);
        for (uint64_t& word : state_) word = mix64(s++ * 0x9E3779B97F4A7C15ull);
    }

    uint64_t next_u64() {
        const uint64_t result = rotl(state_[1] * 5, 7) * 9;
        const uint64_t t = state_[1] << 17;
        state_[2] ^= state_[0];
        state_[3] ^= state_[1];
        state_[1] ^= state_[2];
        state_[0] ^= state_[3];
        state_[2] ^= t;
        state_[3] = rotl(state_[3], 45);
        return result;
    }

    // Uniform integer in [0, n); n must be > 0. Exactly unbiased (Lemire's rejection method).
    uint64_t uniform(uint64_t n) {
        unsigned __int128 m = static_cast<unsigned __int128>(next_u64()) * n;
        uint64_t low = static_cast<uint64_t>(m);
        if (low < n) {
            const uint64_t threshold = (0 - n) % n;
            while (low < threshold) {
                m = static_cast<unsigned __int128>(next_u64()) * n;
                low = static_cast<uint64_t>(m);
            }
        }
        return static_cast<uint64_t>(m >> 64);
    }

    // Uniform integer in [lo, hi] (inclusive).
    int64_t uniform_int(int64_t lo, int64_t hi) {
        return lo + static_cast<int64_t>(uniform(static_cast<uint64_t>(hi - lo) + 1));
    }

    // Uniform double in [0, 1) with 53 random bits.
    double uniform01() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

    bool coin(double p_true) { return uniform01() < p_true; }

    template <typename T>
    const T& pick(std::span<const T> items) {
        return items[uniform(items.size())];
    }
    template <typename T>
    const T& pick(const std::vector<T>& items) {
        return items[uniform(items.size())];
    }

    // Fisher-Yates shuffle (std::shuffle's output differs between standard libraries).
    template <typename T>
    void shuffle(std::vector<T>& items) {
        for (size_t i = items.size(); i > 1; --i) std::swap(items[i - 1], items[uniform(i)]);
    }

  private:
    static constexpr uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
    uint64_t state_[4];
};

}  // namespace bmoe::data
