#pragma once
// What every device kernel of the core attention op shares: argument checks with clear
// messages, the canonical description of one call (shapes, scale, causal alignment,
// dropout), and the output layouts. CPU, CUDA and Meta kernels all allocate through here,
// so their strides agree (fake tensors must match real ones exactly).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace qkv {

struct AttentionParams {
  int64_t batch = 0, heads = 0, q_len = 0, kv_len = 0, head_dim = 0, v_head_dim = 0;
  double scale = 1.0;
  bool is_causal = false;
  // Key j is hidden from query i when j > i + causal_offset (0: top-left, S - L: bottom-right).
  int64_t causal_offset = 0;
  double dropout_p = 0.0;
  uint64_t dropout_seed = 0;
  bool has_bias = false;
};

// Validates query/key/value/bias and the scalar options; names the offending argument.
// `op` is the op name used as the message prefix, e.g. "qkv.attention".
AttentionParams check_attention_args(const char* op, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const std::optional<at::Tensor>& bias,
                                     double dropout_p, bool is_causal, bool bottom_right,
                                     std::optional<double> scale,
                                     const std::optional<at::Tensor>& dropout_seed);

// The bias as a 4-D (B, H, L, S) view with zero strides on broadcast dimensions (no copy).
at::Tensor expand_bias(const at::Tensor& bias, const AttentionParams& p);

// Validates the tensors the backward op receives besides query/key/value/bias.
void check_backward_args(const char* op, const at::Tensor& query, const at::Tensor& grad_out,
                         const at::Tensor& out, const at::Tensor& logsumexp, const AttentionParams& p);
void check_logsumexp_for_weights(const char* op, const at::Tensor& query, const at::Tensor& logsumexp,
                                 const AttentionParams& p);
// check_attention_args and check_logsumexp_for_weights for qkv.attention_weights (key is
// also the value), the checks every device kernel of that op starts with.
AttentionParams check_attention_weights_args(const at::Tensor& query, const at::Tensor& key,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                             double dropout_p, bool is_causal, bool bottom_right,
                                             std::optional<double> scale,
                                             const std::optional<at::Tensor>& dropout_seed);

// A (B, H, L, last_dim) tensor shaped like `like` but stored as (B, L, H, last_dim): the
// layout of outputs and gradients, so merging heads afterwards needs no copy.
at::Tensor empty_token_major(const at::Tensor& like, int64_t last_dim);
at::Tensor empty_attention_output(const at::Tensor& query, const AttentionParams& p);
// Attention weights: (B, H, L, S), or (B, L, S) when averaged over heads.
at::Tensor empty_attention_weights(const at::Tensor& query, const AttentionParams& p, bool average_heads);
// The bias gradient (bias's shape), or an empty tensor when it is not wanted.
at::Tensor empty_grad_bias(const std::optional<at::Tensor>& bias, bool bias_requires_grad,
                           const at::Tensor& query);
// Logsumexp (B, H, L) in the accumulation type: float32 for reduced precision, else query's dtype.
at::Tensor empty_logsumexp(const at::Tensor& query, const AttentionParams& p);

// attention_with_weights as its two ops, `attention` then `attention_weights` from its
// logsumexp, under one dropout seed: the kernel wherever no fused one is registered.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_then_weights(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& bias,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed, bool average_heads);

// Draws a fresh seed from torch's default CPU generator (honours torch.manual_seed).
at::Tensor draw_dropout_seed();
// The seed a call settled on (`AttentionParams::dropout_seed`) as the tensor the ops take, so
// that a call passing work on to other ops does not draw a second one.
at::Tensor dropout_seed_tensor(uint64_t seed);

}  // namespace qkv
