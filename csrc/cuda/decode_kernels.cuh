#pragma once
// The split-KV ("flash-decoding") forward for decode-shaped calls (a few query rows, many keys),
// after FlashAttention-2's split-KV forward (flash_fwd_kernel.h, compute_attn_splitkv, and the
// combine in flash_fwd_launch_template.h), written for qkv's semantics (masking.cuh) and for the CPU
// emulation. With one query row per (batch, head), the generic forward runs batch * heads blocks,
// each streaming every key: a few dozen blocks on a GPU with 132 multiprocessors. Here the keys of
// a (batch, key/value head) are cut into `splits` contiguous ranges, one block each:
//
//  1. split_decode_kernel: block (b, key/value head, row chunk, split) serves every query row of
//     that key/value head (its group of query heads times q_len, up to R = 1, 4 or 8 rows), so
//     grouped heads share each K/V load. Lanes split a key row into 16-byte chunks (LPK lanes per
//     key, CPL chunks each), so a warp reads 32 / LPK keys per step in coalesced 16-byte loads, and
//     each group of LPK lanes (a "slot") keeps its own online softmax (max, sum, unnormalised
//     output in float32) over its share of the split's keys, KPI keys per step loaded before any
//     is used. The slots are then merged through shared memory, and the split's partial (max m,
//     sum l, output acc, per row) goes to a float32 workspace.
//  2. split_decode_combine_kernel: a warp per query row merges the splits' partials:
//     M = max m_s, L = sum l_s exp(m_s - M), out = sum acc_s exp(m_s - M) / L, lse = M + log L
//     (natural log, as every qkv kernel); L == 0 (no visible key) gives out 0 and lse -inf, as the
//     generic forward. The backward reads this lse like any other.
//
// Masks and score transforms are the generic kernels' (sequence_of, SequenceView::visible,
// ScoreTransform), so KV-cache key counts, both causal alignments, windows, softcap, ALiBi and the
// bias mean exactly what they mean there. Which calls qualify, and the plan: decode_plan.h.
#include "decode_plan.h"
#include "device_utils.cuh"
#include "dispatch.cuh"
#include "masking.cuh"

namespace qkv::cuda::decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kCombineWarps = 4;  // query rows per combine block

// ---- 16-byte loads ------------------------------------------------------------------------------

