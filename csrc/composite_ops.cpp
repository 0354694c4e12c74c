// Ops written as compositions of ATen ops and the core qkv ops, so they run on every
// device, trace under torch.compile and get autograd from their parts:
//  - the three mission ops (CompositeImplicitAutograd): project, attend, project back;
//  - attention_weights_backward (CompositeExplicitAutograd): the weights are already an
//    (B, H, L, S) tensor when it runs, so plain ATen matmuls are the right tool;
//  - attention_with_weights (CompositeExplicitAutograd) as `attention` then
//    `attention_weights`, for every device but the CPU, which has a fused kernel.
#include "attention_common.h"
#include "qkv/qkv.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace qkv {
namespace {

using OptTensor = std::optional<at::Tensor>;

void check_batch_first(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined() && t.dim() == 3, op, ": ", name,
              " must be a 3-D batch-first tensor (batch, seq, embed); got ",
              t.defined() ? std::to_string(t.dim()) + "-D tensor of shape " + c10::str(t.sizes()) : "None");
}

void check_weight(const char* op, const char* name, const at::Tensor& w, int64_t rows, int64_t cols) {
  TORCH_CHECK(w.defined() && w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, op, ": ", name,
              " must have shape (", rows, ", ", cols, "); got ",
              w.defined() ? c10::str(w.sizes()) : std::string("None"));
}

void check_bias_vector(const char* op, const char* name, const OptTensor& b, int64_t size) {
  if (!b.has_value() || !b->defined()) return;
  TORCH_CHECK(b->dim() == 1 && b->size(0) == size, op, ": ", name, " must have shape (", size, "); got ",
              b->sizes());
}

int64_t head_dim_of(const char* op, int64_t embed_dim, int64_t num_heads) {
  TORCH_CHECK(num_heads > 0, op, ": num_heads must be positive; got ", num_heads);
  TORCH_CHECK(embed_dim % num_heads == 0, op, ": embed_dim ", embed_dim, " must be divisible by num_heads ",
              num_heads);
  return embed_dim / num_heads;
}

// (N, T, H * D) -> (N, H, T, D) as a strided view: the kernel reads heads in place.
at::Tensor split_heads(const at::Tensor& x, int64_t num_heads) {
  return x.unflatten(-1, {num_heads, x.size(-1) / num_heads}).transpose(1, 2);
}

// Rows [start, start + length) of a packed projection bias, if there is one.
OptTensor slice_of(const OptTensor& packed, int64_t start, int64_t length) {
  if (!packed.has_value() || !packed->defined()) return std::nullopt;
  return packed->narrow(0, start, length);
}

// Attention on projected heads, then heads merged (free: the output is stored token-major)
// and projected back.
at::Tensor attend_and_project(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out_proj_weight, const OptTensor& out_proj_bias,
                              const OptTensor& attn_bias, bool is_causal, double dropout_p,
                              const OptTensor& dropout_seed) {
  auto [out, lse] = qkv::attention(q, k, v, attn_bias, dropout_p, is_causal, /*bottom_right=*/false,
                                   std::nullopt, dropout_seed);
  return at::linear(out.transpose(1, 2).flatten(2), out_proj_weight, out_proj_bias);
}

