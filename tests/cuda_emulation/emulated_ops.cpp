// The CUDA kernels of csrc/cuda, compiled for the CPU against cuda_emulator.h and registered as
// torch.ops.qkv_emulated.* on CPU tensors, so tests can run the kernels' own code (indexing,
// tiling, masks, online softmax, dropout replay, backward, tensor-core fragment handling) on
// machines without a GPU. Arguments reach the kernels through the same kernel_args.h helpers as in
// the CUDA launcher; the launch configurations are the kernels' own *Config structs.
#include "cuda_emulator.h"  // first: defines the CUDA built-ins the kernel headers use

#include "cuda/dispatch.cuh"
#include "cuda/generic_kernels.cuh"
#include "cuda/kernel_args.h"
#include "cuda/mma_backward.cuh"
#include "cuda/mma_forward.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

namespace {

using namespace qkv::cuda;
using OptTensor = std::optional<at::Tensor>;

// What check_attention_args would produce; the Python side passes the resolved scalars.
qkv::AttentionParams params_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool has_bias,
                               double scale, bool is_causal, int64_t causal_offset, double dropout_p, int64_t seed) {
  qkv::AttentionParams p;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.q_len = q.size(2);
  p.head_dim = q.size(3);
  p.kv_len = k.size(2);
  p.v_head_dim = v.size(3);
  p.scale = scale;
  p.is_causal = is_causal;
  p.causal_offset = causal_offset;
  p.dropout_p = dropout_p;
  p.dropout_seed = static_cast<uint64_t>(seed);
  p.has_bias = has_bias;
  return p;
}

at::Tensor token_major(const at::Tensor& like, int64_t last_dim) {
  return at::empty({like.size(0), like.size(2), like.size(1), last_dim}, like.options()).permute({0, 2, 1, 3});
}

at::ScalarType acc_dtype_of(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const OptTensor& expanded_bias, double scale, bool is_causal,
                                           int64_t causal_offset, double dropout_p, int64_t seed,
                                           const std::string& kernel) {
  const at::Tensor bias = expanded_bias.value_or(at::Tensor());
  const auto p = params_of(q, k, v, bias.defined(), scale, is_causal, causal_offset, dropout_p, seed);
  at::Tensor out = token_major(q, p.v_head_dim);
  at::Tensor lse = at::empty({p.batch, p.heads, p.q_len}, q.options().dtype(acc_dtype_of(q)));
  const ForwardArgs args = forward_args(p, q, k, v, bias, out, lse);
  if (p.batch * p.heads * p.q_len == 0) return {out, lse};
  if (kernel == "mma") {
    TORCH_CHECK(mma::forward_supported(args, 8), "qkv_emulated.forward: the call does not qualify for mma");
    auto run = [&](auto type, auto dim) {
      using T = typename decltype(type)::type;
      constexpr int D = decltype(dim)::value;
      qkv_emu::launch(mma::ForwardConfig<D>::blocks(args.shape), mma::kThreads, mma::ForwardConfig<D>::shared_bytes(),
                      [&] { mma::mma_forward_kernel<T, D>(args); });
    };
    auto run_dim = [&](auto type) {
      if (p.head_dim == 64) {
        run(type, std::integral_constant<int, 64>{});
      } else {
        run(type, std::integral_constant<int, 128>{});
      }
    };
    if (args.dtype == ElementType::Float16) {
      run_dim(TypeTag<__half>{});
    } else {
      run_dim(TypeTag<__nv_bfloat16>{});
    }
    return {out, lse};
  }
  TORCH_CHECK(kernel == "generic", "qkv_emulated.forward: kernel must be generic or mma");
  const int kc = columns_per_lane(std::max(p.head_dim, p.v_head_dim));
  dispatch_element_type(args.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    dispatch_columns_per_lane(kc, [&](auto kc_constant) {
      constexpr int KC = decltype(kc_constant)::value;
      using Config = ForwardConfig<T, KC>;
      qkv_emu::launch(Config::blocks(args.shape), kThreads, Config::shared_bytes(args.shape),
                      [&] { generic_forward_kernel<T, KC, Config::kRows>(args); });
    });
  });
  return {out, lse};
}

