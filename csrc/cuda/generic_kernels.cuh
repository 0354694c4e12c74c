#pragma once
// The generic CUDA attention kernels: every dtype (float32, float64, float16, bfloat16 with
// float accumulation), any strides, broadcast bias, both causal alignments, dropout, head dims
// up to 256, and issue 17's options (masking.cuh): grouped key/value heads read in place, sliding
// windows (key tiles outside a block's band are skipped), softcap, ALiBi, and sequences with their
// own lengths (packed varlen tensors, KV caches; a block past its sequence's end leaves at once). Written for correctness first: plain FMA loops over tiles staged in shared memory
// in the accumulation type; no L x S buffer anywhere.
//
// Thread layout (every kernel: 4 warps of 32 lanes):
//  - forward, weights and dQ: a block owns BQ = 4 * ROWS query rows of one (batch, head); warp w
//    owns rows [w * ROWS, (w + 1) * ROWS). Keys are streamed in tiles of 32: lane c owns key c of
//    the tile for the scores, and columns c, c + 32, ... of the head dim for the accumulators.
//  - dK/dV: the roles flip. A block owns BKV = 4 * ROWS keys, warp w owns ROWS of them, and
//    queries are streamed in tiles of 32 (lane r owns query row r of the tile).
// KC (columns per lane) is a compile-time bucket (2, 4 or 8: head dims up to 64, 128, 256) so the
// per-thread accumulators are register arrays indexed only by unrolled loops.
#include "../kernels/dropout_hash.h"
#include "device_utils.cuh"
#include "masking.cuh"

namespace qkv::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kKeyTile = kWarpSize;    // keys per tile in the row-owning kernels
constexpr int kQueryTile = kWarpSize;  // query rows per tile in the dK/dV kernel

// Rows per warp so that a thread holds about `budget` 32-bit words of accumulators.
constexpr int rows_for_budget(int kc, int acc_bytes, int budget) {
  const int words = kc * acc_bytes / 4;
  const int rows = budget / words;
  return rows < 1 ? 1 : (rows > 8 ? 8 : rows);
}

// Copies rows [row0, row0 + rows) of a (b, h) slice into a dense shared tile with leading
// dimension `ld`, converted to acc_t and multiplied by `mul`; rows at or past `valid_rows` are
// zero-filled, so 0 * garbage can never produce NaN later.
template <typename acc_t, typename T>
__device__ __forceinline__ void load_tile(acc_t* dst, int ld, const T* base, int64_t row_stride, int64_t col_stride,
                                          int64_t row0, int rows, int64_t valid_rows, int cols, acc_t mul) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int r = warp; r < rows; r += kWarps) {
    const int64_t row = row0 + r;
    acc_t* d = dst + r * ld;
    if (row < valid_rows) {
      const T* src = base + row * row_stride;
      for (int c = lane; c < cols; c += kWarpSize) d[c] = load_acc<acc_t>(src + c * col_stride) * mul;
    } else {
      for (int c = lane; c < cols; c += kWarpSize) d[c] = acc_t(0);
    }
  }
}

// ---- forward ------------------------------------------------------------------------------

