// CUDA kernels of the core attention ops, as seen by torch: argument checks and output layouts
// shared with the CPU and Meta kernels (attention_common), the device guard and current stream,
// then plain-data arguments handed to the kernel launchers (*.cu, which include no ATen headers).
//
// Dispatch: the tensor-core kernels (float16/bfloat16, head_dim == v_head_dim in {64, 128},
// aligned rows, sm_80+; the backward also no bias gradient) when the call qualifies, else the
// generic kernels. The environment variable QKV_CUDA_KERNEL overrides this per call: "generic"
// always takes the generic kernels, "mma" requires the tensor-core kernels and "fa2" the
// FlashAttention-2-class kernels (an error if the call does not qualify); tests use each to check
// every path against the same reference. fa2 stays opt-in until tests/test_cuda.py passes with it
// on a GPU. Its backward sums dQ in a fixed order when torch.use_deterministic_algorithms is on.
#include "../attention_common.h"
#include "kernel_args.h"
#include "kernel_params.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

namespace qkv {
namespace {

using namespace qkv::cuda;

void check_cuda_limits(const char* op, const at::Tensor& query, const AttentionParams& p) {
  TORCH_CHECK(query.is_cuda(), op, ": the CUDA kernel got a query on ", query.device());
  // Issue 17's options are implemented by the CPU kernels only so far: refuse, never ignore.
  TORCH_CHECK(!uses_score_options(p), op,
              ": grouped key/value heads, windows, softcap and ALiBi are not implemented by the CUDA kernels yet "
              "(CPU only); got key heads ", p.kv_heads, " for ", p.heads, " query heads, window (", p.window_left,
              ", ", p.window_right, "), softcap ", p.softcap, ", ALiBi ", p.has_alibi ? "on" : "off");
  TORCH_CHECK(p.head_dim <= kMaxHeadDim && p.v_head_dim <= kMaxHeadDim, op,
              ": on CUDA, head_dim and value_head_dim must be at most ", kMaxHeadDim, "; got ",
              p.head_dim, " and ", p.v_head_dim);
}

enum class KernelChoice { Auto, Generic, Mma, Fa2 };

KernelChoice kernel_choice() {
  const char* value = std::getenv("QKV_CUDA_KERNEL");
  if (value == nullptr || std::strcmp(value, "") == 0 || std::strcmp(value, "auto") == 0) return KernelChoice::Auto;
  if (std::strcmp(value, "generic") == 0) return KernelChoice::Generic;
  if (std::strcmp(value, "mma") == 0) return KernelChoice::Mma;
  if (std::strcmp(value, "fa2") == 0) return KernelChoice::Fa2;
  TORCH_CHECK(false, "qkv: the environment variable QKV_CUDA_KERNEL must be auto, generic, mma or fa2; got '", value,
              "'");
}

// Per-row factors for the kernels that rebuild probabilities from a logsumexp (1 except where
// lse lost the log of its row sum: kernel_params.h, LseNormalizerArgs).
at::Tensor lse_normalizers(const AttentionParams& p, const at::Tensor& query, const at::Tensor& key,
                           const at::Tensor& expanded_bias, const at::Tensor& lse_contiguous, cudaStream_t stream) {
  at::Tensor normalizers = at::empty_like(lse_contiguous);
  launch_lse_normalizers(lse_normalizer_args(p, query, key, expanded_bias, lse_contiguous, normalizers), stream);
  return normalizers;
}

int device_major(const at::Tensor& t) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  return major;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias, double dropout_p, bool is_causal, bool bottom_right,
    std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const auto p = check_attention_args("qkv.attention", query, key, value, bias, dropout_p, is_causal,
                                      bottom_right, scale, dropout_seed, window_left, window_right, softcap,
                                      alibi_slopes);
  check_cuda_limits("qkv.attention", query, p);
  const c10::cuda::CUDAGuard device_guard(query.device());
  at::Tensor out = empty_attention_output(query, p);
  at::Tensor lse = empty_logsumexp(query, p);
  if (p.batch * p.heads * p.q_len == 0) return {out, lse};

