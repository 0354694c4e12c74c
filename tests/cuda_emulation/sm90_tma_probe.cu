// The TMA descriptors the sm90 forward's launcher builds (make_forward_params, sm90_forward.cuh),
// recorded on a machine without a GPU: cuTensorMapEncodeTiled -- which CuTe calls directly when
// CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL is defined -- is defined here to print its arguments
// instead of encoding them (no driver is linked). tests/test_cuda_sm90_tma.py compiles this with
// nvcc (host code only), feeds it calls as text and checks every descriptor: dims, strides, box
// and swizzle of Q, K and V^T for each head dim and layout.
//
// stdin, one call a line: `dtype D B H Hk L S  q_s0 q_s1 q_s2  k_s0 k_s1 k_s2  v_s0 v_s1 v_s2` (element
// strides; the column stride is 1). stdout, per call: `call N`, then one line per descriptor:
// `tma rank=R dims=.. strides=.. box=.. elem=.. swizzle=S`, then `params heads=.. group=.. m_blocks=..`.
#include "cuda/sm90_forward.cuh"

#include <cuda.h>

#include <cstdio>
#include <iostream>
#include <string>

CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap*, CUtensorMapDataType, cuuint32_t rank, void*,
                                        const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                                        const cuuint32_t* elem, CUtensorMapInterleave, CUtensorMapSwizzle swizzle,
                                        CUtensorMapL2promotion, CUtensorMapFloatOOBfill) {
  auto list = [](const char* name, auto* values, unsigned n) {
    std::printf(" %s=", name);
    for (unsigned i = 0; i < n; ++i) std::printf(i ? ",%llu" : "%llu", static_cast<unsigned long long>(values[i]));
  };
  std::printf("tma rank=%u", rank);
  list("dims", dims, rank);
  list("strides", strides, rank - 1);  // bytes, dimensions 1.. (dimension 0 is contiguous)
  list("box", box, rank);
  list("elem", elem, rank);
  std::printf(" swizzle=%d\n", static_cast<int>(swizzle));
  return CUDA_SUCCESS;
}

namespace {

using namespace qkv::cuda;

template <typename Element, int D>
void record(const ForwardArgs& args) {
  const auto params = sm90::make_forward_params<sm90::ForwardTraits<Element, D>>(args);
  std::printf("params heads=%d group=%d m_blocks=%d\n", params.heads, params.head_group, params.m_blocks);
}

}  // namespace

int main() {
  // Base addresses only need the 16-byte alignment sm90_plan.h requires: nothing is read.
  alignas(16) static char memory[64];
  std::string dtype;
  int64_t D, B, H, Hk, L, S;
  int calls = 0;
  while (std::cin >> dtype >> D >> B >> H >> Hk >> L >> S) {
    ForwardArgs args;
    args.dtype = dtype == "float16" ? ElementType::Float16 : ElementType::BFloat16;
    ProblemShape& p = args.shape;
    p.batch = B, p.heads = H, p.kv_heads = Hk, p.q_len = L, p.kv_len = S, p.head_dim = D, p.v_head_dim = D;
    p.scale = 0.125;
    for (ConstView4* view : {&args.q, &args.k, &args.v}) {
      std::cin >> view->s0 >> view->s1 >> view->s2;
      view->s3 = 1;
      view->data = memory;
    }
    args.out = MutableView4{memory, L * H * D, D, H * D, 1};
    std::printf("call %d refusal=%s\n", calls++, sm90::forward_refusal(args, 9, 0) ? "yes" : "none");
    const bool half = args.dtype == ElementType::Float16;
    if (D == 64) {
      half ? record<cutlass::half_t, 64>(args) : record<cutlass::bfloat16_t, 64>(args);
    } else {
      half ? record<cutlass::half_t, 128>(args) : record<cutlass::bfloat16_t, 128>(args);
    }
  }
  return 0;
}