template <typename T, int KC, int ROWS>
__global__ void __launch_bounds__(kThreads) generic_forward_kernel(const ForwardArgs args) {
  using acc_t = typename AccumulatorOf<T>::type;
  constexpr int BQ = kWarps * ROWS;
  const ProblemShape& p = args.shape;
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.v_head_dim);
  const int ldk = D + 1, ldv = Dv + 1;  // +1: lanes reading different key rows hit different banks
  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  acc_t* q_tile = reinterpret_cast<acc_t*>(smem_bytes);             // BQ x D, pre-scaled
  acc_t* kv_tile = q_tile + BQ * D;                                 // 32 x (max(D, Dv) + 1)
  acc_t* p_tile = kv_tile + kKeyTile * ((D > Dv ? D : Dv) + 1);     // BQ x 32

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t q_tiles = ceil_div(p.q_len, BQ);
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / q_tiles;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) % q_tiles) * BQ;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const SequenceView seq = sequence_of(p, b);
  if (i0 >= seq.q_len) return;  // block-uniform: a sequence shorter than the longest
  const int64_t hk = kv_head_of(p, h);
  const T* q = row_ptr<T>(args.q, seq.tb, h, seq.q0);
  const T* k = row_ptr<T>(args.k, seq.tb, hk, seq.k0);
  const T* v = row_ptr<T>(args.v, seq.tb, hk, seq.k0);
  const ScoreTransform<acc_t, T> score = score_transform<acc_t, T>(p, args.bias, seq, h);
  const bool dropout = p.dropout_p > 0.0;
  const acc_t keep_scale = static_cast<acc_t>(p.keep_scale);
  const acc_t neg_inf = negative_infinity<acc_t>();

  load_tile(q_tile, D, q, args.q.s2, args.q.s3, i0, BQ, seq.q_len, D, static_cast<acc_t>(p.scale));

  // P V and the row sums over every key, as compensated sums of per-tile partials (o + o_err,
  // row_sum + row_sum_err): their error does not grow with the key count.
  acc_t o[ROWS][KC], o_err[ROWS][KC];
  acc_t row_max[ROWS], row_sum[ROWS], row_sum_err[ROWS];  // row sums: this lane's share, reduced at the end
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    row_max[rr] = neg_inf;
    row_sum[rr] = row_sum_err[rr] = acc_t(0);
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) o[rr][kc] = o_err[rr][kc] = acc_t(0);
  }

  const int64_t rows_end = i0 + BQ < seq.q_len ? i0 + BQ : seq.q_len;
  const int64_t key_end = seq.keys_end(rows_end);
  for (int64_t j0 = seq.keys_begin(i0); j0 < key_end; j0 += kKeyTile) {
    const int cols = static_cast<int>(key_end - j0 < kKeyTile ? key_end - j0 : kKeyTile);
    __syncthreads();  // the previous V tile is consumed (first pass: q_tile is written)
    load_tile(kv_tile, ldk, k, args.k.s2, args.k.s3, j0, kKeyTile, j0 + cols, D, acc_t(1));
    __syncthreads();

    acc_t s[ROWS];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) s[rr] = acc_t(0);
    const acc_t* key_row = kv_tile + lane * ldk;
    for (int d = 0; d < D; ++d) {
      const acc_t kd = key_row[d];
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) s[rr] += q_tile[(warp * ROWS + rr) * D + d] * kd;
    }

    const int64_t j = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
      const int64_t i = i0 + warp * ROWS + rr;
      const bool visible = lane < cols && seq.visible(i, j);
      const acc_t x = visible ? score.apply(s[rr], i, j) : neg_inf;
      const acc_t new_max = max_acc(row_max[rr], warp_max(x));
      acc_t prob = acc_t(0);
      if (new_max != neg_inf) {  // warp-uniform: nothing visible yet means nothing to rescale
        const acc_t correction = exp_acc(row_max[rr] - new_max);
        prob = exp_acc(x - new_max);
        row_sum[rr] *= correction;
        row_sum_err[rr] *= correction;
        add_compensated(row_sum[rr], row_sum_err[rr], prob);
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) {
          o[rr][kc] *= correction;
          o_err[rr][kc] *= correction;
        }
        row_max[rr] = new_max;
      }
      if (dropout && prob != acc_t(0)) {
        prob = dropout_keep(p.dropout_seed, dropout_index(p, bh, i, j), p.keep_threshold) ? prob * keep_scale
                                                                                          : acc_t(0);
      }
      p_tile[(warp * ROWS + rr) * kKeyTile + lane] = prob;
    }

    __syncthreads();  // every warp is done with the K tile
    load_tile(kv_tile, ldv, v, args.v.s2, args.v.s3, j0, kKeyTile, j0 + cols, Dv, acc_t(1));
    __syncthreads();

    // This tile's P V, one column of the head dim at a time, into the compensated sums.
    const acc_t* probs = p_tile + warp * ROWS * kKeyTile;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      const int col = lane + kc * kWarpSize;
      acc_t part[ROWS];
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) part[rr] = acc_t(0);
      for (int c = 0; c < cols; ++c) {
        const acc_t vv = col < Dv ? kv_tile[c * ldv + col] : acc_t(0);
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) part[rr] += probs[rr * kKeyTile + c] * vv;
      }
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) add_compensated(o[rr][kc], o_err[rr][kc], part[rr]);
    }
  }

  T* out = row_ptr<T>(args.out, seq.tb, h, seq.q0);
  acc_t* lse = static_cast<acc_t*>(args.lse) + lse_row(p, seq, h, 0);
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    const acc_t total = warp_sum(row_sum[rr] + row_sum_err[rr]);
    const int64_t i = i0 + warp * ROWS + rr;
    if (i < seq.q_len) {
      const acc_t inv = total == acc_t(0) ? acc_t(0) : acc_t(1) / total;  // no visible key: output 0
      T* out_row = out + i * args.out.s2;
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
        const int col = lane + kc * kWarpSize;
        if (col < Dv) store_acc(out_row + col * args.out.s3, (o[rr][kc] + o_err[rr][kc]) * inv);
      }
      if (lane == 0) lse[i] = total == acc_t(0) ? neg_inf : row_max[rr] + log_acc(total);
    }
  }
}

// ---- logsumexp normalizers (kernel_params.h, LseNormalizerArgs) -------------------------------

