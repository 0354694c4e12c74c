// Launcher of the tensor-core forward kernel, and the test of whether a call qualifies for it.
#include "mma_forward.cuh"

#include <cstdint>

namespace qkv::cuda {
namespace {

bool aligned_rows(const ConstView4& view, int64_t alignment_elements) {
  const auto address = reinterpret_cast<uintptr_t>(view.data);
  return view.s3 == 1 && view.s0 % alignment_elements == 0 && view.s1 % alignment_elements == 0 &&
         view.s2 % alignment_elements == 0 && address % (2 * alignment_elements) == 0;
}

template <typename T, int D>
void run_mma_forward(const ForwardArgs& args, cudaStream_t stream) {
  constexpr size_t smem = mma::shared_bytes<D>();
  auto kernel = mma::mma_forward_kernel<T, D>;
  prepare_dynamic_smem(kernel, smem, "mma_forward");
  const ProblemShape& p = args.shape;
  const unsigned blocks = grid_size_checked(p.batch * p.heads * ceil_div(p.q_len, mma::kBlockQ), "mma_forward");
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
  const ProblemShape& p = args.shape;
  if (device_major < 8) return false;
  if (args.dtype != ElementType::Float16 && args.dtype != ElementType::BFloat16) return false;
  if (p.head_dim != p.v_head_dim || (p.head_dim != 64 && p.head_dim != 128)) return false;
  // 16-byte cp.async copies of whole rows: unit column stride, 8-element-aligned rows and base.
  if (!aligned_rows(args.q, 8) || !aligned_rows(args.k, 8) || !aligned_rows(args.v, 8)) return false;
  // The output is written as pairs of elements (4-byte stores).
  const ConstView4 out{args.out.data, args.out.s0, args.out.s1, args.out.s2, args.out.s3};
  return aligned_rows(out, 2);
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