// The float values of one 32-bit word holding 2 (16-bit types) or 1 (float) elements, lowest first.
__device__ __forceinline__ void unpack_word(unsigned w, float* out, const __nv_bfloat16*) {
  out[0] = __uint_as_float(w << 16);  // bfloat16 is the high half of a float32
  out[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void unpack_word(unsigned w, float* out, const __half*) {
  out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ void unpack_word(unsigned w, float* out, const float*) { out[0] = __uint_as_float(w); }

// 16 bytes (16 / sizeof(T) elements of type T) as floats. The loads keep the raw words, and
// convert only where they are used: a float per element would double the registers of the keys a
// lane has in flight.
template <typename T>
__device__ __forceinline__ void unpack_16(const uint4& raw, float* out) {
  constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
  const T* tag = nullptr;
  unpack_word(raw.x, out, tag);
  unpack_word(raw.y, out + kPerWord, tag);
  unpack_word(raw.z, out + 2 * kPerWord, tag);
  unpack_word(raw.w, out + 3 * kPerWord, tag);
}

template <typename T>
__device__ __forceinline__ uint4 load_16(const T* src) {  // src: 16-byte aligned
  return *reinterpret_cast<const uint4*>(src);
}

// ---- kernel 1: one split's partial ----------------------------------------------------------------

template <typename T, int R, int LPK, int CPL>
struct SplitConfig {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kCols = CPL * kVec;                          // head-dim columns per lane
  static constexpr int kWidth = LPK * kCols;                        // columns a slot covers (>= head_dim)
  static constexpr int kSlots = kWarps * (kWarpSize / LPK);         // key slots per block
  // Keys a slot loads before using any (registers: each costs 2 * kCols, and rows cost 2 * kCols each).
  static constexpr int kKeysPerStep = R == 1 ? 4 : (R == 4 ? 2 : 1);
  // Shared memory of the slot merge: per slot and row, max and sum, then the output columns.
  static size_t shared_bytes() { return sizeof(float) * kSlots * R * (2 + kWidth); }
  static int64_t blocks(const DecodeArgs& d) {
    const ProblemShape& p = d.fwd.shape;
    return p.batch * key_heads(p) * d.row_chunks * d.splits;
  }
};

template <typename T, int R, int LPK, int CPL>
__global__ void __launch_bounds__(kThreads) split_decode_kernel(const DecodeArgs args) {
  using Config = SplitConfig<T, R, LPK, CPL>;
  constexpr int kVec = Config::kVec, kCols = Config::kCols, kWidth = Config::kWidth, kSlots = Config::kSlots;
  constexpr int KPI = Config::kKeysPerStep;
  const ProblemShape& p = args.fwd.shape;
  const int64_t splits = args.splits;
  const int64_t split = static_cast<int64_t>(blockIdx.x) % splits;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) / splits;  // (b, key/value head, row chunk)
  const int64_t chunk = unit % args.row_chunks;
  const int64_t bhk = unit / args.row_chunks;
  const int64_t hk = bhk % key_heads(p), b = bhk / key_heads(p);
  const int64_t group = head_group(p);
  const SequenceView seq = sequence_of(p, b);
  const int D = static_cast<int>(p.head_dim);
  const float neg_inf = negative_infinity<float>();

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int slot = warp * (kWarpSize / LPK) + lane / LPK;  // this lane's keys: slot, slot + kSlots, ...
  const int sub = lane % LPK;                              // its chunks: sub, sub + LPK, ...

  // The block's rows: row r is query row i of query head h = hk * group + g, with r + chunk * R =
  // g * q_len + i; rows past group * q_len are padding (never visible, never written).
  int row_h[R], row_i[R];  // 32-bit: heads and q_len <= 16 fit, and 8 rows of int64 pairs cost 32 registers
  bool row_valid[R];
  float row_slope[R];
  const ScoreTransform<float, T> transform = score_transform<float, T>(p, args.fwd.bias, seq, hk * group);
  int64_t key_begin = seq.kv_len, key_end = 0;  // the union of the rows' bands
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t rr = chunk * R + r;
    row_valid[r] = rr < group * seq.q_len;
    row_h[r] = static_cast<int>(hk * group + (row_valid[r] ? rr / seq.q_len : 0));
    row_i[r] = static_cast<int>(row_valid[r] ? rr % seq.q_len : 0);
    row_slope[r] = p.alibi_slopes != nullptr ? p.alibi_slopes[seq.b * p.alibi_sb + row_h[r] * p.alibi_sh] : 0.f;
    if (row_valid[r]) {
      const int64_t kb = seq.key_begin(row_i[r]), ke = seq.key_end(row_i[r]);
      if (kb < ke) {
        key_begin = kb < key_begin ? kb : key_begin;
        key_end = ke > key_end ? ke : key_end;
      }
    }
  }
  // This split's contiguous share of that range (block-uniform, so every loop below is too).
  const int64_t range = key_end > key_begin ? key_end - key_begin : 0;
  const int64_t per_split = ceil_div(range, splits);
  const int64_t j_begin = key_begin + split * per_split;
  const int64_t j_end = j_begin + per_split < key_begin + range ? j_begin + per_split : key_begin + range;

  // The lane's columns of each row's query, pre-scaled (tiny: strided scalar loads).
  float q[R][kCols];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const T* q_row = row_ptr<T>(args.fwd.q, seq.tb, row_h[r], seq.q0 + row_i[r]);
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int col = (sub + c * LPK) * kVec + e;
        q[r][c * kVec + e] =
            row_valid[r] && col < D ? load_acc<float>(q_row + col * args.fwd.q.s3) * static_cast<float>(p.scale) : 0.f;
      }
    }
  }

  float m[R], l[R], acc[R][kCols];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = neg_inf;
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = 0.f;
  }

  const T* k_base = row_ptr<T>(args.fwd.k, seq.tb, hk, seq.k0);
  const T* v_base = row_ptr<T>(args.fwd.v, seq.tb, hk, seq.k0);
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kSlots * KPI) {
    // Every load of the step first, so KPI * 2 * CPL 16-byte loads per lane are in flight at once.
    uint4 k_raw[KPI][CPL], v_raw[KPI][CPL];
    bool in_split[KPI];
#pragma unroll
    for (int u = 0; u < KPI; ++u) {
      const int64_t j = j0 + u * kSlots + slot;
      in_split[u] = j < j_end;
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        const int col = (sub + c * LPK) * kVec;
        if (in_split[u] && col < D) {
          k_raw[u][c] = load_16(k_base + j * args.fwd.k.s2 + col);
          v_raw[u][c] = load_16(v_base + j * args.fwd.v.s2 + col);
        } else {
          k_raw[u][c] = v_raw[u][c] = uint4{0u, 0u, 0u, 0u};  // zeros in every element type
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float x[KPI];
#pragma unroll
      for (int u = 0; u < KPI; ++u) {
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
          float kf[kVec];
          unpack_16<T>(k_raw[u][c], kf);
#pragma unroll
          for (int e = 0; e < kVec; ++e) s += q[r][c * kVec + e] * kf[e];
        }
#pragma unroll
        for (int offset = LPK / 2; offset > 0; offset /= 2) s += __shfl_xor_sync(kFullMask, s, offset);
        const int64_t j = j0 + u * kSlots + slot;
        if (in_split[u] && row_valid[r] && seq.visible(row_i[r], j)) {
          ScoreTransform<float, T> t = transform;
          t.h = row_h[r];
          t.slope = row_slope[r];
          x[u] = t.apply(s, row_i[r], j);
        } else {
          x[u] = neg_inf;
        }
      }
      float step_max = x[0];
#pragma unroll
      for (int u = 1; u < KPI; ++u) step_max = max_acc(step_max, x[u]);
      const float new_max = max_acc(m[r], step_max);
      if (new_max != neg_inf) {  // slot-uniform: nothing visible yet means nothing to add
        const float correction = exp_acc(m[r] - new_max);
        l[r] *= correction;
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[r][c] *= correction;
#pragma unroll
        for (int u = 0; u < KPI; ++u) {
          const float prob = exp_acc(x[u] - new_max);
          l[r] += prob;
#pragma unroll
          for (int c = 0; c < CPL; ++c) {
            float vf[kVec];
            unpack_16<T>(v_raw[u][c], vf);
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[r][c * kVec + e] += prob * vf[e];
          }
        }
        m[r] = new_max;
      }
    }
  }

  // Merge the slots: each writes its state, then row r's weights exp(m_slot - M) are computed once.
  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  float* slot_max = reinterpret_cast<float*>(smem_bytes);  // [slot][r]; then the weights
  float* slot_sum = slot_max + kSlots * R;                   // [slot][r]
  float* slot_out = slot_sum + kSlots * R;                   // [slot][r][kWidth]
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (sub == 0) {
      slot_max[slot * R + r] = m[r];
      slot_sum[slot * R + r] = l[r];
    }
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        slot_out[(slot * R + r) * kWidth + (sub + c * LPK) * kVec + e] = acc[r][c * kVec + e];
      }
    }
  }
  __syncthreads();

  // Where row r's partial goes (r at run time: the register arrays above are not indexed here).
  auto partial_index = [&](int r) -> int64_t {
    const int64_t rr = chunk * R + r;
    if (rr >= group * seq.q_len) return -1;  // padding row
    const int64_t h = hk * group + rr / seq.q_len, i = rr % seq.q_len;
    return ((seq.tb * p.heads + h) * p.q_len + i) * splits + split;
  };
  if (threadIdx.x < R) {
    const int r = threadIdx.x;
    float row_max = neg_inf;
    for (int s = 0; s < kSlots; ++s) row_max = max_acc(row_max, slot_max[s * R + r]);
    float total = 0.f;
    for (int s = 0; s < kSlots; ++s) {
      const float ms = slot_max[s * R + r];
      const float w = ms == neg_inf ? 0.f : exp_acc(ms - row_max);  // no -inf - -inf
      total += w * slot_sum[s * R + r];
      slot_max[s * R + r] = w;
    }
    const int64_t at = partial_index(r);
    if (at >= 0) {
      args.part_max[at] = row_max;
      args.part_sum[at] = total;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < R * D; e += kThreads) {
    const int r = e / D, col = e % D;
    const int64_t at = partial_index(r);
    if (at < 0) continue;
    float o = 0.f;
    for (int s = 0; s < kSlots; ++s) {
      const float w = slot_max[s * R + r];
      if (w != 0.f) o += w * slot_out[(s * R + r) * kWidth + col];
    }
    args.part_out[at * D + col] = o;
  }
}

