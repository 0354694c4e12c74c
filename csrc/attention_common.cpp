// Argument checks, output layouts and the dropout seed of the core ops. Every kernel (CPU,
// CUDA, Meta) checks and allocates through the functions here, so the Meta kernels that
// torch.compile and opcheck use agree with real outputs to the stride. Sizes are compared and
// allocated as SymInts (see attention_common.h): nothing here pins a dynamic size.
#include "attention_common.h"

#include <ATen/ATen.h>
#include <c10/core/SymBool.h>

#include <cmath>
#include <sstream>

namespace qkv {

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "a " << t.dim() << "-D " << t.scalar_type() << " tensor of shape " << t.sym_sizes() << " on "
    << t.device();
  return s.str();
}

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_dims(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor; got None");
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be a ", dim, "-D tensor ", layout, "; got ", describe(t));
}

void check_like_query(const char* op, const char* name, const at::Tensor& t, const at::Tensor& query) {
  TORCH_CHECK(t.scalar_type() == query.scalar_type(), op, ": ", name, " must have the query's dtype ",
              query.scalar_type(), "; got ", describe(t));
  TORCH_CHECK(t.device() == query.device(), op, ": ", name, " must be on the query's device ", query.device(),
              "; got ", describe(t));
}

namespace {

// Sizes equal as a SymBool: a true check on symbolic sizes records a relation (or a runtime
// assert), never a specialisation to one value.
c10::SymBool sym_sizes_equal(c10::SymIntArrayRef a, c10::SymIntArrayRef b) {
  if (a.size() != b.size()) return false;
  c10::SymBool equal = true;
  for (size_t d = 0; d < a.size(); ++d) equal = equal.sym_and(a[d].sym_eq(b[d]));
  return equal;
}

// Broadcastable to (B, H, L, S): each trailing size is the full one or 1.
c10::SymBool broadcastable_to(c10::SymIntArrayRef sizes, const AttentionShape& s) {
  const c10::SymInt* full[4] = {&s.batch, &s.heads, &s.q_len, &s.kv_len};
  if (sizes.size() > 4) return false;
  c10::SymBool ok = true;
  for (size_t d = 0; d < sizes.size(); ++d) {
    const c10::SymInt& size = sizes[sizes.size() - 1 - d];
    ok = ok.sym_and(size.sym_eq(*full[3 - d]).sym_or(size.sym_eq(1)));
  }
  return ok;
}

void check_bias(const char* op, const at::Tensor& query, const at::Tensor& b, const AttentionShape& s) {
  // float32 for any query: half-precision queries keep an additive mask in their accumulation
  // type (1e5 or -1e9 would round to +-inf in float16).
  TORCH_CHECK(b.scalar_type() == query.scalar_type() || b.scalar_type() == at::kFloat, op,
              ": bias must be a floating tensor of the query's dtype ", query.scalar_type(),
              " or float32 (convert boolean masks to 0/-inf first); got ", describe(b));
  TORCH_CHECK(b.device() == query.device(), op, ": bias must be on the query's device ", query.device(), "; got ",
              describe(b));
  TORCH_SYM_CHECK(broadcastable_to(b.sym_sizes(), s), op,
                  ": bias must be broadcastable to (batch, heads, query_len, key_len) = (", s.batch, ", ", s.heads,
                  ", ", s.q_len, ", ", s.kv_len, "); got ", describe(b));
}

}  // namespace

void check_dropout_seed(const char* op, const at::Tensor& query, const std::optional<at::Tensor>& dropout_seed) {
  if (!dropout_seed.has_value() || !dropout_seed->defined()) return;
  const at::Tensor& s = *dropout_seed;
  const bool device_ok = s.device().is_cpu() || (s.is_meta() && query.is_meta());
  TORCH_CHECK(s.dim() == 0 && s.scalar_type() == at::kLong && device_ok, op,
              ": dropout_seed must be a 0-dim int64 tensor on the CPU (e.g. torch.tensor(seed), whatever the "
              "inputs' device; a meta seed only with meta inputs); got ",
              describe(s));
}

