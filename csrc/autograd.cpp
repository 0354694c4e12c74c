// Autograd for the core ops, registered under the Autograd key so LibTorch C++ users get
// gradients too. Forward and backward each call a registered op through the dispatcher,
// so torch.compile traces both and every device kernel is reached the same way.
#include "attention_common.h"
#include "double_backward.h"
#include "qkv/qkv.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <functional>
#include <tuple>
#include <string>

namespace qkv {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

OptTensor saved_optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// With dropout, the forward and the backward must see the same mask: fix the seed here (a
// 0-dim CPU int64 tensor, saved for the backward and for the weights).
OptTensor ensure_seed(double dropout_p, const OptTensor& seed) {
  if (dropout_p > 0.0 && !(seed.has_value() && seed->defined())) return draw_dropout_seed();
  return seed;
}

// The scalar options of one call, kept for the backward (the ALiBi slopes are saved with the
// tensors).
void save_options(AutogradContext* ctx, double dropout_p, bool is_causal, bool bottom_right,
                  std::optional<double> scale, int64_t window_left, int64_t window_right, double softcap) {
  ctx->saved_data["dropout_p"] = dropout_p;
  ctx->saved_data["is_causal"] = is_causal;
  ctx->saved_data["bottom_right"] = bottom_right;
  ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
  ctx->saved_data["window_left"] = window_left;
  ctx->saved_data["window_right"] = window_right;
  ctx->saved_data["softcap"] = softcap;
}

int64_t saved_int(AutogradContext* ctx, const char* name) { return ctx->saved_data[name].toInt(); }

CallOptions saved_options(AutogradContext* ctx) {
  return {ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["is_causal"].toBool(),
          ctx->saved_data["bottom_right"].toBool(), ctx->saved_data["scale"].toOptional<double>(),
          saved_int(ctx, "window_left"), saved_int(ctx, "window_right"), ctx->saved_data["softcap"].toDouble()};
}

// A backward that runs with grad mode on (create_graph=True) must itself be differentiable: it
// takes the composite of double_backward.h instead of the flash backward kernel.
bool second_order_requested() { return at::GradMode::is_enabled(); }

// Gradients of (query, key, value, bias) reaching the output through the flash backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> output_backward(
    AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& bias, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& seed, const at::Tensor& alibi_slopes, bool bias_grad) {
  static const auto backward_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qkv::attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
              const at::Tensor&, const at::Tensor&, double, bool, bool, std::optional<double>, const OptTensor&,
              bool, int64_t, int64_t, double, const OptTensor&)>();
  return backward_op.call(grad_out, query, key, value, saved_optional(bias), out, lse,
                          ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["is_causal"].toBool(),
                          ctx->saved_data["bottom_right"].toBool(), ctx->saved_data["scale"].toOptional<double>(),
                          saved_optional(seed), bias_grad, saved_int(ctx, "window_left"), saved_int(ctx, "window_right"),
                          ctx->saved_data["softcap"].toDouble(), saved_optional(alibi_slopes));
}

// Gradients of (query, key, bias) reaching the (per-head or head-averaged) weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor> weights_backward(AutogradContext* ctx, const at::Tensor& grad_weights,
                                                                const at::Tensor& query, const at::Tensor& key,
                                                                const at::Tensor& bias, const at::Tensor& lse,
                                                                const at::Tensor& seed, const at::Tensor& alibi_slopes,
                                                                bool average_heads, bool bias_grad) {
  // The mean over heads spreads its gradient evenly over the per-head weights.
  // (Symbolic sizes: tracing with dynamic shapes must not pin them.)
  const at::Tensor per_head =
      average_heads ? grad_weights.div(c10::Scalar(query.sym_size(1)))
                          .unsqueeze(1)
                          .expand_symint(
                              {query.sym_size(0), query.sym_size(1), query.sym_size(2), key.sym_size(2)})
                    : grad_weights;
  static const auto backward_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qkv::attention_weights_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, double,
              bool, bool, std::optional<double>, const OptTensor&, bool, int64_t, int64_t, double,
              const OptTensor&)>();
  return backward_op.call(per_head, query, key, saved_optional(bias), lse, ctx->saved_data["dropout_p"].toDouble(),
                          ctx->saved_data["is_causal"].toBool(), ctx->saved_data["bottom_right"].toBool(),
                          ctx->saved_data["scale"].toOptional<double>(), saved_optional(seed), bias_grad,
                          saved_int(ctx, "window_left"), saved_int(ctx, "window_right"),
                          ctx->saved_data["softcap"].toDouble(), saved_optional(alibi_slopes));
}

