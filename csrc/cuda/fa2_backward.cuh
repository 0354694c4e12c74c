#pragma once
// FlashAttention-2-class backward (sm_80+, float16 / bfloat16, head_dim == v_head_dim in
// {64, 96, 128, 256}), after the design of Dao's FlashAttention-2 (csrc/flash_attn/src:
// flash_bwd_kernel.h), written for qkv's semantics. delta = rowsum(dO * O) comes from the generic
// delta kernel first; dQ is accumulated in float32 (args.dq_accum, zeroed by the caller) and
// converted by fa2_convert_dq_kernel last.
//
// A block owns kBlockN keys of one (batch, head) (K and V stay in shared memory) and walks the
// query tiles of kBlockM rows that can see them, Q double-buffered (the next tile is copied while
// this one is computed) and dO single-buffered. Per query tile, with 8 warps in three warp grids
// over the three products:
//   S = Q K^T, dP = dO V^T                     (kBlockM x kBlockN, warp grid kWarpsMSdP x ...)
//   P = exp2(S scale log2(e) - lse log2(e)), masks, dropout; dS = P (dP' - delta)
//   P' and dS -> shared memory (as T); barrier
//   dV += P'^T dO                              (kBlockN x D, warp grid kWarpsNdKV x ...: ldmatrix.trans
//                                               reads P^T and dO as stored)
//   barrier; start the copy of the next dO
//   dQ_tile = dS K -> atomically added to dq_accum (warp grid kWarpsMdQ x ...)
//   dK += dS^T Q
// dK (times scale) and dV (times the dropout scale) are staged through the K/V tiles and written
// with 16-byte stores.
//
// Deterministic mode (args.dq_semaphore != nullptr): the float additions into dq_accum happen in a
// fixed order, key block 0 first. Each (b, h, query tile) has a counter; a warp adds its part of
// tile m after the counter reached n_block * kWarps (every warp of every earlier key block that sees
// tile m -- always a prefix of the key blocks -- has added and released), then releases. A block
// only waits for blocks of lower index, which the hardware dispatched before it.
//
// kGeneral == false: no bias, no dropout, no bias gradient. kGeneral == true reads the bias (scores
// x = s * scale + bias in natural-log units, never multiplied by log2(e) themselves), replays the
// dropout mask and adds dS to the bias gradient (atomically, through the gradient's broadcast
// strides).
#include "fa2_common.cuh"

