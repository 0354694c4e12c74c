#pragma once
// Counter-based dropout: whether attention probability (b, h, i, j) is kept is a pure
// function of (seed, index). The backward pass and the attention-weights op replay the
// forward mask exactly, with no mask tensor stored, on any device and any thread split.
#include <cstdint>

#if defined(__CUDACC__)
#define QKV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QKV_HOST_DEVICE inline
#endif

namespace qkv {

// splitmix64 finaliser: a bijective mixer with full avalanche, cheap enough per element.
QKV_HOST_DEVICE uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Keep threshold on the top 32 bits of the hash: keep when hash >= threshold.
// p == 1 drops everything (threshold above every 32-bit value).
QKV_HOST_DEVICE uint64_t dropout_threshold(double p) {
  return p >= 1.0 ? (uint64_t(1) << 32) : uint64_t(p * 4294967296.0);
}

// `linear_index` is ((b * H + h) * L + i) * S + j over the logical (B, H, L, S) score grid.
QKV_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t linear_index, uint64_t threshold) {
  const uint64_t h = mix64(seed * 0x9e3779b97f4a7c15ULL + mix64(linear_index));
  return (h >> 32) >= threshold;
}

}  // namespace qkv
