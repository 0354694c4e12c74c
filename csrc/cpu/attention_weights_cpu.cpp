// CPU kernels of the explicit attention weights (need_weights=True):
//  - attention_weights rebuilds the probabilities from a logsumexp that `attention` returned;
//  - attention_with_weights computes the output, the logsumexp and the weights in one pass,
//    so Q K^T is computed once instead of once per op.
// Both sum over heads inside the kernel when asked for averaged weights: no (B, H, L, S)
// tensor then. See attention_cpu.cpp for the layout conventions.
#include "cpu_kernels.h"
#include "tile_context.h"

#include <ATen/Dispatch.h>

namespace qkv {
inline namespace CPU_CAPABILITY {  // this copy's instruction set (cpu_capability.h)
namespace {

// ---- what both kernels share -----------------------------------------------------------

// K^T (and, with values, V) of every (b, key head), packed key tile by key tile before the
// tasks start: a task covers one query block, and packing per task took 18% of the weights op.
// The buffer is the size of K (and V) in acc_t; query head h reads key head h / group.
template <typename scalar_t>
struct PackedKeyTiles {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t key_block, kv_len, head_dim, tiles, k_tile_size, v_tile_size, kv_heads, group;
  at::Tensor buffer;
  acc_t* k_data;
  acc_t* v_data;

  PackedKeyTiles(const TileContext<scalar_t>& ctx, int64_t key_block_, bool with_values)
      : key_block(key_block_),
        kv_len(ctx.p.kv_len),
        head_dim(ctx.p.head_dim),
        tiles((kv_len + key_block - 1) / key_block),
        k_tile_size(padded_to_panels<acc_t>(key_block) * head_dim),
        v_tile_size(with_values ? key_block * padded_to_panels<acc_t>(ctx.p.v_head_dim) : 0),
        kv_heads(ctx.p.heads / ctx.group),
        group(ctx.group) {
    const int64_t BKH = ctx.p.batch * kv_heads;
    buffer = at::empty({BKH * tiles * (k_tile_size + v_tile_size)},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
    k_data = buffer.data_ptr<acc_t>();
    v_data = k_data + BKH * tiles * k_tile_size;
    const SequenceLayout layout = SequenceLayout::dense(ctx.p);
    at::parallel_for(0, BKH * tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bkh = t / tiles, j0 = t % tiles * key_block;
        const Sequence s = layout[bkh / kv_heads];
        const int64_t h = bkh % kv_heads * group;  // a query head of this key head
        const int64_t cols = std::min(key_block, kv_len - j0);
        ctx.pack_keys_transposed(k_data + t * k_tile_size, s, h, j0, cols);
        if (with_values) ctx.pack_values(v_data + t * v_tile_size, s, h, j0, cols);
      }
    });
  }

  // The packed tile holding key j0 (a multiple of key_block) that query head h of batch b reads.
  Panels<acc_t> keys(int64_t b, int64_t h, int64_t j0) const {
    return {k_data + ((b * kv_heads + h / group) * tiles + j0 / key_block) * k_tile_size, head_dim};
  }
  Panels<acc_t> values(int64_t b, int64_t h, int64_t j0) const {
    return {v_data + ((b * kv_heads + h / group) * tiles + j0 / key_block) * v_tile_size,
            std::min(key_block, kv_len - j0)};
  }
};

// One task's rows of the weights, where its heads are summed: the contiguous output itself
// for float and double, or an acc_t row buffer that finish() converts into it (half types).
template <typename scalar_t>
struct WeightsRows {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool in_place = std::is_same_v<acc_t, scalar_t>;
  scalar_t* first;  // the task's first output row
  int64_t cols;
  acc_t* buffer;    // rows x cols, half types only

  static int64_t buffer_size(int64_t rows, int64_t cols) { return in_place ? 0 : rows * cols; }

  acc_t* row(int64_t r) const {
    if constexpr (in_place) {
      return first + r * cols;
    } else {
      return buffer + r * cols;
    }
  }
  void finish(int64_t rows) const {
    if constexpr (!in_place) {
      for (int64_t r = 0; r < rows; ++r) store_row(first + r * cols, 1, buffer + r * cols, cols, acc_t(1));
    }
  }
};

// ---- the weights from a logsumexp ------------------------------------------------------

// Per task: one query block of one (b, h), or, with average_heads, of every head of one b,
// summed into the task's WeightsRows so the (B, H, L, S) tensor never exists.
template <typename scalar_t>
void attention_weights_cpu_impl(const AttentionParams& p, const at::Tensor& query, const at::Tensor& key,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alibi_slopes,
                                const at::Tensor& lse, bool average_heads, at::Tensor& weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileContext<scalar_t> ctx(p, query, key, key, bias, alibi_slopes);
  const SequenceLayout layout = SequenceLayout::dense(p);
  const at::Tensor lse_c = lse.contiguous();
  const acc_t* lse_data = lse_c.const_data_ptr<acc_t>();
  scalar_t* w = weights.data_ptr<scalar_t>();  // contiguous (B, H, L, S) or (B, L, S)
  constexpr int64_t QB = kQueryBlock;
  const int64_t D = p.head_dim, S = p.kv_len, BH = p.batch * p.heads, q_blocks = (p.q_len + QB - 1) / QB;
  const int64_t heads_per_task = average_heads ? p.heads : 1;
  const int64_t groups = BH / heads_per_task;
  const int64_t BK = std::min(kForwardKeyBlock, std::max<int64_t>(S, 1));
  const int64_t ld_s = padded_to_panels<acc_t>(BK);
  // Averaging folds 1/H into the exponent: 2^((s - lse - log(H)) * log2_per_unit) = P / H, with
  // lse and log(H) in score units.
  const acc_t log_heads = static_cast<acc_t>(std::log2(static_cast<double>(heads_per_task))) / ctx.log2_per_unit;
  const PackedKeyTiles<scalar_t> packed(ctx, BK, /*with_values=*/false);
  const at::Tensor normalizers = lse_normalizers(ctx, layout, lse_data);
  const acc_t* normalizer_data = normalizers.defined() ? normalizers.const_data_ptr<acc_t>() : nullptr;

  for_each_task(groups * q_blocks, 2.0 * BH * p.q_len * S * D, [&](int64_t) {
    auto scratch = worker_scratch<acc_t>(QB * D + QB * ld_s + WeightsRows<scalar_t>::buffer_size(QB, S));
    return [&, scratch](int64_t task) {
      acc_t* qs = scratch->data();
      acc_t* st = qs + QB * D;
      const int64_t qb = task % q_blocks, group = task / q_blocks;
      const int64_t i0 = qb * QB, rows = std::min(QB, p.q_len - i0);
      const WeightsRows<scalar_t> target{w + (group * p.q_len + i0) * S, S, st + QB * ld_s};
      for (int64_t bh = group * heads_per_task; bh < (group + 1) * heads_per_task; ++bh) {
        const int64_t b = bh / p.heads, h = bh % p.heads;
        const Sequence s = layout[b];
        const bool first_head = bh == group * heads_per_task;
        // The queries times score_scale, as in the forward: the products are the scores.
        scaled_rows(ctx.q, b, h, i0, rows, D, ctx.score_scale, qs);
        for (int64_t j0 = 0; j0 < S; j0 += BK) {
          const int64_t cols = std::min(BK, S - j0);
          ctx.scores(st, ld_s, qs, D, packed.keys(b, h, j0), s, h, i0, rows, j0, cols);
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* prob = st + r * ld_s;
            const acc_t row_lse = lse_data[bh * p.q_len + i0 + r];
            const acc_t shift = ctx.lse_shift(row_lse) + log_heads;
            const acc_t normalizer = normalizer_data == nullptr ? acc_t(1) : normalizer_data[bh * p.q_len + i0 + r];
            if (row_lse == -std::numeric_limits<acc_t>::infinity()) {
              std::fill(prob, prob + cols, acc_t(0));  // the row sees no key: weights 0
            } else if (p.dropout_p == 0 && normalizer == acc_t(1)) {
              exp2_into(target.row(r) + j0, prob, cols, shift, ctx.log2_per_unit, !first_head);
              continue;
            } else {
              exp2_and_sum(prob, cols, shift, ctx.log2_per_unit);
              if (p.dropout_p > 0) ctx.dropout_row(prob, s, h, i0 + r, j0, cols);
            }
            add_scaled_row(target.row(r) + j0, prob, cols, normalizer, !first_head);
          }
        }
      }
      target.finish(rows);
    };
  });
}

at::Tensor attention_weights_cpu(const at::Tensor& query, const at::Tensor& key,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                 double dropout_p, bool is_causal, bool bottom_right,
                                 std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
                                 bool average_heads, int64_t window_left, int64_t window_right, double softcap,
                                 const std::optional<at::Tensor>& alibi_slopes) {
  const auto p = check_attention_weights_args(query, key, bias, logsumexp, dropout_p, is_causal, bottom_right, scale,
                                              dropout_seed, window_left, window_right, softcap, alibi_slopes);
  at::Tensor weights = empty_attention_weights(query, p, average_heads);
  if (p.heads == 0) return weights.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "qkv_attention_weights_cpu", [&] {
    attention_weights_cpu_impl<scalar_t>(p, query, key, bias, alibi_slopes, logsumexp, average_heads, weights);
  });
  return weights;
}

