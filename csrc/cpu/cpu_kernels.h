#pragma once
// The CPU kernels of the qkv operators, one CpuKernel each (cpu_capability.h): filled in by
// every compiled copy of attention_cpu.cpp and attention_weights_cpu.cpp, called by the
// operator registrations in cpu_ops.cpp. Each has its operator's signature (registration.cpp).
#include "cpu_capability.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace qkv {

// The score options of issue 17, the trailing arguments of every op that computes scores:
// window_left, window_right, softcap, alibi_slopes.
#define QKV_CPU_SCORE_OPTIONS int64_t, int64_t, double, const std::optional<at::Tensor>&

using AttentionCpuFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& bias,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed, QKV_CPU_SCORE_OPTIONS);
using AttentionBackwardCpuFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& logsumexp, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
    bool bias_requires_grad, QKV_CPU_SCORE_OPTIONS);
using AttentionQkvpackedBackwardCpuFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& grad_out, const at::Tensor& qkv, const std::optional<at::Tensor>& bias, const at::Tensor& out,
    const at::Tensor& logsumexp, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed, bool bias_requires_grad, QKV_CPU_SCORE_OPTIONS);
using AttentionWeightsCpuFn = at::Tensor(const at::Tensor& query, const at::Tensor& key,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                         double dropout_p, bool is_causal, bool bottom_right,
                                         std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
                                         bool average_heads, QKV_CPU_SCORE_OPTIONS);
using AttentionWithWeightsCpuFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& bias,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed, bool average_heads, QKV_CPU_SCORE_OPTIONS);
using AttentionVarlenCpuFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
    QKV_CPU_SCORE_OPTIONS);
using AttentionVarlenBackwardCpuFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
    QKV_CPU_SCORE_OPTIONS);
using AttentionKvcacheCpuFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& key, const std::optional<at::Tensor>& value,
    const std::optional<at::Tensor>& cache_seqlens, bool is_causal, std::optional<double> scale,
    QKV_CPU_SCORE_OPTIONS);

#undef QKV_CPU_SCORE_OPTIONS

extern CpuKernel<AttentionCpuFn> attention_cpu_kernel;
extern CpuKernel<AttentionBackwardCpuFn> attention_backward_cpu_kernel;
extern CpuKernel<AttentionQkvpackedBackwardCpuFn> attention_qkvpacked_backward_cpu_kernel;
extern CpuKernel<AttentionWeightsCpuFn> attention_weights_cpu_kernel;
extern CpuKernel<AttentionWithWeightsCpuFn> attention_with_weights_cpu_kernel;
extern CpuKernel<AttentionVarlenCpuFn> attention_varlen_cpu_kernel;
extern CpuKernel<AttentionVarlenBackwardCpuFn> attention_varlen_backward_cpu_kernel;
extern CpuKernel<AttentionKvcacheCpuFn> attention_kvcache_cpu_kernel;

}  // namespace qkv
