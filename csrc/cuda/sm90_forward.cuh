#pragma once
// The Hopper (sm_90a) forward: wgmma with shared-memory operands, TMA loads on mbarrier pipelines,
// a producer warp and two consumer warpgroups. Written on CUTLASS/CuTe's pieces (TMA copy atoms,
// GMMA MMA atoms, cutlass::PipelineTmaAsync), after the design of FlashAttention-3
// (Dao-AILab/flash-attention hopper/: flash_fwd_kernel_sm90.h, mainloop_fwd_sm90_tma_gmma_ws.hpp,
// softmax.h) and CUTLASS's examples/88_hopper_fmha, for qkv's semantics (sm90_plan.h says which
// calls it serves). Opt-in (QKV_CUDA_KERNEL=sm90) until tests/test_cuda.py passes with it on a GPU.
//
// A block owns kBlockM = 128 query rows of one (batch, head); 384 threads:
//   warpgroup 0, the producer: one thread issues the TMA loads -- the Q tile once, then per key tile
//     (last tile first) K into pipeline_k and V into pipeline_v, kStages = 2 stages each; the other
//     warps of the warpgroup exit at once.
//   warpgroups 1 and 2, the consumers: 64 query rows each (wgmma m64). Per key tile:
//     wait K; S = Q K^T (SS: both operands in shared memory); release K; mask (only tiles that cross
//     the key end or this warpgroup's causal diagonal); online softmax in registers (running max on
//     raw scores, exp2 with the scale folded in, the row max reduced over the 4 threads of a row
//     quad, the row sum kept per thread until the end); P rounded to T in registers; O *= correction;
//     wait V; O += P V (RS: P is the A operand in registers, V^T in shared memory); release V.
//   The epilogue: both consumer warpgroups meet at a named barrier (so every K/V stage is free),
//   normalise O, stage it in the K/V buffers as T (padded rows), and write it with 16-byte stores;
//   the logsumexp is float32, natural log, -inf for a row that sees no key (output 0), exactly as the
//   other qkv forwards, so every backward works from it unchanged.
// Rows past the query end and keys past the key end are zero-filled by TMA (their scores are masked).
//
// Second steps, not here yet (docs/cuda.md, "sm90 forward"):
//   - setmaxnreg (cutlass::arch::warpgroup_reg_dealloc<24> in the producer, warpgroup_reg_alloc<240>
//     in the consumers, right after the role split below): the consumers are held to 168 registers
//     by __launch_bounds__(384, 1) today, which is why D = 128 runs 64-key tiles;
//   - intra-warpgroup overlap (the softmax of tile n during the S GEMM of tile n + 1, as
//     FlashAttention-3's IntraWGOverlap) and ping-pong between the two consumer warpgroups (named
//     barriers around each warpgroup's GEMMs): both go in the consumer loop, `consumer_step`;
//   - a persistent tile scheduler and a TMA store of O.
#include "kernel_params.h"
#include "masking.cuh"  // the fast paths' dense masks: MaskInfo, key_end_for_rows
#include "sm90_plan.h"  // TmaView

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/pipeline.hpp>
// (after the pipeline headers, as CUTLASS's own collectives include it)
#include <cutlass/gemm/collective/builders/sm90_common.inl>

#include <cmath>
#include <cstdint>

namespace qkv::cuda::sm90 {

using namespace cute;

// float16 / bfloat16 as CUTLASS names them (the same bits as __half / __nv_bfloat16).
template <ElementType E>
struct ElementOf;
template <>
struct ElementOf<ElementType::Float16> {
  using type = cutlass::half_t;
};
template <>
struct ElementOf<ElementType::BFloat16> {
  using type = cutlass::bfloat16_t;
};

// The tensors' shapes as the TMA descriptors see them: (rows, cols, heads, batch) for Q and K,
// (cols, rows, heads, batch) for V^T (sm90_plan.h's TmaView).
using TmaShape = Shape<int32_t, int32_t, int32_t, int32_t>;
using TmaStrideRowMajor = Stride<int64_t, _1, int64_t, int64_t>;
using TmaStrideTransposed = Stride<_1, int64_t, int64_t, int64_t>;

template <typename Element_, int kHeadDim_>
struct ForwardTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;  // 2 consumer warpgroups x 64 rows (wgmma m64)
  // Keys per tile: the consumers hold S (kBlockM x kBlockN / 256 floats per thread), O (kHeadDim / 2)
  // and P; without setmaxnreg they have 168 registers, so D = 128 takes 64 keys.
  static constexpr int kBlockN = kHeadDim == 64 ? 128 : 64;
  static constexpr int kStages = 2;
  static constexpr int kConsumerWarpgroups = kBlockM / 64;
  static constexpr int kConsumerThreads = kConsumerWarpgroups * 128;
  static constexpr int kThreads = kConsumerThreads + 128;  // + the producer warpgroup

