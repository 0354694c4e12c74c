// The CUDA kernels of csrc/cuda, compiled for the CPU against cuda_emulator.h and registered as
// torch.ops.qkv_emulated.* on CPU tensors, so tests can run the kernels' own code (indexing,
// tiling, masks, online softmax, dropout replay, backward, tensor-core fragment handling) on
// machines without a GPU. Arguments reach the kernels through the same kernel_args.h helpers as in
// the CUDA launcher; the launch configurations are the kernels' own *Config structs.
#include "cuda_emulator.h"  // first: defines the CUDA built-ins the kernel headers use

#include "cuda/decode_kernels.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/fa2_tiles.cuh"
#include "cuda/generic_kernels.cuh"
#include "cuda/kernel_args.h"
#include "cuda/mma_backward.cuh"
#include "cuda/mma_forward.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

namespace {

using namespace qkv::cuda;
using OptTensor = std::optional<at::Tensor>;

// Issue 17's options as the emulated ops take them (defaults: none). Packed (varlen) calls pass
// q/k/v as the (1, H, total, D) views of the packed tensors and int64 offsets; KV-cache calls the
// caches and int64 key counts per batch element.
struct Options {
  int64_t window_left = -1, window_right = -1;
  double softcap = 0.0;
  OptTensor alibi_slopes, cu_seqlens_q, cu_seqlens_k, kv_lens;
  bool bottom_right = false;

  bool packed() const { return cu_seqlens_q.has_value(); }
  SequenceTensors tensors(const at::Tensor& q) const {
    SequenceTensors t;
    if (alibi_slopes.has_value()) t.alibi_slopes = *alibi_slopes;
    if (packed()) {
      t.cu_seqlens_q = cu_seqlens_q->contiguous();
      t.cu_seqlens_k = cu_seqlens_k->contiguous();
      t.total_q = q.size(2);
    }
    if (kv_lens.has_value()) t.kv_lens = kv_lens->contiguous();
    return t;
  }
};

int64_t longest(const at::Tensor& cu) {
  int64_t m = 0;
  for (int64_t b = 0; b + 1 < cu.size(0); ++b) m = std::max(m, cu[b + 1].item<int64_t>() - cu[b].item<int64_t>());
  return m;
}

// What check_attention_args would produce; the Python side passes the resolved scalars.
qkv::AttentionParams params_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool has_bias,
                               double scale, bool is_causal, int64_t causal_offset, double dropout_p, int64_t seed,
                               const Options& o = {}) {
  qkv::AttentionParams p;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.q_len = q.size(2);
  p.head_dim = q.size(3);
  p.kv_len = k.size(2);
  p.v_head_dim = v.size(3);
  p.scale = scale;
  p.is_causal = is_causal;
  p.causal_offset = causal_offset;
  p.dropout_p = dropout_p;
  p.dropout_seed = static_cast<uint64_t>(seed);
  p.has_bias = has_bias;
  p.kv_heads = k.size(1);
  p.bottom_right = o.bottom_right;
  p.window_left = o.window_left;
  p.window_right = o.window_right;
  p.softcap = o.softcap;
  p.has_alibi = o.alibi_slopes.has_value();
  if (o.packed()) {  // sequences: the offsets' count, lengths: the longest (flash-attn's max_seqlen)
    p.batch = o.cu_seqlens_q->size(0) - 1;
    p.q_len = longest(*o.cu_seqlens_q);
    p.kv_len = longest(*o.cu_seqlens_k);
  }
  return p;
}

at::Tensor token_major(const at::Tensor& like, int64_t last_dim) {
  return at::empty({like.size(0), like.size(2), like.size(1), last_dim}, like.options()).permute({0, 2, 1, 3});
}

