// CPU kernels of the core attention op: flash-style forward (online softmax over key blocks,
// only a per-row logsumexp saved), backward (probabilities recomputed from the logsumexp)
// and the explicit attention-weights op. No L x S buffer is ever allocated: work happens in
// (query block x key block) tiles held in per-thread scratch.
//
// Reduced precision (half, bfloat16) is converted to float32 while packing a tile, so all
// arithmetic accumulates in float32 (float64 stays float64 for gradcheck).
#include "../attention_common.h"
#include "../kernels/dropout_hash.h"
#include "tile_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace qkv {
namespace {

constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 128;

// A read-only 4-D strided view: element (b, h, i, d) of a (B, H, L, D) tensor.
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

// Copies `rows` rows of length `cols` from a strided source into a dense acc_t tile,
// multiplied by `mul`.
template <typename acc_t, typename scalar_t>
void pack_rows(acc_t* dst, const scalar_t* src, int64_t rows, int64_t cols, int64_t row_stride,
               int64_t col_stride, acc_t mul) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * row_stride;
    acc_t* d = dst + r * cols;
    if (col_stride == 1) {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c]) * mul;
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c * col_stride]) * mul;
    }
  }
}

template <typename scalar_t, typename acc_t>
void store_rows(scalar_t* dst, int64_t row_stride, const acc_t* src, int64_t rows, int64_t cols,
                acc_t mul) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[r * row_stride + c] = static_cast<scalar_t>(src[r * cols + c] * mul);
  }
}

// Everything a tile loop needs to know about one (batch, head) pair.
template <typename scalar_t>
struct TileContext {
  const AttentionParams& p;
  Strided4<scalar_t> q, k, v;
  const scalar_t* bias_data = nullptr;  // expanded (B, H, L, S) strides, zeros on broadcast dims
  int64_t bias_s0 = 0, bias_s1 = 0, bias_s2 = 0, bias_s3 = 0;
  uint64_t keep_threshold = 0;

  TileContext(const AttentionParams& params, const at::Tensor& query, const at::Tensor& key,
              const at::Tensor& value, const std::optional<at::Tensor>& bias)
      : p(params), q(query), k(key), v(value) {
    if (p.has_bias) {
      at::Tensor e = expand_bias(*bias, p);
      bias_data = e.const_data_ptr<scalar_t>();
      bias_s0 = e.stride(0), bias_s1 = e.stride(1), bias_s2 = e.stride(2), bias_s3 = e.stride(3);
    }
    keep_threshold = dropout_threshold(p.dropout_p);
  }

  // Index one past the last key that any query row in [i0, i1) may see.
  int64_t key_end(int64_t i1) const {
    if (!p.is_causal) return p.kv_len;
    return std::clamp<int64_t>(i1 - 1 + p.causal_offset + 1, 0, p.kv_len);
  }
  // First query row that can see key j0 (causal only).
  int64_t first_query_seeing(int64_t j0) const {
    if (!p.is_causal) return 0;
    return std::clamp<int64_t>(j0 - p.causal_offset, 0, p.q_len);
  }

  // scores[r][c] = qtile[r] . ktile[c] (q pre-scaled) + bias, -inf where causally hidden.
  template <typename acc_t>
  void scores(acc_t* out, const acc_t* qtile, const acc_t* ktile, int64_t b, int64_t h, int64_t i0,
              int64_t rows, int64_t j0, int64_t cols) const {
    gemm_nt<acc_t>(rows, cols, p.head_dim, qtile, p.head_dim, ktile, p.head_dim, out, kKeyBlock, acc_t(0));
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* s = out + r * kKeyBlock;
      const int64_t i = i0 + r;
      if (bias_data != nullptr) {
        const scalar_t* brow = bias_data + b * bias_s0 + h * bias_s1 + i * bias_s2 + j0 * bias_s3;
        for (int64_t c = 0; c < cols; ++c) s[c] += static_cast<acc_t>(brow[c * bias_s3]);
      }
      if (p.is_causal) {
        const int64_t visible = std::clamp<int64_t>(i + p.causal_offset - j0 + 1, 0, cols);
        for (int64_t c = visible; c < cols; ++c) s[c] = neg_inf;
      }
    }
  }

  // Applies the dropout mask and 1/(1-p) scaling to a row of probabilities in place.
  template <typename acc_t>
  void dropout_row(acc_t* row, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols) const {
    const acc_t keep_scale = p.dropout_p < 1.0 ? acc_t(1.0 / (1.0 - p.dropout_p)) : acc_t(0);
    const uint64_t base = ((static_cast<uint64_t>(b) * p.heads + h) * p.q_len + i) * p.kv_len + j0;
    for (int64_t c = 0; c < cols; ++c) {
      row[c] = dropout_keep(p.dropout_seed, base + c, keep_threshold) ? row[c] * keep_scale : acc_t(0);
    }
  }
};