at::Tensor weights(const at::Tensor& q, const at::Tensor& k, const OptTensor& expanded_bias, const at::Tensor& lse,
                   double scale, bool is_causal, int64_t causal_offset, double dropout_p, int64_t seed) {
  const at::Tensor bias = expanded_bias.value_or(at::Tensor());
  const auto p = params_of(q, k, k, bias.defined(), scale, is_causal, causal_offset, dropout_p, seed);
  at::Tensor w = at::empty({p.batch, p.heads, p.q_len, p.kv_len}, q.options());
  if (w.numel() == 0) return w;
  const at::Tensor lse_c = lse.contiguous();
  const WeightsArgs args = weights_args(p, q, k, bias, lse_c, w);
  dispatch_element_type(args.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    using Config = WeightsConfig<T>;
    qkv_emu::launch(Config::blocks(args.shape), kThreads, Config::shared_bytes(args.shape),
                    [&] { generic_weights_kernel<T, Config::kRows>(args); });
  });
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const OptTensor& bias, const OptTensor& expanded_bias, const at::Tensor& out, const at::Tensor& lse,
    double scale, bool is_causal, int64_t causal_offset, double dropout_p, int64_t seed, bool bias_requires_grad,
    const std::string& kernel) {
  const at::Tensor expanded = expanded_bias.value_or(at::Tensor());
  const auto p = params_of(q, k, v, expanded.defined(), scale, is_causal, causal_offset, dropout_p, seed);
  at::Tensor grad_q = token_major(q, p.head_dim), grad_k = token_major(k, p.head_dim);
  at::Tensor grad_v = token_major(v, p.v_head_dim);
  const bool want_bias_grad = bias_requires_grad && expanded.defined();
  at::Tensor grad_bias = want_bias_grad ? at::empty(bias->sizes(), bias->options()) : at::empty({0}, q.options());
  if (p.batch * p.heads == 0) return {grad_q, grad_k, grad_v, grad_bias.zero_()};
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor delta = at::empty({p.batch, p.heads, p.q_len}, q.options().dtype(acc_dtype_of(q)));
  BiasGradBuffer bias_grad;
  if (want_bias_grad) bias_grad = bias_grad_buffer(*bias, p, acc_dtype_of(q));
  const BackwardArgs args = backward_args(p, grad_out, q, k, v, expanded, out, lse_c, delta, grad_q, grad_k, grad_v,
                                          want_bias_grad ? &bias_grad : nullptr);
  if (kernel == "mma") {
    TORCH_CHECK(mma::backward_supported(args, 8), "qkv_emulated.backward: the call does not qualify for mma");
    auto run = [&](auto type, auto dim) {
      using T = typename decltype(type)::type;
      constexpr int D = decltype(dim)::value;
      if (p.q_len > 0) {
        qkv_emu::launch(DeltaConfig::blocks(args.shape), kThreads, 0, [&] { generic_delta_kernel<T>(args); });
        using QConfig = mma::GradQueryConfig<D>;
        qkv_emu::launch(QConfig::blocks(args.shape), mma::kThreads, QConfig::shared_bytes(),
                        [&] { mma::mma_grad_query_kernel<T, D>(args); });
      }
      if (p.kv_len > 0) {
        using KVConfig = mma::GradKeyValueConfig<D>;
        qkv_emu::launch(KVConfig::blocks(args.shape), mma::kThreads, KVConfig::shared_bytes(),
                        [&] { mma::mma_grad_key_value_kernel<T, D>(args); });
      }
    };
    auto run_dim = [&](auto type) {
      if (p.head_dim == 64) {
        run(type, std::integral_constant<int, 64>{});
      } else {
        run(type, std::integral_constant<int, 128>{});
      }
    };
    if (args.dtype == ElementType::Float16) {
      run_dim(TypeTag<__half>{});
    } else {
      run_dim(TypeTag<__nv_bfloat16>{});
    }
    return {grad_q, grad_k, grad_v, grad_bias};
  }
  TORCH_CHECK(kernel == "generic", "qkv_emulated.backward: kernel must be generic or mma");
  const int kc = columns_per_lane(std::max(p.head_dim, p.v_head_dim));
  dispatch_element_type(args.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    dispatch_columns_per_lane(kc, [&](auto kc_constant) {
      constexpr int KC = decltype(kc_constant)::value;
      if (p.q_len > 0) {
        qkv_emu::launch(DeltaConfig::blocks(args.shape), kThreads, 0, [&] { generic_delta_kernel<T>(args); });
        using QConfig = GradQueryConfig<T, KC>;
        qkv_emu::launch(QConfig::blocks(args.shape), kThreads, QConfig::shared_bytes(args.shape),
                        [&] { generic_grad_query_kernel<T, KC, QConfig::kRows>(args); });
      }
      if (p.kv_len > 0) {
        using KVConfig = GradKeyValueConfig<T, KC>;
        qkv_emu::launch(KVConfig::blocks(args.shape), kThreads, KVConfig::shared_bytes(args.shape),
                        [&] { generic_grad_key_value_kernel<T, KC, KVConfig::kRows>(args); });
      }
    });
  });
  if (want_bias_grad) grad_bias.copy_(bias_grad.sum.view(bias->sizes()));
  return {grad_q, grad_k, grad_v, grad_bias};
}

// A toy kernel for testing the emulator itself: thread t writes slot t of shared memory, then reads
// slot t + 1. Without the barrier in between, the read races with the neighbour's write.
__global__ void barrier_probe_kernel(float* result, bool with_barrier) {
  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  float* slots = reinterpret_cast<float*>(smem_bytes);
  const int t = static_cast<int>(threadIdx.x);
  slots[t] = static_cast<float>(t + 1);
  if (with_barrier) __syncthreads();
  result[t] = slots[(t + 1) % 128];
}

at::Tensor barrier_probe(bool with_barrier) {
  at::Tensor result = at::empty({128}, at::TensorOptions().dtype(at::kFloat));
  float* data = result.data_ptr<float>();
  qkv_emu::launch(1, 128, 128 * sizeof(float), [&] { barrier_probe_kernel(data, with_barrier); });
  return result;
}

}  // namespace

TORCH_LIBRARY(qkv_emulated, m) {
  m.def("barrier_probe(bool with_barrier) -> Tensor");
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor? expanded_bias, float scale, bool is_causal, "
        "int causal_offset, float dropout_p, int seed, str kernel) -> (Tensor, Tensor)");
  m.def("weights(Tensor q, Tensor k, Tensor? expanded_bias, Tensor lse, float scale, bool is_causal, "
        "int causal_offset, float dropout_p, int seed) -> Tensor");
  m.def("backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? expanded_bias, Tensor out, "
        "Tensor lse, float scale, bool is_causal, int causal_offset, float dropout_p, int seed, "
        "bool bias_requires_grad, str kernel) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qkv_emulated, CPU, m) {
  m.impl("forward", &forward);
  m.impl("weights", &weights);
  m.impl("backward", &backward);
}

TORCH_LIBRARY_IMPL(qkv_emulated, CompositeExplicitAutograd, m) { m.impl("barrier_probe", &barrier_probe); }
