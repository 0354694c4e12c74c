#pragma once
// Building blocks of the FlashAttention-2-class kernels (fa2_forward.cuh, fa2_backward.cuh), sm_80+,
// float16 / bfloat16: XOR-swizzled shared tiles filled by 16-byte cp.async, ldmatrix fragment
// loads, and warp-level GEMMs on mma.sync.m16n8k16 (the wrapper, cp.async and the accumulator ->
// A-fragment conversion come from mma_common.cuh).
//
// ldmatrix (PTX ISA, "Warp-level matrix load instruction: ldmatrix"): lanes 8i .. 8i+7 give the
// row addresses (16 bytes each) of 8x8 matrix i; register i of lane l then holds matrix i's row
// l/4, columns 2(l%4) and 2(l%4)+1 (the lower column in the low 16 bits). With .trans it holds the
// transpose: rows 2(l%4) and 2(l%4)+1 of column l/4. Against the mma.m16n8k16 fragment layouts
// (mma_common.cuh), with g = l/4 and t = l%4:
//   A (16x16) = matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
//   B (16x8) b0, b1 = (k 0-7, n 0-7), (k 8-15, n 0-7), stored n-major (B[k][n] = tile[n][k], as K in
//                     Q K^T) through ldmatrix, stored k-major (B[k][n] = tile[k][n], as V in P V)
//                     through ldmatrix.trans.
#include "mma_common.cuh"

#include <cstdint>

namespace qkv::cuda::fa2 {

using mma::accumulators_as_a_fragment;
using mma::copy_async_commit;
using mma::copy_async_wait;
using mma::Mma;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- shared memory ---------------------------------------------------------------------------------
// The fa2 kernels address shared memory with 32-bit shared-window addresses (what ldmatrix,
// cp.async and st/ld.shared take): half the registers of generic pointers.

__device__ __forceinline__ uint32_t shared_address(const void* p) {
#if defined(QKV_CUDA_EMULATION)
  return ::qkv_emu::shared_address(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// 16-byte global -> shared copy (cp.async.cg); with valid == false the destination is zero-filled
// and nothing is read (the source is then only a dummy, still-valid address).
__device__ __forceinline__ void copy_async_16(uint32_t dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#elif defined(QKV_CUDA_EMULATION)
  ::qkv_emu::copy_16(::qkv_emu::shared_pointer(dst), src, valid);
#endif
}

__device__ __forceinline__ void store_shared_u32(uint32_t address, uint32_t value) {
#if defined(QKV_CUDA_EMULATION)
  *reinterpret_cast<uint32_t*>(::qkv_emu::shared_pointer(address)) = value;
#else
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(address), "r"(value) : "memory");
#endif
}

__device__ __forceinline__ uint4 load_shared_16(uint32_t address) {
  uint4 v;
#if defined(QKV_CUDA_EMULATION)
  v = *reinterpret_cast<const uint4*>(::qkv_emu::shared_pointer(address));
#else
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(address)
               : "memory");
#endif
  return v;
}

// A kRows x kCols tile of 16-bit elements in shared memory, stored as column pages of 64 elements
// (32 when kCols is not a multiple of 64): each page row is 128 (64) bytes. Within a page, the
// byte address x of a 16-byte chunk is swizzled as x ^ (((x >> 7) & 7) << 4) (mask 3 for 32-wide
// pages): the chunk index moves by an XOR with the row (row / 2 for 32-wide pages) modulo 8 (4).
// Then the 8 rows an ldmatrix phase reads at one logical chunk, the 8 chunks a 16-byte copy phase
// writes, and the 32-bit fragment stores of a warp all fall in distinct banks (checked for every
// head dim by enumeration, docs/cuda.md). The swizzle is a function of the address alone, so every
// access agrees on it; with the tile base 1024-byte aligned (tile sizes are multiples of 1024 bytes
// and the dynamic shared memory starts the block's window) the key is exactly the row modulo 8.
template <int kRows, int kCols>
struct SmemTile {
  static_assert(kCols % 32 == 0 && kRows % 8 == 0, "tiles are whole 8-row, 32-column blocks");
  static constexpr int kPageCols = kCols % 64 == 0 ? 64 : 32;
  static constexpr int kPageChunks = kPageCols / 8;
  static constexpr int kChunks = kCols / 8;  // 16-byte chunks per row
  static constexpr int kRowBytes = 2 * kPageCols;
  static constexpr int kPageBytes = kRows * kRowBytes;
  static constexpr uint32_t kKeyMask = kPageCols == 64 ? 7 : 3;
  static constexpr int kElements = kRows * kCols;
  static constexpr size_t kBytes = sizeof(uint16_t) * static_cast<size_t>(kElements);

