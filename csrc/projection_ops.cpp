// The projection ops: whole attention layers on batch-first (N, T, E) tensors, written as
// compositions of ATen ops and the core attention op (CompositeImplicitAutograd), so they run
// on every device, trace under torch.compile and get autograd from their parts:
//  - multi_head_attention: packed (3E, E) in-projection, like torch.nn.MultiheadAttention;
//  - masked_self_attention: causal self-attention (the kernel's flag, no mask tensor);
//  - cross_attention: queries from one sequence, keys and values from another (kdim).
// Each projects, attends and projects back. Sizes are SymInts throughout: tracing with
// dynamic shapes keeps the batch and sequence lengths symbolic.
#include "attention_common.h"
#include "qkv/qkv.h"

#include <ATen/ATen.h>
#include <c10/core/SymBool.h>
#include <torch/library.h>

namespace qkv {
namespace {

using OptTensor = std::optional<at::Tensor>;

void check_batch_first(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined() && t.dim() == 3, op, ": ", name,
              " must be a 3-D batch-first tensor (batch, seq, embed); got ",
              t.defined() ? std::to_string(t.dim()) + "-D tensor of shape " + c10::str(t.sym_sizes()) : "None");
}

// Projection weights and biases live on the input's device. (Their dtype is left to
// at::linear, which autocast may cast.)
void check_on_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on the input's device ", input.device(),
              "; got a tensor on ", t.device());
}

void check_weight(const char* op, const char* name, const at::Tensor& w, const at::Tensor& input,
                  const c10::SymInt& rows, const c10::SymInt& cols) {
  TORCH_CHECK(w.defined() && w.dim() == 2, op, ": ", name, " must have shape (", rows, ", ", cols, "); got ",
              w.defined() ? c10::str(w.sym_sizes()) : std::string("None"));
  TORCH_SYM_CHECK(w.sym_size(0).sym_eq(rows).sym_and(w.sym_size(1).sym_eq(cols)), op, ": ", name,
                  " must have shape (", rows, ", ", cols, "); got ", w.sym_sizes());
  check_on_device(op, name, w, input);
}

void check_bias_vector(const char* op, const char* name, const OptTensor& b, const at::Tensor& input,
                       const c10::SymInt& size) {
  if (!b.has_value() || !b->defined()) return;
  TORCH_CHECK(b->dim() == 1, op, ": ", name, " must have shape (", size, "); got ", b->sym_sizes());
  TORCH_SYM_CHECK(b->sym_size(0).sym_eq(size), op, ": ", name, " must have shape (", size, "); got ",
                  b->sym_sizes());
  check_on_device(op, name, *b, input);
}

// The additive attention bias and the seed reach the core op, which checks them; checked here
// too so that the message names this op and its argument.
void check_attention_extras(const char* op, const at::Tensor& input, const OptTensor& attn_bias,
                            const OptTensor& dropout_seed) {
  if (attn_bias.has_value() && attn_bias->defined()) check_on_device(op, "attn_bias", *attn_bias, input);
  check_dropout_seed(op, input, dropout_seed);
}

void check_head_count(const char* op, const c10::SymInt& embed_dim, int64_t num_heads) {
  TORCH_CHECK(num_heads > 0, op, ": num_heads must be positive; got ", num_heads);
  TORCH_SYM_CHECK((embed_dim % num_heads).sym_eq(0), op, ": embed_dim ", embed_dim,
                  " must be divisible by num_heads ", num_heads);
}

// (N, T, H * D) -> (N, H, T, D) as a strided view: the kernel reads heads in place.
at::Tensor split_heads(const at::Tensor& x, int64_t num_heads) {
  return x.unflatten_symint(-1, {num_heads, x.sym_size(-1) / num_heads}).transpose(1, 2);
}

// Columns [start, start + heads * head_dim) of a projection's output as (N, heads, T, head_dim).
at::Tensor heads_of(const at::Tensor& projected, const c10::SymInt& start, int64_t heads, const c10::SymInt& head_dim) {
  return split_heads(projected.narrow_symint(-1, start, head_dim * heads), heads);
}

// The key/value head count: num_kv_heads (grouped-query attention) or num_heads.
int64_t kv_heads_of(const char* op, int64_t num_heads, std::optional<int64_t> num_kv_heads) {
  if (!num_kv_heads.has_value()) return num_heads;
  TORCH_CHECK(*num_kv_heads > 0, op, ": num_kv_heads must be positive; got ", *num_kv_heads);
  TORCH_CHECK(num_heads % *num_kv_heads == 0, op, ": num_heads (", num_heads, ") must be divisible by num_kv_heads (",
              *num_kv_heads, ")");
  return *num_kv_heads;
}

