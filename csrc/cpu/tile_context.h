#pragma once
// What the CPU attention kernels share: tile sizes, strided views of (B, H, seq, dim)
// tensors, row copies and TileContext (one call's scores, masks and dropout, tile by tile).
// Used by attention_cpu.cpp (forward, backward) and attention_weights_cpu.cpp (the explicit
// weights); the task scheduler is in task_scheduler.h.
#include "../attention_common.h"
#include "../kernels/dropout_hash.h"
#include "packed_gemm.h"
#include "task_scheduler.h"
#include "tile_math.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace qkv {
inline namespace CPU_CAPABILITY {

// Tile sizes, swept with the benchmark per instruction set.
#if defined(CPU_CAPABILITY_AVX512)
// On a Xeon with 2 MiB of L2 per core (thread CPU time, one thread, B1 H8 L2048 D64 against
// SDPA): forward 96 query rows x 512 keys (1.18x; 128 x 256: 1.15x), backward 96 x 256
// (1.10x fwd+bwd; 64 x 128: 1.07x). 96 rows are whole 12-row micro-kernel blocks.
constexpr int64_t kForwardQueryBlock = 96;
constexpr int64_t kForwardKeyBlock = 512;
constexpr int64_t kQueryBlock = 96;
constexpr int64_t kBackwardKeyBlock = 256;
#else
// On a Zen 3 (512 KiB L2 per core). Forward: a 128 x 256 score tile plus the packed K and V
// tiles stay in L2. Backward (and the weights op): 64 query rows x 128 keys keep the score,
// dP, dK and dV tiles in L2; taller or wider tiles measured slower.
constexpr int64_t kForwardQueryBlock = 128;
constexpr int64_t kForwardKeyBlock = 256;
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kBackwardKeyBlock = 128;
#endif
// Query tiles with fewer rows read K and V in place instead of packing them.
constexpr int64_t kMinRowsForPanels = 4;

template <typename T>
struct Strided4 {
  const T* data;
  int64_t s0, s1, s2, s3;
  explicit Strided4(const at::Tensor& t)
      : data(t.const_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  const T* at(int64_t b, int64_t h, int64_t i) const { return data + b * s0 + h * s1 + i * s2; }
};

template <typename T>
struct MutableStrided4 {
  T* data;
  int64_t s0, s1, s2, s3;
  explicit MutableStrided4(const at::Tensor& t)
      : data(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  T* at(int64_t b, int64_t h, int64_t i) const { return data + b * s0 + h * s1 + i * s2; }
};

// Whether `rows` x `cols` rows of `t` already are dense acc_t rows that tile_rows reads in place.
template <typename acc_t, typename scalar_t>
bool reads_rows_in_place(const Strided4<scalar_t>& t, int64_t rows, int64_t cols) {
  return std::is_same_v<acc_t, scalar_t> && t.s3 == 1 && (rows == 1 || (t.s2 >= cols && t.s2 <= INT_MAX));
}

// A dense row-major view of `rows` x `cols` elements starting at row i0 of slice (b, h):
// the tensor itself when it already is one in acc_t, else a packed copy in `scratch`.
template <typename acc_t, typename scalar_t>
const acc_t* tile_rows(const Strided4<scalar_t>& t, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t cols,
                       acc_t* scratch, int64_t& ld) {
  const scalar_t* src = t.at(b, h, i0);
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (reads_rows_in_place<acc_t>(t, rows, cols)) {
      ld = rows == 1 ? std::max<int64_t>(cols, 1) : t.s2;
      return src;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * t.s2;
    acc_t* d = scratch + r * cols;
    if (t.s3 == 1) {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c * t.s3]);
    }
  }
  ld = std::max<int64_t>(cols, 1);
  return scratch;
}

// Rows [i0, i0 + rows) of slice (b, h), times `factor`, as a dense acc_t copy (ld = cols).
template <typename acc_t, typename scalar_t>
void scaled_rows(const Strided4<scalar_t>& t, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t cols,
                 acc_t factor, acc_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = t.at(b, h, i0 + r);
    acc_t* d = dst + r * cols;
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c * t.s3]) * factor;
  }
}

