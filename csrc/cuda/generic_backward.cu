// Launchers of the generic backward kernels: delta = rowsum(dO * O), then dQ (parallel over
// query tiles) and dK/dV/dbias (parallel over key tiles). No atomics except for the bias gradient.
#include "dispatch.cuh"
#include "generic_kernels.cuh"
#include "launch_utils.h"

namespace qkv::cuda {
namespace {

template <typename T, int KC>
void run_generic_backward(const BackwardArgs& args, cudaStream_t stream) {
  const ProblemShape& p = args.shape;
  if (p.q_len > 0) {
    const unsigned delta_blocks = grid_size_checked(DeltaConfig::blocks(p), "generic_delta");
    generic_delta_kernel<T><<<delta_blocks, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    using Config = GradQueryConfig<T, KC>;
    const size_t smem = Config::shared_bytes(p);
    auto kernel = generic_grad_query_kernel<T, KC, Config::kRows>;
    prepare_dynamic_smem(kernel, smem, "generic_grad_query");
    const unsigned blocks = grid_size_checked(Config::blocks(p), "generic_grad_query");
    kernel<<<blocks, kThreads, smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (p.kv_len > 0) {
    using Config = GradKeyValueConfig<T, KC>;
    const size_t smem = Config::shared_bytes(p);
    auto kernel = generic_grad_key_value_kernel<T, KC, Config::kRows>;
    prepare_dynamic_smem(kernel, smem, "generic_grad_key_value");
    const unsigned blocks = grid_size_checked(Config::blocks(p), "generic_grad_key_value");
    kernel<<<blocks, kThreads, smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void launch_generic_backward(const BackwardArgs& args, cudaStream_t stream) {
  const ProblemShape& p = args.shape;
  if (p.batch * p.heads == 0) return;
  const int kc = columns_per_lane(p.head_dim > p.v_head_dim ? p.head_dim : p.v_head_dim);
  dispatch_element_type(args.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    dispatch_columns_per_lane(kc, [&](auto kc_constant) { run_generic_backward<T, decltype(kc_constant)::value>(args, stream); });
  });
}

}  // namespace qkv::cuda
