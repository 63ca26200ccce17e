// rng.h -- CounterRng: a stateless, counter-based random number generator.
//
// value = f(seed, stream, counter): no hidden state, so any element can be drawn in O(1), in any
// order, on any thread, backend or rank, and gives the same bits. Used for weight init, data
// sampling and (later) router noise keyed by (seed, step, layer, global token id, sample).
// The mixer is SplitMix64's finaliser applied to a combination of the three keys; it passes the
// usual avalanche tests and is plenty for ML noise (not for cryptography).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define BMOE_HOST_DEVICE __host__ __device__
#else
#define BMOE_HOST_DEVICE
#endif

namespace bmoe::model {

BMOE_HOST_DEVICE inline uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

struct CounterRng {
    uint64_t key;
    BMOE_HOST_DEVICE CounterRng(uint64_t seed, uint64_t stream) : key(mix64(seed ^ mix64(stream))) {}

    BMOE_HOST_DEVICE uint64_t bits(uint64_t counter) const { return mix64(key ^ mix64(counter)); }
    // Uniform in (0, 1): 24 random bits, never exactly 0 or 1 (safe for log).
    BMOE_HOST_DEVICE float uniform(uint64_t counter) const { return unit_interval(bits(counter) >> 40); }
    // (v + 0.5) / 2^24 for a 24-bit v. The top value, 16777215.5, has no float: it would round to 2^24
    // and give exactly 1 (a +inf Gumbel draw), so it is clamped to the largest float below 1. A
    // min, not a branch on v: the mask loops stay vectorised.
    BMOE_HOST_DEVICE static float unit_interval(uint64_t v24) {
        const float u = (static_cast<float>(v24) + 0.5f) * (1.0f / 16777216.0f);
        return u < 0.99999994f ? u : 0.99999994f;
    }
    // Standard normal via Box-Muller on two uniforms derived from the same counter.
    BMOE_HOST_DEVICE float normal(uint64_t counter) const {
        const uint64_t b = bits(counter);
        const double u1 = (static_cast<double>(b >> 40) + 0.5) / 16777216.0;
        const double u2 = (static_cast<double>((b >> 16) & 0xFFFFFF) + 0.5) / 16777216.0;
        return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    }
    // Two independent standard normals from one counter (both Box-Muller outputs, float math): about
    // a quarter of the cost of two normal() calls, for bulk routing noise.
    BMOE_HOST_DEVICE void normal_pair(uint64_t counter, float* first, float* second) const {
        const uint64_t b = bits(counter);
        const float u1 = (static_cast<float>(b >> 40) + 0.5f) * (1.0f / 16777216.0f);
        const float u2 = (static_cast<float>((b >> 16) & 0xFFFFFF) + 0.5f) * (1.0f / 16777216.0f);
        const float r = std::sqrt(-2.0f * std::log(u1)), angle = 6.2831853f * u2;
        *first = r * std::cos(angle);
        *second = r * std::sin(angle);
    }
};

// mc_dropout's mask value for one element: 0 with probability `drop`, else keep_scale (1 / (1 - drop)).
// One definition for the CPU backend, the CUDA kernel and the router's host export.
BMOE_HOST_DEVICE inline float dropout_mask_value(const CounterRng& rng,
                                                 uint64_t counter,
                                                 float drop,
                                                 float keep_scale) {
    return rng.uniform(counter) < drop ? 0.0f : keep_scale;
}

}  // namespace bmoe::model
