#pragma once
// The CPU kernels of the qkv operators, one CpuKernel each (cpu_capability.h): filled in by
// every compiled copy of attention_cpu.cpp and attention_weights_cpu.cpp, called by the
// operator registrations in cpu_ops.cpp. Each has its operator's signature.
#include "cpu_capability.h"

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace qkv {

using AttentionCpuFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& bias,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed);
using AttentionBackwardCpuFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& logsumexp, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
    bool bias_requires_grad);
using AttentionWeightsCpuFn = at::Tensor(const at::Tensor& query, const at::Tensor& key,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                         double dropout_p, bool is_causal, bool bottom_right,
                                         std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
                                         bool average_heads);
using AttentionWithWeightsCpuFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& bias,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed, bool average_heads);

extern CpuKernel<AttentionCpuFn> attention_cpu_kernel;
extern CpuKernel<AttentionBackwardCpuFn> attention_backward_cpu_kernel;
extern CpuKernel<AttentionWeightsCpuFn> attention_weights_cpu_kernel;
extern CpuKernel<AttentionWithWeightsCpuFn> attention_with_weights_cpu_kernel;

}  // namespace qkv