at::ScalarType acc_dtype_of(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The fa2 path's kernel string: "fa2" or "fa2-deterministic" (backward only), optionally followed by
// ":<tile>" ("fa2:64x64x4"); without a tile, the head dim's default (for D = 256 the one of a GPU
// whose multiprocessor holds one 128 KB block, as A100).
struct Fa2Choice {
  bool deterministic = false;
  fa2::TileName tile;
};

bool is_fa2(const std::string& kernel) { return kernel.rfind("fa2", 0) == 0; }

Fa2Choice fa2_choice(const std::string& kernel) {
  Fa2Choice choice;
  const size_t colon = kernel.find(':');
  const std::string head = kernel.substr(0, colon);
  TORCH_CHECK(head == "fa2" || head == "fa2-deterministic", "qkv_emulated: unknown fa2 kernel string ", kernel);
  choice.deterministic = head == "fa2-deterministic";
  const std::string tile = colon == std::string::npos ? "" : kernel.substr(colon + 1);
  TORCH_CHECK(fa2::parse_tile_name(tile.c_str(), choice.tile), "qkv_emulated: bad tile name ", tile);
  return choice;
}

// Calls fn(integral_constant<int, D>) for the fa2 head dims.
template <typename Fn>
void with_fa2_head_dim(int64_t d, Fn&& fn) {
  switch (d) {
    case 64: return fn(std::integral_constant<int, 64>{});
    case 96: return fn(std::integral_constant<int, 96>{});
    case 128: return fn(std::integral_constant<int, 128>{});
    case 256: return fn(std::integral_constant<int, 256>{});
  }
  TORCH_CHECK(false, "qkv_emulated: no fa2 kernel for head dim ", d);
}

template <typename Fn>
void with_half_type(ElementType dtype, Fn&& fn) {
  if (dtype == ElementType::Float16) {
    fn(TypeTag<__half>{});
  } else {
    fn(TypeTag<__nv_bfloat16>{});
  }
}

void fa2_forward(const ForwardArgs& args, const Fa2Choice& choice) {
  TORCH_CHECK(fa2::forward_supported(args, 8), "qkv_emulated.forward: the call does not qualify for fa2");
  const bool plain = fa2::forward_is_plain(args);
  with_fa2_head_dim(args.shape.head_dim, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    const fa2::TileName name = choice.tile.given() ? choice.tile : fa2::default_forward_tile<D>(0);
    const bool found = fa2::with_named_tile(typename fa2::ForwardTiles<D>::type{}, name, [&](auto tile) {
      using Choice = decltype(tile);
      with_half_type(args.dtype, [&](auto type) {
        using T = typename decltype(type)::type;
        auto run = [&](auto general) {
          constexpr bool kGeneral = decltype(general)::value;
          using Tile = fa2::ForwardKernelTile<Choice, kGeneral>;
          using Config = fa2::ForwardConfig<D, Tile>;
          qkv_emu::launch(Config::blocks(args.shape), Tile::kThreads, Config::shared_bytes(),
                          [&] { fa2::fa2_forward_kernel<T, D, Tile, kGeneral>(args); });
        };
        if (plain) {
          run(std::false_type{});
        } else {
          run(std::true_type{});
        }
      });
    });
    TORCH_CHECK(found, "qkv_emulated: no fa2 forward tile ", name.str(), " for head dim ", D);
  });
}

