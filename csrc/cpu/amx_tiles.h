#pragma once
// AMX tile products for bfloat16 (Intel Sapphire Rapids and later): C (float32) = A . B with
// A bfloat16 rows read in place and B packed into VNNI tiles, summed in float32 by TDPBF16PS.
// Part of the AVX-512 copy of the kernels: the forward takes these products for bfloat16 when
// the active capability is `amx` (cpu_capability.h), and the AVX-512 micro-kernels otherwise.
//
// The tile registers are the same eight for every product: C in tmm0-3 (a 2 x 2 block of
// 16 x 16 float32), A in tmm4-5 (16 rows x 32 bfloat16), B in tmm6-7 (16 pair rows x 16
// columns). Every tile is configured 16 rows x 64 bytes; operands are padded to whole tiles
// (rows and columns to 16, the reduction to 32) with zeros, so no tile ever needs a smaller shape.
//
// Two implementations of the five tile instructions: `AmxHardware` (inline assembly, with a
// memory clobber on every load and store: GCC's _tile_loadd has none, and the compiler could
// move the stores of a packed operand past it), and `AmxEmulated`, the same instructions in C++
// on an in-memory register file. The emulation runs this file's packing, blocking and padding,
// and the forward around it, on any AVX-512 CPU (tests/test_cpu_amx.py), so that CI machines
// without AMX check everything but the five instructions.
#include "amx_layout.h"
#include "cpu_capability.h"
#include "simd.h"
#include "tile_math.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

namespace qkv {
inline namespace CPU_CAPABILITY {
namespace amx {

// The tile shapes, round_up and vnni_size: amx_layout.h.

// float32 -> bfloat16, round to nearest even (what vcvtneps2bf16 does), NaN kept a quiet NaN.
// AVX-512F/BW only, so the emulation runs on any AVX-512 CPU. to_bf16_high leaves each bfloat16
// in the high half of its 32-bit lane (the low half is garbage): two rows of them pair up into
// VNNI words with one blend.
inline __m512i to_bf16_high(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x00400000));
}
inline __m256i to_bf16(__m512 x) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(to_bf16_high(x), 16)); }

// The same rounding in one instruction, VCVTNEPS2BF16 (AVX512-BF16; flushes float32 denormals to
// zero). Inline assembly, so that it inlines into code built without -mavx512bf16: only CPUs
// with AVX512-BF16 run it (bf16_native_rounding()).
inline __m256i to_bf16_native(__m512 x) {
  __m256i r;
  asm("vcvtneps2bf16 %1, %0" : "=v"(r) : "v"(x));
  return r;
}

template <bool kNative>
QKV_ALWAYS_INLINE __m256i round_bf16(__m512 x) {
  if constexpr (kNative) {
    return to_bf16_native(x);
  } else {
    return to_bf16(x);
  }
}

// round_bf16 with each bfloat16 in the high half of its 32-bit lane (to_bf16_high's layout; the
// low half zero or garbage).
template <bool kNative>
QKV_ALWAYS_INLINE __m512i round_bf16_high(__m512 x) {
  if constexpr (kNative) {
    return _mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_native(x)), 16);
  } else {
    return to_bf16_high(x);
  }
}

namespace detail {
template <bool kNative>
inline void bf16_row_with(const float* src, int64_t begin, int64_t end, int64_t width, float mul, uint16_t* dst) {
  const __m512 m = _mm512_set1_ps(mul);
  std::fill(dst, dst + std::min(begin, width), uint16_t(0));
  int64_t c = begin;
  for (; c + 16 <= end; c += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                        round_bf16<kNative>(_mm512_mul_ps(_mm512_loadu_ps(src + c), m)));
  }
  if (c < end) {
    const __mmask16 k = static_cast<__mmask16>((1u << (end - c)) - 1);
    _mm256_mask_storeu_epi16(dst + c, k, round_bf16<kNative>(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, src + c), m)));
    c = end;
  }
  std::fill(dst + std::max<int64_t>(c, begin), dst + width, uint16_t(0));
}

