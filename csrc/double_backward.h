// Second-order gradients of the core ops: when a backward runs with grad mode on
// (torch.autograd.grad(..., create_graph=True), gradgradcheck, gradient penalties), the
// autograd functions in autograd.cpp compute their gradients here, by differentiating a
// composite of ATen ops that materialises the (B, H, L, S) scores. Its gradients are
// themselves differentiable. Without grad mode the flash backward kernels run as before.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <vector>

namespace qkv {

// The scalar options of one core-op call, as the autograd functions keep them.
struct CallOptions {
  double dropout_p = 0.0;
  bool is_causal = false;
  bool bottom_right = false;
  std::optional<double> scale;
  int64_t window_left = -1;
  int64_t window_right = -1;
  double softcap = 0.0;
};

// Gradients of (query, key, value, bias) of the core op given the gradients reaching its output
// (grad_out) and/or its attention weights (grad_weights, head-averaged when average_heads);
// either may be undefined, value may be undefined when only the weights were computed.
// `logsumexp` is the forward's (used only to replay the dropout mask); `wanted[i]` says which
// gradients to compute (the others come back undefined). The result is differentiable in
// query, key, value, bias and the incoming gradients.
std::vector<at::Tensor> differentiable_attention_grads(const at::Tensor& grad_out, const at::Tensor& grad_weights,
                                                       bool average_heads, const at::Tensor& query,
                                                       const at::Tensor& key, const at::Tensor& value,
                                                       const at::Tensor& bias, const at::Tensor& logsumexp,
                                                       const at::Tensor& dropout_seed,
                                                       const at::Tensor& alibi_slopes, const CallOptions& options,
                                                       std::array<bool, 4> wanted);

// The same for attention_varlen (packed (total, heads, dim) tensors, sequences by their offsets):
// each sequence through the dense composite. Not with dropout (raises).
std::vector<at::Tensor> differentiable_varlen_grads(const at::Tensor& grad_out, const at::Tensor& query,
                                                    const at::Tensor& key, const at::Tensor& value,
                                                    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                    const at::Tensor& alibi_slopes, const CallOptions& options,
                                                    std::array<bool, 3> wanted);

}  // namespace qkv