  const at::Tensor expanded_bias = p.has_bias ? expand_bias(*bias, p) : at::Tensor();
  const ForwardArgs args = forward_args(p, query, key, value, expanded_bias, out, lse);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.get_device()).stream();
  const KernelChoice choice = kernel_choice();
  if (choice == KernelChoice::Fa2) {
    TORCH_CHECK(fa2_forward_supported(args, device_major(query)),
                "qkv.attention: QKV_CUDA_KERNEL=fa2, but this call does not qualify for the fa2 kernels (they need "
                "float16/bfloat16, head_dim == value_head_dim in {64, 96, 128, 256}, unit-stride rows with "
                "8-element-aligned strides and 16-byte-aligned data, and compute capability 8.0+); got ",
                query.scalar_type(), ", head dims ", p.head_dim, "/", p.v_head_dim, ", query strides ", query.strides(),
                ", key strides ", key.strides(), ", value strides ", value.strides());
    launch_fa2_forward(args, stream);
    return {out, lse};
  }
  const bool use_mma = choice != KernelChoice::Generic && mma_forward_supported(args, device_major(query));
  TORCH_CHECK(use_mma || choice != KernelChoice::Mma,
              "qkv.attention: QKV_CUDA_KERNEL=mma, but this call does not qualify for the tensor-core kernel "
              "(it needs float16/bfloat16, head_dim == value_head_dim in {64, 128}, unit-stride rows with "
              "8-element-aligned strides and 16-byte-aligned data, and compute capability 8.0+); got ",
              query.scalar_type(), ", head dims ", p.head_dim, "/", p.v_head_dim, ", query strides ", query.strides(),
              ", key strides ", key.strides(), ", value strides ", value.strides());
  if (use_mma) {
    launch_mma_forward(args, stream);
  } else {
    launch_generic_forward(args, stream);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& logsumexp,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed, bool bias_requires_grad, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const auto p = check_attention_args("qkv.attention_backward", query, key, value, bias, dropout_p,
                                      is_causal, bottom_right, scale, dropout_seed, window_left, window_right,
                                      softcap, alibi_slopes);
  check_backward_args("qkv.attention_backward", query, grad_out, out, logsumexp, p, dropout_p, dropout_seed);
  check_cuda_limits("qkv.attention_backward", query, p);
  const c10::cuda::CUDAGuard device_guard(query.device());
  at::Tensor grad_q = empty_token_major(query, p.head_dim);
  at::Tensor grad_k = empty_token_major(key, p.head_dim);
  at::Tensor grad_v = empty_token_major(value, p.v_head_dim);
  at::Tensor grad_bias = empty_grad_bias(bias, bias_requires_grad, query);
  const bool want_bias_grad = bias_requires_grad && p.has_bias;
  if (p.batch * p.heads == 0) {
    if (want_bias_grad) grad_bias.zero_();
    return {grad_q, grad_k, grad_v, grad_bias};
  }

  const auto acc_dtype = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lse = logsumexp.contiguous();
  at::Tensor delta = at::empty({p.batch, p.heads, p.q_len}, query.options().dtype(acc_dtype));
  const at::Tensor expanded_bias = p.has_bias ? expand_bias(*bias, p) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.get_device()).stream();
  const at::Tensor normalizers = lse_normalizers(p, query, key, expanded_bias, lse, stream);

  BiasGradBuffer bias_grad;
  if (want_bias_grad) bias_grad = bias_grad_buffer(*bias, p, acc_dtype);
  BackwardArgs args = backward_args(p, grad_out, query, key, value, expanded_bias, out, lse, normalizers, delta, grad_q,
                                    grad_k, grad_v, want_bias_grad ? &bias_grad : nullptr);
  const KernelChoice choice = kernel_choice();
  if (choice == KernelChoice::Fa2) {
    TORCH_CHECK(fa2_backward_supported(args, device_major(query)),
                "qkv.attention_backward: QKV_CUDA_KERNEL=fa2, but this call does not qualify for the fa2 kernels "
                "(they need float16/bfloat16, head_dim == value_head_dim in {64, 96, 128, 256}, unit-stride rows "
                "with 8-element-aligned strides and 16-byte-aligned data for query, key, value and grad_out, no "
                "gradient for a bias with one key column, and compute capability 8.0+); got ", query.scalar_type(),
                ", head dims ", p.head_dim, "/", p.v_head_dim, ", grad_out strides ", grad_out.strides(),
                ", bias gradient wanted: ", want_bias_grad);
    const at::Tensor dq_accum = at::zeros({p.batch, p.heads, p.q_len, p.head_dim}, query.options().dtype(at::kFloat));
    at::Tensor semaphores;
    if (at::globalContext().deterministicAlgorithms()) {
      semaphores = at::zeros({fa2_backward_semaphores(args.shape)}, query.options().dtype(at::kInt));
      args.dq_semaphore = semaphores.data_ptr<int>();
    }
    args.dq_accum = dq_accum.data_ptr<float>();
    launch_fa2_backward(args, stream);
    if (want_bias_grad) grad_bias.copy_(bias_grad.sum.view(bias->sizes()));
    return {grad_q, grad_k, grad_v, grad_bias};
  }
  const bool use_mma = choice != KernelChoice::Generic && mma_backward_supported(args, device_major(query));
  TORCH_CHECK(use_mma || choice != KernelChoice::Mma,
              "qkv.attention_backward: QKV_CUDA_KERNEL=mma, but this call does not qualify for the tensor-core "
              "kernels (they need float16/bfloat16, head_dim == value_head_dim in {64, 128}, unit-stride rows with "
              "8-element-aligned strides and 16-byte-aligned data for query, key, value and grad_out, no bias "
              "gradient, and compute capability 8.0+); got ", query.scalar_type(), ", head dims ", p.head_dim, "/",
              p.v_head_dim, ", bias gradient wanted: ", want_bias_grad, ", grad_out strides ", grad_out.strides());
  if (use_mma) {
    launch_mma_backward(args, stream);
  } else {
    launch_generic_backward(args, stream);
  }
  if (want_bias_grad) grad_bias.copy_(bias_grad.sum.view(bias->sizes()));
  return {grad_q, grad_k, grad_v, grad_bias};
}

