#pragma once
// Compensated (Kahan) accumulation for the kernels' long sums: P V and the softmax row sums
// over every key of a row, in the forward. A float32 running sum of n partials loses up to
// n * 2^-24 of its value (at S = 2^31 identical keys the output collapsed to 1/70 of V). Kahan's
// sum carries each addition's rounding error into the next one, which keeps the error at
// 2^-23 of the sum plus n * 2^-48 of the sum of magnitudes: independent of n for any n a kernel
// can see. (Summing the errors separately, as TwoSum alone does, lets their own rounding grow
// with n^2: 7e-5 at 2^31 identical keys.)
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace qkv {
inline namespace CPU_CAPABILITY {  // this copy's instruction set (cpu_capability.h)

// (sum, err) += x. `err` is the part of the true sum that `sum` could not hold; sum + err is the
// compensated value. Scaling both by the same factor (the online softmax's rescale) keeps it so.
template <typename acc_t>
inline void add_compensated(acc_t& sum, acc_t& err, acc_t x) {
  const acc_t y = x + err;
  const acc_t t = sum + y;
  err = y - (t - sum);
  sum = t;
}

// The same, element-wise over rows of n values.
template <typename acc_t>
void add_compensated(acc_t* sum, acc_t* err, const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec s = Vec::loadu(sum + i);
    const Vec y = Vec::loadu(x + i) + Vec::loadu(err + i);
    const Vec t = s + y;
    (y - (t - s)).store(err + i);
    t.store(sum + i);
  }
  for (; i < n; ++i) add_compensated(sum[i], err[i], x[i]);
}

}  // namespace CPU_CAPABILITY
}  // namespace qkv
