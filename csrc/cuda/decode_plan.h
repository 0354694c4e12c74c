#pragma once
// Which calls the split-KV decode forward serves, and how it cuts one up (rows per block, lanes per
// key, number of key splits). Plain C++ on the kernel arguments of kernel_params.h: used by the
// torch-facing layer (attention_cuda.cpp, to decide and to size the workspace), by the launcher
// (decode_forward.cu) and by the CPU emulation tests, so all three agree on one plan.
#include "kernel_params.h"

#include <cstdint>

namespace qkv::cuda {

constexpr int64_t kDecodeMaxQueryRows = 16;  // q_len of a decode-shaped call (new tokens per step)
constexpr int64_t kDecodeMaxSplits = 256;
// A split streams at least this many keys (unless the call has fewer): below it the partial's
// write and merge cost about as much as the keys themselves.
constexpr int64_t kDecodeMinKeysPerSplit = 128;
// Blocks of 128 threads a multiprocessor keeps resident when the device cannot be asked (the CPU
// emulation); the launcher asks the CUDA occupancy calculator for the kernel it will run
// (split_decode_blocks_per_sm: 2-3 on an H100, registers being the limit).
constexpr int64_t kDecodeBlocksPerSmGuess = 4;

// Elements of one 16-byte load (the kernel reads K and V rows in 16-byte chunks).
inline int decode_vector_elems(ElementType t) { return t == ElementType::Float32 ? 4 : 8; }

inline bool aligned_16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether the split decode forward computes this call exactly as the generic forward does.
// Everything else (float64, dropout, packed varlen tensors, prefill-sized q_len, head_dim !=
// value_head_dim, K/V rows that cannot be read in aligned 16-byte chunks) takes the usual dispatch.
// Served: per-batch key counts (KV caches), both causal alignments, grouped key/value heads,
// windows, softcap, ALiBi and an additive bias (read per score, as the generic kernels do).
inline bool split_decode_supported(const ForwardArgs& a) {
  const ProblemShape& p = a.shape;
  if (a.dtype == ElementType::Float64) return false;
  if (p.dropout_p > 0.0 || p.cu_seqlens_q != nullptr) return false;
  if (p.q_len < 1 || p.q_len > kDecodeMaxQueryRows) return false;
  if (p.head_dim != p.v_head_dim || p.head_dim > kMaxHeadDim) return false;
  const int64_t vec = decode_vector_elems(a.dtype);
  if (p.head_dim % vec != 0) return false;
  for (const ConstView4* t : {&a.k, &a.v}) {
    if (t->s3 != 1 || t->s0 % vec != 0 || t->s1 % vec != 0 || t->s2 % vec != 0 || !aligned_16(t->data)) return false;
  }
  return true;
}

struct DecodePlan {
  int rows_per_block = 1;
  int64_t row_chunks = 1;
  int lanes_per_key = 4;
  int chunks_per_lane = 1;
  int64_t splits = 1;
};

// The number of key splits, after FlashAttention-2's num_splits_heuristic (flash_api.cpp), with this
// kernel's small blocks counted in `resident` (the blocks the GPU keeps at once: multiprocessors x
// blocks per multiprocessor) rather than one per multiprocessor. `base_blocks` blocks run without
// splitting. A grid that already fills 80% of one wave: 1 split. Otherwise, of the split counts n
// that change the keys per split (ceil(key_blocks / n) != ceil(key_blocks / (n - 1)), key blocks of
// kDecodeMinKeysPerSplit keys: a split's partial costs about what that many keys do), take the
// smallest whose wave efficiency (base n / resident over its ceiling: how full the last wave is)
// is within 85% of the best; at most kDecodeMaxSplits.
inline int64_t decode_num_splits(int64_t base_blocks, int64_t max_keys, int64_t resident) {
  if (resident < 1) resident = 1;
  if (base_blocks <= 0 || max_keys <= 0 || base_blocks * 5 >= resident * 4) return 1;
  const int64_t key_blocks = (max_keys + kDecodeMinKeysPerSplit - 1) / kDecodeMinKeysPerSplit;
  const int64_t max_splits = key_blocks < kDecodeMaxSplits ? key_blocks : kDecodeMaxSplits;
  auto eligible = [&](int64_t n) {
    return n == 1 || (key_blocks + n - 1) / n != (key_blocks + n - 2) / (n - 1);
  };
  auto efficiency = [&](int64_t n) {
    const double waves = static_cast<double>(base_blocks * n) / static_cast<double>(resident);
    const double full = static_cast<double>((base_blocks * n + resident - 1) / resident);
    return waves / full;
  };
  double best = 0.0;
  for (int64_t n = 1; n <= max_splits; ++n) {
    if (eligible(n) && efficiency(n) > best) best = efficiency(n);
  }
  for (int64_t n = 1; n <= max_splits; ++n) {
    if (eligible(n) && efficiency(n) >= 0.85 * best) return n;
  }
  return 1;
}

// The keys a query row of the call may see at most: the longest sequence (`max_kv_len`, the cache
// length or the longest cache_seqlens + new tokens), narrowed by a window.
inline int64_t decode_max_keys(const ProblemShape& p, int64_t max_kv_len) {
  int64_t keys = max_kv_len;
  const int64_t right = p.is_causal ? 0 : p.window_right;
  if (p.window_left >= 0 && right >= 0) {
    const int64_t band = p.window_left + right + p.q_len;
    if (band < keys) keys = band;
  }
  return keys;
}

// The layout of a call split_decode_supported accepts: rows per block, row chunks, lanes per key
// (plan.splits stays 1; decode_split_count sets it).
inline DecodePlan decode_layout(const ForwardArgs& a) {
  const ProblemShape& p = a.shape;
  DecodePlan plan;
  const int64_t kv_heads = p.kv_heads > 0 ? p.kv_heads : p.heads;
  // Every query row of a key/value head (its group of query heads times q_len) shares the block's
  // K/V loads: 1, 4 or 8 rows per block (three instantiations), more rows in several chunks.
  const int64_t rows = (p.heads / kv_heads) * p.q_len;
  plan.rows_per_block = rows <= 1 ? 1 : (rows <= 4 ? 4 : 8);
  plan.row_chunks = (rows + plan.rows_per_block - 1) / plan.rows_per_block;
  // A key row is read as head_dim / vec chunks of 16 bytes, one per lane of a power-of-two group
  // of lanes (at least 4, so a warp holds at most 8 keys; two chunks per lane past 32 chunks).
  const int64_t chunks = p.head_dim / decode_vector_elems(a.dtype);
  plan.chunks_per_lane = chunks > 32 ? 2 : 1;
  plan.lanes_per_key = 4;
  while (plan.lanes_per_key < 32 && plan.lanes_per_key * plan.chunks_per_lane < chunks) plan.lanes_per_key *= 2;
  return plan;
}

// The split count of a layout: `forced_splits` > 0 (QKV_DECODE_SPLITS) or the heuristic, for a GPU
// that keeps `resident` blocks of the kernel at once; `max_kv_len` is the longest sequence.
inline int64_t decode_split_count(const ForwardArgs& a, const DecodePlan& layout, int64_t resident,
                                  int64_t max_kv_len, int64_t forced_splits) {
  if (forced_splits > 0) return forced_splits;
  const ProblemShape& p = a.shape;
  const int64_t kv_heads = p.kv_heads > 0 ? p.kv_heads : p.heads;
  return decode_num_splits(p.batch * kv_heads * layout.row_chunks, decode_max_keys(p, max_kv_len), resident);
}

// float32 elements of the workspace a plan needs: per dense query row and split, max, sum and
// the v_head_dim partial output.
inline int64_t decode_workspace_elems(const ProblemShape& p, const DecodePlan& plan) {
  return p.batch * p.heads * p.q_len * plan.splits * (p.v_head_dim + 2);
}

// Fills DecodeArgs from a plan and its workspace (decode_workspace_elems floats).
inline DecodeArgs decode_args(const ForwardArgs& fwd, const DecodePlan& plan, float* workspace) {
  DecodeArgs d;
  d.fwd = fwd;
  d.rows_per_block = plan.rows_per_block;
  d.row_chunks = plan.row_chunks;
  d.splits = plan.splits;
  d.lanes_per_key = plan.lanes_per_key;
  d.chunks_per_lane = plan.chunks_per_lane;
  const int64_t partials = fwd.shape.batch * fwd.shape.heads * fwd.shape.q_len * plan.splits;
  d.part_max = workspace;
  d.part_sum = workspace + partials;
  d.part_out = workspace + 2 * partials;
  return d;
}

}  // namespace qkv::cuda