// One block per (b, h, BQ query rows), as the weights kernel. A block whose rows all have ordinary
// logsumexps (the usual case) writes 1s and leaves; otherwise its rows' sums of exp(s - lse) are
// recomputed over every key they see.
template <typename T, int ROWS>
__global__ void __launch_bounds__(kThreads) generic_lse_normalizer_kernel(const LseNormalizerArgs args) {
  using acc_t = typename AccumulatorOf<T>::type;
  constexpr int BQ = kWarps * ROWS;
  const ProblemShape& p = args.shape;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t q_tiles = ceil_div(p.q_len, BQ);
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / q_tiles;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) % q_tiles) * BQ;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const SequenceView seq = sequence_of(p, b);
  if (i0 >= seq.q_len) return;  // block-uniform
  const acc_t* lse = static_cast<const acc_t*>(args.lse) + lse_row(p, seq, h, 0);
  acc_t* out = static_cast<acc_t*>(args.normalizer) + lse_row(p, seq, h, 0);
  bool any = false;  // block-uniform: every thread reads the same rows
  for (int r = 0; r < BQ; ++r) any = any || (i0 + r < seq.q_len && lse_needs_normalizer(lse[i0 + r]));
  if (!any) {
    for (int r = threadIdx.x; r < BQ; r += kThreads) {
      if (i0 + r < seq.q_len) out[i0 + r] = acc_t(1);
    }
    return;
  }

  const int D = static_cast<int>(p.head_dim), ldk = D + 1;
  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  acc_t* q_tile = reinterpret_cast<acc_t*>(smem_bytes);  // BQ x D, pre-scaled
  acc_t* k_tile = q_tile + BQ * D;                       // 32 x (D + 1)
  const T* q = row_ptr<T>(args.q, seq.tb, h, seq.q0);
  const T* k = row_ptr<T>(args.k, seq.tb, kv_head_of(p, h), seq.k0);
  const ScoreTransform<acc_t, T> score = score_transform<acc_t, T>(p, args.bias, seq, h);
  load_tile(q_tile, D, q, args.q.s2, args.q.s3, i0, BQ, seq.q_len, D, static_cast<acc_t>(p.scale));
  acc_t row_lse[ROWS], sum[ROWS], err[ROWS];
  bool needed[ROWS];
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    const int64_t i = i0 + warp * ROWS + rr;
    row_lse[rr] = i < seq.q_len ? lse[i] : acc_t(0);
    needed[rr] = i < seq.q_len && lse_needs_normalizer(row_lse[rr]);
    sum[rr] = err[rr] = acc_t(0);
  }
  const int64_t rows_end = i0 + BQ < seq.q_len ? i0 + BQ : seq.q_len;
  const int64_t key_end = seq.keys_end(rows_end);
  for (int64_t j0 = seq.keys_begin(i0); j0 < key_end; j0 += kKeyTile) {
    const int cols = static_cast<int>(key_end - j0 < kKeyTile ? key_end - j0 : kKeyTile);
    __syncthreads();
    load_tile(k_tile, ldk, k, args.k.s2, args.k.s3, j0, kKeyTile, j0 + cols, D, acc_t(1));
    __syncthreads();
    acc_t s[ROWS];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) s[rr] = acc_t(0);
    const acc_t* key_row = k_tile + lane * ldk;
    for (int d = 0; d < D; ++d) {
      const acc_t kd = key_row[d];
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) s[rr] += q_tile[(warp * ROWS + rr) * D + d] * kd;
    }
    const int64_t j = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
      const int64_t i = i0 + warp * ROWS + rr;
      if (!needed[rr] || lane >= cols || !seq.visible(i, j)) continue;
      add_compensated(sum[rr], err[rr], exp_acc(score.apply(s[rr], i, j) - row_lse[rr]));
    }
  }
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    const acc_t total = warp_sum(sum[rr] + err[rr]);
    const int64_t i = i0 + warp * ROWS + rr;
    if (lane == 0 && i < seq.q_len) out[i] = needed[rr] && total > acc_t(0) ? acc_t(1) / total : acc_t(1);
  }
}

// ---- explicit weights: P' = dropout(exp(S - lse)), written as a dense (B, H, L, S) tensor ----

