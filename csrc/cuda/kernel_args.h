#pragma once
// Tensors -> the plain-data kernel arguments of kernel_params.h. Used by the CUDA launcher
// (attention_cuda.cpp) and by the CPU emulation tests of the kernels (tests/cuda_emulation), so
// both hand the kernels exactly the same views, strides and scalars. No CUDA runtime calls here.
#include "../attention_common.h"
#include "../kernels/dropout_hash.h"
#include "kernel_params.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

namespace qkv::cuda {

inline ElementType element_type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElementType::Float32;
    case at::kDouble: return ElementType::Float64;
    case at::kHalf: return ElementType::Float16;
    case at::kBFloat16: return ElementType::BFloat16;
    default: TORCH_CHECK(false, "qkv: no CUDA kernel for dtype ", t.scalar_type());
  }
}

inline ConstView4 const_view(const at::Tensor& t) {
  return ConstView4{t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

inline MutableView4 mutable_view(const at::Tensor& t) {
  return MutableView4{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The expanded bias (or none, when undefined), in the input dtype or float32.
inline BiasView bias_view(const at::Tensor& expanded_bias) {
  BiasView view;
  if (expanded_bias.defined()) {
    static_cast<ConstView4&>(view) = const_view(expanded_bias);
    view.is_float32 = expanded_bias.scalar_type() == at::kFloat;
  }
  return view;
}

inline ProblemShape shape_of(const AttentionParams& p) {
  ProblemShape s;
  s.batch = p.batch;
  s.heads = p.heads;
  s.q_len = p.q_len;
  s.kv_len = p.kv_len;
  s.head_dim = p.head_dim;
  s.v_head_dim = p.v_head_dim;
  s.scale = p.scale;
  s.is_causal = p.is_causal;
  s.causal_offset = p.causal_offset;
  s.dropout_p = p.dropout_p;
  s.dropout_seed = p.dropout_seed;
  s.keep_threshold = dropout_threshold(p.dropout_p);
  s.keep_scale = p.dropout_p < 1.0 ? 1.0 / (1.0 - p.dropout_p) : 0.0;  // as the CPU kernels
  s.kv_heads = p.kv_heads;
  s.bottom_right = p.bottom_right;
  s.window_left = p.window_left;
  s.window_right = p.window_right;
  s.softcap = p.softcap;
  return s;
}

// The tensors behind issue 17's per-call arrays (ProblemShape): ALiBi slopes (float32 (H,) or
// (B, H)), and for sequences with their own lengths int64 offsets / key counts on the kernels'
// device. Undefined tensors: not used. They must outlive the launch (stream-ordered frees are fine).
struct SequenceTensors {
  at::Tensor alibi_slopes;
  at::Tensor cu_seqlens_q, cu_seqlens_k;  // packed (varlen): batch + 1 offsets each
  int64_t total_q = 0;                    // with cu_seqlens: rows of the packed query
  at::Tensor kv_lens;                     // KV cache: keys used per batch element
};

inline void set_sequence_tensors(ProblemShape& s, const SequenceTensors& t) {
  if (t.alibi_slopes.defined()) {
    s.alibi_slopes = t.alibi_slopes.const_data_ptr<float>();
    s.alibi_sb = t.alibi_slopes.dim() == 2 ? t.alibi_slopes.stride(0) : 0;
    s.alibi_sh = t.alibi_slopes.stride(t.alibi_slopes.dim() - 1);
  }
  if (t.cu_seqlens_q.defined()) {
    s.cu_seqlens_q = t.cu_seqlens_q.const_data_ptr<int64_t>();
    s.cu_seqlens_k = t.cu_seqlens_k.const_data_ptr<int64_t>();
    s.packed_q_rows = t.total_q;
  }
  if (t.kv_lens.defined()) s.kv_lens = t.kv_lens.const_data_ptr<int64_t>();
}

// `expanded_bias`: the (B, H, L, S) stride-0 broadcast view of the bias, or undefined.
inline ForwardArgs forward_args(const AttentionParams& p, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& expanded_bias, const at::Tensor& out,
                                const at::Tensor& lse) {
  ForwardArgs args;
  args.shape = shape_of(p);
  args.dtype = element_type_of(query);
  args.q = const_view(query);
  args.k = const_view(key);
  args.v = const_view(value);
  args.bias = bias_view(expanded_bias);
  args.out = mutable_view(out);
  args.lse = lse.data_ptr();
  return args;
}

inline WeightsArgs weights_args(const AttentionParams& p, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& expanded_bias, const at::Tensor& lse_contiguous,
                                const at::Tensor& lse_normalizer, const at::Tensor& weights) {
  WeightsArgs args;
  args.shape = shape_of(p);
  args.dtype = element_type_of(query);
  args.q = const_view(query);
  args.k = const_view(key);
  args.bias = bias_view(expanded_bias);
  args.lse = lse_contiguous.const_data_ptr();
  args.lse_normalizer = lse_normalizer.const_data_ptr();
  args.weights = weights.data_ptr();
  return args;
}

// `normalizer`: a (B, H, L) tensor in the accumulation type, written by launch_lse_normalizers.
inline LseNormalizerArgs lse_normalizer_args(const AttentionParams& p, const at::Tensor& query, const at::Tensor& key,
                                             const at::Tensor& expanded_bias, const at::Tensor& lse_contiguous,
                                             const at::Tensor& normalizer) {
  LseNormalizerArgs args;
  args.shape = shape_of(p);
  args.dtype = element_type_of(query);
  args.q = const_view(query);
  args.k = const_view(key);
  args.bias = bias_view(expanded_bias);
  args.lse = lse_contiguous.const_data_ptr();
  args.normalizer = normalizer.data_ptr();
  return args;
}

// The bias gradient is summed atomically in the accumulation type into a zeroed buffer of the
// bias's own shape, as 4-D with zero strides where the bias broadcasts (the CPU kernel reduces
// over the same dimensions); the caller copies it into the bias-dtype gradient afterwards.
struct BiasGradBuffer {
  at::Tensor sum;  // (Bb, Hb, Lb, Sb) in the accumulation type
  int64_t strides[4] = {0, 0, 0, 0};
};

inline BiasGradBuffer bias_grad_buffer(const at::Tensor& bias, const AttentionParams& p, at::ScalarType acc_dtype) {
  BiasGradBuffer buffer;
  int64_t sizes[4] = {1, 1, 1, 1};
  const int64_t offset = 4 - bias.dim();
  for (int64_t d = 0; d < bias.dim(); ++d) sizes[offset + d] = bias.size(d);
  buffer.sum = at::zeros({sizes[0], sizes[1], sizes[2], sizes[3]}, bias.options().dtype(acc_dtype));
  const int64_t full[4] = {p.batch, p.heads, p.q_len, p.kv_len};
  for (int d = 0; d < 4; ++d) buffer.strides[d] = sizes[d] == 1 && full[d] != 1 ? 0 : buffer.sum.stride(d);
  return buffer;
}

inline BackwardArgs backward_args(const AttentionParams& p, const at::Tensor& grad_out, const at::Tensor& query,
                                  const at::Tensor& key, const at::Tensor& value, const at::Tensor& expanded_bias,
                                  const at::Tensor& out, const at::Tensor& lse_contiguous,
                                  const at::Tensor& lse_normalizer, const at::Tensor& delta, const at::Tensor& grad_q,
                                  const at::Tensor& grad_k, const at::Tensor& grad_v,
                                  const BiasGradBuffer* grad_bias) {
  BackwardArgs args;
  args.shape = shape_of(p);
  args.dtype = element_type_of(query);
  args.q = const_view(query);
  args.k = const_view(key);
  args.v = const_view(value);
  args.bias = bias_view(expanded_bias);
  args.grad_out = const_view(grad_out);
  args.out = const_view(out);
  args.lse = lse_contiguous.const_data_ptr();
  args.lse_normalizer = lse_normalizer.const_data_ptr();
  args.delta = delta.data_ptr();
  args.grad_q = mutable_view(grad_q);
  args.grad_k = mutable_view(grad_k);
  args.grad_v = mutable_view(grad_v);
  if (grad_bias != nullptr) {
    args.grad_bias = grad_bias->sum.data_ptr();
    args.grad_bias_s0 = grad_bias->strides[0];
    args.grad_bias_s1 = grad_bias->strides[1];
    args.grad_bias_s2 = grad_bias->strides[2];
    args.grad_bias_s3 = grad_bias->strides[3];
  }
  return args;
}

}  // namespace qkv::cuda
