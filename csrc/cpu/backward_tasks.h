#pragma once
// How the CPU backward splits its work into tasks, and how the results of tasks that share
// an output are summed, in an order fixed by the problem alone: the gradients are the same
// bit for bit whatever the thread count (tests/test_core_threads.py).
//
// A task is (group of (sequence, key/value head) pairs, split of each pair's work). A pair's
// work is every query head that reads its key head against every key block; it splits one of
// two ways (BackwardTasks):
// - by chunks of key blocks (one query head per key head, or grouped heads that cannot split):
//   dK and dV of a key block belong to one task, and dQ sums over key blocks: each chunk adds
//   its blocks into its own partial, and the partials are summed in chunk order (DqPartials);
// - by query heads (grouped-query attention): a task runs every key block for one query head, so
//   it writes its dQ whole (no partials), and dK and dV sum over the heads, block by block in
//   head order (KvBlockSums): a few key blocks wait at a time, where chunks hold an L x D dQ
//   partial per query head of the group and chunk.
// The gradient of a bias with a column per key sums over the pairs that share a bias slice (a
// bias broadcast over batch or heads): those pairs form one group, so one task adds them in
// order (BiasGradAccumulator); chunks cover disjoint keys, and subsets disjoint heads (a bias
// broadcast over heads keeps a pair's heads in one task), so they write disjoint elements. A
// bias with one key column has its own per-chunk sums (RowShiftBiasGrad in attention_cpu.cpp).
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
// A split by query heads that gives fewer tasks than a split by keys is still taken when it
// gives at least this many: one per thread of a 16-thread machine.
constexpr int64_t kBackwardMinTasks = 16;

struct BackwardTasks {
  int64_t sequences = 0, kv_heads = 1;  // the pairs: sequences (with work) x kv_heads
  int64_t pairs_per_group = 1, groups = 0;
  int64_t chunks = 1;   // chunks of key blocks per pair
  int64_t subsets = 1;  // subsets of a pair's query heads: 1 or group_heads (one head each); chunks or subsets is 1
  int64_t group_heads = 1;
  bool sequences_in_group = false, heads_in_group = false;

  // `bias_grad_per_key`: a gradient is wanted for a bias with a column per key (grouped by its
  // broadcast dimensions). `key_blocks`: blocks of the longest sequence's keys.
  BackwardTasks(const AttentionParams& p, int64_t sequences, int64_t kv_heads, const std::optional<at::Tensor>& bias,
                bool bias_grad_per_key, int64_t key_blocks)
      : sequences(sequences), kv_heads(kv_heads), group_heads(p.heads / std::max<int64_t>(kv_heads, 1)) {
    bool bias_grad_over_heads = false;  // query heads of a pair add into the same bias elements
    if (bias_grad_per_key) {
      const BiasGradLayout layout(p, *bias);
      sequences_in_group = layout.sizes[0] == 1 && sequences > 1;
      heads_in_group = layout.sizes[1] == 1 && kv_heads > 1;
      bias_grad_over_heads = layout.sizes[1] == 1 && p.heads > 1;
    }
    pairs_per_group = (sequences_in_group ? sequences : 1) * (heads_in_group ? kv_heads : 1);
    groups = sequences * kv_heads / pairs_per_group;
    const int64_t wanted = (kBackwardTargetTasks + groups - 1) / std::max<int64_t>(groups, 1);
    const int64_t most = std::max<int64_t>(1, std::min(key_blocks, p.kv_len / kMinChunkKeys));
    const int64_t by_keys = std::clamp<int64_t>(wanted, 1, most);
    // A task per query head (KvBlockSums adds their key blocks as they come: a subset of several
    // heads would finish its blocks only with its last head).
    if (group_heads > 1 && !bias_grad_over_heads && wanted > 1 &&
        (group_heads >= by_keys || groups * group_heads >= kBackwardMinTasks)) {
      subsets = group_heads;
    } else {
      chunks = by_keys;
    }
  }

  int64_t splits() const { return chunks * subsets; }
  int64_t count() const { return groups * splits(); }
  int64_t group_of(int64_t task) const { return task / splits(); }
  int64_t chunk_of(int64_t task) const { return chunks > 1 ? task % chunks : 0; }
  int64_t subset_of(int64_t task) const { return subsets > 1 ? task % subsets : 0; }
  // The query heads of a subset, [first, last) among a pair's group_heads.
  std::pair<int64_t, int64_t> heads_of(int64_t subset) const {
    return {subset * group_heads / subsets, (subset + 1) * group_heads / subsets};
  }

  // The m-th pair of group g, as sequence * kv_heads + key head (sequence: an index into the
  // sequences with work); the pairs of a group in a fixed order.
  int64_t pair(int64_t g, int64_t m) const {
    const int64_t per_sequence = heads_in_group ? 1 : kv_heads;  // groups per sequence
    const int64_t seq = sequences_in_group ? m / (heads_in_group ? kv_heads : 1) : g / per_sequence;
    const int64_t kh = heads_in_group ? m % kv_heads : g % per_sequence;
    return seq * kv_heads + kh;
  }
};

