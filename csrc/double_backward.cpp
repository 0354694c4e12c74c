// The differentiable (second-order) backward of the core ops: see double_backward.h.
// Correct first: the scores of every (batch, head) are materialised, L x S per call.
#include "double_backward.h"

#include "qkv/qkv.h"

#include <ATen/OpMathType.h>
#include <c10/util/irange.h>
#include <torch/autograd.h>

#include <cmath>
#include <limits>

namespace qkv {
namespace {

// Key/value heads repeated for their query-head groups (a view; the gradient of the expand sums
// each group back into its key head).
at::Tensor repeat_heads(const at::Tensor& t, int64_t heads) {
  const int64_t kv_heads = t.size(1);
  const int64_t group = kv_heads == 0 ? 1 : heads / kv_heads;
  return t.unsqueeze(2).expand({t.size(0), kv_heads, group, t.size(2), t.size(3)}).flatten(1, 2);
}

// (L, S) bool: key j visible to query i (flash-attn's band, causal sets right = 0).
at::Tensor visible_keys(int64_t q_len, int64_t kv_len, const CallOptions& o, const at::Device& device) {
  const auto idx = at::TensorOptions().dtype(at::kLong).device(device);
  const int64_t offset = o.bottom_right ? kv_len - q_len : 0;
  const at::Tensor i = at::arange(q_len, idx).unsqueeze(1).add(offset);
  const at::Tensor j = at::arange(kv_len, idx).unsqueeze(0);
  at::Tensor visible = at::ones({q_len, kv_len}, idx.dtype(at::kBool));
  const int64_t right = o.is_causal ? 0 : o.window_right;
  if (o.window_left >= 0) visible = visible.logical_and(j.ge(i.sub(o.window_left)));
  if (right >= 0) visible = visible.logical_and(j.le(i.add(right)));
  return visible;
}

// The post-dropout probabilities (B, H, L, S) as differentiable ATen ops in the accumulation
// type: scale, softcap, ALiBi, bias, band mask, softmax (rows that see nothing: 0), dropout.
at::Tensor composite_probs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& bias,
                           const at::Tensor& logsumexp, const at::Tensor& dropout_seed,
                           const at::Tensor& alibi_slopes, const CallOptions& o) {
  const int64_t batch = q.size(0), heads = q.size(1), q_len = q.size(2), kv_len = k.size(2);
  const double scale = o.scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(3))));
  at::Tensor s = at::matmul(q, repeat_heads(k, heads).transpose(-2, -1)).mul(scale);
  if (o.softcap > 0) s = at::tanh(s.div(o.softcap)).mul(o.softcap);
  const int64_t offset = o.bottom_right ? kv_len - q_len : 0;
  if (alibi_slopes.defined()) {
    const auto idx = at::TensorOptions().dtype(at::kLong).device(q.device());
    const at::Tensor distance = at::arange(q_len, idx).unsqueeze(1).add(offset)
                                    .sub(at::arange(kv_len, idx).unsqueeze(0)).abs().to(s.scalar_type());
    const at::Tensor slopes = alibi_slopes.to(s.scalar_type()).expand({batch, heads}).reshape({batch, heads, 1, 1});
    s = s.sub(slopes.mul(distance));
  }
  if (bias.defined()) s = s.add(bias.to(s.scalar_type()));
  s = s.masked_fill(visible_keys(q_len, kv_len, o, q.device()).logical_not(),
                    -std::numeric_limits<double>::infinity());
  const at::Tensor sees_nothing =
      kv_len == 0 ? at::ones({batch, heads, q_len, 1}, q.options().dtype(at::kBool))
                  : at::isneginf(std::get<0>(s.detach().max(-1, /*keepdim=*/true)));
  at::Tensor p = at::softmax(s.masked_fill(sees_nothing, 0.0), -1).masked_fill(sees_nothing, 0.0);
  if (o.dropout_p > 0.0) {
    // The forward's mask, replayed by the weights op from the same seed (its kept entries are
    // P / (1 - p) != 0 wherever P > 0; where P is 0 the factor does not matter).
    at::Tensor dropped;
    {
      at::NoGradGuard no_grad;
      const std::optional<at::Tensor> b = bias.defined() ? std::optional(bias.detach().to(q.scalar_type()))
                                                         : std::nullopt;
      dropped = qkv::attention_weights(q.detach(), k.detach(), b, logsumexp, o.dropout_p, o.is_causal, o.bottom_right, o.scale, dropout_seed, false,
                                       o.window_left, o.window_right, o.softcap,
                                       alibi_slopes.defined() ? std::optional(alibi_slopes) : std::nullopt);
    }
    const at::Tensor factor = at::where(dropped.ne(0), at::scalar_tensor(1.0 / (1.0 - o.dropout_p), p.options()),
                                        at::scalar_tensor(0.0, p.options()));
    p = p.mul(factor);
  }
  return p;
}

