// Core ops written as compositions of ATen ops and the other core ops
// (CompositeExplicitAutograd), so they run on every device and serve the Meta key too
// (fake tensors, torch.compile, with symbolic sizes):
//  - attention_weights_backward: the weights are already an (B, H, L, S) tensor when it
//    runs, so plain ATen matmuls are the right tool;
//  - attention_with_weights as `attention` then `attention_weights`, for every device but
//    the CPU, which has a fused kernel;
//  - attention_qkvpacked as `attention` on the three views of qkv, every device;
//  - attention_qkvpacked_backward as `attention_backward` on those views, its three gradients
//    then copied into one buffer, for every device but the CPU, whose kernel writes them there.
// (The projection ops, whole attention layers, are in projection_ops.cpp.)
#include "attention_common.h"
#include "qkv/qkv.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymFloat.h>
#include <torch/library.h>

namespace qkv {
namespace {

using OptTensor = std::optional<at::Tensor>;

// The score scale as the kernels use it, kept symbolic: the default 1 / sqrt(head_dim) must
// not pin a dynamic head_dim.
c10::SymFloat score_scale(std::optional<double> scale, const c10::SymInt& head_dim) {
  if (scale.has_value()) return *scale;
  return c10::SymFloat(1.0) / c10::SymFloat(head_dim).sqrt();
}

// dL/dS for W = dropout(softmax(S)): with P the undropped probabilities and dP the gradient
// reaching P (through the dropout mask), dS = P * (dP - rowsum(dP * P)).
// Computed in the accumulation type (float32 for float16/bfloat16, as torch's math path does):
// rowsum(dP * P) must cancel against the row's dP * P, which P rounded to float16 would not let it
// (the gradient of a bias broadcast over keys, zero in theory, came out as 2^-11 noise). The bias
// gradient comes back in the bias's dtype (a float32 bias may come with half queries).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_weights_backward_composite(
    const at::Tensor& grad_weights, const at::Tensor& query, const at::Tensor& key, const OptTensor& bias,
    const at::Tensor& logsumexp, double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const OptTensor& dropout_seed, bool bias_requires_grad, int64_t window_left, int64_t window_right,
    double softcap, const OptTensor& alibi_slopes) {
  const char* op = "qkv.attention_weights_backward";
  const auto s = check_attention_inputs(op, query, key, key, bias, dropout_p, scale, dropout_seed, window_left,
                                        window_right, softcap, alibi_slopes);
  const c10::SymInt weights_shape[] = {s.batch, s.heads, s.q_len, s.kv_len};
  check_tensor_arg(op, "grad_weights", grad_weights, query, query.scalar_type(), weights_shape);
  check_logsumexp_for_weights(op, query, logsumexp, s);
  check_replay_seed(op, dropout_p, dropout_seed);
  const bool has_bias = bias.has_value() && bias->defined();
  const auto acc_type = at::toOpMathType(query.scalar_type());
  const at::Tensor q = query.to(acc_type), k = key.to(acc_type);  // exact; no copy when already acc_type
  const OptTensor b = has_bias ? OptTensor(bias->to(acc_type)) : std::nullopt;
  const at::Tensor probs = qkv::attention_weights(q, k, b, logsumexp, 0.0, is_causal, bottom_right, scale,
                                                  std::nullopt, false, window_left, window_right, softcap,
                                                  alibi_slopes);
  at::Tensor grad_probs = grad_weights.to(acc_type);
  if (dropout_p > 0.0) {
    // keep / (1 - p) per element, recovered from the dropped weights where P > 0 (where P is
    // 0 the factor does not matter: dS is 0 there).
    const at::Tensor dropped = qkv::attention_weights(q, k, b, logsumexp, dropout_p, is_causal, bottom_right, scale,
                                                      dropout_seed, false, window_left, window_right, softcap,
                                                      alibi_slopes);
    grad_probs = grad_probs * at::where(probs > 0, dropped / probs, at::zeros_like(probs));
  }
  const at::Tensor grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, /*keepdim=*/true));
  const c10::Scalar factor(score_scale(scale, s.head_dim));
  // The weights are already a (B, H, L, S) tensor here: grouped key heads are repeated for the
  // products and their gradients summed back over each group.
  // (A view when there is one query head per key head.)
  const auto no_kv_heads = s.kv_heads.maybe_as_int();  // (no heads at all: nothing to divide)
  const c10::SymInt group = no_kv_heads.has_value() && *no_kv_heads == 0 ? c10::SymInt(1) : s.heads / s.kv_heads;
  const at::Tensor k_heads = k.unsqueeze(2).expand_symint({s.batch, s.kv_heads, group, s.kv_len, s.head_dim}).flatten(1, 2);
  at::Tensor grad_x = grad_scores;  // through softcap's tanh: d(c tanh(x / c))/dx = 1 - tanh^2
  if (softcap > 0) {
    const at::Tensor t = at::tanh(at::matmul(q, k_heads.transpose(-2, -1)).mul(factor).div(softcap));
    grad_x = grad_scores * (1 - t * t);
  }
  at::Tensor grad_q = at::matmul(grad_x, k_heads).mul(factor).to(query.scalar_type());
  at::Tensor grad_k = at::matmul(grad_x.transpose(-2, -1), q).mul(factor);
  grad_k = grad_k.unflatten_symint(1, {s.kv_heads, group}).sum(2).to(query.scalar_type());
  at::Tensor grad_bias = bias_requires_grad && has_bias
                             ? grad_scores.sum_to_size_symint(bias->sym_sizes()).to(bias->scalar_type(), false, true)
                             : empty_grad_bias(bias, false, query);
  return {grad_q, grad_k, grad_bias};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_then_weights(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const OptTensor& bias,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
    bool average_heads, int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes) {
  // Checked here so errors name this op.
  check_attention_inputs("qkv.attention_with_weights", query, key, value, bias, dropout_p, scale, dropout_seed,
                         window_left, window_right, softcap, alibi_slopes);
  // Both ops must drop the same probabilities: one seed, drawn here when none was given, goes
  // to both (shape-only calls need none).
  OptTensor seed = dropout_seed;
  if (dropout_p > 0.0 && !(seed.has_value() && seed->defined()) && !query.is_meta()) seed = draw_dropout_seed();
  auto [out, lse] = qkv::attention(query, key, value, bias, dropout_p, is_causal, bottom_right, scale, seed,
                                   window_left, window_right, softcap, alibi_slopes);
  at::Tensor weights = qkv::attention_weights(query, key, bias, lse, dropout_p, is_causal, bottom_right, scale, seed,
                                              average_heads, window_left, window_right, softcap, alibi_slopes);
  return {out, lse, weights};
}