at::Tensor sum_defined(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a.add(b);
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const OptTensor& bias, double dropout_p, bool is_causal,
                               bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
                               int64_t window_left, int64_t window_right, double softcap,
                               const OptTensor& alibi_slopes) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = qkv::attention(query, key, value, bias, dropout_p, is_causal, bottom_right, scale,
                                     dropout_seed, window_left, window_right, softcap, alibi_slopes);
    ctx->mark_non_differentiable({lse});
    ctx->save_for_backward({query, key, value, bias.value_or(at::Tensor()), out, lse,
                            dropout_seed.value_or(at::Tensor()), alibi_slopes.value_or(at::Tensor())});
    save_options(ctx, dropout_p, is_causal, bottom_right, scale, window_left, window_right, softcap);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(13);
    // Edges exist only for defined tensor inputs: bias is edge 3 when present.
    const bool bias_grad = saved[3].defined() && ctx->needs_input_grad(3);
    if (second_order_requested()) {
      auto g = differentiable_attention_grads(grads[0], {}, false, saved[0], saved[1], saved[2], saved[3], saved[5],
                                              saved[6], saved[7], saved_options(ctx),
                                              {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                               ctx->needs_input_grad(2), bias_grad});
      return {g[0], g[1], g[2], g[3], {}, {}, {}, {}, {}, {}, {}, {}, {}};
    }
    auto [dq, dk, dv, dbias] = output_backward(ctx, grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                               saved[5], saved[6], saved[7], bias_grad);
    return {dq, dk, dv, bias_grad ? dbias : at::Tensor(), {}, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_autograd(const at::Tensor& query, const at::Tensor& key,
                                                      const at::Tensor& value, const OptTensor& bias,
                                                      double dropout_p, bool is_causal, bool bottom_right,
                                                      std::optional<double> scale, const OptTensor& dropout_seed,
                                                      int64_t window_left, int64_t window_right, double softcap,
                                                      const OptTensor& alibi_slopes) {
  auto outs = AttentionFunction::apply(query, key, value, bias, dropout_p, is_causal, bottom_right, scale,
                                       ensure_seed(dropout_p, dropout_seed), window_left, window_right, softcap,
                                       alibi_slopes);
  return {outs[0], outs[1]};
}

// The C++ signatures of attention_varlen and its backward (SymInt lengths: traced symbolically).
using VarlenSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&, const at::Tensor&, c10::SymInt,
                                                           c10::SymInt, double, bool, bool, std::optional<double>,
                                                           const OptTensor&, int64_t, int64_t, double, const OptTensor&);
using VarlenBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, c10::SymInt, c10::SymInt, double, bool, bool, std::optional<double>,
    const OptTensor&, int64_t, int64_t, double, const OptTensor&);

// Packed variable-length sequences: the same kernel through attention_varlen(_backward).
class AttentionVarlenFunction : public torch::autograd::Function<AttentionVarlenFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                               c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, double dropout_p, bool is_causal,
                               bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
                               int64_t window_left, int64_t window_right, double softcap,
                               const OptTensor& alibi_slopes) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto forward_op =
        c10::Dispatcher::singleton().findSchemaOrThrow("qkv::attention_varlen", "").typed<VarlenSignature>();
    auto [out, lse] = forward_op.call(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      dropout_p, is_causal, bottom_right, scale, dropout_seed, window_left,
                                      window_right, softcap, alibi_slopes);
    ctx->mark_non_differentiable({lse});
    ctx->save_for_backward({query, key, value, out, lse, cu_seqlens_q, cu_seqlens_k,
                            dropout_seed.value_or(at::Tensor()), alibi_slopes.value_or(at::Tensor())});
    save_options(ctx, dropout_p, is_causal, bottom_right, scale, window_left, window_right, softcap);
    ctx->saved_data["max_seqlen_q"] = max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = max_seqlen_k;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(16);
    if (second_order_requested()) {
      auto g = differentiable_varlen_grads(grads[0], saved[0], saved[1], saved[2], saved[5], saved[6], saved[8],
                                           saved_options(ctx),
                                           {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)});
      variable_list result(16);
      result[0] = g[0], result[1] = g[1], result[2] = g[2];
      return result;
    }
    static const auto backward_op = c10::Dispatcher::singleton()
                                        .findSchemaOrThrow("qkv::attention_varlen_backward", "")
                                        .typed<VarlenBackwardSignature>();
    auto [dq, dk, dv] = backward_op.call(
        grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
        ctx->saved_data["max_seqlen_q"].toSymInt(), ctx->saved_data["max_seqlen_k"].toSymInt(),
        ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["is_causal"].toBool(),
        ctx->saved_data["bottom_right"].toBool(), ctx->saved_data["scale"].toOptional<double>(),
        saved_optional(saved[7]), saved_int(ctx, "window_left"), saved_int(ctx, "window_right"),
        ctx->saved_data["softcap"].toDouble(), saved_optional(saved[8]));
    variable_list result(16);
    result[0] = dq, result[1] = dk, result[2] = dv;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> attention_varlen_autograd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
    int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes) {
  auto outs = AttentionVarlenFunction::apply(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             dropout_p, is_causal, bottom_right, scale,
                                             ensure_seed(dropout_p, dropout_seed), window_left, window_right, softcap,
                                             alibi_slopes);
  return {outs[0], outs[1]};
}