namespace qkv::cuda::fa2 {

// A backward tile shape: kBlockM query rows per step, kBlockN keys per block, kWarps warps, and
// the rows of the three warp grids: S/dP (kWarpsMSdP along queries), dK/dV (kWarpsNdKV along
// keys), dQ (kWarpsMdQ along queries); the remaining factor of kWarps splits the other dimension.
template <int kBlockM_, int kBlockN_, int kWarps_, int kWarpsMSdP_, int kWarpsNdKV_, int kWarpsMdQ_,
          bool kDoubleBufferQ_>
struct BackwardTile {
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_, kWarps = kWarps_;
  static constexpr int kWarpsMSdP = kWarpsMSdP_, kWarpsNdKV = kWarpsNdKV_, kWarpsMdQ = kWarpsMdQ_;
  static constexpr bool kDoubleBufferQ = kDoubleBufferQ_;
  static constexpr int kThreads = kWarps * kWarpSize;
  static_assert(kWarps % kWarpsMSdP == 0 && kWarps % kWarpsNdKV == 0 && kWarps % kWarpsMdQ == 0, "warp grids");
};

template <int D, typename Tile>
struct BackwardConfig {
  using QTile = SmemTile<Tile::kBlockM, D>;
  using KVTile = SmemTile<Tile::kBlockN, D>;
  using PTile = SmemTile<Tile::kBlockM, Tile::kBlockN>;
  static constexpr int kQStages = Tile::kDoubleBufferQ ? 2 : 1;
  // Warp tiles of the three products.
  static constexpr int kSM = Tile::kBlockM / Tile::kWarpsMSdP;                   // S/dP rows (queries)
  static constexpr int kSN = Tile::kBlockN / (Tile::kWarps / Tile::kWarpsMSdP);  // S/dP columns (keys)
  static constexpr int kKVN = Tile::kBlockN / Tile::kWarpsNdKV;                 // dK/dV rows (keys)
  static constexpr int kKVD = D / (Tile::kWarps / Tile::kWarpsNdKV);            // dK/dV columns (dims)
  static constexpr int kQM = Tile::kBlockM / Tile::kWarpsMdQ;                   // dQ rows (queries)
  static constexpr int kQD = D / (Tile::kWarps / Tile::kWarpsMdQ);              // dQ columns (dims)
  static_assert(kSM % 16 == 0 && kSN % 16 == 0 && kKVN % 16 == 0 && kKVD % 16 == 0 && kQM % 16 == 0 &&
                    kQD % 16 == 0,
                "warp tiles are whole pairs of mma tiles");
  static constexpr size_t shared_bytes() {
    return (kQStages + 1) * QTile::kBytes + 2 * KVTile::kBytes + 2 * PTile::kBytes;
  }
  static __host__ __device__ int64_t key_blocks(const ProblemShape& p) { return ceil_div(p.kv_len, Tile::kBlockN); }
  static int64_t blocks(const ProblemShape& p) { return p.batch * p.heads * key_blocks(p); }
};

// Whether the fast path (kGeneral == false) computes this call.
inline bool backward_is_plain(const BackwardArgs& args) {
  return args.bias.data == nullptr && !(args.shape.dropout_p > 0.0) && args.grad_bias == nullptr;
}

// The deterministic order's counters: one per (b, h, 64 query rows), so every tile choice
// (kBlockM 64 or 128) fits; the launcher zeroes this many ints.
constexpr int kSemaphoreRows = 64;
inline int64_t semaphore_count(const ProblemShape& p) { return p.batch * p.heads * ceil_div(p.q_len, kSemaphoreRows); }

template <typename T, int D, typename Tile, bool kGeneral>
__global__ void __launch_bounds__(Tile::kThreads) fa2_backward_kernel(const BackwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  static_assert(D % 32 == 0 && D <= 256, "head dim: a multiple of 32, at most 256");
  using Config = BackwardConfig<D, Tile>;
  using QTile = typename Config::QTile;
  using KVTile = typename Config::KVTile;
  using PTile = typename Config::PTile;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kThreads = Tile::kThreads;
  constexpr int kSM = Config::kSM, kSN = Config::kSN, kKVN = Config::kKVN, kKVD = Config::kKVD;
  constexpr int kQM = Config::kQM, kQD = Config::kQD;

  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  constexpr uint32_t kQBytes = static_cast<uint32_t>(QTile::kBytes), kKVBytes = static_cast<uint32_t>(KVTile::kBytes);
  const uint32_t q_smem = shared_address(smem_bytes);  // kQStages x QTile
  const uint32_t do_smem = q_smem + Config::kQStages * kQBytes;
  const uint32_t k_smem = do_smem + kQBytes;
  const uint32_t v_smem = k_smem + kKVBytes;
  const uint32_t p_smem = v_smem + kKVBytes;
  const uint32_t ds_smem = p_smem + static_cast<uint32_t>(PTile::kBytes);

  const ProblemShape& p = args.shape;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int g = lane >> 2, t = lane & 3;
  const int64_t key_blocks = Config::key_blocks(p);
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / key_blocks;
  const int n_block = static_cast<int>(static_cast<int64_t>(blockIdx.x) % key_blocks);
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t j0 = static_cast<int64_t>(n_block) * kBlockN;
  const uint16_t* q = static_cast<const uint16_t*>(args.q.data) + b * args.q.s0 + h * args.q.s1;
  const uint16_t* k = static_cast<const uint16_t*>(args.k.data) + b * args.k.s0 + h * args.k.s1;
  const uint16_t* v = static_cast<const uint16_t*>(args.v.data) + b * args.v.s0 + h * args.v.s1;
  const uint16_t* dout =
      static_cast<const uint16_t*>(args.grad_out.data) + b * args.grad_out.s0 + h * args.grad_out.s1;
  const float* lse = static_cast<const float*>(args.lse) + bh * p.q_len;
  const float* delta = static_cast<const float*>(args.delta) + bh * p.q_len;
  float* dq_accum = args.dq_accum + bh * p.q_len * D;
  int* semaphores = args.dq_semaphore == nullptr ? nullptr : args.dq_semaphore + bh * ceil_div(p.q_len, kBlockM);
  const float scale = static_cast<float>(p.scale);
  const float scale_log2 = scale * kLog2e;
  const float neg_inf = -INFINITY;
  const bool has_bias = kGeneral && args.bias.data != nullptr;
  const bool dropout = kGeneral && p.dropout_p > 0.0;
  const bool bias_grad = kGeneral && args.grad_bias != nullptr;
  const float keep_scale = dropout ? static_cast<float>(p.keep_scale) : 1.f;

  // Warp positions in the three grids.
  const int s_m0 = (warp % Tile::kWarpsMSdP) * kSM, s_n0 = (warp / Tile::kWarpsMSdP) * kSN;
  const int kv_n0 = (warp % Tile::kWarpsNdKV) * kKVN, kv_d0 = (warp / Tile::kWarpsNdKV) * kKVD;
  const int dq_m0 = (warp % Tile::kWarpsMdQ) * kQM, dq_d0 = (warp / Tile::kWarpsMdQ) * kQD;

  const int64_t m_begin = first_query_seeing(p, j0) / kBlockM;
  const int64_t m_end = ceil_div(p.q_len, kBlockM);

  load_tile_async<kBlockN, D, kThreads>(k_smem, k, args.k.s2, j0, p.kv_len, tid);
  load_tile_async<kBlockN, D, kThreads>(v_smem, v, args.v.s2, j0, p.kv_len, tid);
  if (m_begin < m_end) {
    load_tile_async<kBlockM, D, kThreads>(q_smem, q, args.q.s2, m_begin * kBlockM, p.q_len, tid);
    load_tile_async<kBlockM, D, kThreads>(do_smem, dout, args.grad_out.s2, m_begin * kBlockM, p.q_len, tid);
  }
  copy_async_commit();

  float dk[kKVN / 16][kKVD / 8][4], dv[kKVN / 16][kKVD / 8][4];
  zero(dk);
  zero(dv);

  for (int64_t m = m_begin; m < m_end; ++m) {
    const int stage = Tile::kDoubleBufferQ ? static_cast<int>((m - m_begin) & 1) : 0;
    const uint32_t q_tile = q_smem + stage * kQBytes;
    const int64_t i0 = m * kBlockM;
    copy_async_wait<0>();
    __syncthreads();  // Q[m], dO[m] (and K, V) landed; every warp is done with the previous step
    if (Tile::kDoubleBufferQ && m + 1 < m_end) {
      load_tile_async<kBlockM, D, kThreads>(q_smem + (stage ^ 1) * kQBytes, q, args.q.s2, i0 + kBlockM, p.q_len,
                                            tid);
      copy_async_commit();
    }

    float s[kSM / 16][kSN / 8][4], dp[kSM / 16][kSN / 8][4];
    zero(s);
    zero(dp);
    warp_gemm<T, kSM, kSN, D, false, false, QTile, KVTile>(s, q_tile, s_m0, 0, k_smem, s_n0, 0, lane);
    warp_gemm<T, kSM, kSN, D, false, false, QTile, KVTile>(dp, do_smem, s_m0, 0, v_smem, s_n0, 0, lane);

    // Row statistics of this warp's S rows (half 0: row g, half 1: row g + 8 of each m-tile), read
    // after the products so they hold no registers during them. The fast path keeps lse in log2
    // units, +inf on rows that see nothing (so exp2(.. - inf) = 0).
    float row_lse[kSM / 16][2], row_delta[kSM / 16][2];
#pragma unroll
    for (int mi = 0; mi < kSM / 16; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t i = i0 + s_m0 + mi * 16 + g + half * 8;
        const float l = i < p.q_len ? lse[i] : neg_inf;
        row_lse[mi][half] = kGeneral ? l : (l == neg_inf ? INFINITY : l * kLog2e);
        row_delta[mi][half] = i < p.q_len ? delta[i] : 0.f;
      }
    }

    // P (dropped out: P') over s, dS over dp.
    const int64_t warp_i0 = i0 + s_m0, warp_j0 = j0 + s_n0;
    const TileMask<kSM, kSN> mask(p, i0, j0, s_m0, s_n0, g, t);
    const bool partial =
        !TileMask<kSM, kSN>::whole(p, i0, j0, s_m0, s_n0) || !TileMask<kSM, kSN>::rows_whole(p, i0, s_m0);
#pragma unroll
    for (int mi = 0; mi < kSM / 16; ++mi) {
#pragma unroll
      for (int nt = 0; nt < kSN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e >> 1;
          const int r = mi * 16 + half * 8, c = nt * 8 + (e & 1);  // element (g + r, 2t + c)
          const bool visible = !partial || (mask.visible(r, c) && mask.row_valid(r));
          if constexpr (!kGeneral) {
            const float prob = visible ? exp2f(fmaf(s[mi][nt][e], scale_log2, -row_lse[mi][half])) : 0.f;
            dp[mi][nt][e] = prob * (dp[mi][nt][e] - row_delta[mi][half]);
            s[mi][nt][e] = prob;
          } else {
            float prob = 0.f, prob_kept = 0.f, ds = 0.f;
            if (visible && row_lse[mi][half] != neg_inf) {
              const int64_t i = warp_i0 + g + r, j = warp_j0 + 2 * t + c;
              float x = s[mi][nt][e] * scale;
              if (has_bias) x += bias_at<float, T>(args.bias, b, h, i, j);
              prob = exp2f((x - row_lse[mi][half]) * kLog2e);
              // A row whose lse lost its row sum (kernel_params.h, LseNormalizerArgs): rare, and
              // only with a bias, so the factor is read here rather than kept in registers.
              if (lse_needs_normalizer(row_lse[mi][half])) {
                prob *= lse_normalizer_at<float>(args.lse_normalizer, bh * p.q_len + i);
              }
              float dpv = dp[mi][nt][e];
              prob_kept = prob;
              if (dropout && !dropout_keep(p.dropout_seed, dropout_index(p, bh, i, j), p.keep_threshold)) {
                dpv = 0.f;
                prob_kept = 0.f;
              }
              ds = prob * (dpv * keep_scale - row_delta[mi][half]);
              if (bias_grad) {
                atomicAdd(static_cast<float*>(args.grad_bias) + b * args.grad_bias_s0 + h * args.grad_bias_s1 +
                              i * args.grad_bias_s2 + j * args.grad_bias_s3,
                          ds);
              }
            }
            dp[mi][nt][e] = ds;
            s[mi][nt][e] = prob_kept;
          }
        }
      }
    }
    store_fragments<T, kSM / 16, kSN / 8, PTile>(p_smem, s, s_m0, s_n0, lane, 1.f);
    store_fragments<T, kSM / 16, kSN / 8, PTile>(ds_smem, dp, s_m0, s_n0, lane, 1.f);
    __syncthreads();  // P' and dS complete

