#pragma once
// Which (query, key) pairs an attention call lets through, shared by every CUDA kernel:
// causal alignment, sequence bounds, and the additive bias read through broadcast strides.
#include "device_utils.cuh"

namespace qkv::cuda {

// Whether query i may see key j, and the additive bias there (only read when visible).
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

// The bias at (b, h, i, j) in the accumulation type, for inputs of type T: the bias is stored as T
// or as float32 (BiasView::is_float32, a uniform branch).
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t bias_at(const BiasView& bias, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t offset = b * bias.s0 + h * bias.s1 + i * bias.s2 + j * bias.s3;
  if (bias.is_float32) return static_cast<acc_t>(static_cast<const float*>(bias.data)[offset]);
  return load_acc<acc_t>(static_cast<const T*>(bias.data) + offset);
}

}  // namespace qkv::cuda
