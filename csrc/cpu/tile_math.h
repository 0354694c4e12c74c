#pragma once
// Row operations of the CPU attention kernels (the softmax and its gradient), vectorised
// for the instruction set of this copy of the kernels through Simd (simd.h) or ATen's
// Vectorized. The tile products are in packed_gemm.h.
#include "simd.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace qkv {
inline namespace CPU_CAPABILITY {

// The kernels keep scores in log2 units (scale * log2(e) folded into the products), so the
// softmax needs 2^x, which is cheaper than exp: no range reduction by ln 2.
//
// Simd<float>::exp2_nonpositive(x) computes 2^x lane-wise for x <= 0 (a score minus its row
// max) on AVX2 and AVX-512: 2^round(x) from the exponent bits times a degree-5 polynomial for
// 2^f on [-1/2, 1/2] (relative error 1.8e-7, fitted here); exactly 0 below -126 and at -inf
// (masked keys); NaN stays NaN. The portable build uses std::exp2.

// x = 2^((x - shift) * mul) in place; returns the sum. 2^-inf = 0 covers masked entries.
// `mul` is 1 for scores in log2 units and log2(e) for scores in natural units (tile_context.h):
// subtracting before scaling keeps large finite scores finite.
template <typename acc_t>
acc_t exp2_and_sum(acc_t* x, int64_t n, acc_t shift, acc_t mul = acc_t(1)) {
  acc_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp2((x[i] - shift) * mul);
    sum += x[i];
  }
  return sum;
}

namespace detail {
// Writes 2^x where exp2_and_sum_simd wants it: `sink(i, e)` takes lanes [i, i + width), `sink(i,
// n, e)` the first n of them.
struct StoreInPlace {
  float* x;
  template <typename reg>
  QKV_ALWAYS_INLINE void operator()(int64_t i, reg e) const {
    Simd<float>::store(x + i, e);
  }
  template <typename reg>
  QKV_ALWAYS_INLINE void operator()(int64_t i, int64_t n, reg e) const {
    Simd<float>::store_partial(x + i, n, e);
  }
};

// exp2_and_sum for float32, each vector of results given to `sink`; kScaled: mul != 1 (scores
// in natural units), else the multiply is skipped.
template <bool kScaled, typename Sink>
inline float exp2_and_sum_simd(const float* x, int64_t n, float shift, float mul, const Sink& sink) {
  using R = Simd<float>;
  constexpr int64_t V = R::width;
  const typename R::reg vshift = R::set1(shift), vmul = R::set1(mul);
  const auto exponent = [&](const float* p) {
    const typename R::reg d = R::sub(R::load(p), vshift);
    return kScaled ? R::mul(d, vmul) : d;
  };
  typename R::reg sum0 = R::zero(), sum1 = R::zero();  // two chains hide the add latency
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    const typename R::reg e0 = R::exp2_nonpositive(exponent(x + i));
    const typename R::reg e1 = R::exp2_nonpositive(exponent(x + i + V));
    sink(i, e0);
    sink(i + V, e1);
    sum0 = R::add(sum0, e0);
    sum1 = R::add(sum1, e1);
  }
  for (; i + V <= n; i += V) {
    const typename R::reg e = R::exp2_nonpositive(exponent(x + i));
    sink(i, e);
    sum0 = R::add(sum0, e);
  }
  if (i < n) {
    // The tail in one masked vector: the lanes past it read -inf, whose 2^x is 0. A scalar exp2
    // loop here cost as much as the vector body on the short spans of a window's band.
    const typename R::reg d = R::sub(R::load_partial(x + i, n - i, -std::numeric_limits<float>::infinity()), vshift);
    const typename R::reg e = R::exp2_nonpositive(kScaled ? R::mul(d, vmul) : d);
    sink(i, n - i, e);
    sum1 = R::add(sum1, e);
  }
  return R::reduce_add(R::add(sum0, sum1));
}

// exp2_and_sum<float> with the results given to `sink` instead of written in place.
template <typename Sink>
inline float exp2_and_sum_into(const float* x, int64_t n, float shift, float mul, const Sink& sink) {
  return mul == 1.f ? exp2_and_sum_simd<false>(x, n, shift, mul, sink) : exp2_and_sum_simd<true>(x, n, shift, mul, sink);
}
}  // namespace detail

template <>
inline float exp2_and_sum<float>(float* x, int64_t n, float shift, float mul) {
  return detail::exp2_and_sum_into(x, n, shift, mul, detail::StoreInPlace{x});
}

