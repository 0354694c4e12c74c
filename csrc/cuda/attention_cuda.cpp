// CUDA kernels of the core attention ops, as seen by torch: argument checks and output layouts
// shared with the CPU and Meta kernels (attention_common), the device guard and current stream,
// then plain-data arguments handed to the kernel launchers (*.cu, which include no ATen headers).
//
// Dispatch ("auto"): the fa2 kernels (FlashAttention-2 class: float16/bfloat16, head_dim ==
// v_head_dim in {64, 96, 128, 256}, aligned rows, sm_80+) when the call qualifies, else the older
// tensor-core kernels (mma: head dims 64 and 128, no bias gradient), else the generic kernels.
// Issue 17's options (grouped key/value heads, windows, softcap, ALiBi) and the packed (varlen) and
// KV-cache doors run on the generic kernels. The environment variable QKV_CUDA_KERNEL overrides
// this per call: "generic" always takes the generic kernels, "mma" requires the mma kernels and
// "fa2" the fa2 kernels (an error if the call does not qualify, or has an option only the generic
// kernels implement); tests use each to check every path against the same reference. "sm90" requires
// the Hopper forward (sm90_forward.cuh, sm90_plan.h: wgmma + TMA, compute capability 9.0, builds
// whose archs include 9.0; it also serves grouped key/value heads) and leaves the backward to auto:
// it is opt-in, and auto never takes it, until tests/test_cuda.py passes with it on a GPU. The fa2
// backward adds dQ with atomics (any order) unless torch.use_deterministic_algorithms is on, when
// it adds them in a fixed order.
//
// Decode-shaped calls (q_len <= 16, through qkv.attention or the KV-cache door) can take the
// split-KV decode forward instead (decode_kernels.cuh; opt-in until tests/test_cuda.py passes with
// it on a GPU): QKV_CUDA_DECODE=split takes it for every call it qualifies for (split_decode_supported)
// and leaves the rest to the dispatch above; "split-required" raises for a call that does not
// qualify (for tests); unset or "generic" never takes it. It steps in only where QKV_CUDA_KERNEL is
// auto or generic (a forced mma/fa2 still serves or refuses the call itself). QKV_DECODE_SPLITS=n
// replaces the split-count heuristic (decode_plan.h) for tuning.
#include "../attention_common.h"
#include "../sequence_args.h"
#include "decode_plan.h"
#include "kernel_args.h"
#include "kernel_params.h"
#include "sm90_plan.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace qkv {
namespace {

using namespace qkv::cuda;

void check_cuda_limits(const char* op, const at::Tensor& query, const AttentionParams& p) {
  TORCH_CHECK(query.is_cuda(), op, ": the CUDA kernel got a query on ", query.device());
  TORCH_CHECK(p.head_dim <= kMaxHeadDim && p.v_head_dim <= kMaxHeadDim, op,
              ": on CUDA, head_dim and value_head_dim must be at most ", kMaxHeadDim, "; got ",
              p.head_dim, " and ", p.v_head_dim);
}

enum class KernelChoice { Auto, Generic, Mma, Fa2, Sm90 };

const char* kernel_name(KernelChoice choice) {
  switch (choice) {
    case KernelChoice::Mma: return "mma";
    case KernelChoice::Fa2: return "fa2";
    case KernelChoice::Sm90: return "sm90";
    case KernelChoice::Generic: return "generic";
    default: return "auto";
  }
}

KernelChoice kernel_choice() {
  const char* value = std::getenv("QKV_CUDA_KERNEL");
  if (value == nullptr || std::strcmp(value, "") == 0 || std::strcmp(value, "auto") == 0) return KernelChoice::Auto;
  if (std::strcmp(value, "generic") == 0) return KernelChoice::Generic;
  if (std::strcmp(value, "mma") == 0) return KernelChoice::Mma;
  if (std::strcmp(value, "fa2") == 0) return KernelChoice::Fa2;
  if (std::strcmp(value, "sm90") == 0) return KernelChoice::Sm90;
  TORCH_CHECK(false, "qkv: the environment variable QKV_CUDA_KERNEL must be auto, generic, mma, fa2 or sm90; got '",
              value, "'");
}

enum class DecodeChoice { Generic, Split, SplitRequired };

DecodeChoice decode_choice() {
  const char* value = std::getenv("QKV_CUDA_DECODE");
  if (value == nullptr || std::strcmp(value, "") == 0 || std::strcmp(value, "generic") == 0) return DecodeChoice::Generic;
  if (std::strcmp(value, "split") == 0) return DecodeChoice::Split;
  if (std::strcmp(value, "split-required") == 0) return DecodeChoice::SplitRequired;
  TORCH_CHECK(false, "qkv: the environment variable QKV_CUDA_DECODE must be generic, split or split-required; got '",
              value, "'");
}

// QKV_DECODE_SPLITS: 0 (unset: the heuristic) or a split count in [1, kDecodeMaxSplits].
int64_t forced_decode_splits() {
  const char* value = std::getenv("QKV_DECODE_SPLITS");
  if (value == nullptr || std::strcmp(value, "") == 0) return 0;
  char* end = nullptr;
  const long long n = std::strtoll(value, &end, 10);
  TORCH_CHECK(end != value && *end == '\0' && n >= 1 && n <= kDecodeMaxSplits,
              "qkv: the environment variable QKV_DECODE_SPLITS must be an integer from 1 to ", kDecodeMaxSplits,
              " (or unset for the heuristic); got '", value, "'");
  return n;
}

// The options of a call that only the generic kernels implement, named for the error a forced
// fast path (QKV_CUDA_KERNEL=mma, fa2 or sm90) raises; empty when there are none. The sm90 forward
// serves grouped key/value heads (`grouped_heads_served`).
std::string generic_only_options(const AttentionParams& p, const char* door = nullptr,
                                 bool grouped_heads_served = false) {
  std::ostringstream names;
  const char* sep = "";
  auto add = [&](auto&&... parts) {
    names << sep;
    (names << ... << parts);
    sep = ", ";
  };
  if (door != nullptr) add(door);
  if (p.kv_heads != p.heads && !grouped_heads_served) add("grouped key/value heads (", p.kv_heads, " key heads for ", p.heads, " query heads)");
  if (p.window_left >= 0 || (!p.is_causal && p.window_right >= 0)) {
    add("window_size (", p.window_left, ", ", p.window_right, ")");
  }
  if (p.softcap > 0) add("softcap ", p.softcap);
  if (p.has_alibi) add("alibi_slopes");
  return names.str();
}

// The kernel choice for a call with `options` (generic_only_options): the generic kernels are the
// only ones that implement issue 17's options, so auto takes them, and a forced fast path is an
// error naming the options (never a silent fallback).
KernelChoice resolve_kernel_choice(const char* op, KernelChoice choice, const std::string& options) {
  if (options.empty()) return choice;
  if (choice == KernelChoice::Auto || choice == KernelChoice::Generic) return KernelChoice::Generic;
  TORCH_CHECK(false, op, ": QKV_CUDA_KERNEL=", kernel_name(choice), ", but the ", kernel_name(choice),
              " kernels do not implement ", options, " (only the generic kernels do: set QKV_CUDA_KERNEL=generic)");
}

// The ALiBi slopes (checked on the query's device by check_score_options); the doors add their
// offsets / key counts.
SequenceTensors sequence_tensors(const std::optional<at::Tensor>& alibi_slopes) {
  SequenceTensors t;
  if (alibi_slopes.has_value() && alibi_slopes->defined()) t.alibi_slopes = *alibi_slopes;
  return t;
}
// int64 copies on the query's device of offsets / key counts read (and checked) on the host.
at::Tensor on_device(const std::vector<int64_t>& values, const at::Tensor& query) {
  return at::tensor(values, at::TensorOptions().dtype(at::kLong)).to(query.device(), /*non_blocking=*/false);
}

// Per-row factors for the kernels that rebuild probabilities from a logsumexp (1 except where
// lse lost the log of its row sum: kernel_params.h, LseNormalizerArgs).
at::Tensor lse_normalizers(const AttentionParams& p, const at::Tensor& query, const at::Tensor& key,
                           const at::Tensor& expanded_bias, const at::Tensor& lse_contiguous, cudaStream_t stream,
                           const SequenceTensors& sequences = {}) {
  at::Tensor normalizers = at::empty_like(lse_contiguous);
  LseNormalizerArgs args = lse_normalizer_args(p, query, key, expanded_bias, lse_contiguous, normalizers);
  set_sequence_tensors(args.shape, sequences);
  launch_lse_normalizers(args, stream);
  return normalizers;
}

int device_major(const at::Tensor& t) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  return major;
}