  using TileShapeQK = Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>;  // S = Q K^T: (M, N, K = D)
  using TileShapePV = Shape<Int<kBlockM>, Int<kHeadDim>, Int<kBlockN>>;  // O = P V:   (M, N = D, K = keys)
  using AtomLayout = Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>;    // warpgroup w: rows [64 w, 64 w + 64)
  using TiledMmaQK =
      decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, TileShapeQK>(), AtomLayout{}));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TileShapePV, GMMA::Major::K, GMMA::Major::MN>(), AtomLayout{}));

  // Shared tiles in the layouts wgmma reads (128-byte swizzles): Q and K K-major (head dim
  // contiguous), V seen as V^T (D x keys) MN-major, i.e. V's own rows, as TMA copies them.
  using SmemLayoutQ = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kBlockM>, Int<kHeadDim>>(),
      Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kBlockN>, Int<kHeadDim>>(),
      Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutVt = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::MN, Element, Int<kHeadDim>, Int<kBlockN>>(),
      Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{}));

  using TmaQ = decltype(make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), TmaShape{}, TmaStrideRowMajor{}),
      SmemLayoutQ{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}, _1{}));
  using TmaK = decltype(make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), TmaShape{}, TmaStrideRowMajor{}),
      take<0, 2>(SmemLayoutK{}), Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{}));
  using TmaV = decltype(make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), TmaShape{}, TmaStrideTransposed{}),
      take<0, 2>(SmemLayoutVt{}), Shape<Int<kHeadDim>, Int<kBlockN>>{}, _1{}));

  // Bytes each TMA transaction lands (out-of-bounds rows count too: TMA writes them as zeros).
  static constexpr uint32_t kBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesKV = kBlockN * kHeadDim * sizeof(Element);

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename cutlass::PipelineState<kStages>;

  // The epilogue's O staging: row-major T rows padded by 16 bytes (the accumulator fragments' 2-element
  // stores of 8 rows then fall on 8 distinct bank quads; the 16-byte reads of a row are contiguous).
  static constexpr int kOPitch = kHeadDim + 8;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    union {
      struct {
        alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
        alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutVt>, 1024> v;
      } kv;
      alignas(16) Element o[kBlockM * kOPitch];  // after the main loop: every K/V stage is free
    };
    alignas(16) cutlass::arch::ClusterTransactionBarrier barrier_q;
    alignas(16) typename Pipeline::SharedStorage pipeline_k;
    alignas(16) typename Pipeline::SharedStorage pipeline_v;
  };
  // Dynamic shared memory is only 16-byte aligned: 1024 bytes of slack for the 128-byte swizzle's
  // 1024-byte tiles.
  static constexpr size_t kSharedBytes = sizeof(SharedStorage) + 1024;
  static_assert(sizeof(Element) * kBlockM * kOPitch <= sizeof(Element) * (cosize_v<SmemLayoutK> + cosize_v<SmemLayoutVt>),
                "the O staging fits the K/V buffers");
};

