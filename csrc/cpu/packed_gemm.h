#pragma once
// The tile products of the CPU attention kernels: C = A . B (+ C) with B packed into
// column panels and a register-blocked micro-kernel (kMicroRows rows x one panel of
// kPanelRegs vector registers), in the instruction set of this copy of the kernels (simd.h).
//
// Why not the BLAS in libtorch_cpu: attention tiles are small in one dimension (the head
// dim, 64 or 128), so a BLAS call spends much of its time repacking its operands, on every
// call. Here the key-side operands are packed once per tile and reused by every query block,
// and the micro-kernel reads A in place through any strides (P^T in the backward is free). Measured
// on a 2-core Zen 3, one thread, QK^T of 256 x 512 x 64 and PV of 256 x 64 x 512 tiles:
// MKL sgemm 77 / 82 GF/s, this kernel 94 / 95 GF/s.
#include "simd.h"

#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace qkv {
inline namespace CPU_CAPABILITY {

// The register tile of the micro-kernel: kMicroRows rows of C by one panel of kPanelRegs
// vector registers; its kMicroRows * kPanelRegs accumulators stay in registers.
#if defined(CPU_CAPABILITY_AVX512)
// 12 x 32 floats: 24 of the 32 zmm registers. On a Xeon (Sapphire Rapids class), one thread,
// D = 64 tiles: Q K^T with the row max 165 GF/s, P V 180 GF/s (torch.mm: 166 GF/s); 14 x 32
// and 6 x 64 measured no faster, 8 x 48 slower, and 12 rows leave no tail in 96-row tiles.
constexpr int kMicroRows = 12, kPanelRegs = 2;
#elif defined(CPU_CAPABILITY_AVX2)
// 6 x 16 floats: 12 of the 16 ymm registers (measured on Zen 3).
constexpr int kMicroRows = 6, kPanelRegs = 2;
#else
// Portable: correct anywhere; its speed is not a goal.
constexpr int kMicroRows = 4, kPanelRegs = 2;
#endif

// Columns per packed panel: kPanelRegs vector registers (AVX2: 16 floats, 8 doubles).
template <typename acc_t>
constexpr int64_t kPanelWidth = kPanelRegs * Simd<acc_t>::width;

// n rounded up to whole panels: the row stride of any C written by gemm_packed.
template <typename acc_t>
constexpr int64_t padded_to_panels(int64_t n) {
  return (n + kPanelWidth<acc_t> - 1) / kPanelWidth<acc_t> * kPanelWidth<acc_t>;
}

// B packed into column panels of width W: element (p, j) at data[(j / W) * depth * W + p * W + j % W].
// A product may use the first k <= depth rows of B.
template <typename acc_t>
struct Panels {
  const acc_t* data;
  int64_t depth;
};

namespace detail {

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// dst[q * ldd + r] = src[r * lds + q] for an 8 x 8 block of floats: eight row loads, the
// classic unpack/shuffle/permute transpose, eight row stores.
inline void transpose_8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

}  // namespace detail

// Packs B (k x n), element (p, j) at src[p * sp + j * sj], as acc_t into panels at dst
// (padded_to_panels(n) * k elements). The last panel is zero-padded to width W.
template <typename acc_t, typename src_t>
Panels<acc_t> pack_panels(const src_t* src, int64_t k, int64_t n, int64_t sp, int64_t sj, acc_t* dst) {
  constexpr int64_t W = kPanelWidth<acc_t>;
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    const int64_t w = std::min(W, n - j0);
    acc_t* panel = dst + j0 * k;
    int64_t p = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<src_t, float>) {
      if (sp == 1 && w == W) {  // B^T is row-major (K^T, V^T): transpose 8 x 8 blocks in registers
        for (; p + 8 <= k; p += 8) {
          for (int64_t q = 0; q < W; q += 8) detail::transpose_8x8(src + p + (j0 + q) * sj, sj, panel + p * W + q, W);
        }
      }
    }
#endif
    for (; p < k; ++p) {
      const src_t* s = src + p * sp + j0 * sj;
      acc_t* d = panel + p * W;
      if constexpr (std::is_same_v<acc_t, src_t>) {
        if (sj == 1 && w == W) {  // a whole contiguous panel row: no conversion, no gather
          std::memcpy(d, s, W * sizeof(acc_t));
          continue;
        }
      }
      for (int64_t j = 0; j < w; ++j) d[j] = static_cast<acc_t>(s[j * sj]);
      for (int64_t j = w; j < W; ++j) d[j] = acc_t(0);
    }
  }
  return {dst, k};
}