// As launch_fa2_backward (fa2_launch.cuh): delta, the dK/dV/dQ kernel, the dQ conversion.
void fa2_backward(BackwardArgs args, const at::Tensor& q, const Fa2Choice& choice) {
  TORCH_CHECK(fa2::backward_supported(args, 8), "qkv_emulated.backward: the call does not qualify for fa2");
  const ProblemShape& p = args.shape;
  const at::Tensor dq_accum = at::zeros({p.batch, p.heads, p.q_len, p.head_dim}, q.options().dtype(at::kFloat));
  const at::Tensor semaphores = at::zeros({fa2::semaphore_count(p)}, q.options().dtype(at::kInt));
  args.dq_accum = dq_accum.data_ptr<float>();
  args.dq_semaphore = choice.deterministic ? semaphores.data_ptr<int>() : nullptr;
  const bool plain = fa2::backward_is_plain(args);
  with_fa2_head_dim(p.head_dim, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    const bool found = fa2::with_named_tile(typename fa2::BackwardTiles<D>::type{}, choice.tile, [&](auto tile) {
      using Tile = decltype(tile);
      using Config = fa2::BackwardConfig<D, Tile>;
      with_half_type(args.dtype, [&](auto type) {
        using T = typename decltype(type)::type;
        if (p.q_len > 0) {
          qkv_emu::launch(DeltaConfig::blocks(p), kThreads, 0, [&] { generic_delta_kernel<T>(args); });
        }
        if (p.kv_len > 0) {
          qkv_emu::launch(Config::blocks(p), Tile::kThreads, Config::shared_bytes(), [&] {
            if (plain) {
              fa2::fa2_backward_kernel<T, D, Tile, false>(args);
            } else {
              fa2::fa2_backward_kernel<T, D, Tile, true>(args);
            }
          });
        }
        if (p.q_len > 0) {
          qkv_emu::launch(fa2::ConvertDqConfig::blocks<D>(p), fa2::ConvertDqConfig::kThreads, 0,
                          [&] { fa2::fa2_convert_dq_kernel<T, D>(args); });
        }
      });
    });
    TORCH_CHECK(found, "qkv_emulated: no fa2 backward tile ", choice.tile.str(), " for head dim ", D);
  });
}

