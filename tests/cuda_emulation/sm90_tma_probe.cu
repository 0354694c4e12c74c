// The TMA descriptors the sm90 forward's launcher builds (make_forward_params, sm90_forward.cuh),
// recorded on a machine without a GPU: cuTensorMapEncodeTiled -- which CuTe calls directly when
// CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL is defined -- is defined here to print its arguments
// instead of encoding them (no driver is linked). tests/test_cuda_sm90_tma.py compiles this with
// nvcc (host code only), feeds it calls as text and checks every descriptor: dims, strides, box
// and swizzle of Q, K and V^T for each head dim and layout.
//
// `probe layouts`: the register-fragment facts the kernel relies on (check_layouts below).
// Otherwise stdin, one call a line: `dtype D B H Hk L S  q_s0 q_s1 q_s2  k_s0 k_s1 k_s2  v_s0 v_s1 v_s2` (element
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

// The register-fragment facts the kernel's softmax and its P V product rely on, from CuTe's own
// layouts (host-evaluable): prints `layouts D=.. ok` or the first few violations.
template <typename Traits>
void check_layouts() {
  using namespace cute;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, D = Traits::kHeadDim;
  typename Traits::TiledMmaQK mma_qk;
  typename Traits::TiledMmaPV mma_pv;
  auto cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});  // S (and P as PV's A): (rows, keys)
  auto cO = make_identity_tensor(Shape<Int<kBlockM>, Int<D>>{});
  int failures = 0;
  auto fail = [&](const char* what, int t, int i, int a0, int a1, int b0, int b1) {
    if (failures++ < 8) std::printf("layouts D=%d: %s: thread %d element %d: (%d, %d) vs (%d, %d)\n", D, what, t, i, a0, a1, b0, b1);
  };
  static int seen_s[kBlockM][kBlockN], lse_writers[kBlockM];
  for (auto& row : seen_s) for (int& x : row) x = 0;
  for (int& x : lse_writers) x = 0;
  for (int t = 0; t < Traits::kConsumerThreads; ++t) {
    Tensor tScS = mma_qk.get_thread_slice(t).partition_C(cS);
    Tensor tOcO = mma_pv.get_thread_slice(t).partition_C(cO);
    Tensor tPcA = mma_pv.get_thread_slice(t).partition_A(cS);  // what the RS wgmma expects in each A register
    // P reuses the S registers: the converted view must name, register for register, the A operand.
    Tensor s_as_a = make_tensor(tScS.data(), sm90::accumulator_as_operand_a(tScS.layout()));
    if (size(s_as_a) != size(tPcA)) fail("P/A sizes", t, 0, int(size(s_as_a)), 0, int(size(tPcA)), 0);
    for (int i = 0; i < int(size(tPcA)); ++i) {
      const int a0 = get<0>(s_as_a(i)), a1 = get<1>(s_as_a(i)), b0 = get<0>(tPcA(i)), b1 = get<1>(tPcA(i));
      if (a0 != b0 || a1 != b1) fail("S register != P V's A operand", t, i, a0, a1, b0, b1);
    }
    // Rows: every value of row r of the (rows, cols) view lies on one query row, the same for S and O.
    Tensor s_rc = make_tensor(tScS.data(), sm90::accumulator_rows_cols(tScS.layout()));
    Tensor o_rc = make_tensor(tOcO.data(), sm90::accumulator_rows_cols(tOcO.layout()));
    for (int r = 0; r < int(size<0>(s_rc)); ++r) {
      const int row = get<0>(s_rc(r, 0));
      for (int c = 0; c < int(size<1>(s_rc)); ++c) {
        if (get<0>(s_rc(r, c)) != row) fail("S row", t, c, get<0>(s_rc(r, c)), 0, row, 0);
      }
      for (int c = 0; c < int(size<1>(o_rc)); ++c) {
        if (get<0>(o_rc(r, c)) != row) fail("O row", t, c, get<0>(o_rc(r, c)), 0, row, 0);
      }
      // The row's quad (lanes t ^ 1, t ^ 2) holds the rest of it: same row, and the max/sum shuffles stay in the warp.
      for (int other : {t ^ 1, t ^ 2, t ^ 3}) {
        Tensor q_rc = make_tensor(mma_qk.get_thread_slice(other).partition_C(cS).data(),
                                  sm90::accumulator_rows_cols(tScS.layout()));
        if (get<0>(q_rc(r, 0)) != row) fail("quad row", t, other, get<0>(q_rc(r, 0)), 0, row, 0);
      }
      if (get<1>(o_rc(r, 0)) == 0) ++lse_writers[row];
    }
    for (int i = 0; i < int(size(tScS)); ++i) ++seen_s[get<0>(tScS(i))][get<1>(tScS(i))];
    // Warpgroup w owns rows [64 w, 64 w + 64): the rows whose Q it reads and whose O it stores.
    for (int i = 0; i < int(size(tOcO)); ++i) {
      if (get<0>(tOcO(i)) / 64 != t / 128) fail("warpgroup rows", t, i, get<0>(tOcO(i)), 0, t / 128, 0);
    }
  }
  for (int r = 0; r < kBlockM; ++r) {
    if (lse_writers[r] != 1) fail("lse writers per row", r, 0, lse_writers[r], 0, 1, 0);
    for (int c = 0; c < kBlockN; ++c) {
      if (seen_s[r][c] != 1) fail("S element owners", r, c, seen_s[r][c], 0, 1, 0);
    }
  }
  std::printf("layouts D=%d %s\n", D, failures ? "FAILED" : "ok");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "layouts") {
    check_layouts<sm90::ForwardTraits<cutlass::bfloat16_t, 64>>();
    check_layouts<sm90::ForwardTraits<cutlass::bfloat16_t, 128>>();
    check_layouts<sm90::ForwardTraits<cutlass::half_t, 64>>();
    check_layouts<sm90::ForwardTraits<cutlass::half_t, 128>>();
    return 0;
  }
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
