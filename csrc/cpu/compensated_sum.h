#pragma once
// Compensated (TwoSum) accumulation for the kernels' long sums: P V and the softmax row sums
// over every key of a row, in the forward. A float32 running sum of n partials loses up to
// n * 2^-24 of its value (at S = 2^31 identical keys the output collapsed to 1/70 of V); keeping
// each addition's exact rounding error in a second sum bounds the error independently of n.
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace qkv {

// (sum, err) += x, with err collecting the exact rounding error of the addition (Knuth's
// TwoSum: no assumption on which of sum and x is larger). sum + err is the compensated value.
template <typename acc_t>
inline void add_compensated(acc_t& sum, acc_t& err, acc_t x) {
  const acc_t t = sum + x;
  const acc_t z = t - sum;
  err += (sum - (t - z)) + (x - z);
  sum = t;
}

// The same, element-wise over rows of n values.
template <typename acc_t>
void add_compensated(acc_t* sum, acc_t* err, const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec s = Vec::loadu(sum + i), a = Vec::loadu(x + i);
    const Vec t = s + a;
    const Vec z = t - s;
    (Vec::loadu(err + i) + ((s - (t - z)) + (a - z))).store(err + i);
    t.store(sum + i);
  }
  for (; i < n; ++i) add_compensated(sum[i], err[i], x[i]);
}

}  // namespace qkv