int device_minor(const at::Tensor& t) {
  int minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, t.get_device()));
  return minor;
}

// QKV_CUDA_KERNEL=sm90: the Hopper forward serves the call, or a clear error says why it cannot.
void run_sm90_forward(const ForwardArgs& args, const at::Tensor& query, const at::Tensor& key,
                      const at::Tensor& value, cudaStream_t stream) {
#if defined(QKV_CUDA_SM90)
  const char* refusal = sm90::forward_refusal(args, device_major(query), device_minor(query));
  TORCH_CHECK(refusal == nullptr, "qkv.attention: QKV_CUDA_KERNEL=sm90, but this call does not qualify for the sm90 "
              "(Hopper) forward: ", refusal, "; got ", query.scalar_type(), " on compute capability ",
              device_major(query), ".", device_minor(query), ", head dims ", args.shape.head_dim, "/",
              args.shape.v_head_dim, ", query strides ", query.strides(), ", key strides ", key.strides(),
              ", value strides ", value.strides(), ", scale ", args.shape.scale, ", dropout_p ", args.shape.dropout_p,
              ", bias ", args.bias.data != nullptr ? "given" : "none");
  launch_sm90_forward(args, stream);
#else
  (void)args, (void)key, (void)value, (void)stream;
  TORCH_CHECK(false, "qkv.attention: QKV_CUDA_KERNEL=sm90, but this build of qkv has no sm90 kernels: build with 9.0 "
              "in QKV_CUDA_ARCHS and CUTLASS's headers installed (docs/cuda.md); device ", query.device());
#endif
}