  static __device__ __forceinline__ uint32_t swizzle(uint32_t x) { return x ^ (((x >> 7) & kKeyMask) << 4); }
  // Shared address of chunk `chunk` (16 bytes, 8 elements) of row `row`.
  static __device__ __forceinline__ uint32_t address(uint32_t tile, int row, int chunk) {
    return swizzle(tile + (chunk / kPageChunks) * kPageBytes + row * kRowBytes + (chunk % kPageChunks) * 16);
  }
};

// Whether a cursor (below) whose column origin is a run-time multiple of kWidth columns, plus at
// most one lane bit (chunk parity), reaches every chunk of [origin, origin + kWidth) by an XOR and
// an immediate: when kWidth spans whole pages, or a power-of-two part of one.
template <typename Tile, int kWidth>
constexpr bool cursor_is_fast() {
  constexpr int chunks = kWidth / 8;
  return chunks % Tile::kPageChunks == 0 || (chunks > 0 && Tile::kPageChunks % chunks == 0);
}

// A lane's position in a SmemTile: at(dr, dc) is the address of (row + dr, chunk + dc), dr a
// multiple of 8 (the swizzle key does not change) and dc within the cursor's column span. Fast
// form: (base ^ (dc % page chunks) * 16) + (dc / page chunks) * page bytes + dr * row bytes -- one
// XOR and an immediate, so the compiler keeps a few lane constants instead of an address per
// access. Slow form (spans that are not a power-of-two part of a page, e.g. 48 of a 32-wide page):
// the exact address of (row, chunk + dc), plus dr rows. The emulation checks the fast form
// against the exact address on every access.
template <typename Tile, bool kFast>
struct TileCursor {
  uint32_t tile;
  int row, chunk;
  uint32_t base;
  __device__ __forceinline__ TileCursor(uint32_t tile_, int row_, int chunk_)
      : tile(tile_), row(row_), chunk(chunk_), base(Tile::address(tile_, row_, chunk_)) {
#if defined(__CUDA_ARCH__)
    // Opaque to the compiler: the per-access addresses (base ^ c) + d are then computed where they
    // are used (one LOP3 each) instead of being hoisted out of the kernel's loop, where each
    // would hold a register for the whole loop.
    asm volatile("" : "+r"(base));
#endif
  }
  __device__ __forceinline__ uint32_t at(int dr, int dc) const {
    if constexpr (kFast) {
      const uint32_t a = (base ^ static_cast<uint32_t>((dc % Tile::kPageChunks) * 16)) +
                         (dc / Tile::kPageChunks) * Tile::kPageBytes + dr * Tile::kRowBytes;
#if defined(QKV_CUDA_EMULATION)
      if (a != Tile::address(tile, row + dr, chunk + dc)) ::qkv_emu::fail("fa2 TileCursor: fast address is wrong");
#endif
      return a;
    } else {
      return Tile::address(tile, row, chunk + dc) + dr * Tile::kRowBytes;
    }
  }
};

// Starts the copy of rows [row0, row0 + kRows) of a (b, h) slice (unit column stride, 16-byte
// aligned rows: the launchers' qualification tests check this) into a SmemTile; rows at or past
// valid_rows are zero-filled (no read). Threads walk the tile page by page, a page row by
// kPageChunks consecutive threads: 64 or 128 contiguous global bytes per group.
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_tile_async(uint32_t tile, const uint16_t* base, int64_t row_stride, int64_t row0,
                                                int64_t valid_rows, int tid) {
  using Tile = SmemTile<kRows, kCols>;
  constexpr int kPerPage = kRows * Tile::kPageChunks;  // chunks of one page
  constexpr int kTotal = kRows * Tile::kChunks;
  static_assert(kTotal % kThreads == 0, "every thread copies the same number of chunks");
  // Same rows modulo 8 (so the same swizzle key) in every iteration, and whole iterations per page.
  constexpr bool kFast = kThreads % Tile::kPageChunks == 0 && (kThreads / Tile::kPageChunks) % 8 == 0 &&
                         kPerPage % kThreads == 0;
  const int row = (tid % kPerPage) / Tile::kPageChunks, chunk = (tid / kPerPage) * Tile::kPageChunks +
                                                                  tid % Tile::kPageChunks;
  const uint32_t first = Tile::address(tile, row, chunk);
#pragma unroll
  for (int it = 0; it < kTotal / kThreads; ++it) {
    int r = row, c = chunk;
    uint32_t dst;
    if constexpr (kFast) {
      constexpr int kRowsPerIt = kThreads / Tile::kPageChunks, kItPerPage = kPerPage / kThreads;
      r = row + (it % kItPerPage) * kRowsPerIt;
      c = chunk + (it / kItPerPage) * Tile::kPageChunks;
      dst = first + (it / kItPerPage) * Tile::kPageBytes + (it % kItPerPage) * kRowsPerIt * Tile::kRowBytes;
    } else {
      const int k = tid + it * kThreads;
      r = (k % kPerPage) / Tile::kPageChunks;
      c = (k / kPerPage) * Tile::kPageChunks + k % Tile::kPageChunks;
      dst = Tile::address(tile, r, c);
    }
    const int64_t global_row = row0 + r;
    const bool valid = global_row < valid_rows;
    copy_async_16(dst, valid ? base + global_row * row_stride + c * 8 : base, valid);
  }
}

// Copies rows [0, valid_rows - row0) of a finished SmemTile to global memory as 16-byte stores,
// walking the tile as load_tile_async does (a page row per kPageChunks consecutive threads:
// conflict-free shared reads, 64 or 128 contiguous global bytes per group). The tile must be
// complete (a barrier after its last write).
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void store_tile(uint16_t* base, int64_t row_stride, int64_t row0, int64_t valid_rows,
                                           uint32_t tile, int tid) {
  using Tile = SmemTile<kRows, kCols>;
  constexpr int kPerPage = kRows * Tile::kPageChunks;
  constexpr int kTotal = kRows * Tile::kChunks;
  static_assert(kTotal % kThreads == 0, "every thread stores the same number of chunks");
#pragma unroll
  for (int it = 0; it < kTotal / kThreads; ++it) {
    const int k = tid + it * kThreads;
    const int row = (k % kPerPage) / Tile::kPageChunks, chunk = (k / kPerPage) * Tile::kPageChunks + k % Tile::kPageChunks;
    if (row0 + row < valid_rows) {
      *reinterpret_cast<uint4*>(base + (row0 + row) * row_stride + chunk * 8) =
          load_shared_16(Tile::address(tile, row, chunk));
    }
  }
}

// ---- ldmatrix -------------------------------------------------------------------------------------

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#elif defined(QKV_CUDA_EMULATION)
  ::qkv_emu::ldmatrix<4, kTrans>(r, address);
#endif
}

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t address) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address));
  }