// The part of a product that a block of rows [i0, i0 + mr) of C needs, for masks that hide
// a known region (causal, windows): its columns [cols_begin, cols) and the depth range
// [depth_begin, depth_end) of the reduction. The caller guarantees that what is skipped is exactly zero
// (A is zero outside the depth range) or unused (columns beyond `cols` are left unwritten).
struct RowBlockExtent {
  int64_t cols, depth_begin, depth_end;
  // Columns before this one are not needed either (a window's band): the product starts at the
  // panel that holds it and leaves the columns before that panel unwritten.
  int64_t cols_begin = 0;
};
struct WholeProduct {
  RowBlockExtent operator()(int64_t, int64_t) const { return {INT64_MAX, 0, INT64_MAX}; }
};

// What a product does to each row of a register tile before storing it: `epilogue(i, j, lo, hi)`
// gets row i of C and the panel starting at column j (lo: columns j..j+V-1, hi: the next V) in
// registers, and may change them. A pass over a tile fused this way reads and writes no memory
// of its own (the backward's probabilities and dS, tile_math.h).
struct NoEpilogue {
  template <typename reg>
  QKV_ALWAYS_INLINE void operator()(int64_t, int64_t, reg&, reg&) const {}
};

namespace detail {

// C[MR x W] = A[MR x k] . panel[k x W] (+ C when accumulating), in registers: 2 * MR
// accumulators, 2 panel loads and MR broadcasts per step of k. With kRowMax, also
// vmax[i] = max(vmax[i], row i of C) lane-wise (V lanes per row), while C is in registers.
// The accumulate flag is a template parameter so that no branch sits in the loop and every
// accumulator stays in a register. Accumulating adds C to the finished product, not the
// product's terms to C one by one: a sum over many calls (P V over key tiles, dV over query
// blocks) then rounds like a sum of tile partials, whose error grows with the number of tiles
// instead of the number of terms.
template <typename acc_t, int MR, bool kAccumulate, bool kRowMax = false, typename Epilogue = NoEpilogue>
inline void micro_kernel(int64_t k, const acc_t* a, int64_t rsa, int64_t csa, const acc_t* panel, acc_t* c,
                         int64_t ldc, acc_t* vmax = nullptr, const Epilogue& epilogue = {}, int64_t row0 = 0,
                         int64_t col0 = 0) {
  static_assert(kPanelRegs == 2, "the micro-kernel holds a panel in two registers");
  using R = Simd<acc_t>;
  using reg = typename R::reg;
  constexpr int64_t V = R::width;
  reg lo[MR], hi[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) lo[i] = hi[i] = R::zero();
  for (int64_t p = 0; p < k; ++p) {
    reg b0 = R::load(panel + p * 2 * V), b1 = R::load(panel + p * 2 * V + V);
    R::pin(b0);
    R::pin(b1);
    const acc_t* ap = a + p * csa;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const reg ai = R::broadcast(ap + i * rsa);
      lo[i] = R::fmadd(ai, b0, lo[i]);
      hi[i] = R::fmadd(ai, b1, hi[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if constexpr (kAccumulate) {
      lo[i] = R::add(R::load(c + i * ldc), lo[i]);
      hi[i] = R::add(R::load(c + i * ldc + V), hi[i]);
    }
    epilogue(row0 + i, col0, lo[i], hi[i]);
    R::store(c + i * ldc, lo[i]);
    R::store(c + i * ldc + V, hi[i]);
    if constexpr (kRowMax) R::store(vmax + i * V, R::max(R::load(vmax + i * V), R::max(lo[i], hi[i])));
  }
}

// micro_kernel for a run-time row count mr in [1, MR].
template <typename acc_t, bool kAccumulate, bool kRowMax = false, int MR = kMicroRows, typename Epilogue = NoEpilogue>
inline void micro_kernel_rows(int64_t mr, int64_t k, const acc_t* a, int64_t rsa, int64_t csa, const acc_t* panel,
                              acc_t* c, int64_t ldc, acc_t* vmax = nullptr, const Epilogue& epilogue = {},
                              int64_t row0 = 0, int64_t col0 = 0) {
  if constexpr (MR > 1) {
    if (mr < MR) {
      return micro_kernel_rows<acc_t, kAccumulate, kRowMax, MR - 1>(mr, k, a, rsa, csa, panel, c, ldc, vmax, epilogue,
                                                                    row0, col0);
    }
  }
  micro_kernel<acc_t, MR, kAccumulate, kRowMax>(k, a, rsa, csa, panel, c, ldc, vmax, epilogue, row0, col0);
}


// Loop order: each block of MR rows of A (held in L1) against every panel of B (streamed
// from L2 in order). Measured as fast as or faster than panel-outer and k-chunked orders on
// the attention tile shapes.
template <typename acc_t, bool kAccumulate, typename ExtentOf, typename Epilogue = NoEpilogue>
void gemm_packed(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t rsa, int64_t csa, Panels<acc_t> b,
                 acc_t* c, int64_t ldc, const ExtentOf& extent_of, const Epilogue& epilogue = {}) {
  constexpr int64_t W = kPanelWidth<acc_t>;
  for (int64_t i0 = 0; i0 < m; i0 += kMicroRows) {
    const int64_t mr = std::min<int64_t>(kMicroRows, m - i0);
    const RowBlockExtent e = extent_of(i0, mr);
    const int64_t cols = std::min(n, e.cols), p0 = std::clamp<int64_t>(e.depth_begin, 0, k);
    const int64_t depth = std::min(k, e.depth_end) - p0;
    if (depth <= 0 && kAccumulate) continue;
    for (int64_t j0 = std::max<int64_t>(e.cols_begin, 0) / W * W; j0 < cols; j0 += W) {
      micro_kernel_rows<acc_t, kAccumulate>(mr, std::max<int64_t>(depth, 0), a + i0 * rsa + p0 * csa, rsa, csa,
                                            b.data + j0 * b.depth + p0 * W, c + i0 * ldc + j0, ldc, nullptr,
                                            epilogue, i0, j0);
    }
  }
}

}  // namespace detail

// C (m x n) = A (m x k) . B (k x n), plus C when `accumulate`. A's element (i, p) is read at
// a[i * rsa + p * csa]; B is the first k rows of `b` (k <= b.depth); C is row-major with ldc
// at least padded_to_panels(n), and its padding columns are written too (zeros times A).
// `extent_of(i0, mr)` (a RowBlockExtent) may restrict each block of rows to part of the product.
template <typename acc_t, typename ExtentOf = WholeProduct>
void gemm_packed(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t rsa, int64_t csa, Panels<acc_t> b,
                 acc_t* c, int64_t ldc, bool accumulate, const ExtentOf& extent_of = {}) {
  if (accumulate) {
    detail::gemm_packed<acc_t, true>(m, n, k, a, rsa, csa, b, c, ldc, extent_of);
  } else {
    detail::gemm_packed<acc_t, false>(m, n, k, a, rsa, csa, b, c, ldc, extent_of);
  }
}

// C = epilogue(A . B) as gemm_packed without accumulate: the epilogue (NoEpilogue) sees each
// row of each panel that `extent_of` keeps before it is stored, padding columns included.
template <typename acc_t, typename ExtentOf, typename Epilogue>
void gemm_packed_epilogue(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t rsa, int64_t csa,
                          Panels<acc_t> b, acc_t* c, int64_t ldc, const ExtentOf& extent_of,
                          const Epilogue& epilogue) {
  detail::gemm_packed<acc_t, false>(m, n, k, a, rsa, csa, b, c, ldc, extent_of, epilogue);
}

// C = A . B as gemm_packed (no accumulate, whole product), and row_max[i] = the maximum of
// the n real columns of row i of C, taken while C is still in registers (the forward's
// scores need no second pass over the tile).
template <typename acc_t>
void gemm_packed_row_max(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t rsa, int64_t csa, Panels<acc_t> b,
                         acc_t* c, int64_t ldc, acc_t* row_max) {
  constexpr int64_t W = kPanelWidth<acc_t>, V = Simd<acc_t>::width, MR = kMicroRows;
  const int64_t full_end = n / W * W;  // the partial last panel's padding must not enter the max
  alignas(64) acc_t vmax[MR * V];
  for (int64_t i0 = 0; i0 < m; i0 += MR) {
    const int64_t mr = std::min(MR, m - i0);
    std::fill(vmax, vmax + MR * V, -std::numeric_limits<acc_t>::infinity());
    const acc_t* ai = a + i0 * rsa;
    acc_t* ci = c + i0 * ldc;
    for (int64_t j0 = 0; j0 < full_end; j0 += W) {
      detail::micro_kernel_rows<acc_t, false, true>(mr, k, ai, rsa, csa, b.data + j0 * b.depth, ci + j0, ldc, vmax);
    }
    if (full_end < n) detail::micro_kernel_rows<acc_t, false>(mr, k, ai, rsa, csa, b.data + full_end * b.depth, ci + full_end, ldc);
    for (int64_t i = 0; i < mr; ++i) {
      acc_t mx = Simd<acc_t>::reduce_max(Simd<acc_t>::load(vmax + i * V));  // a scalar chain cost 8% of Q K^T
      for (int64_t j = full_end; j < n; ++j) mx = std::max(mx, ci[i * ldc + j]);
      // Vector max drops NaN operands. Beside a finite maximum a NaN still surfaces (2^(NaN - max)
      // is NaN); with none, look for it so the row is not taken for an empty one.
      if (mx == -std::numeric_limits<acc_t>::infinity()) {
        for (int64_t j = 0; j < n; ++j) mx = std::isnan(ci[i * ldc + j]) ? ci[i * ldc + j] : mx;
      }
      row_max[i0 + i] = mx;
    }
  }
}

// Few-row tiles (decoding: one query row against thousands of keys) skip the packing,
// which would cost as much as the product: B is read in place, row-major, unit inner stride.

// C (m x n) = A (m x k) . B (n x k)^T as dot products, four rows of B at a time.
template <typename acc_t>
void gemm_nt_dots(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                  acc_t* c, int64_t ldc) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const auto add = [](const Vec& x, const Vec& y) { return x + y; };
  for (int64_t i = 0; i < m; ++i) {
    const acc_t* ai = a + i * lda;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const acc_t* bj = b + j * ldb;
      Vec s0(acc_t(0)), s1(acc_t(0)), s2(acc_t(0)), s3(acc_t(0));
      int64_t p = 0;
      for (; p + V <= k; p += V) {
        const Vec x = Vec::loadu(ai + p);
        s0 = at::vec::fmadd(x, Vec::loadu(bj + p), s0);
        s1 = at::vec::fmadd(x, Vec::loadu(bj + ldb + p), s1);
        s2 = at::vec::fmadd(x, Vec::loadu(bj + 2 * ldb + p), s2);
        s3 = at::vec::fmadd(x, Vec::loadu(bj + 3 * ldb + p), s3);
      }
      acc_t d[4] = {at::vec::vec_reduce_all<acc_t>(add, s0), at::vec::vec_reduce_all<acc_t>(add, s1),
                    at::vec::vec_reduce_all<acc_t>(add, s2), at::vec::vec_reduce_all<acc_t>(add, s3)};
      for (; p < k; ++p) {
        for (int r = 0; r < 4; ++r) d[r] += ai[p] * bj[r * ldb + p];
      }
      for (int r = 0; r < 4; ++r) c[i * ldc + j + r] = d[r];
    }
    for (; j < n; ++j) {
      acc_t d = 0;
      for (int64_t p = 0; p < k; ++p) d += ai[p] * b[j * ldb + p];
      c[i * ldc + j] = d;
    }
  }
}

