#pragma once
// Plain-data descriptions of one attention call, shared by the torch-facing launcher
// (attention_cuda.cpp, compiled by the host compiler) and the kernel files (*.cu, which
// include no ATen headers so nvcc stays fast). Every index is int64: B*H*L*S overflows 32 bits.
#if !defined(QKV_CUDA_EMULATION)
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

namespace qkv::cuda {

enum class ElementType : int { Float32, Float64, Float16, BFloat16 };

// A read-only 4-D strided view: element (b, h, row, col) lives at data + b*s0 + h*s1 + row*s2 + col*s3
// (in elements). Broadcast dimensions have stride 0.
struct ConstView4 {
  const void* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
};

struct MutableView4 {
  void* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
};

// The additive bias: an expanded (B, H, L, S) view (data == nullptr when there is none), stored in
// the input dtype or in float32 (`is_float32`; float16/bfloat16 inputs keep masks in float32, where
// 1e5 and -1e9 stay finite). Read it with bias_at (masking.cuh), which handles both.
struct BiasView : ConstView4 {
  bool is_float32 = false;
};

// The canonical problem: query (B, H, L, D), key (B, H, S, D), value (B, H, S, Dv).
struct ProblemShape {
  int64_t batch = 0, heads = 0, q_len = 0, kv_len = 0, head_dim = 0, v_head_dim = 0;
  double scale = 1.0;
  bool is_causal = false;
  int64_t causal_offset = 0;  // key j hidden from query i when j > i + causal_offset
  double dropout_p = 0.0;
  uint64_t dropout_seed = 0;
  uint64_t keep_threshold = 0;  // dropout_threshold(dropout_p)
  double keep_scale = 1.0;      // 1 / (1 - p), or 0 when p == 1