// Per-thread scratch: a pack of dense tiles reused across every work item of a thread.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> buf;
  acc_t* take(size_t n, size_t& offset) {
    acc_t* ptr = buf.data() + offset;
    offset += n;
    return ptr;
  }
};

// ---- forward ----------------------------------------------------------------------------

template <typename scalar_t>
void attention_forward_cpu_impl(const AttentionParams& p, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const std::optional<at::Tensor>& bias,
                                at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileContext<scalar_t> ctx(p, query, key, value, bias);
  MutableStrided4<scalar_t> o(out);
  acc_t* lse_data = lse.data_ptr<acc_t>();  // contiguous (B, H, L)
  const int64_t D = p.head_dim, Dv = p.v_head_dim;
  const int64_t q_blocks = (p.q_len + kQueryBlock - 1) / kQueryBlock;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, p.batch * p.heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(kQueryBlock * D), kt(kKeyBlock * D), vt(kKeyBlock * Dv),
        st(kQueryBlock * kKeyBlock), acc(kQueryBlock * Dv), row_max(kQueryBlock), row_sum(kQueryBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % q_blocks, bh = item / q_blocks, b = bh / p.heads, h = bh % p.heads;
      const int64_t i0 = qb * kQueryBlock, rows = std::min(kQueryBlock, p.q_len - i0);
      pack_rows(qt.data(), ctx.q.at(b, h, i0), rows, D, ctx.q.s2, ctx.q.s3, acc_t(p.scale));
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(row_max.begin(), row_max.end(), neg_inf);
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));

      const int64_t j_end = ctx.key_end(i0 + rows);
      for (int64_t j0 = 0; j0 < j_end; j0 += kKeyBlock) {
        const int64_t cols = std::min(kKeyBlock, j_end - j0);
        pack_rows(kt.data(), ctx.k.at(b, h, j0), cols, D, ctx.k.s2, ctx.k.s3, acc_t(1));
        pack_rows(vt.data(), ctx.v.at(b, h, j0), cols, Dv, ctx.v.s2, ctx.v.s3, acc_t(1));
        ctx.scores(st.data(), qt.data(), kt.data(), b, h, i0, rows, j0, cols);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s = st.data() + r * kKeyBlock;
          const acc_t new_max = std::max(row_max[r], row_max_of(s, cols));
          if (new_max == neg_inf) {  // nothing visible yet in this row
            std::fill(s, s + cols, acc_t(0));
            continue;
          }
          const acc_t correction = std::exp(row_max[r] - new_max);
          row_sum[r] = row_sum[r] * correction + exp_and_sum(s, cols, new_max);
          row_max[r] = new_max;
          if (correction != acc_t(1)) scale_row(acc.data() + r * Dv, Dv, correction);
          if (p.dropout_p > 0) ctx.dropout_row(s, b, h, i0 + r, j0, cols);
        }
        gemm_nn<acc_t>(rows, Dv, cols, st.data(), kKeyBlock, vt.data(), Dv, acc.data(), Dv, acc_t(1));
      }

      for (int64_t r = 0; r < rows; ++r) {
        const bool empty = row_sum[r] == acc_t(0);
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / row_sum[r];
        store_rows(o.at(b, h, i0 + r), 0, acc.data() + r * Dv, 1, Dv, inv);
        lse_data[bh * p.q_len + i0 + r] = empty ? neg_inf : row_max[r] + std::log(row_sum[r]);
      }
    }
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "qkv_attention_cpu", [&] {
    attention_forward_cpu_impl<scalar_t>(p, query, key, value, bias, out, lse);
  });
  return {out, lse};
}

