// Launcher of the split-KV decode forward (decode_kernels.cuh): the split kernel, then the combine.
#include "decode_kernels.cuh"
#include "launch_utils.h"

namespace qkv::cuda {

void launch_split_decode_forward(const DecodeArgs& args, cudaStream_t stream) {
  const ProblemShape& p = args.fwd.shape;
  if (p.batch * p.heads * p.q_len == 0) return;
  TORCH_CHECK(args.splits >= 1 && args.splits <= kDecodeMaxSplits, "qkv: the split decode forward takes 1 to ",
              kDecodeMaxSplits, " key splits; got ", args.splits);
  decode::dispatch_split_decode(args, [&](auto type, auto rows, auto lanes, auto chunks) {
    using T = typename decltype(type)::type;
    constexpr int R = decltype(rows)::value, LPK = decltype(lanes)::value, CPL = decltype(chunks)::value;
    using Config = decode::SplitConfig<T, R, LPK, CPL>;
    auto kernel = decode::split_decode_kernel<T, R, LPK, CPL>;
    const size_t smem = Config::shared_bytes();
    prepare_dynamic_smem(kernel, smem, "split_decode");
    kernel<<<grid_size_checked(Config::blocks(args), "split_decode"), decode::kThreads, smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    decode::split_decode_combine_kernel<T>
        <<<grid_size_checked(decode::CombineConfig::blocks(args), "split_decode_combine"),
           decode::CombineConfig::kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

int split_decode_blocks_per_sm(const DecodeArgs& args) {
  int blocks = 0;
  decode::dispatch_split_decode(args, [&](auto type, auto rows, auto lanes, auto chunks) {
    using T = typename decltype(type)::type;
    constexpr int R = decltype(rows)::value, LPK = decltype(lanes)::value, CPL = decltype(chunks)::value;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks, decode::split_decode_kernel<T, R, LPK, CPL>, decode::kThreads,
        decode::SplitConfig<T, R, LPK, CPL>::shared_bytes()));
  });
  return blocks > 0 ? blocks : 1;
}

}  // namespace qkv::cuda