at::Tensor attention_weights_cuda(const at::Tensor& query, const at::Tensor& key,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                  double dropout_p, bool is_causal, bool bottom_right,
                                  std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
                                  bool average_heads, int64_t window_left, int64_t window_right, double softcap,
                                  const std::optional<at::Tensor>& alibi_slopes) {
  const auto p = check_attention_weights_args(query, key, bias, logsumexp, dropout_p, is_causal, bottom_right, scale,
                                              dropout_seed, window_left, window_right, softcap, alibi_slopes);
  check_cuda_limits("qkv.attention_weights", query, p);
  const c10::cuda::CUDAGuard device_guard(query.device());
  if (average_heads) {
    // The CPU kernel sums heads in place; here the per-head weights are built, then averaged.
    if (p.heads == 0) return empty_attention_weights(query, p, true).zero_();
    // The seed this call settled on goes along, so none is drawn twice.
    return attention_weights_cuda(query, key, bias, logsumexp, dropout_p, is_causal, bottom_right, scale,
                                  dropout_p > 0.0 ? dropout_seed_tensor(p.dropout_seed) : dropout_seed, false,
                                  window_left, window_right, softcap, alibi_slopes)
        .mean(1);
  }
  at::Tensor weights = empty_attention_weights(query, p, false);
  if (weights.numel() == 0) return weights;
  const at::Tensor lse = logsumexp.contiguous();
  const at::Tensor expanded_bias = p.has_bias ? expand_bias(*bias, p) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.get_device()).stream();
  const at::Tensor normalizers = lse_normalizers(p, query, key, expanded_bias, lse, stream);
  const WeightsArgs args = weights_args(p, query, key, expanded_bias, lse, normalizers, weights);
  launch_generic_weights(args, stream);
  return weights;
}

// The packed and KV-cache doors run on the CPU kernels only so far.
[[noreturn]] void not_on_cuda(const char* op) {
  TORCH_CHECK(false, op, ": not implemented by the CUDA kernels yet (CPU only; see docs/flash-attn-api.md)");
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                         const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
                                                         bool, bool, std::optional<double>,
                                                         const std::optional<at::Tensor>&, int64_t, int64_t, double,
                                                         const std::optional<at::Tensor>&) {
  not_on_cuda("qkv.attention_varlen");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_cuda(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, bool, bool, std::optional<double>,
    const std::optional<at::Tensor>&, int64_t, int64_t, double, const std::optional<at::Tensor>&) {
  not_on_cuda("qkv.attention_varlen_backward");
}

std::tuple<at::Tensor, at::Tensor> attention_kvcache_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          const std::optional<at::Tensor>&,
                                                          const std::optional<at::Tensor>&,
                                                          const std::optional<at::Tensor>&, bool, std::optional<double>,
                                                          int64_t, int64_t, double, const std::optional<at::Tensor>&) {
  not_on_cuda("qkv.attention_kvcache");
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv, CUDA, m) {
  m.impl("attention", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("attention_weights", &attention_weights_cuda);
  m.impl("attention_varlen", &attention_varlen_cuda);
  m.impl("attention_varlen_backward", &attention_varlen_backward_cuda);
  m.impl("attention_kvcache", &attention_kvcache_cuda);
}

}  // namespace qkv