template <typename T, int ROWS>
__global__ void __launch_bounds__(kThreads) generic_weights_kernel(const WeightsArgs args) {
  using acc_t = typename AccumulatorOf<T>::type;
  constexpr int BQ = kWarps * ROWS;
  const ProblemShape& p = args.shape;
  const int D = static_cast<int>(p.head_dim), ldk = D + 1;
  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  acc_t* q_tile = reinterpret_cast<acc_t*>(smem_bytes);  // BQ x D, pre-scaled
  acc_t* k_tile = q_tile + BQ * D;                       // 32 x (D + 1)

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t q_tiles = ceil_div(p.q_len, BQ);
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / q_tiles;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) % q_tiles) * BQ;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const SequenceView seq = sequence_of(p, b);  // dense: the weights are (B, H, L, S)
  const T* q = row_ptr<T>(args.q, seq.tb, h, seq.q0);
  const T* k = row_ptr<T>(args.k, seq.tb, kv_head_of(p, h), seq.k0);
  const ScoreTransform<acc_t, T> score = score_transform<acc_t, T>(p, args.bias, seq, h);
  const bool dropout = p.dropout_p > 0.0;
  const acc_t keep_scale = static_cast<acc_t>(p.keep_scale);
  const acc_t neg_inf = negative_infinity<acc_t>();
  const acc_t* lse = static_cast<const acc_t*>(args.lse) + bh * p.q_len;
  T* weights = static_cast<T*>(args.weights) + bh * p.q_len * p.kv_len;

  load_tile(q_tile, D, q, args.q.s2, args.q.s3, i0, BQ, p.q_len, D, static_cast<acc_t>(p.scale));
  acc_t row_lse[ROWS], row_norm[ROWS];
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    const int64_t i = i0 + warp * ROWS + rr;
    row_lse[rr] = i < p.q_len ? lse[i] : neg_inf;
    row_norm[rr] = i < p.q_len ? lse_normalizer_at<acc_t>(args.lse_normalizer, bh * p.q_len + i) : acc_t(1);
  }

  for (int64_t j0 = 0; j0 < p.kv_len; j0 += kKeyTile) {
    const int cols = static_cast<int>(p.kv_len - j0 < kKeyTile ? p.kv_len - j0 : kKeyTile);
    __syncthreads();
    load_tile(k_tile, ldk, k, args.k.s2, args.k.s3, j0, kKeyTile, j0 + cols, D, acc_t(1));
    __syncthreads();
    acc_t s[ROWS];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) s[rr] = acc_t(0);
    const acc_t* key_row = k_tile + lane * ldk;
    for (int d = 0; d < D; ++d) {
      const acc_t kd = key_row[d];
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) s[rr] += q_tile[(warp * ROWS + rr) * D + d] * kd;
    }
    const int64_t j = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
      const int64_t i = i0 + warp * ROWS + rr;
      if (i >= p.q_len || lane >= cols) continue;
      acc_t prob = acc_t(0);
      if (seq.visible(i, j) && row_lse[rr] != neg_inf) {
        prob = exp_acc(score.apply(s[rr], i, j) - row_lse[rr]) * row_norm[rr];
      }
      if (dropout && prob != acc_t(0)) {
        prob = dropout_keep(p.dropout_seed, dropout_index(p, bh, i, j), p.keep_threshold) ? prob * keep_scale
                                                                                          : acc_t(0);
      }
      store_acc(weights + i * p.kv_len + j, prob);
    }
  }
}

// ---- backward -------------------------------------------------------------------------------

// delta_i = dO_i . O_i (the row sums of dP * P), one warp per row, in the accumulation type.
template <typename T>
__global__ void __launch_bounds__(kThreads) generic_delta_kernel(const BackwardArgs args) {
  using acc_t = typename AccumulatorOf<T>::type;
  const ProblemShape& p = args.shape;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  // Every row of the tensors (packed: also rows of no sequence, whose delta nothing reads);
  // `row` is also the row's index in the logsumexp layout (lse_row).
  const int64_t rows = query_rows(p);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= tensor_batch(p) * p.heads * rows) return;  // whole warps leave together
  const int64_t bh = row / rows, i = row % rows, b = bh / p.heads, h = bh % p.heads;
  const T* dout = static_cast<const T*>(args.grad_out.data) + b * args.grad_out.s0 + h * args.grad_out.s1 +
                  i * args.grad_out.s2;
  const T* out = static_cast<const T*>(args.out.data) + b * args.out.s0 + h * args.out.s1 + i * args.out.s2;
  acc_t sum = acc_t(0);
  for (int64_t d = lane; d < p.v_head_dim; d += kWarpSize) {
    sum += load_acc<acc_t>(dout + d * args.grad_out.s3) * load_acc<acc_t>(out + d * args.out.s3);
  }
  sum = warp_sum(sum);
  if (lane == 0) static_cast<acc_t*>(args.delta)[row] = sum;
}

// The gradient of a bias with one key column (broadcast over keys): it shifts every score of a
// row alike, which the softmax ignores, so sum_j dS_ij = sum_j P dP - delta sum_j P is zero in
// exact arithmetic. Summing dS would add up the error of delta (from the rounded output: 2^-11
// relative in float16) times every key. As in the CPU kernel, delta is taken from the same
// numbers, as the P-weighted mean of dP, and the two terms cancel down to their rounding. Per
// lane, compensated over the key tiles; gradient() reduces over the warp (every lane must call it).
template <typename acc_t>
struct RowShiftSums {
  acc_t p_dp = acc_t(0), p_dp_err = acc_t(0), p_sum = acc_t(0), p_sum_err = acc_t(0);
  __device__ __forceinline__ void add(acc_t prob, acc_t dp) {
    add_compensated(p_dp, p_dp_err, prob * dp);
    add_compensated(p_sum, p_sum_err, prob);
  }
  __device__ __forceinline__ acc_t gradient() const {
    const acc_t total_p_dp = warp_sum(p_dp + p_dp_err), total_p = warp_sum(p_sum + p_sum_err);
    const acc_t delta = total_p == acc_t(0) ? acc_t(0) : total_p_dp / total_p;  // a row that sees no key: 0
    return total_p_dp - delta * total_p;
  }
};