// ---- backward ---------------------------------------------------------------------------

// Accumulates dS into the bias gradient. When the bias broadcasts over batch or heads,
// several (b, h) work items hit the same elements, so each thread owns a private copy
// that is summed at the end; otherwise items own disjoint slices of one buffer.
template <typename acc_t>
struct BiasGradAccumulator {
  bool active = false, per_thread = false;
  int64_t sizes[4] = {1, 1, 1, 1};   // bias broadcast shape as 4-D
  int64_t strides[4] = {0, 0, 0, 0};  // into one copy, zero on broadcast dims
  int64_t copy_numel = 0;
  at::Tensor buffer;  // (threads or 1, Bb, Hb, Lb, Sb) in acc_t

  BiasGradAccumulator(const AttentionParams& p, const std::optional<at::Tensor>& bias, bool wanted) {
    if (!wanted || !p.has_bias) return;
    active = true;
    const int64_t offset = 4 - bias->dim();
    for (int64_t d = 0; d < bias->dim(); ++d) sizes[offset + d] = bias->size(d);
    const int64_t full[4] = {p.batch, p.heads, p.q_len, p.kv_len};
    int64_t stride = 1;
    for (int64_t d = 3; d >= 0; --d) {
      strides[d] = sizes[d] == 1 && full[d] != 1 ? 0 : stride;
      stride *= sizes[d];
    }
    copy_numel = stride;
    per_thread = (sizes[0] == 1 && p.batch > 1) || (sizes[1] == 1 && p.heads > 1);
    const int64_t copies = per_thread ? at::get_num_threads() : 1;
    buffer = at::zeros({copies, copy_numel}, bias->options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }

  acc_t* copy_for_this_thread() const {
    return buffer.data_ptr<acc_t>() + (per_thread ? at::get_thread_num() * copy_numel : 0);
  }

  void add_tile(acc_t* copy, const acc_t* ds, int64_t ld, int64_t b, int64_t h, int64_t i0,
                int64_t rows, int64_t j0, int64_t cols) const {
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* g = copy + b * strides[0] + h * strides[1] + (i0 + r) * strides[2] + j0 * strides[3];
      const acc_t* d = ds + r * ld;
      for (int64_t c = 0; c < cols; ++c) g[c * strides[3]] += d[c];
    }
  }

  at::Tensor result(const at::Tensor& bias) const {
    return buffer.sum(0).to(bias.scalar_type()).view(bias.sizes());
  }
};

