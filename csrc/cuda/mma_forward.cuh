#pragma once
// Tensor-core forward kernel for float16 / bfloat16 with head_dim == v_head_dim in {64, 128}
// (sm_80+: mma.sync.m16n8k16 with float32 accumulation, cp.async double-buffered K/V tiles).
//
// A block of 4 warps owns 64 query rows of one (batch, head); warp w owns rows [16w, 16w + 16),
// which is exactly the M = 16 of one mma. Keys stream in tiles of 64. Per tile and warp:
//   S (16 x 64)  = Q_w (16 x D) K^T       : D/16 k-steps x 8 n-tiles of m16n8k16
//   online softmax on the S fragments in registers (row statistics reduced over the 4-lane quad)
//   O (16 x D)  += P (16 x 64) V (64 x D) : the S accumulator fragments are, element for
//                                           element, the A fragments of P (no shared memory trip)
// The semantics (scale, bias, causal, dropout, fully masked rows) are those of the generic kernel.
#include "mma_common.cuh"

namespace qkv::cuda::mma {

// Launch configuration, shared by the launcher (mma_attention.cu) and the CPU emulation tests.
template <int D>
struct ForwardConfig {
  static constexpr size_t shared_bytes() {
    return sizeof(uint16_t) * static_cast<size_t>(kBlockQ + 4 * kBlockK) * (D + kPad);  // Q + 2 stages of K, V
  }
  static int64_t blocks(const ProblemShape& p) { return p.batch * p.heads * ceil_div(p.q_len, kBlockQ); }
};

// Whether a call qualifies (host side; the launcher falls back to the generic kernels otherwise):
// fp16/bf16, head_dim == v_head_dim in {64, 128}, 16-byte cp.async copies of whole rows (unit
// column stride, 8-element-aligned strides and base), an output written as element pairs, and
// compute capability 8.0+.
inline bool forward_supported(const ForwardArgs& args, int device_major) {
  const ProblemShape& p = args.shape;
  if (device_major < 8) return false;
  if (uses_sequence_options(p)) return false;  // issue 17's options: generic kernels only
  if (args.dtype != ElementType::Float16 && args.dtype != ElementType::BFloat16) return false;
  if (p.head_dim != p.v_head_dim || (p.head_dim != 64 && p.head_dim != 128)) return false;
  for (const ConstView4* view : {&args.q, &args.k, &args.v}) {
    if (!rows_aligned(view->data, view->s0, view->s1, view->s2, view->s3, 8)) return false;
  }
  return rows_aligned(args.out.data, args.out.s0, args.out.s1, args.out.s2, args.out.s3, 2);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) mma_forward_kernel(const ForwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  static_assert(D % 16 == 0 && D <= 128, "head dim must be a multiple of 16, at most 128");
  constexpr int LD = D + kPad;
  constexpr int kKSteps = D / 16;      // k-steps of S = Q K^T
  constexpr int kKeyTiles8 = kBlockK / 8;  // n-tiles of S
  constexpr int kDimTiles8 = D / 8;    // n-tiles of O
  using Op = Mma<T>;

  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  uint16_t* q_smem = reinterpret_cast<uint16_t*>(smem_bytes);  // kBlockQ x LD
  uint16_t* k_smem = q_smem + kBlockQ * LD;                    // 2 x kBlockK x LD
  uint16_t* v_smem = k_smem + 2 * kBlockK * LD;                // 2 x kBlockK x LD

  const ProblemShape& p = args.shape;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane >> 2, t = lane & 3;
  const int64_t q_tiles = ceil_div(p.q_len, kBlockQ);
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / q_tiles;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) % q_tiles) * kBlockQ;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const uint16_t* q = static_cast<const uint16_t*>(args.q.data) + b * args.q.s0 + h * args.q.s1;
  const uint16_t* k = static_cast<const uint16_t*>(args.k.data) + b * args.k.s0 + h * args.k.s1;
  const uint16_t* v = static_cast<const uint16_t*>(args.v.data) + b * args.v.s0 + h * args.v.s1;
  const MaskInfo mask = mask_of(p);
  const bool has_bias = args.bias.data != nullptr;
  const bool dropout = p.dropout_p > 0.0;
  const float keep_scale = static_cast<float>(p.keep_scale);
  const float scale = static_cast<float>(p.scale);
  const float neg_inf = -INFINITY;

  const int64_t rows_end = i0 + kBlockQ < p.q_len ? i0 + kBlockQ : p.q_len;
  const int64_t key_end = key_end_for_rows(p, rows_end);
  const int64_t key_tiles = ceil_div(key_end, kBlockK);

  load_tile_async<D, kBlockQ>(q_smem, q, args.q.s2, i0, p.q_len);
  if (key_tiles > 0) {
    load_tile_async<D, kBlockK>(k_smem, k, args.k.s2, 0, p.kv_len);
    load_tile_async<D, kBlockK>(v_smem, v, args.v.s2, 0, p.kv_len);
  }
  copy_async_commit();

  float o[kDimTiles8][4];