// The split-KV decode forward (decode_kernels.cuh), as the launcher runs it: kernel "split" (the
// heuristic's split count for 132 multiprocessors x kDecodeBlocksPerSmGuess) or "split:N" (N splits).
void split_decode_forward(const ForwardArgs& args, const at::Tensor& q, const std::string& kernel, int64_t max_kv_len) {
  TORCH_CHECK(split_decode_supported(args), "qkv_emulated.forward: the call does not qualify for the split decode");
  const size_t colon = kernel.find(':');
  const int64_t forced = colon == std::string::npos ? 0 : std::stoll(kernel.substr(colon + 1));
  DecodePlan plan = decode_layout(args);
  plan.splits = decode_split_count(args, plan, 132 * kDecodeBlocksPerSmGuess, max_kv_len, forced);
  const at::Tensor workspace = at::empty({decode_workspace_elems(args.shape, plan)}, q.options().dtype(at::kFloat));
  const DecodeArgs d = decode_args(args, plan, workspace.data_ptr<float>());
  decode::dispatch_split_decode(d, [&](auto type, auto rows, auto lanes, auto chunks) {
    using T = typename decltype(type)::type;
    constexpr int R = decltype(rows)::value, LPK = decltype(lanes)::value, CPL = decltype(chunks)::value;
    using Config = decode::SplitConfig<T, R, LPK, CPL>;
    qkv_emu::launch(Config::blocks(d), decode::kThreads, Config::shared_bytes(),
                    [&] { decode::split_decode_kernel<T, R, LPK, CPL>(d); });
    qkv_emu::launch(decode::CombineConfig::blocks(d), decode::CombineConfig::kThreads, 0,
                    [&] { decode::split_decode_combine_kernel<T>(d); });
  });
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const OptTensor& expanded_bias, double scale, bool is_causal,
                                           int64_t causal_offset, double dropout_p, int64_t seed,
                                           const std::string& kernel, int64_t window_left, int64_t window_right,
                                           double softcap, const OptTensor& alibi_slopes,
                                           const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                                           const OptTensor& kv_lens, bool bottom_right) {
  const Options o{window_left, window_right, softcap, alibi_slopes, cu_seqlens_q, cu_seqlens_k, kv_lens, bottom_right};
  const at::Tensor bias = expanded_bias.value_or(at::Tensor());
  const auto p = params_of(q, k, v, bias.defined(), scale, is_causal, causal_offset, dropout_p, seed, o);
  at::Tensor out = token_major(q, p.v_head_dim);
  // (B, H, L); packed: (1, H, total_q), as the launcher's (H, total_q)
  at::Tensor lse = at::empty({q.size(0), p.heads, q.size(2)}, q.options().dtype(acc_dtype_of(q)));
  if (o.packed()) {  // rows of no sequence, as the launcher
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
  }
  const SequenceTensors sequences = o.tensors(q);
  ForwardArgs args = forward_args(p, q, k, v, bias, out, lse);
  set_sequence_tensors(args.shape, sequences);
  if (p.batch * p.heads * p.q_len == 0) return {out, lse};
  if (is_fa2(kernel)) {
    fa2_forward(args, fa2_choice(kernel));
    return {out, lse};
  }
  if (kernel.rfind("split", 0) == 0) {
    split_decode_forward(args, q, kernel, kv_lens.has_value() ? kv_lens->max().item<int64_t>() : p.kv_len);
    return {out, lse};
  }
  if (kernel == "mma") {
    TORCH_CHECK(mma::forward_supported(args, 8), "qkv_emulated.forward: the call does not qualify for mma");
    auto run = [&](auto type, auto dim) {
      using T = typename decltype(type)::type;
      constexpr int D = decltype(dim)::value;
      qkv_emu::launch(mma::ForwardConfig<D>::blocks(args.shape), mma::kThreads, mma::ForwardConfig<D>::shared_bytes(),
                      [&] { mma::mma_forward_kernel<T, D>(args); });
    };
    auto run_dim = [&](auto type) {
      if (p.head_dim == 64) {
        run(type, std::integral_constant<int, 64>{});
      } else {
        run(type, std::integral_constant<int, 128>{});
      }
    };
    if (args.dtype == ElementType::Float16) {
      run_dim(TypeTag<__half>{});
    } else {
      run_dim(TypeTag<__nv_bfloat16>{});
    }
    return {out, lse};
  }
  TORCH_CHECK(kernel == "generic", "qkv_emulated.forward: kernel must be generic, mma, fa2[:tile] or split[:N]");
  const int kc = columns_per_lane(std::max(p.head_dim, p.v_head_dim));
  dispatch_element_type(args.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    dispatch_columns_per_lane(kc, [&](auto kc_constant) {
      constexpr int KC = decltype(kc_constant)::value;
      using Config = ForwardConfig<T, KC>;
      qkv_emu::launch(Config::blocks(args.shape), kThreads, Config::shared_bytes(args.shape),
                      [&] { generic_forward_kernel<T, KC, Config::kRows>(args); });
    });
  });
  return {out, lse};
}

// As the launcher's lse_normalizers (attention_cuda.cpp): the factors the kernels multiply exp(s - lse) by.
at::Tensor lse_normalizers(const qkv::AttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& expanded_bias, const at::Tensor& lse_contiguous,
                           const SequenceTensors& sequences = {}) {
  at::Tensor normalizers = at::empty_like(lse_contiguous);
  if (p.batch * p.heads * p.q_len == 0) return normalizers;
  LseNormalizerArgs args = lse_normalizer_args(p, q, k, expanded_bias, lse_contiguous, normalizers);
  set_sequence_tensors(args.shape, sequences);
  dispatch_element_type(args.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    using Config = WeightsConfig<T>;
    qkv_emu::launch(Config::blocks(args.shape), kThreads, Config::shared_bytes(args.shape),
                    [&] { generic_lse_normalizer_kernel<T, Config::kRows>(args); });
  });
  return normalizers;
}

