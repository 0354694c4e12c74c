// CPU kernels of the core attention op: flash-style forward (online softmax over key blocks,
// only a per-row logsumexp saved) and backward (probabilities recomputed from the
// logsumexp). No L x S buffer is ever allocated: work happens in (query block x key block)
// tiles held in per-thread scratch. The explicit weights are in attention_weights_cpu.cpp.
//
// The right-hand operand of every tile product is packed into panels (packed_gemm.h), which
// also converts half/bfloat16 to float32 and absorbs any strides; the left-hand operand is
// read in place when it already is float32/float64 rows. Arithmetic accumulates in float32
// (float64 stays float64 for gradcheck).
#include "backward_tasks.h"
#include "cpu_kernels.h"
#include "tile_context.h"

#include <ATen/Dispatch.h>

namespace qkv {
inline namespace CPU_CAPABILITY {  // this copy's instruction set (cpu_capability.h)
namespace {

// ---- forward ----------------------------------------------------------------------------

template <typename scalar_t>
void attention_forward_cpu_impl(const AttentionParams& p, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const std::optional<at::Tensor>& bias,
                                at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileContext<scalar_t> ctx(p, query, key, value, bias);
  const MutableStrided4<scalar_t> o(out);
  acc_t* lse_data = lse.data_ptr<acc_t>();  // contiguous (B, H, L)
  const int64_t D = p.head_dim, Dv = p.v_head_dim, BH = p.batch * p.heads;
  constexpr int64_t QB = kForwardQueryBlock;
  const int64_t q_blocks = (p.q_len + QB - 1) / QB;
  const int64_t BK = std::min(kForwardKeyBlock, std::max<int64_t>(p.kv_len, 1));
  const int64_t ld_s = padded_to_panels<acc_t>(BK), ld_acc = padded_to_panels<acc_t>(Dv);
  // Packed K and V for a whole (b, h), unless no query block is tall enough to use them.
  const int64_t key_tiles = p.q_len >= kMinRowsForPanels ? (p.kv_len + BK - 1) / BK : 0;
  const int64_t k_tile_size = ld_s * D, v_tile_size = BK * ld_acc;  // one packed key tile of K^T, of V
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  // A task is a group of query blocks of one (b, h): its worker packs K and V once, tile by
  // tile as first needed, and every query block of the group reuses them. Groups take
  // interleaved blocks (g, g + G, ...) so that under a causal mask they cost the same, and
  // there are enough of them to keep every thread busy.
  const int64_t threads = at::get_num_threads();
  const int64_t groups = std::clamp<int64_t>((2 * threads + BH - 1) / BH, 1, std::max<int64_t>(q_blocks, 1));
  const double flops = 2.0 * BH * p.q_len * p.kv_len * (D + Dv);
  for_each_task(BH * groups, flops, [&](int64_t) {
    auto scratch = std::make_shared<std::vector<acc_t>>(QB * D + key_tiles * (k_tile_size + v_tile_size) +
                                                        BK * (D + Dv) + QB * ld_s + QB * ld_acc + 3 * QB);
    return [&, scratch](int64_t task) {
      acc_t* qs = scratch->data();
      acc_t* k_packed = qs + QB * D;
      acc_t* v_packed = k_packed + key_tiles * k_tile_size;
      acc_t* k_rows = v_packed + key_tiles * v_tile_size;  // converted K and V rows for few-row blocks
      acc_t* v_rows = k_rows + BK * D;
      acc_t* st = v_rows + BK * Dv;
      acc_t* acc = st + QB * ld_s;
      acc_t* row_max = acc + QB * ld_acc;
      acc_t* row_sum = row_max + QB;
      acc_t* tile_max = row_sum + QB;
      const int64_t bh = task % BH, group = task / BH, b = bh / p.heads, h = bh % p.heads;
      int64_t tiles_packed = 0;  // key tiles are needed in prefix order

      for (int64_t qb = group; qb < q_blocks; qb += groups) {
        const int64_t i0 = qb * QB, rows = std::min(QB, p.q_len - i0);
        // Below this many query rows (decoding), packing K and V would cost as much as using them.
        const bool few_rows = rows < kMinRowsForPanels;
        // The queries times scale * log2(e): the products come out as scores, no pass over them.
        scaled_rows(ctx.q, b, h, i0, rows, D, ctx.score_scale, qs);
        std::fill(acc, acc + rows * ld_acc, acc_t(0));
        std::fill(row_max, row_max + rows, neg_inf);
        std::fill(row_sum, row_sum + rows, acc_t(0));

        const int64_t j_end = ctx.key_end(i0 + rows);
        for (int64_t j0 = 0; j0 < j_end; j0 += BK) {
          const int64_t cols = std::min(BK, j_end - j0), tile = j0 / BK;
          // This tile's panels, packed whole: a later query block may see more of it.
          const int64_t full = std::min(BK, p.kv_len - j0);
          acc_t* k_space = k_packed + tile * k_tile_size;
          acc_t* v_space = v_packed + tile * v_tile_size;
          const Panels<acc_t> k_panels{k_space, D}, v_panels{v_space, full};
          int64_t ldk = 0, ldv = 0;
          const acc_t* kt = nullptr;
          const acc_t* vt = nullptr;
          if (few_rows) {  // K and V rows in place (or converted), no panels
            kt = tile_rows<acc_t>(ctx.k, b, h, j0, cols, D, k_rows, ldk);
            vt = tile_rows<acc_t>(ctx.v, b, h, j0, cols, Dv, v_rows, ldv);
            gemm_nt_dots<acc_t>(rows, cols, D, qs, D, kt, ldk, st, ld_s);
            ctx.finish_scores(st, ld_s, b, h, i0, rows, j0, cols, tile_max);
          } else {
            if (tile >= tiles_packed) {
              ctx.pack_keys_transposed(k_space, b, h, j0, full);
              pack_panels(ctx.v.at(b, h, j0), full, Dv, ctx.v.s2, ctx.v.s3, v_space);
              tiles_packed = tile + 1;
            }
            ctx.scores(st, ld_s, qs, D, k_panels, b, h, i0, rows, j0, cols, tile_max);
          }
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* s = st + r * ld_s;
            // A NaN score (from a NaN or inf input) must reach the output, never read as "nothing visible".
            const acc_t new_max = std::isnan(tile_max[r]) ? tile_max[r] : std::max(row_max[r], tile_max[r]);
            if (new_max == neg_inf) {  // nothing visible to this row yet
              std::fill(s, s + cols, acc_t(0));
              continue;
            }
            if (new_max != row_max[r]) {  // rescale only when the running maximum moves
              const acc_t correction = std::exp2(row_max[r] - new_max);
              row_sum[r] *= correction;
              scale_row(acc + r * ld_acc, Dv, correction);
              row_max[r] = new_max;
            }
            row_sum[r] += exp2_and_sum(s, cols, new_max);
            if (p.dropout_p > 0) ctx.dropout_row(s, b, h, i0 + r, j0, cols);
          }
          if (few_rows) {
            gemm_nn_axpys<acc_t>(rows, Dv, cols, st, ld_s, vt, ldv, acc, ld_acc);
          } else {
            gemm_packed<acc_t>(rows, Dv, cols, st, ld_s, 1, v_panels, acc, ld_acc, true,
                               ctx.visible_key_depth(i0, j0, cols));
          }
        }

        for (int64_t r = 0; r < rows; ++r) {
          const bool empty = row_sum[r] == acc_t(0);
          store_row(o.at(b, h, i0 + r), o.s3, acc + r * ld_acc, Dv, empty ? acc_t(0) : acc_t(1) / row_sum[r]);
          // Back from log2 units: lse = ln 2 * (max + log2(sum)).
          lse_data[bh * p.q_len + i0 + r] = empty ? neg_inf : (row_max[r] + std::log2(row_sum[r])) / ctx.kLog2e;
        }
      }
    };
  });
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias, double dropout_p, bool is_causal, bool bottom_right,
    std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed) {
  const auto p = check_attention_args("qkv.attention", query, key, value, bias, dropout_p, is_causal,
                                      bottom_right, scale, dropout_seed);
  at::Tensor out = empty_attention_output(query, p);
  at::Tensor lse = empty_logsumexp(query, p);
  if (p.batch * p.heads == 0) return {out, lse};  // no (b, h): empty outputs, and no tasks to split
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "qkv_attention_cpu", [&] {
    attention_forward_cpu_impl<scalar_t>(p, query, key, value, bias, out, lse);
  });
  return {out, lse};
}

// ---- backward ---------------------------------------------------------------------------

template <typename scalar_t>
void attention_backward_cpu_impl(const AttentionParams& p, const at::Tensor& grad_out, const at::Tensor& query,
                                 const at::Tensor& key, const at::Tensor& value,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& out,
                                 const at::Tensor& lse, at::Tensor& grad_q, at::Tensor& grad_k,
                                 at::Tensor& grad_v, bool bias_requires_grad, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileContext<scalar_t> ctx(p, query, key, value, bias);
  const Strided4<scalar_t> dout(grad_out), o(out);
  const MutableStrided4<scalar_t> dq(grad_q), dk(grad_k), dv(grad_v);
  const at::Tensor lse_c = lse.contiguous();
  const acc_t* lse_data = lse_c.const_data_ptr<acc_t>();
  const int64_t D = p.head_dim, Dv = p.v_head_dim, L = p.q_len, BH = p.batch * p.heads;
  constexpr int64_t BK = kBackwardKeyBlock, QB = kQueryBlock;
  const int64_t kv_blocks = (p.kv_len + BK - 1) / BK;

  // Tasks are (group of (b, h) pairs, chunk of key blocks), the split a function of the
  // problem alone (backward_tasks.h): every thread has work when there are few pairs, and
  // the gradients do not depend on the thread count.
  const BackwardTasks tasks(p, bias, bias_requires_grad, kv_blocks);
  const int64_t chunks = tasks.chunks;
  // Accumulator rows are padded to whole panels, the row stride gemm_packed writes with.
  const int64_t ld_dq = padded_to_panels<acc_t>(D), ld_dv = padded_to_panels<acc_t>(Dv);
  DqPartials<acc_t> dq_partials(BH, chunks, L, ld_dq);
  BiasGradAccumulator<acc_t> bias_grad(p, bias, bias_requires_grad, chunks);

  // delta_i = dO_i . O_i (= rowsum(dP * P)), computed once per row.
  at::Tensor delta_t = at::empty({BH, L}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* delta = delta_t.data_ptr<acc_t>();
  at::parallel_for(0, BH * L, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / L, i = row % L, b = bh / p.heads, h = bh % p.heads;
      const scalar_t* g = dout.at(b, h, i);
      const scalar_t* y = o.at(b, h, i);
      acc_t sum = 0;
      for (int64_t c = 0; c < Dv; ++c) sum += static_cast<acc_t>(g[c * dout.s3]) * static_cast<acc_t>(y[c * o.s3]);
      delta[row] = sum;
    }
  });

