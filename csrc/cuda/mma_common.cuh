#pragma once
// Building blocks of the tensor-core kernels (mma_forward.cuh, mma_backward.cuh) for float16 /
// bfloat16 on sm_80+: the mma.sync.m16n8k16 (float32 accumulation) wrapper, fragment loads from
// shared tiles, cp.async tile copies.
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// lane = 4 * g + t, g = lane / 4, t = lane % 4:
//   A (16x16, row-major), 4 x b32: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, k x n),      2 x b32: b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t+8..2t+9, n = g)
//   C (16x8, f32),        4 x f32: c0, c1 = (g, 2t..2t+1),  c2, c3 = (g+8, 2t..2t+1)
// Each b32 holds the lower-indexed element in its low 16 bits.
#include "../kernels/dropout_hash.h"
#include "device_utils.cuh"
#include "masking.cuh"

#include <cstdint>
#include <initializer_list>

namespace qkv::cuda::mma {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kBlockQ = 16 * kWarps;
constexpr int kBlockK = 64;
constexpr int kPad = 8;  // elements of padding per shared row: rows stay 16-byte aligned, banks spread
constexpr float kLog2e = 1.4426950408889634f;

// Whether a strided (b, h, row, col) view has unit column stride and every row starts at a multiple
// of `elements` 2-byte elements (host side, for the launchers' qualification tests).
inline bool rows_aligned(const void* data, int64_t s0, int64_t s1, int64_t s2, int64_t s3, int64_t elements) {
  const auto address = reinterpret_cast<uintptr_t>(data);
  return s3 == 1 && s0 % elements == 0 && s1 % elements == 0 && s2 % elements == 0 &&
         address % (2 * elements) == 0;
}

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(QKV_CUDA_EMULATION)
    ::qkv_emu::mma_m16n8k16</*bf16=*/false>(c, a, b0, b1);
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
#if defined(__CUDA_ARCH__)
    const __half2 pair = __floats2half2_rn(lo, hi);  // one cvt.rn.f16x2.f32, lo in the low half
    return *reinterpret_cast<const uint32_t*>(&pair);
#else
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
           (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
#endif
  }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(QKV_CUDA_EMULATION)
    ::qkv_emu::mma_m16n8k16</*bf16=*/true>(c, a, b0, b1);
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);  // one cvt.rn.bf16x2.f32, lo in the low half
    return *reinterpret_cast<const uint32_t*>(&pair);
#else
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
#endif
  }
};

// 16-byte global -> shared copy; with valid == false the destination is zero-filled and nothing
// is read (the source operand is then only a dummy, still-valid address).
__device__ __forceinline__ void copy_async_16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t dst_shared = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_shared), "l"(src), "r"(src_bytes)
               : "memory");
#elif defined(QKV_CUDA_EMULATION)
  ::qkv_emu::copy_16(dst, src, valid);
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(QKV_CUDA_EMULATION)
  ::qkv_emu::copy_commit();
#endif
}

template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#elif defined(QKV_CUDA_EMULATION)
  ::qkv_emu::copy_wait(kPending);
#endif
}

__device__ __forceinline__ uint32_t load_shared_u32(const uint16_t* ptr) { return *reinterpret_cast<const uint32_t*>(ptr); }

// Starts the copy of rows [row0, row0 + rows) of a (b, h) slice (unit column stride, row stride
// a multiple of 8 elements, 16-byte aligned base: checked by the launchers' qualification tests) into a
// shared tile with leading dimension D + kPad; rows at or past valid_rows are zero-filled.
template <int D, int kRows>
__device__ __forceinline__ void load_tile_async(uint16_t* tile, const uint16_t* base, int64_t row_stride, int64_t row0,
                                                int64_t valid_rows) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int c = threadIdx.x; c < kChunks; c += kThreads) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int64_t row = row0 + r;
    const bool valid = row < valid_rows;
    copy_async_16(tile + r * (D + kPad) + col, valid ? base + row * row_stride + col : base, valid);
  }
}

// Fragments from shared tiles with leading dimension LD (see the layouts at the top).
// A (16 x 16) = tile[row0 .. row0+16)[col0 .. col0+16).
template <int LD>
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const uint16_t* tile, int row0, int col0, int g,
                                                int t) {
  const uint16_t* lo = tile + (row0 + g) * LD + col0 + 2 * t;
  const uint16_t* hi = lo + 8 * LD;
  a[0] = load_shared_u32(lo);
  a[1] = load_shared_u32(hi);
  a[2] = load_shared_u32(lo + 8);
  a[3] = load_shared_u32(hi + 8);
}

// B (16 x 8) with B[k][n] = tile[n0 + n][k0 + k]: a transposed operand such as K^T, whose pairs
// of consecutive k are contiguous in a tile row.
template <int LD>
__device__ __forceinline__ void load_b_fragment_transposed(uint32_t& b0, uint32_t& b1, const uint16_t* tile, int n0,
                                                           int k0, int g, int t) {
  const uint16_t* row = tile + (n0 + g) * LD + k0 + 2 * t;
  b0 = load_shared_u32(row);
  b1 = load_shared_u32(row + 8);
}

// B (16 x 8) with B[k][n] = tile[k0 + k][n0 + n]: an operand such as V, whose pairs of consecutive
// k sit in two tile rows and are gathered with 16-bit loads.
template <int LD>
__device__ __forceinline__ void load_b_fragment(uint32_t& b0, uint32_t& b1, const uint16_t* tile, int k0, int n0, int g,
                                                int t) {
  const uint16_t* col = tile + (k0 + 2 * t) * LD + n0 + g;
  b0 = static_cast<uint32_t>(col[0]) | (static_cast<uint32_t>(col[LD]) << 16);
  b1 = static_cast<uint32_t>(col[8 * LD]) | (static_cast<uint32_t>(col[9 * LD]) << 16);
}

// The A fragment of k-step kk of a product whose left operand is held as accumulator fragments
// acc[n-tile][4] of a 16 x (8 * N) matrix: n-tiles 2kk and 2kk+1 are, element for element, the A
// fragment (rounded to the input type). This is how P and dS feed the next mma without a trip
// through shared memory.
template <typename T, int N>
__device__ __forceinline__ void accumulators_as_a_fragment(uint32_t (&a)[4], const float (&acc)[N][4], int kk) {
  a[0] = Mma<T>::pack(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = Mma<T>::pack(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = Mma<T>::pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = Mma<T>::pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

}  // namespace qkv::cuda::mma
