#pragma once
// Which (query, key) pairs an attention call lets through and what a score becomes, written once
// for every generic CUDA kernel (in the spirit of flash-attention's mask.h / softmax.h): the
// sequence a block works on (dense, packed or a KV cache), its band of visible keys (causal
// alignment, sliding windows), and the score transforms (softcap, ALiBi, the additive bias) in
// the CPU kernels' order (csrc/cpu/score_transforms.h): softcap, then ALiBi, then the bias, then
// the band mask.
#include "device_utils.cuh"

namespace qkv::cuda {

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// One sequence of a call, as csrc/cpu/sequences.h: b is its logical index (dropout counter, ALiBi
// slopes, bias), tb its batch in the tensors (0 for packed tensors), q0 / k0 its first query / key
// row there. Query i sees keys j with i + offset - left <= j <= i + offset + right (-1: unbounded).
struct SequenceView {
  int64_t b = 0, tb = 0, q0 = 0, k0 = 0, q_len = 0, kv_len = 0, offset = 0, left = -1, right = -1;

  __device__ __forceinline__ bool visible(int64_t i, int64_t j) const {
    return i < q_len && j < kv_len && (left < 0 || j >= i + offset - left) && (right < 0 || j <= i + offset + right);
  }
  // Query i sees keys [key_begin(i), key_end(i)); both grow with i.
  __device__ __forceinline__ int64_t key_begin(int64_t i) const {
    return left < 0 ? 0 : clamp64(i + offset - left, 0, kv_len);
  }
  __device__ __forceinline__ int64_t key_end(int64_t i) const {
    return right < 0 ? kv_len : clamp64(i + offset + right + 1, 0, kv_len);
  }
  // Key j is seen by queries [query_begin(j), query_end(j)); both grow with j.
  __device__ __forceinline__ int64_t query_begin(int64_t j) const {
    return right < 0 ? 0 : clamp64(j - offset - right, 0, q_len);
  }
  __device__ __forceinline__ int64_t query_end(int64_t j) const {
    return left < 0 ? q_len : clamp64(j - offset + left + 1, 0, q_len);
  }
  // The keys any of the query rows [i0, i_end) may see (whole key tiles outside are skipped).
  __device__ __forceinline__ int64_t keys_begin(int64_t i0) const { return key_begin(i0); }
  __device__ __forceinline__ int64_t keys_end(int64_t i_end) const { return i_end <= 0 ? 0 : key_end(i_end - 1); }
};

// Sequence b of a call (block-uniform: every thread of a block reads the same entries).
__device__ __forceinline__ SequenceView sequence_of(const ProblemShape& p, int64_t b) {
  SequenceView s;
  s.b = b;
  const bool own_lengths = p.cu_seqlens_q != nullptr || p.kv_lens != nullptr;
  if (p.cu_seqlens_q != nullptr) {
    s.tb = 0;
    s.q0 = p.cu_seqlens_q[b];
    s.k0 = p.cu_seqlens_k[b];
    s.q_len = p.cu_seqlens_q[b + 1] - s.q0;
    s.kv_len = p.cu_seqlens_k[b + 1] - s.k0;
  } else {
    s.tb = b;
    s.q_len = p.q_len;
    s.kv_len = p.kv_lens != nullptr ? p.kv_lens[b] : p.kv_len;
  }
  s.offset = own_lengths ? (p.bottom_right ? s.kv_len - s.q_len : 0) : p.causal_offset;
  s.left = p.window_left;
  s.right = p.is_causal ? 0 : p.window_right;
  return s;
}

// Rows of the tensors' sequence dimension (q_len, or total_q for packed tensors), and their batch.
__host__ __device__ __forceinline__ int64_t query_rows(const ProblemShape& p) {
  return p.cu_seqlens_q != nullptr ? p.packed_q_rows : p.q_len;
}
__host__ __device__ __forceinline__ int64_t tensor_batch(const ProblemShape& p) {
  return p.cu_seqlens_q != nullptr ? 1 : p.batch;
}
// Key/value heads (heads without grouped-query attention) and query heads per key/value head.
__host__ __device__ __forceinline__ int64_t key_heads(const ProblemShape& p) {
  return p.kv_heads > 0 ? p.kv_heads : p.heads;
}
__host__ __device__ __forceinline__ int64_t head_group(const ProblemShape& p) { return p.heads / key_heads(p); }

// The index of query row (sequence s, head h, row i) in the logsumexp and every per-row buffer
// (delta, normalizers): (B, H, L) dense, (H, total_q) packed.
__device__ __forceinline__ int64_t lse_row(const ProblemShape& p, const SequenceView& s, int64_t h, int64_t i) {
  return (s.tb * p.heads + h) * query_rows(p) + s.q0 + i;
}

// The key/value head query head h reads (grouped-query attention).
__device__ __forceinline__ int64_t kv_head_of(const ProblemShape& p, int64_t h) { return h / head_group(p); }

// Element (tb, h, row, 0) of a 4-D view.
template <typename T>
__device__ __forceinline__ const T* row_ptr(const ConstView4& view, int64_t tb, int64_t h, int64_t row) {
  return static_cast<const T*>(view.data) + tb * view.s0 + h * view.s1 + row * view.s2;
}
template <typename T>
__device__ __forceinline__ T* row_ptr(const MutableView4& view, int64_t tb, int64_t h, int64_t row) {
  return static_cast<T*>(view.data) + tb * view.s0 + h * view.s1 + row * view.s2;
}

// ---- the dense masks of the fast paths (mma, fa2: no windows, one length per call) ------------

// Whether query i may see key j.
struct MaskInfo {
  int64_t q_len, kv_len, causal_offset;
  bool is_causal;
  __device__ __forceinline__ bool visible(int64_t i, int64_t j) const {
    return i < q_len && j < kv_len && (!is_causal || j <= i + causal_offset);
  }
};

__device__ __forceinline__ MaskInfo mask_of(const ProblemShape& p) {
  return MaskInfo{p.q_len, p.kv_len, p.causal_offset, p.is_causal};
}

// One past the last key that any of the query rows [i0, i_end) may see.
__device__ __forceinline__ int64_t key_end_for_rows(const ProblemShape& p, int64_t i_end) {
  if (!p.is_causal) return p.kv_len;
  const int64_t e = i_end + p.causal_offset;
  return e < 0 ? 0 : (e > p.kv_len ? p.kv_len : e);
}

// First query row that can see key j0.
__device__ __forceinline__ int64_t first_query_seeing(const ProblemShape& p, int64_t j0) {
  if (!p.is_causal) return 0;
  const int64_t i = j0 - p.causal_offset;
  return i < 0 ? 0 : (i > p.q_len ? p.q_len : i);
}

// ---- score transforms ---------------------------------------------------------------------------

// The bias at (b, h, i, j) in the accumulation type, for inputs of type T: the bias is stored as T
// or as float32 (BiasView::is_float32, a uniform branch).
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t bias_at(const BiasView& bias, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t offset = b * bias.s0 + h * bias.s1 + i * bias.s2 + j * bias.s3;
  if (bias.is_float32) return static_cast<acc_t>(static_cast<const float*>(bias.data)[offset]);
  return load_acc<acc_t>(static_cast<const T*>(bias.data) + offset);
}

// The score transforms of one (sequence, head): apply() turns a product s (already scaled) into
// the score the softmax sees; cap_grad() is d score / d s (softcap's tanh derivative, 1 without).
template <typename acc_t, typename T>
struct ScoreTransform {
  acc_t softcap = acc_t(0), inv_softcap = acc_t(0), slope = acc_t(0);
  int64_t offset = 0, b = 0, h = 0;
  // By value: a pointer into the kernel's parameters would make nvcc copy them to local memory.
  BiasView bias;  // data == nullptr: none

