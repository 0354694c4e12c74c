// The Meta kernels of the core ops: shapes, strides, dtypes and argument errors, no data.
// torch.compile, fake tensors and opcheck run these. They check and allocate through the
// functions every device kernel uses (attention_common), on symbolic sizes: under
// torch.compile(dynamic=True) one traced graph serves every sequence length.
// (attention_with_weights and attention_weights_backward need none: their
// CompositeExplicitAutograd kernels in composite_ops.cpp serve the Meta key.)
#include "attention_common.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace qkv {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_forward_meta(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias, double dropout_p, bool is_causal, bool bottom_right,
    std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed) {
  const auto s = check_attention_inputs("qkv.attention", query, key, value, bias, dropout_p, scale, dropout_seed);
  return {empty_attention_output(query, s), empty_logsumexp(query, s)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& bias, const at::Tensor& out,
    const at::Tensor& logsumexp, double dropout_p, bool is_causal, bool bottom_right,
    std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
    bool bias_requires_grad) {
  const char* op = "qkv.attention_backward";
  const auto s = check_attention_inputs(op, query, key, value, bias, dropout_p, scale, dropout_seed);
  check_backward_args(op, query, grad_out, out, logsumexp, s, dropout_p, dropout_seed);
  return {empty_token_major(query, s.head_dim), empty_token_major(key, s.head_dim),
          empty_token_major(value, s.v_head_dim), empty_grad_bias(bias, bias_requires_grad, query)};
}

at::Tensor attention_weights_meta(const at::Tensor& query, const at::Tensor& key,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                  double dropout_p, bool is_causal, bool bottom_right,
                                  std::optional<double> scale,
                                  const std::optional<at::Tensor>& dropout_seed, bool average_heads) {
  const auto s = check_attention_weights_inputs(query, key, bias, logsumexp, dropout_p, scale, dropout_seed);
  return empty_attention_weights(query, s, average_heads);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv, Meta, m) {
  m.impl("attention", &attention_forward_meta);
  m.impl("attention_backward", &attention_backward_meta);
  m.impl("attention_weights", &attention_weights_meta);
}

}  // namespace qkv
