#pragma once
// Tensor-core backward kernels for float16 / bfloat16 with head_dim == v_head_dim in {64, 128}
// (sm_80+), used when no bias gradient is requested (the generic kernels handle that case).
// delta = rowsum(dO * O) comes from the generic delta kernel first. Then:
//
// dQ kernel: a block owns 64 query rows (warp w: rows [16w, 16w + 16)) and streams key tiles of 64:
//   S  (16 x 64) = Q_w K^T,  dP (16 x 64) = dO_w V^T          (A from shared Q / dO rows)
//   dS = P * (dP' - delta) on the fragments, P = exp(S - lse)  (dP' = dropout-masked dP)
//   dQ_w (16 x D) += dS K                                      (dS fragments reused as A)
// dK/dV kernel: a block owns 64 keys (warp w: keys [16w, 16w + 16)) and streams query tiles of QT
// rows (64 for D = 64, 32 for D = 128, to bound registers):
//   S^T (16 x QT) = K_w Q^T,  dP^T (16 x QT) = V_w dO^T
//   P'^T, dS^T on the fragments
//   dV_w += P'^T dO,  dK_w += dS^T Q  (scaled at the end)      (fragments reused as A)
// Both kernels are single-buffered (copy, barrier, compute, barrier): simpler than the forward's
// pipeline, and small enough in shared memory for every sm_80+ part.
#include "mma_common.cuh"

namespace qkv::cuda::mma {

template <int D>
struct GradQueryConfig {
  static constexpr int kBlock = 16 * kWarps;  // query rows per block
  static constexpr size_t shared_bytes() { return sizeof(uint16_t) * static_cast<size_t>(4 * 64) * (D + kPad); }
  static int64_t blocks(const ProblemShape& p) { return p.batch * p.heads * ceil_div(p.q_len, kBlock); }
};

template <int D>
struct GradKeyValueConfig {
  static constexpr int kBlock = 16 * kWarps;              // keys per block
  static constexpr int kQueryTile = D > 64 ? 32 : 64;     // query rows per streamed tile
  static constexpr size_t shared_bytes() {
    return sizeof(uint16_t) * static_cast<size_t>(2 * kBlock + 2 * kQueryTile) * (D + kPad) +
           3 * sizeof(float) * kQueryTile;  // lse, delta, lse normalizers
  }
  static int64_t blocks(const ProblemShape& p) { return p.batch * p.heads * ceil_div(p.kv_len, kBlock); }
};

// Host side: as forward_supported, plus aligned grad_out rows, gradients written as element pairs,
// and no bias gradient.
inline bool backward_supported(const BackwardArgs& args, int device_major) {
  const ProblemShape& p = args.shape;
  if (device_major < 8 || args.grad_bias != nullptr) return false;
  if (uses_sequence_options(p)) return false;  // issue 17's options: generic kernels only
  if (args.dtype != ElementType::Float16 && args.dtype != ElementType::BFloat16) return false;
  if (p.head_dim != p.v_head_dim || (p.head_dim != 64 && p.head_dim != 128)) return false;
  for (const ConstView4* view : {&args.q, &args.k, &args.v, &args.grad_out}) {
    if (!rows_aligned(view->data, view->s0, view->s1, view->s2, view->s3, 8)) return false;
  }
  for (const MutableView4* view : {&args.grad_q, &args.grad_k, &args.grad_v}) {
    if (!rows_aligned(view->data, view->s0, view->s1, view->s2, view->s3, 2)) return false;
  }
  return true;
}

// Stores rows of 16 x (8 * N) accumulator fragments (times `mul`) as element pairs; `row0` is the
// tile row of fragment row 0 and rows at or past `valid_rows` are skipped.
template <typename T, int N>
__device__ __forceinline__ void store_accumulators(const float (&acc)[N][4], T* base, int64_t row_stride, int64_t row0,
                                                   int64_t valid_rows, int g, int t, float mul) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = row0 + g + half * 8;
    if (row >= valid_rows) continue;
    uint32_t* out_row = reinterpret_cast<uint32_t*>(base + row * row_stride);
#pragma unroll
    for (int nt = 0; nt < N; ++nt) {
      out_row[nt * 4 + t] = Mma<T>::pack(acc[nt][2 * half] * mul, acc[nt][2 * half + 1] * mul);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) mma_grad_query_kernel(const BackwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  static_assert(D % 16 == 0 && D <= 128, "head dim must be a multiple of 16, at most 128");
  constexpr int LD = D + kPad;
  constexpr int kBlock = GradQueryConfig<D>::kBlock;
  constexpr int kKeyTile = 64;
  constexpr int kKeyTiles8 = kKeyTile / 8;
  constexpr int kDimTiles8 = D / 8;
  using Op = Mma<T>;

  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  uint16_t* q_smem = reinterpret_cast<uint16_t*>(smem_bytes);  // kBlock x LD
  uint16_t* do_smem = q_smem + kBlock * LD;                    // kBlock x LD
  uint16_t* k_smem = do_smem + kBlock * LD;                    // kKeyTile x LD
  uint16_t* v_smem = k_smem + kKeyTile * LD;                   // kKeyTile x LD

  const ProblemShape& p = args.shape;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane >> 2, t = lane & 3;
  const int64_t q_tiles = ceil_div(p.q_len, kBlock);
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / q_tiles;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) % q_tiles) * kBlock;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const uint16_t* q = static_cast<const uint16_t*>(args.q.data) + b * args.q.s0 + h * args.q.s1;
  const uint16_t* k = static_cast<const uint16_t*>(args.k.data) + b * args.k.s0 + h * args.k.s1;
  const uint16_t* v = static_cast<const uint16_t*>(args.v.data) + b * args.v.s0 + h * args.v.s1;
  const uint16_t* dout =
      static_cast<const uint16_t*>(args.grad_out.data) + b * args.grad_out.s0 + h * args.grad_out.s1;
  const MaskInfo mask = mask_of(p);
  const bool has_bias = args.bias.data != nullptr;
  const bool dropout = p.dropout_p > 0.0;
  const float keep_scale = static_cast<float>(p.keep_scale);
  const float scale = static_cast<float>(p.scale);
  const float neg_inf = -INFINITY;
  const float* lse = static_cast<const float*>(args.lse) + bh * p.q_len;
  const float* delta = static_cast<const float*>(args.delta) + bh * p.q_len;

  load_tile_async<D, kBlock>(q_smem, q, args.q.s2, i0, p.q_len);
  load_tile_async<D, kBlock>(do_smem, dout, args.grad_out.s2, i0, p.q_len);
  copy_async_commit();

  float row_lse[2], row_norm[2], row_delta[2];  // rows g and g + 8 of this warp's 16
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t i = i0 + warp * 16 + g + half * 8;
    row_lse[half] = i < p.q_len ? lse[i] : neg_inf;
    row_norm[half] = i < p.q_len ? lse_normalizer_at<float>(args.lse_normalizer, bh * p.q_len + i) : 1.f;
    row_delta[half] = i < p.q_len ? delta[i] : 0.f;
  }
  float dq[kDimTiles8][4];
