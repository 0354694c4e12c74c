#pragma once
// Dense tile arithmetic for the CPU attention kernels: row-major GEMMs on packed tiles
// (through the BLAS inside libtorch_cpu) and the softmax row operations,
// vectorised for float32 with ATen's Vectorized (AVX2 baseline of this build).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace qkv {

namespace detail {

// Column-major BLAS through the Fortran interface that libtorch_cpu exports (MKL or
// OpenBLAS, LP64). Weak, so a torch built without BLAS falls back to the plain loop below.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

template <typename acc_t>
void reference_colmajor_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda,
                             const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      acc_t sum = 0;
      for (int64_t l = 0; l < k; ++l) sum += (ta ? a[i * lda + l] : a[l * lda + i]) * (tb ? b[l * ldb + j] : b[j * ldb + l]);
      c[j * ldc + i] = (beta == acc_t(0) ? acc_t(0) : beta * c[j * ldc + i]) + sum;
    }
  }
}

// C (m x n, column-major) = op(A) op(B) + beta C. Tiles are small, so int dims are safe.
template <typename acc_t>
void colmajor_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda,
                   const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  auto blas = [&](auto* fn) {
    const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
    const int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
    const acc_t one = 1;
    fn(&cta, &ctb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &beta, c, &ildc);
  };
  // BLAS rejects zero leading dimensions, which an empty head_dim gives.
  const bool blas_ok = k > 0 && lda > 0 && ldb > 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (blas_ok && sgemm_ != nullptr) return blas(sgemm_);
  } else {
    if (blas_ok && dgemm_ != nullptr) return blas(dgemm_);
  }
  reference_colmajor_gemm(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
}
}  // namespace detail

// C (m x n) = A (m x k) . B (k x n) + beta C, all row-major.
template <typename acc_t>
void gemm_nn(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
             acc_t* c, int64_t ldc, acc_t beta) {
  detail::colmajor_gemm<acc_t>(false, false, n, m, k, b, ldb, a,
                               lda, beta, c, ldc);
}

// C (m x n) = A (m x k) . B (n x k)^T + beta C, all row-major.
template <typename acc_t>
void gemm_nt(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
             acc_t* c, int64_t ldc, acc_t beta) {
  detail::colmajor_gemm<acc_t>(true, false, n, m, k, b, ldb, a,
                               lda, beta, c, ldc);
}

// C (m x n) = A (k x m)^T . B (k x n) + beta C, all row-major.
template <typename acc_t>
void gemm_tn(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
             acc_t* c, int64_t ldc, acc_t beta) {
  detail::colmajor_gemm<acc_t>(false, true, n, m, k, b, ldb, a,
                               lda, beta, c, ldc);
}

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