namespace {

std::tuple<at::Tensor, at::Tensor> attention_qkvpacked_composite(
    const at::Tensor& qkv, const OptTensor& bias, double dropout_p, bool is_causal, std::optional<double> scale,
    const OptTensor& dropout_seed, int64_t window_left, int64_t window_right, double softcap,
    const OptTensor& alibi_slopes) {
  const char* op = "qkv.attention_qkvpacked";
  check_qkvpacked(op, qkv);
  const auto [q, k, v] = split_packed_qkv(qkv);
  // Checked here so errors name this op.
  check_attention_inputs(op, q, k, v, bias, dropout_p, scale, dropout_seed, window_left, window_right, softcap,
                         alibi_slopes);
  return qkv::attention(q, k, v, bias, dropout_p, is_causal, /*bottom_right=*/false, scale, dropout_seed, window_left,
                        window_right, softcap, alibi_slopes);
}

// The CUDA (and Meta) kernel: the device's attention_backward, then one copy of its three
// gradients into grad_qkv. The CUDA backward writing into grad_qkv's views in place, as the CPU
// kernel does, is a follow-up for a session with a GPU (a CUDA path must pass tests/test_cuda.py
// on one before it changes).
std::tuple<at::Tensor, at::Tensor> attention_qkvpacked_backward_composite(
    const at::Tensor& grad_out, const at::Tensor& qkv, const OptTensor& bias, const at::Tensor& out,
    const at::Tensor& logsumexp, double dropout_p, bool is_causal, std::optional<double> scale,
    const OptTensor& dropout_seed, bool bias_requires_grad, int64_t window_left, int64_t window_right,
    double softcap, const OptTensor& alibi_slopes) {
  const char* op = "qkv.attention_qkvpacked_backward";
  check_qkvpacked(op, qkv);
  const auto [q, k, v] = split_packed_qkv(qkv);
  const auto s = check_attention_inputs(op, q, k, v, bias, dropout_p, scale, dropout_seed, window_left,
                                        window_right, softcap, alibi_slopes);
  check_backward_args(op, q, grad_out, out, logsumexp, s, dropout_p, dropout_seed);
  static const auto backward_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qkv::attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
              const at::Tensor&, const at::Tensor&, double, bool, bool, std::optional<double>, const OptTensor&,
              bool, int64_t, int64_t, double, const OptTensor&)>();
  auto [dq, dk, dv, grad_bias] =
      backward_op.call(grad_out, q, k, v, bias, out, logsumexp, dropout_p, is_causal, /*bottom_right=*/false, scale,
                       dropout_seed, bias_requires_grad, window_left, window_right, softcap, alibi_slopes);
  at::Tensor grad_qkv = empty_qkv_gradient(qkv);
  const auto [gq, gk, gv] = split_packed_qkv(grad_qkv);
  gq.copy_(dq);
  gk.copy_(dk);
  gv.copy_(dv);
  return {grad_qkv, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv, CompositeExplicitAutograd, m) {
  m.impl("attention_weights_backward", &attention_weights_backward_composite);
  m.impl("attention_with_weights", &attention_then_weights);
  m.impl("attention_qkvpacked", &attention_qkvpacked_composite);
  m.impl("attention_qkvpacked_backward", &attention_qkvpacked_backward_composite);
}

}  // namespace qkv
