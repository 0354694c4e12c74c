#pragma once
// Which tile shapes the fa2 kernels are built with, per head dim, and which calls they serve.
// Shared by the CUDA launchers (fa2_launch.cuh, fa2_attention.cu) and the CPU emulation tests
// (tests/cuda_emulation), so both run exactly the same kernel instantiations.
//
// The defaults follow FlashAttention-2's choices for A100/H100 (flash_fwd_launch_template.h,
// flash_bwd_launch_template.h). Builds with QKV_FA2_TUNING defined (NVCC_APPEND_FLAGS=
// -DQKV_FA2_TUNING) also compile the alternatives, which scripts/cuda_tune.py times on a GPU; the
// environment variables QKV_FA2_FORWARD_TILE / QKV_FA2_BACKWARD_TILE ("128x64x4": query rows x
// keys x warps) select one per call.
#include "fa2_backward.cuh"
#include "fa2_forward.cuh"

#include <cstdio>
#include <initializer_list>
#include <string>

#if defined(QKV_FA2_TUNING)
#define QKV_FA2_TUNING_TILES(...) , __VA_ARGS__
#else
#define QKV_FA2_TUNING_TILES(...)
#endif

namespace qkv::cuda::fa2 {

template <typename... Tiles>
struct TileList {};

template <int D>
struct ForwardTiles;
template <>
struct ForwardTiles<64> {
  using type = TileList<ForwardTile<128, 128, 4> QKV_FA2_TUNING_TILES(ForwardTile<128, 64, 4>, ForwardTile<64, 64, 4>)>;
};
template <>
struct ForwardTiles<96> {
  using type = TileList<ForwardTile<128, 64, 4> QKV_FA2_TUNING_TILES(ForwardTile<64, 64, 4>)>;
};
template <>
struct ForwardTiles<128> {
  using type = TileList<ForwardTile<128, 64, 4> QKV_FA2_TUNING_TILES(ForwardTile<128, 32, 4>, ForwardTile<64, 64, 4>,
                                                                     ForwardTile<128, 128, 8>)>;
};
template <>
struct ForwardTiles<256> {
  // 128 x 64 x 8 (128 KB of shared memory) where a multiprocessor holds one such block anyway
  // (A100), 64 x 64 x 4 (96 KB) where it holds two (H100): FlashAttention-2's rule.
  using type = TileList<ForwardTile<128, 64, 8>, ForwardTile<64, 64, 4>>;
};

template <int D>
struct BackwardTiles;
template <>
struct BackwardTiles<64> {
  using type = TileList<BackwardTile<128, 128, 8, 4, 4, 4, true> QKV_FA2_TUNING_TILES(
      BackwardTile<64, 128, 8, 2, 4, 4, true>)>;
};
template <>
struct BackwardTiles<96> {
  using type = TileList<BackwardTile<64, 128, 8, 2, 4, 4, true>>;
};
template <>
struct BackwardTiles<128> {
  using type = TileList<BackwardTile<64, 128, 8, 2, 4, 2, true> QKV_FA2_TUNING_TILES(
      BackwardTile<64, 64, 4, 2, 2, 2, true>)>;
};
template <>
struct BackwardTiles<256> {
  using type = TileList<BackwardTile<64, 64, 8, 4, 2, 2, false>>;
};

// A tile named by its query rows, keys and warps ("128x64x4"); m == 0: the head dim's default.
struct TileName {
  int m = 0, n = 0, warps = 0;
  bool given() const { return m != 0; }
  std::string str() const {
    return std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(warps);
  }
};

// "MxNxW" -> TileName; an empty or null text gives the default; false when malformed.
inline bool parse_tile_name(const char* text, TileName& name) {
  name = TileName{};
  if (text == nullptr || text[0] == '\0') return true;
  char tail = 0;
  return std::sscanf(text, "%dx%dx%d%c", &name.m, &name.n, &name.warps, &tail) == 3 && name.m > 0 && name.n > 0 &&
         name.warps > 0;
}

template <typename Tile>
TileName name_of() {
  return TileName{Tile::kBlockM, Tile::kBlockN, Tile::kWarps};
}

template <typename First, typename... Rest>
TileName first_tile_name(TileList<First, Rest...>) {
  return name_of<First>();
}

// The default forward tile of head dim D (the first of its list); `smem_per_sm` (bytes) decides
// D = 256.
template <int D>
TileName default_forward_tile(int smem_per_sm) {
  if constexpr (D == 256) {
    return smem_per_sm >= 192 * 1024 ? TileName{64, 64, 4} : TileName{128, 64, 8};
  } else {
    return first_tile_name(typename ForwardTiles<D>::type{});
  }
}

// Calls fn(Tile{}) for the tile of `list` that `name` names (the first one when not given);
// false when the list has no such tile.
template <typename Fn, typename... Tiles>
bool with_named_tile(TileList<Tiles...> list, TileName name, Fn&& fn) {
  if (!name.given()) name = first_tile_name(list);
  bool found = false;
  auto try_tile = [&](auto tile) {
    using Tile = decltype(tile);
    if (!found && name.m == Tile::kBlockM && name.n == Tile::kBlockN && name.warps == Tile::kWarps) {
      found = true;
      fn(tile);
    }
  };
  (try_tile(Tiles{}), ...);
  return found;
}

// Host side: whether a call qualifies for the fa2 kernels (the caller falls back, or raises when
// the kernel was forced): fp16/bf16, head_dim == v_head_dim in {64, 96, 128, 256}, 16-byte rows
// for every tensor read or written by cp.async / 16-byte stores (unit column stride, 8-element
// aligned strides and base), compute capability 8.0+.
inline bool head_dim_supported(int64_t d) { return d == 64 || d == 96 || d == 128 || d == 256; }

inline bool forward_supported(const ForwardArgs& args, int device_major) {
  const ProblemShape& p = args.shape;
  if (device_major < 8) return false;
  if (uses_sequence_options(p)) return false;  // issue 17's options: generic kernels only
  if (args.dtype != ElementType::Float16 && args.dtype != ElementType::BFloat16) return false;
  if (p.head_dim != p.v_head_dim || !head_dim_supported(p.head_dim)) return false;
  for (const ConstView4* view : {&args.q, &args.k, &args.v}) {
    if (!mma::rows_aligned(view->data, view->s0, view->s1, view->s2, view->s3, 8)) return false;
  }
  return mma::rows_aligned(args.out.data, args.out.s0, args.out.s1, args.out.s2, args.out.s3, 8);
}

inline bool backward_supported(const BackwardArgs& args, int device_major) {
  const ProblemShape& p = args.shape;
  if (device_major < 8) return false;
  if (uses_sequence_options(p)) return false;  // issue 17's options: generic kernels only
  if (args.dtype != ElementType::Float16 && args.dtype != ElementType::BFloat16) return false;
  if (p.head_dim != p.v_head_dim || !head_dim_supported(p.head_dim)) return false;
  for (const ConstView4* view : {&args.q, &args.k, &args.v, &args.grad_out}) {
    if (!mma::rows_aligned(view->data, view->s0, view->s1, view->s2, view->s3, 8)) return false;
  }
  for (const MutableView4* view : {&args.grad_q, &args.grad_k, &args.grad_v}) {
    if (!mma::rows_aligned(view->data, view->s0, view->s1, view->s2, view->s3, 8)) return false;
  }
  // The gradient of a bias with one key column comes from row sums over every key (the generic
  // dQ kernel's RowShiftSums); the fa2 backward, parallel over keys, only sums dS.
  if (args.grad_bias != nullptr && (args.grad_bias_s3 == 0 || p.kv_len == 1)) return false;
  return true;
}

}  // namespace qkv::cuda::fa2