template <typename scalar_t>
void attention_backward_cpu_impl(const AttentionParams& p, const at::Tensor& grad_out, const at::Tensor& query,
                                 const at::Tensor& key, const at::Tensor& value,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& out,
                                 const at::Tensor& lse, at::Tensor& grad_q, at::Tensor& grad_k,
                                 at::Tensor& grad_v, BiasGradAccumulator<at::opmath_type<scalar_t>>& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileContext<scalar_t> ctx(p, query, key, value, bias);
  const Strided4<scalar_t> dout(grad_out), o(out);
  MutableStrided4<scalar_t> dq(grad_q), dk(grad_k), dv(grad_v);
  const at::Tensor lse_c = lse.contiguous();
  const acc_t* lse_data = lse_c.const_data_ptr<acc_t>();
  const int64_t D = p.head_dim, Dv = p.v_head_dim, L = p.q_len;

  // One work item per (batch, head); each owns its dQ accumulator.
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(kQueryBlock * D), dot(kQueryBlock * Dv), kt(kKeyBlock * D), vt(kKeyBlock * Dv),
        st(kQueryBlock * kKeyBlock), dpt(kQueryBlock * kKeyBlock), dk_acc(kKeyBlock * D),
        dv_acc(kKeyBlock * Dv), dq_acc(L * D), delta(L), ot(Dv);
    acc_t* bias_grad_copy = grad_bias.active ? grad_bias.copy_for_this_thread() : nullptr;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const acc_t* lse_row = lse_data + bh * L;
      // delta_i = dO_i . O_i, the row sums of dP * P, computed once per row.
      for (int64_t i = 0; i < L; ++i) {
        pack_rows(dot.data(), dout.at(b, h, i), 1, Dv, dout.s2, dout.s3, acc_t(1));
        pack_rows(ot.data(), o.at(b, h, i), 1, Dv, o.s2, o.s3, acc_t(1));
        acc_t sum = 0;
        for (int64_t c = 0; c < Dv; ++c) sum += dot[c] * ot[c];
        delta[i] = sum;
      }
      std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));

      for (int64_t j0 = 0; j0 < p.kv_len; j0 += kKeyBlock) {
        const int64_t cols = std::min(kKeyBlock, p.kv_len - j0);
        pack_rows(kt.data(), ctx.k.at(b, h, j0), cols, D, ctx.k.s2, ctx.k.s3, acc_t(1));
        pack_rows(vt.data(), ctx.v.at(b, h, j0), cols, Dv, ctx.v.s2, ctx.v.s3, acc_t(1));
        std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
        std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
        const int64_t i_start = ctx.first_query_seeing(j0) / kQueryBlock * kQueryBlock;
        for (int64_t i0 = i_start; i0 < L; i0 += kQueryBlock) {
          const int64_t rows = std::min(kQueryBlock, L - i0);
          pack_rows(qt.data(), ctx.q.at(b, h, i0), rows, D, ctx.q.s2, ctx.q.s3, acc_t(p.scale));
          pack_rows(dot.data(), dout.at(b, h, i0), rows, Dv, dout.s2, dout.s3, acc_t(1));
          ctx.scores(st.data(), qt.data(), kt.data(), b, h, i0, rows, j0, cols);
          // P = exp(S - lse); rows that attend to nothing (lse = -inf) have P = 0.
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* s = st.data() + r * kKeyBlock;
            const acc_t l = lse_row[i0 + r];
            if (l == -std::numeric_limits<acc_t>::infinity()) {
              std::fill(s, s + cols, acc_t(0));
            } else {
              exp_and_sum(s, cols, l);
            }
          }
          // dP = dO V^T
          gemm_nt<acc_t>(rows, cols, Dv, dot.data(), Dv, vt.data(), Dv, dpt.data(), kKeyBlock, acc_t(0));
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* s = st.data() + r * kKeyBlock;
            acc_t* dpr = dpt.data() + r * kKeyBlock;
            if (p.dropout_p > 0) {
              // The forward used P' = P * keep / (1 - p): dV needs P', dP needs the same mask.
              ctx.dropout_row(dpr, b, h, i0 + r, j0, cols);
            }
            // dS = P * (dP - delta), written into dpt; st keeps P (dropped out below for dV).
            const acc_t d = delta[i0 + r];
            for (int64_t c = 0; c < cols; ++c) dpr[c] = s[c] * (dpr[c] - d);
            if (p.dropout_p > 0) ctx.dropout_row(s, b, h, i0 + r, j0, cols);
          }
          // dV += P'^T dO ; dK += dS^T (scale * Q) ; dQ += dS K (scaled at the end)
          gemm_tn<acc_t>(cols, Dv, rows, st.data(), kKeyBlock, dot.data(), Dv, dv_acc.data(), Dv, acc_t(1));
          gemm_tn<acc_t>(cols, D, rows, dpt.data(), kKeyBlock, qt.data(), D, dk_acc.data(), D, acc_t(1));
          gemm_nn<acc_t>(rows, D, cols, dpt.data(), kKeyBlock, kt.data(), D, dq_acc.data() + i0 * D, D, acc_t(1));
          if (bias_grad_copy != nullptr) grad_bias.add_tile(bias_grad_copy, dpt.data(), kKeyBlock, b, h, i0, rows, j0, cols);
        }
        for (int64_t c = 0; c < cols; ++c) {
          store_rows(dk.at(b, h, j0 + c), 0, dk_acc.data() + c * D, 1, D, acc_t(1));
          store_rows(dv.at(b, h, j0 + c), 0, dv_acc.data() + c * Dv, 1, Dv, acc_t(1));
        }
      }
      for (int64_t i = 0; i < L; ++i) {
        store_rows(dq.at(b, h, i), 0, dq_acc.data() + i * D, 1, D, acc_t(p.scale));
      }
    }
  });
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "qkv_attention_backward_cpu", [&] {
    BiasGradAccumulator<at::opmath_type<scalar_t>> bias_acc(p, bias, bias_requires_grad);
    attention_backward_cpu_impl<scalar_t>(p, grad_out, query, key, value, bias, out, logsumexp, grad_q,
                                          grad_k, grad_v, bias_acc);
    if (bias_acc.active) grad_bias.copy_(bias_acc.result(*bias));
  });
  return {grad_q, grad_k, grad_v, grad_bias};
}