// dQ = scale * sum_j dS_ij K_j, one block per (b, h, query tile), streaming key tiles.
template <typename T, int KC, int ROWS>
__global__ void __launch_bounds__(kThreads) generic_grad_query_kernel(const BackwardArgs args) {
  using acc_t = typename AccumulatorOf<T>::type;
  constexpr int BQ = kWarps * ROWS;
  const ProblemShape& p = args.shape;
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.v_head_dim);
  const int ldk = D + 1, ldv = Dv + 1;
  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  acc_t* q_tile = reinterpret_cast<acc_t*>(smem_bytes);          // BQ x D, pre-scaled
  acc_t* do_tile = q_tile + BQ * D;                              // BQ x Dv
  acc_t* kv_tile = do_tile + BQ * Dv;                            // 32 x (max(D, Dv) + 1): V, then K
  acc_t* ds_tile = kv_tile + kKeyTile * ((D > Dv ? D : Dv) + 1);  // BQ x 32

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t q_tiles = ceil_div(p.q_len, BQ);
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / q_tiles;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) % q_tiles) * BQ;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const SequenceView seq = sequence_of(p, b);
  if (i0 >= seq.q_len) return;  // block-uniform: a sequence shorter than the longest
  const int64_t hk = kv_head_of(p, h);
  const T* q = row_ptr<T>(args.q, seq.tb, h, seq.q0);
  const T* k = row_ptr<T>(args.k, seq.tb, hk, seq.k0);
  const T* v = row_ptr<T>(args.v, seq.tb, hk, seq.k0);
  const T* dout = row_ptr<T>(args.grad_out, seq.tb, h, seq.q0);
  const ScoreTransform<acc_t, T> score = score_transform<acc_t, T>(p, args.bias, seq, h);
  const bool dropout = p.dropout_p > 0.0;
  const acc_t keep_scale = static_cast<acc_t>(p.keep_scale);
  const acc_t neg_inf = negative_infinity<acc_t>();
  const int64_t row0 = lse_row(p, seq, h, 0);
  const acc_t* lse = static_cast<const acc_t*>(args.lse) + row0;
  const acc_t* delta = static_cast<const acc_t*>(args.delta) + row0;

  load_tile(q_tile, D, q, args.q.s2, args.q.s3, i0, BQ, seq.q_len, D, static_cast<acc_t>(p.scale));
  load_tile(do_tile, Dv, dout, args.grad_out.s2, args.grad_out.s3, i0, BQ, seq.q_len, Dv, acc_t(1));
  acc_t row_lse[ROWS], row_norm[ROWS], row_delta[ROWS], dq[ROWS][KC];
  // A bias with one key column gets its gradient from row sums here (see the end), not from dS.
  const bool bias_shifts_rows = args.grad_bias != nullptr && (args.grad_bias_s3 == 0 || p.kv_len == 1);
  RowShiftSums<acc_t> shift_sums[ROWS];
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    const int64_t i = i0 + warp * ROWS + rr;
    row_lse[rr] = i < seq.q_len ? lse[i] : neg_inf;
    row_norm[rr] = i < seq.q_len ? lse_normalizer_at<acc_t>(args.lse_normalizer, row0 + i) : acc_t(1);
    row_delta[rr] = i < seq.q_len ? delta[i] : acc_t(0);
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) dq[rr][kc] = acc_t(0);
  }

  const int64_t rows_end = i0 + BQ < seq.q_len ? i0 + BQ : seq.q_len;
  const int64_t key_end = seq.keys_end(rows_end);
  for (int64_t j0 = seq.keys_begin(i0); j0 < key_end; j0 += kKeyTile) {
    const int cols = static_cast<int>(key_end - j0 < kKeyTile ? key_end - j0 : kKeyTile);
    // dP = dO V^T with the V tile ...
    __syncthreads();
    load_tile(kv_tile, ldv, v, args.v.s2, args.v.s3, j0, kKeyTile, j0 + cols, Dv, acc_t(1));
    __syncthreads();
    acc_t dp[ROWS];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) dp[rr] = acc_t(0);
    {
      const acc_t* value_row = kv_tile + lane * ldv;
      for (int d = 0; d < Dv; ++d) {
        const acc_t vd = value_row[d];
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) dp[rr] += do_tile[(warp * ROWS + rr) * Dv + d] * vd;
      }
    }
    // ... then S = (scale Q) K^T with the K tile in the same buffer.
    __syncthreads();
    load_tile(kv_tile, ldk, k, args.k.s2, args.k.s3, j0, kKeyTile, j0 + cols, D, acc_t(1));
    __syncthreads();
    acc_t s[ROWS];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) s[rr] = acc_t(0);
    {
      const acc_t* key_row = kv_tile + lane * ldk;
      for (int d = 0; d < D; ++d) {
        const acc_t kd = key_row[d];
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) s[rr] += q_tile[(warp * ROWS + rr) * D + d] * kd;
      }
    }

    const int64_t j = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
      const int64_t i = i0 + warp * ROWS + rr;
      acc_t ds = acc_t(0);
      if (lane < cols && seq.visible(i, j) && row_lse[rr] != neg_inf) {
        const acc_t prob = exp_acc(score.apply(s[rr], i, j) - row_lse[rr]) * row_norm[rr];
        acc_t dpr = dp[rr];
        if (dropout) {
          dpr = dropout_keep(p.dropout_seed, dropout_index(p, bh, i, j), p.keep_threshold) ? dpr * keep_scale
                                                                                         : acc_t(0);
        }
        ds = prob * (dpr - row_delta[rr]) * score.cap_grad(s[rr]);  // d/d(scaled product)
        if (bias_shifts_rows) shift_sums[rr].add(prob, dpr);
      }
      ds_tile[(warp * ROWS + rr) * kKeyTile + lane] = ds;
    }
    __syncwarp();  // each warp reads back only its own rows of ds_tile

    // dQ += dS K, this tile's partial first (a sum over tiles, not over single keys).
    const acc_t* ds_rows = ds_tile + warp * ROWS * kKeyTile;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      const int col = lane + kc * kWarpSize;
      acc_t part[ROWS];
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) part[rr] = acc_t(0);
      for (int c = 0; c < cols; ++c) {
        const acc_t kv = col < D ? kv_tile[c * ldk + col] : acc_t(0);
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) part[rr] += ds_rows[rr * kKeyTile + c] * kv;
      }
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) dq[rr][kc] += part[rr];
    }
  }

  if (bias_shifts_rows) {
    acc_t* grad_bias = static_cast<acc_t*>(args.grad_bias) + b * args.grad_bias_s0 + h * args.grad_bias_s1;
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
      const acc_t g = shift_sums[rr].gradient();  // every lane takes part in the warp sums
      const int64_t i = i0 + warp * ROWS + rr;
      if (lane == 0 && i < seq.q_len && g != acc_t(0)) atomicAdd(grad_bias + i * args.grad_bias_s2, g);
    }
  }

  T* grad_q = row_ptr<T>(args.grad_q, seq.tb, h, seq.q0);
  const acc_t scale = static_cast<acc_t>(p.scale);
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    const int64_t i = i0 + warp * ROWS + rr;
    if (i >= seq.q_len) continue;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      const int col = lane + kc * kWarpSize;
      if (col < D) store_acc(grad_q + i * args.grad_q.s2 + col * args.grad_q.s3, dq[rr][kc] * scale);
    }
  }
}