// ---- kernel 2: merge the splits -------------------------------------------------------------------

// One warp per dense query row (b * H + h) * q_len + i.
template <typename T>
__global__ void __launch_bounds__(kCombineWarps * kWarpSize) split_decode_combine_kernel(const DecodeArgs args) {
  const ProblemShape& p = args.fwd.shape;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + warp;
  if (row >= p.batch * p.heads * p.q_len) return;  // warp-uniform; no block barrier below
  const int64_t splits = args.splits;
  const int64_t i = row % p.q_len, h = (row / p.q_len) % p.heads, b = row / (p.q_len * p.heads);
  const float neg_inf = negative_infinity<float>();
  const float* part_max = args.part_max + row * splits;
  const float* part_sum = args.part_sum + row * splits;
  const float* part_out = args.part_out + row * splits * p.v_head_dim;

  float row_max = neg_inf;
  for (int64_t s = lane; s < splits; s += kWarpSize) row_max = max_acc(row_max, part_max[s]);
  row_max = warp_max(row_max);
  auto weight = [&](int64_t s) {
    const float ms = part_max[s];
    return ms == neg_inf ? 0.f : exp_acc(ms - row_max);  // an empty split adds nothing
  };
  float total = 0.f;
  for (int64_t s = lane; s < splits; s += kWarpSize) total += weight(s) * part_sum[s];
  total = warp_sum(total);
  const float inv = total == 0.f ? 0.f : 1.f / total;  // no visible key: output 0

  const SequenceView seq = sequence_of(p, b);
  T* out = row_ptr<T>(args.fwd.out, seq.tb, h, seq.q0 + i);
  for (int64_t col = lane; col < p.v_head_dim; col += kWarpSize) {
    float o = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      const float w = weight(s);
      if (w != 0.f) o += w * part_out[s * p.v_head_dim + col];
    }
    store_acc(out + col * args.fwd.out.s3, o * inv);
  }
  if (lane == 0) {
    static_cast<float*>(args.fwd.lse)[lse_row(p, seq, h, i)] = total == 0.f ? neg_inf : row_max + log_acc(total);
  }
}

