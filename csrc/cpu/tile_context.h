#pragma once
// What the CPU attention kernels share: tile sizes, strided views of (B, H, seq, dim)
// tensors, row copies and TileContext (one call's scores, masks and dropout, tile by tile).
// Used by attention_cpu.cpp (forward, backward) and attention_weights_cpu.cpp (the explicit
// weights); the task scheduler is in task_scheduler.h.
#include "../attention_common.h"
#include "../kernels/dropout_hash.h"
#include "compensated_sum.h"
#include "packed_gemm.h"
#include "score_transforms.h"
#include "sequences.h"
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
// The forward sums P V over this many key tiles (2048 keys with 256-key tiles, 4096 with
// AVX-512's 512) in a plain partial, then adds the
// partial to the output rows with compensation (compensated_sum.h): accurate for any key count,
// at the cost of one pass over the rows per partial.
constexpr int64_t kForwardTilesPerPartial = 8;

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

// Asks for rows [i0, i0 + rows) of slice (b, h) ahead of use (`for_write`: rows about to be
// stored). A row of a head in a (B, L, H, D) tensor shares its 4 KiB page with at most a few
// rows of the same head, so the hardware prefetcher, which stays within a page, does not fetch
// the next rows. Under a narrow window a query block's compute is short, and perf put the loads
// of its Q rows and the stores of its O rows among the hottest instructions of the forward (B1
// L8192 H8 D64, window 256); prefetching one block ahead measured 3% faster there.
template <typename T>
void prefetch_rows(const T* first, int64_t row_stride, int64_t rows, int64_t cols, int64_t col_stride,
                   bool for_write) {
  const int64_t bytes = ((cols - 1) * col_stride + 1) * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = reinterpret_cast<const char*>(first + r * row_stride);
    for (int64_t off = 0; off < bytes; off += 64) {
      if (for_write) {
        __builtin_prefetch(row + off, 1, 3);
      } else {
        __builtin_prefetch(row + off, 0, 3);
      }
    }
  }
}

// Everything the tile loops need to know about one call. Query heads h read key/value head
// h / group (grouped-query attention: the shared heads are read in place); every mask, the
// ALiBi distances and the dropout counter are those of a Sequence (sequences.h).
template <typename scalar_t>
struct TileContext {
  using acc_t = at::opmath_type<scalar_t>;
  const AttentionParams& p;
  Strided4<scalar_t> q, k, v;
  int64_t group = 1;  // query heads per key/value head
  // The bias, in the query's dtype or float32: expanded (B, H, L, S) strides, zeros on broadcast dims.
  const void* bias_data = nullptr;
  bool bias_is_float = false;
  int64_t bias_s0 = 0, bias_s1 = 0, bias_s2 = 0, bias_s3 = 0;
  // ALiBi slopes (float32, (H,) or (B, H)) and softcap (0: off).
  const float* alibi = nullptr;
  int64_t alibi_sb = 0, alibi_sh = 0;
  acc_t softcap = 0;
  uint64_t keep_threshold = 0;
  // Score units. Without a bias, softcap or ALiBi, scores are kept in log2 units,
  // s = log2(e) * scale * q . k, so that the softmax is 2^(s - max) and the products come out as
  // scores (one operand carries score_scale). Otherwise they stay in natural units,
  // s = scale * q . k (+ ...), and the softmax is 2^((s - max) * log2(e)): a large finite bias
  // (Hugging Face masks are torch.finfo(dtype).min) times log2(e) would overflow to -inf and hide
  // its key, where torch adds it as the finite number it is, and tanh and the ALiBi distances are
  // natural-unit functions. Subtracting the maximum first keeps it finite.
  static constexpr double kLog2eDouble = 1.4426950408889634;
  static constexpr acc_t kLog2e = acc_t(kLog2eDouble);
  acc_t score_scale = 0;    // scale * log2(e), or scale (natural units)
  acc_t log2_per_unit = 1;  // 1, or log2(e): 2^((s - max) * log2_per_unit) = e^(score - max score)
  acc_t units_per_nat = 1;  // log2(e), or 1: a natural-log quantity (the logsumexp) in score units