// The gradients of `outputs` (given theirs, `grads`) with respect to the wanted `inputs`, with a
// graph (create_graph). `compute` builds the outputs from the inputs' fresh aliases: the gradient
// of each argument alone even when one tensor is passed twice (attention(x, x, x)), and each
// alias's graph leads back to its tensor.
template <size_t N, typename Compute>
std::vector<at::Tensor> gradients_with_graph(const std::array<const at::Tensor*, N>& inputs,
                                             const std::array<bool, N>& wanted, Compute compute) {
  std::vector<at::Tensor> aliases(N), wrt, result(N);
  std::vector<size_t> slot;
  for (const auto i : c10::irange(N)) {
    const at::Tensor& t = *inputs[i];
    if (!t.defined()) continue;
    const bool grad = wanted[i] && t.requires_grad();
    aliases[i] = grad ? t.view_as(t) : t;
    if (grad) {
      wrt.push_back(aliases[i]);
      slot.push_back(i);
    }
  }
  if (wrt.empty()) return result;
  auto [outputs, grads] = compute(aliases);
  if (outputs.empty()) return result;
  const auto found = torch::autograd::grad(outputs, wrt, grads, /*retain_graph=*/true, /*create_graph=*/true,
                                           /*allow_unused=*/true);
  for (const auto n : c10::irange(wrt.size())) {
    const at::Tensor& input = *inputs[slot[n]];
    result[slot[n]] = found[n].defined() ? found[n].to(input.scalar_type()) : at::zeros_like(input);
  }
  return result;
}

using OutputsAndGrads = std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>>;

}  // namespace

std::vector<at::Tensor> differentiable_attention_grads(const at::Tensor& grad_out, const at::Tensor& grad_weights,
                                                       bool average_heads, const at::Tensor& query,
                                                       const at::Tensor& key, const at::Tensor& value,
                                                       const at::Tensor& bias, const at::Tensor& logsumexp,
                                                       const at::Tensor& dropout_seed,
                                                       const at::Tensor& alibi_slopes, const CallOptions& options,
                                                       std::array<bool, 4> wanted) {
  const auto acc = at::toOpMathType(query.scalar_type());
  return gradients_with_graph<4>({&query, &key, &value, &bias}, wanted, [&](const std::vector<at::Tensor>& in) {
    const at::Tensor probs =
        composite_probs(in[0].to(acc), in[1].to(acc), in[3], logsumexp, dropout_seed, alibi_slopes, options);
    OutputsAndGrads result;
    if (grad_out.defined() && value.defined()) {
      result.first.push_back(at::matmul(probs, repeat_heads(in[2].to(acc), query.size(1))));
      result.second.push_back(grad_out.to(acc));
    }
    if (grad_weights.defined()) {
      result.first.push_back(average_heads ? probs.mean(1) : probs);
      result.second.push_back(grad_weights.to(acc));
    }
    return result;
  });
}

std::vector<at::Tensor> differentiable_varlen_grads(const at::Tensor& grad_out, const at::Tensor& query,
                                                    const at::Tensor& key, const at::Tensor& value,
                                                    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                    const at::Tensor& alibi_slopes, const CallOptions& options,
                                                    std::array<bool, 3> wanted) {
  // The packed op's dropout counter runs over (max_seqlen_q, max_seqlen_k) blocks, which the
  // dense composite does not replay.
  TORCH_CHECK(options.dropout_p == 0.0,
              "qkv.attention_varlen: double backward (a gradient of a gradient) with dropout_p > 0 is not supported; "
              "use dropout_p=0 or the padded qkv.attention");
  const at::Tensor cu_q = cu_seqlens_q.to(at::kCPU, at::kLong), cu_k = cu_seqlens_k.to(at::kCPU, at::kLong);
  const int64_t batch = cu_q.size(0) - 1;
  const int64_t used_q = batch >= 0 ? cu_q[batch].item<int64_t>() : 0;
  const auto acc = at::toOpMathType(query.scalar_type());
  return gradients_with_graph<3>({&query, &key, &value}, wanted, [&](const std::vector<at::Tensor>& in) {
    // (rows, heads, dim) -> (1, heads, rows, dim) per sequence, each through the dense composite.
    const auto sequence = [&](const at::Tensor& t, int64_t start, int64_t end) {
      return t.narrow(0, start, end - start).transpose(0, 1).unsqueeze(0).to(acc);
    };
    std::vector<at::Tensor> outs;
    for (const auto b : c10::irange(batch)) {
      const int64_t q0 = cu_q[b].item<int64_t>(), q1 = cu_q[b + 1].item<int64_t>();
      const int64_t k0 = cu_k[b].item<int64_t>(), k1 = cu_k[b + 1].item<int64_t>();
      const at::Tensor slopes =
          alibi_slopes.defined() && alibi_slopes.dim() == 2 ? alibi_slopes[b] : alibi_slopes;
      const at::Tensor probs = composite_probs(sequence(in[0], q0, q1), sequence(in[1], k0, k1), at::Tensor(),
                                               at::Tensor(), at::Tensor(), slopes, options);
      outs.push_back(at::matmul(probs, repeat_heads(sequence(in[2], k0, k1), query.size(1))).squeeze(0).transpose(0, 1));
    }
    OutputsAndGrads result;
    if (!outs.empty() && used_q > 0) {
      result.first.push_back(at::cat(outs));
      result.second.push_back(grad_out.narrow(0, 0, used_q).to(acc));
    }
    return result;
  });
}

}  // namespace qkv