  const double flops = 2.0 * BH * L * p.kv_len * (3 * D + 2 * Dv);
  const int64_t L_padded = (L + QB - 1) / QB * QB;
  const bool dout_in_place = reads_rows_in_place<acc_t>(dout, L, Dv);

  for_each_task(tasks.count(), flops, [&](int64_t) {
    // Whole-slice panels (L rows): each task packs Q and dO once per pair, not once per key block.
    auto scratch = std::make_shared<std::vector<acc_t>>(QB * D + (dout_in_place ? 0 : L * Dv) + L_padded * (ld_dq + ld_dv) +
                                                        BK * (D + ld_dq + Dv) + 2 * QB * BK + BK * (ld_dq + ld_dv) + D);
    return [&, scratch](int64_t task) {
      acc_t* qs = scratch->data();               // query rows (when not read in place), for S
      acc_t* do_rows = qs + QB * D;              // dO rows (when not read in place), for dP
      acc_t* q_space = do_rows + (dout_in_place ? 0 : L * Dv);  // Q, per query block (rows x D) panels, for dK
      acc_t* do_space = q_space + L_padded * ld_dq;  // dO, per query block (rows x Dv) panels, for dV
      acc_t* kt_space = do_space + L_padded * ld_dv;  // K^T (D x keys), for S
      acc_t* k_space = kt_space + BK * D;        // K (keys x D), for dQ
      acc_t* vt_space = k_space + BK * ld_dq;    // V^T (Dv x keys), for dP
      acc_t* st = vt_space + BK * Dv;
      acc_t* dpt = st + QB * BK;
      acc_t* dk_acc = dpt + QB * BK;
      acc_t* dv_acc = dk_acc + BK * ld_dq;
      acc_t* dq_row = dv_acc + BK * ld_dv;       // one row of the summed dQ partials
      const int64_t group = tasks.group_of(task), chunk = tasks.chunk_of(task);
      acc_t* bias_grad_copy = bias_grad.active ? bias_grad.copy_for_chunk(chunk) : nullptr;
      for (int64_t m = 0; m < tasks.pairs_per_group; ++m) {
        const int64_t bh = tasks.pair(p, group, m), b = bh / p.heads, h = bh % p.heads;
        const acc_t* lse_row = lse_data + bh * L;
        const acc_t* delta_row = delta + bh * L;
        // The chunk's first key block writes its dQ partial from the first query block that
        // sees it on (later blocks are seen by no earlier query); the rows before are zero.
        acc_t* dq_acc = dq_partials.take(bh, chunk);
        const int64_t first_row = ctx.first_query_seeing(chunk * BK) / QB * QB;
        std::fill(dq_acc, dq_acc + first_row * ld_dq, acc_t(0));
        int64_t ldq, ldo;
        const acc_t* dot_all = tile_rows<acc_t>(dout, b, h, 0, L, Dv, do_rows, ldo);
        for (int64_t i0 = first_row; i0 < L; i0 += QB) {
          const int64_t rows = std::min(QB, L - i0);
          const acc_t* qt = tile_rows<acc_t>(ctx.q, b, h, i0, rows, D, qs, ldq);
          pack_panels(qt, rows, D, ldq, int64_t(1), q_space + i0 * ld_dq);
          pack_panels(dot_all + i0 * ldo, rows, Dv, ldo, int64_t(1), do_space + i0 * ld_dv);
        }

        // Chunks take interleaved key blocks: under a causal mask early keys see more queries,
        // so contiguous ranges would leave one task with most of the work.
        for (int64_t kb = chunk; kb < kv_blocks; kb += chunks) {
          const int64_t j0 = kb * BK, cols = std::min(BK, p.kv_len - j0);
          // K^T times scale * log2(e): the products with Q are the scores themselves.
          const Panels<acc_t> kt_panels = ctx.pack_keys_transposed(kt_space, b, h, j0, cols);
          scale_row(kt_space, padded_to_panels<acc_t>(cols) * D, ctx.score_scale);
          const Panels<acc_t> k_panels = pack_panels(ctx.k.at(b, h, j0), cols, D, ctx.k.s2, ctx.k.s3, k_space);
          const Panels<acc_t> vt_panels = pack_panels(ctx.v.at(b, h, j0), Dv, cols, ctx.v.s3, ctx.v.s2, vt_space);
          std::fill(dk_acc, dk_acc + cols * ld_dq, acc_t(0));
          std::fill(dv_acc, dv_acc + cols * ld_dv, acc_t(0));
          for (int64_t i0 = ctx.first_query_seeing(j0) / QB * QB; i0 < L; i0 += QB) {
            const int64_t rows = std::min(QB, L - i0);
            const acc_t* qt = tile_rows<acc_t>(ctx.q, b, h, i0, rows, D, qs, ldq);
            const acc_t* dot = dot_all + i0 * ldo;
            const Panels<acc_t> q_panels{q_space + i0 * ld_dq, rows}, do_panels{do_space + i0 * ld_dv, rows};
            ctx.scores(st, BK, qt, ldq, kt_panels, b, h, i0, rows, j0, cols);
            for (int64_t r = 0; r < rows; ++r) ctx.probabilities_row(st + r * BK, cols, lse_row[i0 + r]);
            // Under a causal mask the products below skip what the mask hides; the dP columns
            // they leave unwritten are zeroed per row.
            gemm_packed<acc_t>(rows, cols, Dv, dot, ldo, 1, vt_panels, dpt, BK, false,
                               ctx.visible_key_columns(i0, j0, cols));  // dP = dO V^T
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* prob = st + r * BK;
              acc_t* dp = dpt + r * BK;
              const int64_t seen = ctx.visible_keys(i0 + r, j0, cols);
              // The forward used P' = P * keep / (1 - p): dP needs the same mask, dV needs P'.
              if (p.dropout_p > 0) ctx.dropout_row(dp, b, h, i0 + r, j0, seen);
              softmax_grad_row(dp, prob, seen, delta_row[i0 + r]);  // dS = P * (dP - delta)
              std::fill(dp + seen, dp + cols, acc_t(0));
              if (p.dropout_p > 0) ctx.dropout_row(prob, b, h, i0 + r, j0, cols);
            }
            const auto seeing = ctx.seeing_extent(i0, j0);
            gemm_packed<acc_t>(cols, Dv, rows, st, 1, BK, do_panels, dv_acc, ld_dv, true, seeing);  // dV += P'^T dO
            gemm_packed<acc_t>(cols, D, rows, dpt, 1, BK, q_panels, dk_acc, ld_dq, true, seeing);   // dK += dS^T Q
            gemm_packed<acc_t>(rows, D, cols, dpt, BK, 1, k_panels, dq_acc + i0 * ld_dq, ld_dq, kb != chunk,
                               ctx.visible_key_depth(i0, j0, cols));  // dQ (+)= dS K
            if (bias_grad_copy != nullptr) bias_grad.add_tile(bias_grad_copy, dpt, BK, b, h, i0, rows, j0, cols);
          }
          for (int64_t c = 0; c < cols; ++c) {
            store_row(dk.at(b, h, j0 + c), dk.s3, dk_acc + c * ld_dq, D, acc_t(p.scale));
            store_row(dv.at(b, h, j0 + c), dv.s3, dv_acc + c * ld_dv, Dv, acc_t(1));
          }
        }
        // The last of this pair's chunks sums the dQ partials, in chunk order.
        if (dq_partials.finish(bh)) {
          for (int64_t i = 0; i < L; ++i) {
            std::copy_n(dq_partials.partial(bh, 0) + i * ld_dq, D, dq_row);
            for (int64_t c = 1; c < chunks; ++c) {
              const acc_t* part = dq_partials.partial(bh, c) + i * ld_dq;
              for (int64_t d = 0; d < D; ++d) dq_row[d] += part[d];
            }
            store_row(dq.at(b, h, i), dq.s3, dq_row, D, acc_t(p.scale));
          }
          dq_partials.release(bh);
        }
      }
    };
  });

  if (bias_grad.active) grad_bias.copy_(bias_grad.result(*bias));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& logsumexp,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed, bool bias_requires_grad) {
  const auto p = check_attention_args("qkv.attention_backward", query, key, value, bias, dropout_p,
                                      is_causal, bottom_right, scale, dropout_seed);
  check_backward_args("qkv.attention_backward", query, grad_out, out, logsumexp, p);
  at::Tensor grad_q = empty_token_major(query, p.head_dim);
  at::Tensor grad_k = empty_token_major(key, p.head_dim);
  at::Tensor grad_v = empty_token_major(value, p.v_head_dim);
  at::Tensor grad_bias = empty_grad_bias(bias, bias_requires_grad, query);
  if (p.q_len == 0 || p.kv_len == 0 || p.batch * p.heads == 0) {  // nothing attends: every gradient is zero
    grad_q.zero_(), grad_k.zero_(), grad_v.zero_(), grad_bias.zero_();
    return {grad_q, grad_k, grad_v, grad_bias};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "qkv_attention_backward_cpu", [&] {
    attention_backward_cpu_impl<scalar_t>(p, grad_out, query, key, value, bias, out, logsumexp, grad_q, grad_k,
                                          grad_v, bias_requires_grad, grad_bias);
  });
  return {grad_q, grad_k, grad_v, grad_bias};
}

}  // namespace

QKV_REGISTER_CPU_KERNEL(attention_cpu_kernel, attention_forward_cpu);
QKV_REGISTER_CPU_KERNEL(attention_backward_cpu_kernel, attention_backward_cpu);

}  // namespace CPU_CAPABILITY
}  // namespace qkv
