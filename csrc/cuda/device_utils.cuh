#pragma once
// Small device helpers shared by the CUDA kernels: element conversion to the accumulation
// type, exponentials that stay exact at -inf, warp reductions. Only CUDA headers here (no torch),
// so the kernel headers also compile on the host against the CPU emulation of the CUDA built-ins
// that tests/cuda_emulation uses (QKV_CUDA_EMULATION).
// torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ and friends, so conversions go
// through the explicit intrinsics.
#include "kernel_params.h"

#if !defined(QKV_CUDA_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// The dynamic shared memory of a kernel, as a byte array named `name`.
#define QKV_DYNAMIC_SHARED_MEMORY(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include <cmath>
#include <cstdint>

namespace qkv::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct AccumulatorOf {
  using type = float;
};
template <>
struct AccumulatorOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t load_acc(const T* p) {
  return static_cast<acc_t>(to_float(*p));
}
template <>
__device__ __forceinline__ double load_acc<double, double>(const double* p) {
  return *p;
}

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, typename acc_t>
__device__ __forceinline__ void store_acc(T* p, acc_t x) {
  *p = from_acc<T>(x);
}
template <>
__device__ __forceinline__ void store_acc<double, double>(double* p, double x) {
  *p = x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t negative_infinity() {
  return -INFINITY;
}
template <>
__device__ __forceinline__ double negative_infinity<double>() {
  return -static_cast<double>(INFINITY);
}

// exp(x), with exp(-inf) == 0. float goes through exp2 (ex2.approx under --use_fast_math,
// about 2 ulp over the whole range, unlike __expf whose error grows with |x|).
__device__ __forceinline__ float exp_acc(float x) { return exp2f(x * 1.4426950408889634f); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }
__device__ __forceinline__ float log_acc(float x) { return log2f(x) * 0.6931471805599453f; }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// The maximum, NaN if either is NaN (fmax drops a NaN operand): a NaN score must reach the
// output, never leave a row's maximum at -inf, which reads as a row with nothing visible.
__device__ __forceinline__ float max_acc(float a, float b) { return a != a || b != b ? a + b : fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return a != a || b != b ? a + b : fmax(a, b); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = max_acc(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// (sum, err) += x with Kahan's compensation: err is the part of the true sum that sum could not
// hold, carried into the next addition (sum + err is the value). For sums of many partials (a row
// over every key tile), whose plain float error grows with their count. As csrc/cpu/compensated_sum.h.
template <typename acc_t>
__device__ __forceinline__ void add_compensated(acc_t& sum, acc_t& err, acc_t x) {
  const acc_t y = x + err;
  const acc_t t = sum + y;
  err = y - (t - sum);
  sum = t;
}

// Whether a row's logsumexp is large enough that its rounding step exceeds 2^-10 (|lse| >= 2^13
// in float32, 2^42 in float64; finite rows only): exp(s - lse) then needs the row's normalizer
// (kernel_params.h, LseNormalizerArgs).
__device__ __forceinline__ bool lse_needs_normalizer(float lse) { return fabsf(lse) >= 8192.f && lse - lse == 0.f; }
__device__ __forceinline__ bool lse_needs_normalizer(double lse) {
  return fabs(lse) >= 4398046511104.0 && lse - lse == 0.0;
}

// The factor that probability exp(s - lse) of row `row` ((b * H + h) * L + i) is multiplied by:
// 1 without normalizers.
template <typename acc_t>
__device__ __forceinline__ acc_t lse_normalizer_at(const void* normalizers, int64_t row) {
  return normalizers == nullptr ? acc_t(1) : static_cast<const acc_t*>(normalizers)[row];
}

// Dropout replay, identical to the CPU kernels: index over the logical (B, H, L, S) grid.
__device__ __forceinline__ uint64_t dropout_index(const ProblemShape& p, int64_t bh, int64_t i, int64_t j) {
  return (static_cast<uint64_t>(bh) * static_cast<uint64_t>(p.q_len) + static_cast<uint64_t>(i)) *
             static_cast<uint64_t>(p.kv_len) +
         static_cast<uint64_t>(j);
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace qkv::cuda