#elif defined(QKV_CUDA_EMULATION)
  ::qkv_emu::ldmatrix<2, kTrans>(r, address);
#endif
}

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], uint32_t address) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
  }
#elif defined(QKV_CUDA_EMULATION)
  ::qkv_emu::ldmatrix<1, kTrans>(r, address);
#endif
}

// ---- warp-level GEMMs -----------------------------------------------------------------------------

// acc (kM x kN, as kM/16 x kN/8 accumulator fragments) += A (kM x kK) B (kK x kN), both operands
// read from shared tiles with ldmatrix:
//   A[m][k] = a_tile[a_m0 + m][a_k0 + k]     (kATrans == false)
//           = a_tile[a_k0 + k][a_m0 + m]     (kATrans == true, e.g. P^T from a stored P)
//   B[k][n] = b_tile[b_n0 + n][b_k0 + k]     (kBTrans == false, e.g. K in Q K^T)
//           = b_tile[b_k0 + k][b_n0 + n]     (kBTrans == true, e.g. V in P V)
// Row origins are multiples of 16; column origins multiples of the matching width (kK for the
// k of untransposed operands, kM for A^T, kN for B^T). kM, kK multiples of 16, kN of 16 or 8.
template <typename T, int kM, int kN, int kK, bool kATrans, bool kBTrans, typename ATile, typename BTile>
__device__ __forceinline__ void warp_gemm(float (&acc)[kM / 16][kN / 8][4], uint32_t a_tile, int a_m0, int a_k0,
                                          uint32_t b_tile, int b_n0, int b_k0, int lane) {
  static_assert(kM % 16 == 0 && kK % 16 == 0 && kN % 8 == 0, "whole mma tiles");
  const int quad = lane >> 3, r8 = lane & 7;
  // ldmatrix x4 lane roles: matrix `quad`, row r8 of it.
  //   A:   matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
  //   B:   (n-tile 0: k 0-7, k 8-15), (n-tile 1: k 0-7, k 8-15) -> b0, b1 of n-tile 2np, then of 2np + 1
  const auto a = [&] {
    if constexpr (!kATrans) {
      return TileCursor<ATile, cursor_is_fast<ATile, kK>()>(a_tile, a_m0 + (lane & 15), a_k0 / 8 + (lane >> 4));
    } else {
      return TileCursor<ATile, cursor_is_fast<ATile, kM>()>(a_tile, a_k0 + r8 + ((quad >> 1) << 3),
                                                            a_m0 / 8 + (quad & 1));
    }
  }();
  const auto b = [&] {
    if constexpr (!kBTrans) {
      return TileCursor<BTile, cursor_is_fast<BTile, kK>()>(b_tile, b_n0 + r8 + ((quad >> 1) << 3),
                                                            b_k0 / 8 + (quad & 1));
    } else {
      return TileCursor<BTile, cursor_is_fast<BTile, kN>()>(b_tile, b_k0 + r8 + ((quad & 1) << 3),
                                                            b_n0 / 8 + (quad >> 1));
    }
  }();
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t af[kM / 16][4];
#pragma unroll
    for (int mi = 0; mi < kM / 16; ++mi) {
      ldmatrix_x4<kATrans>(af[mi], kATrans ? a.at(ks * 16, mi * 2) : a.at(mi * 16, ks * 2));
    }
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t bf[4];
      ldmatrix_x4<kBTrans>(bf, kBTrans ? b.at(ks * 16, np * 2) : b.at(np * 16, ks * 2));
#pragma unroll
      for (int mi = 0; mi < kM / 16; ++mi) {
        Mma<T>::run(acc[mi][2 * np], af[mi], bf[0], bf[1]);
        Mma<T>::run(acc[mi][2 * np + 1], af[mi], bf[2], bf[3]);
      }
    }
    if constexpr (kN % 16 != 0) {  // a last single n-tile: x2, lanes 0-15 give the rows (quad >> 1 == 0)
      uint32_t bf[2];
      constexpr int kLast = kN / 16;  // pairs before it
      ldmatrix_x2<kBTrans>(bf, kBTrans ? b.at(ks * 16, kLast * 2) : b.at(kLast * 16, ks * 2));
#pragma unroll
      for (int mi = 0; mi < kM / 16; ++mi) Mma<T>::run(acc[mi][kN / 8 - 1], af[mi], bf[0], bf[1]);
    }
  }
}

