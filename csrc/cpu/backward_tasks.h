#pragma once
// How the CPU backward splits its work into tasks, and how the results of tasks that share
// an output are summed, in an order fixed by the problem alone: the gradients are the same
// bit for bit whatever the thread count (tests/test_core_threads.py).
//
// A task is (group of (sequence, key/value head) pairs, chunk of key blocks). A pair runs every
// query head that reads its key head (grouped-query attention), so dK and dV of a key block
// belong to one task. dQ sums over key blocks: each chunk adds its blocks into its own partial,
// and the partials are summed in chunk order (DqPartials). The gradient of a bias with a column
// per key sums over the pairs that share a bias slice (a bias broadcast over batch or heads):
// those pairs form one group, so one task adds them in order (BiasGradAccumulator); chunks
// cover disjoint keys, so they write disjoint columns. A bias with one key column has its own
// per-chunk sums (RowShiftBiasGrad in attention_cpu.cpp).
#include "../attention_common.h"
#include "tile_context.h"  // kBackwardKeyBlock, add_scaled_row

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <vector>

namespace qkv {
inline namespace CPU_CAPABILITY {

// The bias's sizes as 4-D and the strides of its gradient, a dense (B', H', L', S') buffer of those
// sizes: zero on the dimensions the bias broadcasts over.
struct BiasGradLayout {
  int64_t sizes[4] = {1, 1, 1, 1}, strides[4] = {0, 0, 0, 0}, numel = 1;
  BiasGradLayout(const AttentionParams& p, const at::Tensor& bias) {
    const int64_t offset = 4 - bias.dim();
    for (int64_t d = 0; d < bias.dim(); ++d) sizes[offset + d] = bias.size(d);
    const int64_t full[4] = {p.batch, p.heads, p.q_len, p.kv_len};
    for (int64_t d = 3; d >= 0; --d) {
      strides[d] = sizes[d] == 1 && full[d] != 1 ? 0 : numel;
      numel *= sizes[d];
    }
  }
  // A bias with one key column adds the same amount to every score of a row (RowShiftBiasGrad).
  bool shifts_rows() const { return sizes[3] == 1; }
};

// Tasks wanted per backward, whatever the thread count: enough for 16 threads with room to
// balance. Each chunk costs a dQ partial and a repacking of Q and dO, about 1% of the work of
// a chunk of kMinChunkKeys keys (measured with AVX2 at S = 2048: 1.4% for 4 chunks of 512).
constexpr int64_t kBackwardTargetTasks = 32;
constexpr int64_t kMinChunkKeys = 512;

struct BackwardTasks {
  int64_t sequences = 0, kv_heads = 1;  // the pairs: sequences (with work) x kv_heads
  int64_t pairs_per_group = 1, groups = 0, chunks = 1;
  bool sequences_in_group = false, heads_in_group = false;

  // `bias_grad_per_key`: a gradient is wanted for a bias with a column per key (grouped by its
  // broadcast dimensions). `key_blocks`: blocks of the longest sequence's keys.
  BackwardTasks(const AttentionParams& p, int64_t sequences, int64_t kv_heads, const std::optional<at::Tensor>& bias,
                bool bias_grad_per_key, int64_t key_blocks)
      : sequences(sequences), kv_heads(kv_heads) {
    if (bias_grad_per_key) {
      const BiasGradLayout layout(p, *bias);
      sequences_in_group = layout.sizes[0] == 1 && sequences > 1;
      heads_in_group = layout.sizes[1] == 1 && kv_heads > 1;
    }
    pairs_per_group = (sequences_in_group ? sequences : 1) * (heads_in_group ? kv_heads : 1);
    groups = sequences * kv_heads / pairs_per_group;
    const int64_t most = std::max<int64_t>(1, std::min(key_blocks, p.kv_len / kMinChunkKeys));
    chunks = std::clamp<int64_t>((kBackwardTargetTasks + groups - 1) / std::max<int64_t>(groups, 1), 1, most);
  }

  int64_t count() const { return groups * chunks; }
  int64_t group_of(int64_t task) const { return task / chunks; }
  int64_t chunk_of(int64_t task) const { return task % chunks; }

  // The m-th pair of group g, as sequence * kv_heads + key head (sequence: an index into the
  // sequences with work); the pairs of a group in a fixed order.
  int64_t pair(int64_t g, int64_t m) const {
    const int64_t group_heads = heads_in_group ? 1 : kv_heads;  // groups per sequence
    const int64_t seq = sequences_in_group ? m / (heads_in_group ? kv_heads : 1) : g / group_heads;
    const int64_t kh = heads_in_group ? m % kv_heads : g % group_heads;
    return seq * kv_heads + kh;
  }
};

// The dQ partials of each (b, h) pair's key chunks. The task that finishes a pair's last
// chunk sums its partials in chunk order: the sum does not depend on which task ends last.
// Partials come from a pool and return to it after the sum, so only the pairs in progress
// hold memory (rows padded to whole cache lines: no two workers write one line).
template <typename acc_t>
class DqPartials {
 public:
  DqPartials(int64_t pairs, int64_t chunks, int64_t rows, int64_t ld)
      : chunks_(chunks), size_((rows * ld + kLine - 1) / kLine * kLine), slots_(pairs * chunks),
        remaining_(new std::atomic<int64_t>[pairs]) {
    for (int64_t i = 0; i < pairs; ++i) remaining_[i].store(chunks, std::memory_order_relaxed);
  }

  int64_t chunks() const { return chunks_; }

  // An uninitialised partial for (pair, chunk): its first product writes it, see below.
  acc_t* take(int64_t pair, int64_t chunk) {
    Slice slice;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!free_.empty()) {
        slice = std::move(free_.back());
        free_.pop_back();
      }
    }
    if (!slice) slice.reset(static_cast<acc_t*>(::operator new[](size_ * sizeof(acc_t), std::align_val_t{64})));
    acc_t* data = slice.get();
    std::lock_guard<std::mutex> lock(mutex_);
    slots_[pair * chunks_ + chunk] = std::move(slice);
    return data;
  }