int multiprocessor_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return count;
}

// Runs the split-KV decode forward when QKV_CUDA_DECODE asks for it, `kernel` (the resolved
// QKV_CUDA_KERNEL choice) leaves room for it and the call qualifies; returns whether it ran.
// `max_kv_len`: the most keys a batch element has (the KV-cache door knows its cache_seqlens).
bool run_split_decode(const char* op, const ForwardArgs& args, KernelChoice kernel, const at::Tensor& query,
                      int64_t max_kv_len, cudaStream_t stream) {
  const DecodeChoice choice = decode_choice();
  if (choice == DecodeChoice::Generic || kernel == KernelChoice::Mma || kernel == KernelChoice::Fa2 ||
      kernel == KernelChoice::Sm90) {
    return false;
  }
  const bool qualifies = split_decode_supported(args);
  TORCH_CHECK(qualifies || choice != DecodeChoice::SplitRequired, op,
              ": QKV_CUDA_DECODE=split-required, but this call does not qualify for the split decode forward (it "
              "needs float16/bfloat16/float32, 1 to ", kDecodeMaxQueryRows, " query rows, no dropout, head_dim == "
              "value_head_dim, a multiple of 8 (4 for float32), and key/value rows of unit stride readable in aligned "
              "16-byte chunks); got ", query.scalar_type(), ", ", args.shape.q_len, " query rows, dropout_p ",
              args.shape.dropout_p, ", head dims ", args.shape.head_dim, "/", args.shape.v_head_dim);
  if (!qualifies) return false;
  DecodePlan plan = decode_layout(args);
  const int64_t forced = forced_decode_splits();
  const int64_t resident =
      forced > 0 ? 0 : int64_t{multiprocessor_count(query)} * split_decode_blocks_per_sm(decode_args(args, plan, nullptr));
  plan.splits = decode_split_count(args, plan, resident, max_kv_len, forced);
  const at::Tensor workspace =
      at::empty({decode_workspace_elems(args.shape, plan)}, query.options().dtype(at::kFloat));
  launch_split_decode_forward(decode_args(args, plan, workspace.data_ptr<float>()), stream);
  return true;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias, double dropout_p, bool is_causal, bool bottom_right,
    std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const auto p = check_attention_args("qkv.attention", query, key, value, bias, dropout_p, is_causal,
                                      bottom_right, scale, dropout_seed, window_left, window_right, softcap,
                                      alibi_slopes);
  check_cuda_limits("qkv.attention", query, p);
  const c10::cuda::CUDAGuard device_guard(query.device());
  at::Tensor out = empty_attention_output(query, p);
  at::Tensor lse = empty_logsumexp(query, p);
  if (p.batch * p.heads * p.q_len == 0) return {out, lse};

  const at::Tensor expanded_bias = p.has_bias ? expand_bias(*bias, p) : at::Tensor();
  const SequenceTensors sequences = sequence_tensors(alibi_slopes);
  ForwardArgs args = forward_args(p, query, key, value, expanded_bias, out, lse);
  set_sequence_tensors(args.shape, sequences);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.get_device()).stream();
  const KernelChoice requested = kernel_choice();
  const KernelChoice choice = resolve_kernel_choice(
      "qkv.attention", requested, generic_only_options(p, nullptr, requested == KernelChoice::Sm90));
  if (run_split_decode("qkv.attention", args, choice, query, p.kv_len, stream)) return {out, lse};
  if (choice == KernelChoice::Sm90) {
    run_sm90_forward(args, query, key, value, stream);
    return {out, lse};
  }
  const bool fa2_qualifies =
      (choice == KernelChoice::Auto || choice == KernelChoice::Fa2) && fa2_forward_supported(args, device_major(query));
  if (choice == KernelChoice::Fa2 || fa2_qualifies) {
    TORCH_CHECK(fa2_qualifies,
                "qkv.attention: QKV_CUDA_KERNEL=fa2, but this call does not qualify for the fa2 kernels (they need "
                "float16/bfloat16, head_dim == value_head_dim in {64, 96, 128, 256}, unit-stride rows with "
                "8-element-aligned strides and 16-byte-aligned data, and compute capability 8.0+); got ",
                query.scalar_type(), ", head dims ", p.head_dim, "/", p.v_head_dim, ", query strides ", query.strides(),
                ", key strides ", key.strides(), ", value strides ", value.strides());
    launch_fa2_forward(args, stream);
    return {out, lse};
  }
  const bool use_mma = choice != KernelChoice::Generic && mma_forward_supported(args, device_major(query));
  TORCH_CHECK(use_mma || choice != KernelChoice::Mma,
              "qkv.attention: QKV_CUDA_KERNEL=mma, but this call does not qualify for the tensor-core kernel "
              "(it needs float16/bfloat16, head_dim == value_head_dim in {64, 128}, unit-stride rows with "
              "8-element-aligned strides and 16-byte-aligned data, and compute capability 8.0+); got ",
              query.scalar_type(), ", head dims ", p.head_dim, "/", p.v_head_dim, ", query strides ", query.strides(),
              ", key strides ", key.strides(), ", value strides ", value.strides());
  if (use_mma) {
    launch_mma_forward(args, stream);
  } else {
    launch_generic_forward(args, stream);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& logsumexp,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed, bool bias_requires_grad, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const auto p = check_attention_args("qkv.attention_backward", query, key, value, bias, dropout_p,
                                      is_causal, bottom_right, scale, dropout_seed, window_left, window_right,
                                      softcap, alibi_slopes);
  check_backward_args("qkv.attention_backward", query, grad_out, out, logsumexp, p, dropout_p, dropout_seed);
  check_cuda_limits("qkv.attention_backward", query, p);
  const c10::cuda::CUDAGuard device_guard(query.device());
  at::Tensor grad_q = empty_token_major(query, p.head_dim);
  at::Tensor grad_k = empty_token_major(key, p.head_dim);
  at::Tensor grad_v = empty_token_major(value, p.v_head_dim);
  at::Tensor grad_bias = empty_grad_bias(bias, bias_requires_grad, query);
  const bool want_bias_grad = bias_requires_grad && p.has_bias;
  if (p.batch * p.heads == 0) {
    if (want_bias_grad) grad_bias.zero_();
    return {grad_q, grad_k, grad_v, grad_bias};
  }

  const auto acc_dtype = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lse = logsumexp.contiguous();
  at::Tensor delta = at::empty({p.batch, p.heads, p.q_len}, query.options().dtype(acc_dtype));
  const at::Tensor expanded_bias = p.has_bias ? expand_bias(*bias, p) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.get_device()).stream();
  // The sm90 path is a forward: with QKV_CUDA_KERNEL=sm90 the backward is chosen as with auto.
  const KernelChoice requested = kernel_choice() == KernelChoice::Sm90 ? KernelChoice::Auto : kernel_choice();
  const KernelChoice choice = resolve_kernel_choice("qkv.attention_backward", requested, generic_only_options(p));
  const SequenceTensors sequences = sequence_tensors(alibi_slopes);
  const at::Tensor normalizers = lse_normalizers(p, query, key, expanded_bias, lse, stream, sequences);

  BiasGradBuffer bias_grad;
  if (want_bias_grad) bias_grad = bias_grad_buffer(*bias, p, acc_dtype);
  BackwardArgs args = backward_args(p, grad_out, query, key, value, expanded_bias, out, lse, normalizers, delta, grad_q,
                                    grad_k, grad_v, want_bias_grad ? &bias_grad : nullptr);
  set_sequence_tensors(args.shape, sequences);
  const bool fa2_qualifies =
      (choice == KernelChoice::Auto || choice == KernelChoice::Fa2) && fa2_backward_supported(args, device_major(query));
  if (choice == KernelChoice::Fa2 || fa2_qualifies) {
    TORCH_CHECK(fa2_qualifies,
                "qkv.attention_backward: QKV_CUDA_KERNEL=fa2, but this call does not qualify for the fa2 kernels "
                "(they need float16/bfloat16, head_dim == value_head_dim in {64, 96, 128, 256}, unit-stride rows "
                "with 8-element-aligned strides and 16-byte-aligned data for query, key, value and grad_out, no "
                "gradient for a bias with one key column, and compute capability 8.0+); got ", query.scalar_type(),
                ", head dims ", p.head_dim, "/", p.v_head_dim, ", grad_out strides ", grad_out.strides(),
                ", bias gradient wanted: ", want_bias_grad);
    const at::Tensor dq_accum = at::zeros({p.batch, p.heads, p.q_len, p.head_dim}, query.options().dtype(at::kFloat));
    at::Tensor semaphores;
    if (at::globalContext().deterministicAlgorithms()) {
      semaphores = at::zeros({fa2_backward_semaphores(args.shape)}, query.options().dtype(at::kInt));
      args.dq_semaphore = semaphores.data_ptr<int>();
    }
    args.dq_accum = dq_accum.data_ptr<float>();
    launch_fa2_backward(args, stream);
    if (want_bias_grad) grad_bias.copy_(bias_grad.sum.view(bias->sizes()));
    return {grad_q, grad_k, grad_v, grad_bias};
  }
  const bool use_mma = choice != KernelChoice::Generic && mma_backward_supported(args, device_major(query));
  TORCH_CHECK(use_mma || choice != KernelChoice::Mma,
              "qkv.attention_backward: QKV_CUDA_KERNEL=mma, but this call does not qualify for the tensor-core "
              "kernels (they need float16/bfloat16, head_dim == value_head_dim in {64, 128}, unit-stride rows with "
              "8-element-aligned strides and 16-byte-aligned data for query, key, value and grad_out, no bias "
              "gradient, and compute capability 8.0+); got ", query.scalar_type(), ", head dims ", p.head_dim, "/",
              p.v_head_dim, ", bias gradient wanted: ", want_bias_grad, ", grad_out strides ", grad_out.strides());
  if (use_mma) {
    launch_mma_backward(args, stream);
  } else {
    launch_generic_backward(args, stream);
  }
  if (want_bias_grad) grad_bias.copy_(bias_grad.sum.view(bias->sizes()));
  return {grad_q, grad_k, grad_v, grad_bias};
}