// acc (kM x kN) += P (kM x kK, held as accumulator fragments p[kM/16][kK/8][4], rounded to T here)
// times B (kK x kN) from a shared tile, B[k][n] = b_tile[b_k0 + k][b_n0 + n] (k-major, ldmatrix.trans):
// the O += P V of the forward, with the score accumulators reused as A fragments (the
// accumulator layout of n-tiles 2kk, 2kk+1 is, element for element, the A layout of k-step kk).
template <typename T, int kM, int kN, int kK, typename BTile>
__device__ __forceinline__ void warp_gemm_registers_a(float (&acc)[kM / 16][kN / 8][4],
                                                      const float (&p)[kM / 16][kK / 8][4], uint32_t b_tile,
                                                      int b_n0, int b_k0, int lane) {
  static_assert(kM % 16 == 0 && kK % 16 == 0 && kN % 16 == 0, "whole mma tile pairs");
  const int quad = lane >> 3, r8 = lane & 7;
  const TileCursor<BTile, cursor_is_fast<BTile, kN>()> b(b_tile, b_k0 + r8 + ((quad & 1) << 3), b_n0 / 8 + (quad >> 1));
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t a[kM / 16][4];
#pragma unroll
    for (int mi = 0; mi < kM / 16; ++mi) accumulators_as_a_fragment<T>(a[mi], p[mi], ks);
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t bf[4];
      ldmatrix_x4<true>(bf, b.at(ks * 16, np * 2));
#pragma unroll
      for (int mi = 0; mi < kM / 16; ++mi) {
        Mma<T>::run(acc[mi][2 * np], a[mi], bf[0], bf[1]);
        Mma<T>::run(acc[mi][2 * np + 1], a[mi], bf[2], bf[3]);
      }
    }
  }
}

