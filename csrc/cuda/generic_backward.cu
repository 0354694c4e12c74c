// Launchers of the generic backward kernels: delta = rowsum(dO * O), then dQ (parallel over
// query tiles) and dK/dV/dbias (parallel over key tiles). No atomics except for the bias gradient.
#include "dispatch.cuh"
#include "generic_kernels.cuh"

namespace qkv::cuda {
namespace {

template <typename T, int KC>
void run_generic_backward(const BackwardArgs& args, cudaStream_t stream) {
  using acc_t = typename AccumulatorOf<T>::type;
  const ProblemShape& p = args.shape;
  const int64_t D = p.head_dim, Dv = p.v_head_dim, max_dim = D > Dv ? D : Dv;

  if (p.q_len > 0) {
    auto delta_kernel = generic_delta_kernel<T>;
    const unsigned blocks = grid_size_checked(ceil_div(p.batch * p.heads * p.q_len, kWarps), "generic_delta");
    delta_kernel<<<blocks, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    constexpr int ROWS = rows_for_budget(KC, sizeof(acc_t), 32);
    constexpr int BQ = kWarps * ROWS;
    const size_t smem = sizeof(acc_t) * (BQ * D + BQ * Dv + kKeyTile * (max_dim + 1) + BQ * kKeyTile);
    auto kernel = generic_grad_query_kernel<T, KC, ROWS>;
    prepare_dynamic_smem(kernel, smem, "generic_grad_query");
    const unsigned q_blocks = grid_size_checked(p.batch * p.heads * ceil_div(p.q_len, BQ), "generic_grad_query");
    kernel<<<q_blocks, kThreads, smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  if (p.kv_len > 0) {
    // Two accumulators (dK and dV) per thread: half the rows of the forward's budget.
    constexpr int ROWS = rows_for_budget(KC, sizeof(acc_t), 16);
    constexpr int BKV = kWarps * ROWS;
    const size_t smem = sizeof(acc_t) * (BKV * D + BKV * Dv + kQueryTile * (D + 1) + kQueryTile * (Dv + 1) +
                                         2 * BKV * kQueryTile);
    auto kernel = generic_grad_key_value_kernel<T, KC, ROWS>;
    prepare_dynamic_smem(kernel, smem, "generic_grad_key_value");
    const unsigned k_blocks = grid_size_checked(p.batch * p.heads * ceil_div(p.kv_len, BKV), "generic_grad_key_value");
    kernel<<<k_blocks, kThreads, smem, stream>>>(args);
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