#pragma unroll
  for (int dt = 0; dt < kDimTiles8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float row_max[2] = {neg_inf, neg_inf};  // rows g and g + 8 of this warp's 16
  float row_sum[2] = {0.f, 0.f};          // this lane's share, reduced over the quad at the end
  uint32_t qa[kKSteps][4];

  for (int64_t tile = 0; tile < key_tiles; ++tile) {
    const int stage = static_cast<int>(tile & 1);
    if (tile + 1 < key_tiles) {
      // Prefetch the next K/V tile into the other stage (last read in the previous iteration,
      // which ended with a barrier), then wait for all but that newest group.
      load_tile_async<D, kBlockK>(k_smem + (stage ^ 1) * kBlockK * LD, k, args.k.s2, (tile + 1) * kBlockK, p.kv_len);
      load_tile_async<D, kBlockK>(v_smem + (stage ^ 1) * kBlockK * LD, v, args.v.s2, (tile + 1) * kBlockK, p.kv_len);
      copy_async_commit();
      copy_async_wait<1>();
    } else {
      copy_async_wait<0>();
    }
    __syncthreads();

    if (tile == 0) {
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) load_a_fragment<LD>(qa[ks], q_smem, warp * 16, ks * 16, g, t);
    }
    const uint16_t* k_tile = k_smem + stage * kBlockK * LD;
    const uint16_t* v_tile = v_smem + stage * kBlockK * LD;

    // S = Q K^T
    float s[kKeyTiles8][4];
#pragma unroll
    for (int nt = 0; nt < kKeyTiles8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int nt = 0; nt < kKeyTiles8; ++nt) {
        uint32_t b0, b1;
        load_b_fragment_transposed<LD>(b0, b1, k_tile, nt * 8, ks * 16, g, t);
        Op::run(s[nt], qa[ks], b0, b1);
      }
    }

    // scale, bias and masks; -inf hides a key
    const int64_t j_base = tile * kBlockK;
#pragma unroll
    for (int nt = 0; nt < kKeyTiles8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = i0 + warp * 16 + g + (e >> 1) * 8;
        const int64_t j = j_base + nt * 8 + 2 * t + (e & 1);
        const bool visible = mask.visible(i, j);
        float x = s[nt][e] * scale;
        if (visible && has_bias) x += bias_at<float, T>(args.bias, b, h, i, j);
        s[nt][e] = visible ? x : neg_inf;
      }
    }

    // online softmax, per row half (e = 0, 1: row g; e = 2, 3: row g + 8)
    float use_max[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float tile_max = neg_inf;
#pragma unroll
      for (int nt = 0; nt < kKeyTiles8; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 2));
      const float new_max = fmaxf(row_max[half], tile_max);
      // A row with nothing visible yet keeps max -inf; subtracting 0 instead keeps exp2 at 0, never NaN.
      use_max[half] = new_max == neg_inf ? 0.f : new_max;
      const float correction = exp2f((row_max[half] - use_max[half]) * kLog2e);
      row_max[half] = new_max;
      row_sum[half] *= correction;
#pragma unroll
      for (int dt = 0; dt < kDimTiles8; ++dt) {
        o[dt][2 * half] *= correction;
        o[dt][2 * half + 1] *= correction;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kKeyTiles8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float prob = exp2f((s[nt][e] - use_max[e >> 1]) * kLog2e);
        row_sum[e >> 1] += prob;
        if (dropout && prob != 0.f) {
          const int64_t i = i0 + warp * 16 + g + (e >> 1) * 8;
          const int64_t j = j_base + nt * 8 + 2 * t + (e & 1);
          prob = dropout_keep(p.dropout_seed, dropout_index(p, bh, i, j), p.keep_threshold) ? prob * keep_scale : 0.f;
        }
        s[nt][e] = prob;
      }
    }

    // O += P V: the S fragments of key n-tiles (2kk, 2kk+1) form the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      uint32_t pa[4];
      accumulators_as_a_fragment<T>(pa, s, kk);
#pragma unroll
      for (int dt = 0; dt < kDimTiles8; ++dt) {
        uint32_t b0, b1;
        load_b_fragment<LD>(b0, b1, v_tile, kk * 16, dt * 8, g, t);
        Op::run(o[dt], pa, b0, b1);
      }
    }
    __syncthreads();  // this stage is refilled by the prefetch of the next iteration
  }
  copy_async_wait<0>();  // with no key tile at all the Q copy may still be in flight

  T* out = static_cast<T*>(args.out.data) + b * args.out.s0 + h * args.out.s1;
  float* lse = static_cast<float*>(args.lse) + bh * p.q_len;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float total = row_sum[half];
    total += __shfl_xor_sync(kFullMask, total, 1);
    total += __shfl_xor_sync(kFullMask, total, 2);
    const int64_t i = i0 + warp * 16 + g + half * 8;
    if (i >= p.q_len) continue;
    const float inv = total == 0.f ? 0.f : 1.f / total;  // no visible key: output 0
    uint32_t* out_row = reinterpret_cast<uint32_t*>(out + i * args.out.s2);
#pragma unroll
    for (int dt = 0; dt < kDimTiles8; ++dt) {
      out_row[dt * 4 + t] = Op::pack(o[dt][2 * half] * inv, o[dt][2 * half + 1] * inv);
    }
    if (t == 0) lse[i] = total == 0.f ? neg_inf : row_max[half] + log2f(total) * 0.6931471805599453f;
  }
#else
  __trap();  // never launched: mma_forward_supported requires compute capability 8.0
#endif
}

}  // namespace qkv::cuda::mma