at::Tensor weights(const at::Tensor& q, const at::Tensor& k, const OptTensor& expanded_bias, const at::Tensor& lse,
                   double scale, bool is_causal, int64_t causal_offset, double dropout_p, int64_t seed,
                   int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes,
                   bool bottom_right) {
  const Options o{window_left, window_right, softcap, alibi_slopes, std::nullopt, std::nullopt, std::nullopt,
                  bottom_right};
  const at::Tensor bias = expanded_bias.value_or(at::Tensor());
  const auto p = params_of(q, k, k, bias.defined(), scale, is_causal, causal_offset, dropout_p, seed, o);
  at::Tensor w = at::empty({p.batch, p.heads, p.q_len, p.kv_len}, q.options());
  if (w.numel() == 0) return w;
  const at::Tensor lse_c = lse.contiguous();
  const SequenceTensors sequences = o.tensors(q);
  const at::Tensor normalizers = lse_normalizers(p, q, k, bias, lse_c, sequences);
  WeightsArgs args = weights_args(p, q, k, bias, lse_c, normalizers, w);
  set_sequence_tensors(args.shape, sequences);
  dispatch_element_type(args.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    using Config = WeightsConfig<T>;
    qkv_emu::launch(Config::blocks(args.shape), kThreads, Config::shared_bytes(args.shape),
                    [&] { generic_weights_kernel<T, Config::kRows>(args); });
  });
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const OptTensor& bias, const OptTensor& expanded_bias, const at::Tensor& out, const at::Tensor& lse,
    double scale, bool is_causal, int64_t causal_offset, double dropout_p, int64_t seed, bool bias_requires_grad,
    const std::string& kernel, int64_t window_left, int64_t window_right, double softcap,
    const OptTensor& alibi_slopes, const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, bool bottom_right) {
  const Options o{window_left, window_right, softcap, alibi_slopes, cu_seqlens_q, cu_seqlens_k, std::nullopt,
                  bottom_right};
  const at::Tensor expanded = expanded_bias.value_or(at::Tensor());
  const auto p = params_of(q, k, v, expanded.defined(), scale, is_causal, causal_offset, dropout_p, seed, o);
  at::Tensor grad_q = token_major(q, p.head_dim), grad_k = token_major(k, p.head_dim);
  at::Tensor grad_v = token_major(v, p.v_head_dim);
  if (o.packed()) {  // rows and keys of no sequence get zeros, as the launcher
    grad_q.zero_();
    grad_k.zero_();
    grad_v.zero_();
  }
  const SequenceTensors sequences = o.tensors(q);
  const bool want_bias_grad = bias_requires_grad && expanded.defined();
  at::Tensor grad_bias = want_bias_grad ? at::empty(bias->sizes(), bias->options()) : at::empty({0}, q.options());
  if (p.batch * p.heads == 0) return {grad_q, grad_k, grad_v, grad_bias.zero_()};
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor delta = at::empty_like(lse_c);
  BiasGradBuffer bias_grad;
  if (want_bias_grad) bias_grad = bias_grad_buffer(*bias, p, acc_dtype_of(q));
  const at::Tensor normalizers = lse_normalizers(p, q, k, expanded, lse_c, sequences);
  BackwardArgs args = backward_args(p, grad_out, q, k, v, expanded, out, lse_c, normalizers, delta, grad_q, grad_k,
                                    grad_v, want_bias_grad ? &bias_grad : nullptr);
  set_sequence_tensors(args.shape, sequences);
  if (is_fa2(kernel)) {
    fa2_backward(args, q, fa2_choice(kernel));
    if (want_bias_grad) grad_bias.copy_(bias_grad.sum.view(bias->sizes()));
    return {grad_q, grad_k, grad_v, grad_bias};
  }
  if (kernel == "mma") {
    TORCH_CHECK(mma::backward_supported(args, 8), "qkv_emulated.backward: the call does not qualify for mma");
    auto run = [&](auto type, auto dim) {
      using T = typename decltype(type)::type;
      constexpr int D = decltype(dim)::value;
      if (p.q_len > 0) {
        qkv_emu::launch(DeltaConfig::blocks(args.shape), kThreads, 0, [&] { generic_delta_kernel<T>(args); });
        using QConfig = mma::GradQueryConfig<D>;
        qkv_emu::launch(QConfig::blocks(args.shape), mma::kThreads, QConfig::shared_bytes(),
                        [&] { mma::mma_grad_query_kernel<T, D>(args); });
      }
      if (p.kv_len > 0) {
        using KVConfig = mma::GradKeyValueConfig<D>;
        qkv_emu::launch(KVConfig::blocks(args.shape), mma::kThreads, KVConfig::shared_bytes(),
                        [&] { mma::mma_grad_key_value_kernel<T, D>(args); });
      }
    };
    auto run_dim = [&](auto type) {
      if (p.head_dim == 64) {
        run(type, std::integral_constant<int, 64>{});
      } else {
        run(type, std::integral_constant<int, 128>{});
      }
    };
    if (args.dtype == ElementType::Float16) {
      run_dim(TypeTag<__half>{});
    } else {
      run_dim(TypeTag<__nv_bfloat16>{});
    }
    return {grad_q, grad_k, grad_v, grad_bias};
  }
  TORCH_CHECK(kernel == "generic", "qkv_emulated.backward: kernel must be generic, mma or fa2[-deterministic][:tile]");
  const int kc = columns_per_lane(std::max(p.head_dim, p.v_head_dim));
  dispatch_element_type(args.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    dispatch_columns_per_lane(kc, [&](auto kc_constant) {
      constexpr int KC = decltype(kc_constant)::value;
      if (p.q_len > 0) {
        qkv_emu::launch(DeltaConfig::blocks(args.shape), kThreads, 0, [&] { generic_delta_kernel<T>(args); });
        using QConfig = GradQueryConfig<T, KC>;
        qkv_emu::launch(QConfig::blocks(args.shape), kThreads, QConfig::shared_bytes(args.shape),
                        [&] { generic_grad_query_kernel<T, KC, QConfig::kRows>(args); });
      }
      if (p.kv_len > 0) {
        using KVConfig = GradKeyValueConfig<T, KC>;
        qkv_emu::launch(KVConfig::blocks(args.shape), kThreads, KVConfig::shared_bytes(args.shape),
                        [&] { generic_grad_key_value_kernel<T, KC, KVConfig::kRows>(args); });
      }
    });
  });
  if (want_bias_grad) grad_bias.copy_(bias_grad.sum.view(bias->sizes()));
  return {grad_q, grad_k, grad_v, grad_bias};
}

