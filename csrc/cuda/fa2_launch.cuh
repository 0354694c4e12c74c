#pragma once
// Launchers of the fa2 kernels for one head dim, instantiated once per head dim in fa2_d*.cu (so
// nvcc compiles the head dims in parallel and a change to one rebuilds one file).
#include "fa2_tiles.cuh"
#include "generic_kernels.cuh"  // the delta kernel the backward starts with
#include "launch_utils.h"

namespace qkv::cuda::fa2 {

inline int shared_memory_per_multiprocessor() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  return bytes;
}

template <typename T, int D, typename TileChoice, bool kGeneral>
void run_forward(const ForwardArgs& args, cudaStream_t stream) {
  using Tile = ForwardKernelTile<TileChoice, kGeneral>;
  using Config = ForwardConfig<D, Tile>;
  constexpr size_t smem = Config::shared_bytes();
  auto kernel = fa2_forward_kernel<T, D, Tile, kGeneral>;
  prepare_dynamic_smem(kernel, smem, "fa2_forward");
  const unsigned blocks = grid_size_checked(Config::blocks(args.shape), "fa2_forward");
  kernel<<<blocks, Tile::kThreads, smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D, typename Tile, bool kGeneral>
void run_backward(const BackwardArgs& args, cudaStream_t stream) {
  const ProblemShape& p = args.shape;
  if (p.q_len > 0) {
    const unsigned blocks = grid_size_checked(DeltaConfig::blocks(p), "generic_delta");
    generic_delta_kernel<T><<<blocks, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (p.kv_len > 0) {  // also with no query row: dK and dV are then written as zeros
    using Config = BackwardConfig<D, Tile>;
    constexpr size_t smem = Config::shared_bytes();
    auto kernel = fa2_backward_kernel<T, D, Tile, kGeneral>;
    prepare_dynamic_smem(kernel, smem, "fa2_backward");
    const unsigned blocks = grid_size_checked(Config::blocks(p), "fa2_backward");
    kernel<<<blocks, Tile::kThreads, smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (p.q_len > 0) {
    const unsigned blocks = grid_size_checked(ConvertDqConfig::blocks<D>(p), "fa2_convert_dq");
    fa2_convert_dq_kernel<T, D><<<blocks, ConvertDqConfig::kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <int D>
void launch_forward_for_dim(const ForwardArgs& args, TileName name, cudaStream_t stream) {
  if (!name.given()) name = default_forward_tile<D>(shared_memory_per_multiprocessor());
  const bool plain = forward_is_plain(args);
  const bool half = args.dtype == ElementType::Float16;
  const bool found = with_named_tile(typename ForwardTiles<D>::type{}, name, [&](auto tile) {
    using Tile = decltype(tile);
    if (half) {
      plain ? run_forward<__half, D, Tile, false>(args, stream) : run_forward<__half, D, Tile, true>(args, stream);
    } else {
      plain ? run_forward<__nv_bfloat16, D, Tile, false>(args, stream)
            : run_forward<__nv_bfloat16, D, Tile, true>(args, stream);
    }
  });
  TORCH_CHECK(found, "qkv: QKV_FA2_FORWARD_TILE=", name.str(), " is not a forward tile of head dim ", D,
              " in this build (tuning tiles need a build with -DQKV_FA2_TUNING)");
}

template <int D>
void launch_backward_for_dim(const BackwardArgs& args, TileName name, cudaStream_t stream) {
  const bool plain = backward_is_plain(args);
  const bool half = args.dtype == ElementType::Float16;
  const bool found = with_named_tile(typename BackwardTiles<D>::type{}, name, [&](auto tile) {
    using Tile = decltype(tile);
    if (half) {
      plain ? run_backward<__half, D, Tile, false>(args, stream) : run_backward<__half, D, Tile, true>(args, stream);
    } else {
      plain ? run_backward<__nv_bfloat16, D, Tile, false>(args, stream)
            : run_backward<__nv_bfloat16, D, Tile, true>(args, stream);
    }
  });
  TORCH_CHECK(found, "qkv: QKV_FA2_BACKWARD_TILE=", name.str(), " is not a backward tile of head dim ", D,
              " in this build (tuning tiles need a build with -DQKV_FA2_TUNING)");
}

}  // namespace qkv::cuda::fa2
