// The CPU operator registrations: each runs the copy of its kernel that the active CPU
// capability selects (cpu_capability.h). Baseline build.
#include "cpu_kernels.h"

#include <torch/library.h>

namespace qkv {

constinit CpuKernel<AttentionCpuFn> attention_cpu_kernel("qkv.attention");
constinit CpuKernel<AttentionBackwardCpuFn> attention_backward_cpu_kernel("qkv.attention_backward");
constinit CpuKernel<AttentionWeightsCpuFn> attention_weights_cpu_kernel("qkv.attention_weights");
constinit CpuKernel<AttentionWithWeightsCpuFn> attention_with_weights_cpu_kernel("qkv.attention_with_weights");

namespace {

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, const std::optional<at::Tensor>& bias,
                                                 double dropout_p, bool is_causal, bool bottom_right,
                                                 std::optional<double> scale,
                                                 const std::optional<at::Tensor>& dropout_seed) {
  return attention_cpu_kernel(query, key, value, bias, dropout_p, is_causal, bottom_right, scale, dropout_seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& logsumexp, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
    bool bias_requires_grad) {
  return attention_backward_cpu_kernel(grad_out, query, key, value, bias, out, logsumexp, dropout_p, is_causal,
                                       bottom_right, scale, dropout_seed, bias_requires_grad);
}

at::Tensor attention_weights_cpu(const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& logsumexp, double dropout_p, bool is_causal, bool bottom_right,
                                 std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
                                 bool average_heads) {
  return attention_weights_cpu_kernel(query, key, bias, logsumexp, dropout_p, is_causal, bottom_right, scale,
                                      dropout_seed, average_heads);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_weights_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& bias,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed, bool average_heads) {
  return attention_with_weights_cpu_kernel(query, key, value, bias, dropout_p, is_causal, bottom_right, scale,
                                           dropout_seed, average_heads);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("attention_weights", &attention_weights_cpu);
  m.impl("attention_with_weights", &attention_with_weights_cpu);
}

}  // namespace qkv
