// The Meta kernels of the core ops: shapes, strides, dtypes and argument errors, no data.
// torch.compile, fake tensors and opcheck run these. They check and allocate through the
// functions every device kernel uses (attention_common, sequence_args), on symbolic sizes:
// under torch.compile(dynamic=True) one traced graph serves every sequence length.
// (attention_with_weights and attention_weights_backward need none: their
// CompositeExplicitAutograd kernels in composite_ops.cpp serve the Meta key.)
#include "attention_common.h"
#include "sequence_args.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace qkv {
namespace {

using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> attention_forward_meta(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const OptTensor& bias, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
    int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes) {
  const auto s = check_attention_inputs("qkv.attention", query, key, value, bias, dropout_p, scale, dropout_seed,
                                        window_left, window_right, softcap, alibi_slopes);
  return {empty_attention_output(query, s), empty_logsumexp(query, s)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const OptTensor& bias, const at::Tensor& out, const at::Tensor& logsumexp, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed, bool bias_requires_grad,
    int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes) {
  const char* op = "qkv.attention_backward";
  const auto s = check_attention_inputs(op, query, key, value, bias, dropout_p, scale, dropout_seed, window_left,
                                        window_right, softcap, alibi_slopes);
  check_backward_args(op, query, grad_out, out, logsumexp, s, dropout_p, dropout_seed);
  return {empty_token_major(query, s.head_dim), empty_token_major(key, s.head_dim),
          empty_token_major(value, s.v_head_dim), empty_grad_bias(bias, bias_requires_grad, query)};
}

at::Tensor attention_weights_meta(const at::Tensor& query, const at::Tensor& key, const OptTensor& bias,
                                  const at::Tensor& logsumexp, double dropout_p, bool is_causal, bool bottom_right,
                                  std::optional<double> scale, const OptTensor& dropout_seed, bool average_heads,
                                  int64_t window_left, int64_t window_right, double softcap,
                                  const OptTensor& alibi_slopes) {
  const auto s = check_attention_weights_inputs(query, key, bias, logsumexp, dropout_p, scale, dropout_seed,
                                                window_left, window_right, softcap, alibi_slopes);
  return empty_attention_weights(query, s, average_heads);
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_meta(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
    int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes) {
  const auto s = check_varlen_inputs("qkv.attention_varlen", query, key, value, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, dropout_p, scale, dropout_seed, window_left,
                                     window_right, softcap, alibi_slopes);
  return {empty_varlen_output(query, s), empty_varlen_logsumexp(query)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
    int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes) {
  const char* op = "qkv.attention_varlen_backward";
  const auto s = check_varlen_inputs(op, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     dropout_p, scale, dropout_seed, window_left, window_right, softcap,
                                     alibi_slopes);
  check_varlen_backward_args(op, query, grad_out, out, logsumexp, s, dropout_p, dropout_seed);
  return {empty_varlen_gradient(query), empty_varlen_gradient(key), empty_varlen_gradient(value)};
}

std::tuple<at::Tensor, at::Tensor> attention_kvcache_meta(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache, const OptTensor& key,
    const OptTensor& value, const OptTensor& cache_seqlens, bool is_causal, std::optional<double> scale,
    int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes) {
  const auto s = check_kvcache_inputs("qkv.attention_kvcache", query, k_cache, v_cache, key, value, cache_seqlens,
                                      scale, window_left, window_right, softcap, alibi_slopes);
  return {empty_attention_output(query, s), empty_logsumexp(query, s)};
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv, Meta, m) {
  m.impl("attention", &attention_forward_meta);
  m.impl("attention_backward", &attention_backward_meta);
  m.impl("attention_weights", &attention_weights_meta);
  m.impl("attention_varlen", &attention_varlen_meta);
  m.impl("attention_varlen_backward", &attention_varlen_backward_meta);
  m.impl("attention_kvcache", &attention_kvcache_meta);
}

}  // namespace qkv
