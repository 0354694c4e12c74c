#pragma once
// A CPU emulation of the few CUDA built-ins the qkv kernels use, so the kernel sources in
// csrc/cuda/*.cuh can be compiled by the host compiler and run on machines without a GPU.
//
// Each CUDA thread of a block is a cooperative fiber (ucontext). A block runs one warp at a time,
// as far as that warp can go on its own -- its lanes round robin, each until it blocks in a barrier
// (__syncthreads, __syncwarp, a shuffle, an mma, an ldmatrix) -- before the next warp starts; even
// blocks take the warps in ascending order, odd blocks in descending order. Running every warp as
// far as it can before the others start is what makes the emulation catch missing barriers: a
// read of shared memory another warp has not written yet (or already overwrote) sees the wrong
// data. Shared memory starts filled with 0xFF bytes (NaN in every float format).
//
// Emulated: threadIdx.x, blockIdx.x, dynamic shared memory, __syncthreads, __syncwarp,
// __shfl_xor_sync (full warps), atomicAdd, __threadfence, __half / __nv_bfloat16 conversions (round
// to nearest even, through c10), mma.sync.m16n8k16 f16/bf16 -> f32 and ldmatrix (x1/x2/x4, .trans)
// with the PTX ISA fragment layouts, cp.async 16-byte copies with zero fill, commit and wait_group,
// and the counter wait of the deterministic fa2 backward.
// cp.async is made as strict as the hardware allows: at issue the destination is poisoned (so a
// read of a buffer whose refill was already started sees garbage), and the data lands only when the
// issuing thread waits for its group (so a read before the wait, or before the barrier after other
// threads' waits, sees garbage too). ldmatrix and cp.async check that their shared addresses lie in
// the block's shared memory and are 16-byte aligned; a kernel that breaks this stops the launch
// with an error naming the check.
// Not emulated: warp divergence (threads of a warp run independently), timing, memory spaces,
// bank conflicts.
#define QKV_CUDA_EMULATION 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define QKV_DYNAMIC_SHARED_MEMORY(name) unsigned char* name = ::qkv_emu::dynamic_shared_memory()