// dK = sum_i dS_ij (scale Q_i), dV = sum_i P'_ij dO_i, and the bias gradient; one block per
// (b, key/value head, key tile), streaming query tiles of every query head of the group (grouped-
// query attention: the shared head's dK/dV are summed over its group in registers, no atomics, no
// races), and only the query tiles whose band reaches the block's keys. The bias gradient goes to
// an accumulation-type buffer of the bias's shape with atomics; broadcast dimensions are reduced
// in registers first.
template <typename T, int KC, int ROWS>
__global__ void __launch_bounds__(kThreads) generic_grad_key_value_kernel(const BackwardArgs args) {
  using acc_t = typename AccumulatorOf<T>::type;
  constexpr int BKV = kWarps * ROWS;
  const ProblemShape& p = args.shape;
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.v_head_dim);
  const int ldq = D + 1, lddo = Dv + 1;
  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  acc_t* k_tile = reinterpret_cast<acc_t*>(smem_bytes);  // BKV x D
  acc_t* v_tile = k_tile + BKV * D;                      // BKV x Dv
  acc_t* q_tile = v_tile + BKV * Dv;                     // 32 x (D + 1), pre-scaled
  acc_t* do_tile = q_tile + kQueryTile * ldq;            // 32 x (Dv + 1)
  acc_t* pt_tile = do_tile + kQueryTile * lddo;          // BKV x 32: dropped-out P, transposed
  acc_t* dst_tile = pt_tile + BKV * kQueryTile;          // BKV x 32: dS, transposed

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t k_tiles = ceil_div(p.kv_len, BKV);
  const int64_t bhk = static_cast<int64_t>(blockIdx.x) / k_tiles;
  const int64_t j0 = (static_cast<int64_t>(blockIdx.x) % k_tiles) * BKV;
  const int64_t b = bhk / key_heads(p), hk = bhk % key_heads(p);
  const SequenceView seq = sequence_of(p, b);
  if (j0 >= seq.kv_len) return;  // block-uniform: a sequence shorter than the longest
  const int64_t group = head_group(p);
  const T* k = row_ptr<T>(args.k, seq.tb, hk, seq.k0);
  const T* v = row_ptr<T>(args.v, seq.tb, hk, seq.k0);
  const bool dropout = p.dropout_p > 0.0;
  const acc_t keep_scale = static_cast<acc_t>(p.keep_scale);
  const acc_t neg_inf = negative_infinity<acc_t>();
  // A bias with one key column gets its gradient in the dQ kernel (RowShiftSums); here only
  // biases with a column per key.
  const bool bias_shifts_rows = args.grad_bias_s3 == 0 || p.kv_len == 1;
  acc_t* grad_bias = bias_shifts_rows ? nullptr : static_cast<acc_t*>(args.grad_bias);
  const bool bias_rows_broadcast = args.grad_bias_s2 == 0;
  // The queries that see any key of [j0, j_end).
  const int64_t j_end = j0 + BKV < seq.kv_len ? j0 + BKV : seq.kv_len;
  const int64_t q_begin = seq.query_begin(j0), q_end = seq.query_end(j_end - 1);

  load_tile(k_tile, D, k, args.k.s2, args.k.s3, j0, BKV, seq.kv_len, D, acc_t(1));
  load_tile(v_tile, Dv, v, args.v.s2, args.v.s3, j0, BKV, seq.kv_len, Dv, acc_t(1));

  acc_t dk[ROWS][KC], dv[ROWS][KC];
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) dk[rr][kc] = dv[rr][kc] = acc_t(0);
  }

  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g, bh = b * p.heads + h;
    const T* q = row_ptr<T>(args.q, seq.tb, h, seq.q0);
    const T* dout = row_ptr<T>(args.grad_out, seq.tb, h, seq.q0);
    const ScoreTransform<acc_t, T> score = score_transform<acc_t, T>(p, args.bias, seq, h);
    const int64_t row0 = lse_row(p, seq, h, 0);
    const acc_t* lse = static_cast<const acc_t*>(args.lse) + row0;
    const acc_t* delta = static_cast<const acc_t*>(args.delta) + row0;
    acc_t* grad_bias_bh = grad_bias == nullptr ? nullptr : grad_bias + b * args.grad_bias_s0 + h * args.grad_bias_s1;
    acc_t bias_col[ROWS];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) bias_col[rr] = acc_t(0);

    for (int64_t qi0 = q_begin; qi0 < q_end; qi0 += kQueryTile) {
      const int rows = static_cast<int>(q_end - qi0 < kQueryTile ? q_end - qi0 : kQueryTile);
      __syncthreads();  // previous q/dO tiles consumed (first pass: k/v tiles written)
      load_tile(q_tile, ldq, q, args.q.s2, args.q.s3, qi0, kQueryTile, q_end, D, static_cast<acc_t>(p.scale));
      load_tile(do_tile, lddo, dout, args.grad_out.s2, args.grad_out.s3, qi0, kQueryTile, q_end, Dv, acc_t(1));
      __syncthreads();

      const int64_t i = qi0 + lane;
      const bool row_valid = lane < rows;
      const acc_t lse_i = row_valid ? lse[i] : neg_inf;
      const acc_t norm_i = row_valid ? lse_normalizer_at<acc_t>(args.lse_normalizer, row0 + i) : acc_t(1);
      const acc_t delta_i = row_valid ? delta[i] : acc_t(0);

      acc_t s[ROWS], dp[ROWS];
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) s[rr] = dp[rr] = acc_t(0);
      for (int d = 0; d < D; ++d) {
        const acc_t qd = q_tile[lane * ldq + d];
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) s[rr] += qd * k_tile[(warp * ROWS + rr) * D + d];
      }
      for (int d = 0; d < Dv; ++d) {
        const acc_t od = do_tile[lane * lddo + d];
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) dp[rr] += od * v_tile[(warp * ROWS + rr) * Dv + d];
      }