// Everything a block needs, by value in the kernel's parameter space (__grid_constant__: the TMA
// descriptors must stay there, the TMA unit reads them by address).
template <typename Traits>
struct ForwardParams {
  typename Traits::TmaQ tma_q;
  typename Traits::TmaK tma_k;
  typename Traits::TmaV tma_v;
  TmaShape shape_q, shape_k, shape_vt;
  ProblemShape shape;  // lengths and the causal mask (masking.cuh reads it)
  void* out = nullptr;
  int64_t out_s0 = 0, out_s1 = 0, out_s2 = 0;
  float* lse = nullptr;  // contiguous (B, H, L)
  int32_t heads = 0, head_group = 1, m_blocks = 0;
  float scale = 1.f;       // natural-log units
  float scale_log2 = 1.f;  // scale * log2(e)
};

// The kernel's parameters for a call sm90_plan.h accepted: the TMA descriptors of Q, K and V^T
// (CuTe's make_tma_copy, which calls cuTensorMapEncodeTiled through the runtime's driver entry point:
// no -lcuda) over the views sm90_plan.h describes. Host code; tests/cuda_emulation/sm90_tma_probe.cu
// records the descriptors it builds, without a GPU.
template <typename Traits>
ForwardParams<Traits> make_forward_params(const ForwardArgs& args) {
  using Element = typename Traits::Element;
  const ProblemShape& p = args.shape;
  const int64_t kv_heads = p.heads / head_group(p);
  const TmaView q = tma_view(args.q.data, args.q.s0, args.q.s1, args.q.s2, p.batch, p.heads, p.q_len, p.head_dim);
  const TmaView k = tma_view(args.k.data, args.k.s0, args.k.s1, args.k.s2, p.batch, kv_heads, p.kv_len, p.head_dim);
  const TmaView v = tma_view(args.v.data, args.v.s0, args.v.s1, args.v.s2, p.batch, kv_heads, p.kv_len, p.head_dim);
  auto i32 = [](int64_t x) { return static_cast<int32_t>(x); };

  ForwardParams<Traits> params;
  params.shape_q = TmaShape{i32(q.rows), i32(q.cols), i32(q.heads), i32(q.batch)};
  params.shape_k = TmaShape{i32(k.rows), i32(k.cols), i32(k.heads), i32(k.batch)};
  params.shape_vt = TmaShape{i32(v.cols), i32(v.rows), i32(v.heads), i32(v.batch)};
  Tensor mQ = make_tensor(make_gmem_ptr(static_cast<Element const*>(q.data)), params.shape_q,
                          TmaStrideRowMajor{q.row_stride, _1{}, q.head_stride, q.batch_stride});
  Tensor mK = make_tensor(make_gmem_ptr(static_cast<Element const*>(k.data)), params.shape_k,
                          TmaStrideRowMajor{k.row_stride, _1{}, k.head_stride, k.batch_stride});
  Tensor mVt = make_tensor(make_gmem_ptr(static_cast<Element const*>(v.data)), params.shape_vt,
                           TmaStrideTransposed{_1{}, v.row_stride, v.head_stride, v.batch_stride});
  params.tma_q = make_tma_copy(SM90_TMA_LOAD{}, mQ, typename Traits::SmemLayoutQ{},
                               Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>{}, _1{});
  params.tma_k = make_tma_copy(SM90_TMA_LOAD{}, mK, take<0, 2>(typename Traits::SmemLayoutK{}),
                               Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>{}, _1{});
  params.tma_v = make_tma_copy(SM90_TMA_LOAD{}, mVt, take<0, 2>(typename Traits::SmemLayoutVt{}),
                               Shape<Int<Traits::kHeadDim>, Int<Traits::kBlockN>>{}, _1{});

  params.out = args.out.data;
  params.out_s0 = args.out.s0;
  params.out_s1 = args.out.s1;
  params.out_s2 = args.out.s2;
  params.lse = static_cast<float*>(args.lse);
  params.shape = p;
  params.heads = i32(p.heads);
  params.head_group = i32(head_group(p));
  params.m_blocks = i32((p.q_len + Traits::kBlockM - 1) / Traits::kBlockM);
  params.scale = static_cast<float>(p.scale);
  params.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  return params;
}

// ---- register-fragment views (the layout algebra of FlashAttention-3's utils.h) -----------------
// Host and device: tests/cuda_emulation/sm90_tma_probe.cu checks them against CuTe's partitions.