// A toy kernel for testing the emulator itself: thread t writes slot t of shared memory, then reads
// slot t + 1. Without the barrier in between, the read races with the neighbour's write.
__global__ void barrier_probe_kernel(float* result, bool with_barrier) {
  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  float* slots = reinterpret_cast<float*>(smem_bytes);
  const int t = static_cast<int>(threadIdx.x);
  slots[t] = static_cast<float>(t + 1);
  if (with_barrier) __syncthreads();
  result[t] = slots[(t + 1) % 128];
}

at::Tensor barrier_probe(bool with_barrier) {
  at::Tensor result = at::empty({128}, at::TensorOptions().dtype(at::kFloat));
  float* data = result.data_ptr<float>();
  qkv_emu::launch(1, 128, 128 * sizeof(float), [&] { barrier_probe_kernel(data, with_barrier); });
  return result;
}

// A toy kernel for testing the emulated ldmatrix against the emulated mma: one warp computes
// C = A B (A 16x16, B 16x8, float16) four times, loading the fragments by four routes: x4 / x2
// from A and B^T stored row-major; x4.trans / x2.trans from A^T and B stored row-major; x1 one
// matrix at a time; x2.trans for A and x1.trans for B. results: (4, 16, 8) float.
__global__ void ldmatrix_probe_kernel(const uint16_t* a, const uint16_t* b, float* results) {
  QKV_DYNAMIC_SHARED_MEMORY(smem_bytes);
  uint16_t* a_rows = reinterpret_cast<uint16_t*>(smem_bytes);  // A[m][k], 16 x 16
  uint16_t* a_cols = a_rows + 256;                              // A^T[k][m]
  uint16_t* b_cols = a_cols + 256;                              // B^T[n][k], 8 x 16
  uint16_t* b_rows = b_cols + 128;                              // B[k][n], 16 x 8
  const int lane = static_cast<int>(threadIdx.x);
  for (int e = lane; e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    a_rows[e] = a[e];
    a_cols[c * 16 + r] = a[e];
  }
  for (int e = lane; e < 128; e += 32) {
    const int k = e / 8, n = e % 8;
    b_rows[e] = b[e];
    b_cols[n * 16 + k] = b[e];
  }
  __syncwarp();
  const int quad = lane / 8, r8 = lane % 8;
  uint32_t frag_a[4][4], frag_b[4][2];
  // 1: A x4 (rows + 8 (quad & 1), k chunk quad >> 1), B x2 (B^T rows r8, k chunk quad & 1)
  fa2::ldmatrix_x4<false>(frag_a[0], fa2::shared_address(a_rows + (r8 + 8 * (quad & 1)) * 16 + 8 * (quad >> 1)));
  fa2::ldmatrix_x2<false>(frag_b[0], fa2::shared_address(b_cols + r8 * 16 + 8 * (quad & 1)));
  // 2: A^T x4.trans (k rows r8 + 8 (quad >> 1), m chunk quad & 1), B x2.trans (k rows r8 + 8 (quad & 1))
  fa2::ldmatrix_x4<true>(frag_a[1], fa2::shared_address(a_cols + (r8 + 8 * (quad >> 1)) * 16 + 8 * (quad & 1)));
  fa2::ldmatrix_x2<true>(frag_b[1], fa2::shared_address(b_rows + (r8 + 8 * (quad & 1)) * 8));
  // 3: x1 per matrix (lanes 0-7 give the rows)
  for (int i = 0; i < 4; ++i) {
    uint32_t r[1];
    fa2::ldmatrix_x1<false>(r, fa2::shared_address(a_rows + (r8 + 8 * (i & 1)) * 16 + 8 * (i >> 1)));
    frag_a[2][i] = r[0];
  }
  for (int i = 0; i < 2; ++i) {
    uint32_t r[1];
    fa2::ldmatrix_x1<false>(r, fa2::shared_address(b_cols + r8 * 16 + 8 * i));
    frag_b[2][i] = r[0];
  }
  // 4: A^T x2.trans twice (m halves), B x1.trans twice (k halves)
  for (int half = 0; half < 2; ++half) {
    uint32_t r[2];
    // matrices (k 0-7), (k 8-15) of m half `half`
    fa2::ldmatrix_x2<true>(r, fa2::shared_address(a_cols + (r8 + 8 * (quad & 1)) * 16 + 8 * half));
    frag_a[3][half] = r[0];
    frag_a[3][half + 2] = r[1];
    uint32_t rb[1];
    fa2::ldmatrix_x1<true>(rb, fa2::shared_address(b_rows + (r8 + 8 * half) * 8));
    frag_b[3][half] = rb[0];
  }
  const int g = lane / 4, t = lane % 4;
  for (int route = 0; route < 4; ++route) {
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    mma::Mma<__half>::run(c, frag_a[route], frag_b[route][0], frag_b[route][1]);
    for (int e = 0; e < 4; ++e) results[route * 128 + (g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = c[e];
  }
}

at::Tensor ldmatrix_probe(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == at::kHalf && b.scalar_type() == at::kHalf && a.dim() == 2 && b.dim() == 2 &&
                  a.size(0) == 16 && a.size(1) == 16 && b.size(0) == 16 && b.size(1) == 8,
              "ldmatrix_probe: a (16, 16) and b (16, 8) float16");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor results = at::empty({4, 16, 8}, a.options().dtype(at::kFloat));
  const auto* a_bits = reinterpret_cast<const uint16_t*>(ac.const_data_ptr());
  const auto* b_bits = reinterpret_cast<const uint16_t*>(bc.const_data_ptr());
  float* out = results.data_ptr<float>();
  qkv_emu::launch(1, 32, 2 * (256 + 256 + 128 + 128), [&] { ldmatrix_probe_kernel(a_bits, b_bits, out); });
  return results;
}

// The fa2 shared tiles' swizzled byte addresses (fa2::SmemTile::address, tile base 0): one per
// 16-byte chunk, (rows, cols / 8) int64, for the tile shapes the fa2 kernels use.
at::Tensor swizzle_probe(int64_t rows, int64_t cols) {
  at::Tensor out = at::empty({rows, cols / 8}, at::TensorOptions().dtype(at::kLong));
  bool found = false;
  auto try_shape = [&](auto r, auto c) {
    constexpr int R = decltype(r)::value, C = decltype(c)::value;
    if (found || rows != R || cols != C) return;
    found = true;
    auto a = out.accessor<int64_t, 2>();
    for (int row = 0; row < R; ++row) {
      for (int chunk = 0; chunk < C / 8; ++chunk) a[row][chunk] = fa2::SmemTile<R, C>::address(0, row, chunk);
    }
  };
  using std::integral_constant;
  [&]<int... Rs>(std::integer_sequence<int, Rs...>) {
    ((try_shape(integral_constant<int, Rs>{}, integral_constant<int, 64>{}),
      try_shape(integral_constant<int, Rs>{}, integral_constant<int, 96>{}),
      try_shape(integral_constant<int, Rs>{}, integral_constant<int, 128>{}),
      try_shape(integral_constant<int, Rs>{}, integral_constant<int, 256>{})),
     ...);
  }(std::integer_sequence<int, 32, 64, 128>{});
  TORCH_CHECK(found, "swizzle_probe: no tile ", rows, " x ", cols);
  return out;
}

}  // namespace