template <int kM, int kN>
__device__ __forceinline__ void zero(float (&acc)[kM][kN][4]) {
#pragma unroll
  for (int mi = 0; mi < kM; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kN; ++ni) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.f;
  }
}

// Writes accumulator fragments (kMT x kNT tiles, times `mul`, rounded to T) into a shared tile at
// (row0, col0) (col0 a multiple of 8 kNT) as 32-bit element pairs: fragment element (g [+8],
// 2t..2t+1) of m-tile mi, n-tile ni goes to row row0 + 16 mi + g [+ 8], columns col0 + 8 ni + 2t, +1.
template <typename T, int kMT, int kNT, typename Tile>
__device__ __forceinline__ void store_fragments(uint32_t tile, const float (&acc)[kMT][kNT][4], int row0, int col0,
                                                int lane, float mul) {
  const int g = lane >> 2, t = lane & 3;
  const TileCursor<Tile, cursor_is_fast<Tile, 8 * kNT>()> c(tile, row0 + g, col0 / 8);
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        store_shared_u32(c.at(mi * 16 + half * 8, ni) + 4 * t,
                         Mma<T>::pack(acc[mi][ni][2 * half] * mul, acc[mi][ni][2 * half + 1] * mul));
      }
    }
  }
}

// ---- small helpers ---------------------------------------------------------------------------------

// threadIdx.x, read so that the compiler recomputes what derives from it where it is used rather
// than keeping it in a register across the kernel's loop (for lane-dependent values that only
// rare branches, such as the masking of diagonal tiles, need).
__device__ __forceinline__ int opaque_thread_index() {
#if defined(__CUDA_ARCH__)
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(tid));
  return tid;
#else
  return static_cast<int>(threadIdx.x);
#endif
}

