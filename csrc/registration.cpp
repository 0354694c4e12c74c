// Every qkv operator schema, in one place. Kernels are registered per dispatch key in the
// files that implement them: cpu/, cuda/, meta_kernels.cpp (Meta), autograd.cpp (Autograd),
// composite_ops.cpp (the core ops composed of others) and projection_ops.cpp (the projection
// ops: whole attention layers).
#include <torch/library.h>

TORCH_LIBRARY(qkv, m) {
  // Core attention, layout (batch, heads, seq, head_dim), any strides. Returns the output
  // and the per-row logsumexp of the scaled, biased scores (-inf for rows that attend to
  // nothing, whose output is 0). `bias` is additive, in the query's dtype or float32, and
  // broadcasts to (B, H, L, S); only -inf hides a key (finite values are added as they are).
  // Causal hides key j from query i when j > i (top-left) or j > i + S - L (bottom_right).
  // Dropout keeps each probability by a counter-based hash of (dropout_seed, b, h, i, j).
  // dropout_seed is a 0-dim int64 CPU tensor whatever the inputs' device (read on the host;
  // fake tensors accept it beside inputs of any device); with dropout_p > 0 and none given,
  // one is drawn from torch's default generator. The backward and weights ops replay a mask
  // when given the same seed.
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? bias=None, float dropout_p=0.0, "
      "bool is_causal=False, bool bottom_right=False, float? scale=None, Tensor? dropout_seed=None) "
      "-> (Tensor out, Tensor logsumexp)");
  // Recomputes probabilities from the logsumexp; grad_bias is empty unless bias_requires_grad.
  m.def(
      "attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? bias, "
      "Tensor out, Tensor logsumexp, float dropout_p, bool is_causal, bool bottom_right, "
      "float? scale, Tensor? dropout_seed, bool bias_requires_grad) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_bias)");
  // The (B, H, L, S) attention probabilities (after dropout) rebuilt from a logsumexp
  // returned by `attention`: only materialised when a caller asks for weights. With
  // average_heads, their mean over heads (B, L, S), without the per-head tensor.
  m.def(
      "attention_weights(Tensor query, Tensor key, Tensor? bias, Tensor logsumexp, "
      "float dropout_p=0.0, bool is_causal=False, bool bottom_right=False, float? scale=None, "
      "Tensor? dropout_seed=None, bool average_heads=False) -> Tensor");
  // `attention` and `attention_weights` in one call (need_weights=True): the CPU kernel
  // computes Q K^T once for both; other devices run the two ops with one dropout seed.
  m.def(
      "attention_with_weights(Tensor query, Tensor key, Tensor value, Tensor? bias=None, "
      "float dropout_p=0.0, bool is_causal=False, bool bottom_right=False, float? scale=None, "
      "Tensor? dropout_seed=None, bool average_heads=False) "
      "-> (Tensor out, Tensor logsumexp, Tensor weights)");
  m.def(
      "attention_weights_backward(Tensor grad_weights, Tensor query, Tensor key, Tensor? bias, "
      "Tensor logsumexp, float dropout_p, bool is_causal, bool bottom_right, float? scale, "
      "Tensor? dropout_seed, bool bias_requires_grad) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_bias)");

  // The projection ops: whole attention layers on batch-first (N, L, E) tensors that
  // project, attend and project back (MultiheadAttention's packed in-projection, causal
  // self-attention, cross-attention with kdim).
  m.def(
      "multi_head_attention(Tensor query, Tensor key, Tensor value, int num_heads, "
      "Tensor in_proj_weight, Tensor? in_proj_bias, Tensor out_proj_weight, Tensor? out_proj_bias, "
      "Tensor? attn_bias=None, bool is_causal=False, float dropout_p=0.0, "
      "Tensor? dropout_seed=None) -> Tensor");
  m.def(
      "masked_self_attention(Tensor x, int num_heads, Tensor in_proj_weight, Tensor? in_proj_bias, "
      "Tensor out_proj_weight, Tensor? out_proj_bias, Tensor? attn_bias=None, float dropout_p=0.0, "
      "Tensor? dropout_seed=None) -> Tensor");
  m.def(
      "cross_attention(Tensor query, Tensor memory, int num_heads, Tensor q_proj_weight, "
      "Tensor k_proj_weight, Tensor v_proj_weight, Tensor? in_proj_bias, Tensor out_proj_weight, "
      "Tensor? out_proj_bias, Tensor? attn_bias=None, float dropout_p=0.0, "
      "Tensor? dropout_seed=None) -> Tensor");
}
