// The CPU operator registrations: each runs the copy of its kernel that the active CPU
// capability selects (cpu_capability.h). Baseline build.
#include "cpu_kernels.h"

#include <torch/library.h>

#include <utility>

namespace qkv {

constinit CpuKernel<AttentionCpuFn> attention_cpu_kernel("qkv.attention");
constinit CpuKernel<AttentionBackwardCpuFn> attention_backward_cpu_kernel("qkv.attention_backward");
constinit CpuKernel<AttentionQkvpackedBackwardCpuFn> attention_qkvpacked_backward_cpu_kernel(
    "qkv.attention_qkvpacked_backward");
constinit CpuKernel<AttentionWeightsCpuFn> attention_weights_cpu_kernel("qkv.attention_weights");
constinit CpuKernel<AttentionWithWeightsCpuFn> attention_with_weights_cpu_kernel("qkv.attention_with_weights");
constinit CpuKernel<AttentionVarlenCpuFn> attention_varlen_cpu_kernel("qkv.attention_varlen");
constinit CpuKernel<AttentionVarlenBackwardCpuFn> attention_varlen_backward_cpu_kernel(
    "qkv.attention_varlen_backward");
constinit CpuKernel<AttentionKvcacheCpuFn> attention_kvcache_cpu_kernel("qkv.attention_kvcache");

namespace {

// The operator's CPU function for `kernel`: a plain function of the operator's signature that
// calls the active capability's copy.
template <typename Fn>
struct CallActive;
template <typename R, typename... Args>
struct CallActive<R(Args...)> {
  template <const CpuKernel<R(Args...)>* kernel>
  static R call(Args... args) {
    return (*kernel)(std::forward<Args>(args)...);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(qkv, CPU, m) {
  m.impl("attention", &CallActive<AttentionCpuFn>::call<&attention_cpu_kernel>);
  m.impl("attention_backward", &CallActive<AttentionBackwardCpuFn>::call<&attention_backward_cpu_kernel>);
  m.impl("attention_qkvpacked_backward",
         &CallActive<AttentionQkvpackedBackwardCpuFn>::call<&attention_qkvpacked_backward_cpu_kernel>);
  m.impl("attention_weights", &CallActive<AttentionWeightsCpuFn>::call<&attention_weights_cpu_kernel>);
  m.impl("attention_with_weights", &CallActive<AttentionWithWeightsCpuFn>::call<&attention_with_weights_cpu_kernel>);
  m.impl("attention_varlen", &CallActive<AttentionVarlenCpuFn>::call<&attention_varlen_cpu_kernel>);
  m.impl("attention_varlen_backward",
         &CallActive<AttentionVarlenBackwardCpuFn>::call<&attention_varlen_backward_cpu_kernel>);
  m.impl("attention_kvcache", &CallActive<AttentionKvcacheCpuFn>::call<&attention_kvcache_cpu_kernel>);
}

}  // namespace qkv