// The visible part of a warp's score tile (rows i0 + ir, ir < kRows; keys j0 + jr, jr < kCols),
// i0 = block_i0 + warp_row, j0 = block_j0 + warp_col, as this lane sees it: its accumulator
// elements sit at ir = g + r, jr = 2t + c for compile-time offsets r (16 mi + 8 half) and c (8 nt +
// e % 2), so the limits are shifted by the lane's g and t once per tile and every element is one
// compare with an immediate. Key j is visible for query i iff jr < key_limit, ir < row_limit and
// (causal) jr - ir <= diagonal. The 64-bit differences are per block (uniform registers); the
// clamps keep them exact in 32 bits.
template <int kRows, int kCols>
struct TileMask {
  int key_limit, row_limit, diagonal;  // lane-shifted: compare with c, r and c - r
  __device__ __forceinline__ TileMask(const ProblemShape& p, int64_t block_i0, int64_t block_j0, int warp_row,
                                      int warp_col, int g, int t) {
    key_limit = static_cast<int>(clamp64(p.kv_len - block_j0, -kBig, kBig)) - warp_col - 2 * t;
    row_limit = static_cast<int>(clamp64(p.q_len - block_i0, -kBig, kBig)) - warp_row - g;
    diagonal = p.is_causal ? static_cast<int>(clamp64(block_i0 + p.causal_offset - block_j0, -kBig, kBig)) +
                                 warp_row - warp_col - 2 * t + g
                           : kBig;
  }
  // Whether the whole tile is visible (then no element needs the test): no key past the end, no
  // key past the diagonal of the tile's first row. warp_row/warp_col as above; uniform per warp.
  static __device__ __forceinline__ bool whole(const ProblemShape& p, int64_t block_i0, int64_t block_j0,
                                               int warp_row, int warp_col) {
    const int keys = static_cast<int>(clamp64(p.kv_len - block_j0, -kBig, kBig)) - warp_col;
    const int diag = p.is_causal
                         ? static_cast<int>(clamp64(block_i0 + p.causal_offset - block_j0, -kBig, kBig)) + warp_row -
                               warp_col
                         : kBig;
    return keys >= kCols && diag >= kCols - 1;
  }
  static __device__ __forceinline__ bool rows_whole(const ProblemShape& p, int64_t block_i0, int warp_row) {
    return static_cast<int>(clamp64(p.q_len - block_i0, -kBig, kBig)) - warp_row >= kRows;
  }
  __device__ __forceinline__ bool visible(int r, int c) const { return c < key_limit && c - r <= diagonal; }
  __device__ __forceinline__ bool row_valid(int r) const { return r < row_limit; }
  // Beyond every block offset (tiles are at most 256 x 256), so clamping keeps every comparison.
  static constexpr int64_t kBig = 1 << 20;
  static __device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
    return x < lo ? lo : (x > hi ? hi : x);
  }
};

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFullMask, v, 1));
  return fmaxf(v, __shfl_xor_sync(kFullMask, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  return v + __shfl_xor_sync(kFullMask, v, 2);
}

// Waits until *counter >= target (one lane per warp polls; the whole warp returns together), with
// acquire semantics: writes another block released before raising the counter are visible after.
// Used by the deterministic dQ accumulation, where a block waits only for blocks of lower index
// (dispatched before it), so the wait always ends.
__device__ __forceinline__ void wait_counter_at_least(const int* counter, int target, int lane) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (lane == 0) {
    int value;
    while (true) {
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(value) : "l"(counter) : "memory");
      if (value >= target) break;
      __nanosleep(32);
    }
  }
  __syncwarp();
#elif defined(QKV_CUDA_EMULATION)
  ::qkv_emu::wait_counter_at_least(counter, target);
  __syncwarp();
#endif
}

// Raises *counter by one once every lane's earlier global writes (atomics included) are visible
// at device scope: each lane fences its own writes, the warp barrier orders all of them before
// lane 0's increment.
__device__ __forceinline__ void release_counter(int* counter, int lane) {
  __threadfence();
  __syncwarp();
  if (lane == 0) atomicAdd(counter, 1);
}

}  // namespace qkv::cuda::fa2