at::Tensor attention_weights_cuda(const at::Tensor& query, const at::Tensor& key,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                  double dropout_p, bool is_causal, bool bottom_right,
                                  std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
                                  bool average_heads, int64_t window_left, int64_t window_right, double softcap,
                                  const std::optional<at::Tensor>& alibi_slopes) {
  const auto p = check_attention_weights_args(query, key, bias, logsumexp, dropout_p, is_causal, bottom_right, scale,
                                              dropout_seed, window_left, window_right, softcap, alibi_slopes);
  check_cuda_limits("qkv.attention_weights", query, p);
  // The weights always take the generic kernels (QKV_CUDA_KERNEL steers attention and its backward).
  const c10::cuda::CUDAGuard device_guard(query.device());
  if (average_heads) {
    // The CPU kernel sums heads in place; here the per-head weights are built, then averaged.
    if (p.heads == 0) return empty_attention_weights(query, p, true).zero_();
    // The seed this call settled on goes along, so none is drawn twice.
    return attention_weights_cuda(query, key, bias, logsumexp, dropout_p, is_causal, bottom_right, scale,
                                  dropout_p > 0.0 ? dropout_seed_tensor(p.dropout_seed) : dropout_seed, false,
                                  window_left, window_right, softcap, alibi_slopes)
        .mean(1);
  }
  at::Tensor weights = empty_attention_weights(query, p, false);
  if (weights.numel() == 0) return weights;
  const at::Tensor lse = logsumexp.contiguous();
  const at::Tensor expanded_bias = p.has_bias ? expand_bias(*bias, p) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.get_device()).stream();
  const SequenceTensors sequences = sequence_tensors(alibi_slopes);
  const at::Tensor normalizers = lse_normalizers(p, query, key, expanded_bias, lse, stream, sequences);
  WeightsArgs args = weights_args(p, query, key, expanded_bias, lse, normalizers, weights);
  set_sequence_tensors(args.shape, sequences);
  launch_generic_weights(args, stream);
  return weights;
}