// The key blocks of one chunk of a pair's work, visited in ascending order (the first one writes
// the chunk's dQ partial, the later ones add to it).
// - contiguous: blocks [chunk * per, (chunk + 1) * per), for bands bounded on both sides (sliding
//   windows), where every block is seen by about as many queries and a chunk then packs and writes
//   only the queries near its blocks;
// - folded, for every other mask: the blocks are dealt to the chunks back and forth, chunk
//   0 1 .. C-1 C-1 .. 1 0 0 1 .., two blocks per chunk in every 2C. Under a causal mask a block's
//   work falls with its index, so each chunk gets one block from either end: equal work. Dealt
//   round-robin (c, c + C, ..), chunk 0 had twice the work of chunk C-1 (8 blocks, 4 chunks), and
//   with as many threads as tasks the backward waited on the big chunks (B1 H8 L2048 on 16 threads:
//   21 units of time instead of 16 in a model of the task queue).
class ChunkBlocks {
 public:
  static ChunkBlocks contiguous(int64_t chunk, int64_t chunks, int64_t blocks) {
    const int64_t per = (blocks + chunks - 1) / chunks;
    return ChunkBlocks(chunk, 0, std::min(blocks, chunk * per), std::min(blocks, (chunk + 1) * per));
  }
  static ChunkBlocks folded(int64_t chunk, int64_t chunks, int64_t blocks) {
    return ChunkBlocks(chunk, chunks, std::min(chunk, blocks), blocks);
  }

  bool empty() const { return first_ >= end_; }
  int64_t first() const { return first_; }
  int64_t end() const { return end_; }  // past the last block: next() of the last one
  int64_t next(int64_t kb) const {
    if (chunks_ == 0) return kb + 1;
    const int64_t period = 2 * chunks_;
    const int64_t n = kb % period == chunk_ ? kb + period - 1 - 2 * chunk_ : kb + 2 * chunk_ + 1;
    return std::min(n, end_);
  }
  int64_t last() const {
    int64_t kb = first_;
    for (int64_t n = next(kb); n < end_; n = next(n)) kb = n;
    return kb;
  }
  // The position of block kb among the chunk's blocks; below ceil(blocks / chunks).
  int64_t index(int64_t kb) const {
    if (chunks_ == 0) return kb - first_;
    const int64_t period = 2 * chunks_;
    return 2 * (kb / period) + (kb % period == chunk_ ? 0 : 1);
  }

 private:
  ChunkBlocks(int64_t chunk, int64_t chunks, int64_t first, int64_t end)
      : chunk_(chunk), chunks_(chunks), first_(first), end_(end) {}
  int64_t chunk_, chunks_;  // chunks_ == 0: contiguous
  int64_t first_, end_;
};

// Equal-sized buffers of acc_t that tasks take and give back, so that only the work in progress
// holds memory (sizes rounded up to whole cache lines: no two workers write one line).
template <typename acc_t>
class PartialPool {
  struct AlignedDelete {
    void operator()(acc_t* p) const { ::operator delete[](p, std::align_val_t{64}); }
  };

 public:
  using Slice = std::unique_ptr<acc_t, AlignedDelete>;

  explicit PartialPool(int64_t size) : size_((size + kLine - 1) / kLine * kLine) {}

  int64_t size() const { return size_; }

  // An uninitialised buffer.
  Slice take() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!free_.empty()) {
        Slice slice = std::move(free_.back());
        free_.pop_back();
        return slice;
      }
    }
    return Slice(static_cast<acc_t*>(::operator new[](size_ * sizeof(acc_t), std::align_val_t{64})));
  }

  void give(Slice slice) {
    if (!slice) return;
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(std::move(slice));
  }

 private:
  static constexpr int64_t kLine = 64 / sizeof(acc_t);
  int64_t size_;
  std::mutex mutex_;
  std::vector<Slice> free_;
};

// The dQ partials of each (b, h) pair's key chunks. The task that finishes a pair's last
// chunk sums its partials in chunk order: the sum does not depend on which task ends last.
// Partials come from a pool and return to it after the sum, so only the pairs in progress
// hold memory.
template <typename acc_t>
class DqPartials {
 public:
  DqPartials(int64_t pairs, int64_t chunks, int64_t rows, int64_t ld)
      : chunks_(chunks), pool_(rows * ld), slots_(pairs * chunks), remaining_(new std::atomic<int64_t>[pairs]) {
    for (int64_t i = 0; i < pairs; ++i) remaining_[i].store(chunks, std::memory_order_relaxed);
  }

  int64_t chunks() const { return chunks_; }

