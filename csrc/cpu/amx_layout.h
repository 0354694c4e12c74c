#pragma once
// The shapes of the AMX tiles and of the operands packed for them (amx_tiles.h), free of
// intrinsics: amx_tiles.h is AVX-512 only, while amx_backward.h sizes its buffers in every copy
// of the kernels.
#include <algorithm>
#include <cstdint>

namespace qkv {
inline namespace CPU_CAPABILITY {
namespace amx {

constexpr int64_t kTileRows = 16;   // rows of every tile (of A and C; pair rows of B)
constexpr int64_t kTileDepth = 32;  // bfloat16 per row of A: the reduction of one tile product
constexpr int64_t kTileCols = 16;   // float32 per row of C: the columns of one tile product
constexpr int64_t kTileElems = kTileRows * kTileDepth;  // bfloat16 per packed B tile (1 KiB)

constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Elements of the packed tiles (pack_vnni) of a k x n operand.
constexpr int64_t vnni_size(int64_t k, int64_t n) {
  return round_up(std::max<int64_t>(k, 1), kTileDepth) * round_up(std::max<int64_t>(n, 1), kTileCols);
}

}  // namespace amx
}  // namespace CPU_CAPABILITY
}  // namespace qkv