// Packed self-attention: one input, qkv (B, L, 3, H, D), whose gradient the backward op writes
// as one tensor (the three views' gradients would otherwise be stacked by a copy).
class AttentionQkvpackedFunction : public torch::autograd::Function<AttentionQkvpackedFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& qkv, const OptTensor& bias, double dropout_p,
                               bool is_causal, std::optional<double> scale, const OptTensor& dropout_seed,
                               int64_t window_left, int64_t window_right, double softcap,
                               const OptTensor& alibi_slopes) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = qkv::attention_qkvpacked(qkv, bias, dropout_p, is_causal, scale, dropout_seed, window_left,
                                               window_right, softcap, alibi_slopes);
    ctx->mark_non_differentiable({lse});
    ctx->save_for_backward({qkv, bias.value_or(at::Tensor()), out, lse, dropout_seed.value_or(at::Tensor()),
                            alibi_slopes.value_or(at::Tensor())});
    save_options(ctx, dropout_p, is_causal, /*bottom_right=*/false, scale, window_left, window_right, softcap);
    ctx->set_materialize_grads(false);  // the logsumexp's gradient: none, not a zero tensor
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(10);
    const bool qkv_grad = ctx->needs_input_grad(0);
    const bool bias_grad = saved[1].defined() && ctx->needs_input_grad(1);  // bias is edge 1 when present
    variable_list result(10);
    if (second_order_requested()) {
      // The differentiable composite on the three views; their gradients stacked (differentiably)
      // into qkv's. Second-order use is rare: the copy does not matter here.
      const auto [q, k, v] = split_packed_qkv(saved[0]);
      auto g = differentiable_attention_grads(grads[0], {}, false, q, k, v, saved[1], saved[3], saved[4], saved[5],
                                              saved_options(ctx), {qkv_grad, qkv_grad, qkv_grad, bias_grad});
      if (qkv_grad) result[0] = at::stack({g[0].transpose(1, 2), g[1].transpose(1, 2), g[2].transpose(1, 2)}, 2);
      result[1] = g[3];
      return result;
    }
    static const auto backward_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("qkv::attention_qkvpacked_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                      const at::Tensor&, const at::Tensor&, double, bool,
                                                      std::optional<double>, const OptTensor&, bool, int64_t, int64_t,
                                                      double, const OptTensor&)>();
    auto [dqkv, dbias] = backward_op.call(
        grads[0], saved[0], saved_optional(saved[1]), saved[2], saved[3], ctx->saved_data["dropout_p"].toDouble(),
        ctx->saved_data["is_causal"].toBool(), ctx->saved_data["scale"].toOptional<double>(),
        saved_optional(saved[4]), bias_grad, saved_int(ctx, "window_left"), saved_int(ctx, "window_right"),
        ctx->saved_data["softcap"].toDouble(), saved_optional(saved[5]));
    result[0] = dqkv;
    result[1] = bias_grad ? dbias : at::Tensor();
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> attention_qkvpacked_autograd(const at::Tensor& qkv, const OptTensor& bias,
                                                                double dropout_p, bool is_causal,
                                                                std::optional<double> scale,
                                                                const OptTensor& dropout_seed, int64_t window_left,
                                                                int64_t window_right, double softcap,
                                                                const OptTensor& alibi_slopes) {
  auto outs = AttentionQkvpackedFunction::apply(qkv, bias, dropout_p, is_causal, scale,
                                                ensure_seed(dropout_p, dropout_seed), window_left, window_right,
                                                softcap, alibi_slopes);
  return {outs[0], outs[1]};
}