  __device__ __forceinline__ acc_t capped(acc_t s) const { return softcap * tanh_acc(s * inv_softcap); }
  // The score at (i, j) (sequence-local indices) for product s.
  __device__ __forceinline__ acc_t apply(acc_t s, int64_t i, int64_t j) const {
    acc_t x = softcap > acc_t(0) ? capped(s) : s;
    if (slope != acc_t(0)) {
      const int64_t d = i + offset - j;
      x -= slope * static_cast<acc_t>(d < 0 ? -d : d);
    }
    if (bias.data != nullptr) x += bias_at<acc_t, T>(bias, b, h, i, j);
    return x;
  }
  __device__ __forceinline__ acc_t cap_grad(acc_t s) const {
    if (softcap <= acc_t(0)) return acc_t(1);
    const acc_t t = tanh_acc(s * inv_softcap);
    return acc_t(1) - t * t;
  }
};

template <typename acc_t, typename T>
__device__ __forceinline__ ScoreTransform<acc_t, T> score_transform(const ProblemShape& p, const BiasView& bias,
                                                                    const SequenceView& s, int64_t h) {
  ScoreTransform<acc_t, T> t;
  t.softcap = static_cast<acc_t>(p.softcap);
  t.inv_softcap = p.softcap > 0 ? static_cast<acc_t>(1.0 / p.softcap) : acc_t(0);
  if (p.alibi_slopes != nullptr) t.slope = static_cast<acc_t>(p.alibi_slopes[s.b * p.alibi_sb + h * p.alibi_sh]);
  t.offset = s.offset;
  t.b = s.b;
  t.h = h;
  t.bias = bias;
  return t;
}

}  // namespace qkv::cuda