    // dV += P'^T dO
    warp_gemm<T, kKVN, kKVD, kBlockM, true, true, PTile, QTile>(dv, p_smem, kv_n0, 0, do_smem, kv_d0, 0, lane);
    __syncthreads();  // every warp is done with dO[m]
    if (m + 1 < m_end) {
      load_tile_async<kBlockM, D, kThreads>(do_smem, dout, args.grad_out.s2, i0 + kBlockM, p.q_len, tid);
      copy_async_commit();
    }

    // dQ[m] += dS K, in float32 through atomics (in a fixed order in deterministic mode)
    {
      float dq[kQM / 16][kQD / 8][4];
      zero(dq);
      warp_gemm<T, kQM, kQD, kBlockN, false, true, PTile, KVTile>(dq, ds_smem, dq_m0, 0, k_smem, dq_d0, 0, lane);
      if (semaphores != nullptr) wait_counter_at_least(semaphores + m, n_block * Tile::kWarps, lane);
#pragma unroll
      for (int mi = 0; mi < kQM / 16; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int64_t i = i0 + dq_m0 + mi * 16 + g + half * 8;
          if (i >= p.q_len) continue;
          float* row = dq_accum + i * D + dq_d0 + 2 * t;
#pragma unroll
          for (int nt = 0; nt < kQD / 8; ++nt) {
            atomicAdd(row + nt * 8, dq[mi][nt][2 * half]);
            atomicAdd(row + nt * 8 + 1, dq[mi][nt][2 * half + 1]);
          }
        }
      }
      if (semaphores != nullptr) release_counter(semaphores + m, lane);
    }

    // dK += dS^T Q
    warp_gemm<T, kKVN, kKVD, kBlockM, true, true, PTile, QTile>(dk, ds_smem, kv_n0, 0, q_tile, kv_d0, 0, lane);
    if (!Tile::kDoubleBufferQ && m + 1 < m_end) {
      __syncthreads();  // every warp is done with Q[m]
      load_tile_async<kBlockM, D, kThreads>(q_smem, q, args.q.s2, i0 + kBlockM, p.q_len, tid);
      copy_async_commit();
    }
  }

  // Epilogue: dK, dV through the K and V tiles (no longer read), then 16-byte stores.
  copy_async_wait<0>();  // with no query tile, the K/V copies may still be in flight
  __syncthreads();
  store_fragments<T, kKVN / 16, kKVD / 8, KVTile>(k_smem, dk, kv_n0, kv_d0, lane, scale);
  store_fragments<T, kKVN / 16, kKVD / 8, KVTile>(v_smem, dv, kv_n0, kv_d0, lane, keep_scale);
  __syncthreads();
  uint16_t* grad_k = static_cast<uint16_t*>(args.grad_k.data) + b * args.grad_k.s0 + h * args.grad_k.s1;
  uint16_t* grad_v = static_cast<uint16_t*>(args.grad_v.data) + b * args.grad_v.s0 + h * args.grad_v.s1;
  store_tile<kBlockN, D, kThreads>(grad_k, args.grad_k.s2, j0, p.kv_len, k_smem, tid);
  store_tile<kBlockN, D, kThreads>(grad_v, args.grad_v.s2, j0, p.kv_len, v_smem, tid);