at::Tensor multi_head_attention_composite(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                          int64_t num_heads, const at::Tensor& in_proj_weight,
                                          const OptTensor& in_proj_bias, const at::Tensor& out_proj_weight,
                                          const OptTensor& out_proj_bias, const OptTensor& attn_bias,
                                          bool is_causal, double dropout_p, const OptTensor& dropout_seed) {
  const char* op = "qkv.multi_head_attention";
  check_batch_first(op, "query", query);
  check_batch_first(op, "key", key);
  check_batch_first(op, "value", value);
  const int64_t E = query.size(2);
  head_dim_of(op, E, num_heads);
  TORCH_CHECK(key.size(2) == E && value.size(2) == E, op, ": key and value must have embed_dim ", E,
              " (use cross_attention for kdim/vdim); got key ", key.sizes(), " and value ", value.sizes());
  TORCH_CHECK(key.size(0) == query.size(0) && value.size(0) == query.size(0) && key.size(1) == value.size(1), op,
              ": query ", query.sizes(), ", key ", key.sizes(), " and value ", value.sizes(),
              " must share the batch size, and key and value the sequence length");
  check_weight(op, "in_proj_weight", in_proj_weight, 3 * E, E);
  check_bias_vector(op, "in_proj_bias", in_proj_bias, 3 * E);
  check_weight(op, "out_proj_weight", out_proj_weight, E, E);
  check_bias_vector(op, "out_proj_bias", out_proj_bias, E);

  at::Tensor q, k, v;
  if (query.is_same(key) && key.is_same(value)) {
    // Self-attention: one (E -> 3E) GEMM; q, k, v are strided views of its output.
    const auto heads = split_heads(at::linear(query, in_proj_weight, in_proj_bias), 3 * num_heads);
    q = heads.narrow(1, 0, num_heads);
    k = heads.narrow(1, num_heads, num_heads);
    v = heads.narrow(1, 2 * num_heads, num_heads);
  } else {
    q = split_heads(at::linear(query, in_proj_weight.narrow(0, 0, E), slice_of(in_proj_bias, 0, E)), num_heads);
    if (key.is_same(value)) {
      const auto heads = split_heads(
          at::linear(key, in_proj_weight.narrow(0, E, 2 * E), slice_of(in_proj_bias, E, 2 * E)), 2 * num_heads);
      k = heads.narrow(1, 0, num_heads);
      v = heads.narrow(1, num_heads, num_heads);
    } else {
      k = split_heads(at::linear(key, in_proj_weight.narrow(0, E, E), slice_of(in_proj_bias, E, E)), num_heads);
      v = split_heads(at::linear(value, in_proj_weight.narrow(0, 2 * E, E), slice_of(in_proj_bias, 2 * E, E)),
                      num_heads);
    }
  }
  return attend_and_project(q, k, v, out_proj_weight, out_proj_bias, attn_bias, is_causal, dropout_p, dropout_seed);
}

at::Tensor masked_self_attention_composite(const at::Tensor& x, int64_t num_heads, const at::Tensor& in_proj_weight,
                                           const OptTensor& in_proj_bias, const at::Tensor& out_proj_weight,
                                           const OptTensor& out_proj_bias, const OptTensor& attn_bias,
                                           double dropout_p, const OptTensor& dropout_seed) {
  check_batch_first("qkv.masked_self_attention", "x", x);
  return multi_head_attention_composite(x, x, x, num_heads, in_proj_weight, in_proj_bias, out_proj_weight,
                                        out_proj_bias, attn_bias, /*is_causal=*/true, dropout_p, dropout_seed);
}

at::Tensor cross_attention_composite(const at::Tensor& query, const at::Tensor& memory, int64_t num_heads,
                                     const at::Tensor& q_proj_weight, const at::Tensor& k_proj_weight,
                                     const at::Tensor& v_proj_weight, const OptTensor& in_proj_bias,
                                     const at::Tensor& out_proj_weight, const OptTensor& out_proj_bias,
                                     const OptTensor& attn_bias, double dropout_p, const OptTensor& dropout_seed) {
  const char* op = "qkv.cross_attention";
  check_batch_first(op, "query", query);
  check_batch_first(op, "memory", memory);
  TORCH_CHECK(memory.size(0) == query.size(0), op, ": memory must have the query's batch size ", query.size(0),
              "; got memory of shape ", memory.sizes());
  const int64_t E = query.size(2), kdim = memory.size(2);
  head_dim_of(op, E, num_heads);
  check_weight(op, "q_proj_weight", q_proj_weight, E, E);
  check_weight(op, "k_proj_weight", k_proj_weight, E, kdim);
  check_weight(op, "v_proj_weight", v_proj_weight, E, kdim);
  check_bias_vector(op, "in_proj_bias", in_proj_bias, 3 * E);
  check_weight(op, "out_proj_weight", out_proj_weight, E, E);
  check_bias_vector(op, "out_proj_bias", out_proj_bias, E);
  const at::Tensor q = split_heads(at::linear(query, q_proj_weight, slice_of(in_proj_bias, 0, E)), num_heads);
  const at::Tensor k = split_heads(at::linear(memory, k_proj_weight, slice_of(in_proj_bias, E, E)), num_heads);
  const at::Tensor v = split_heads(at::linear(memory, v_proj_weight, slice_of(in_proj_bias, 2 * E, E)), num_heads);
  return attend_and_project(q, k, v, out_proj_weight, out_proj_bias, attn_bias, /*is_causal=*/false, dropout_p,
                            dropout_seed);
}

