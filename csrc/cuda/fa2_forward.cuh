#pragma once
// FlashAttention-2-class forward kernel (sm_80+, float16 / bfloat16, head_dim == v_head_dim in
// {64, 96, 128, 256}), after the design of Dao's FlashAttention-2 (csrc/flash_attn/src:
// flash_fwd_kernel.h, softmax.h), written for qkv's semantics.
//
// A block owns kBlockM query rows of one (batch, head); warp w owns rows [w R, w R + R), R = 16 or
// 32 (one or two m16 mma tiles: each K/V fragment feeds R/16 mmas). Shared memory holds the Q tile
// and one K and one V tile (XOR-swizzled, fa2_common.cuh). Per key tile of kBlockN:
//   wait K; barrier; start the copy of V            (V streams in while S is computed)
//   S = Q K^T                                        (ldmatrix Q and K from shared memory)
//   masks (only on tiles that cross a sequence end or the causal diagonal)
//   wait V; barrier; start the copy of the next K   (K streams in during softmax and P V)
//   online softmax on the S fragments (exp2; a row that has seen no key keeps max -inf and
//   subtracts 0, so no inf - inf appears), dropout
//   O += P V: the S accumulators are, element for element, the A fragments of P; V through
//   ldmatrix.trans
// The epilogue divides by the row sums, stages O (as T) through the warp's own rows of the Q tile
// and writes it with 16-byte stores; the logsumexp is float32.
//
// kGeneral == false is the fast path: no bias, no dropout and scale > 0, so the running max is kept
// on raw scores and exp2(s * scale * log2(e) - max * scale * log2(e)) is one FFMA + MUFU per
// score. kGeneral == true adds the bias (read per element, in natural-log units, and never
// multiplied: x = s * scale + bias, p = exp2((x - max) * log2(e)), so a finite bias stays finite
// however negative), dropout (the shared counter-based hash, csrc/kernels/dropout_hash.h) and any
// finite scale.
#include "fa2_common.cuh"

#include <type_traits>