// The split count decode_plan.h's heuristic picks (decode_num_splits).
int64_t decode_splits(int64_t base_blocks, int64_t max_keys, int64_t resident) {
  return decode_num_splits(base_blocks, max_keys, resident);
}

TORCH_LIBRARY(qkv_emulated, m) {
  m.def("decode_splits(int base_blocks, int max_keys, int resident) -> int", &decode_splits);
  m.def("swizzle_probe(int rows, int cols) -> Tensor");
  m.def("barrier_probe(bool with_barrier) -> Tensor");
  m.def("ldmatrix_probe(Tensor a, Tensor b) -> Tensor");
  // Issue 17's options are keyword arguments with "none" defaults (see Options).
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor? expanded_bias, float scale, bool is_causal, "
        "int causal_offset, float dropout_p, int seed, str kernel, int window_left=-1, int window_right=-1, "
        "float softcap=0.0, Tensor? alibi_slopes=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
        "Tensor? kv_lens=None, bool bottom_right=False) -> (Tensor, Tensor)");
  m.def("weights(Tensor q, Tensor k, Tensor? expanded_bias, Tensor lse, float scale, bool is_causal, "
        "int causal_offset, float dropout_p, int seed, int window_left=-1, int window_right=-1, "
        "float softcap=0.0, Tensor? alibi_slopes=None, bool bottom_right=False) -> Tensor");
  m.def("backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? expanded_bias, Tensor out, "
        "Tensor lse, float scale, bool is_causal, int causal_offset, float dropout_p, int seed, "
        "bool bias_requires_grad, str kernel, int window_left=-1, int window_right=-1, float softcap=0.0, "
        "Tensor? alibi_slopes=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
        "bool bottom_right=False) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qkv_emulated, CPU, m) {
  m.impl("forward", &forward);
  m.impl("weights", &weights);
  m.impl("backward", &backward);
}

TORCH_LIBRARY_IMPL(qkv_emulated, CompositeExplicitAutograd, m) {
  m.impl("barrier_probe", &barrier_probe);
  m.impl("ldmatrix_probe", &ldmatrix_probe);
  m.impl("swizzle_probe", &swizzle_probe);
}
