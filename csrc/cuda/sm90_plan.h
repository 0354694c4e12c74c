#pragma once
// Which calls the sm90a forward (sm90_forward.cuh: wgmma + TMA, Hopper only) serves, and how its
// tensors look to the TMA unit. Plain C++ -- no CUDA, no CuTe -- so attention_cuda.cpp (host
// compiler), the launcher (sm90_forward.cu) and the CPU tests (tests/cuda_emulation/sm90_plan_ops.cpp)
// share one copy.
//
// The kernel is compiled only for sm_90a (an arch-specific cubin: it runs on compute capability 9.0
// exactly, H100/H200) and only when the build's CUDA archs include 9.0 (setup.py, CMakeLists.txt:
// QKV_CUDA_SM90). Opt-in (QKV_CUDA_KERNEL=sm90) until tests/test_cuda.py passes with it on a GPU.
#include "kernel_params.h"

#include <cstdint>
#include <limits>

namespace qkv::cuda::sm90 {

// A (rows, cols, heads, batch) view of a 16-bit tensor as a TMA descriptor sees it (cols has unit
// stride). A dimension of size 1 or stride 0 (a broadcast, e.g. an expanded batch) is described as
// size 1 with a placeholder stride, and the kernel always uses coordinate 0 there; TMA needs
// strides that are nonzero multiples of 16 bytes below 2^40.
struct TmaView {
  const void* data = nullptr;
  int64_t rows = 0, cols = 0, heads = 0, batch = 0;
  int64_t row_stride = 0, head_stride = 0, batch_stride = 0;  // elements
};

constexpr int64_t kElementBytes = 2;                // float16 / bfloat16
constexpr int64_t kStrideQuantum = 16 / kElementBytes;  // TMA strides and base: multiples of 16 bytes
constexpr int64_t kMaxStrideBytes = int64_t{1} << 40;
constexpr int64_t kMaxExtent = std::numeric_limits<int32_t>::max();  // the kernel's coordinates are int32

inline TmaView tma_view(const void* data, int64_t s0, int64_t s1, int64_t s2, int64_t batch, int64_t heads,
                        int64_t rows, int64_t cols) {
  TmaView v;
  v.data = data;
  v.cols = cols;
  auto dim = [](int64_t size, int64_t stride, int64_t& out_size, int64_t& out_stride) {
    const bool collapsed = size == 1 || stride == 0;
    out_size = collapsed ? 1 : size;
    out_stride = collapsed ? kStrideQuantum : stride;
  };
  dim(rows, s2, v.rows, v.row_stride);
  dim(heads, s1, v.heads, v.head_stride);
  dim(batch, s0, v.batch, v.batch_stride);
  return v;
}

// Whether the TMA unit can read `v`: unit column stride (checked by the caller), 16-byte aligned base
// and strides, strides below 2^40 bytes, no stride-0 row dimension over several rows, extents that
// fit the kernel's int32 coordinates.
inline bool tma_readable(const TmaView& v, int64_t declared_rows) {
  const auto address = reinterpret_cast<uintptr_t>(v.data);
  if (address % 16 != 0) return false;
  if (declared_rows > 1 && v.rows == 1) return false;  // rows repeated with stride 0: not a TMA box
  for (int64_t stride : {v.row_stride, v.head_stride, v.batch_stride}) {
    if (stride <= 0 || stride % kStrideQuantum != 0 || stride * kElementBytes >= kMaxStrideBytes) return false;
  }
  return v.rows <= kMaxExtent && v.heads <= kMaxExtent && v.batch <= kMaxExtent;
}

// The reason the sm90 forward does not serve a call, or nullptr when it does. `major`.`minor`: the
// device's compute capability (sm_90a code runs on 9.0 only).
inline const char* forward_refusal(const ForwardArgs& args, int major, int minor) {
  const ProblemShape& p = args.shape;
  if (major != 9 || minor != 0) return "it needs compute capability 9.0 (H100/H200: the kernel is sm_90a code)";
  if (p.window_left >= 0 || (!p.is_causal && p.window_right >= 0) || p.softcap > 0 || p.alibi_slopes != nullptr ||
      p.cu_seqlens_q != nullptr || p.kv_lens != nullptr) {
    return "it has no windows, softcap, ALiBi, packed sequences or KV caches (only grouped key/value heads)";
  }
  if (args.dtype != ElementType::Float16 && args.dtype != ElementType::BFloat16) return "it needs float16 or bfloat16";
  if (p.head_dim != p.v_head_dim || (p.head_dim != 64 && p.head_dim != 128)) {
    return "it needs head_dim == value_head_dim in {64, 128}";
  }
  if (args.bias.data != nullptr) return "it has no bias";
  if (p.dropout_p > 0.0) return "it has no dropout";
  if (!(p.scale > 0.0) || p.scale == std::numeric_limits<double>::infinity()) return "it needs a finite scale > 0";
  if (p.q_len < 1 || p.kv_len < 1) return "it needs at least one query and one key";
  if (p.q_len > kMaxExtent || p.kv_len > kMaxExtent) return "sequences longer than 2^31 - 1";
  const int64_t kv_heads = p.kv_heads > 0 ? p.kv_heads : p.heads;
  if (kv_heads < 1 || p.heads % kv_heads != 0) return "query heads must be a multiple of key/value heads";
  const struct {
    const ConstView4* view;
    int64_t heads, rows;
  } inputs[] = {{&args.q, p.heads, p.q_len}, {&args.k, kv_heads, p.kv_len}, {&args.v, kv_heads, p.kv_len}};
  for (const auto& in : inputs) {
    const ConstView4& t = *in.view;
    if (t.s3 != 1) return "query, key and value need unit-stride rows";
    if (!tma_readable(tma_view(t.data, t.s0, t.s1, t.s2, p.batch, in.heads, in.rows, p.head_dim), in.rows)) {
      return "query, key and value need 16-byte-aligned data and row/head/batch strides that are multiples of 8 "
             "elements (16 bytes), below 2^40 bytes";
    }
  }
  // The output is written in 16-byte chunks.
  const MutableView4& o = args.out;
  const auto out_address = reinterpret_cast<uintptr_t>(o.data);
  if (o.s3 != 1 || out_address % 16 != 0 || o.s0 % kStrideQuantum != 0 || o.s1 % kStrideQuantum != 0 ||
      o.s2 % kStrideQuantum != 0) {
    return "the output needs 16-byte-aligned unit-stride rows";
  }
  return nullptr;
}

inline bool forward_supported(const ForwardArgs& args, int major, int minor) {
  return forward_refusal(args, major, minor) == nullptr;
}

}  // namespace qkv::cuda::sm90