  // The options of issue 17 (docs/flash-attn-api.md), read by the generic kernels only (the mma and
  // fa2 kernels refuse calls that use them: uses_sequence_options).
  int64_t kv_heads = 0;  // query head h reads key/value head h / (heads / kv_heads)
  bool bottom_right = false;  // per-sequence alignment when the sequences have their own lengths
  int64_t window_left = -1, window_right = -1;  // around i + offset; -1 unbounded (causal: right 0)
  double softcap = 0.0;  // s -> softcap * tanh(s / softcap) before ALiBi, the bias and the masks
  const float* alibi_slopes = nullptr;  // -slope[b * alibi_sb + h * alibi_sh] * |i + offset - j|
  int64_t alibi_sb = 0, alibi_sh = 0;
  // Sequences with their own lengths (device int64 arrays; nullptr: every sequence q_len x kv_len):
  // packed (varlen) tensors seen as (1, H, total, D), sequence b on rows cu_seqlens_q[b].. and keys
  // cu_seqlens_k[b].., q_len / kv_len their maxima; or a KV cache, batch b using kv_lens[b] keys.
  const int64_t* cu_seqlens_q = nullptr;
  const int64_t* cu_seqlens_k = nullptr;
  const int64_t* kv_lens = nullptr;
  int64_t packed_q_rows = 0;  // total_q: the rows of the packed tensors (and of the logsumexp)
};

// Whether a call uses anything the mma and fa2 kernels do not implement (grouped heads, a window,
// softcap, ALiBi, per-sequence lengths); such calls run on the generic kernels.
inline bool uses_sequence_options(const ProblemShape& p) {
  return (p.kv_heads != 0 && p.kv_heads != p.heads) || p.window_left >= 0 || (!p.is_causal && p.window_right >= 0) ||
         p.softcap > 0 || p.alibi_slopes != nullptr || p.cu_seqlens_q != nullptr || p.kv_lens != nullptr;
}

struct ForwardArgs {
  ProblemShape shape;
  ElementType dtype = ElementType::Float32;
  ConstView4 q, k, v;
  BiasView bias;
  MutableView4 out;
  void* lse = nullptr;  // contiguous (B, H, L), float (double for float64 inputs)
};

struct WeightsArgs {
  ProblemShape shape;
  ElementType dtype = ElementType::Float32;
  ConstView4 q, k;
  BiasView bias;
  const void* lse = nullptr;  // contiguous (B, H, L) in the accumulation type
  // Contiguous (B, H, L) in the accumulation type: launch_lse_normalizers' factors, or nullptr.
  const void* lse_normalizer = nullptr;
  void* weights = nullptr;    // contiguous (B, H, L, S) in the input dtype
};

// Kernels that rebuild probabilities from the logsumexp take exp(s - lse), which needs lse to the
// precision of the scores' differences. A row whose every score is huge (a Hugging Face mask with
// finfo.min on every key: a softmax over equal finite scores) has lse = max + log(sum) rounded to
// max, and every probability would come out as 1. For rows whose |lse| >= kLargeLse (where lse's
// rounding step exceeds 2^-10) the normalizer kernel recomputes sum_j exp(s_ij - lse_i) and stores
// its inverse, which the kernels multiply the probabilities by; every other row gets 1.
struct LseNormalizerArgs {
  ProblemShape shape;
  ElementType dtype = ElementType::Float32;
  ConstView4 q, k;
  BiasView bias;
  const void* lse = nullptr;  // contiguous (B, H, L) in the accumulation type
  void* normalizer = nullptr;  // contiguous (B, H, L) in the accumulation type, written
};

struct BackwardArgs {
  ProblemShape shape;
  ElementType dtype = ElementType::Float32;
  ConstView4 q, k, v, grad_out, out;
  BiasView bias;
  const void* lse = nullptr;  // contiguous (B, H, L) in the accumulation type
  const void* lse_normalizer = nullptr;  // as in WeightsArgs
  void* delta = nullptr;      // scratch, contiguous (B, H, L) in the accumulation type
  MutableView4 grad_q, grad_k, grad_v;
  // Bias gradient, accumulated atomically in the accumulation type into a zeroed buffer of the
  // bias's own (broadcast) shape; strides are 0 on the dimensions the bias broadcasts over.
  void* grad_bias = nullptr;  // nullptr: not wanted
  int64_t grad_bias_s0 = 0, grad_bias_s1 = 0, grad_bias_s2 = 0, grad_bias_s3 = 0;
  // Scratch of the fa2 backward, allocated by the caller when it takes that path: dQ summed in
  // float32, zeroed, contiguous (B, H, L, head_dim); and for the deterministic order of that sum,
  // fa2_backward_semaphores(shape) zeroed ints (nullptr: atomics in any order).
  float* dq_accum = nullptr;
  int* dq_semaphore = nullptr;
};

// The split-KV ("flash-decoding") forward of decode-shaped calls (decode_kernels.cuh; the plan and
// its qualification test in decode_plan.h): a block per (batch, key/value head, row chunk, split)
// leaves its split's partial softmax state in a float32 workspace, then a combine kernel merges the
// splits into `out` and the logsumexp. Opt-in (QKV_CUDA_DECODE=split) until tests/test_cuda.py
// passes with it on a GPU.
struct DecodeArgs {
  ForwardArgs fwd;
  int rows_per_block = 1;   // query rows of one key/value head a block serves (group * q_len, chunked)
  int64_t row_chunks = 1;   // blocks per (batch, key/value head) for those rows
  int64_t splits = 1;       // key ranges per (batch, key/value head, row chunk)
  int lanes_per_key = 4;    // lanes that share one key row (16-byte chunks of the head dim)
  int chunks_per_lane = 1;  // 16-byte chunks of a key row per lane
  // Workspace, float32, per dense query row (b * H + h) * q_len + i and split s, at row * splits + s:
  // the split's running max and sum of exp(score - max), and its unnormalised output (v_head_dim).
  float* part_max = nullptr;
  float* part_sum = nullptr;
  float* part_out = nullptr;
};

void launch_split_decode_forward(const DecodeArgs& args, cudaStream_t stream);
// Blocks of the split kernel serving `args` (its layout; splits and workspace unused) that one
// multiprocessor of the current device keeps resident (the CUDA occupancy calculator).
int split_decode_blocks_per_sm(const DecodeArgs& args);

// The largest head_dim / v_head_dim the CUDA kernels handle (accumulators live in registers).
constexpr int64_t kMaxHeadDim = 256;

// Generic kernels: every dtype, any strides, head dims up to kMaxHeadDim. Each launcher checks
// the launch and raises a c10::Error on failure.
void launch_generic_forward(const ForwardArgs& args, cudaStream_t stream);
void launch_lse_normalizers(const LseNormalizerArgs& args, cudaStream_t stream);
void launch_generic_weights(const WeightsArgs& args, cudaStream_t stream);
void launch_generic_backward(const BackwardArgs& args, cudaStream_t stream);

// Tensor-core kernels (mma.sync, sm_80+) for float16/bfloat16 with head_dim == v_head_dim in
// {64, 128} and aligned rows; the caller checks the *_supported test first. The backward does not
// produce a bias gradient (calls that want one are not supported).
bool mma_forward_supported(const ForwardArgs& args, int device_major);
void launch_mma_forward(const ForwardArgs& args, cudaStream_t stream);
bool mma_backward_supported(const BackwardArgs& args, int device_major);
void launch_mma_backward(const BackwardArgs& args, cudaStream_t stream);

// The Hopper forward (sm90_forward.cuh; wgmma + TMA, sm_90a code), in builds whose CUDA archs include
// 9.0 (QKV_CUDA_SM90 defined): float16/bfloat16, head_dim == v_head_dim in {64, 128}, no bias, no
// dropout, grouped key/value heads, both causal alignments; sm90_plan.h's forward_refusal says which
// calls it serves. Opt-in (QKV_CUDA_KERNEL=sm90) until tests/test_cuda.py passes with it on a GPU.
void launch_sm90_forward(const ForwardArgs& args, cudaStream_t stream);

// FlashAttention-2-class kernels (fa2_*.cuh; sm_80+) for float16/bfloat16 with head_dim ==
// v_head_dim in {64, 96, 128, 256} and 16-byte-aligned rows, with bias, its gradient, dropout and
// both causal alignments. Opt-in (QKV_CUDA_KERNEL=fa2) until tests/test_cuda.py passes on a GPU.
bool fa2_forward_supported(const ForwardArgs& args, int device_major);
void launch_fa2_forward(const ForwardArgs& args, cudaStream_t stream);
bool fa2_backward_supported(const BackwardArgs& args, int device_major);
int64_t fa2_backward_semaphores(const ProblemShape& shape);
void launch_fa2_backward(const BackwardArgs& args, cudaStream_t stream);

}  // namespace qkv::cuda
