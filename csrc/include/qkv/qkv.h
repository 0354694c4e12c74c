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
// key/value may have fewer heads Hk (H % Hk == 0, grouped-query attention: query head h reads
// key/value head h / (H / Hk)). Query i sees keys [i + off - window_left, i + off + window_right]
// (-1 unbounded; off = S - L when bottom_right; is_causal sets window_right = 0); softcap > 0
// maps scores s to softcap * tanh(s / softcap) before ALiBi (-alibi_slopes[b, h] * |i + off - j|,
// float32 (H,) or (B, H)), the bias and the masks. See docs/flash-attn-api.md.
std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& query, const at::Tensor& key,
                                             const at::Tensor& value,
                                             const std::optional<at::Tensor>& bias = std::nullopt,
                                             double dropout_p = 0.0, bool is_causal = false,
                                             bool bottom_right = false, std::optional<double> scale = std::nullopt,
                                             const std::optional<at::Tensor>& dropout_seed = std::nullopt,
                                             int64_t window_left = -1, int64_t window_right = -1,
                                             double softcap = 0.0,
                                             const std::optional<at::Tensor>& alibi_slopes = std::nullopt);

// Self-attention on one packed tensor (flash-attn's qkvpacked layout): qkv (B, L, 3, H, D), any
// strides; query, key and value are qkv[:, :, i].transpose(1, 2). Returns `attention`'s
// (out (B, H, L, D), logsumexp (B, H, L)) for those views, with the same options (L == S: no
// causal alignment to choose). Its backward writes the gradient of qkv as one (B, L, 3, H, D)
// tensor (with qkv's strides when qkv is dense), not three gradients stacked by a copy.
// Differentiable, twice.
std::tuple<at::Tensor, at::Tensor> attention_qkvpacked(
    const at::Tensor& qkv, const std::optional<at::Tensor>& bias = std::nullopt, double dropout_p = 0.0,
    bool is_causal = false, std::optional<double> scale = std::nullopt,
    const std::optional<at::Tensor>& dropout_seed = std::nullopt, int64_t window_left = -1,
    int64_t window_right = -1, double softcap = 0.0, const std::optional<at::Tensor>& alibi_slopes = std::nullopt);

// Packed variable-length sequences (no padding): query (total_q, H, D), key (total_k, Hk, D),
// value (total_k, Hk, Dv); sequence b is rows cu_seqlens[b]..cu_seqlens[b + 1] (int32 or int64,
// batch + 1 offsets); max_seqlen_* bound the lengths. The options as `attention`, per sequence.
// Returns (out (total_q, H, Dv), logsumexp (H, total_q)). Differentiable.
std::tuple<at::Tensor, at::Tensor> attention_varlen(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p = 0.0,
    bool is_causal = false, bool bottom_right = false, std::optional<double> scale = std::nullopt,
    const std::optional<at::Tensor>& dropout_seed = std::nullopt, int64_t window_left = -1,
    int64_t window_right = -1, double softcap = 0.0, const std::optional<at::Tensor>& alibi_slopes = std::nullopt);

// Decoding from a KV cache (inference only): key/value (B, Hk, S_new, D), when given, are written
// into k_cache/v_cache (B, Hk, S_cache, D) in place at rows cache_seqlens[b] ((B,) int32/int64;
// nullopt: the whole cache is in use), then query (B, H, S_q, D) attends to the first
// cache_seqlens[b] + S_new keys, bottom-right aligned. Returns (out, logsumexp).
std::tuple<at::Tensor, at::Tensor> attention_kvcache(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& key = std::nullopt, const std::optional<at::Tensor>& value = std::nullopt,
    const std::optional<at::Tensor>& cache_seqlens = std::nullopt, bool is_causal = false,
    std::optional<double> scale = std::nullopt, int64_t window_left = -1, int64_t window_right = -1,
    double softcap = 0.0, const std::optional<at::Tensor>& alibi_slopes = std::nullopt);

// The attention probabilities (B, H, L, S) rebuilt from `attention`'s logsumexp, with the
// same dropout mask when given the same dropout_p and dropout_seed; with average_heads,
// their mean over heads (B, L, S). Differentiable.
at::Tensor attention_weights(const at::Tensor& query, const at::Tensor& key,
                             const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                             double dropout_p = 0.0, bool is_causal = false, bool bottom_right = false,
                             std::optional<double> scale = std::nullopt,
                             const std::optional<at::Tensor>& dropout_seed = std::nullopt,
                             bool average_heads = false, int64_t window_left = -1, int64_t window_right = -1,
                             double softcap = 0.0, const std::optional<at::Tensor>& alibi_slopes = std::nullopt);

// `attention` and `attention_weights` in one call, (out, logsumexp, weights): on the CPU,
// Q K^T is computed once for both. Differentiable in out and weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_weights(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias = std::nullopt, double dropout_p = 0.0, bool is_causal = false,
    bool bottom_right = false, std::optional<double> scale = std::nullopt,
    const std::optional<at::Tensor>& dropout_seed = std::nullopt, bool average_heads = false,
    int64_t window_left = -1, int64_t window_right = -1, double softcap = 0.0,
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt);

// Multi-head attention with packed in-projection (3E, E), like torch.nn.MultiheadAttention.
// With num_kv_heads (grouped-query attention) the key and value projections have
// num_kv_heads * head_dim rows: in_proj_weight is ((num_heads + 2 * num_kv_heads) * head_dim, E).
at::Tensor multi_head_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                int64_t num_heads, const at::Tensor& in_proj_weight,
                                const std::optional<at::Tensor>& in_proj_bias, const at::Tensor& out_proj_weight,
                                const std::optional<at::Tensor>& out_proj_bias,
                                const std::optional<at::Tensor>& attn_bias = std::nullopt, bool is_causal = false,
                                double dropout_p = 0.0,
                                const std::optional<at::Tensor>& dropout_seed = std::nullopt,
                                std::optional<int64_t> num_kv_heads = std::nullopt, int64_t window_left = -1,
                                int64_t window_right = -1);

// Causal (decoder) self-attention: query i sees keys 0..i. No mask tensor is built.
at::Tensor masked_self_attention(const at::Tensor& x, int64_t num_heads, const at::Tensor& in_proj_weight,
                                 const std::optional<at::Tensor>& in_proj_bias, const at::Tensor& out_proj_weight,
                                 const std::optional<at::Tensor>& out_proj_bias,
                                 const std::optional<at::Tensor>& attn_bias = std::nullopt,
                                 double dropout_p = 0.0,
                                 const std::optional<at::Tensor>& dropout_seed = std::nullopt,
                                 std::optional<int64_t> num_kv_heads = std::nullopt, int64_t window_left = -1);

// Queries from `query` (N, L, E), keys and values from `memory` (N, S, kdim == vdim),
// with separate projection weights q (E, E), k (E, kdim), v (E, kdim) and a packed (3E) bias.
at::Tensor cross_attention(const at::Tensor& query, const at::Tensor& memory, int64_t num_heads,
                           const at::Tensor& q_proj_weight, const at::Tensor& k_proj_weight,
                           const at::Tensor& v_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
                           const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
                           const std::optional<at::Tensor>& attn_bias = std::nullopt, double dropout_p = 0.0,
                           const std::optional<at::Tensor>& dropout_seed = std::nullopt,
                           std::optional<int64_t> num_kv_heads = std::nullopt);

}  // namespace qkv