// ---- the output and its weights in one pass -----------------------------------------------

// Query rows per task: at S = 2048 their scores and their weights rows (2 x 192 KiB) share
// the 512 KiB L2. 64 rows measured 1.1-1.2x slower at L = S = 2048, 12 no faster.
constexpr int64_t kFusedQueryBlock = 24;

// Per task: one query block of one (b, h), or, with average_heads, of every head of one b.
// Each head's scores against every key the block may see are held whole (rows x S), so
// the softmax is exact with no running maximum and its probabilities feed both P V and the
// weights.
template <typename scalar_t>
void attention_with_weights_cpu_impl(const AttentionParams& p, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& alibi_slopes, bool average_heads,
                                     at::Tensor& out, at::Tensor& lse, at::Tensor& weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileContext<scalar_t> ctx(p, query, key, value, bias, alibi_slopes);
  const SequenceLayout layout = SequenceLayout::dense(p);
  const MutableStrided4<scalar_t> o(out);
  acc_t* lse_data = lse.data_ptr<acc_t>();  // contiguous (B, H, L)
  scalar_t* w = weights.data_ptr<scalar_t>();  // contiguous (B, H, L, S) or (B, L, S)
  const int64_t D = p.head_dim, Dv = p.v_head_dim, S = p.kv_len, BH = p.batch * p.heads;
  const int64_t QB = std::min(kFusedQueryBlock, p.q_len), q_blocks = (p.q_len + QB - 1) / QB;
  const int64_t heads_per_task = average_heads ? p.heads : 1, groups = BH / heads_per_task;
  const int64_t BK = std::min(kForwardKeyBlock, S);
  // Score rows span every key; each tile's product is written at its column offset.
  const int64_t ld_p = padded_to_panels<acc_t>(S), ld_acc = padded_to_panels<acc_t>(Dv);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(heads_per_task);

  const PackedKeyTiles<scalar_t> packed(ctx, BK, /*with_values=*/true);

  for_each_task(groups * q_blocks, 2.0 * BH * p.q_len * S * (D + Dv), [&](int64_t) {
    auto scratch = worker_scratch<acc_t>(QB * D + QB * ld_p + 3 * QB * ld_acc + 4 * QB +
                                                        WeightsRows<scalar_t>::buffer_size(QB, S));
    return [&, scratch](int64_t task) {
      acc_t* qs = scratch->data();
      acc_t* probs = qs + QB * D;  // the block's scores, then its unnormalised probabilities
      // P V and the row sums are summed as in the forward: plain partials of
      // kForwardTilesPerPartial key tiles in `acc`, compensated across partials.
      acc_t* acc = probs + QB * ld_p;
      acc_t* out_sum = acc + QB * ld_acc;
      acc_t* out_err = out_sum + QB * ld_acc;
      acc_t* row_max = out_err + QB * ld_acc;
      acc_t* row_sum = row_max + QB;
      acc_t* row_sum_err = row_sum + QB;
      acc_t* tile_max = row_sum_err + QB;
      const int64_t qb = task % q_blocks, group = task / q_blocks;
      const int64_t i0 = qb * QB, rows = std::min(QB, p.q_len - i0);
      // Later keys are hidden from every row (the band's end is the same for every batch).
      const int64_t j_end = layout[0].key_end(i0 + rows - 1);
      const WeightsRows<scalar_t> target{w + (group * p.q_len + i0) * S, S, tile_max + QB};
      for (int64_t bh = group * heads_per_task; bh < (group + 1) * heads_per_task; ++bh) {
        const int64_t b = bh / p.heads, h = bh % p.heads;
        const Sequence s = layout[b];
        const bool first_head = bh == group * heads_per_task;
        // The queries times score_scale, as in the forward: the products are the scores.
        scaled_rows(ctx.q, b, h, i0, rows, D, ctx.score_scale, qs);
        std::fill(row_max, row_max + rows, neg_inf);
        for (int64_t j0 = 0; j0 < j_end; j0 += BK) {
          ctx.scores(probs + j0, ld_p, qs, D, packed.keys(b, h, j0), s, h, i0, rows, j0, std::min(BK, j_end - j0),
                     tile_max);
          for (int64_t r = 0; r < rows; ++r) {
            // A NaN score (from a NaN or inf input) must reach the output, as in the forward.
            row_max[r] = std::isnan(tile_max[r]) ? tile_max[r] : std::max(row_max[r], tile_max[r]);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* row = probs + r * ld_p;
          row_sum[r] = row_sum_err[r] = 0;
          if (row_max[r] == neg_inf) {  // the row sees no key: output, weights 0, logsumexp -inf
            std::fill(row, row + j_end, acc_t(0));
            continue;
          }
          for (int64_t j0 = 0; j0 < j_end; j0 += BK) {
            add_compensated(row_sum[r], row_sum_err[r],
                            exp2_and_sum(row + j0, std::min(BK, j_end - j0), row_max[r], ctx.log2_per_unit));
          }
          if (p.dropout_p > 0) ctx.dropout_row(row, s, h, i0 + r, 0, j_end);
        }
        for (acc_t* sum : {acc, out_sum, out_err}) std::fill(sum, sum + rows * ld_acc, acc_t(0));
        for (int64_t j0 = 0; j0 < j_end; j0 += BK) {
          const int64_t cols = std::min(BK, j_end - j0);
          gemm_packed<acc_t>(rows, Dv, cols, probs + j0, ld_p, 1, packed.values(b, h, j0), acc, ld_acc, true,
                             ctx.visible_key_depth(s, i0, j0, cols));
          if (j0 / BK % kForwardTilesPerPartial == kForwardTilesPerPartial - 1 || j0 + BK >= j_end) {
            for (int64_t r = 0; r < rows; ++r) {
              add_compensated(out_sum + r * ld_acc, out_err + r * ld_acc, acc + r * ld_acc, Dv);
            }
            std::fill(acc, acc + rows * ld_acc, acc_t(0));
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t sum = row_sum[r] + row_sum_err[r];
          const bool empty = sum == acc_t(0);
          const acc_t inv_sum = empty ? acc_t(0) : acc_t(1) / sum;
          acc_t* out_row = out_sum + r * ld_acc;
          add_scaled_row(out_row, out_err + r * ld_acc, Dv, acc_t(1), true);
          store_row(o.at(b, h, i0 + r), o.s3, out_row, Dv, inv_sum);
          lse_data[bh * p.q_len + i0 + r] = empty ? neg_inf : ctx.logsumexp(row_max[r], sum);
          acc_t* dst = target.row(r);
          add_scaled_row(dst, probs + r * ld_p, j_end, inv_sum * inv_heads, !first_head);
          if (first_head) std::fill(dst + j_end, dst + S, acc_t(0));
        }
      }
      target.finish(rows);
    };
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_weights_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& bias,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed, bool average_heads, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const auto p = check_attention_args("qkv.attention_with_weights", query, key, value, bias, dropout_p, is_causal,
                                      bottom_right, scale, dropout_seed, window_left, window_right, softcap,
                                      alibi_slopes);
  if (p.q_len < kMinRowsForPanels || p.kv_len == 0 || p.heads == 0) {
    // Decoding: packing every head's K and V would cost more than computing Q K^T twice. The
    // seed already settled on goes along, so none is drawn twice.
    return attention_then_weights(query, key, value, bias, dropout_p, is_causal, bottom_right, scale,
                                  dropout_p > 0.0 ? dropout_seed_tensor(p.dropout_seed) : dropout_seed,
                                  average_heads, window_left, window_right, softcap, alibi_slopes);
  }
  at::Tensor out = empty_attention_output(query, p);
  at::Tensor lse = empty_logsumexp(query, p);
  at::Tensor weights = empty_attention_weights(query, p, average_heads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "qkv_attention_with_weights_cpu",
                                  [&] {
                                    attention_with_weights_cpu_impl<scalar_t>(p, query, key, value, bias,
                                                                              alibi_slopes, average_heads, out, lse,
                                                                              weights);
                                  });
  return {out, lse, weights};
}

}  // namespace

QKV_REGISTER_CPU_KERNEL(attention_weights_cpu_kernel, attention_weights_cpu);
QKV_REGISTER_CPU_KERNEL(attention_with_weights_cpu_kernel, attention_with_weights_cpu);

}  // namespace CPU_CAPABILITY
}  // namespace qkv
