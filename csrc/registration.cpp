// Every qkv operator schema, in one place. Kernels are registered per dispatch key in the
// files that implement them: cpu/, cuda/, meta_kernels.cpp (Meta), autograd.cpp (Autograd),
// composite_ops.cpp (the core ops composed of others) and projection_ops.cpp (the projection
// ops: whole attention layers).
#include <torch/library.h>

// The score options of issue 17, the same trailing arguments of every core op that computes
// scores (docs/flash-attn-api.md).
#define SCORE_OPTIONS "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None"

TORCH_LIBRARY(qkv, m) {
  // Core attention, layout (batch, heads, seq, head_dim), any strides. Returns the output
  // and the per-row logsumexp of the scaled, biased scores (-inf for rows that attend to
  // nothing, whose output is 0). `bias` is additive, in the query's dtype or float32, and
  // broadcasts to (B, H, L, S); only -inf hides a key (finite values are added as they are).
  // Causal hides key j from query i when j > i (top-left) or j > i + S - L (bottom_right).
  // key/value may have fewer heads Hk than the query (H % Hk == 0): query head h reads key/value
  // head h / (H / Hk) in place (grouped-query attention). The options of issue 17: query i sees
  // keys [i + off - window_left, i + off + window_right] (-1 unbounded; is_causal sets the right
  // side to 0; off = S - L with bottom_right, else 0); softcap > 0 maps a score s to
  // softcap * tanh(s / softcap), then ALiBi adds -alibi_slopes[b, h] * |i + off - j| (float32 (H,)
  // or (B, H)), then the bias and the masks apply.
  // Dropout keeps each probability by a counter-based hash of (dropout_seed, b, h, i, j).
  // dropout_seed is a 0-dim int64 CPU tensor whatever the inputs' device (read on the host;
  // fake tensors accept it beside inputs of any device); with dropout_p > 0 and none given,
  // one is drawn from torch's default generator. The backward and weights ops replay a mask
  // when given the same seed.
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? bias=None, float dropout_p=0.0, "
      "bool is_causal=False, bool bottom_right=False, float? scale=None, Tensor? dropout_seed=None, "
      SCORE_OPTIONS ") -> (Tensor out, Tensor logsumexp)");
  // Recomputes probabilities from the logsumexp; grad_bias is empty unless bias_requires_grad.
  m.def(
      "attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? bias, "
      "Tensor out, Tensor logsumexp, float dropout_p, bool is_causal, bool bottom_right, "
      "float? scale, Tensor? dropout_seed, bool bias_requires_grad, " SCORE_OPTIONS ") "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_bias)");
  // The (B, H, L, S) attention probabilities (after dropout) rebuilt from a logsumexp
  // returned by `attention`: only materialised when a caller asks for weights. With
  // average_heads, their mean over heads (B, L, S), without the per-head tensor.
  m.def(
      "attention_weights(Tensor query, Tensor key, Tensor? bias, Tensor logsumexp, "
      "float dropout_p=0.0, bool is_causal=False, bool bottom_right=False, float? scale=None, "
      "Tensor? dropout_seed=None, bool average_heads=False, " SCORE_OPTIONS ") -> Tensor");
  // `attention` and `attention_weights` in one call (need_weights=True): the CPU kernel
  // computes Q K^T once for both; other devices run the two ops with one dropout seed.
  m.def(
      "attention_with_weights(Tensor query, Tensor key, Tensor value, Tensor? bias=None, "
      "float dropout_p=0.0, bool is_causal=False, bool bottom_right=False, float? scale=None, "
      "Tensor? dropout_seed=None, bool average_heads=False, " SCORE_OPTIONS ") "
      "-> (Tensor out, Tensor logsumexp, Tensor weights)");
  m.def(
      "attention_weights_backward(Tensor grad_weights, Tensor query, Tensor key, Tensor? bias, "
      "Tensor logsumexp, float dropout_p, bool is_causal, bool bottom_right, float? scale, "
      "Tensor? dropout_seed, bool bias_requires_grad, " SCORE_OPTIONS ") "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_bias)");

  // Self-attention on one packed tensor, flash-attn's qkvpacked layout: qkv (B, L, 3, H, D), any
  // strides; query = qkv[:, :, 0].transpose(1, 2), key and value the same for 1 and 2. Out and
  // logsumexp are exactly `attention`'s on those views (out (B, H, L, D)). L == S, so the causal
  // alignment does not matter (no bottom_right). Why an op: the views' backward would stack three
  // gradients into one (B, L, 3, H, D) buffer, a copy of it; the backward op writes dQ, dK and dV
  // into one buffer in place (on the CPU; other devices copy).
  m.def(
      "attention_qkvpacked(Tensor qkv, Tensor? bias=None, float dropout_p=0.0, bool is_causal=False, "
      "float? scale=None, Tensor? dropout_seed=None, " SCORE_OPTIONS ") -> (Tensor out, Tensor logsumexp)");
  // grad_qkv has qkv's shape, and its strides when qkv is dense and non-overlapping (contiguous
  // otherwise); grad_bias as attention_backward's.
  m.def(
      "attention_qkvpacked_backward(Tensor grad_out, Tensor qkv, Tensor? bias, Tensor out, Tensor logsumexp, "
      "float dropout_p, bool is_causal, float? scale, Tensor? dropout_seed, bool bias_requires_grad, "
      SCORE_OPTIONS ") -> (Tensor grad_qkv, Tensor grad_bias)");

  // Issue 17's doors into the same kernel (docs/flash-attn-api.md). Packed variable-length
  // sequences: query (total_q, H, D), key (total_k, Hk, D), value (total_k, Hk, Dv); sequence b
  // is rows cu_seqlens[b]..cu_seqlens[b + 1] (int32 or int64, batch + 1 offsets), no padding.
  // Returns out (total_q, H, Dv) and logsumexp (H, total_q). max_seqlen_q/k bound the sequences'
  // lengths (the dropout counter is ((b * H + h) * max_seqlen_q + i) * max_seqlen_k + j).
  m.def(
      "attention_varlen(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p=0.0, bool is_causal=False, "
      "bool bottom_right=False, float? scale=None, Tensor? dropout_seed=None, " SCORE_OPTIONS ") "
      "-> (Tensor out, Tensor logsumexp)");
  m.def(
      "attention_varlen_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor logsumexp, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
      "float dropout_p, bool is_causal, bool bottom_right, float? scale, Tensor? dropout_seed, " SCORE_OPTIONS ") "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  // Decoding from a KV cache (inference only): key/value (B, Hk, S_new, D), when given, are
  // written into k_cache/v_cache (B, Hk, S_cache, D) in place at rows cache_seqlens[b] (int32 or
  // int64 (B,); None: the whole cache is in use), then query (B, H, S_q, D) attends to the first
  // cache_seqlens[b] + S_new keys, bottom-right aligned.
  m.def(
      "attention_kvcache(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? key=None, "
      "Tensor? value=None, Tensor? cache_seqlens=None, bool is_causal=False, float? scale=None, "
      SCORE_OPTIONS ") "
      "-> (Tensor out, Tensor logsumexp)");

  // The projection ops: whole attention layers on batch-first (N, L, E) tensors that
  // project, attend and project back (MultiheadAttention's packed in-projection, causal
  // self-attention, cross-attention with kdim). num_kv_heads (grouped-query attention, default
  // num_heads): the key and value projections have num_kv_heads * head_dim rows
  // (in_proj_weight ((num_heads + 2 * num_kv_heads) * head_dim, E)). window_left/right: the
  // core op's window (masked_self_attention is causal: its right side is 0).
  m.def(
      "multi_head_attention(Tensor query, Tensor key, Tensor value, int num_heads, "
      "Tensor in_proj_weight, Tensor? in_proj_bias, Tensor out_proj_weight, Tensor? out_proj_bias, "
      "Tensor? attn_bias=None, bool is_causal=False, float dropout_p=0.0, "
      "Tensor? dropout_seed=None, int? num_kv_heads=None, int window_left=-1, int window_right=-1) -> Tensor");
  m.def(
      "masked_self_attention(Tensor x, int num_heads, Tensor in_proj_weight, Tensor? in_proj_bias, "
      "Tensor out_proj_weight, Tensor? out_proj_bias, Tensor? attn_bias=None, float dropout_p=0.0, "
      "Tensor? dropout_seed=None, int? num_kv_heads=None, int window_left=-1) -> Tensor");
  m.def(
      "cross_attention(Tensor query, Tensor memory, int num_heads, Tensor q_proj_weight, "
      "Tensor k_proj_weight, Tensor v_proj_weight, Tensor? in_proj_bias, Tensor out_proj_weight, "
      "Tensor? out_proj_bias, Tensor? attn_bias=None, float dropout_p=0.0, "
      "Tensor? dropout_seed=None, int? num_kv_heads=None) -> Tensor");
}