#else
  __trap();  // never launched: fa2_backward_supported requires compute capability 8.0
#endif
}

// dQ = scale * dq_accum, rounded to T: one thread per 8 elements (two 16-byte loads, one 16-byte
// store into grad_q's aligned rows).
template <typename T, int D>
__global__ void __launch_bounds__(256) fa2_convert_dq_kernel(const BackwardArgs args) {
  const ProblemShape& p = args.shape;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;  // over (b, h, i, chunk)
  const int64_t row = index / (D / 8);
  if (row >= p.batch * p.heads * p.q_len) return;
  const int chunk = static_cast<int>(index % (D / 8));
  const int64_t bh = row / p.q_len, i = row % p.q_len, b = bh / p.heads, h = bh % p.heads;
  const float scale = static_cast<float>(p.scale);
  const float4* src = reinterpret_cast<const float4*>(args.dq_accum + row * D + chunk * 8);
  const float4 lo = src[0], hi = src[1];
  uint4 packed;
  packed.x = Mma<T>::pack(lo.x * scale, lo.y * scale);
  packed.y = Mma<T>::pack(lo.z * scale, lo.w * scale);
  packed.z = Mma<T>::pack(hi.x * scale, hi.y * scale);
  packed.w = Mma<T>::pack(hi.z * scale, hi.w * scale);
  T* grad_q = static_cast<T*>(args.grad_q.data) + b * args.grad_q.s0 + h * args.grad_q.s1 + i * args.grad_q.s2;
  *reinterpret_cast<uint4*>(grad_q + chunk * 8) = packed;
}

struct ConvertDqConfig {
  static constexpr int kThreads = 256;
  template <int D>
  static int64_t blocks(const ProblemShape& p) {
    return ceil_div(p.batch * p.heads * p.q_len * (D / 8), kThreads);
  }
};

}  // namespace qkv::cuda::fa2