// Rows [start, start + length) of a packed projection weight or bias, if there is one.
at::Tensor rows_of(const at::Tensor& packed, const c10::SymInt& start, const c10::SymInt& length) {
  return packed.narrow_symint(0, start, length);
}
OptTensor rows_of(const OptTensor& packed, const c10::SymInt& start, const c10::SymInt& length) {
  if (!packed.has_value() || !packed->defined()) return std::nullopt;
  return rows_of(*packed, start, length);
}

// The attention output's heads merged (free: it is stored token-major) and projected back.
at::Tensor merge_and_project(const at::Tensor& out, const at::Tensor& out_proj_weight, const OptTensor& out_proj_bias) {
  return at::linear(out.transpose(1, 2).flatten(2), out_proj_weight, out_proj_bias);
}

// Attention on projected heads, then merged and projected back.
at::Tensor attend_and_project(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out_proj_weight, const OptTensor& out_proj_bias,
                              const OptTensor& attn_bias, bool is_causal, double dropout_p,
                              const OptTensor& dropout_seed, int64_t window_left = -1, int64_t window_right = -1) {
  auto [out, lse] = qkv::attention(q, k, v, attn_bias, dropout_p, is_causal, /*bottom_right=*/false,
                                   std::nullopt, dropout_seed, window_left, window_right);
  return merge_and_project(out, out_proj_weight, out_proj_bias);
}

// multi_head_attention, and masked_self_attention through it; `op` names the op in errors. With
// num_kv_heads (grouped-query attention) the packed weight's key and value rows are
// num_kv_heads * head_dim each.
at::Tensor packed_projection_attention(const char* op, const at::Tensor& query, const at::Tensor& key,
                                       const at::Tensor& value, int64_t num_heads, const at::Tensor& in_proj_weight,
                                       const OptTensor& in_proj_bias, const at::Tensor& out_proj_weight,
                                       const OptTensor& out_proj_bias, const OptTensor& attn_bias, bool is_causal,
                                       double dropout_p, const OptTensor& dropout_seed,
                                       std::optional<int64_t> num_kv_heads, int64_t window_left,
                                       int64_t window_right) {
  check_batch_first(op, "query", query);
  check_batch_first(op, "key", key);
  check_batch_first(op, "value", value);
  const c10::SymInt E = query.sym_size(2);
  check_head_count(op, E, num_heads);
  const int64_t Hk = kv_heads_of(op, num_heads, num_kv_heads);
  const c10::SymInt D = E / num_heads, kvE = D * Hk;
  TORCH_SYM_CHECK(key.sym_size(2).sym_eq(E).sym_and(value.sym_size(2).sym_eq(E)), op,
                  ": key and value must have embed_dim ", E, " (use cross_attention for kdim/vdim); got key ",
                  key.sym_sizes(), " and value ", value.sym_sizes());
  TORCH_SYM_CHECK(key.sym_size(0).sym_eq(query.sym_size(0)).sym_and(value.sym_size(0).sym_eq(query.sym_size(0)))
                      .sym_and(key.sym_size(1).sym_eq(value.sym_size(1))),
                  op, ": query ", query.sym_sizes(), ", key ", key.sym_sizes(), " and value ", value.sym_sizes(),
                  " must share the batch size, and key and value the sequence length");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"key", key}, {"value", value}}) {
    check_on_device(op, name, t, query);
  }
  check_weight(op, "in_proj_weight", in_proj_weight, query, E + 2 * kvE, E);
  check_bias_vector(op, "in_proj_bias", in_proj_bias, query, E + 2 * kvE);
  check_weight(op, "out_proj_weight", out_proj_weight, query, E, E);
  check_bias_vector(op, "out_proj_bias", out_proj_bias, query, E);
  check_attention_extras(op, query, attn_bias, dropout_seed);

  at::Tensor q, k, v;
  if (query.is_same(key) && key.is_same(value)) {
    // Self-attention: one (E -> E + 2 kvE) GEMM; q, k, v are strided views of its output.
    const at::Tensor projected = at::linear(query, in_proj_weight, in_proj_bias);
    if (Hk == num_heads) {
      // As attention_qkvpacked's (N, T, 3, H, D): its backward writes the GEMM output's gradient as
      // one buffer (three views' gradients would each be a zero-filled copy of it, then summed).
      auto [out, lse] = qkv::attention_qkvpacked(projected.unflatten_symint(-1, {3, num_heads, D}), attn_bias,
                                                 dropout_p, is_causal, std::nullopt, dropout_seed, window_left,
                                                 window_right);
      return merge_and_project(out, out_proj_weight, out_proj_bias);
    }
    q = heads_of(projected, 0, num_heads, D);
    k = heads_of(projected, E, Hk, D);
    v = heads_of(projected, E + kvE, Hk, D);
  } else {
    q = split_heads(at::linear(query, rows_of(in_proj_weight, 0, E), rows_of(in_proj_bias, 0, E)), num_heads);
    if (key.is_same(value)) {
      const at::Tensor projected =
          at::linear(key, rows_of(in_proj_weight, E, 2 * kvE), rows_of(in_proj_bias, E, 2 * kvE));
      k = heads_of(projected, 0, Hk, D);
      v = heads_of(projected, kvE, Hk, D);
    } else {
      k = split_heads(at::linear(key, rows_of(in_proj_weight, E, kvE), rows_of(in_proj_bias, E, kvE)), Hk);
      v = split_heads(at::linear(value, rows_of(in_proj_weight, E + kvE, kvE), rows_of(in_proj_bias, E + kvE, kvE)),
                      Hk);
    }
  }
  return attend_and_project(q, k, v, out_proj_weight, out_proj_bias, attn_bias, is_causal, dropout_p, dropout_seed,
                            window_left, window_right);
}