template <typename scalar_t, typename acc_t>
void store_row(scalar_t* dst, int64_t stride, const acc_t* src, int64_t n, acc_t mul) {
  if (stride == 1) {
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<scalar_t>(src[c] * mul);
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c * stride] = static_cast<scalar_t>(src[c] * mul);
  }
}

// Everything the tile loops need to know about one call.
template <typename scalar_t>
struct TileContext {
  using acc_t = at::opmath_type<scalar_t>;
  const AttentionParams& p;
  Strided4<scalar_t> q, k, v;
  const scalar_t* bias_data = nullptr;  // expanded (B, H, L, S) strides, zeros on broadcast dims
  int64_t bias_s0 = 0, bias_s1 = 0, bias_s2 = 0, bias_s3 = 0;
  uint64_t keep_threshold = 0;
  // Scores are kept in log2 units, s = log2(e) * (scale * q . k + bias), so that the softmax
  // is 2^(s - max): the products are scaled by score_scale and the bias by kLog2e.
  static constexpr double kLog2eDouble = 1.4426950408889634;
  static constexpr acc_t kLog2e = acc_t(kLog2eDouble);
  acc_t score_scale = 0;

  TileContext(const AttentionParams& params, const at::Tensor& query, const at::Tensor& key,
              const at::Tensor& value, const std::optional<at::Tensor>& bias)
      : p(params), q(query), k(key), v(value) {
    if (p.has_bias) {
      at::Tensor e = expand_bias(*bias, p);
      bias_data = e.const_data_ptr<scalar_t>();
      bias_s0 = e.stride(0), bias_s1 = e.stride(1), bias_s2 = e.stride(2), bias_s3 = e.stride(3);
    }
    keep_threshold = dropout_threshold(p.dropout_p);
    score_scale = static_cast<acc_t>(p.scale * kLog2eDouble);  // rounded once
  }

  // One past the last key that any query row in [i0, i1) may see.
  int64_t key_end(int64_t i1) const {
    return p.is_causal ? std::clamp<int64_t>(i1 + p.causal_offset, 0, p.kv_len) : p.kv_len;
  }
  // First query row that can see key j0.
  int64_t first_query_seeing(int64_t j0) const {
    return p.is_causal ? std::clamp<int64_t>(j0 - p.causal_offset, 0, p.q_len) : 0;
  }
  // Keys [j0, j0 + visible) of this tile are visible to query i.
  int64_t visible_keys(int64_t i, int64_t j0, int64_t cols) const {
    return p.is_causal ? std::clamp<int64_t>(i + p.causal_offset - j0 + 1, 0, cols) : cols;
  }

  // Packs keys [j0, j0 + cols) transposed (head dim x keys), the operand of scores().
  Panels<acc_t> pack_keys_transposed(acc_t* dst, int64_t b, int64_t h, int64_t j0, int64_t cols) const {
    return pack_panels(k.at(b, h, j0), p.head_dim, cols, k.s3, k.s2, dst);
  }

