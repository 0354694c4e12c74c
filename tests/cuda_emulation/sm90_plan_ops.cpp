// The sm90 forward's host-side plan (csrc/cuda/sm90_plan.h: which calls it serves, how TMA sees its
// tensors) on CPU tensors, as torch.ops.qkv_sm90_plan.*: the arguments reach it through the same
// kernel_args.h helpers as in the CUDA launcher, so tests/test_cuda_sm90_plan.py checks, without a
// GPU, exactly the decisions attention_cuda.cpp makes. (The kernel itself -- wgmma, TMA -- has no CPU
// emulation; it is checked by tests/test_cuda.py on an H100.)
// No CUDA headers: the plan is plain C++ (kernel_params.h only names cudaStream_t, as in the emulation).
#define QKV_CUDA_EMULATION 1
using cudaStream_t = void*;

#include "cuda/kernel_args.h"
#include "cuda/sm90_plan.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace {

using namespace qkv::cuda;

// What check_attention_args would produce for these tensors (the Python side passes the scalars).
qkv::AttentionParams params_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool has_bias,
                               double scale, double dropout_p, bool is_causal, int64_t window_left, double softcap) {
  qkv::AttentionParams p;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.q_len = q.size(2);
  p.head_dim = q.size(3);
  p.kv_heads = k.size(1);
  p.kv_len = k.size(2);
  p.v_head_dim = v.size(3);
  p.scale = scale;
  p.dropout_p = dropout_p;
  p.is_causal = is_causal;
  p.has_bias = has_bias;
  p.window_left = window_left;
  p.softcap = softcap;
  return p;
}

// "" when the sm90 forward serves the call on a device of compute capability major.minor, else its
// reason. `out`: the output view the launcher would write (None: a fresh (B, H, L, Dv) view of
// (B, L, H, Dv) memory, as attention_cuda.cpp allocates).
std::string refusal(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& out, double scale, double dropout_p, bool is_causal,
                    int64_t major, int64_t minor, int64_t window_left, double softcap) {
  const auto p = params_of(q, k, v, bias.has_value(), scale, dropout_p, is_causal, window_left, softcap);
  at::Tensor o = out.has_value()
                     ? *out
                     : at::empty({q.size(0), q.size(2), q.size(1), v.size(3)}, q.options()).permute({0, 2, 1, 3});
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const ForwardArgs args = forward_args(p, q, k, v, bias.value_or(at::Tensor()), o, lse);
  const char* reason = sm90::forward_refusal(args, static_cast<int>(major), static_cast<int>(minor));
  return reason == nullptr ? std::string() : std::string(reason);
}

// The TMA view of a (B, H, rows, cols) tensor: [rows, cols, heads, batch, row, head, batch strides].
std::vector<int64_t> tma_view(const at::Tensor& t) {
  const sm90::TmaView v =
      sm90::tma_view(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.size(0), t.size(1), t.size(2), t.size(3));
  return {v.rows, v.cols, v.heads, v.batch, v.row_stride, v.head_stride, v.batch_stride};
}

}  // namespace

TORCH_LIBRARY(qkv_sm90_plan, m) {
  m.def("refusal(Tensor q, Tensor k, Tensor v, Tensor? bias=None, Tensor? out=None, float scale=0.125, "
        "float dropout_p=0.0, bool is_causal=False, int major=9, int minor=0, int window_left=-1, "
        "float softcap=0.0) -> str", &refusal);
  m.def("tma_view(Tensor t) -> int[]", &tma_view);
}