namespace qkv::cuda::fa2 {

// A forward tile shape: kBlockM query rows per block, kWarps warps, key/value tiles of kBlockN.
template <int kBlockM_, int kBlockN_, int kWarps_>
struct ForwardTile {
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_, kWarps = kWarps_;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kRowsPerWarp = kBlockM / kWarps;
  static_assert(kRowsPerWarp == 16 || kRowsPerWarp == 32, "a warp owns one or two m16 tiles of rows");
  static_assert(kBlockN % 16 == 0, "key tiles are whole k16 steps of P V");
};

// The tile the general kernel runs for a tile choice: half the keys per tile (its bias and dropout
// code needs the registers), as FlashAttention-2 does with dropout.
template <typename Tile, bool kGeneral>
using ForwardKernelTile =
    std::conditional_t<kGeneral && Tile::kBlockN >= 64, ForwardTile<Tile::kBlockM, Tile::kBlockN / 2, Tile::kWarps>,
                       Tile>;

template <int D, typename Tile>
struct ForwardConfig {
  using QTile = SmemTile<Tile::kBlockM, D>;
  using KVTile = SmemTile<Tile::kBlockN, D>;
  static constexpr size_t shared_bytes() { return QTile::kBytes + 2 * KVTile::kBytes; }
  static int64_t blocks(const ProblemShape& p) { return p.batch * p.heads * ceil_div(p.q_len, Tile::kBlockM); }
};

// Whether the fast path (kGeneral == false) computes this call.
inline bool forward_is_plain(const ForwardArgs& args) {
  return args.bias.data == nullptr && !(args.shape.dropout_p > 0.0) && args.shape.scale > 0.0;
}

template <typename T, int D, typename Tile, bool kGeneral>
__global__ void __launch_bounds__(Tile::kThreads) fa2_forward_kernel(const ForwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  static_assert(D % 32 == 0 && D <= 256, "head dim: a multiple of 32, at most 256");
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kThreads = Tile::kThreads;
  constexpr int kRows = Tile::kRowsPerWarp;
  constexpr int kMT = kRows / 16, kNT = kBlockN / 8, kDT = D / 8;
  using Config = ForwardConfig<D, Tile>;
  using QTile = typename Config::QTile;
  using KVTile = typename Config::KVTile;

  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  const uint32_t q_smem = shared_address(smem_bytes);
  const uint32_t k_smem = q_smem + static_cast<uint32_t>(QTile::kBytes);
  const uint32_t v_smem = k_smem + static_cast<uint32_t>(KVTile::kBytes);

  const ProblemShape& p = args.shape;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int g = lane >> 2, t = lane & 3;
  const int64_t q_tiles = ceil_div(p.q_len, kBlockM);
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / q_tiles;
  const int64_t tile_index = static_cast<int64_t>(blockIdx.x) % q_tiles;
  // Under a causal mask later query tiles see more keys: those start first.
  const int64_t m_block = p.is_causal ? q_tiles - 1 - tile_index : tile_index;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t row0 = m_block * kBlockM;
  const int warp_row0 = warp * kRows;            // within the block
  const int64_t warp_i0 = row0 + warp_row0;      // first query row of this warp
  const uint16_t* q = static_cast<const uint16_t*>(args.q.data) + b * args.q.s0 + h * args.q.s1;
  const uint16_t* k = static_cast<const uint16_t*>(args.k.data) + b * args.k.s0 + h * args.k.s1;
  const uint16_t* v = static_cast<const uint16_t*>(args.v.data) + b * args.v.s0 + h * args.v.s1;
  const float scale = static_cast<float>(p.scale);
  const float scale_log2 = scale * kLog2e;
  const float neg_inf = -INFINITY;
  const bool has_bias = kGeneral && args.bias.data != nullptr;
  const bool dropout = kGeneral && p.dropout_p > 0.0;

  const int64_t rows_end = row0 + kBlockM < p.q_len ? row0 + kBlockM : p.q_len;
  const int64_t key_tiles = ceil_div(key_end_for_rows(p, rows_end), kBlockN);

  load_tile_async<kBlockM, D, kThreads>(q_smem, q, args.q.s2, row0, p.q_len, tid);
  if (key_tiles > 0) load_tile_async<kBlockN, D, kThreads>(k_smem, k, args.k.s2, 0, p.kv_len, tid);
  copy_async_commit();

  float o[kMT][kDT][4];
  zero(o);
  float row_max[kMT][2], row_sum[kMT][2];  // rows g and g + 8 of each m-tile; sums are this lane's share
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
    row_max[mi][0] = row_max[mi][1] = neg_inf;
    row_sum[mi][0] = row_sum[mi][1] = 0.f;
  }