// dst = 2^((x - shift) * mul) (accumulate: dst += ...): a row of probabilities written or added
// to a sum without a pass over a temporary row. `mul` as in exp2_and_sum.
template <typename acc_t>
void exp2_into(acc_t* dst, const acc_t* x, int64_t n, acc_t shift, acc_t mul, bool accumulate) {
  int64_t i = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using R = Simd<float>;
    const typename R::reg vshift = R::set1(shift), vmul = R::set1(mul);
    for (; i + R::width <= n; i += R::width) {
      typename R::reg e = R::exp2_nonpositive(R::mul(R::sub(R::load(x + i), vshift), vmul));
      if (accumulate) e = R::add(e, R::load(dst + i));
      R::store(dst + i, e);
    }
    if (i < n) {  // the tail masked, as in exp2_and_sum
      const float neg_inf = -std::numeric_limits<float>::infinity();
      typename R::reg e = R::exp2_nonpositive(R::mul(R::sub(R::load_partial(x + i, n - i, neg_inf), vshift), vmul));
      if (accumulate) e = R::add(e, R::load_partial(dst + i, n - i, 0.f));
      R::store_partial(dst + i, n - i, e);
      i = n;
    }
  }
  for (; i < n; ++i) {
    const acc_t e = std::exp2((x[i] - shift) * mul);
    dst[i] = accumulate ? dst[i] + e : e;
  }
}

// dst = factor * x (accumulate: dst += factor * x).
template <typename acc_t>
void add_scaled_row(acc_t* dst, const acc_t* x, int64_t n, acc_t factor, bool accumulate) {
  int64_t i = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = at::vec::Vectorized<float>;
    const Vec vfactor(factor);
    if (accumulate) {
      for (; i + Vec::size() <= n; i += Vec::size()) {
        at::vec::fmadd(Vec::loadu(x + i), vfactor, Vec::loadu(dst + i)).store(dst + i);
      }
    } else {
      for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(x + i) * vfactor).store(dst + i);
    }
  }
  for (; i < n; ++i) dst[i] = accumulate ? dst[i] + factor * x[i] : factor * x[i];
}

// s = scale * s + bias_scale * bias for the first `visible` entries, -inf for the rest;
// returns the max. `bias` (may be null) is read with `bias_stride` (0 when it broadcasts over keys).
template <typename acc_t, typename bias_t>
acc_t scale_bias_mask_max(acc_t* s, int64_t n, int64_t visible, acc_t scale, const bias_t* bias, int64_t bias_stride,
                          acc_t bias_scale) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t c = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = at::vec::Vectorized<float>;
    const Vec vscale(scale), vbias_scale(bias_scale);
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
          const Vec x = at::vec::fmadd(Vec::loadu(s + c), vscale, Vec::loadu(bias + c) * vbias_scale);
          x.store(s + c);
          vmax = at::vec::maximum(vmax, x);
        }
      }
    }
    m = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, vmax);
  }
  for (; c < visible; ++c) {
    s[c] = s[c] * scale + (bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[c * bias_stride]) * bias_scale);
    m = std::isnan(s[c]) ? s[c] : std::max(m, s[c]);  // NaN propagates, as in at::vec::maximum
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

// The backward's row passes as epilogues of its tile products (packed_gemm.h), for float32
// tiles: applied while a row of the product is in registers, they cost no pass over the tile.
// Each computes what its row function above does, in the same operations.

// P = 2^(s - shift[i]) (exp2_and_sum without the sum): the probabilities of scores in log2 units,
// row i shifted by its logsumexp; +inf gives a row of zeros.
struct ProbabilitiesEpilogue {
  const float* shift;
  template <typename reg>
  QKV_ALWAYS_INLINE void operator()(int64_t i, int64_t, reg& lo, reg& hi) const {
    using R = Simd<float>;
    const reg s = R::set1(shift[i]);
    lo = R::exp2_nonpositive(R::sub(lo, s));
    hi = R::exp2_nonpositive(R::sub(hi, s));
  }
};

// dS = P * (dP - delta[i]) (softmax_grad_row) with the product as dP and P read from `prob`,
// a tile laid out as the product (row stride ld).
struct SoftmaxGradEpilogue {
  const float* prob;
  int64_t ld;
  const float* delta;
  template <typename reg>
  QKV_ALWAYS_INLINE void operator()(int64_t i, int64_t j, reg& lo, reg& hi) const {
    using R = Simd<float>;
    const reg d = R::set1(delta[i]);
    const float* p = prob + i * ld + j;
    lo = R::mul(R::load(p), R::sub(lo, d));
    hi = R::mul(R::load(p + R::width), R::sub(hi, d));
  }
};

template <typename acc_t>
void scale_row(acc_t* x, int64_t n, acc_t factor) {
  for (int64_t i = 0; i < n; ++i) x[i] *= factor;
}

}  // namespace CPU_CAPABILITY
}  // namespace qkv
