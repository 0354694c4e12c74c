// The launcher of the sm90a forward (sm90_forward.cuh): the kernel's parameters with the TMA
// descriptors of Q, K and V^T (make_forward_params), then one launch. Compiled only for sm_90a, and only into builds
// whose CUDA archs include 9.0 (QKV_CUDA_SM90); sm90_plan.h decides which calls come here.
// Instantiated for what dispatch uses: float16/bfloat16 x head dim 64/128 (causality is a runtime
// flag), four kernels.
#include "launch_utils.h"
#include "sm90_forward.cuh"
#include "sm90_plan.h"

namespace qkv::cuda {
namespace sm90 {
namespace {

template <typename Element, int D>
void run_forward(const ForwardArgs& args, cudaStream_t stream) {
  using Traits = ForwardTraits<Element, D>;
  const ForwardParams<Traits> params = make_forward_params<Traits>(args);
  auto kernel = sm90_forward_kernel<Traits>;
  prepare_dynamic_smem(kernel, Traits::kSharedBytes, "sm90_forward");
  const unsigned blocks =
      grid_size_checked(args.shape.batch * args.shape.heads * int64_t{params.m_blocks}, "sm90_forward");
  kernel<<<blocks, Traits::kThreads, Traits::kSharedBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace sm90

void launch_sm90_forward(const ForwardArgs& args, cudaStream_t stream) {
  // The caller checked the device (compute capability 9.0); the rest is checked again here, since a
  // descriptor built from a view TMA cannot read would fault on the device.
  const char* refusal = sm90::forward_refusal(args, 9, 0);
  TORCH_CHECK(refusal == nullptr, "qkv: internal error: the sm90 forward got a call it does not support: ", refusal);
  const bool half = args.dtype == ElementType::Float16;
  if (args.shape.head_dim == 64) {
    half ? sm90::run_forward<cutlass::half_t, 64>(args, stream) : sm90::run_forward<cutlass::bfloat16_t, 64>(args, stream);
  } else {
    half ? sm90::run_forward<cutlass::half_t, 128>(args, stream)
         : sm90::run_forward<cutlass::bfloat16_t, 128>(args, stream);
  }
}

}  // namespace qkv::cuda