  // Called once per (pair, chunk) when its task is done with it: true for the call that
  // completes the pair, whose caller then reads partial(pair, c) for every chunk and calls release().
  bool finish(int64_t pair) { return remaining_[pair].fetch_sub(1, std::memory_order_acq_rel) == 1; }

  const acc_t* partial(int64_t pair, int64_t chunk) const { return slots_[pair * chunks_ + chunk].get(); }

  void release(int64_t pair) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int64_t c = 0; c < chunks_; ++c) free_.push_back(std::move(slots_[pair * chunks_ + c]));
  }

 private:
  static constexpr int64_t kLine = 64 / sizeof(acc_t);
  struct AlignedDelete {
    void operator()(acc_t* p) const { ::operator delete[](p, std::align_val_t{64}); }
  };
  using Slice = std::unique_ptr<acc_t, AlignedDelete>;

  int64_t chunks_, size_;
  std::mutex mutex_;
  std::vector<Slice> free_;
  std::vector<Slice> slots_;  // pair * chunks + chunk
  std::unique_ptr<std::atomic<int64_t>[]> remaining_;
};

// Accumulates dS into the gradient of a bias with a column per key, in acc_t, summing over the
// broadcast dimensions. Tasks of different groups, and different chunks, write disjoint
// elements; the pairs of a group add theirs in the group's order (BackwardTasks).
template <typename acc_t>
struct BiasGradAccumulator {
  bool active = false;
  int64_t strides[4] = {0, 0, 0, 0};  // zero on broadcast dims
  at::Tensor buffer;  // the bias's numel, in acc_t

  BiasGradAccumulator(const AttentionParams& p, const std::optional<at::Tensor>& bias, bool wanted) {
    if (!wanted || !p.has_bias) return;
    const BiasGradLayout layout(p, *bias);
    if (layout.shifts_rows()) return;  // RowShiftBiasGrad's
    active = true;
    std::copy(layout.strides, layout.strides + 4, strides);
    buffer = at::zeros({layout.numel}, bias->options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }

  acc_t* data() const { return buffer.data_ptr<acc_t>(); }

  void add_tile(acc_t* grad, const acc_t* ds, int64_t ld, int64_t b, int64_t h, int64_t i0, int64_t rows,
                int64_t j0, int64_t cols) const {
    acc_t* g = grad + b * strides[0] + h * strides[1] + i0 * strides[2] + j0 * strides[3];
    if (strides[2] == 0) {
      // Broadcast over query rows: the tile's rows are summed first, so that a column's sum over
      // every query is one of tile partials, not of L single terms.
      acc_t column_sums[kBackwardKeyBlock];
      for (int64_t r = 0; r < rows; ++r) add_scaled_row(column_sums, ds + r * ld, cols, acc_t(1), r > 0);
      for (int64_t c = 0; c < cols; ++c) g[c * strides[3]] += column_sums[c];
      return;
    }
    for (int64_t r = 0; r < rows; ++r, g += strides[2]) {
      const acc_t* d = ds + r * ld;
      for (int64_t c = 0; c < cols; ++c) g[c * strides[3]] += d[c];
    }
  }

  at::Tensor result(const at::Tensor& bias) const { return buffer.to(bias.scalar_type()).view(bias.sizes()); }
};

}  // namespace CPU_CAPABILITY
}  // namespace qkv