void check_head_groups(const char* op, const c10::SymInt& heads, const c10::SymInt& kv_heads) {
  // No key heads: only no query heads fit (and heads % 0 must not be evaluated).
  const auto no_kv_heads = kv_heads.maybe_as_int();
  const c10::SymBool divisible = no_kv_heads.has_value() && *no_kv_heads == 0 ? heads.sym_eq(0)
                                                                             : (heads % kv_heads).sym_eq(0);
  TORCH_SYM_CHECK(divisible, op, ": query's heads (", heads, ") must be divisible by key's heads (", kv_heads,
                  ") (grouped-query attention: query head h reads key/value head h // (heads / key heads))");
}

void check_score_options(const char* op, const at::Tensor& query, const AttentionShape& s, int64_t window_left,
                         int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(window_left >= -1, op, ": window_left must be -1 (unbounded) or >= 0; got ", window_left);
  TORCH_CHECK(window_right >= -1, op, ": window_right must be -1 (unbounded) or >= 0; got ", window_right);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be a finite number >= 0 (0: off); got ",
              softcap);
  if (!alibi_slopes.has_value() || !alibi_slopes->defined()) return;
  const at::Tensor& a = *alibi_slopes;
  const bool kind_ok = (a.dim() == 1 || a.dim() == 2) && a.scalar_type() == at::kFloat && a.device() == query.device();
  c10::SymBool shape_ok = false;
  if (kind_ok) {
    shape_ok = a.dim() == 1 ? a.sym_size(0).sym_eq(s.heads)
                            : a.sym_size(0).sym_eq(s.batch).sym_and(a.sym_size(1).sym_eq(s.heads));
  }
  TORCH_SYM_CHECK(shape_ok, op, ": alibi_slopes must be a float32 tensor of shape (", s.heads, ") or (", s.batch, ", ",
                  s.heads, ") on ", query.device(), "; got ", describe(a));
}

void set_score_options(AttentionParams& p, bool is_causal, bool bottom_right, int64_t window_left,
                       int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  p.is_causal = is_causal;
  p.bottom_right = bottom_right;
  p.window_left = window_left;
  p.window_right = window_right;
  p.softcap = softcap;
  p.has_alibi = alibi_slopes.has_value() && alibi_slopes->defined();
}

uint64_t settle_dropout_seed(const at::Tensor& query, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  if (dropout_p <= 0.0 || query.is_meta()) return 0;
  return static_cast<uint64_t>(
      (dropout_seed.has_value() && dropout_seed->defined() ? *dropout_seed : draw_dropout_seed()).item<int64_t>());
}

AttentionShape check_attention_inputs(const char* op, const at::Tensor& query, const at::Tensor& key,
                                      const at::Tensor& value, const std::optional<at::Tensor>& bias,
                                      double dropout_p, std::optional<double> scale,
                                      const std::optional<at::Tensor>& dropout_seed, int64_t window_left,
                                      int64_t window_right, double softcap,
                                      const std::optional<at::Tensor>& alibi_slopes) {
  check_dims(op, "query", query, 4, "(batch, heads, query_len, head_dim)");
  check_dims(op, "key", key, 4, "(batch, key_heads, key_len, head_dim)");
  check_dims(op, "value", value, 4, "(batch, key_heads, key_len, value_head_dim)");
  TORCH_CHECK(is_supported_dtype(query.scalar_type()), op,
              ": query must be float32, float64, float16 or bfloat16; got ", describe(query));
  check_like_query(op, "key", key, query);
  check_like_query(op, "value", value, query);
  AttentionShape s(query.sym_size(0), query.sym_size(1), query.sym_size(2), key.sym_size(2), query.sym_size(3),
                   value.sym_size(3), key.sym_size(1));
  TORCH_SYM_CHECK(key.sym_size(0).sym_eq(s.batch).sym_and(key.sym_size(3).sym_eq(s.head_dim)), op,
                  ": key must have shape (", s.batch, ", key_heads, key_len, ", s.head_dim, ") to match query ",
                  query.sym_sizes(), "; got ", describe(key));
  check_head_groups(op, s.heads, s.kv_heads);
  TORCH_SYM_CHECK(value.sym_size(0).sym_eq(s.batch).sym_and(value.sym_size(1).sym_eq(s.kv_heads))
                      .sym_and(value.sym_size(2).sym_eq(s.kv_len)),
                  op, ": value must have shape (", s.batch, ", ", s.kv_heads, ", ", s.kv_len,
                  ", value_head_dim) to match key ", key.sym_sizes(), "; got ", describe(value));
  if (bias.has_value() && bias->defined()) check_bias(op, query, *bias, s);

  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1]; got ", dropout_p);
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), op, ": scale must be a finite number; got ", *scale);
  }
  check_dropout_seed(op, query, dropout_seed);
  check_score_options(op, query, s, window_left, window_right, softcap, alibi_slopes);
  return s;
}

