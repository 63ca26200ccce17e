// test_util.h -- seeded random tensors shared by the op-level tests (CPU ops, CUDA parity).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace bmoe::testing {

using Vec = std::vector<float>;
using IVec = std::vector<int32_t>;

// n values from N(0, scale^2), reproducible from the seed.
inline Vec randn(size_t n, uint32_t seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.0f, scale);
    Vec v(n);
    for (float& x : v) x = dist(rng);
    return v;
}

// n integers uniform in [lo, hi), reproducible from the seed.
inline IVec randint(size_t n, int lo, int hi, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> dist(lo, hi - 1);
    IVec v(n);
    for (int32_t& x : v) x = dist(rng);
    return v;
}

}  // namespace bmoe::testing
