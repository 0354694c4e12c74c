// Autograd for the core ops, registered under the Autograd key so LibTorch C++ users get
// gradients too. Forward and backward each call a registered op through the dispatcher,
// so torch.compile traces both and every device kernel is reached the same way.
#include "attention_common.h"
#include "qkv/qkv.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <functional>
#include <string>

namespace qkv {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

OptTensor saved_optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// With dropout, the forward and the backward must see the same mask: fix the seed here.
OptTensor ensure_seed(double dropout_p, const OptTensor& seed) {
  if (dropout_p > 0.0 && !(seed.has_value() && seed->defined())) return draw_dropout_seed();
  return seed;
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const OptTensor& bias, double dropout_p, bool is_causal,
                               bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = qkv::attention(query, key, value, bias, dropout_p, is_causal, bottom_right, scale,
                                     dropout_seed);
    ctx->mark_non_differentiable({lse});
    ctx->save_for_backward({query, key, value, bias.value_or(at::Tensor()), out, lse,
                            dropout_seed.value_or(at::Tensor())});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["bottom_right"] = bottom_right;
    ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return variable_list(9);
    static const auto backward_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("qkv::attention_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                const at::Tensor&, const at::Tensor&, double, bool, bool, std::optional<double>,
                const OptTensor&, bool)>();
    const auto scale = ctx->saved_data["scale"].toOptional<double>();
    // Edges exist only for defined tensor inputs: bias is edge 3 when present.
    const bool bias_grad = saved[3].defined() && ctx->needs_input_grad(3);
    auto [dq, dk, dv, dbias] = backward_op.call(
        grad_out, saved[0], saved[1], saved[2], saved_optional(saved[3]), saved[4], saved[5],
        ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["is_causal"].toBool(),
        ctx->saved_data["bottom_right"].toBool(), scale, saved_optional(saved[6]), bias_grad);
    return {dq, dk, dv, bias_grad ? dbias : at::Tensor(), {}, {}, {}, {}, {}};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_autograd(const at::Tensor& query, const at::Tensor& key,
                                                      const at::Tensor& value, const OptTensor& bias,
                                                      double dropout_p, bool is_causal, bool bottom_right,
                                                      std::optional<double> scale, const OptTensor& dropout_seed) {
  auto outs = AttentionFunction::apply(query, key, value, bias, dropout_p, is_causal, bottom_right, scale,
                                       ensure_seed(dropout_p, dropout_seed));
  return {outs[0], outs[1]};
}

class AttentionWeightsFunction : public torch::autograd::Function<AttentionWeightsFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                            const OptTensor& bias, const at::Tensor& logsumexp, double dropout_p, bool is_causal,
                            bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
                            bool average_heads) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor weights = qkv::attention_weights(query, key, bias, logsumexp, dropout_p, is_causal, bottom_right,
                                                scale, dropout_seed, average_heads);
    ctx->saved_data["average_heads"] = average_heads;
    ctx->save_for_backward({query, key, bias.value_or(at::Tensor()), logsumexp, dropout_seed.value_or(at::Tensor())});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["bottom_right"] = bottom_right;
    ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
    return weights;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(10);
    // The mean over heads spreads its gradient evenly over the per-head weights.
    const at::Tensor& query = saved[0];
    const at::Tensor grad_weights =
        ctx->saved_data["average_heads"].toBool()
            ? grads[0].div(static_cast<double>(query.size(1))).unsqueeze(1).expand({query.size(0), query.size(1),
                                                                                   query.size(2), saved[1].size(2)})
            : grads[0];
    static const auto backward_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("qkv::attention_weights_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                double, bool, bool, std::optional<double>, const OptTensor&, bool)>();
    const bool bias_grad = saved[2].defined() && ctx->needs_input_grad(2);  // bias is edge 2 when present
    auto [dq, dk, dbias] = backward_op.call(
        grad_weights, saved[0], saved[1], saved_optional(saved[2]), saved[3], ctx->saved_data["dropout_p"].toDouble(),
        ctx->saved_data["is_causal"].toBool(), ctx->saved_data["bottom_right"].toBool(),
        ctx->saved_data["scale"].toOptional<double>(), saved_optional(saved[4]), bias_grad);
    return {dq, dk, bias_grad ? dbias : at::Tensor(), {}, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor attention_weights_autograd(const at::Tensor& query, const at::Tensor& key, const OptTensor& bias,
                                      const at::Tensor& logsumexp, double dropout_p, bool is_causal,
                                      bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed,
                                      bool average_heads) {
  return AttentionWeightsFunction::apply(query, key, bias, logsumexp, dropout_p, is_causal, bottom_right, scale,
                                         ensure_seed(dropout_p, dropout_seed), average_heads);
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
    bool bottom_right, std::optional<double> scale, const OptTensor& dropout_seed, bool bias_requires_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qkv::attention_backward", "")
                             .typed<decltype(attention_backward_autograd)>();
  auto outs = OnceDifferentiable::apply(
      std::string("qkv.attention_backward"),
      std::function<variable_list()>([&] {
        auto [dq, dk, dv, db] = op.call(grad_out, query, key, value, bias, out, logsumexp, dropout_p, is_causal,
                                        bottom_right, scale, dropout_seed, bias_requires_grad);
        return variable_list{dq, dk, dv, db};
      }),
      grad_out, query, key, value, bias);
  return {outs[0], outs[1], outs[2], outs[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_weights_backward_autograd(
    const at::Tensor& grad_weights, const at::Tensor& query, const at::Tensor& key, const OptTensor& bias,
    const at::Tensor& logsumexp, double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const OptTensor& dropout_seed, bool bias_requires_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qkv::attention_weights_backward", "")
                             .typed<decltype(attention_weights_backward_autograd)>();
  auto outs = OnceDifferentiable::apply(
      std::string("qkv.attention_weights_backward"),
      std::function<variable_list()>([&] {
        auto [dq, dk, db] = op.call(grad_weights, query, key, bias, logsumexp, dropout_p, is_causal, bottom_right,
                                    scale, dropout_seed, bias_requires_grad);
        return variable_list{dq, dk, db};
      }),
      grad_weights, query, key, logsumexp, bias);
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv, Autograd, m) {
  m.impl("attention", &attention_autograd);
  m.impl("attention_weights", &attention_weights_autograd);
  m.impl("attention_backward", &attention_backward_autograd);
  m.impl("attention_weights_backward", &attention_weights_backward_autograd);
}

}  // namespace qkv