// C (m x n) += A (m x k) . B (k x n) as axpys over the rows of B; the product is added to C
// when finished, as in micro_kernel.
template <typename acc_t>
void gemm_nn_axpys(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                   acc_t* c, int64_t ldc) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  for (int64_t i = 0; i < m; ++i) {
    acc_t* ci = c + i * ldc;
    int64_t j = 0;
    for (; j + 4 * V <= n; j += 4 * V) {  // four independent accumulators hide the FMA latency
      Vec c0(acc_t(0)), c1(acc_t(0)), c2(acc_t(0)), c3(acc_t(0));
      for (int64_t p = 0; p < k; ++p) {
        const Vec x(a[i * lda + p]);
        const acc_t* bp = b + p * ldb + j;
        c0 = at::vec::fmadd(x, Vec::loadu(bp), c0);
        c1 = at::vec::fmadd(x, Vec::loadu(bp + V), c1);
        c2 = at::vec::fmadd(x, Vec::loadu(bp + 2 * V), c2);
        c3 = at::vec::fmadd(x, Vec::loadu(bp + 3 * V), c3);
      }
      (Vec::loadu(ci + j) + c0).store(ci + j);
      (Vec::loadu(ci + j + V) + c1).store(ci + j + V);
      (Vec::loadu(ci + j + 2 * V) + c2).store(ci + j + 2 * V);
      (Vec::loadu(ci + j + 3 * V) + c3).store(ci + j + 3 * V);
    }
    for (; j + V <= n; j += V) {
      Vec acc(acc_t(0));
      for (int64_t p = 0; p < k; ++p) acc = at::vec::fmadd(Vec(a[i * lda + p]), Vec::loadu(b + p * ldb + j), acc);
      (Vec::loadu(ci + j) + acc).store(ci + j);
    }
    for (; j < n; ++j) {
      acc_t d = 0;
      for (int64_t p = 0; p < k; ++p) d += a[i * lda + p] * b[p * ldb + j];
      ci[j] += d;
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace qkv