#pragma unroll
  for (int dt = 0; dt < kDimTiles8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;

  const int64_t rows_end = i0 + kBlock < p.q_len ? i0 + kBlock : p.q_len;
  const int64_t key_end = key_end_for_rows(p, rows_end);
  for (int64_t j0 = 0; j0 < key_end; j0 += kKeyTile) {
    __syncthreads();  // the previous K/V tiles are consumed
    load_tile_async<D, kKeyTile>(k_smem, k, args.k.s2, j0, p.kv_len);
    load_tile_async<D, kKeyTile>(v_smem, v, args.v.s2, j0, p.kv_len);
    copy_async_commit();
    copy_async_wait<0>();  // (the first time, the Q and dO tiles too)
    __syncthreads();

    float s[kKeyTiles8][4], dp[kKeyTiles8][4];
#pragma unroll
    for (int nt = 0; nt < kKeyTiles8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t qa[4], da[4];
      load_a_fragment<LD>(qa, q_smem, warp * 16, ks * 16, g, t);
      load_a_fragment<LD>(da, do_smem, warp * 16, ks * 16, g, t);
#pragma unroll
      for (int nt = 0; nt < kKeyTiles8; ++nt) {
        uint32_t b0, b1;
        load_b_fragment_transposed<LD>(b0, b1, k_smem, nt * 8, ks * 16, g, t);
        Op::run(s[nt], qa, b0, b1);
        load_b_fragment_transposed<LD>(b0, b1, v_smem, nt * 8, ks * 16, g, t);
        Op::run(dp[nt], da, b0, b1);
      }
    }

    // dS = P * (dP' - delta), written over s
#pragma unroll
    for (int nt = 0; nt < kKeyTiles8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e >> 1;
        const int64_t i = i0 + warp * 16 + g + half * 8;
        const int64_t j = j0 + nt * 8 + 2 * t + (e & 1);
        float ds = 0.f;
        if (mask.visible(i, j) && row_lse[half] != neg_inf) {
          float x = s[nt][e] * scale;
          if (has_bias) x += bias_at<float, T>(args.bias, b, h, i, j);
          const float prob = exp2f((x - row_lse[half]) * kLog2e) * row_norm[half];
          float dpv = dp[nt][e];
          if (dropout) {
            dpv = dropout_keep(p.dropout_seed, dropout_index(p, bh, i, j), p.keep_threshold) ? dpv * keep_scale : 0.f;
          }
          ds = prob * (dpv - row_delta[half]);
        }
        s[nt][e] = ds;
      }
    }

    // dQ += dS K
#pragma unroll
    for (int kk = 0; kk < kKeyTile / 16; ++kk) {
      uint32_t dsa[4];
      accumulators_as_a_fragment<T>(dsa, s, kk);
#pragma unroll
      for (int dt = 0; dt < kDimTiles8; ++dt) {
        uint32_t b0, b1;
        load_b_fragment<LD>(b0, b1, k_smem, kk * 16, dt * 8, g, t);
        Op::run(dq[dt], dsa, b0, b1);
      }
    }
  }
  copy_async_wait<0>();  // with no key tile at all the Q/dO copies may still be in flight

  T* grad_q = static_cast<T*>(args.grad_q.data) + b * args.grad_q.s0 + h * args.grad_q.s1;
  store_accumulators<T>(dq, grad_q, args.grad_q.s2, i0 + warp * 16, p.q_len, g, t, scale);