// ---- explicit attention weights -----------------------------------------------------------

template <typename scalar_t>
void attention_weights_cpu_impl(const AttentionParams& p, const at::Tensor& query, const at::Tensor& key,
                                const std::optional<at::Tensor>& bias, const at::Tensor& lse,
                                at::Tensor& weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileContext<scalar_t> ctx(p, query, key, key, bias);
  const at::Tensor lse_c = lse.contiguous();
  const acc_t* lse_data = lse_c.const_data_ptr<acc_t>();
  scalar_t* w = weights.data_ptr<scalar_t>();  // contiguous (B, H, L, S)
  const int64_t D = p.head_dim, q_blocks = (p.q_len + kQueryBlock - 1) / kQueryBlock;

  at::parallel_for(0, p.batch * p.heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(kQueryBlock * D), kt(kKeyBlock * D), st(kQueryBlock * kKeyBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % q_blocks, bh = item / q_blocks, b = bh / p.heads, h = bh % p.heads;
      const int64_t i0 = qb * kQueryBlock, rows = std::min(kQueryBlock, p.q_len - i0);
      pack_rows(qt.data(), ctx.q.at(b, h, i0), rows, D, ctx.q.s2, ctx.q.s3, acc_t(p.scale));
      for (int64_t j0 = 0; j0 < p.kv_len; j0 += kKeyBlock) {
        const int64_t cols = std::min(kKeyBlock, p.kv_len - j0);
        pack_rows(kt.data(), ctx.k.at(b, h, j0), cols, D, ctx.k.s2, ctx.k.s3, acc_t(1));
        ctx.scores(st.data(), qt.data(), kt.data(), b, h, i0, rows, j0, cols);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s = st.data() + r * kKeyBlock;
          const acc_t l = lse_data[bh * p.q_len + i0 + r];
          if (l == -std::numeric_limits<acc_t>::infinity()) {
            std::fill(s, s + cols, acc_t(0));
          } else {
            exp_and_sum(s, cols, l);
          }
          if (p.dropout_p > 0) ctx.dropout_row(s, b, h, i0 + r, j0, cols);
          scalar_t* dst = w + (bh * p.q_len + i0 + r) * p.kv_len + j0;
          for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<scalar_t>(s[c]);
        }
      }
    }
  });
}

at::Tensor attention_weights_cpu(const at::Tensor& query, const at::Tensor& key,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                 double dropout_p, bool is_causal, bool bottom_right,
                                 std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed) {
  const auto p = check_attention_args("qkv.attention_weights", query, key, key, bias, dropout_p, is_causal,
                                      bottom_right, scale, dropout_seed);
  check_logsumexp_for_weights("qkv.attention_weights", query, logsumexp, p);
  at::Tensor weights = at::empty({p.batch, p.heads, p.q_len, p.kv_len}, query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "qkv_attention_weights_cpu", [&] {
    attention_weights_cpu_impl<scalar_t>(p, query, key, bias, logsumexp, weights);
  });
  return weights;
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv, CPU, m) {
  m.impl("attention", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("attention_weights", &attention_weights_cpu);
}

}  // namespace qkv