// The wgmma accumulator layout ((2, 2, N / 8), MMA_M, MMA_N) as (rows = (2, MMA_M), cols = (2, N / 8, MMA_N)):
// a thread's values of one row are (r, _).
template <typename Layout0>
CUTE_HOST_DEVICE constexpr auto accumulator_rows_cols(Layout0 acc) {
  static_assert(decltype(rank<0>(acc))::value == 3 && decltype(rank(acc))::value == 3);
  static_assert(decltype(size<0, 0>(acc))::value == 2 && decltype(size<0, 1>(acc))::value == 2);
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)), make_layout(get<0, 0>(acc), get<0, 2>(acc), get<2>(acc)));
}

// The S accumulator ((2, 2, N / 8), MMA_M, MMA_N) as the A operand of the P V wgmma for 16-bit
// types: ((2, 2, 2), MMA_M, (N / 16, MMA_N)): each k16 slice of P is two n8 column blocks of S.
template <typename Layout0>
CUTE_HOST_DEVICE constexpr auto accumulator_as_operand_a(Layout0 acc) {
  auto l = logical_divide(get<0, 2>(acc), Tile<_2>{});  // ((2, N / 16))
  return make_layout(make_layout(get<0, 0>(acc), get<0, 1>(acc), get<0, 0>(l)), get<1>(acc),
                     coalesce(make_layout(get<0, 1>(l), get<2>(acc))));
}

