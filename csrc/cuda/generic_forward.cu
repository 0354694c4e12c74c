// Launchers of the generic forward, attention-weights and logsumexp-normalizer kernels (all dtypes,
// any strides).
#include "dispatch.cuh"
#include "generic_kernels.cuh"
#include "launch_utils.h"

namespace qkv::cuda {
namespace {

template <typename T, int KC>
void run_generic_forward(const ForwardArgs& args, cudaStream_t stream) {
  using Config = ForwardConfig<T, KC>;
  const size_t smem = Config::shared_bytes(args.shape);
  auto kernel = generic_forward_kernel<T, KC, Config::kRows>;
  prepare_dynamic_smem(kernel, smem, "generic_forward");
  const unsigned blocks = grid_size_checked(Config::blocks(args.shape), "generic_forward");
  kernel<<<blocks, kThreads, smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_generic_weights(const WeightsArgs& args, cudaStream_t stream) {
  using Config = WeightsConfig<T>;
  const size_t smem = Config::shared_bytes(args.shape);
  auto kernel = generic_weights_kernel<T, Config::kRows>;
  prepare_dynamic_smem(kernel, smem, "generic_weights");
  const unsigned blocks = grid_size_checked(Config::blocks(args.shape), "generic_weights");
  kernel<<<blocks, kThreads, smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_lse_normalizers(const LseNormalizerArgs& args, cudaStream_t stream) {
  using Config = WeightsConfig<T>;  // the weights kernel's blocks and shared memory
  const size_t smem = Config::shared_bytes(args.shape);
  auto kernel = generic_lse_normalizer_kernel<T, Config::kRows>;
  prepare_dynamic_smem(kernel, smem, "generic_lse_normalizer");
  const unsigned blocks = grid_size_checked(Config::blocks(args.shape), "generic_lse_normalizer");
  kernel<<<blocks, kThreads, smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_lse_normalizers(const LseNormalizerArgs& args, cudaStream_t stream) {
  const ProblemShape& p = args.shape;
  if (p.batch * p.heads * p.q_len == 0) return;
  columns_per_lane(p.head_dim);  // checks the head-dim limit
  dispatch_element_type(args.dtype, [&](auto type) { run_lse_normalizers<typename decltype(type)::type>(args, stream); });
}

void launch_generic_forward(const ForwardArgs& args, cudaStream_t stream) {
  const ProblemShape& p = args.shape;
  if (p.batch * p.heads * p.q_len == 0) return;
  const int kc = columns_per_lane(p.head_dim > p.v_head_dim ? p.head_dim : p.v_head_dim);
  dispatch_element_type(args.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    dispatch_columns_per_lane(kc, [&](auto kc_constant) { run_generic_forward<T, decltype(kc_constant)::value>(args, stream); });
  });
}

void launch_generic_weights(const WeightsArgs& args, cudaStream_t stream) {
  const ProblemShape& p = args.shape;
  if (p.batch * p.heads * p.q_len * p.kv_len == 0) return;
  columns_per_lane(p.head_dim);  // checks the head-dim limit
  dispatch_element_type(args.dtype, [&](auto type) { run_generic_weights<typename decltype(type)::type>(args, stream); });
}

}  // namespace qkv::cuda