template <bool kNative>
struct RoundedStore {  // a sink of exp2_and_sum_into: the results rounded to bfloat16 at dst
  uint16_t* dst;
  QKV_ALWAYS_INLINE void operator()(int64_t i, __m512 e) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), round_bf16<kNative>(e));
  }
  QKV_ALWAYS_INLINE void operator()(int64_t i, int64_t n, __m512 e) const {
    _mm256_mask_storeu_epi16(dst + i, static_cast<__mmask16>((1u << n) - 1), round_bf16<kNative>(e));
  }
};

template <bool kNative>
inline float exp2_sum_bf16_row_with(const float* x, int64_t begin, int64_t end, int64_t width, float shift, float mul,
                                    uint16_t* dst) {
  std::fill(dst, dst + std::min(begin, width), uint16_t(0));
  const float sum =
      begin < end ? qkv::CPU_CAPABILITY::detail::exp2_and_sum_into(x + begin, end - begin, shift, mul, RoundedStore<kNative>{dst + begin}) : 0.f;
  std::fill(dst + std::max(end, begin), dst + width, uint16_t(0));
  return sum;
}
}  // namespace detail

// dst[c] = bf16(src[c] * mul) for c in [begin, end), 0 elsewhere in [0, width): a row of an A
// operand, zero where the product must see nothing (masked keys, padding).
inline void bf16_row(const float* src, int64_t begin, int64_t end, int64_t width, float mul, uint16_t* dst) {
  if (bf16_native_rounding()) {
    detail::bf16_row_with<true>(src, begin, end, width, mul, dst);
  } else {
    detail::bf16_row_with<false>(src, begin, end, width, mul, dst);
  }
}

// dst[c] = bf16(2^((x[c] - shift) * mul)) for c in [begin, end), 0 elsewhere in [0, width);
// returns the float32 sum of the unrounded values. The forward's probabilities as P V's A
// operand in one pass: exp2_and_sum's arithmetic and sum (the same bits), then bf16_row's
// rounding, without the float32 row between them.
inline float exp2_sum_bf16_row(const float* x, int64_t begin, int64_t end, int64_t width, float shift, float mul,
                               uint16_t* dst) {
  return bf16_native_rounding() ? detail::exp2_sum_bf16_row_with<true>(x, begin, end, width, shift, mul, dst)
                                : detail::exp2_sum_bf16_row_with<false>(x, begin, end, width, shift, mul, dst);
}

namespace detail {

// One VNNI tile of B with unit stride along the reduction (K^T: p is the head dim of a key row):
// pair row r is the 32-bit word at p = p0 + 2 r of each of the 16 columns' rows, one gather per
// row. Columns [0, w) are real; pairs past k come from pack_pair_rows_scalar.
inline void pack_tile_pairs_gathered(const uint16_t* src, int64_t p0, int64_t k, int64_t w, int64_t sj,
                                     uint16_t* tile) {
  const __m512i index = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(sj)));
  const __mmask16 columns = static_cast<__mmask16>(w >= 16 ? 0xffff : (1u << w) - 1);
  for (int64_t r = 0; r < kTileRows; ++r) {
    const int64_t p = p0 + 2 * r;
    __m512i row = _mm512_setzero_si512();
    if (p + 1 < k) {
      row = _mm512_mask_i32gather_epi32(row, columns, index, src + p, 2);
    } else if (p < k) {  // the last row of an odd k: its pair's second half is past the row
      alignas(64) uint16_t half[32] = {};
      for (int64_t c = 0; c < w; ++c) half[2 * c] = src[p + c * sj];
      row = _mm512_load_si512(half);
    }
    _mm512_storeu_si512(tile + r * 32, row);
  }
}