// One warpgroup GEMM: C (+)= A B over every k block of A and B, then wait for it to complete.
// A is shared-memory descriptors (SS) or registers (RS); C stays in registers.
template <bool kZeroInit, typename TiledMma, typename TensorA, typename TensorB, typename TensorC>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& mma, TensorA& a, TensorB const& b, TensorC& c) {
  constexpr bool kRegistersA = !cute::is_base_of<GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>::value;
  if constexpr (kRegistersA) warpgroup_fence_operand(a);
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
  if constexpr (kRegistersA) warpgroup_fence_operand(a);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Named barriers among the consumers (id 0 is __syncthreads').
enum : uint32_t { kBarrierConsumers = 1, kBarrierWarpgroup0 = 2 };
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The block's query tile and (batch, head); causal grids start the heaviest tiles first.
struct BlockCoord {
  int32_t m_block, h, b;
};
template <typename Params>
__device__ __forceinline__ BlockCoord block_coord(const Params& p) {
  const int32_t tile = static_cast<int32_t>(blockIdx.x % static_cast<uint32_t>(p.m_blocks));
  const int32_t bh = static_cast<int32_t>(blockIdx.x / static_cast<uint32_t>(p.m_blocks));
  return {p.shape.is_causal ? p.m_blocks - 1 - tile : tile, bh % p.heads, bh / p.heads};
}

// Key tiles a block of query rows [row0, row0 + kBlockM) visits: [0, n_blocks).
template <int kBlockM, int kBlockN>
__device__ __forceinline__ int32_t key_blocks(const ProblemShape& p, int64_t row0) {
  const int64_t rows_end = row0 + kBlockM < p.q_len ? row0 + kBlockM : p.q_len;
  return static_cast<int32_t>((key_end_for_rows(p, rows_end) + kBlockN - 1) / kBlockN);
}

// A coordinate of a TMA view: 0 along a collapsed (size-1) dimension.
__device__ __forceinline__ int32_t tma_coordinate(int32_t index, int32_t extent) { return extent == 1 ? 0 : index; }

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    sm90_forward_kernel(CUTE_GRID_CONSTANT ForwardParams<Traits> const params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  using SharedStorage = typename Traits::SharedStorage;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename Traits::PipelineState;

  extern __shared__ char smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + uintptr_t{1023}) & ~uintptr_t{1023});

  const int warpgroup = cutlass::canonical_warp_group_idx();
  const int thread = static_cast<int>(threadIdx.x);
  const BlockCoord coord = block_coord(params);
  const int64_t row0 = int64_t{coord.m_block} * kBlockM;
  const int32_t n_blocks = key_blocks<kBlockM, kBlockN>(params.shape, row0);

  if (thread == 0) {
    prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
    prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
    smem.barrier_q.init(1);
  }
  // Both pipelines: thread 0 is the producer's leader (it issues every TMA load); each of the 256
  // consumer threads releases a stage after its own warpgroup's wgmma on it has completed.
  typename Pipeline::Params pipeline_params;
  pipeline_params.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = thread == 0;
  pipeline_params.num_consumers = Traits::kConsumerThreads;
  pipeline_params.transaction_bytes = Traits::kBytesKV;
  Pipeline pipeline_k(smem.pipeline_k, pipeline_params, Shape<_1, _1, _1>{});
  Pipeline pipeline_v(smem.pipeline_v, pipeline_params, Shape<_1, _1, _1>{});
  cutlass::arch::fence_barrier_init();
  __syncthreads();  // the barriers are initialised before anyone waits on them; no block-wide barrier after this

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.kv.k.data()), typename Traits::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(smem.kv.v.data()), typename Traits::SmemLayoutVt{});

  if (warpgroup == 0) {
    // ---- producer ----------------------------------------------------------------------------
    // (setmaxnreg: cutlass::arch::warpgroup_reg_dealloc<24>() goes here, for the whole warpgroup.)
    if (thread != 0 || n_blocks == 0) return;
    const int32_t kh = coord.h / params.head_group;
    Tensor mQ = params.tma_q.get_tma_tensor(params.shape_q)(
        _, _, tma_coordinate(coord.h, get<2>(params.shape_q)), tma_coordinate(coord.b, get<3>(params.shape_q)));
    Tensor mK = params.tma_k.get_tma_tensor(params.shape_k)(
        _, _, tma_coordinate(kh, get<2>(params.shape_k)), tma_coordinate(coord.b, get<3>(params.shape_k)));
    Tensor mVt = params.tma_v.get_tma_tensor(params.shape_vt)(
        _, _, tma_coordinate(kh, get<2>(params.shape_vt)), tma_coordinate(coord.b, get<3>(params.shape_vt)));
    Tensor gQ = local_tile(mQ, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(coord.m_block, _0{}));  // (M, D)
    Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));  // (N, D, n)
    Tensor gVt = local_tile(mVt, Shape<Int<kHeadDim>, Int<kBlockN>>{}, make_coord(_0{}, _));  // (D, N, n)
    auto tma_q = params.tma_q.get_slice(_0{});
    auto tma_k = params.tma_k.get_slice(_0{});
    auto tma_v = params.tma_v.get_slice(_0{});
    Tensor tQgQ = group_modes<0, 3>(tma_q.partition_S(gQ));    // (TMA)
    Tensor tQsQ = group_modes<0, 3>(tma_q.partition_D(sQ));    // (TMA)
    Tensor tKgK = group_modes<0, 3>(tma_k.partition_S(gK));    // (TMA, n)
    Tensor tKsK = group_modes<0, 3>(tma_k.partition_D(sK));    // (TMA, stage)
    Tensor tVgVt = group_modes<0, 3>(tma_v.partition_S(gVt));  // (TMA, n)
    Tensor tVsVt = group_modes<0, 3>(tma_v.partition_D(sVt));  // (TMA, stage)

    using BarrierType = cutlass::arch::ClusterTransactionBarrier::ValueType;
    smem.barrier_q.arrive_and_expect_tx(Traits::kBytesQ);
    copy(params.tma_q.with(reinterpret_cast<BarrierType&>(smem.barrier_q)), tQgQ, tQsQ);
    PipelineState write = cutlass::make_producer_start_state<Pipeline>();
    for (int32_t n = n_blocks - 1; n >= 0; --n) {  // the consumers' order: the masked tiles first
      pipeline_k.producer_acquire(write);
      copy(params.tma_k.with(*pipeline_k.producer_get_barrier(write)), tKgK(_, n), tKsK(_, write.index()));
      pipeline_v.producer_acquire(write);
      copy(params.tma_v.with(*pipeline_v.producer_get_barrier(write)), tVgVt(_, n), tVsVt(_, write.index()));
      ++write;
    }
    return;  // the consumers wait for every load this thread issued before they finish
  }

  // ---- consumers ---------------------------------------------------------------------------------
  // (setmaxnreg: cutlass::arch::warpgroup_reg_alloc<240>() goes here.)
  const int consumer = thread - 128;           // 0..255
  const int consumer_warpgroup = warpgroup - 1;  // 0 or 1: rows [64 w, 64 w + 64) of the block
  typename Traits::TiledMmaQK mma_qk;
  typename Traits::TiledMmaPV mma_pv;
  // The shared-memory operands are the same descriptors for every thread of a warpgroup.
  auto wg_mma_qk = mma_qk.get_slice(consumer_warpgroup * 128);
  auto wg_mma_pv = mma_pv.get_slice(consumer_warpgroup * 128);
  Tensor tSrQ = wg_mma_qk.partition_fragment_A(sQ);    // (MMA, MMA_M, MMA_K)
  Tensor tSrK = wg_mma_qk.partition_fragment_B(sK);    // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrV = wg_mma_pv.partition_fragment_B(sVt);   // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrO = partition_fragment_C(mma_pv, select<0, 1>(typename Traits::TileShapePV{}));  // (MMA, MMA_M, MMA_N)
  clear(tOrO);
  // Each accumulator element's (row, column) in the block's tile, from CuTe's own layouts.
  auto thr_mma_qk = mma_qk.get_thread_slice(consumer);
  auto thr_mma_pv = mma_pv.get_thread_slice(consumer);
  Tensor tScS = thr_mma_qk.partition_C(make_identity_tensor(select<0, 1>(typename Traits::TileShapeQK{})));
  Tensor tOcO = thr_mma_pv.partition_C(make_identity_tensor(select<0, 1>(typename Traits::TileShapePV{})));

  constexpr int kRows = 2;  // rows of S/O per thread: (2, MMA_M = 1)
  float row_max[kRows], row_sum[kRows];
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  const float scale_log2 = params.scale_log2;
  const int64_t wg_row0 = row0 + 64 * consumer_warpgroup;  // this warpgroup's first query row
  const MaskInfo mask = mask_of(params.shape);

  if (n_blocks > 0) {
    smem.barrier_q.wait(0);
    PipelineState read;
    for (int32_t n = n_blocks - 1; n >= 0; --n) {
      const int64_t j0 = int64_t{n} * kBlockN;
      // ---- S = Q K^T ----
      Tensor tSrS = partition_fragment_C(mma_qk, select<0, 1>(typename Traits::TileShapeQK{}));
      pipeline_k.consumer_wait(read);
      warpgroup_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, read.index()), tSrS);
      pipeline_k.consumer_release(read);

      // ---- masks: keys past the end; under a causal mask, keys past this row's diagonal ----
      // (Rows past the query end are masked too when a tile needs the test; they are never stored.)
      const bool crosses_end = j0 + kBlockN > mask.kv_len;
      const bool crosses_diagonal = mask.is_causal && j0 + kBlockN - 1 > wg_row0 + mask.causal_offset;
      if (crosses_end || crosses_diagonal) {
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < size(tSrS); ++e) {
          if (!mask.visible(row0 + get<0>(tScS(e)), j0 + get<1>(tScS(e)))) tSrS(e) = -INFINITY;
        }
      }

      // ---- online softmax (max on raw scores; p = exp2(s * scale log2 e - max * scale log2 e)) ----
      Tensor s = make_tensor(tSrS.data(), accumulator_rows_cols(tSrS.layout()));  // (rows, cols)
      Tensor o = make_tensor(tOrO.data(), accumulator_rows_cols(tOrO.layout()));
      static_assert(decltype(size<0>(s))::value == kRows && decltype(size<0>(o))::value == kRows);
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) {
        float tile_max = -INFINITY;
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < size<1>(s); ++c) tile_max = fmaxf(tile_max, s(r, c));
        const float old_max = row_max[r];
        const float new_max = fmaxf(old_max, quad_max(tile_max));
        row_max[r] = new_max;
        // 0 while the row has seen no key: exp2(-inf - 0) = 0, never exp2(-inf + inf).
        const float base = new_max == -INFINITY ? 0.f : new_max * scale_log2;
        const float correction = exp2f(fmaf(old_max, scale_log2, -base));
        float sum = 0.f;
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < size<1>(s); ++c) {
          const float p = exp2f(fmaf(s(r, c), scale_log2, -base));
          s(r, c) = p;
          sum += p;
        }
        row_sum[r] = row_sum[r] * correction + sum;  // this thread's share; the quad is summed at the end
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < size<1>(o); ++c) o(r, c) *= correction;
      }

      // ---- O += P V: P rounded to T, in registers, as the A operand ----
      Tensor p_float = make_tensor(tSrS.data(), accumulator_as_operand_a(tSrS.layout()));
      Tensor tOrP = make_tensor_like<Element>(p_float);
      {
        // Pairs converted in place: both views share one layout, so pair i is the same two elements.
        static_assert(cute::is_same_v<decltype(p_float.layout()), decltype(tOrP.layout())>);
        Tensor from = recast<cutlass::Array<float, 2> const>(p_float);
        Tensor to = recast<cutlass::Array<Element, 2>>(tOrP);
        cutlass::NumericArrayConverter<Element, float, 2> convert;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(from); ++i) to(i) = convert(from(i));
      }
      pipeline_v.consumer_wait(read);
      warpgroup_gemm<false>(mma_pv, tOrP, tOrV(_, _, _, read.index()), tOrO);
      pipeline_v.consumer_release(read);
      ++read;
    }
  }

  // ---- epilogue ----------------------------------------------------------------------------------
  // Every consumer is past its last wgmma (so K/V are free: nothing else is in flight) before the O
  // staging overwrites them.
  named_barrier_sync(kBarrierConsumers, Traits::kConsumerThreads);
  cutlass::arch::fence_view_async_shared();  // generic-proxy writes to memory the async proxy (TMA, wgmma) used
  Tensor o = make_tensor(tOrO.data(), accumulator_rows_cols(tOrO.layout()));
  Tensor o_coord = make_tensor(tOcO.data(), accumulator_rows_cols(tOcO.layout()));
  const int64_t q_len = params.shape.q_len;
  float* lse = params.lse + (int64_t{coord.b} * params.heads + coord.h) * q_len;
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float total = quad_sum(row_sum[r]);
    const float inv = total == 0.f ? 0.f : 1.f / total;  // a row that sees no key: output 0
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < size<1>(o); ++c) o(r, c) *= inv;
    const int row = get<0>(o_coord(r, 0));
    const int64_t i = row0 + row;
    if (get<1>(o_coord(r, 0)) == 0 && i < q_len) {  // one thread of the row's quad
      lse[i] = total == 0.f ? -INFINITY : row_max[r] * params.scale + log2f(total) * 0.69314718055994531f;
    }
  }
  Element* staged = smem.o;
  CUTLASS_PRAGMA_UNROLL
  for (int e = 0; e < size(tOrO); ++e) {
    staged[get<0>(tOcO(e)) * Traits::kOPitch + get<1>(tOcO(e))] = static_cast<Element>(tOrO(e));
  }
  // Each warpgroup stores its own 64 rows.
  named_barrier_sync(kBarrierWarpgroup0 + consumer_warpgroup, 128);
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  const int wg_thread = consumer % 128;
  Element* out = static_cast<Element*>(params.out) + int64_t{coord.b} * params.out_s0 + int64_t{coord.h} * params.out_s1;
  CUTLASS_PRAGMA_UNROLL
  for (int idx = wg_thread; idx < 64 * kChunks; idx += 128) {
    const int row = 64 * consumer_warpgroup + idx / kChunks, chunk = idx % kChunks;
    const int64_t i = row0 + row;
    if (i < q_len) {
      *reinterpret_cast<uint4*>(out + i * params.out_s2 + chunk * 8) =
          *reinterpret_cast<const uint4*>(staged + row * Traits::kOPitch + chunk * 8);
    }
  }
#else
  __trap();  // sm_90a only: sm90_plan.h refuses every other device
#endif
}

}  // namespace qkv::cuda::sm90