AttentionParams check_attention_args(const char* op, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const std::optional<at::Tensor>& bias,
                                     double dropout_p, bool is_causal, bool bottom_right,
                                     std::optional<double> scale,
                                     const std::optional<at::Tensor>& dropout_seed, int64_t window_left,
                                     int64_t window_right, double softcap,
                                     const std::optional<at::Tensor>& alibi_slopes) {
  check_attention_inputs(op, query, key, value, bias, dropout_p, scale, dropout_seed, window_left, window_right,
                         softcap, alibi_slopes);
  // Device kernels get real tensors: their sizes are plain integers.
  AttentionParams p;
  p.batch = query.size(0);
  p.heads = query.size(1);
  p.q_len = query.size(2);
  p.head_dim = query.size(3);
  p.kv_len = key.size(2);
  p.v_head_dim = value.size(3);
  p.kv_heads = key.size(1);
  p.has_bias = bias.has_value() && bias->defined();
  p.dropout_p = dropout_p;
  p.scale = scale.has_value() ? *scale : p.head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(p.head_dim)) : 1.0;
  p.causal_offset = bottom_right ? p.kv_len - p.q_len : 0;
  set_score_options(p, is_causal, bottom_right, window_left, window_right, softcap, alibi_slopes);
  // The seed is settled here, once per call: the one given (a CPU tensor, read without a
  // device sync), or a fresh draw. Shape-only (meta) calls read and draw none.
  p.dropout_seed = settle_dropout_seed(query, dropout_p, dropout_seed);
  return p;
}

void check_replay_seed(const char* op, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK(dropout_p == 0.0 || (dropout_seed.has_value() && dropout_seed->defined()), op,
              ": with dropout_p > 0 (got ", dropout_p,
              "), dropout_seed must be the seed of the forward call (its dropout mask is replayed); got None");
}

void check_tensor_arg(const char* op, const char* name, const at::Tensor& t, const at::Tensor& query,
                      at::ScalarType dtype, c10::SymIntArrayRef shape) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a ", dtype, " tensor of shape ", shape, " on ", query.device(),
              "; got None");
  TORCH_CHECK(t.scalar_type() == dtype && t.device() == query.device() &&
                  sym_sizes_equal(t.sym_sizes(), shape).expect_true(__FILE__, __LINE__),
              op, ": ", name, " must be a ", dtype, " tensor of shape ", shape, " on ", query.device(), "; got ",
              describe(t));
}

void check_backward_args(const char* op, const at::Tensor& query, const at::Tensor& grad_out,
                         const at::Tensor& out, const at::Tensor& logsumexp, const AttentionShape& s,
                         double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  const c10::SymInt out_shape[] = {s.batch, s.heads, s.q_len, s.v_head_dim};
  check_tensor_arg(op, "grad_out", grad_out, query, query.scalar_type(), out_shape);
  check_tensor_arg(op, "out", out, query, query.scalar_type(), out_shape);
  check_logsumexp_for_weights(op, query, logsumexp, s);
  check_replay_seed(op, dropout_p, dropout_seed);
}

void check_logsumexp_for_weights(const char* op, const at::Tensor& query, const at::Tensor& logsumexp,
                                 const AttentionShape& s) {
  const c10::SymInt lse_shape[] = {s.batch, s.heads, s.q_len};
  check_tensor_arg(op, "logsumexp", logsumexp, query, logsumexp_dtype(query), lse_shape);
}

AttentionShape check_attention_weights_inputs(const at::Tensor& query, const at::Tensor& key,
                                              const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                              double dropout_p, std::optional<double> scale,
                                              const std::optional<at::Tensor>& dropout_seed, int64_t window_left,
                                              int64_t window_right, double softcap,
                                              const std::optional<at::Tensor>& alibi_slopes) {
  auto s = check_attention_inputs("qkv.attention_weights", query, key, key, bias, dropout_p, scale, dropout_seed,
                                  window_left, window_right, softcap, alibi_slopes);
  check_logsumexp_for_weights("qkv.attention_weights", query, logsumexp, s);
  return s;
}