  TileContext(const AttentionParams& params, const at::Tensor& query, const at::Tensor& key,
              const at::Tensor& value, const std::optional<at::Tensor>& bias,
              const std::optional<at::Tensor>& alibi_slopes = std::nullopt)
      : p(params), q(query), k(key), v(value) {
    group = p.kv_heads > 0 ? p.heads / p.kv_heads : 1;
    const bool natural_units = p.has_bias || p.softcap > 0 || p.has_alibi;
    if (p.has_bias) {
      at::Tensor e = expand_bias(*bias, p);
      bias_is_float = e.scalar_type() == at::kFloat;
      TORCH_CHECK(bias_is_float || e.scalar_type() == query.scalar_type(),
                  "qkv: internal error: the CPU kernel got a ", e.scalar_type(), " bias for ", query.scalar_type(),
                  " queries");
      bias_data = e.const_data_ptr();
      bias_s0 = e.stride(0), bias_s1 = e.stride(1), bias_s2 = e.stride(2), bias_s3 = e.stride(3);
    }
    if (p.has_alibi) {
      const at::Tensor& a = *alibi_slopes;
      alibi = a.const_data_ptr<float>();
      alibi_sb = a.dim() == 2 ? a.stride(0) : 0;
      alibi_sh = a.stride(a.dim() - 1);
    }
    softcap = static_cast<acc_t>(p.softcap);
    keep_threshold = dropout_threshold(p.dropout_p);
    score_scale = static_cast<acc_t>(natural_units ? p.scale : p.scale * kLog2eDouble);  // rounded once
    log2_per_unit = natural_units ? kLog2e : acc_t(1);
    units_per_nat = natural_units ? acc_t(1) : kLog2e;
  }

  // Whether the products need a pass (bias, softcap or ALiBi) even where no key is hidden.
  bool transforms_scores() const { return bias_data != nullptr || softcap > 0 || alibi != nullptr; }

  // The logsumexp (natural log) of a row whose scores have maximum `max` and sum(2^((s - max) *
  // log2_per_unit)) = `sum`; finite whenever max is, in either unit.
  acc_t logsumexp(acc_t max, acc_t sum) const { return (max + std::log2(sum) / log2_per_unit) / units_per_nat; }
  // A logsumexp as the shift of this call's scores: 2^((s - shift) * log2_per_unit) is the probability.
  acc_t lse_shift(acc_t lse) const { return lse * units_per_nat; }

  // Rows of query head h, and of the key/value head it reads.
  const scalar_t* q_row(const Sequence& s, int64_t h, int64_t i) const { return q.at(s.tb, h, s.q0 + i); }
  const scalar_t* k_row(const Sequence& s, int64_t h, int64_t j) const { return k.at(s.tb, h / group, s.k0 + j); }
  const scalar_t* v_row(const Sequence& s, int64_t h, int64_t j) const { return v.at(s.tb, h / group, s.k0 + j); }

  // Packs keys [j0, j0 + cols) transposed (head dim x keys), the operand of scores().
  Panels<acc_t> pack_keys_transposed(acc_t* dst, const Sequence& s, int64_t h, int64_t j0, int64_t cols) const {
    return pack_panels(k_row(s, h, j0), p.head_dim, cols, k.s3, k.s2, dst);
  }
  // Packs values [j0, j0 + cols) (keys x value head dim), the operand of P V.
  Panels<acc_t> pack_values(acc_t* dst, const Sequence& s, int64_t h, int64_t j0, int64_t cols) const {
    return pack_panels(v_row(s, h, j0), cols, p.v_head_dim, v.s2, v.s3, dst);
  }

  // The band as the extent of a tile product whose rows are query rows i0 + r, per block
  // [r0, r0 + mr) of rows: the keys of the tile its rows see, [key_begin(first row),
  // key_end(last row)) (the keys in between that a row does not see get probability 0).
  // For products with keys as columns (the scores, dP) and reducing over keys (PV, dS K).
  std::pair<int64_t, int64_t> block_keys(const Sequence& s, int64_t i0, int64_t j0, int64_t cols, int64_t r0,
                                         int64_t mr) const {
    const int64_t begin = std::clamp<int64_t>(s.key_begin(i0 + r0) - j0, 0, cols);
    return {begin, std::max(begin, std::clamp<int64_t>(s.key_end(i0 + r0 + mr - 1) - j0, 0, cols))};
  }
  auto visible_key_columns(const Sequence& s, int64_t i0, int64_t j0, int64_t cols) const {
    return [this, &s, i0, j0, cols](int64_t r0, int64_t mr) {
      const auto [begin, end] = block_keys(s, i0, j0, cols, r0, mr);
      return RowBlockExtent{end, 0, INT64_MAX, begin};
    };
  }
  auto visible_key_depth(const Sequence& s, int64_t i0, int64_t j0, int64_t cols) const {
    return [this, &s, i0, j0, cols](int64_t r0, int64_t mr) {
      const auto [begin, end] = block_keys(s, i0, j0, cols, r0, mr);
      return RowBlockExtent{INT64_MAX, begin, end};
    };
  }
  // For products whose rows are keys j0 + c and which reduce over query rows i0 + r (P^T dO,
  // dS^T Q): block [c0, c0 + mr) of keys is seen by query rows [query_begin(first key),
  // query_end(last key)).
  auto seeing_extent(const Sequence& s, int64_t i0, int64_t j0) const {
    return [&s, i0, j0](int64_t c0, int64_t mr) {
      return RowBlockExtent{INT64_MAX, s.query_begin(j0 + c0) - i0, s.query_end(j0 + c0 + mr - 1) - i0};
    };
  }

