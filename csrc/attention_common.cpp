// Argument checks, output layouts and the Meta (shape-only) kernels of the core ops.
// Every device kernel allocates its outputs through the functions here, so the Meta
// kernels that torch.compile and opcheck use agree with real outputs to the stride.
#include "attention_common.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <sstream>

namespace qkv {
namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "a " << t.dim() << "-D " << t.scalar_type() << " tensor of shape " << t.sizes() << " on "
    << t.device();
  return s.str();
}

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_4d(const char* op, const char* name, const at::Tensor& t, const char* layout) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor; got None");
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be a 4-D tensor ", layout, "; got ", describe(t));
}

}  // namespace

AttentionParams check_attention_args(const char* op, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const std::optional<at::Tensor>& bias,
                                     double dropout_p, bool is_causal, bool bottom_right,
                                     std::optional<double> scale,
                                     const std::optional<at::Tensor>& dropout_seed) {
  check_4d(op, "query", query, "(batch, heads, query_len, head_dim)");
  check_4d(op, "key", key, "(batch, heads, key_len, head_dim)");
  check_4d(op, "value", value, "(batch, heads, key_len, value_head_dim)");
  TORCH_CHECK(is_supported_dtype(query.scalar_type()), op,
              ": query must be float32, float64, float16 or bfloat16; got ", describe(query));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"key", key}, {"value", value}}) {
    TORCH_CHECK(t.scalar_type() == query.scalar_type(), op, ": ", name,
                " must have the query's dtype ", query.scalar_type(), "; got ", describe(t));
    TORCH_CHECK(t.device() == query.device(), op, ": ", name, " must be on the query's device ",
                query.device(), "; got ", describe(t));
  }
  AttentionParams p;
  p.batch = query.size(0);
  p.heads = query.size(1);
  p.q_len = query.size(2);
  p.head_dim = query.size(3);
  p.kv_len = key.size(2);
  p.v_head_dim = value.size(3);
  TORCH_CHECK(key.size(0) == p.batch && key.size(1) == p.heads && key.size(3) == p.head_dim, op,
              ": key must have shape (", p.batch, ", ", p.heads, ", key_len, ", p.head_dim,
              ") to match query ", query.sizes(), "; got ", describe(key));
  TORCH_CHECK(value.size(0) == p.batch && value.size(1) == p.heads && value.size(2) == p.kv_len, op,
              ": value must have shape (", p.batch, ", ", p.heads, ", ", p.kv_len,
              ", value_head_dim) to match key ", key.sizes(), "; got ", describe(value));

  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.scalar_type() == query.scalar_type(), op,
                ": bias must be a floating tensor of the query's dtype ", query.scalar_type(),
                " (convert boolean masks to 0/-inf first); got ", describe(b));
    TORCH_CHECK(b.device() == query.device(), op, ": bias must be on the query's device ",
                query.device(), "; got ", describe(b));
    const int64_t full[4] = {p.batch, p.heads, p.q_len, p.kv_len};
    bool broadcastable = b.dim() <= 4;
    for (int64_t d = 0; broadcastable && d < b.dim(); ++d) {
      const int64_t size = b.size(b.dim() - 1 - d), want = full[3 - d];
      broadcastable = size == want || size == 1;
    }
    TORCH_CHECK(broadcastable, op, ": bias must be broadcastable to (batch, heads, query_len, key_len) = (",
                p.batch, ", ", p.heads, ", ", p.q_len, ", ", p.kv_len, "); got ", describe(b));
    p.has_bias = true;
  }

  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1]; got ", dropout_p);
  p.dropout_p = dropout_p;
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), op, ": scale must be a finite number; got ", *scale);
    p.scale = *scale;
  } else {
    p.scale = p.head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(p.head_dim)) : 1.0;
  }
  p.is_causal = is_causal;
  p.causal_offset = bottom_right ? p.kv_len - p.q_len : 0;

  if (dropout_seed.has_value() && dropout_seed->defined()) {
    const at::Tensor& s = *dropout_seed;
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kLong, op,
                ": dropout_seed must be an int64 tensor with one element; got ", describe(s));
    if (dropout_p > 0.0 && !s.is_meta()) {
      p.dropout_seed = static_cast<uint64_t>(s.item<int64_t>());
    }
  } else if (dropout_p > 0.0 && !query.is_meta()) {
    p.dropout_seed = static_cast<uint64_t>(draw_dropout_seed().item<int64_t>());
  }
  return p;
}

at::Tensor expand_bias(const at::Tensor& bias, const AttentionParams& p) {
  at::Tensor b = bias;
  while (b.dim() < 4) b = b.unsqueeze(0);
  return b.expand({p.batch, p.heads, p.q_len, p.kv_len});
}

at::Tensor empty_token_major(const at::Tensor& like, int64_t last_dim) {
  return at::empty({like.size(0), like.size(2), like.size(1), last_dim}, like.options())
      .permute({0, 2, 1, 3});
}

at::Tensor empty_attention_weights(const at::Tensor& query, const AttentionParams& p, bool average_heads) {
  if (average_heads) return at::empty({p.batch, p.q_len, p.kv_len}, query.options());
  return at::empty({p.batch, p.heads, p.q_len, p.kv_len}, query.options());
}

