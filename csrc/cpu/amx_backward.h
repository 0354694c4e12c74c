#pragma once
// The backward's five tile products on AMX (bfloat16 in, float32 out; amx_tiles.h), for the
// backward loop of attention_cpu.cpp when the active capability is amx:
//
//   S   = (Q scale) K^T    A: Q rows, scaled and rounded as the forward rounds them, so S and
//                          P are the forward's bit for bit
//   dP  = dO V^T           A: dO rows
//   dV^T += dO^T P'        A: dO^T per query block; B: P' (after dropout) rows paired
//   dK^T += Q^T dS         A: Q^T per query block; B: dS rows paired
//   dQ  (+)= dS K          A: dS rows; B: K paired, into a tile of its own (the tiles write whole
//                          16-row blocks; the caller adds its rows to dQ)
//
// An A operand must have the reduction contiguous in its rows, so P^T and dS^T would need a
// transpose per tile; the transposed products instead transpose dO and Q once per query block
// (reused by every key block) and their results once per key block (add_transposed_key_grads).
// The scores' pass, the softmax gradient, masks and dropout between them are the float32 code.
//
// Built in every copy (the backward loop names it in branches only the AVX-512 copy takes);
// the products themselves are AVX-512 only.
#include "amx_layout.h"
#include "amx_tiles.h"
#include "tile_context.h"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace qkv {
inline namespace CPU_CAPABILITY {

struct AmxBackwardSpace {
  static constexpr int64_t QB = kQueryBlock, BK = kBackwardKeyBlock;
  static constexpr int64_t kRows = amx::kTileRows, kDepth = amx::kTileDepth;
  static constexpr int64_t up(int64_t n, int64_t m) { return amx::round_up(n, m); }
  static constexpr int64_t vnni(int64_t k, int64_t n) { return amx::vnni_size(k, n); }

  int64_t D, Dv, L_padded, ld_q16, ld_do16, D16, Dv16;
  AmxBackwardSpace(int64_t D_, int64_t Dv_, int64_t L_padded_)
      : D(D_), Dv(Dv_), L_padded(L_padded_), ld_q16(up(D, kDepth)), ld_do16(up(Dv, kDepth)), D16(up(D, kRows)),
        Dv16(up(Dv, kRows)) {}

  struct Views {
    uint16_t *q16, *do16, *qt16, *dot16;      // per slice (L_padded rows)
    uint16_t *kt_vnni, *vt_vnni, *k_vnni;     // per key block
    uint16_t *p16, *ds16, *p_vnni, *ds_vnni;  // per tile
    float *dkt, *dvt, *dq_tile, *transpose_scratch;
    int64_t ld_dq;  // dq_tile's row stride
  };
  int64_t bf16_size() const {
    return L_padded * (ld_q16 + ld_do16 + D16 + Dv16) + vnni(D, BK) + vnni(Dv, BK) + vnni(BK, D) + 2 * QB * BK +
           2 * vnni(QB, BK);
  }
  // The transposes' float32 scratch: Q^T or dO^T of a query block (up to wide16() x QB), or a
  // key block's dK or dV (BK x wide16()).
  int64_t wide16() const { return std::max(D16, Dv16); }
  int64_t float_size(int64_t ld_dq) const { return (D16 + Dv16) * BK + QB * ld_dq + wide16() * std::max(QB, BK); }
  Views views(uint16_t* h, float* f, int64_t ld_dq) const {
    Views v{};
    v.ld_dq = ld_dq;
    v.q16 = h;
    v.do16 = v.q16 + L_padded * ld_q16;
    v.qt16 = v.do16 + L_padded * ld_do16;
    v.dot16 = v.qt16 + L_padded * D16;
    v.kt_vnni = v.dot16 + L_padded * Dv16;
    v.vt_vnni = v.kt_vnni + vnni(D, BK);
    v.k_vnni = v.vt_vnni + vnni(Dv, BK);
    v.p16 = v.k_vnni + vnni(BK, D);
    v.ds16 = v.p16 + QB * BK;
    v.p_vnni = v.ds16 + QB * BK;
    v.ds_vnni = v.p_vnni + vnni(QB, BK);
    v.dkt = f;
    v.dvt = v.dkt + D16 * BK;
    v.dq_tile = v.dvt + Dv16 * BK;
    v.transpose_scratch = v.dq_tile + QB * ld_dq;
    return v;
  }

#if defined(CPU_CAPABILITY_AVX512)
  static_assert(QB % (2 * amx::kTileRows) == 0 && BK % amx::kTileDepth == 0, "AMX blocks of whole tiles");

  // dst (cols x rows, row stride ldd) = src^T (rows x cols, row stride lds; float32), in 8 x 8
  // blocks in registers, the edges element by element.
  static void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
    const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
    for (int64_t r = 0; r < r8; r += 8) {
      for (int64_t c = 0; c < c8; c += 8) detail::transpose_8x8(src + r * lds + c, lds, dst + c * ldd + r, ldd);
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = r < r8 ? c8 : 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
    }
  }

  // Query block [i0, i0 + rows) of the slice: Q times `scale` and dO as bfloat16 rows (for S and
  // dP; rows to the next 16 and columns to the next 32 zero), and Q^T and dO^T (D x QB, Dv x QB:
  // for dK^T and dV^T; columns past `rows` and rows past D zero). `t` is D16 x QB float32 scratch
  // (the transposes go through float32: the 8 x 8 register transpose, then vector rounding).
  void pack_query_block(const Views& v, int64_t i0, int64_t rows, const float* q, int64_t ldq, const float* dout,
                        int64_t ldo, float scale) const {
    const int64_t rows16 = up(rows, kRows);
    for (int64_t r = 0; r < rows16; ++r) {
      amx::bf16_row(q + r * ldq, 0, r < rows ? D : 0, ld_q16, scale, v.q16 + (i0 + r) * ld_q16);
      amx::bf16_row(dout + r * ldo, 0, r < rows ? Dv : 0, ld_do16, 1.0f, v.do16 + (i0 + r) * ld_do16);
    }
    const auto transposed = [&](const float* src, int64_t ld, int64_t width, int64_t width16, uint16_t* dst) {
      transpose(src, ld, rows, width, v.transpose_scratch, QB);
      for (int64_t d = 0; d < width16; ++d) {
        amx::bf16_row(v.transpose_scratch + d * QB, 0, d < width ? rows : 0, QB, 1.0f, dst + d * QB);
      }
    };
    transposed(q, ldq, D, D16, v.qt16 + (i0 / QB) * D16 * QB);
    transposed(dout, ldo, Dv, Dv16, v.dot16 + (i0 / QB) * Dv16 * QB);
  }

  // dk_acc[c][d] += dK^T[d][c], dv_acc likewise, for the key block's `cols` keys.
  void add_transposed_key_grads(const Views& v, int64_t cols, float* dk_acc, int64_t ld_dk, float* dv_acc,
                                int64_t ld_dv) const {
    const auto add = [&](const float* grad_t, int64_t width, float* acc, int64_t ld) {
      transpose(grad_t, BK, width, cols, v.transpose_scratch, wide16());
      for (int64_t c = 0; c < cols; ++c) {
        float* row = acc + c * ld;
        const float* t = v.transpose_scratch + c * wide16();
        for (int64_t d = 0; d < width; ++d) row[d] += t[d];
      }
    };
    add(v.dkt, D, dk_acc, ld_dk);
    add(v.dvt, Dv, dv_acc, ld_dv);
  }

  // Key block [j0, j0 + cols): K^T and V^T as the B of S and dP, K as the B of dQ; dK^T and dV^T
  // zeroed.
  void pack_key_block(const Views& v, const at::BFloat16* k, int64_t ks_key, int64_t ks_dim, const at::BFloat16* val,
                      int64_t vs_key, int64_t vs_dim, int64_t cols) const {
    amx::pack_vnni(k, D, cols, ks_dim, ks_key, ld_q16, v.kt_vnni);
    amx::pack_vnni(val, Dv, cols, vs_dim, vs_key, ld_do16, v.vt_vnni);
    amx::pack_vnni(k, cols, D, ks_key, ks_dim, BK, v.k_vnni);
    std::fill(v.dkt, v.dkt + (D16 + Dv16) * BK, 0.0f);
  }

  enum Product { kScores, kProbabilityGrad };
  // S or dP of the tile (rows x cols at c, row stride ldc), over the keys each 32-row block sees
  // (`visible_keys`: tile_context.h's visible_key_columns).
  template <typename Tiles, typename VisibleKeys>
  void products(const Views& v, Product which, int64_t i0, int64_t rows, int64_t cols, float* c, int64_t ldc,
                bool accumulate, const VisibleKeys& visible_keys) const {
    const bool scores = which == kScores;
    const int64_t k = scores ? ld_q16 : ld_do16;
    const uint16_t* a = scores ? v.q16 + i0 * ld_q16 : v.do16 + i0 * ld_do16;
    amx::gemm<Tiles>(up(rows, kRows), up(cols, kRows), k, a, k, scores ? v.kt_vnni : v.vt_vnni, c, ldc, accumulate,
                     [&](int64_t r0, int64_t mr) {
                       const RowBlockExtent e = visible_keys(r0, std::min(mr, rows - r0));
                       return amx::TileExtent{e.cols_begin, e.cols, 0, INT64_MAX};
                     });
  }

  // P' and dS rounded to bfloat16 as the gradient products' operands (any case): dS rows (the A
  // of dQ), then P' and dS paired by pack_vnni (the B of dV^T and dK^T). st and dpt hold P' and
  // dS (rows x cols, row stride ld; zero at each row's hidden keys).
  void pack_gradient_operands(const Views& v, int64_t rows, int64_t cols, const float* st, const float* dpt,
                              int64_t ld) const {
    const int64_t rows32 = up(rows, 2 * kRows);
    for (int64_t r = 0; r < rows32; ++r) {
      amx::bf16_row(st + r * ld, 0, r < rows ? cols : 0, BK, 1.0f, v.p16 + r * BK);
      amx::bf16_row(dpt + r * ld, 0, r < rows ? cols : 0, BK, 1.0f, v.ds16 + r * BK);
    }
    const auto* p16 = reinterpret_cast<const at::BFloat16*>(v.p16);
    const auto* ds16 = reinterpret_cast<const at::BFloat16*>(v.ds16);
    amx::pack_vnni(p16, rows32, cols, BK, 1, rows32, v.p_vnni);
    amx::pack_vnni(ds16, rows32, cols, BK, 1, rows32, v.ds_vnni);
  }

  // How round_gradient_operands makes row r's P from its scores: probabilities_row's operations,
  // 2^((s - shift) * mul) times `normalizer`, or zero (`none`: the row's logsumexp is -inf).
  struct ProbabilityRow {
    float shift = 0, normalizer = 1;
    bool none = true;
  };

  // The common case (no dropout, no bias or softcap gradient, no row sums: P' = P, and dS goes
  // to nothing but the products) in one pass over the scores and dP instead of four per tile
  // (probabilities_row, softmax_grad_row, and pack_gradient_operands' rounding and packing): per
  // pair of rows (r, r + 1) and 16 columns, P = 2^((S - shift) * mul) (times the normalizer)
  // and dS = P * (dP - delta) in registers, in the operations of probabilities_row and
  // softmax_grad_row, then P and dS rounded (amx::round_bf16_high) straight into the two rows'
  // pair row of p_vnni and ds_vnni (one blend each) and dS's rows. `scores` and `dp` are rows x cols, row
  // stride ld; span(r) is row r's visible keys [begin, end). Everything outside the spans is
  // zero: hidden keys, columns past cols, rows past `rows` (to the next 32), dS's columns to BK.
  template <typename Span>
  void round_gradient_operands(const Views& v, int64_t rows, int64_t cols, const float* scores, const float* dp,
                               int64_t ld, const ProbabilityRow* prob_rows, float mul, const float* delta,
                               const Span& span) const {
    if (bf16_native_rounding()) {  // VCVTNEPS2BF16 (amx_tiles.h's round_bf16)
      round_gradient_operands_with<true>(v, rows, cols, scores, dp, ld, prob_rows, mul, delta, span);
    } else {
      round_gradient_operands_with<false>(v, rows, cols, scores, dp, ld, prob_rows, mul, delta, span);
    }
  }
  template <bool kNative, typename Span>
  void round_gradient_operands_with(const Views& v, int64_t rows, int64_t cols, const float* scores,
                                    const float* dp, int64_t ld, const ProbabilityRow* prob_rows, float mul,
                                    const float* delta, const Span& span) const {
    using R = Simd<float>;
    const int64_t rows32 = up(rows, 2 * kRows), cols16 = up(cols, kRows), depth_tiles = rows32 / kDepth;
    const bool scaled = mul != 1.0f;  // as exp2_and_sum: natural units only
    const __m512 vmul = _mm512_set1_ps(mul);
    const auto lanes = [](int64_t begin, int64_t end) {  // lanes [begin, end) of 16, clamped
      const int64_t b = std::clamp<int64_t>(begin, 0, 16), e = std::clamp<int64_t>(end, 0, 16);
      return static_cast<__mmask16>(e > b ? ((1u << e) - 1) & ~((1u << b) - 1) : 0);
    };
    for (int64_t r = 0; r < rows32; r += 2) {
      int64_t begin[2] = {0, 0}, end[2] = {0, 0};
      ProbabilityRow row[2];
      __m512 d[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int t = 0; t < 2; ++t) {
        if (r + t < rows) {
          std::tie(begin[t], end[t]) = span(r + t);
          row[t] = prob_rows[r + t];
          d[t] = _mm512_set1_ps(delta[r + t]);
        }
      }
      const int64_t pair_row = (r / kDepth) * amx::kTileElems + (r % kDepth) / 2 * (2 * amx::kTileCols);
      for (int64_t c0 = 0; c0 < cols16; c0 += kRows) {
        __m512i p_high[2], ds_high[2];  // bfloat16 in the high half of each lane (amx::round_bf16_high)
        for (int t = 0; t < 2; ++t) {
          const bool whole = begin[t] <= c0 && c0 + kRows <= end[t];
          const __mmask16 m = whole ? __mmask16(0xffff) : lanes(begin[t] - c0, end[t] - c0);
          __m512 p = _mm512_setzero_ps();
          if (m != 0 && !row[t].none) {
            const __m512 s = _mm512_maskz_loadu_ps(m, scores + (r + t) * ld + c0);
            __m512 x = _mm512_sub_ps(s, _mm512_set1_ps(row[t].shift));
            if (scaled) x = _mm512_mul_ps(x, vmul);
            p = R::exp2_nonpositive(x);
            if (row[t].normalizer != 1.0f) p = _mm512_mul_ps(p, _mm512_set1_ps(row[t].normalizer));
            p = _mm512_maskz_mov_ps(m, p);
          }
          const __m512 dp_c = _mm512_maskz_loadu_ps(m, dp + (r + t) * ld + c0);
          const __m512 ds = _mm512_maskz_mul_ps(m, p, _mm512_sub_ps(dp_c, d[t]));
          p_high[t] = amx::round_bf16_high<kNative>(p);
          ds_high[t] = amx::round_bf16_high<kNative>(ds);
        }
        // The pair words: row r's bfloat16 in the low half, row r + 1's in the high half.
        const auto pair = [](__m512i even_high, __m512i odd_high) {
          return _mm512_mask_blend_epi16(0xAAAAAAAA, _mm512_srli_epi32(even_high, 16), odd_high);
        };
        const int64_t tile = (c0 / kRows) * depth_tiles * amx::kTileElems + pair_row;
        const __m512i ds_pairs = pair(ds_high[0], ds_high[1]);
        _mm512_storeu_si512(v.p_vnni + tile, pair(p_high[0], p_high[1]));
        _mm512_storeu_si512(v.ds_vnni + tile, ds_pairs);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(v.ds16 + r * BK + c0), _mm512_cvtepi32_epi16(ds_pairs));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(v.ds16 + (r + 1) * BK + c0),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(ds_pairs, 16)));
      }
      for (int t = 0; t < 2; ++t) std::fill(v.ds16 + (r + t) * BK + cols16, v.ds16 + (r + t) * BK + BK, uint16_t(0));
    }
  }

  // From the packed operands (pack_gradient_operands or round_gradient_operands): dV^T += dO^T P',
  // dK^T += Q^T dS, and dS K into dq_tile (its rows; `dq_extent` limits each 32-row block's keys).
  template <typename Tiles, typename DqExtent>
  void gradient_products(const Views& v, int64_t i0, int64_t rows, int64_t cols, const DqExtent& dq_extent) const {
    const int64_t rows32 = up(rows, 2 * kRows), cols16 = up(cols, kRows);
    const int64_t block = i0 / QB;
    amx::gemm<Tiles>(Dv16, cols16, rows32, v.dot16 + block * Dv16 * QB, QB, v.p_vnni, v.dvt, BK, true);
    amx::gemm<Tiles>(D16, cols16, rows32, v.qt16 + block * D16 * QB, QB, v.ds_vnni, v.dkt, BK, true);
    amx::gemm<Tiles>(up(rows, kRows), D16, BK, v.ds16, BK, v.k_vnni, v.dq_tile, v.ld_dq, false, dq_extent);
  }
#endif
};

}  // namespace CPU_CAPABILITY
}  // namespace qkv