#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) {
        const int c = warp * ROWS + rr;
        const int64_t j = j0 + c;
        acc_t prob = acc_t(0), prob_dropped = acc_t(0), ds = acc_t(0), cap_grad = acc_t(1);
        if (row_valid && seq.visible(i, j) && lse_i != neg_inf) {
          prob = exp_acc(score.apply(s[rr], i, j) - lse_i) * norm_i;
          acc_t dpr = dp[rr];
          prob_dropped = prob;
          if (dropout) {
            const bool keep = dropout_keep(p.dropout_seed, dropout_index(p, bh, i, j), p.keep_threshold);
            dpr = keep ? dpr * keep_scale : acc_t(0);
            prob_dropped = keep ? prob * keep_scale : acc_t(0);
          }
          ds = prob * (dpr - delta_i);  // d/d(score): the bias gradient
          cap_grad = score.cap_grad(s[rr]);
        }
        pt_tile[c * kQueryTile + lane] = prob_dropped;
        dst_tile[c * kQueryTile + lane] = ds * cap_grad;  // d/d(scaled product)
        if (grad_bias != nullptr) {
          if (bias_rows_broadcast) {
            bias_col[rr] += warp_sum(ds);  // warp-uniform branch: every lane takes part
          } else if (ds != acc_t(0)) {
            atomicAdd(grad_bias_bh + i * args.grad_bias_s2 + j * args.grad_bias_s3, ds);
          }
        }
      }
      __syncwarp();  // each warp reads back only its own keys' rows of pt/dst

      // dV += P'^T dO and dK += dS^T Q, this tile's partials first (a sum over tiles, not over
      // single queries).
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
        const int col = lane + kc * kWarpSize;
        acc_t part_v[ROWS], part_k[ROWS];
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) part_v[rr] = part_k[rr] = acc_t(0);
        for (int r = 0; r < rows; ++r) {
          const acc_t dov = col < Dv ? do_tile[r * lddo + col] : acc_t(0);
          const acc_t qv = col < D ? q_tile[r * ldq + col] : acc_t(0);
#pragma unroll
          for (int rr = 0; rr < ROWS; ++rr) {
            const int c = warp * ROWS + rr;
            part_v[rr] += pt_tile[c * kQueryTile + r] * dov;
            part_k[rr] += dst_tile[c * kQueryTile + r] * qv;
          }
        }
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) {
          dv[rr][kc] += part_v[rr];
          dk[rr][kc] += part_k[rr];
        }
      }
    }

    if (grad_bias != nullptr && bias_rows_broadcast && lane == 0) {
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) {
        const int64_t j = j0 + warp * ROWS + rr;
        if (j < seq.kv_len && bias_col[rr] != acc_t(0)) atomicAdd(grad_bias_bh + j * args.grad_bias_s3, bias_col[rr]);
      }
    }
  }

  T* grad_k = row_ptr<T>(args.grad_k, seq.tb, hk, seq.k0);
  T* grad_v = row_ptr<T>(args.grad_v, seq.tb, hk, seq.k0);
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    const int64_t j = j0 + warp * ROWS + rr;
    if (j >= seq.kv_len) continue;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      const int col = lane + kc * kWarpSize;
      if (col < D) store_acc(grad_k + j * args.grad_k.s2 + col * args.grad_k.s3, dk[rr][kc]);
      if (col < Dv) store_acc(grad_v + j * args.grad_v.s2 + col * args.grad_v.s3, dv[rr][kc]);
    }
  }
}