  // The causal mask as the extent of a tile product whose rows are query rows i0 + r: block
  // [r0, r0 + mr) sees keys j0 + [0, seen) of the tile, seen being its last row's count. For
  // products with keys as columns (the scores, dP) and reducing over keys (PV, dS K).
  int64_t keys_seen_by_block(int64_t i0, int64_t j0, int64_t cols, int64_t r0, int64_t mr) const {
    return visible_keys(i0 + r0 + mr - 1, j0, cols);
  }
  auto visible_key_columns(int64_t i0, int64_t j0, int64_t cols) const {
    return [this, i0, j0, cols](int64_t r0, int64_t mr) {
      return RowBlockExtent{keys_seen_by_block(i0, j0, cols, r0, mr), 0, INT64_MAX};
    };
  }
  auto visible_key_depth(int64_t i0, int64_t j0, int64_t cols) const {
    return [this, i0, j0, cols](int64_t r0, int64_t mr) {
      return RowBlockExtent{INT64_MAX, 0, keys_seen_by_block(i0, j0, cols, r0, mr)};
    };
  }
  // For products whose rows are keys j0 + c and which reduce over query rows i0 + r (P^T dO,
  // dS^T Q): block [c0, c0 + mr) of keys is seen by query rows from first_query_seeing on.
  auto seeing_extent(int64_t i0, int64_t j0) const {
    return [this, i0, j0](int64_t c0, int64_t) {
      return RowBlockExtent{INT64_MAX, first_query_seeing(j0 + c0) - i0, INT64_MAX};
    };
  }

  // scores[r] = log2(e) * (scale * q_r . k + bias), -inf where causally hidden, and, unless
  // `row_max` is null, their row maxima; one of the operands already carries score_scale
  // (scaled queries or K^T). `k_panels` is K^T; ldo >= padded_to_panels(cols).
  void scores(acc_t* out, int64_t ldo, const acc_t* qt, int64_t ldq, Panels<acc_t> k_panels, int64_t b,
              int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols, acc_t* row_max = nullptr) const {
    if (bias_data == nullptr && visible_keys(i0, j0, cols) == cols) {
      // Nothing added, nothing hidden: the products are the scores. The micro-kernel takes
      // their maxima while they are in registers (measured slower where nobody needs them).
      if (row_max != nullptr) {
        gemm_packed_row_max<acc_t>(rows, cols, p.head_dim, qt, ldq, 1, k_panels, out, ldo, row_max);
      } else {
        gemm_packed<acc_t>(rows, cols, p.head_dim, qt, ldq, 1, k_panels, out, ldo, false);
      }
    } else {
      gemm_packed<acc_t>(rows, cols, p.head_dim, qt, ldq, 1, k_panels, out, ldo, false,
                         visible_key_columns(i0, j0, cols));
      finish_scores(out, ldo, b, h, i0, rows, j0, cols, row_max);
    }
  }

  // Turns products that already carry score_scale into scores (see scores()): adds the bias
  // (times log2(e)), hides masked keys; the row maxima go to `row_max` unless it is null.
  void finish_scores(acc_t* out, int64_t ldo, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                     int64_t cols, acc_t* row_max) const {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const scalar_t* brow =
          bias_data == nullptr ? nullptr : bias_data + b * bias_s0 + h * bias_s1 + i * bias_s2 + j0 * bias_s3;
      const acc_t m =
          scale_bias_mask_max(out + r * ldo, cols, visible_keys(i, j0, cols), acc_t(1), brow, bias_s3, kLog2e);
      if (row_max != nullptr) row_max[r] = m;
    }
  }

  // Applies the dropout mask and 1/(1-p) scaling to a row of probabilities in place.
  void dropout_row(acc_t* row, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols) const {
    const acc_t keep_scale = p.dropout_p < 1.0 ? acc_t(1.0 / (1.0 - p.dropout_p)) : acc_t(0);
    const uint64_t base = ((static_cast<uint64_t>(b) * p.heads + h) * p.q_len + i) * p.kv_len + j0;
    for (int64_t c = 0; c < cols; ++c) {
      row[c] = dropout_keep(p.dropout_seed, base + c, keep_threshold) ? row[c] * keep_scale : acc_t(0);
    }
  }

  // Turns a row of scores into probabilities 2^(s - log2(e) lse) = exp(natural score - lse)
  // (all zero when lse = -inf).
  static void probabilities_row(acc_t* s, int64_t cols, acc_t lse) {
    if (lse == -std::numeric_limits<acc_t>::infinity()) {
      std::fill(s, s + cols, acc_t(0));
    } else {
      exp2_and_sum(s, cols, lse * kLog2e);
    }
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace qkv
