#pragma once
// One vector register of the instruction set this copy of the CPU kernels is compiled for
// (see cpu_capability.h): Simd<float> and Simd<double> give the register type, its width
// and the handful of operations the micro-kernels (packed_gemm.h) and the softmax rows
// (tile_math.h) need.
//   AVX512   __m512 / __m512d (16 floats), raw intrinsics
//   AVX2     __m256 / __m256d (8 floats), raw intrinsics
//   DEFAULT  ATen's Vectorized (portable C++, NEON on aarch64): any CPU, any architecture
// Raw intrinsics keep every accumulator of a micro-kernel in registers; an early version
// on Vectorized with a run-time flag measured 3x slower (AVX2, Zen 3). `pin(x)` keeps a
// loaded value in a register: without it GCC may fold the load into every FMA that uses it
// (12 loads instead of 2 per step of the AVX2 kernel: half its speed, measured on a Xeon).
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <cstdint>

// For code that runs on registers inside a micro-kernel (the epilogues, packed_gemm.h): a call
// that is not inlined spills the kernel's accumulators to memory.
#if defined(__GNUC__)
#define QKV_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define QKV_ALWAYS_INLINE inline
#endif

namespace qkv {
inline namespace CPU_CAPABILITY {

template <typename T>
struct Simd;

#if defined(CPU_CAPABILITY_AVX512)

template <>
struct Simd<float> {
  using reg = __m512;
  static constexpr int64_t width = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg broadcast(const float* p) { return _mm512_set1_ps(*p); }  // folds into the FMA as {1to16}
  static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  // The first n < width lanes at p (the rest `fill`), and their store: a row's tail in one
  // masked instruction instead of a scalar loop (masked-off lanes are never touched).
  static reg load_partial(const float* p, int64_t n, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), static_cast<__mmask16>((1u << n) - 1), p);
  }
  static void store_partial(float* p, int64_t n, reg x) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), x);
  }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }  // b when either is NaN
  static void pin(reg& x) { asm("" : "+v"(x)); }
  static float reduce_add(reg x) { return _mm512_reduce_add_ps(x); }
  static float reduce_max(reg x) { return _mm512_reduce_max_ps(x); }
  // 2^x for x <= 0; see tile_math.h for the method and its error. vscalefps applies the
  // exponent (the same bits as adding it to the exponent field, in one instruction); lanes
  // below -126 (masked keys: -inf) are zeroed by the mask, NaN stays NaN.
  static reg exp2_nonpositive(reg x) {
    const __mmask16 in_range = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);  // also true for NaN
    const reg n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const reg f = _mm512_sub_ps(x, n);
    reg poly = _mm512_set1_ps(0.0013218672247603536f);
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(0.009671698324382305f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(0.05550893023610115f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(0.24022237956523895f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(0.6931468844413757f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(in_range, poly, n);
  }
};

template <>
struct Simd<double> {
  using reg = __m512d;
  static constexpr int64_t width = 8;
  static reg zero() { return _mm512_setzero_pd(); }
  static reg set1(double x) { return _mm512_set1_pd(x); }
  static reg load(const double* p) { return _mm512_loadu_pd(p); }
  static reg broadcast(const double* p) { return _mm512_set1_pd(*p); }
  static void store(double* p, reg x) { _mm512_storeu_pd(p, x); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_pd(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_pd(a, b); }
  static void pin(reg& x) { asm("" : "+v"(x)); }
  static double reduce_add(reg x) { return _mm512_reduce_add_pd(x); }
  static double reduce_max(reg x) { return _mm512_reduce_max_pd(x); }
};

#elif defined(CPU_CAPABILITY_AVX2)

template <>
struct Simd<float> {
  using reg = __m256;
  static constexpr int64_t width = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static __m256i first_lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static reg load_partial(const float* p, int64_t n, float fill) {
    const __m256i lanes = first_lanes(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, lanes), _mm256_castsi256_ps(lanes));
  }
  static void store_partial(float* p, int64_t n, reg x) { _mm256_maskstore_ps(p, first_lanes(n), x); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }  // b when either is NaN
  static void pin(reg& x) { asm("" : "+x"(x)); }
  static float reduce_add(reg x) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, x);
    float sum = 0.f;
    for (float lane : lanes) sum += lane;
    return sum;
  }
  static float reduce_max(reg x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static reg exp2_nonpositive(reg x) {
    const reg lowest = _mm256_set1_ps(-126.f);
    const reg too_small = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_max_ps(lowest, x);  // this operand order keeps NaN
    const reg n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const reg f = _mm256_sub_ps(x, n);
    reg poly = _mm256_set1_ps(0.0013218672247603536f);
    poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(0.009671698324382305f));
    poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(0.05550893023610115f));
    poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(0.24022237956523895f));
    poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(0.6931468844413757f));
    poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(1.f));
    const __m256i exponent = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    const reg result = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(poly), exponent));
    return _mm256_andnot_ps(too_small, result);
  }
};

template <>
struct Simd<double> {
  using reg = __m256d;
  static constexpr int64_t width = 4;
  static reg zero() { return _mm256_setzero_pd(); }
  static reg set1(double x) { return _mm256_set1_pd(x); }
  static reg load(const double* p) { return _mm256_loadu_pd(p); }
  static reg broadcast(const double* p) { return _mm256_broadcast_sd(p); }
  static void store(double* p, reg x) { _mm256_storeu_pd(p, x); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
  static reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_pd(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_pd(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_pd(a, b); }
  static void pin(reg& x) { asm("" : "+x"(x)); }
  static double reduce_add(reg x) {
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, x);
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  }
  static double reduce_max(reg x) {
    const __m128d m = _mm_max_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    return _mm_cvtsd_f64(_mm_max_sd(m, _mm_unpackhi_pd(m, m)));
  }
};

#else  // DEFAULT: portable C++ through ATen's Vectorized

template <typename T>
struct Simd {
  using reg = at::vec::Vectorized<T>;
  static constexpr int64_t width = reg::size();
  static reg zero() { return reg(T(0)); }
  static reg set1(T x) { return reg(x); }
  static reg load(const T* p) { return reg::loadu(p); }
  static reg broadcast(const T* p) { return reg(*p); }
  static void store(T* p, reg x) { x.store(p); }
  static reg load_partial(const T* p, int64_t n, T fill) { return reg::set(reg(fill), reg::loadu(p, n), n); }
  static void store_partial(T* p, int64_t n, reg x) { x.store(p, n); }
  static reg fmadd(reg a, reg b, reg c) { return at::vec::fmadd(a, b, c); }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg max(reg a, reg b) { return at::vec::maximum(a, b); }  // NaN propagates
  static void pin(reg&) {}
  static T reduce_add(reg x) {
    return at::vec::vec_reduce_all<T>([](const reg& a, const reg& b) { return a + b; }, x);
  }
  static T reduce_max(reg x) {
    return at::vec::vec_reduce_all<T>([](const reg& a, const reg& b) { return at::vec::maximum(a, b); }, x);
  }
  // std::exp2 per lane: 0 at -inf, NaN stays NaN (below -126 it may give a subnormal, not 0).
  static reg exp2_nonpositive(reg x) { return x.exp2(); }
};

#endif

}  // namespace CPU_CAPABILITY
}  // namespace qkv