AttentionParams check_attention_weights_args(const at::Tensor& query, const at::Tensor& key,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                             double dropout_p, bool is_causal, bool bottom_right,
                                             std::optional<double> scale,
                                             const std::optional<at::Tensor>& dropout_seed, int64_t window_left,
                                             int64_t window_right, double softcap,
                                             const std::optional<at::Tensor>& alibi_slopes) {
  auto p = check_attention_args("qkv.attention_weights", query, key, key, bias, dropout_p, is_causal, bottom_right,
                                scale, dropout_seed, window_left, window_right, softcap, alibi_slopes);
  check_logsumexp_for_weights("qkv.attention_weights", query, logsumexp, p);
  return p;
}

void check_qkvpacked(const char* op, const at::Tensor& qkv) {
  check_dims(op, "qkv", qkv, 5, "(batch, seq, 3, heads, head_dim)");
  TORCH_SYM_CHECK(qkv.sym_size(2).sym_eq(3), op,
                  ": qkv must have shape (batch, seq, 3, heads, head_dim): query, key and value stacked in "
                  "dimension 2; got ", describe(qkv));
  TORCH_CHECK(is_supported_dtype(qkv.scalar_type()), op, ": qkv must be float32, float64, float16 or bfloat16; got ",
              describe(qkv));
}

std::array<at::Tensor, 3> split_packed_qkv(const at::Tensor& packed) {
  return {packed.select(2, 0).transpose(1, 2), packed.select(2, 1).transpose(1, 2),
          packed.select(2, 2).transpose(1, 2)};
}

at::Tensor empty_qkv_gradient(const at::Tensor& qkv) {
  // (Preserve would pick a channels-last-3d layout for some 5-D strides that are not dense.)
  return at::empty_like(qkv, qkv.is_non_overlapping_and_dense() ? at::MemoryFormat::Preserve
                                                                 : at::MemoryFormat::Contiguous);
}

at::Tensor expand_bias(const at::Tensor& bias, const AttentionShape& s) {
  at::Tensor b = bias;
  while (b.dim() < 4) b = b.unsqueeze(0);
  return b.expand_symint({s.batch, s.heads, s.q_len, s.kv_len});
}

at::Tensor empty_token_major(const at::Tensor& like, const c10::SymInt& last_dim) {
  return at::empty_symint({like.sym_size(0), like.sym_size(2), like.sym_size(1), last_dim}, like.options())
      .permute({0, 2, 1, 3});
}

at::Tensor empty_attention_weights(const at::Tensor& query, const AttentionShape& s, bool average_heads) {
  if (average_heads) return at::empty_symint({s.batch, s.q_len, s.kv_len}, query.options());
  return at::empty_symint({s.batch, s.heads, s.q_len, s.kv_len}, query.options());
}

at::Tensor empty_attention_output(const at::Tensor& query, const AttentionShape& s) {
  return empty_token_major(query, s.v_head_dim);
}

at::Tensor empty_grad_bias(const std::optional<at::Tensor>& bias, bool bias_requires_grad,
                           const at::Tensor& query) {
  if (bias_requires_grad && bias.has_value() && bias->defined()) {
    return at::empty_symint(bias->sym_sizes(), bias->options());
  }
  return at::empty({0}, query.options());
}

at::ScalarType logsumexp_dtype(const at::Tensor& query) {
  return query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor empty_logsumexp(const at::Tensor& query, const AttentionShape& s) {
  return at::empty_symint({s.batch, s.heads, s.q_len}, query.options().dtype(logsumexp_dtype(query)));
}

at::Tensor draw_dropout_seed() {
  return at::randint(int64_t(1) << 62, at::IntArrayRef{}, at::TensorOptions().dtype(at::kLong));
}

at::Tensor dropout_seed_tensor(uint64_t seed) {
  return at::scalar_tensor(static_cast<int64_t>(seed), at::TensorOptions().dtype(at::kLong));
}

}  // namespace qkv