// One VNNI tile of B with unit stride along the columns (V: j is the head dim of a value row):
// pair row r interleaves the 16 columns of rows p0 + 2 r and p0 + 2 r + 1.
inline void pack_tile_rows_interleaved(const uint16_t* src, int64_t p0, int64_t k, int64_t w, int64_t sp,
                                       uint16_t* tile) {
  const __mmask16 columns = static_cast<__mmask16>(w >= 16 ? 0xffff : (1u << w) - 1);
  for (int64_t r = 0; r < kTileRows; ++r) {
    const int64_t p = p0 + 2 * r;
    const __m256i even = p < k ? _mm256_maskz_loadu_epi16(columns, src + p * sp) : _mm256_setzero_si256();
    const __m256i odd = p + 1 < k ? _mm256_maskz_loadu_epi16(columns, src + (p + 1) * sp) : _mm256_setzero_si256();
    const __m256i lo = _mm256_unpacklo_epi16(even, odd), hi = _mm256_unpackhi_epi16(even, odd);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * 32), _mm256_permute2x128_si256(lo, hi, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * 32 + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
  }
}

}  // namespace detail

// Packs B (k x n), element (p, j) at src[p * sp + j * sj], into VNNI tiles: tile (jt, pt) (16
// columns, 32 rows of the reduction) at dst + (jt * depth_tiles + pt) * kTileElems, its pair
// row r holding B(32 pt + 2 r, 16 jt + c) and B(32 pt + 2 r + 1, 16 jt + c) side by side for
// c = 0..15. The tiles span `depth` rows (k <= depth, a multiple of 32: the k of the products
// that use them); rows k.. and columns n.. of the last tiles are zero. Unit strides (K^T from
// key rows, V from value rows) take vector paths; any other layout is copied element by element.
inline void pack_vnni(const at::BFloat16* source, int64_t k, int64_t n, int64_t sp, int64_t sj, int64_t depth,
                      uint16_t* dst) {
  const uint16_t* src = reinterpret_cast<const uint16_t*>(source);
  const int64_t depth_tiles = depth / kTileDepth;
  const int64_t col_tiles = round_up(std::max<int64_t>(n, 1), kTileCols) / kTileCols;
  const bool gathered = sp == 1 && sj >= 0 && 15 * sj <= INT32_MAX;
  for (int64_t jt = 0; jt < col_tiles; ++jt) {
    const int64_t j0 = jt * kTileCols, w = std::clamp<int64_t>(n - j0, 0, kTileCols);
    for (int64_t pt = 0; pt < depth_tiles; ++pt) {
      uint16_t* tile = dst + (jt * depth_tiles + pt) * kTileElems;
      const int64_t p0 = pt * kTileDepth;
      if (gathered) {
        detail::pack_tile_pairs_gathered(src + j0 * sj, p0, k, w, sj, tile);
      } else if (sj == 1) {
        detail::pack_tile_rows_interleaved(src + j0, p0, k, w, sp, tile);
      } else {
        for (int64_t r = 0; r < kTileRows; ++r) {
          for (int64_t c = 0; c < kTileCols; ++c) {
            for (int64_t t = 0; t < 2; ++t) {
              const int64_t p = p0 + 2 * r + t;
              tile[r * 32 + 2 * c + t] = (p < k && c < w) ? src[p * sp + (j0 + c) * sj] : uint16_t(0);
            }
          }
        }
      }
    }
  }
}

// Every tile 16 rows x 64 bytes (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = 16;
    }
  }
};

struct AmxHardware {
  static void configure() {
    static const TileConfig config;
    asm volatile("ldtilecfg %0" ::"m"(config) : "memory");
  }
  static void release() { asm volatile("tilerelease" ::: "memory"); }
  template <int T>
  static void load(const void* p, int64_t stride) {
    asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(T) : "memory");
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(p), "r"(stride), "i"(T) : "memory");
  }
  template <int T>
  static void zero() {
    asm volatile("tilezero %%tmm%c0" ::"i"(T));
  }
  template <int C, int A, int B>
  static void dot() {  // C += A . B (TDPBF16PS)
    asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
};