  for (int64_t tile = 0; tile < key_tiles; ++tile) {
    const int64_t j0 = tile * kBlockN;
    copy_async_wait<0>();
    __syncthreads();  // K[tile] (and Q) landed everywhere; every warp is done with V[tile - 1]
    load_tile_async<kBlockN, D, kThreads>(v_smem, v, args.v.s2, j0, p.kv_len, tid);
    copy_async_commit();

    float s[kMT][kNT][4];
    zero(s);
    warp_gemm<T, kRows, kBlockN, D, false, false, QTile, KVTile>(s, q_smem, warp_row0, 0, k_smem, 0, 0, lane);

    // Scores of hidden pairs become -inf. Only tiles that cross the key end or this warp's causal
    // diagonal need the per-element test; the general path also adds scale and bias here.
    const bool whole = TileMask<kRows, kBlockN>::whole(p, row0, j0, warp_row0, 0);
    if (kGeneral || !whole) {
      // Lane values from a fresh thread index: recomputed here, not held through the loop.
      const int me = opaque_thread_index(), my_lane = me % kWarpSize;
      const int my_row0 = (me / kWarpSize) * kRows, my_g = my_lane >> 2, my_t = my_lane & 3;
      const TileMask<kRows, kBlockN> mask(p, row0, j0, my_row0, 0, my_g, my_t);
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = mi * 16 + (e >> 1) * 8, c = nt * 8 + (e & 1);  // element (g + r, 2t + c)
            const bool visible = whole || mask.visible(r, c);
            if constexpr (kGeneral) {
              float x = s[mi][nt][e] * scale;
              // (rows past the end are never stored, and the bias has no row there)
              if (visible && has_bias && mask.row_valid(r)) {
                x += bias_at<float, T>(args.bias, b, h, row0 + my_row0 + my_g + r, j0 + 2 * my_t + c);
              }
              s[mi][nt][e] = visible ? x : neg_inf;
            } else {
              s[mi][nt][e] = visible ? s[mi][nt][e] : neg_inf;
            }
          }
        }
      }
    }

    copy_async_wait<0>();
    __syncthreads();  // V[tile] landed everywhere; every warp is done with K[tile]
    if (tile + 1 < key_tiles) {
      load_tile_async<kBlockN, D, kThreads>(k_smem, k, args.k.s2, j0 + kBlockN, p.kv_len, tid);
      copy_async_commit();
    }

    // Online softmax per row (half 0: row g, half 1: row g + 8 of each m-tile).
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float tile_max = neg_inf;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          tile_max = fmaxf(tile_max, fmaxf(s[mi][nt][2 * half], s[mi][nt][2 * half + 1]));
        }
        const float old_max = row_max[mi][half];
        const float new_max = fmaxf(old_max, quad_max(tile_max));
        row_max[mi][half] = new_max;
        // What is subtracted before exp2 (in log2 units for the fast path): 0 while the row has
        // seen no key, so exp2(-inf - 0) = 0 and never exp2(-inf + inf).
        float base, correction;
        if constexpr (kGeneral) {
          base = new_max == neg_inf ? 0.f : new_max;
          correction = exp2f((old_max - base) * kLog2e);
        } else {
          base = new_max == neg_inf ? 0.f : new_max * scale_log2;
          correction = exp2f(fmaf(old_max, scale_log2, -base));
        }
        row_sum[mi][half] *= correction;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          o[mi][dt][2 * half] *= correction;
          o[mi][dt][2 * half + 1] *= correction;
        }
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float& x = s[mi][nt][2 * half + c];
            const float prob = kGeneral ? exp2f((x - base) * kLog2e) : exp2f(fmaf(x, scale_log2, -base));
            sum += prob;
            x = prob;
            if (dropout) {
              const int64_t i = warp_i0 + mi * 16 + g + half * 8;
              const int64_t j = j0 + nt * 8 + 2 * t + c;
              if (!dropout_keep(p.dropout_seed, dropout_index(p, bh, i, j), p.keep_threshold)) x = 0.f;
            }
          }
        }
        row_sum[mi][half] += sum;  // the row sum counts dropped probabilities too
      }
    }

    // O += P V
    warp_gemm_registers_a<T, kRows, D, kBlockN, KVTile>(o, s, v_smem, 0, 0, lane);
  }

  // Epilogue: normalise, stage O through this warp's rows of the Q tile, store 16-byte chunks.
  copy_async_wait<0>();
  __syncthreads();  // with no key tile, other threads' Q copies into this warp's rows are complete
  const float keep_scale = dropout ? static_cast<float>(p.keep_scale) : 1.f;
  float* lse = static_cast<float*>(args.lse) + bh * p.q_len;
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float total = quad_sum(row_sum[mi][half]);
      const float inv = total == 0.f ? 0.f : keep_scale / total;  // no visible key: output 0
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        o[mi][dt][2 * half] *= inv;
        o[mi][dt][2 * half + 1] *= inv;
      }
      const int64_t i = warp_i0 + mi * 16 + g + half * 8;
      if (t == 0 && i < p.q_len) {
        const float max_natural = kGeneral ? row_max[mi][half] : row_max[mi][half] * scale;
        lse[i] = total == 0.f ? neg_inf : max_natural + log2f(total) * kLn2;
      }
    }
  }
  store_fragments<T, kMT, kDT, QTile>(q_smem, o, warp_row0, 0, lane, 1.f);
  __syncthreads();
  uint16_t* out = static_cast<uint16_t*>(args.out.data) + b * args.out.s0 + h * args.out.s1;
  store_tile<kBlockM, D, kThreads>(out, args.out.s2, row0, p.q_len, q_smem, tid);
#else
  __trap();  // never launched: fa2_forward_supported requires compute capability 8.0
#endif
}

}  // namespace qkv::cuda::fa2