// ---- the packed (varlen) and KV-cache doors: the generic kernels with per-sequence lengths ------

struct PackedCall {
  AttentionParams p;
  SequenceTensors sequences;
};

// The checked params and the sequences' device arrays of a varlen call (offsets read on the host:
// one copy each way, as the CPU kernels check them).
PackedCall packed_call(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                       int64_t max_seqlen_k, double dropout_p, bool is_causal, bool bottom_right,
                       std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed, int64_t window_left,
                       int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  PackedCall call;
  call.p = check_varlen_args(op, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                             is_causal, bottom_right, scale, dropout_seed, window_left, window_right, softcap,
                             alibi_slopes);
  check_cuda_limits(op, query, call.p);
  const auto cu_q = read_offsets(op, "cu_seqlens_q", cu_seqlens_q, query.size(0), "query", "max_seqlen_q",
                                 max_seqlen_q, "query");
  const auto cu_k = read_offsets(op, "cu_seqlens_k", cu_seqlens_k, key.size(0), "key", "max_seqlen_k", max_seqlen_k,
                                 "key");
  resolve_kernel_choice(op, kernel_choice(), generic_only_options(call.p, "packed sequences (cu_seqlens)"));
  call.sequences = sequence_tensors(alibi_slopes);
  call.sequences.cu_seqlens_q = on_device(cu_q, query);
  call.sequences.cu_seqlens_k = on_device(cu_k, query);
  call.sequences.total_q = query.size(0);
  return call;
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = "qkv.attention_varlen";
  const c10::cuda::CUDAGuard device_guard(query.device());
  const PackedCall call = packed_call(op, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      dropout_p, is_causal, bottom_right, scale, dropout_seed, window_left,
                                      window_right, softcap, alibi_slopes);
  const AttentionParams& p = call.p;
  at::Tensor out = empty_varlen_output(query, p);
  at::Tensor lse = empty_varlen_logsumexp(query);
  // Rows past the last offset belong to no sequence: zeros and -inf, like rows that see nothing.
  out.zero_();
  lse.fill_(-std::numeric_limits<double>::infinity());
  if (p.batch * p.heads * p.q_len == 0) return {out, lse};
  ForwardArgs args = forward_args(p, packed_as_4d(query), packed_as_4d(key), packed_as_4d(value), at::Tensor(),
                                  packed_as_4d(out), lse);
  set_sequence_tensors(args.shape, call.sequences);
  launch_generic_forward(args, c10::cuda::getCurrentCUDAStream(query.get_device()).stream());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = "qkv.attention_varlen_backward";
  const c10::cuda::CUDAGuard device_guard(query.device());
  const PackedCall call = packed_call(op, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      dropout_p, is_causal, bottom_right, scale, dropout_seed, window_left,
                                      window_right, softcap, alibi_slopes);
  const AttentionParams& p = call.p;
  check_varlen_backward_args(op, query, grad_out, out, logsumexp, p, dropout_p, dropout_seed);
  // Rows and keys of no sequence, and keys no query sees, get zero gradients.
  at::Tensor grad_q = at::zeros_like(query, at::MemoryFormat::Contiguous);
  at::Tensor grad_k = at::zeros_like(key, at::MemoryFormat::Contiguous);
  at::Tensor grad_v = at::zeros_like(value, at::MemoryFormat::Contiguous);
  if (p.batch * p.heads == 0) return {grad_q, grad_k, grad_v};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.get_device()).stream();
  const at::Tensor lse = logsumexp.contiguous();
  at::Tensor delta = at::empty_like(lse);
  const at::Tensor q4 = packed_as_4d(query), k4 = packed_as_4d(key);
  const at::Tensor normalizers = lse_normalizers(p, q4, k4, at::Tensor(), lse, stream, call.sequences);
  BackwardArgs args = backward_args(p, packed_as_4d(grad_out), q4, k4, packed_as_4d(value), at::Tensor(),
                                    packed_as_4d(out), lse, normalizers, delta, packed_as_4d(grad_q),
                                    packed_as_4d(grad_k), packed_as_4d(grad_v), nullptr);
  set_sequence_tensors(args.shape, call.sequences);
  launch_generic_backward(args, stream);
  return {grad_q, grad_k, grad_v};
}

