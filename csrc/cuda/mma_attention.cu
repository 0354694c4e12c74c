// Launcher of the tensor-core forward kernel, and the test of whether a call qualifies for it.
#include "launch_utils.h"
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

}  // namespace

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