  // The tile's columns [first, second) that every row [i0, i0 + rows) sees, in whole panels
  // (empty when there are none).
  static std::pair<int64_t, int64_t> seen_by_all(const Sequence& s, int64_t i0, int64_t rows, int64_t j0,
                                                 int64_t cols) {
    constexpr int64_t W = kPanelWidth<acc_t>;
    const int64_t begin = (std::clamp<int64_t>(s.key_begin(i0 + rows - 1) - j0, 0, cols) + W - 1) / W * W;
    const int64_t end = std::clamp<int64_t>(s.key_end(i0) - j0, 0, cols) / W * W;
    return {begin, std::max(begin, end)};
  }

  // scores[r] = scale * q_r . k (+ softcap, ALiBi, bias) in score units, -inf where hidden, and,
  // unless `row_max` is null, their row maxima; one of the operands already carries score_scale
  // (scaled queries or K^T). `k_panels` is K^T; ldo >= padded_to_panels(cols). With
  // `whole_rows` every column of a row is written (hidden ones -inf); otherwise only its block's
  // keys (block_keys) are, the ones the forward's products read. `cap_grad` (rows x ldo, may be
  // null) receives softcap's derivative.
  void scores(acc_t* out, int64_t ldo, const acc_t* qt, int64_t ldq, Panels<acc_t> k_panels, const Sequence& s,
              int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols, acc_t* row_max = nullptr,
              bool whole_rows = true, acc_t* cap_grad = nullptr) const {
    if (!transforms_scores() && s.sees_all(i0, i0 + rows, j0, j0 + cols)) {
      // Nothing added, nothing hidden: the products are the scores. The micro-kernel takes
      // their maxima while they are in registers (measured slower where nobody needs them).
      if (row_max != nullptr) {
        gemm_packed_row_max<acc_t>(rows, cols, p.head_dim, qt, ldq, 1, k_panels, out, ldo, row_max);
      } else {
        gemm_packed<acc_t>(rows, cols, p.head_dim, qt, ldq, 1, k_panels, out, ldo, false);
      }
    } else if (const auto [seen_begin, seen_end] = seen_by_all(s, i0, rows, j0, cols);
               seen_end > seen_begin && row_max != nullptr && !whole_rows && !transforms_scores() &&
               cap_grad == nullptr && rows <= kForwardQueryBlock) {
      // A tile that the band's edges cut (the diagonal tile of a causal block, a window's edges):
      // the whole panels every row sees take the fused product, only the rest is masked. (Cut
      // tiles hold about a third of a causal forward's products with 96 x 512 tiles.)
      gemm_packed_row_max<acc_t>(rows, seen_end - seen_begin, p.head_dim, qt, ldq, 1,
                                 Panels<acc_t>{k_panels.data + seen_begin * k_panels.depth, k_panels.depth},
                                 out + seen_begin, ldo, row_max);
      alignas(64) acc_t part_max[kForwardQueryBlock];
      const auto masked_part = [&](int64_t c0, int64_t c1) {  // columns [c0, c1): no whole panel seen by all
        if (c0 >= c1) return;
        scores(out + c0, ldo, qt, ldq, Panels<acc_t>{k_panels.data + c0 * k_panels.depth, k_panels.depth}, s, h, i0,
               rows, j0 + c0, c1 - c0, part_max, /*whole_rows=*/false);
        for (int64_t r = 0; r < rows; ++r) row_max[r] = std::max(row_max[r], part_max[r]);
      };
      masked_part(0, seen_begin);
      masked_part(seen_end, cols);
    } else {
      gemm_packed<acc_t>(rows, cols, p.head_dim, qt, ldq, 1, k_panels, out, ldo, false,
                         visible_key_columns(s, i0, j0, cols));
      finish_scores(out, ldo, s, h, i0, rows, j0, cols, row_max, whole_rows, cap_grad);
    }
  }