at::Tensor multi_head_attention_op(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   int64_t num_heads, const at::Tensor& in_proj_weight, const OptTensor& in_proj_bias,
                                   const at::Tensor& out_proj_weight, const OptTensor& out_proj_bias,
                                   const OptTensor& attn_bias, bool is_causal, double dropout_p,
                                   const OptTensor& dropout_seed, std::optional<int64_t> num_kv_heads,
                                   int64_t window_left, int64_t window_right) {
  return packed_projection_attention("qkv.multi_head_attention", query, key, value, num_heads, in_proj_weight,
                                     in_proj_bias, out_proj_weight, out_proj_bias, attn_bias, is_causal, dropout_p,
                                     dropout_seed, num_kv_heads, window_left, window_right);
}

at::Tensor masked_self_attention_op(const at::Tensor& x, int64_t num_heads, const at::Tensor& in_proj_weight,
                                    const OptTensor& in_proj_bias, const at::Tensor& out_proj_weight,
                                    const OptTensor& out_proj_bias, const OptTensor& attn_bias, double dropout_p,
                                    const OptTensor& dropout_seed, std::optional<int64_t> num_kv_heads,
                                    int64_t window_left) {
  const char* op = "qkv.masked_self_attention";
  check_batch_first(op, "x", x);
  return packed_projection_attention(op, x, x, x, num_heads, in_proj_weight, in_proj_bias, out_proj_weight,
                                     out_proj_bias, attn_bias, /*is_causal=*/true, dropout_p, dropout_seed,
                                     num_kv_heads, window_left, -1);
}

at::Tensor cross_attention_op(const at::Tensor& query, const at::Tensor& memory, int64_t num_heads,
                              const at::Tensor& q_proj_weight, const at::Tensor& k_proj_weight,
                              const at::Tensor& v_proj_weight, const OptTensor& in_proj_bias,
                              const at::Tensor& out_proj_weight, const OptTensor& out_proj_bias,
                              const OptTensor& attn_bias, double dropout_p, const OptTensor& dropout_seed,
                              std::optional<int64_t> num_kv_heads) {
  const char* op = "qkv.cross_attention";
  check_batch_first(op, "query", query);
  check_batch_first(op, "memory", memory);
  TORCH_SYM_CHECK(memory.sym_size(0).sym_eq(query.sym_size(0)), op, ": memory must have the query's batch size ",
                  query.sym_size(0), "; got memory of shape ", memory.sym_sizes());
  check_on_device(op, "memory", memory, query);
  const c10::SymInt E = query.sym_size(2), kdim = memory.sym_size(2);
  check_head_count(op, E, num_heads);
  const int64_t Hk = kv_heads_of(op, num_heads, num_kv_heads);
  const c10::SymInt kvE = E / num_heads * Hk;
  check_weight(op, "q_proj_weight", q_proj_weight, query, E, E);
  check_weight(op, "k_proj_weight", k_proj_weight, query, kvE, kdim);
  check_weight(op, "v_proj_weight", v_proj_weight, query, kvE, kdim);
  check_bias_vector(op, "in_proj_bias", in_proj_bias, query, E + 2 * kvE);
  check_weight(op, "out_proj_weight", out_proj_weight, query, E, E);
  check_bias_vector(op, "out_proj_bias", out_proj_bias, query, E);
  check_attention_extras(op, query, attn_bias, dropout_seed);
  const at::Tensor q = split_heads(at::linear(query, q_proj_weight, rows_of(in_proj_bias, 0, E)), num_heads);
  const at::Tensor k = split_heads(at::linear(memory, k_proj_weight, rows_of(in_proj_bias, E, kvE)), Hk);
  const at::Tensor v = split_heads(at::linear(memory, v_proj_weight, rows_of(in_proj_bias, E + kvE, kvE)), Hk);
  return attend_and_project(q, k, v, out_proj_weight, out_proj_bias, attn_bias, /*is_causal=*/false, dropout_p,
                            dropout_seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv, CompositeImplicitAutograd, m) {
  m.impl("multi_head_attention", &multi_head_attention_op);
  m.impl("masked_self_attention", &masked_self_attention_op);
  m.impl("cross_attention", &cross_attention_op);
}

}  // namespace qkv
