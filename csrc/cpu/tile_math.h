#pragma once
// Row operations of the CPU attention kernels (the softmax and its gradient), vectorised
// for float32 with ATen's Vectorized (AVX2 baseline of this build). The tile products
// are in packed_gemm.h.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace qkv {

// x = exp(x - shift) in place; returns the sum. exp(-inf) = 0 covers masked entries.
template <typename acc_t>
acc_t exp_and_sum(acc_t* x, int64_t n, acc_t shift) {
  acc_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

template <>
inline float exp_and_sum<float>(float* x, int64_t n, float shift) {
  using Vec = at::vec::Vectorized<float>;
  const Vec vshift(shift);
  Vec vsum(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = (Vec::loadu(x + i) - vshift).exp_u20();
    e.store(x + i);
    vsum = vsum + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

// s = scale * s + bias for the first `visible` entries, -inf for the rest; returns the max.
// `bias` (may be null) is read with `bias_stride` (0 when it broadcasts over keys).
template <typename acc_t, typename bias_t>
acc_t scale_bias_mask_max(acc_t* s, int64_t n, int64_t visible, acc_t scale, const bias_t* bias, int64_t bias_stride) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t c = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = at::vec::Vectorized<float>;
    const Vec vscale(scale);
    Vec vmax(m);
    if (bias == nullptr) {
      for (; c + Vec::size() <= visible; c += Vec::size()) {
        const Vec x = Vec::loadu(s + c) * vscale;
        x.store(s + c);
        vmax = at::vec::maximum(vmax, x);
      }
    } else if constexpr (std::is_same_v<bias_t, float>) {
      if (bias_stride == 1) {
        for (; c + Vec::size() <= visible; c += Vec::size()) {
          const Vec x = at::vec::fmadd(Vec::loadu(s + c), vscale, Vec::loadu(bias + c));
          x.store(s + c);
          vmax = at::vec::maximum(vmax, x);
        }
      }
    }
    m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  }
  for (; c < visible; ++c) {
    s[c] = s[c] * scale + (bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[c * bias_stride]));
    m = std::max(m, s[c]);
  }
  for (; c < n; ++c) s[c] = -std::numeric_limits<acc_t>::infinity();
  return m;
}

// dp = prob * (dp - delta): the gradient of the scores through the softmax.
template <typename acc_t>
void softmax_grad_row(acc_t* dp, const acc_t* prob, int64_t n, acc_t delta) {
  int64_t c = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = at::vec::Vectorized<float>;
    const Vec vdelta(delta);
    for (; c + Vec::size() <= n; c += Vec::size()) {
      (Vec::loadu(prob + c) * (Vec::loadu(dp + c) - vdelta)).store(dp + c);
    }
  }
  for (; c < n; ++c) dp[c] = prob[c] * (dp[c] - delta);
}

template <typename acc_t>
void scale_row(acc_t* x, int64_t n, acc_t factor) {
  for (int64_t i = 0; i < n; ++i) x[i] *= factor;
}

}  // namespace qkv