  // The probabilities of a tile straight from its product, for the backward: out = 2^(s - lse
  // shift of the row) computed in the product's epilogue (ProbabilitiesEpilogue) over the
  // panels of each block's keys, where the scores are the products (no bias, softcap or ALiBi:
  // log2 units) and float32. `lse` holds the tile's rows' logsumexps. The keys a row does not
  // see hold garbage or nothing: the caller zeroes them. Returns false, having done nothing,
  // where the scores need a pass of their own (then scores() and probabilities_row()).
  bool probabilities_in_product(acc_t* out, int64_t ldo, const acc_t* qt, int64_t ldq, Panels<acc_t> k_panels,
                                const Sequence& s, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                                const acc_t* lse) const {
    if constexpr (!std::is_same_v<acc_t, float>) {
      return false;
    } else {
      if (transforms_scores() || rows > kQueryBlock) return false;
      alignas(64) float shift[kQueryBlock];
      for (int64_t r = 0; r < rows; ++r) {  // a row that sees nothing (lse -inf): 2^-inf = 0
        shift[r] = lse[r] == -std::numeric_limits<float>::infinity() ? std::numeric_limits<float>::infinity()
                                                                     : lse_shift(lse[r]);
      }
      gemm_packed_epilogue<float>(rows, cols, p.head_dim, qt, ldq, 1, k_panels, out, ldo,
                                  visible_key_columns(s, i0, j0, cols), ProbabilitiesEpilogue{shift});
      return true;
    }
  }

  // The columns a row's pass covers: the whole tile, or its product block's keys.
  std::pair<int64_t, int64_t> row_span(const Sequence& s, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                                       int64_t r, bool whole_rows) const {
    if (whole_rows) return {0, cols};
    const int64_t r0 = r / kMicroRows * kMicroRows;
    return block_keys(s, i0, j0, cols, r0, std::min<int64_t>(kMicroRows, rows - r0));
  }

  // Turns products that already carry score_scale into scores (see scores()): softcap, ALiBi,
  // the bias (natural units: added as it is), hides masked keys; the row maxima go to `row_max`
  // unless it is null.
  void finish_scores(acc_t* out, int64_t ldo, const Sequence& s, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                     int64_t cols, acc_t* row_max, bool whole_rows = true, acc_t* cap_grad = nullptr) const {
    if (bias_is_float) {
      finish_scores_with(static_cast<const float*>(bias_data), out, ldo, s, h, i0, rows, j0, cols, row_max,
                         whole_rows, cap_grad);
    } else {
      finish_scores_with(static_cast<const scalar_t*>(bias_data), out, ldo, s, h, i0, rows, j0, cols, row_max,
                         whole_rows, cap_grad);
    }
  }
  template <typename bias_t>
  void finish_scores_with(const bias_t* bias, acc_t* out, int64_t ldo, const Sequence& s, int64_t h, int64_t i0,
                          int64_t rows, int64_t j0, int64_t cols, acc_t* row_max, bool whole_rows,
                          acc_t* cap_grad) const {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const auto [span_begin, span_end] = row_span(s, i0, rows, j0, cols, r, whole_rows);
      const auto [begin, end] = s.visible(i, j0, cols);
      acc_t* row = out + r * ldo;
      acc_t m;
      if (!transforms_scores()) {
        // The products are the scores (they carry the scale): -inf where hidden, and the max.
        m = mask_row_max(row, span_begin, span_end, begin, end, /*want_max=*/row_max != nullptr);
      } else {
        RowScoreOptions<acc_t, bias_t> o;
        o.softcap = softcap;
        if (alibi != nullptr) o.slope = static_cast<acc_t>(alibi[s.b * alibi_sb + h * alibi_sh]);
        o.distance0 = i + s.offset - j0;
        if (bias != nullptr) {
          o.bias = bias + s.b * bias_s0 + h * bias_s1 + i * bias_s2 + j0 * bias_s3;
          o.bias_stride = bias_s3;
        }
        acc_t* row_cap_grad = cap_grad == nullptr ? nullptr : cap_grad + r * ldo;
        m = transform_scores_row(row + span_begin, span_end - span_begin, begin - span_begin, end - span_begin,
                                 shifted(o, span_begin), row_cap_grad == nullptr ? nullptr : row_cap_grad + span_begin,
                                 true);
      }
      if (row_max != nullptr) row_max[r] = m;
    }
  }
  template <typename bias_t>
  static RowScoreOptions<acc_t, bias_t> shifted(RowScoreOptions<acc_t, bias_t> o, int64_t columns) {
    o.distance0 -= columns;
    if (o.bias != nullptr) o.bias += columns * o.bias_stride;
    return o;
  }

  // Applies the dropout mask and 1/(1-p) scaling to keys [j0, j0 + cols) of a row of
  // probabilities in place.
  void dropout_row(acc_t* row, const Sequence& s, int64_t h, int64_t i, int64_t j0, int64_t cols) const {
    const acc_t keep_scale = p.dropout_p < 1.0 ? acc_t(1.0 / (1.0 - p.dropout_p)) : acc_t(0);
    const uint64_t base = ((static_cast<uint64_t>(s.b) * p.heads + h) * p.q_len + i) * p.kv_len + j0;
    for (int64_t c = 0; c < cols; ++c) {
      row[c] = dropout_keep(p.dropout_seed, base + c, keep_threshold) ? row[c] * keep_scale : acc_t(0);
    }
  }

  // Turns a row of scores into probabilities exp(natural score - lse) (all zero when lse = -inf),
  // times `normalizer` (see lse_normalizers).
  void probabilities_row(acc_t* s, int64_t cols, acc_t lse, acc_t normalizer = acc_t(1)) const {
    if (lse == -std::numeric_limits<acc_t>::infinity()) {
      std::fill(s, s + cols, acc_t(0));
    } else {
      exp2_and_sum(s, cols, lse_shift(lse), log2_per_unit);
      if (normalizer != acc_t(1)) scale_row(s, cols, normalizer);
    }
  }
};