struct CombineConfig {
  static constexpr int kThreads = kCombineWarps * kWarpSize;
  static int64_t blocks(const DecodeArgs& d) {
    const ProblemShape& p = d.fwd.shape;
    return ceil_div(p.batch * p.heads * p.q_len, kCombineWarps);
  }
};

// Calls fn(TypeTag<T>, integral_constant R, integral_constant LPK, integral_constant CPL) for the
// instantiation that serves `d` (float16, bfloat16, float32; R in {1, 4, 8}; (LPK, CPL) in
// {(4,1), (8,1), (16,1), (32,1)}, and (32,2) for float32): the launcher and the CPU emulation pick
// kernels alike. 39 split kernels.
template <typename Fn>
void dispatch_split_decode(const DecodeArgs& d, Fn&& fn) {
  auto with_rows = [&](auto type) {
    auto with_lanes = [&](auto rows) {
      using std::integral_constant;
      switch (d.lanes_per_key * 10 + d.chunks_per_lane) {
        case 41: return fn(type, rows, integral_constant<int, 4>{}, integral_constant<int, 1>{});
        case 81: return fn(type, rows, integral_constant<int, 8>{}, integral_constant<int, 1>{});
        case 161: return fn(type, rows, integral_constant<int, 16>{}, integral_constant<int, 1>{});
        case 321: return fn(type, rows, integral_constant<int, 32>{}, integral_constant<int, 1>{});
        case 322:  // only float32 has more than 32 chunks (D > 128)
          if constexpr (std::is_same_v<typename decltype(type)::type, float>) {
            return fn(type, rows, integral_constant<int, 32>{}, integral_constant<int, 2>{});
          }
          break;
      }
      TORCH_CHECK(false, "qkv: internal error: no split decode kernel for ", d.lanes_per_key, " lanes per key and ",
                  d.chunks_per_lane, " chunks per lane");
    };
    switch (d.rows_per_block) {
      case 1: return with_lanes(std::integral_constant<int, 1>{});
      case 4: return with_lanes(std::integral_constant<int, 4>{});
      case 8: return with_lanes(std::integral_constant<int, 8>{});
    }
    TORCH_CHECK(false, "qkv: internal error: no split decode kernel for ", d.rows_per_block, " rows per block");
  };
  switch (d.fwd.dtype) {
    case ElementType::Float16: return with_rows(TypeTag<__half>{});
    case ElementType::BFloat16: return with_rows(TypeTag<__nv_bfloat16>{});
    case ElementType::Float32: return with_rows(TypeTag<float>{});
    case ElementType::Float64: break;
  }
  TORCH_CHECK(false, "qkv: the split decode forward has no float64 kernel (split_decode_supported says no)");
}

}  // namespace qkv::cuda::decode
