#pragma once
// qkv public C++ API for LibTorch programs. Every function calls the registered
// `qkv::` operator through the dispatcher, so it runs on CPU or CUDA tensors and records
// autograd exactly as the Python API does.
//
// Conventions: the core op takes (batch, heads, seq, head_dim) tensors with any strides;
// the projection ops (multi_head_attention, masked_self_attention, cross_attention: whole
// attention layers that project, attend and project back) take batch-first (batch, seq,
// embed) tensors. `bias` / `attn_bias` are additive float tensors (the query's dtype or
// float32) that broadcast to (batch, heads, query_len, key_len); use -inf to hide a key
// (finite values, however large, are added as numbers). A query row that can see no key
// outputs zeros (never NaN). `dropout_seed` is a 0-dim int64 CPU tensor whatever the
// inputs' device (torch::tensor(seed)).
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace qkv {

// softmax(scale * Q K^T + bias) V, flash-style: no (L x S) matrix is materialised.
// Returns (out (B, H, L, Dv), logsumexp (B, H, L)). Causal alignment is top-left like
// torch's SDPA unless `bottom_right`. With dropout_p > 0 and no dropout_seed, a seed is
// drawn from torch's default generator; the backward replays that mask.
std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& query, const at::Tensor& key,
                                             const at::Tensor& value,
                                             const std::optional<at::Tensor>& bias = std::nullopt,
                                             double dropout_p = 0.0, bool is_causal = false,
                                             bool bottom_right = false, std::optional<double> scale = std::nullopt,
                                             const std::optional<at::Tensor>& dropout_seed = std::nullopt);

// The attention probabilities (B, H, L, S) rebuilt from `attention`'s logsumexp, with the
// same dropout mask when given the same dropout_p and dropout_seed; with average_heads,
// their mean over heads (B, L, S). Differentiable.
at::Tensor attention_weights(const at::Tensor& query, const at::Tensor& key,
                             const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                             double dropout_p = 0.0, bool is_causal = false, bool bottom_right = false,
                             std::optional<double> scale = std::nullopt,
                             const std::optional<at::Tensor>& dropout_seed = std::nullopt,
                             bool average_heads = false);

// `attention` and `attention_weights` in one call, (out, logsumexp, weights): on the CPU,
// Q K^T is computed once for both. Differentiable in out and weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_weights(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias = std::nullopt, double dropout_p = 0.0, bool is_causal = false,
    bool bottom_right = false, std::optional<double> scale = std::nullopt,
    const std::optional<at::Tensor>& dropout_seed = std::nullopt, bool average_heads = false);

// Multi-head attention with packed in-projection (3E, E), like torch.nn.MultiheadAttention.
at::Tensor multi_head_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                int64_t num_heads, const at::Tensor& in_proj_weight,
                                const std::optional<at::Tensor>& in_proj_bias, const at::Tensor& out_proj_weight,
                                const std::optional<at::Tensor>& out_proj_bias,
                                const std::optional<at::Tensor>& attn_bias = std::nullopt, bool is_causal = false,
                                double dropout_p = 0.0,
                                const std::optional<at::Tensor>& dropout_seed = std::nullopt);

// Causal (decoder) self-attention: query i sees keys 0..i. No mask tensor is built.
at::Tensor masked_self_attention(const at::Tensor& x, int64_t num_heads, const at::Tensor& in_proj_weight,
                                 const std::optional<at::Tensor>& in_proj_bias, const at::Tensor& out_proj_weight,
                                 const std::optional<at::Tensor>& out_proj_bias,
                                 const std::optional<at::Tensor>& attn_bias = std::nullopt,
                                 double dropout_p = 0.0,
                                 const std::optional<at::Tensor>& dropout_seed = std::nullopt);

// Queries from `query` (N, L, E), keys and values from `memory` (N, S, kdim == vdim),
// with separate projection weights q (E, E), k (E, kdim), v (E, kdim) and a packed (3E) bias.
at::Tensor cross_attention(const at::Tensor& query, const at::Tensor& memory, int64_t num_heads,
                           const at::Tensor& q_proj_weight, const at::Tensor& k_proj_weight,
                           const at::Tensor& v_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
                           const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
                           const std::optional<at::Tensor>& attn_bias = std::nullopt, double dropout_p = 0.0,
                           const std::optional<at::Tensor>& dropout_seed = std::nullopt);

}  // namespace qkv