// Ops that rebuild probabilities from a logsumexp (the backward, attention_weights) take
// exp(s - lse), which needs lse to the precision of the scores' differences. A row whose scores
// are all huge (a row masked with torch.finfo(dtype).min on every key: its softmax is over equal
// finite scores, the mean of V) has lse = max + log(sum) rounded to max: the log of the row sum is
// lost and every probability comes out as 1. Those rows, where lse's rounding step exceeds 2^-10
// (|lse| >= 2^13 in float32), get their row sum recomputed: this returns one multiplier per row
// of `layout` (indexed by layout.row), 1 / sum_j exp(s_ij - lse_i), 1 for every other row, or an
// undefined tensor when no row needs one (the usual case: one pass over the logsumexp). The
// scores are computed as the forward computes them.
template <typename scalar_t>
at::Tensor lse_normalizers(const TileContext<scalar_t>& ctx, const SequenceLayout& layout,
                           const at::opmath_type<scalar_t>* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const AttentionParams& p = ctx.p;
  const acc_t large = acc_t(1.0 / 1024) / std::numeric_limits<acc_t>::epsilon();
  struct Row {
    int64_t b, h, i;
  };
  std::vector<Row> rows;
  for (int64_t b = 0; b < layout.count(); ++b) {
    const Sequence s = layout[b];
    for (int64_t h = 0; h < p.heads; ++h) {
      for (int64_t i = 0; i < s.q_len; ++i) {
        const acc_t x = lse[layout.row(s, h, i)];
        if (std::isfinite(x) && std::abs(x) >= large) rows.push_back({b, h, i});
      }
    }
  }
  if (rows.empty()) return at::Tensor();
  at::Tensor normalizers = at::ones({layout.rows()}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* out = normalizers.data_ptr<acc_t>();
  const int64_t D = p.head_dim, BK = kForwardKeyBlock;
  at::parallel_for(0, static_cast<int64_t>(rows.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qs(D), k_rows(BK * D), scores(padded_to_panels<acc_t>(BK));
    for (int64_t n = begin; n < end; ++n) {
      const Sequence s = layout[rows[n].b];
      const int64_t h = rows[n].h, i = rows[n].i, row = layout.row(s, h, i);
      scaled_rows(ctx.q, s.tb, h, s.q0 + i, 1, D, ctx.score_scale, qs.data());
      acc_t sum = 0, err = 0;
      const int64_t j_end = s.key_end(i);
      for (int64_t j0 = s.key_begin(i) / BK * BK; j0 < j_end; j0 += BK) {
        const int64_t cols = std::min(BK, j_end - j0);
        int64_t ldk = 0;
        const acc_t* kt = tile_rows<acc_t>(ctx.k, s.tb, h / ctx.group, s.k0 + j0, cols, D, k_rows.data(), ldk);
        gemm_nt_dots<acc_t>(1, cols, D, qs.data(), D, kt, ldk, scores.data(), cols);
        ctx.finish_scores(scores.data(), cols, s, h, i, 1, j0, cols, nullptr);
        add_compensated(sum, err, exp2_and_sum(scores.data(), cols, ctx.lse_shift(lse[row]), ctx.log2_per_unit));
      }
      out[row] = acc_t(1) / (sum + err);
    }
  });
  return normalizers;
}

}  // namespace CPU_CAPABILITY
}  // namespace qkv