#else
  __trap();  // never launched: backward_supported requires compute capability 8.0
#endif
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) mma_grad_key_value_kernel(const BackwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  static_assert(D % 16 == 0 && D <= 128, "head dim must be a multiple of 16, at most 128");
  constexpr int LD = D + kPad;
  constexpr int kBlock = GradKeyValueConfig<D>::kBlock;
  constexpr int kQueryTile = GradKeyValueConfig<D>::kQueryTile;
  constexpr int kQueryTiles8 = kQueryTile / 8;
  constexpr int kDimTiles8 = D / 8;
  using Op = Mma<T>;

  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  uint16_t* k_smem = reinterpret_cast<uint16_t*>(smem_bytes);  // kBlock x LD
  uint16_t* v_smem = k_smem + kBlock * LD;                     // kBlock x LD
  uint16_t* q_smem = v_smem + kBlock * LD;                     // kQueryTile x LD
  uint16_t* do_smem = q_smem + kQueryTile * LD;                // kQueryTile x LD
  float* lse_smem = reinterpret_cast<float*>(do_smem + kQueryTile * LD);  // kQueryTile
  float* delta_smem = lse_smem + kQueryTile;                               // kQueryTile
  float* norm_smem = delta_smem + kQueryTile;                              // kQueryTile

  const ProblemShape& p = args.shape;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane >> 2, t = lane & 3;
  const int64_t k_tiles = ceil_div(p.kv_len, kBlock);
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / k_tiles;
  const int64_t j0 = (static_cast<int64_t>(blockIdx.x) % k_tiles) * kBlock;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const uint16_t* q = static_cast<const uint16_t*>(args.q.data) + b * args.q.s0 + h * args.q.s1;
  const uint16_t* k = static_cast<const uint16_t*>(args.k.data) + b * args.k.s0 + h * args.k.s1;
  const uint16_t* v = static_cast<const uint16_t*>(args.v.data) + b * args.v.s0 + h * args.v.s1;
  const uint16_t* dout =
      static_cast<const uint16_t*>(args.grad_out.data) + b * args.grad_out.s0 + h * args.grad_out.s1;
  const MaskInfo mask = mask_of(p);
  const bool has_bias = args.bias.data != nullptr;
  const bool dropout = p.dropout_p > 0.0;
  const float keep_scale = static_cast<float>(p.keep_scale);
  const float scale = static_cast<float>(p.scale);
  const float neg_inf = -INFINITY;
  const float* lse = static_cast<const float*>(args.lse) + bh * p.q_len;
  const float* delta = static_cast<const float*>(args.delta) + bh * p.q_len;

  load_tile_async<D, kBlock>(k_smem, k, args.k.s2, j0, p.kv_len);
  load_tile_async<D, kBlock>(v_smem, v, args.v.s2, j0, p.kv_len);
  copy_async_commit();

  float dk[kDimTiles8][4], dv[kDimTiles8][4];
#pragma unroll
  for (int dt = 0; dt < kDimTiles8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;
  }

  for (int64_t i0 = first_query_seeing(p, j0); i0 < p.q_len; i0 += kQueryTile) {
    __syncthreads();  // the previous Q/dO/lse/delta tiles are consumed
    load_tile_async<D, kQueryTile>(q_smem, q, args.q.s2, i0, p.q_len);
    load_tile_async<D, kQueryTile>(do_smem, dout, args.grad_out.s2, i0, p.q_len);
    copy_async_commit();
    for (int r = threadIdx.x; r < kQueryTile; r += kThreads) {
      const int64_t i = i0 + r;
      lse_smem[r] = i < p.q_len ? lse[i] : neg_inf;
      delta_smem[r] = i < p.q_len ? delta[i] : 0.f;
      norm_smem[r] = i < p.q_len ? lse_normalizer_at<float>(args.lse_normalizer, bh * p.q_len + i) : 1.f;
    }
    copy_async_wait<0>();  // (the first time, the K and V tiles too)
    __syncthreads();

    // S^T = K_w Q^T and dP^T = V_w dO^T: rows are this warp's keys, columns the tile's queries.
    float s[kQueryTiles8][4], dp[kQueryTiles8][4];
#pragma unroll
    for (int nt = 0; nt < kQueryTiles8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t ka[4], va[4];
      load_a_fragment<LD>(ka, k_smem, warp * 16, ks * 16, g, t);
      load_a_fragment<LD>(va, v_smem, warp * 16, ks * 16, g, t);
#pragma unroll
      for (int nt = 0; nt < kQueryTiles8; ++nt) {
        uint32_t b0, b1;
        load_b_fragment_transposed<LD>(b0, b1, q_smem, nt * 8, ks * 16, g, t);
        Op::run(s[nt], ka, b0, b1);
        load_b_fragment_transposed<LD>(b0, b1, do_smem, nt * 8, ks * 16, g, t);
        Op::run(dp[nt], va, b0, b1);
      }
    }

    // P'^T over s, dS^T over dp
#pragma unroll
    for (int nt = 0; nt < kQueryTiles8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t j = j0 + warp * 16 + g + (e >> 1) * 8;
        const int c = nt * 8 + 2 * t + (e & 1);
        const int64_t i = i0 + c;
        float prob_dropped = 0.f, ds = 0.f;
        if (mask.visible(i, j) && lse_smem[c] != neg_inf) {
          float x = s[nt][e] * scale;
          if (has_bias) x += bias_at<float, T>(args.bias, b, h, i, j);
          const float prob = exp2f((x - lse_smem[c]) * kLog2e) * norm_smem[c];
          float dpv = dp[nt][e];
          prob_dropped = prob;
          if (dropout) {
            const bool keep = dropout_keep(p.dropout_seed, dropout_index(p, bh, i, j), p.keep_threshold);
            dpv = keep ? dpv * keep_scale : 0.f;
            prob_dropped = keep ? prob * keep_scale : 0.f;
          }
          ds = prob * (dpv - delta_smem[c]);
        }
        s[nt][e] = prob_dropped;
        dp[nt][e] = ds;
      }
    }

    // dV += P'^T dO, dK += dS^T Q
#pragma unroll
    for (int kk = 0; kk < kQueryTile / 16; ++kk) {
      uint32_t pa[4], dsa[4];
      accumulators_as_a_fragment<T>(pa, s, kk);
      accumulators_as_a_fragment<T>(dsa, dp, kk);
#pragma unroll
      for (int dt = 0; dt < kDimTiles8; ++dt) {
        uint32_t b0, b1;
        load_b_fragment<LD>(b0, b1, do_smem, kk * 16, dt * 8, g, t);
        Op::run(dv[dt], pa, b0, b1);
        load_b_fragment<LD>(b0, b1, q_smem, kk * 16, dt * 8, g, t);
        Op::run(dk[dt], dsa, b0, b1);
      }
    }
  }
  copy_async_wait<0>();  // with no query tile at all the K/V copies may still be in flight

  T* grad_k = static_cast<T*>(args.grad_k.data) + b * args.grad_k.s0 + h * args.grad_k.s1;
  T* grad_v = static_cast<T*>(args.grad_v.data) + b * args.grad_v.s0 + h * args.grad_v.s1;
  store_accumulators<T>(dk, grad_k, args.grad_k.s2, j0 + warp * 16, p.kv_len, g, t, scale);
  store_accumulators<T>(dv, grad_v, args.grad_v.s2, j0 + warp * 16, p.kv_len, g, t, 1.f);
#else
  __trap();  // never launched: backward_supported requires compute capability 8.0
#endif
}

}  // namespace qkv::cuda::mma
