#pragma once
// How the CPU kernels spread their tasks over threads, and how many threads a problem is
// worth. Nothing a task computes may depend on which worker runs it or on how many there
// are: every result is a function of the problem alone (tests/test_core_threads.py).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

namespace qkv {
inline namespace CPU_CAPABILITY {

// What one worker of this copy of the kernels computes per second on the attention tiles
// (float32, one thread, B1 H8 L2048 D64 forward on this project's Xeon: 140 GF/s with
// AVX-512, 73 with AVX2; rounded down).
#if defined(CPU_CAPABILITY_AVX512)
constexpr double kWorkerFlopsPerSecond = 1.2e11;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr double kWorkerFlopsPerSecond = 6e10;
#else
constexpr double kWorkerFlopsPerSecond = 5e9;
#endif

// What each worker costs beyond its share of the work: waking a pool thread and its first
// touch of its scratch. Measured on the 2-core Xeon: at::parallel_for over two workers costs
// 1 us when the OpenMP threads are spinning, 10-50 us when they must be woken.
constexpr double kWorkerSeconds = 5e-6;

// Workers for n tasks totalling `flops`: with w workers a job takes about
// flops / (rate * w) + kWorkerSeconds * w, least at w = sqrt(flops / (rate * kWorkerSeconds)).
// On AVX-512 a problem of 10 us runs on one thread, a decode step (B4 H8 S2048, 140 us) on up
// to 5, B4 H8 L128 (1.1 ms) on up to 15; never more than the tasks or the threads.
inline int64_t worker_count(int64_t n, double flops) {
  const double best = std::sqrt(flops / (kWorkerFlopsPerSecond * kWorkerSeconds));
  const int64_t by_work = best >= 1.0 ? static_cast<int64_t>(std::min(best, 1e9)) : 1;
  return std::min<int64_t>({n, static_cast<int64_t>(at::get_num_threads()), by_work});
}

// A worker's scratch: n value-initialised T, held by the callable make_worker returns (below).
// A type of this copy's namespace, so that the shared_ptr code around it (std:: template
// instances, which the linker keeps once for the whole library) is a different symbol in every
// copy: std::make_shared<std::vector<float>> emitted by the AVX-512 copy alone was kept for all,
// AVX instructions in a function outside the copies (test_only_the_kernel_copies_use_avx).
template <typename T>
struct WorkerScratch : std::vector<T> {
  explicit WorkerScratch(int64_t n) : std::vector<T>(static_cast<size_t>(n)) {}
};
template <typename T>
std::shared_ptr<WorkerScratch<T>> worker_scratch(int64_t n) {
  return std::make_shared<WorkerScratch<T>>(n);
}

// Runs tasks [0, n) on worker_count(n, flops) workers, each taking the next task not yet
// taken: a worker slowed down (a causal block, another process on its core) holds no share
// back. `make_worker(w)` runs once per worker and returns the callable that processes a task
// (so a worker allocates its scratch once).
template <typename MakeWorker>
void for_each_task(int64_t n, double flops, const MakeWorker& make_worker) {
  const int64_t workers = worker_count(n, flops);
  if (workers <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      auto work = make_worker(w);
      for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < n;
           t = next.fetch_add(1, std::memory_order_relaxed)) {
        work(t);
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace qkv