at::Tensor empty_attention_output(const at::Tensor& query, const AttentionParams& p) {
  return empty_token_major(query, p.v_head_dim);
}

at::Tensor empty_grad_bias(const std::optional<at::Tensor>& bias, bool bias_requires_grad,
                           const at::Tensor& query) {
  if (bias_requires_grad && bias.has_value() && bias->defined()) {
    return at::empty(bias->sizes(), bias->options());
  }
  return at::empty({0}, query.options());
}

void check_backward_args(const char* op, const at::Tensor& query, const at::Tensor& grad_out,
                         const at::Tensor& out, const at::Tensor& logsumexp, const AttentionParams& p) {
  const std::vector<int64_t> out_shape{p.batch, p.heads, p.q_len, p.v_head_dim};
  TORCH_CHECK(grad_out.sizes() == out_shape && grad_out.scalar_type() == query.scalar_type() &&
                  grad_out.device() == query.device(),
              op, ": grad_out must be a ", query.scalar_type(), " tensor of shape ", c10::IntArrayRef(out_shape), " on ",
              query.device(), "; got ", describe(grad_out));
  TORCH_CHECK(out.sizes() == out_shape && out.scalar_type() == query.scalar_type() &&
                  out.device() == query.device(),
              op, ": out must be a ", query.scalar_type(), " tensor of shape ", c10::IntArrayRef(out_shape), " on ",
              query.device(), "; got ", describe(out));
  check_logsumexp_for_weights(op, query, logsumexp, p);
}

void check_logsumexp_for_weights(const char* op, const at::Tensor& query, const at::Tensor& logsumexp,
                                 const AttentionParams& p) {
  const auto lse_dtype = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> lse_shape{p.batch, p.heads, p.q_len};
  TORCH_CHECK(logsumexp.defined() && logsumexp.sizes() == lse_shape &&
                  logsumexp.scalar_type() == lse_dtype && logsumexp.device() == query.device(),
              op, ": logsumexp must be a ", lse_dtype, " tensor of shape ", c10::IntArrayRef(lse_shape), " on ",
              query.device(), "; got ", describe(logsumexp));
}

AttentionParams check_attention_weights_args(const at::Tensor& query, const at::Tensor& key,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                             double dropout_p, bool is_causal, bool bottom_right,
                                             std::optional<double> scale,
                                             const std::optional<at::Tensor>& dropout_seed) {
  const auto p = check_attention_args("qkv.attention_weights", query, key, key, bias, dropout_p, is_causal,
                                      bottom_right, scale, dropout_seed);
  check_logsumexp_for_weights("qkv.attention_weights", query, logsumexp, p);
  return p;
}

at::Tensor empty_logsumexp(const at::Tensor& query, const AttentionParams& p) {
  const auto acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({p.batch, p.heads, p.q_len}, query.options().dtype(acc));
}

at::Tensor draw_dropout_seed() {
  return at::randint(int64_t(1) << 62, {1}, at::TensorOptions().dtype(at::kLong));
}

at::Tensor dropout_seed_tensor(uint64_t seed) {
  return at::full({1}, static_cast<int64_t>(seed), at::TensorOptions().dtype(at::kLong));
}

// ---- Meta kernels: shapes and strides only -------------------------------------------

namespace {

std::tuple<at::Tensor, at::Tensor> attention_forward_meta(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias, double dropout_p, bool is_causal, bool bottom_right,
    std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed) {
  const auto p = check_attention_args("qkv.attention", query, key, value, bias, dropout_p, is_causal,
                                      bottom_right, scale, dropout_seed);
  return {empty_attention_output(query, p), empty_logsumexp(query, p)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& bias, const at::Tensor& out,
    const at::Tensor& logsumexp, double dropout_p, bool is_causal, bool bottom_right,
    std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
    bool bias_requires_grad) {
  const auto p = check_attention_args("qkv.attention_backward", query, key, value, bias, dropout_p,
                                      is_causal, bottom_right, scale, dropout_seed);
  check_backward_args("qkv.attention_backward", query, grad_out, out, logsumexp, p);
  return {empty_token_major(query, p.head_dim), empty_token_major(key, p.head_dim),
          empty_token_major(value, p.v_head_dim), empty_grad_bias(bias, bias_requires_grad, query)};
}

at::Tensor attention_weights_meta(const at::Tensor& query, const at::Tensor& key,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                  double dropout_p, bool is_causal, bool bottom_right,
                                  std::optional<double> scale,
                                  const std::optional<at::Tensor>& dropout_seed, bool average_heads) {
  const auto p = check_attention_weights_args(query, key, bias, logsumexp, dropout_p, is_causal, bottom_right, scale,
                                              dropout_seed);
  return empty_attention_weights(query, p, average_heads);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv, Meta, m) {
  m.impl("attention", &attention_forward_meta);
  m.impl("attention_backward", &attention_backward_meta);
  m.impl("attention_weights", &attention_weights_meta);
}

}  // namespace qkv
