#pragma once
// The score options of issue 17 applied to one row of a score tile, in natural units (the
// products already carry the softmax scale): softcap, then ALiBi, then the additive bias, then
// the band mask. Softcap keeps tanh's derivative for the backward.
#include "simd.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace qkv {
inline namespace CPU_CAPABILITY {  // this copy's instruction set (cpu_capability.h)

// One row's options: `softcap` > 0 caps, `slope` != 0 adds -slope * |distance0 - c| at column c
// (distance0 = i + offset - j0), `bias` (may be null) is read with `bias_stride`.
template <typename acc_t, typename bias_t>
struct RowScoreOptions {
  acc_t softcap = 0;
  acc_t slope = 0;
  int64_t distance0 = 0;
  const bias_t* bias = nullptr;
  int64_t bias_stride = 0;
};

// s[c] for c in [begin, end): x -> softcap * tanh(x / softcap) (and cap_grad[c] = 1 - tanh^2, the
// derivative, unless cap_grad is null), - slope * |distance0 - c|, + bias[c]; returns their max
// (NaN propagates). Entries of [0, n) outside [begin, end) become -inf when `mask_outside`.
template <typename acc_t, typename bias_t>
acc_t transform_scores_row(acc_t* s, int64_t n, int64_t begin, int64_t end, const RowScoreOptions<acc_t, bias_t>& o,
                           acc_t* cap_grad, bool mask_outside) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  if (mask_outside) {
    std::fill(s, s + std::min(begin, n), neg_inf);
    if (end < n) std::fill(s + std::max<int64_t>(end, 0), s + n, neg_inf);
  }
  if (end <= begin) return neg_inf;
  int64_t c = begin;
  acc_t m = neg_inf;
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = at::vec::Vectorized<float>;
    constexpr int64_t V = Vec::size();
    const Vec cap(o.softcap), inv_cap(o.softcap > 0 ? 1.0f / o.softcap : 0.0f), one(1.0f), slope(o.slope);
    float lane_index[V];
    for (int64_t l = 0; l < V; ++l) lane_index[l] = static_cast<float>(l);
    const Vec lanes = Vec::loadu(lane_index);
    const bool contiguous_bias = o.bias == nullptr || o.bias_stride == 1;
    constexpr bool float_bias = std::is_same_v<bias_t, float>;
    Vec vmax(neg_inf);
    if (contiguous_bias && (float_bias || o.bias == nullptr)) {
      for (; c + V <= end; c += V) {
        Vec x = Vec::loadu(s + c);
        if (o.softcap > 0) {
          const Vec t = (x * inv_cap).tanh();
          x = t * cap;
          if (cap_grad != nullptr) (one - t * t).store(cap_grad + c);
        }
        if (o.slope != 0) {
          const Vec distance = (Vec(static_cast<float>(o.distance0 - c)) - lanes).abs();
          x = x - slope * distance;
        }
        if constexpr (float_bias) {
          if (o.bias != nullptr) x = x + Vec::loadu(reinterpret_cast<const float*>(o.bias) + c);
        }
        x.store(s + c);
        vmax = at::vec::maximum(vmax, x);
      }
      m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
    }
  }
  for (; c < end; ++c) {
    acc_t x = s[c];
    if (o.softcap > 0) {
      const acc_t t = std::tanh(x / o.softcap);
      x = t * o.softcap;
      if (cap_grad != nullptr) cap_grad[c] = acc_t(1) - t * t;
    }
    if (o.slope != 0) x -= o.slope * static_cast<acc_t>(std::abs(o.distance0 - c));
    if (o.bias != nullptr) x += static_cast<acc_t>(o.bias[c * o.bias_stride]);
    s[c] = x;
    m = std::isnan(x) ? x : std::max(m, x);
  }
  return m;
}

// s[c] = -inf for c in [span_begin, span_end) outside [begin, end); returns the max over
// [begin, end), -inf when it is empty (and -inf without reading the row unless `want_max`).
// A NaN in the row gives NaN where nothing else is above -inf; beside a finite maximum it is
// dropped here, as in gemm_packed_row_max, and surfaces through 2^(NaN - max) instead.
template <typename acc_t>
acc_t mask_row_max(acc_t* s, int64_t span_begin, int64_t span_end, int64_t begin, int64_t end, bool want_max = true) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  begin = std::clamp(begin, span_begin, span_end);
  end = std::clamp(end, begin, span_end);
  std::fill(s + span_begin, s + begin, neg_inf);
  std::fill(s + end, s + span_end, neg_inf);
  if (!want_max) return neg_inf;
  acc_t m = neg_inf;
  int64_t c = begin;
  if constexpr (std::is_same_v<acc_t, float>) {
    // Four chains: one chain of max was latency-bound, and the hottest pass of the AMX forward.
    using R = Simd<float>;
    constexpr int64_t V = R::width;
    typename R::reg m0 = R::set1(neg_inf), m1 = m0, m2 = m0, m3 = m0;
    for (; c + 4 * V <= end; c += 4 * V) {
      m0 = R::max(R::load(s + c), m0);
      m1 = R::max(R::load(s + c + V), m1);
      m2 = R::max(R::load(s + c + 2 * V), m2);
      m3 = R::max(R::load(s + c + 3 * V), m3);
    }
    for (; c + V <= end; c += V) m0 = R::max(R::load(s + c), m0);
    if (c < end) {  // the tail as one vector, its missing lanes -inf
      m1 = R::max(R::load_partial(s + c, end - c, neg_inf), m1);
      c = end;
    }
    m = R::reduce_max(R::max(R::max(m0, m1), R::max(m2, m3)));
    if (m == neg_inf) {  // nothing above -inf: a NaN, if any, is the answer
      for (int64_t j = begin; j < end; ++j) m = std::isnan(s[j]) ? s[j] : m;
    }
  }
  for (; c < end; ++c) m = std::isnan(s[c]) ? s[c] : std::max(m, s[c]);
  return m;
}

// dS *= cap_grad over [begin, end): the softcap's tanh derivative, after the softmax gradient.
template <typename acc_t>
void multiply_row(acc_t* ds, const acc_t* factor, int64_t begin, int64_t end) {
  int64_t c = begin;
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = at::vec::Vectorized<float>;
    for (; c + Vec::size() <= end; c += Vec::size()) (Vec::loadu(ds + c) * Vec::loadu(factor + c)).store(ds + c);
  }
  for (; c < end; ++c) ds[c] *= factor[c];
}

}  // namespace CPU_CAPABILITY
}  // namespace qkv
