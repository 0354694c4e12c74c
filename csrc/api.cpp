// The C++ API: thin wrappers that call each qkv operator through the dispatcher.
#include "qkv/qkv.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace qkv {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using OptTensor = std::optional<at::Tensor>;
using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using T = const at::Tensor&;
using OT = const OptTensor&;

}  // namespace

Pair attention(T query, T key, T value, OT bias, double dropout_p, bool is_causal, bool bottom_right,
               std::optional<double> scale, OT dropout_seed, int64_t window_left, int64_t window_right, double softcap,
               OT alibi_slopes) {
  static const auto handle = op<Pair(T, T, T, OT, double, bool, bool, std::optional<double>, OT, int64_t, int64_t,
                                     double, OT)>("qkv::attention");
  return handle.call(query, key, value, bias, dropout_p, is_causal, bottom_right, scale, dropout_seed, window_left,
                     window_right, softcap, alibi_slopes);
}

Pair attention_qkvpacked(T qkv, OT bias, double dropout_p, bool is_causal, std::optional<double> scale,
                         OT dropout_seed, int64_t window_left, int64_t window_right, double softcap, OT alibi_slopes) {
  static const auto handle =
      op<Pair(T, OT, double, bool, std::optional<double>, OT, int64_t, int64_t, double, OT)>("qkv::attention_qkvpacked");
  return handle.call(qkv, bias, dropout_p, is_causal, scale, dropout_seed, window_left, window_right, softcap,
                     alibi_slopes);
}

Pair attention_varlen(T query, T key, T value, T cu_seqlens_q, T cu_seqlens_k, int64_t max_seqlen_q,
                      int64_t max_seqlen_k, double dropout_p, bool is_causal, bool bottom_right,
                      std::optional<double> scale, OT dropout_seed, int64_t window_left, int64_t window_right,
                      double softcap, OT alibi_slopes) {
  static const auto handle =
      op<Pair(T, T, T, T, T, c10::SymInt, c10::SymInt, double, bool, bool, std::optional<double>, OT, int64_t, int64_t,
              double, OT)>("qkv::attention_varlen");
  return handle.call(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal,
                     bottom_right, scale, dropout_seed, window_left, window_right, softcap, alibi_slopes);
}

Pair attention_kvcache(T query, T k_cache, T v_cache, OT key, OT value, OT cache_seqlens, bool is_causal,
                       std::optional<double> scale, int64_t window_left, int64_t window_right, double softcap,
                       OT alibi_slopes) {
  static const auto handle =
      op<Pair(T, T, T, OT, OT, OT, bool, std::optional<double>, int64_t, int64_t, double, OT)>(
          "qkv::attention_kvcache");
  return handle.call(query, k_cache, v_cache, key, value, cache_seqlens, is_causal, scale, window_left, window_right,
                     softcap, alibi_slopes);
}

at::Tensor attention_weights(T query, T key, OT bias, T logsumexp, double dropout_p, bool is_causal, bool bottom_right,
                             std::optional<double> scale, OT dropout_seed, bool average_heads, int64_t window_left,
                             int64_t window_right, double softcap, OT alibi_slopes) {
  static const auto handle = op<at::Tensor(T, T, OT, T, double, bool, bool, std::optional<double>, OT, bool, int64_t,
                                           int64_t, double, OT)>("qkv::attention_weights");
  return handle.call(query, key, bias, logsumexp, dropout_p, is_causal, bottom_right, scale, dropout_seed,
                     average_heads, window_left, window_right, softcap, alibi_slopes);
}

Triple attention_with_weights(T query, T key, T value, OT bias, double dropout_p, bool is_causal, bool bottom_right,
                              std::optional<double> scale, OT dropout_seed, bool average_heads, int64_t window_left,
                              int64_t window_right, double softcap, OT alibi_slopes) {
  static const auto handle = op<Triple(T, T, T, OT, double, bool, bool, std::optional<double>, OT, bool, int64_t,
                                       int64_t, double, OT)>("qkv::attention_with_weights");
  return handle.call(query, key, value, bias, dropout_p, is_causal, bottom_right, scale, dropout_seed, average_heads,
                     window_left, window_right, softcap, alibi_slopes);
}

at::Tensor multi_head_attention(T query, T key, T value, int64_t num_heads, T in_proj_weight, OT in_proj_bias,
                                T out_proj_weight, OT out_proj_bias, OT attn_bias, bool is_causal, double dropout_p,
                                OT dropout_seed, std::optional<int64_t> num_kv_heads, int64_t window_left,
                                int64_t window_right) {
  static const auto handle = op<at::Tensor(T, T, T, int64_t, T, OT, T, OT, OT, bool, double, OT, std::optional<int64_t>,
                                           int64_t, int64_t)>("qkv::multi_head_attention");
  return handle.call(query, key, value, num_heads, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                     attn_bias, is_causal, dropout_p, dropout_seed, num_kv_heads, window_left, window_right);
}

at::Tensor masked_self_attention(T x, int64_t num_heads, T in_proj_weight, OT in_proj_bias, T out_proj_weight,
                                 OT out_proj_bias, OT attn_bias, double dropout_p, OT dropout_seed,
                                 std::optional<int64_t> num_kv_heads, int64_t window_left) {
  static const auto handle = op<at::Tensor(T, int64_t, T, OT, T, OT, OT, double, OT, std::optional<int64_t>, int64_t)>(
      "qkv::masked_self_attention");
  return handle.call(x, num_heads, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, attn_bias, dropout_p,
                     dropout_seed, num_kv_heads, window_left);
}

at::Tensor cross_attention(T query, T memory, int64_t num_heads, T q_proj_weight, T k_proj_weight, T v_proj_weight,
                           OT in_proj_bias, T out_proj_weight, OT out_proj_bias, OT attn_bias, double dropout_p,
                           OT dropout_seed, std::optional<int64_t> num_kv_heads) {
  static const auto handle = op<at::Tensor(T, T, int64_t, T, T, T, OT, T, OT, OT, double, OT, std::optional<int64_t>)>(
      "qkv::cross_attention");
  return handle.call(query, memory, num_heads, q_proj_weight, k_proj_weight, v_proj_weight, in_proj_bias,
                     out_proj_weight, out_proj_bias, attn_bias, dropout_p, dropout_seed, num_kv_heads);
}

}  // namespace qkv
