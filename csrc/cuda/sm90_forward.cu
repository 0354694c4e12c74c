// The launcher of the sm90a forward (sm90_forward.cuh): the TMA descriptors of Q, K and V^T built
// on the host (CuTe's make_tma_copy, which calls cuTensorMapEncodeTiled through the runtime's
// driver entry point: no -lcuda), then one launch. Compiled only for sm_90a, and only into builds
// whose CUDA archs include 9.0 (QKV_CUDA_SM90); sm90_plan.h decides which calls come here.
// Instantiated for what dispatch uses: float16/bfloat16 x head dim 64/128 (causality is a runtime
// flag), four kernels.
#include "launch_utils.h"
#include "sm90_forward.cuh"
#include "sm90_plan.h"

namespace qkv::cuda {
namespace sm90 {
namespace {

template <typename Traits>
ForwardParams<Traits> forward_params(const ForwardArgs& args) {
  using Element = typename Traits::Element;
  const ProblemShape& p = args.shape;
  const int64_t kv_heads = p.heads / head_group(p);
  const TmaView q = tma_view(args.q.data, args.q.s0, args.q.s1, args.q.s2, p.batch, p.heads, p.q_len, p.head_dim);
  const TmaView k = tma_view(args.k.data, args.k.s0, args.k.s1, args.k.s2, p.batch, kv_heads, p.kv_len, p.head_dim);
  const TmaView v = tma_view(args.v.data, args.v.s0, args.v.s1, args.v.s2, p.batch, kv_heads, p.kv_len, p.head_dim);
  auto i32 = [](int64_t x) { return static_cast<int32_t>(x); };

  ForwardParams<Traits> params;
  params.shape_q = TmaShape{i32(q.rows), i32(q.cols), i32(q.heads), i32(q.batch)};
  params.shape_k = TmaShape{i32(k.rows), i32(k.cols), i32(k.heads), i32(k.batch)};
  params.shape_vt = TmaShape{i32(v.cols), i32(v.rows), i32(v.heads), i32(v.batch)};
  Tensor mQ = make_tensor(make_gmem_ptr(static_cast<Element const*>(q.data)), params.shape_q,
                          TmaStrideRowMajor{q.row_stride, _1{}, q.head_stride, q.batch_stride});
  Tensor mK = make_tensor(make_gmem_ptr(static_cast<Element const*>(k.data)), params.shape_k,
                          TmaStrideRowMajor{k.row_stride, _1{}, k.head_stride, k.batch_stride});
  Tensor mVt = make_tensor(make_gmem_ptr(static_cast<Element const*>(v.data)), params.shape_vt,
                           TmaStrideTransposed{_1{}, v.row_stride, v.head_stride, v.batch_stride});
  params.tma_q = make_tma_copy(SM90_TMA_LOAD{}, mQ, typename Traits::SmemLayoutQ{},
                               Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>{}, _1{});
  params.tma_k = make_tma_copy(SM90_TMA_LOAD{}, mK, take<0, 2>(typename Traits::SmemLayoutK{}),
                               Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>{}, _1{});
  params.tma_v = make_tma_copy(SM90_TMA_LOAD{}, mVt, take<0, 2>(typename Traits::SmemLayoutVt{}),
                               Shape<Int<Traits::kHeadDim>, Int<Traits::kBlockN>>{}, _1{});

  params.out = args.out.data;
  params.out_s0 = args.out.s0;
  params.out_s1 = args.out.s1;
  params.out_s2 = args.out.s2;
  params.lse = static_cast<float*>(args.lse);
  params.shape = p;
  params.heads = i32(p.heads);
  params.head_group = i32(head_group(p));
  params.m_blocks = i32((p.q_len + Traits::kBlockM - 1) / Traits::kBlockM);
  params.scale = static_cast<float>(p.scale);
  params.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  return params;
}

template <typename Element, int D>
void run_forward(const ForwardArgs& args, cudaStream_t stream) {
  using Traits = ForwardTraits<Element, D>;
  const ForwardParams<Traits> params = forward_params<Traits>(args);
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