class AttentionWeightsFunction : public torch::autograd::Function<AttentionWeightsFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                            const OptTensor& bias, const at::Tensor& logsumexp, double dropout_p, bool is_causal,
                            bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
                            bool average_heads, int64_t window_left, int64_t window_right, double softcap,
                            const OptTensor& alibi_slopes) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor weights = qkv::attention_weights(query, key, bias, logsumexp, dropout_p, is_causal, bottom_right,
                                                scale, dropout_seed, average_heads, window_left, window_right,
                                                softcap, alibi_slopes);
    ctx->saved_data["average_heads"] = average_heads;
    ctx->save_for_backward({query, key, bias.value_or(at::Tensor()), logsumexp, dropout_seed.value_or(at::Tensor()),
                            alibi_slopes.value_or(at::Tensor())});
    save_options(ctx, dropout_p, is_causal, bottom_right, scale, window_left, window_right, softcap);
    return weights;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(14);
    const bool bias_grad = saved[2].defined() && ctx->needs_input_grad(2);  // bias is edge 2 when present
    if (second_order_requested()) {
      auto g = differentiable_attention_grads({}, grads[0], ctx->saved_data["average_heads"].toBool(), saved[0],
                                              saved[1], at::Tensor(), saved[2], saved[3], saved[4], saved[5],
                                              saved_options(ctx),
                                              {ctx->needs_input_grad(0), ctx->needs_input_grad(1), false, bias_grad});
      variable_list result(14);
      result[0] = g[0], result[1] = g[1], result[2] = g[3];
      return result;
    }
    auto [dq, dk, dbias] = weights_backward(ctx, grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                            ctx->saved_data["average_heads"].toBool(), bias_grad);
    variable_list result(14);
    result[0] = dq, result[1] = dk, result[2] = bias_grad ? dbias : at::Tensor();
    return result;
  }
};

at::Tensor attention_weights_autograd(const at::Tensor& query, const at::Tensor& key, const OptTensor& bias,
                                      const at::Tensor& logsumexp, double dropout_p, bool is_causal,
                                      bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
                                      bool average_heads, int64_t window_left, int64_t window_right, double softcap,
                                      const OptTensor& alibi_slopes) {
  return AttentionWeightsFunction::apply(query, key, bias, logsumexp, dropout_p, is_causal, bottom_right, scale,
                                         ensure_seed(dropout_p, dropout_seed), average_heads, window_left,
                                         window_right, softcap, alibi_slopes);
}