std::tuple<at::Tensor, at::Tensor> attention_kvcache_cuda(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, const std::optional<at::Tensor>& cache_seqlens, bool is_causal,
    std::optional<double> scale, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = "qkv.attention_kvcache";
  const c10::cuda::CUDAGuard device_guard(query.device());
  const KvcacheArgs kv = check_kvcache_args(op, query, k_cache, v_cache, key, value, cache_seqlens, is_causal, scale,
                                            window_left, window_right, softcap, alibi_slopes);
  const AttentionParams& p = kv.p;
  check_cuda_limits(op, query, p);
  const KernelChoice choice = resolve_kernel_choice(op, kernel_choice(), generic_only_options(p, "a KV cache"));
  if (key.has_value() && key->defined()) write_into_caches(kv, k_cache, v_cache, *key, *value);
  at::Tensor out = empty_attention_output(query, p);
  at::Tensor lse = empty_logsumexp(query, p);
  if (p.batch * p.heads * p.q_len == 0) return {out, lse};
  SequenceTensors sequences = sequence_tensors(alibi_slopes);
  sequences.kv_lens = on_device(kv.kv_lens, query);
  ForwardArgs args = forward_args(p, query, k_cache, v_cache, at::Tensor(), out, lse);
  set_sequence_tensors(args.shape, sequences);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.get_device()).stream();
  const int64_t max_kv_len = *std::max_element(kv.kv_lens.begin(), kv.kv_lens.end());
  if (run_split_decode(op, args, choice, query, max_kv_len, stream)) return {out, lse};
  launch_generic_forward(args, stream);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv, CUDA, m) {
  m.impl("attention", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("attention_weights", &attention_weights_cuda);
  m.impl("attention_varlen", &attention_varlen_cuda);
  m.impl("attention_varlen_backward", &attention_varlen_backward_cuda);
  m.impl("attention_kvcache", &attention_kvcache_cuda);
}

}  // namespace qkv