// ---- launch configurations ------------------------------------------------------------------
// Shared by the launchers (generic_*.cu) and the CPU emulation tests, so both run the same grids.

template <typename T, int KC>
struct ForwardConfig {
  using acc_t = typename AccumulatorOf<T>::type;
  static constexpr int kRows = rows_for_budget(KC, sizeof(acc_t), 32);
  static constexpr int kBlockQ = kWarps * kRows;
  static size_t shared_bytes(const ProblemShape& p) {
    const int64_t max_dim = p.head_dim > p.v_head_dim ? p.head_dim : p.v_head_dim;
    return sizeof(acc_t) * (kBlockQ * p.head_dim + kKeyTile * (max_dim + 1) + kBlockQ * kKeyTile);
  }
  static int64_t blocks(const ProblemShape& p) { return p.batch * p.heads * ceil_div(p.q_len, kBlockQ); }
};

template <typename T>
struct WeightsConfig {
  using acc_t = typename AccumulatorOf<T>::type;
  static constexpr int kRows = 4;
  static constexpr int kBlockQ = kWarps * kRows;
  static size_t shared_bytes(const ProblemShape& p) {
    return sizeof(acc_t) * (kBlockQ * p.head_dim + kKeyTile * (p.head_dim + 1));
  }
  static int64_t blocks(const ProblemShape& p) { return p.batch * p.heads * ceil_div(p.q_len, kBlockQ); }
};

struct DeltaConfig {
  static int64_t blocks(const ProblemShape& p) { return ceil_div(tensor_batch(p) * p.heads * query_rows(p), kWarps); }
};

template <typename T, int KC>
struct GradQueryConfig {
  using acc_t = typename AccumulatorOf<T>::type;
  static constexpr int kRows = rows_for_budget(KC, sizeof(acc_t), 32);
  static constexpr int kBlockQ = kWarps * kRows;
  static size_t shared_bytes(const ProblemShape& p) {
    const int64_t max_dim = p.head_dim > p.v_head_dim ? p.head_dim : p.v_head_dim;
    return sizeof(acc_t) *
           (kBlockQ * p.head_dim + kBlockQ * p.v_head_dim + kKeyTile * (max_dim + 1) + kBlockQ * kKeyTile);
  }
  static int64_t blocks(const ProblemShape& p) { return p.batch * p.heads * ceil_div(p.q_len, kBlockQ); }
};

template <typename T, int KC>
struct GradKeyValueConfig {
  using acc_t = typename AccumulatorOf<T>::type;
  // Two accumulators (dK and dV) per thread: half the rows of the forward's budget.
  static constexpr int kRows = rows_for_budget(KC, sizeof(acc_t), 16);
  static constexpr int kBlockKV = kWarps * kRows;
  static size_t shared_bytes(const ProblemShape& p) {
    return sizeof(acc_t) * (kBlockKV * p.head_dim + kBlockKV * p.v_head_dim + kQueryTile * (p.head_dim + 1) +
                            kQueryTile * (p.v_head_dim + 1) + 2 * kBlockKV * kQueryTile);
  }
  static int64_t blocks(const ProblemShape& p) { return p.batch * key_heads(p) * ceil_div(p.kv_len, kBlockKV); }
};

}  // namespace qkv::cuda