// Out and weights from one kernel; each output's gradient goes through its own backward op,
// and both sum into the inputs' gradients.
class AttentionWithWeightsFunction : public torch::autograd::Function<AttentionWithWeightsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const OptTensor& bias, double dropout_p, bool is_causal,
                               bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
                               bool average_heads, int64_t window_left, int64_t window_right, double softcap,
                               const OptTensor& alibi_slopes) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse, weights] =
        qkv::attention_with_weights(query, key, value, bias, dropout_p, is_causal, bottom_right, scale, dropout_seed,
                                    average_heads, window_left, window_right, softcap, alibi_slopes);
    ctx->mark_non_differentiable({lse});
    ctx->save_for_backward({query, key, value, bias.value_or(at::Tensor()), out, lse,
                            dropout_seed.value_or(at::Tensor()), alibi_slopes.value_or(at::Tensor())});
    save_options(ctx, dropout_p, is_causal, bottom_right, scale, window_left, window_right, softcap);
    ctx->saved_data["average_heads"] = average_heads;
    // Most callers never use the weights: their gradient must arrive undefined, not as a
    // zero (B, H, L, S) tensor pushed through the weights backward.
    ctx->set_materialize_grads(false);
    return {out, lse, weights};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool bias_grad = saved[3].defined() && ctx->needs_input_grad(3);  // bias is edge 3 when present
    if (second_order_requested()) {
      auto g = differentiable_attention_grads(grads[0], grads[2], ctx->saved_data["average_heads"].toBool(), saved[0],
                                              saved[1], saved[2], saved[3], saved[5], saved[6], saved[7],
                                              saved_options(ctx),
                                              {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                               ctx->needs_input_grad(2), bias_grad});
      variable_list result(14);
      result[0] = g[0], result[1] = g[1], result[2] = g[2], result[3] = g[3];
      return result;
    }
    at::Tensor dq, dk, dv, dbias;
    if (grads[0].defined()) {
      std::tie(dq, dk, dv, dbias) = output_backward(ctx, grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                                    saved[5], saved[6], saved[7], bias_grad);
    }
    // The weights do not depend on value: their backward runs only for query, key or bias.
    if (grads[2].defined() && (ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || bias_grad)) {
      auto [wdq, wdk, wdbias] = weights_backward(ctx, grads[2], saved[0], saved[1], saved[3], saved[5], saved[6],
                                                 saved[7], ctx->saved_data["average_heads"].toBool(), bias_grad);
      dq = sum_defined(dq, wdq);
      dk = sum_defined(dk, wdk);
      if (bias_grad) dbias = sum_defined(dbias, wdbias);
    }
    variable_list result(14);
    result[0] = dq, result[1] = dk, result[2] = dv, result[3] = bias_grad ? dbias : at::Tensor();
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_weights_autograd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const OptTensor& bias,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
    bool average_heads, int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes) {
  auto outs = AttentionWithWeightsFunction::apply(query, key, value, bias, dropout_p, is_causal, bottom_right, scale,
                                                  ensure_seed(dropout_p, dropout_seed), average_heads, window_left,
                                                  window_right, softcap, alibi_slopes);
  return {outs[0], outs[1], outs[2]};
}

// The backward ops are differentiable once: asking for a second derivative through them
// raises a clear error instead of silently producing zeros.
class OnceDifferentiable : public torch::autograd::Function<OnceDifferentiable> {
 public:
  // The tensor arguments are passed only so autograd records them as inputs.
  static variable_list forward(AutogradContext* ctx, const std::string& op, const std::function<variable_list()>& run,
                               const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& d,
                               const OptTensor& e) {
    ctx->saved_data["op"] = op;
    at::AutoDispatchBelowADInplaceOrView guard;
    return run();
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, ctx->saved_data["op"].toStringRef(),
                ": double backward (a gradient of a gradient) is not supported by qkv attention");
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const OptTensor& bias, const at::Tensor& out, const at::Tensor& logsumexp, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed, bool bias_requires_grad,
    int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qkv::attention_backward", "")
                             .typed<decltype(attention_backward_autograd)>();
  auto outs = OnceDifferentiable::apply(
      std::string("qkv.attention_backward"),
      std::function<variable_list()>([&] {
        auto [dq, dk, dv, db] = op.call(grad_out, query, key, value, bias, out, logsumexp, dropout_p, is_causal,
                                        bottom_right, scale, dropout_seed, bias_requires_grad, window_left,
                                        window_right, softcap, alibi_slopes);
        return variable_list{dq, dk, dv, db};
      }),
      grad_out, query, key, value, bias);
  return {outs[0], outs[1], outs[2], outs[3]};
}