  // An uninitialised partial for (pair, chunk): its first product writes it, see below. Each
  // (pair, chunk) is taken by one task; the summing task reads it after finish() (acq_rel).
  acc_t* take(int64_t pair, int64_t chunk) {
    auto& slot = slots_[pair * chunks_ + chunk];
    slot = pool_.take();
    return slot.get();
  }

  // Called once per (pair, chunk) when its task is done with it: true for the call that
  // completes the pair, whose caller then reads partial(pair, c) for every chunk and calls release().
  bool finish(int64_t pair) { return remaining_[pair].fetch_sub(1, std::memory_order_acq_rel) == 1; }

  const acc_t* partial(int64_t pair, int64_t chunk) const { return slots_[pair * chunks_ + chunk].get(); }

  void release(int64_t pair) {
    for (int64_t c = 0; c < chunks_; ++c) pool_.give(std::move(slots_[pair * chunks_ + c]));
  }

 private:
  using Slice = typename PartialPool<acc_t>::Slice;
  int64_t chunks_;
  PartialPool<acc_t> pool_;
  std::vector<Slice> slots_;  // pair * chunks + chunk
  std::unique_ptr<std::atomic<int64_t>[]> remaining_;
};

// dst = x (first), else dst += x.
template <typename acc_t>
void sum_into(acc_t* dst, const acc_t* x, int64_t n, bool first) {
  if (first) {
    std::copy_n(x, n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] += x[i];
  }
}

// The key and value gradients of grouped-query attention split by query heads (a task per query
// head, BackwardTasks::subsets): every head adds to the dK and dV of every key block of its key
// head. A block's sum is taken in head order, ((h0 + h1) + h2) + ..., however the tasks
// interleave: a task hands in each key block as soon as it is done with it, and the block is
// added at once when every earlier head's is in, else parked (a copy) until they are. Tasks are
// taken in head order and run at the same pace, so few blocks wait: no K- and V-sized partial
// per head. A slot is (pair, key block); the sums live where the caller's `add` puts them (the
// gradients themselves), or in buffers of this class (`own_sums`).
template <typename acc_t>
class KvBlockSums {
 public:
  using Slice = typename PartialPool<acc_t>::Slice;

  KvBlockSums(int64_t slots, int64_t subsets, int64_t block_size, bool own_sums)
      : subsets_(subsets), block_size_(block_size), own_sums_(own_sums), pool_(block_size), slots_(slots) {}

  // Hands in `subset`'s contribution to `slot`, the block_size elements at `block`, and adds it,
  // and any parked ones next in order, by `add(sum, x, first)`: sets the slot's sum to x when
  // `first` (subset 0), else adds x into it; `sum` is this class's buffer with own_sums, else
  // null. Returns true to the one call that adds the slot's last subset: its caller then stores
  // the sum and, with own_sums, calls release(slot). One call at a time adds into a slot.
  template <typename Add>
  bool hand_in(int64_t slot, int64_t subset, const acc_t* block, const Add& add) {
    Slot& state = slots_[slot];
    std::unique_lock<std::mutex> lock(mutex_);
    if (state.adding || state.added != subset) {  // an earlier subset is not in yet: park a copy
      Slice copy = pool_.take();
      std::copy_n(block, block_size_, copy.get());
      if (state.parked.empty()) state.parked.resize(subsets_);
      state.parked[subset] = std::move(copy);
      return false;
    }
    state.adding = true;
    if (own_sums_ && subset == 0) state.sum = pool_.take();
    acc_t* sum = state.sum.get();
    Slice owned;  // the parked copy being added
    const acc_t* next = block;
    for (;;) {
      const bool first = state.added == 0;
      lock.unlock();  // the slot's sum is this call's alone while `adding` is set
      add(sum, next, first);
      lock.lock();
      pool_.give(std::move(owned));
      ++state.added;
      if (state.added == subsets_ || state.parked.empty() || !state.parked[state.added]) break;
      owned = std::move(state.parked[state.added]);
      next = owned.get();
    }
    state.adding = false;
    return state.added == subsets_;
  }

  // The slot's sum with own_sums (else null), for the caller that hand_in() returned true to.
  acc_t* sum(int64_t slot) const { return slots_[slot].sum.get(); }

  void release(int64_t slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    pool_.give(std::move(slots_[slot].sum));
    std::vector<Slice>().swap(slots_[slot].parked);
  }

 private:
  struct Slot {
    int64_t added = 0;  // subsets [0, added) are in the sum
    bool adding = false;
    std::vector<Slice> parked;  // per subset: handed in early, not yet added
    Slice sum;                  // own_sums
  };
  int64_t subsets_, block_size_;
  bool own_sums_;
  PartialPool<acc_t> pool_;
  std::vector<Slot> slots_;
  std::mutex mutex_;  // guards slots_' bookkeeping
};

// Accumulates dS into the gradient of a bias with a column per key, in acc_t, summing over the
// broadcast dimensions. Tasks of different groups, chunks and head subsets write disjoint
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
