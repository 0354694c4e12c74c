#pragma once
// How the CPU backward splits its work into tasks, and how the results of tasks that share
// an output are summed, in an order fixed by the problem alone: the gradients are the same
// bit for bit whatever the thread count (tests/test_core_threads.py).
//
// A task is (group of (b, h) pairs, chunk of key blocks). dK and dV of a key block belong to
// one task. dQ sums over key blocks: each chunk adds its blocks into its own partial, and
// the partials are summed in chunk order (DqPartials). The bias gradient sums over the pairs
// that share a bias slice (a bias broadcast over batch or heads): those pairs form one group,
// so one task adds them in order; a bias broadcast over keys is shared by the chunks too,
// so each chunk gets its own copy, summed in chunk order at the end (BiasGradAccumulator).
#include "../attention_common.h"

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

// The bias's sizes as 4-D (B, H, L, S) with 1 on broadcast dimensions.
inline std::array<int64_t, 4> bias_sizes_4d(const at::Tensor& bias) {
  std::array<int64_t, 4> sizes{1, 1, 1, 1};
  const int64_t offset = 4 - bias.dim();
  for (int64_t d = 0; d < bias.dim(); ++d) sizes[offset + d] = bias.size(d);
  return sizes;
}

// Tasks wanted per backward, whatever the thread count: enough for 16 threads with room to
// balance. Each chunk costs a dQ partial and a repacking of Q and dO, about 1% of the work of
// a chunk of kMinChunkKeys keys (measured with AVX2 at S = 2048: 1.4% for 4 chunks of 512).
constexpr int64_t kBackwardTargetTasks = 32;
constexpr int64_t kMinChunkKeys = 512;

struct BackwardTasks {
  int64_t pairs_per_group = 1, groups = 0, chunks = 1;
  bool batch_in_group = false, heads_in_group = false;

  BackwardTasks(const AttentionParams& p, const std::optional<at::Tensor>& bias, bool bias_grad, int64_t key_blocks) {
    if (bias_grad && p.has_bias) {
      const auto sizes = bias_sizes_4d(*bias);
      batch_in_group = sizes[0] == 1 && p.batch > 1;
      heads_in_group = sizes[1] == 1 && p.heads > 1;
    }
    pairs_per_group = (batch_in_group ? p.batch : 1) * (heads_in_group ? p.heads : 1);
    groups = p.batch * p.heads / pairs_per_group;
    const int64_t most = std::max<int64_t>(1, std::min(key_blocks, p.kv_len / kMinChunkKeys));
    chunks = std::clamp<int64_t>((kBackwardTargetTasks + groups - 1) / groups, 1, most);
  }

  int64_t count() const { return groups * chunks; }
  int64_t group_of(int64_t task) const { return task / chunks; }
  int64_t chunk_of(int64_t task) const { return task % chunks; }

  // The m-th (b, h) pair of group g, as b * heads + h; the pairs of a group in a fixed order.
  int64_t pair(const AttentionParams& p, int64_t g, int64_t m) const {
    const int64_t group_heads = heads_in_group ? 1 : p.heads;  // groups per batch row
    const int64_t b = batch_in_group ? m / (heads_in_group ? p.heads : 1) : g / group_heads;
    const int64_t h = heads_in_group ? m % p.heads : g % group_heads;
    return b * p.heads + h;
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

// Accumulates dS into the bias gradient, in acc_t, summing over the broadcast dimensions.
// Tasks of different groups, and chunks when the bias does not broadcast over keys, write
// disjoint elements of one copy; when it does, each chunk writes its own copy.
template <typename acc_t>
struct BiasGradAccumulator {
  bool active = false;
  int64_t strides[4] = {0, 0, 0, 0};  // into one copy, zero on broadcast dims
  int64_t copy_numel = 0, copy_stride = 0, copies = 1;
  at::Tensor buffer;  // copies x copy_stride, in acc_t

  BiasGradAccumulator(const AttentionParams& p, const std::optional<at::Tensor>& bias, bool wanted, int64_t chunks) {
    if (!wanted || !p.has_bias) return;
    active = true;
    const auto sizes = bias_sizes_4d(*bias);
    const int64_t full[4] = {p.batch, p.heads, p.q_len, p.kv_len};
    int64_t stride = 1;
    for (int64_t d = 3; d >= 0; --d) {
      strides[d] = sizes[d] == 1 && full[d] != 1 ? 0 : stride;
      stride *= sizes[d];
    }
    copy_numel = stride;
    copies = sizes[3] == 1 && p.kv_len > 1 ? chunks : 1;
    constexpr int64_t line = 64 / sizeof(acc_t);  // copies start on their own cache line
    copy_stride = (copy_numel + line - 1) / line * line;
    buffer = at::zeros({copies * copy_stride}, bias->options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }

  acc_t* copy_for_chunk(int64_t chunk) const {
    return buffer.data_ptr<acc_t>() + (copies > 1 ? chunk * copy_stride : 0);
  }

  void add_tile(acc_t* copy, const acc_t* ds, int64_t ld, int64_t b, int64_t h, int64_t i0, int64_t rows,
                int64_t j0, int64_t cols) const {
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* g = copy + b * strides[0] + h * strides[1] + (i0 + r) * strides[2] + j0 * strides[3];
      const acc_t* d = ds + r * ld;
      for (int64_t c = 0; c < cols; ++c) g[c * strides[3]] += d[c];
    }
  }

  // The copies summed in chunk order, in the bias's dtype and shape.
  at::Tensor result(const at::Tensor& bias) const {
    at::Tensor sum = at::empty({copy_numel}, buffer.options());
    const acc_t* data = buffer.const_data_ptr<acc_t>();
    acc_t* out = sum.data_ptr<acc_t>();
    at::parallel_for(0, copy_numel, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        acc_t total = data[e];
        for (int64_t c = 1; c < copies; ++c) total += data[c * copy_stride + e];
        out[e] = total;
      }
    });
    return sum.to(bias.scalar_type()).view(bias.sizes());
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace qkv
