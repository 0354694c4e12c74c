#pragma once
// Host-side dispatch from run-time (dtype, head-dim bucket) to kernel template arguments.
#include "device_utils.cuh"

#include <c10/util/Exception.h>

#include <type_traits>

namespace qkv::cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename Fn>
void dispatch_element_type(ElementType dtype, Fn&& fn) {
  switch (dtype) {
    case ElementType::Float32: return fn(TypeTag<float>{});
    case ElementType::Float64: return fn(TypeTag<double>{});
    case ElementType::Float16: return fn(TypeTag<__half>{});
    case ElementType::BFloat16: return fn(TypeTag<__nv_bfloat16>{});
  }
  TORCH_CHECK(false, "qkv: unsupported element type for the CUDA kernels");
}

// Columns per lane for the register accumulators: head dims up to 64, 128, 256.
inline int columns_per_lane(int64_t head_dim) {
  TORCH_CHECK(head_dim <= kMaxHeadDim, "qkv: CUDA kernels support head dims up to ", kMaxHeadDim, "; got ",
              head_dim);
  return head_dim <= 64 ? 2 : (head_dim <= 128 ? 4 : 8);
}

template <typename Fn>
void dispatch_columns_per_lane(int kc, Fn&& fn) {
  switch (kc) {
    case 2: return fn(std::integral_constant<int, 2>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 8: return fn(std::integral_constant<int, 8>{});
  }
  TORCH_CHECK(false, "qkv: internal error: no CUDA kernel for ", kc, " columns per lane");
}

}  // namespace qkv::cuda