using cudaStream_t = void*;

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.bits, c10::Half::from_bits())); }
inline __half __float2half_rn(float f) { return __half{c10::Half(f).x}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline float __bfloat162float(__nv_bfloat16 b) {
  return static_cast<float>(c10::BFloat16(b.bits, c10::BFloat16::from_bits()));
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{c10::BFloat16(f).x}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

namespace qkv_emu {

constexpr int kWarpSize = 32;

struct Index3 {
  unsigned x, y, z;
};

struct Fiber {
  ucontext_t context;
  bool finished = false;
};

// One thread's cp.async copies that have not landed yet, oldest first, and the sizes of its
// committed groups (copies after the last commit belong to no group yet).
struct PendingCopy {
  unsigned char* dst;
  unsigned char data[16];
};
struct CopyQueue {
  std::vector<PendingCopy> copies;
  std::vector<size_t> group_sizes;
};

// State of the block being run. Blocks run one after another.
struct Block {
  unsigned index = 0;
  int threads = 0, current = 0, live = 0;
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  ucontext_t scheduler;
  std::vector<unsigned char> shared;
  const std::function<void()>* body = nullptr;
  bool progress = false;
  int block_arrived = 0;
  uint64_t block_generation = 0;
  std::vector<int> warp_arrived, warp_live;
  std::vector<uint64_t> warp_generation;
  // Staging for warp-collective operations, two copies used alternately: a lane can only write a
  // copy again after passing the next collective's barrier, i.e. after every lane finished reading.
  std::vector<uint64_t> collectives;  // [thread]: warp-collective operations started, selects the copy
  std::vector<double> shuffle;        // [copy][warp][lane]
  std::vector<uint32_t> mma_a;        // [copy][warp][lane][4]
  std::vector<uint32_t> mma_b;        // [copy][warp][lane][2]
  std::vector<const void*> ldsm_rows;  // [copy][warp][lane]: ldmatrix row addresses
  std::vector<CopyQueue> copy_queues;  // [thread]
  std::string error;                   // set by fail(): the launch stops and throws it
};

inline Block* g_block = nullptr;

inline unsigned char* dynamic_shared_memory() { return g_block->shared.data(); }

inline void yield_to_scheduler() {
  Block& b = *g_block;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

// Stops the calling thread for good and makes the launch throw `message` (exceptions cannot
// unwind through the fibers' stacks).
[[noreturn]] inline void fail(const std::string& message) {
  Block& b = *g_block;
  if (b.error.empty()) b.error = message + " (block " + std::to_string(b.index) + ", thread " +
                                 std::to_string(b.current) + ")";
  b.fibers[b.current].finished = true;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
  std::abort();  // never resumed
}

// The shared-window address (__cvta_generic_to_shared) of a pointer into the block's shared
// memory, and back: byte offsets from the start of the dynamic shared memory.
inline uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - g_block->shared.data());
}
inline unsigned char* shared_pointer(uint32_t address) { return g_block->shared.data() + address; }

// A 16-byte-aligned range of the block's shared memory, or fail().
inline void check_shared_16(const void* address, const char* what) {
  Block& b = *g_block;
  const auto* p = static_cast<const unsigned char*>(address);
  if (p < b.shared.data() || p + 16 > b.shared.data() + b.shared.size() - 16) {
    fail(std::string(what) + ": address outside the block's shared memory");
  }
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail(std::string(what) + ": shared address not 16-byte aligned");
}

inline void block_barrier() {
  Block& b = *g_block;
  const uint64_t generation = b.block_generation;
  b.progress = true;
  if (++b.block_arrived == b.live) {
    b.block_arrived = 0;
    ++b.block_generation;
    return;
  }
  while (b.block_generation == generation) yield_to_scheduler();
}

inline void warp_barrier() {
  Block& b = *g_block;
  const int w = b.current / kWarpSize;
  const uint64_t generation = b.warp_generation[w];
  b.progress = true;
  if (++b.warp_arrived[w] == b.warp_live[w]) {
    b.warp_arrived[w] = 0;
    ++b.warp_generation[w];
    return;
  }
  while (b.warp_generation[w] == generation) yield_to_scheduler();
}

inline void fiber_entry() {
  Block& b = *g_block;
  (*b.body)();
  // A thread that exits no longer takes part in barriers: release any it was the last one for.
  b.fibers[b.current].finished = true;
  b.progress = true;
  const int w = b.current / kWarpSize;
  --b.live;
  --b.warp_live[w];
  if (b.block_arrived > 0 && b.block_arrived == b.live) {
    b.block_arrived = 0;
    ++b.block_generation;
  }
  if (b.warp_arrived[w] > 0 && b.warp_arrived[w] == b.warp_live[w]) {
    b.warp_arrived[w] = 0;
    ++b.warp_generation[w];
  }
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

// Runs `body` (a kernel call) as a grid of `blocks` blocks of `threads` threads.
inline void launch(int64_t blocks, int threads, size_t shared_bytes, const std::function<void()>& body) {
  if (threads % kWarpSize != 0) throw std::runtime_error("qkv_emu: threads must be a multiple of 32");
  constexpr size_t kStackBytes = 256 * 1024;
  Block b;
  b.threads = threads;
  b.body = &body;
  b.fibers.resize(threads);
  b.stacks.assign(threads, std::vector<char>(kStackBytes));
  const int warps = threads / kWarpSize;
  Block* previous = g_block;
  g_block = &b;
  for (int64_t block = 0; block < blocks; ++block) {
    b.index = static_cast<unsigned>(block);
    b.live = threads;
    b.block_arrived = 0;
    b.warp_arrived.assign(warps, 0);
    b.warp_live.assign(warps, kWarpSize);
    b.warp_generation.assign(warps, 0);
    b.collectives.assign(threads, 0);
    b.shuffle.assign(2 * threads, 0.0);
    b.mma_a.assign(2 * threads * 4, 0);
    b.mma_b.assign(2 * threads * 2, 0);
    b.ldsm_rows.assign(2 * threads, nullptr);
    b.copy_queues.assign(threads, CopyQueue{});
    b.shared.assign(shared_bytes + 16, 0xFF);
    for (int t = 0; t < threads; ++t) {
      Fiber& f = b.fibers[t];
      f.finished = false;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = b.stacks[t].data();
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &b.scheduler;
      makecontext(&f.context, fiber_entry, 0);
    }
    const bool descending = block % 2 == 1;
    while (b.live > 0) {
      bool progress = false;
      for (int wi = 0; wi < warps; ++wi) {
        const int w = descending ? warps - 1 - wi : wi;
        for (bool warp_moved = true; warp_moved;) {  // this warp, until it waits for another one
          b.progress = false;
          for (int t = w * kWarpSize; t < (w + 1) * kWarpSize; ++t) {
            if (b.fibers[t].finished) continue;
            b.current = t;
            swapcontext(&b.scheduler, &b.fibers[t].context);
            if (!b.error.empty()) {
              g_block = previous;
              throw std::runtime_error("qkv_emu: " + b.error);
            }
          }
          warp_moved = b.progress;
          progress = progress || b.progress;
        }
      }
      if (!progress && b.live > 0) {
        g_block = previous;
        throw std::runtime_error("qkv_emu: deadlock: threads wait at barriers that the others never reach");
      }
    }
  }
  g_block = previous;
}

// Which staging copy the calling lane's current warp-collective operation uses. Every lane of a
// warp runs the same sequence of collectives, so lanes agree on the copy without talking.
inline int staging_copy() {
  Block& b = *g_block;
  return static_cast<int>(b.collectives[b.current]++ % 2);
}

inline Index3 thread_index() { return Index3{static_cast<unsigned>(g_block->current), 0u, 0u}; }
inline Index3 block_index() { return Index3{g_block->index, 0u, 0u}; }

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, warp-collective. Fragment
// layout from the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"), with
// g = lane / 4, t = lane % 4 and the lower-indexed element in the low 16 bits of each register:
//   A: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..2t+1), a[2] = (g, 2t+8..2t+9), a[3] = (g+8, 2t+8..2t+9)
//   B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C: c[0], c[1] = (g, 2t..2t+1), c[2], c[3] = (g+8, 2t..2t+1)
template <bool kBFloat16>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Block& b = *g_block;
  const int w = b.current / kWarpSize, lane = b.current % kWarpSize;
  const int copy = staging_copy();
  uint32_t* staged_a = &b.mma_a[(copy * b.threads + w * kWarpSize) * 4];
  uint32_t* staged_b = &b.mma_b[(copy * b.threads + w * kWarpSize) * 2];
  for (int r = 0; r < 4; ++r) staged_a[lane * 4 + r] = a[r];
  staged_b[lane * 2 + 0] = b0;
  staged_b[lane * 2 + 1] = b1;
  warp_barrier();
  auto decode = [](uint32_t reg, int high) {
    const auto bits16 = static_cast<uint16_t>(high ? reg >> 16 : reg & 0xffffu);
    return kBFloat16 ? __bfloat162float(__nv_bfloat16{bits16}) : __half2float(__half{bits16});
  };
  // Element (r, k) of A lives in lane 4 * (r % 8) + (k % 8) / 2, register (r / 8) + 2 * (k / 8),
  // half k % 2; element (k, n) of B in lane 4 * n + (k % 8) / 2, register k / 8, half k % 2.
  auto a_at = [&](int r, int k) {
    return decode(staged_a[(4 * (r % 8) + (k % 8) / 2) * 4 + (r / 8) + 2 * (k / 8)], k % 2);
  };
  auto b_at = [&](int k, int n) { return decode(staged_b[(4 * n + (k % 8) / 2) * 2 + k / 8], k % 2); };
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float sum = c[e];
    for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
    c[e] = sum;
  }
}

// cp.async.cg.shared.global [dst], [src], 16, src-size with src-size 16 (valid) or 0 (zero fill):
// the destination is undefined until the group completes (poisoned here), the data lands at the
// issuing thread's wait_group that completes it.
inline void copy_16(void* dst, const void* src, bool valid) {
  check_shared_16(dst, "cp.async destination");
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async: global source not 16-byte aligned");
  PendingCopy copy;
  copy.dst = static_cast<unsigned char*>(dst);
  if (valid) {
    std::memcpy(copy.data, src, 16);
  } else {
    std::memset(copy.data, 0, 16);
  }
  std::memset(dst, 0xFF, 16);
  g_block->copy_queues[g_block->current].copies.push_back(copy);
}

// cp.async.commit_group: the copies issued since the last commit form a group.
inline void copy_commit() {
  CopyQueue& q = g_block->copy_queues[g_block->current];
  size_t grouped = 0;
  for (size_t n : q.group_sizes) grouped += n;
  q.group_sizes.push_back(q.copies.size() - grouped);
}

// cp.async.wait_group pending: completes all but the `pending` most recent committed groups.
inline void copy_wait(int pending) {
  CopyQueue& q = g_block->copy_queues[g_block->current];
  while (q.group_sizes.size() > static_cast<size_t>(pending)) {
    const size_t n = q.group_sizes.front();
    for (size_t c = 0; c < n; ++c) std::memcpy(q.copies[c].dst, q.copies[c].data, 16);
    q.copies.erase(q.copies.begin(), q.copies.begin() + static_cast<std::ptrdiff_t>(n));
    q.group_sizes.erase(q.group_sizes.begin());
  }
}

// ldmatrix.sync.aligned.m8n8.x{kCount}{.trans}.shared.b16, warp-collective. Lanes 8i .. 8i+7 give
// the shared addresses of the 8 rows (16 bytes each) of matrix i (for x1 only lanes 0-7 are read, for x2
// lanes 0-15). Register i of lane l receives, from matrix i, row l/4, columns 2(l%4) and 2(l%4)+1
// -- with .trans rows 2(l%4) and 2(l%4)+1 of column l/4 -- the first in the low 16 bits.
template <int kCount, bool kTrans>
void ldmatrix(uint32_t* regs, uint32_t address) {
  Block& b = *g_block;
  const int w = b.current / kWarpSize, lane = b.current % kWarpSize;
  const int copy = staging_copy();
  const void* row_address = shared_pointer(address);
  if (lane < 8 * kCount) check_shared_16(row_address, "ldmatrix row");
  const void** staged = &b.ldsm_rows[copy * b.threads + w * kWarpSize];
  staged[lane] = row_address;
  warp_barrier();
  auto element = [&](int matrix, int row, int col) {
    return static_cast<uint32_t>(static_cast<const uint16_t*>(staged[8 * matrix + row])[col]);
  };
  for (int i = 0; i < kCount; ++i) {
    const int r = lane / 4, c = 2 * (lane % 4);
    regs[i] = kTrans ? element(i, c, r) | (element(i, c + 1, r) << 16) : element(i, r, c) | (element(i, r, c + 1) << 16);
  }
}

// The deterministic fa2 backward's wait for earlier blocks. Blocks run one after another here, in
// index order, so the counter must already be there: otherwise the kernel waits for a block of
// higher index, which could deadlock a GPU.
inline void wait_counter_at_least(const int* counter, int target) {
  if (*counter < target) {
    fail("counter wait: " + std::to_string(*counter) + " < " + std::to_string(target) +
         ": waits for a block that is not dispatched before this one");
  }
}

}  // namespace qkv_emu

#define threadIdx (::qkv_emu::thread_index())
#define blockIdx (::qkv_emu::block_index())

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

inline void __syncthreads() { ::qkv_emu::block_barrier(); }
inline void __threadfence() {}
inline void __syncwarp(unsigned = 0xffffffffu) { ::qkv_emu::warp_barrier(); }

template <typename V>
V __shfl_xor_sync(unsigned, V value, int lane_mask) {
  ::qkv_emu::Block& b = *::qkv_emu::g_block;
  const int w = b.current / ::qkv_emu::kWarpSize, lane = b.current % ::qkv_emu::kWarpSize;
  double* staged = &b.shuffle[::qkv_emu::staging_copy() * b.threads + w * ::qkv_emu::kWarpSize];
  staged[lane] = static_cast<double>(value);  // exact for float and double
  ::qkv_emu::warp_barrier();
  return static_cast<V>(staged[lane ^ lane_mask]);
}

inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}
inline double atomicAdd(double* address, double value) {
  const double old = *address;
  *address = old + value;
  return old;
}