// dL/dS for W = dropout(softmax(S)): with P the undropped probabilities and dP the gradient
// reaching P (through the dropout mask), dS = P * (dP - rowsum(dP * P)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_weights_backward_composite(
    const at::Tensor& grad_weights, const at::Tensor& query, const at::Tensor& key, const OptTensor& bias,
    const at::Tensor& logsumexp, double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const OptTensor& dropout_seed, bool bias_requires_grad) {
  const auto p = check_attention_args("qkv.attention_weights_backward", query, key, key, bias, dropout_p,
                                      is_causal, bottom_right, scale, dropout_seed);
  const at::Tensor probs = qkv::attention_weights(query, key, bias, logsumexp, 0.0, is_causal, bottom_right,
                                                  p.scale, std::nullopt);
  at::Tensor grad_probs = grad_weights;
  if (dropout_p > 0.0) {
    // keep / (1 - p) per element, recovered from the dropped weights where P > 0 (where P is
    // 0 the factor does not matter: dS is 0 there).
    const at::Tensor dropped = qkv::attention_weights(query, key, bias, logsumexp, dropout_p, is_causal,
                                                      bottom_right, p.scale, dropout_seed);
    grad_probs = grad_weights * at::where(probs > 0, dropped / probs, at::zeros_like(probs));
  }
  const at::Tensor grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, /*keepdim=*/true));
  at::Tensor grad_q = at::matmul(grad_scores, key) * p.scale;
  at::Tensor grad_k = at::matmul(grad_scores.transpose(-2, -1), query) * p.scale;
  at::Tensor grad_bias = bias_requires_grad && p.has_bias ? grad_scores.sum_to_size(bias->sizes()).clone()
                                                          : empty_grad_bias(bias, false, query);
  return {grad_q, grad_k, grad_bias};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_then_weights(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const OptTensor& bias,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
    bool average_heads) {
  // Checked here so errors name this op. Both ops must drop the same probabilities: the seed
  // the check settled on (drawn when none was given; fake tensors need none) goes to both.
  const auto p = check_attention_args("qkv.attention_with_weights", query, key, value, bias, dropout_p, is_causal,
                                      bottom_right, scale, dropout_seed);
  OptTensor seed = dropout_seed;
  if (dropout_p > 0.0 && !(seed.has_value() && seed->defined()) && !query.is_meta()) {
    seed = dropout_seed_tensor(p.dropout_seed);
  }
  auto [out, lse] = qkv::attention(query, key, value, bias, dropout_p, is_causal, bottom_right, scale, seed);
  at::Tensor weights = qkv::attention_weights(query, key, bias, lse, dropout_p, is_causal, bottom_right, scale, seed,
                                              average_heads);
  return {out, lse, weights};
}

TORCH_LIBRARY_IMPL(qkv, CompositeImplicitAutograd, m) {
  m.impl("multi_head_attention", &multi_head_attention_composite);
  m.impl("masked_self_attention", &masked_self_attention_composite);
  m.impl("cross_attention", &cross_attention_composite);
}

TORCH_LIBRARY_IMPL(qkv, CompositeExplicitAutograd, m) {
  m.impl("attention_weights_backward", &attention_weights_backward_composite);
  m.impl("attention_with_weights", &attention_then_weights);
}

}  // namespace qkv
