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

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& query, const at::Tensor& key,
                                             const at::Tensor& value, const OptTensor& bias, double dropout_p,
                                             bool is_causal, bool bottom_right, std::optional<double> scale,
                                             const OptTensor& dropout_seed) {
  static const auto handle =
      op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const OptTensor&, double, bool, bool, std::optional<double>,
                                            const OptTensor&)>("qkv::attention");
  return handle.call(query, key, value, bias, dropout_p, is_causal, bottom_right, scale, dropout_seed);
}

at::Tensor attention_weights(const at::Tensor& query, const at::Tensor& key, const OptTensor& bias,
                             const at::Tensor& logsumexp, double dropout_p, bool is_causal, bool bottom_right,
                             std::optional<double> scale, const OptTensor& dropout_seed, bool average_heads) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, double, bool,
                    bool, std::optional<double>, const OptTensor&, bool)>("qkv::attention_weights");
  return handle.call(query, key, bias, logsumexp, dropout_p, is_causal, bottom_right, scale, dropout_seed,
                     average_heads);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_weights(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const OptTensor& bias, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
    bool average_heads) {
  static const auto handle =
      op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const OptTensor&, double, bool, bool, std::optional<double>,
                                                        const OptTensor&, bool)>("qkv::attention_with_weights");
  return handle.call(query, key, value, bias, dropout_p, is_causal, bottom_right, scale, dropout_seed,
                     average_heads);
}

at::Tensor multi_head_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                int64_t num_heads, const at::Tensor& in_proj_weight, const OptTensor& in_proj_bias,
                                const at::Tensor& out_proj_weight, const OptTensor& out_proj_bias,
                                const OptTensor& attn_bias, bool is_causal, double dropout_p,
                                const OptTensor& dropout_seed) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&,
                    const OptTensor&, const at::Tensor&, const OptTensor&, const OptTensor&, bool, double,
                    const OptTensor&)>("qkv::multi_head_attention");
  return handle.call(query, key, value, num_heads, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                     attn_bias, is_causal, dropout_p, dropout_seed);
}

at::Tensor masked_self_attention(const at::Tensor& x, int64_t num_heads, const at::Tensor& in_proj_weight,
                                 const OptTensor& in_proj_bias, const at::Tensor& out_proj_weight,
                                 const OptTensor& out_proj_bias, const OptTensor& attn_bias, double dropout_p,
                                 const OptTensor& dropout_seed) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, int64_t, const at::Tensor&, const OptTensor&, const at::Tensor&,
                    const OptTensor&, const OptTensor&, double, const OptTensor&)>("qkv::masked_self_attention");
  return handle.call(x, num_heads, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, attn_bias,
                     dropout_p, dropout_seed);
}

at::Tensor cross_attention(const at::Tensor& query, const at::Tensor& memory, int64_t num_heads,
                           const at::Tensor& q_proj_weight, const at::Tensor& k_proj_weight,
                           const at::Tensor& v_proj_weight, const OptTensor& in_proj_bias,
                           const at::Tensor& out_proj_weight, const OptTensor& out_proj_bias,
                           const OptTensor& attn_bias, double dropout_p, const OptTensor& dropout_seed) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const OptTensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                    double, const OptTensor&)>("qkv::cross_attention");
  return handle.call(query, memory, num_heads, q_proj_weight, k_proj_weight, v_proj_weight, in_proj_bias,
                     out_proj_weight, out_proj_bias, attn_bias, dropout_p, dropout_seed);
}

}  // namespace qkv
