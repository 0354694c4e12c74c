// Launchers of the tensor-core kernels, and the tests of whether a call qualifies for them.
#include "generic_kernels.cuh"  // the delta kernel the backward starts with
#include "launch_utils.h"
#include "mma_backward.cuh"
#include "mma_forward.cuh"

namespace qkv::cuda {
namespace {

template <typename T, int D>
void run_mma_forward(const ForwardArgs& args, cudaStream_t stream) {
  using Config = mma::ForwardConfig<D>;
  constexpr size_t smem = Config::shared_bytes();
  auto kernel = mma::mma_forward_kernel<T, D>;
  prepare_dynamic_smem(kernel, smem, "mma_forward");
  const unsigned blocks = grid_size_checked(Config::blocks(args.shape), "mma_forward");
  kernel<<<blocks, mma::kThreads, smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_mma_forward_for_dim(const ForwardArgs& args, cudaStream_t stream) {
  if (args.shape.head_dim == 64) {
    run_mma_forward<T, 64>(args, stream);
  } else {
    run_mma_forward<T, 128>(args, stream);
  }
}

template <typename T, int D>
void run_mma_backward(const BackwardArgs& args, cudaStream_t stream) {
  const ProblemShape& p = args.shape;
  if (p.q_len > 0) {
    const unsigned delta_blocks = grid_size_checked(DeltaConfig::blocks(p), "generic_delta");
    generic_delta_kernel<T><<<delta_blocks, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    using Config = mma::GradQueryConfig<D>;
    auto kernel = mma::mma_grad_query_kernel<T, D>;
    prepare_dynamic_smem(kernel, Config::shared_bytes(), "mma_grad_query");
    const unsigned blocks = grid_size_checked(Config::blocks(p), "mma_grad_query");
    kernel<<<blocks, mma::kThreads, Config::shared_bytes(), stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (p.kv_len > 0) {
    using Config = mma::GradKeyValueConfig<D>;
    auto kernel = mma::mma_grad_key_value_kernel<T, D>;
    prepare_dynamic_smem(kernel, Config::shared_bytes(), "mma_grad_key_value");
    const unsigned blocks = grid_size_checked(Config::blocks(p), "mma_grad_key_value");
    kernel<<<blocks, mma::kThreads, Config::shared_bytes(), stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void run_mma_backward_for_dim(const BackwardArgs& args, cudaStream_t stream) {
  if (args.shape.head_dim == 64) {
    run_mma_backward<T, 64>(args, stream);
  } else {
    run_mma_backward<T, 128>(args, stream);
  }
}

}  // namespace

bool mma_backward_supported(const BackwardArgs& args, int device_major) {
  return mma::backward_supported(args, device_major);
}

void launch_mma_backward(const BackwardArgs& args, cudaStream_t stream) {
  const ProblemShape& p = args.shape;
  if (p.batch * p.heads == 0) return;
  TORCH_CHECK(mma::backward_supported(args, 8), "qkv: internal error: the tensor-core backward got a call it does "
              "not support");
  if (args.dtype == ElementType::Float16) {
    run_mma_backward_for_dim<__half>(args, stream);
  } else {
    run_mma_backward_for_dim<__nv_bfloat16>(args, stream);
  }
}

bool mma_forward_supported(const ForwardArgs& args, int device_major) {
  return mma::forward_supported(args, device_major);
}

void launch_mma_forward(const ForwardArgs& args, cudaStream_t stream) {
  const ProblemShape& p = args.shape;
  if (p.batch * p.heads * p.q_len == 0) return;
  TORCH_CHECK(p.head_dim == p.v_head_dim && (p.head_dim == 64 || p.head_dim == 128),
              "qkv: internal error: the tensor-core forward got head dims ", p.head_dim, " and ", p.v_head_dim);
  if (args.dtype == ElementType::Float16) {
    run_mma_forward_for_dim<__half>(args, stream);
  } else {
    TORCH_CHECK(args.dtype == ElementType::BFloat16, "qkv: internal error: the tensor-core forward needs fp16/bf16");
    run_mma_forward_for_dim<__nv_bfloat16>(args, stream);
  }
}

}  // namespace qkv::cuda