// The same five instructions on a per-thread register file in memory. TDPBF16PS as Intel's
// pseudo-code has it: for each row m, column n and pair k, two float32 products added in turn.
// (The hardware also flushes bfloat16 denormal inputs and float32 denormal results to zero;
// attention's tests do not depend on it.)
struct AmxEmulated {
  struct alignas(64) Tile {
    unsigned char bytes[16][64];
  };
  static Tile* registers() {
    thread_local Tile file[8];
    return file;
  }
  static void configure() {}
  static void release() {}
  template <int T>
  static void load(const void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(registers()[T].bytes[r], static_cast<const char*>(p) + r * stride, 64);
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(static_cast<char*>(p) + r * stride, registers()[T].bytes[r], 64);
  }
  template <int T>
  static void zero() {
    std::memset(registers()[T].bytes, 0, sizeof(Tile));
  }
  static float widen(const unsigned char* bf16) {
    uint16_t h;
    std::memcpy(&h, bf16, 2);
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  template <int C, int A, int B>
  static void dot() {
    Tile& c = registers()[C];
    const Tile& a = registers()[A];
    const Tile& b = registers()[B];
    for (int m = 0; m < 16; ++m) {
      float row[16];
      std::memcpy(row, c.bytes[m], 64);
      for (int k = 0; k < 16; ++k) {
        for (int n = 0; n < 16; ++n) {
          row[n] += widen(a.bytes[m] + 4 * k) * widen(b.bytes[k] + 4 * n);
          row[n] += widen(a.bytes[m] + 4 * k + 2) * widen(b.bytes[k] + 4 * n + 2);
        }
      }
      std::memcpy(c.bytes[m], row, 64);
    }
  }
};

// One block of MI x NJ C tiles (MI, NJ in {1, 2}): C[16 MI x 16 NJ] (+)= A[16 MI x 32 pts] .
// B[32 pts x 16 NJ] over reduction tiles [pt_begin, pt_end).
template <typename Tiles, int MI, int NJ>
inline void block(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t depth_tiles, int64_t pt_begin,
                  int64_t pt_end, float* c, int64_t ldc, bool accumulate) {
  const int64_t a_stride = lda * 2, c_stride = ldc * 4, b_next = depth_tiles * kTileElems;
  if (accumulate) {
    Tiles::template load<0>(c, c_stride);
    if constexpr (NJ == 2) Tiles::template load<1>(c + kTileCols, c_stride);
    if constexpr (MI == 2) Tiles::template load<2>(c + kTileRows * ldc, c_stride);
    if constexpr (MI == 2 && NJ == 2) Tiles::template load<3>(c + kTileRows * ldc + kTileCols, c_stride);
  } else {
    Tiles::template zero<0>();
    if constexpr (NJ == 2) Tiles::template zero<1>();
    if constexpr (MI == 2) Tiles::template zero<2>();
    if constexpr (MI == 2 && NJ == 2) Tiles::template zero<3>();
  }
  for (int64_t pt = pt_begin; pt < pt_end; ++pt) {
    Tiles::template load<4>(a + pt * kTileDepth, a_stride);
    if constexpr (MI == 2) Tiles::template load<5>(a + kTileRows * lda + pt * kTileDepth, a_stride);
    Tiles::template load<6>(b + pt * kTileElems, 64);
    if constexpr (NJ == 2) Tiles::template load<7>(b + b_next + pt * kTileElems, 64);
    Tiles::template dot<0, 4, 6>();
    if constexpr (NJ == 2) Tiles::template dot<1, 4, 7>();
    if constexpr (MI == 2) Tiles::template dot<2, 5, 6>();
    if constexpr (MI == 2 && NJ == 2) Tiles::template dot<3, 5, 7>();
  }
  Tiles::template store<0>(c, c_stride);
  if constexpr (NJ == 2) Tiles::template store<1>(c + kTileCols, c_stride);
  if constexpr (MI == 2) Tiles::template store<2>(c + kTileRows * ldc, c_stride);
  if constexpr (MI == 2 && NJ == 2) Tiles::template store<3>(c + kTileRows * ldc + kTileCols, c_stride);
}

template <typename Tiles, int MI>
inline void block_row(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t depth_tiles, int64_t pt_begin,
                      int64_t pt_end, float* c, int64_t ldc, bool accumulate, int64_t col_tile_begin,
                      int64_t col_tile_end) {
  int64_t jt = col_tile_begin;
  for (; jt + 2 <= col_tile_end; jt += 2) {
    block<Tiles, MI, 2>(a, lda, b + jt * depth_tiles * kTileElems, depth_tiles, pt_begin, pt_end,
                        c + jt * kTileCols, ldc, accumulate);
  }
  if (jt < col_tile_end) {
    block<Tiles, MI, 1>(a, lda, b + jt * depth_tiles * kTileElems, depth_tiles, pt_begin, pt_end,
                        c + jt * kTileCols, ldc, accumulate);
  }
}

// What a block of 32 rows [i0, i0 + 32) of C needs (see packed_gemm.h's RowBlockExtent): its
// columns [cols_begin, cols) and reduction [depth_begin, depth_end), widened to whole tiles.
struct TileExtent {
  int64_t cols_begin, cols, depth_begin, depth_end;
};
struct WholeTiles {
  TileExtent operator()(int64_t, int64_t) const { return {0, INT64_MAX, 0, INT64_MAX}; }
};

// C (m x n, float32, row stride ldc) = A (m x k bfloat16, row stride lda) . B (packed by
// pack_vnni with k rows, n columns), plus C when `accumulate`. Shapes are whole tiles: m and n
// multiples of 16, k of 32, and A's padding columns zero. C's columns and reduction outside a
// block's extent_of(i0, rows) are skipped (unwritten columns; a reduction whose skipped part
// the caller knows to be zero).
template <typename Tiles, typename ExtentOf = WholeTiles>
void gemm(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint16_t* b, float* c,
          int64_t ldc, bool accumulate, const ExtentOf& extent_of = {}) {
  const int64_t depth_tiles = k / kTileDepth, col_tiles = n / kTileCols;
  for (int64_t i0 = 0; i0 < m; i0 += 2 * kTileRows) {
    const int64_t rows = std::min<int64_t>(2 * kTileRows, m - i0);
    const TileExtent e = extent_of(i0, rows);
    const int64_t jt0 = std::clamp<int64_t>(e.cols_begin, 0, n) / kTileCols;
    const int64_t jt1 = (std::clamp<int64_t>(e.cols, 0, n) + kTileCols - 1) / kTileCols;
    const int64_t pt0 = std::clamp<int64_t>(e.depth_begin, 0, k) / kTileDepth;
    const int64_t pt1 = std::max(pt0, (std::clamp<int64_t>(e.depth_end, 0, k) + kTileDepth - 1) / kTileDepth);
    if (accumulate && pt0 == pt1) continue;
    const int64_t jt_end = std::min(jt1, col_tiles);
    if (rows == 2 * kTileRows) {
      block_row<Tiles, 2>(a + i0 * lda, lda, b, depth_tiles, pt0, pt1, c + i0 * ldc, ldc, accumulate, jt0, jt_end);
    } else {
      block_row<Tiles, 1>(a + i0 * lda, lda, b, depth_tiles, pt0, pt1, c + i0 * ldc, ldc, accumulate, jt0, jt_end);
    }
  }
}

}  // namespace amx
}  // namespace CPU_CAPABILITY
}  // namespace qkv
#endif  // CPU_CAPABILITY_AVX512