std::tuple<at::Tensor, at::Tensor> attention_qkvpacked_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& qkv, const OptTensor& bias, const at::Tensor& out,
    const at::Tensor& logsumexp, double dropout_p, bool is_causal, std::optional<double> scale,
    const OptTensor& dropout_seed, bool bias_requires_grad, int64_t window_left, int64_t window_right,
    double softcap, const OptTensor& alibi_slopes) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qkv::attention_qkvpacked_backward", "")
                             .typed<decltype(attention_qkvpacked_backward_autograd)>();
  auto outs = OnceDifferentiable::apply(
      std::string("qkv.attention_qkvpacked_backward"),
      std::function<variable_list()>([&] {
        auto [dqkv, db] = op.call(grad_out, qkv, bias, out, logsumexp, dropout_p, is_causal, scale, dropout_seed,
                                  bias_requires_grad, window_left, window_right, softcap, alibi_slopes);
        return variable_list{dqkv, db};
      }),
      grad_out, qkv, out, logsumexp, bias);
  return {outs[0], outs[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_weights_backward_autograd(
    const at::Tensor& grad_weights, const at::Tensor& query, const at::Tensor& key, const OptTensor& bias,
    const at::Tensor& logsumexp, double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const OptTensor& dropout_seed, bool bias_requires_grad, int64_t window_left, int64_t window_right,
    double softcap, const OptTensor& alibi_slopes) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qkv::attention_weights_backward", "")
                             .typed<decltype(attention_weights_backward_autograd)>();
  auto outs = OnceDifferentiable::apply(
      std::string("qkv.attention_weights_backward"),
      std::function<variable_list()>([&] {
        auto [dq, dk, db] = op.call(grad_weights, query, key, bias, logsumexp, dropout_p, is_causal, bottom_right,
                                    scale, dropout_seed, bias_requires_grad, window_left, window_right, softcap,
                                    alibi_slopes);
        return variable_list{dq, dk, db};
      }),
      grad_weights, query, key, logsumexp, bias);
  return {outs[0], outs[1], outs[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, double dropout_p,
    bool is_causal, bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
    int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qkv::attention_varlen_backward", "")
                             .typed<decltype(attention_varlen_backward_autograd)>();
  auto outs = OnceDifferentiable::apply(
      std::string("qkv.attention_varlen_backward"),
      std::function<variable_list()>([&] {
        auto [dq, dk, dv] = op.call(grad_out, query, key, value, out, logsumexp, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, dropout_p, is_causal, bottom_right, scale,
                                    dropout_seed, window_left, window_right, softcap, alibi_slopes);
        return variable_list{dq, dk, dv};
      }),
      grad_out, query, key, value, out);
  return {outs[0], outs[1], outs[2]};
}

// Decoding from a KV cache has no gradient (as flash-attn's): its outputs carry a node whose
// backward says so, instead of autograd's silent not-implemented fallback. The caches are
// written in place and take no part in autograd.
class InferenceOnly : public torch::autograd::Function<InferenceOnly> {
 public:
  static variable_list forward(AutogradContext* ctx, const std::function<variable_list()>& run, const at::Tensor& a,
                               const OptTensor& b, const OptTensor& c) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto outs = run();
    ctx->mark_non_differentiable({outs[1]});
    return outs;
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "qkv.attention_kvcache: no gradients (decoding from a KV cache is inference only, as in "
                "flash-attn); train with qkv.attention or qkv.attention_varlen");
  }
};

std::tuple<at::Tensor, at::Tensor> attention_kvcache_autograd(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache, const OptTensor& key,
    const OptTensor& value, const OptTensor& cache_seqlens, bool is_causal, std::optional<double> scale,
    int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes) {
  const bool grad_mode = at::GradMode::is_enabled();
  for (const auto& [name, cache] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_cache}, {"v_cache", v_cache}}) {
    TORCH_CHECK(!(grad_mode && cache.requires_grad()), "qkv.attention_kvcache: ", name,
                " requires grad; the caches are written in place and take no part in autograd (inference only)");
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qkv::attention_kvcache", "")
                             .typed<decltype(attention_kvcache_autograd)>();
  const std::function<variable_list()> run = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op.call(query, k_cache, v_cache, key, value, cache_seqlens, is_causal, scale, window_left,
                              window_right, softcap, alibi_slopes);
    return variable_list{out, lse};
  };
  const auto wants_grad = [](const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  variable_list outs = grad_mode && (query.requires_grad() || wants_grad(key) || wants_grad(value))
                           ? InferenceOnly::apply(run, query, key, value)
                           : run();
  if (key.has_value() && key->defined()) {  // written in place: what saved them for a backward must see it
    torch::autograd::impl::bump_version(k_cache);
    torch::autograd::impl::bump_version(v_cache);
  }
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv, Autograd, m) {
  m.impl("attention_kvcache", &attention_kvcache_autograd);
  m.impl("attention", &attention_autograd);
  m.impl("attention_weights", &attention_weights_autograd);
  m.impl("attention_with_weights", &attention_with_weights_autograd);
  m.impl("attention_backward", &attention_backward_autograd);
  m.impl("attention_qkvpacked", &attention_qkvpacked_autograd);
  m.impl("attention_qkvpacked_backward", &attention_qkvpacked_backward_autograd);
  m.impl("attention_weights_backward", &attention_weights_backward_autograd);
  m.impl("attention_varlen", &attention_varlen_autograd);
  m.impl("attention_varlen_backward", &attention_varlen_backward_autograd);
}

}  // namespace qkv
