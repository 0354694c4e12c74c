#pragma once
// What every kernel of the core attention ops shares: argument checks with clear messages,
// the canonical description of one call (shapes, scale, causal alignment, dropout), and the
// output layouts. CPU, CUDA and Meta kernels all check and allocate through here, so their
// errors and their output strides agree (fake tensors must match real ones exactly).
//
// Sizes come in two forms. AttentionShape holds c10::SymInt: under torch.compile with
// dynamic shapes they are symbols, and the checks and layouts below compare and allocate
// with them without ever reading a concrete integer (reading one would pin that size with a
// guard and recompile for the next length). AttentionParams holds the plain integers a
// device kernel loops over; it converts implicitly to an AttentionShape, so device kernels
// and Meta kernels share every check and every layout.
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace qkv {

struct AttentionParams {
  int64_t batch = 0, heads = 0, q_len = 0, kv_len = 0, head_dim = 0, v_head_dim = 0;
  // Key/value heads: query head h reads key/value head h / (heads / kv_heads) (grouped-query
  // attention; kv_heads == heads without it).
  int64_t kv_heads = 0;
  double scale = 1.0;
  bool is_causal = false;
  // Key j is hidden from query i when j > i + causal_offset (0: top-left, S - L: bottom-right).
  int64_t causal_offset = 0;
  // Alignment of the causal mask, the window and the ALiBi distances: bottom-right (flash-attn's)
  // measures from i + S - L, top-left from i.
  bool bottom_right = false;
  // Query i sees keys [i + offset - window_left, i + offset + window_right]; -1 is unbounded
  // (is_causal bounds the right side at 0 whatever window_right says).
  int64_t window_left = -1, window_right = -1;
  // Scores s become softcap * tanh(s / softcap) before ALiBi, the bias and the masks (0: off).
  double softcap = 0.0;
  // ALiBi adds -slope[b, h] * |i + offset - j| (slopes float32 (H,) or (B, H)).
  bool has_alibi = false;
  double dropout_p = 0.0;
  uint64_t dropout_seed = 0;
  bool has_bias = false;
};

// The sizes of one call: query (batch, heads, q_len, head_dim), key (batch, kv_heads, kv_len,
// head_dim), value (batch, kv_heads, kv_len, v_head_dim).
struct AttentionShape {
  c10::SymInt batch, heads, q_len, kv_len, head_dim, v_head_dim, kv_heads;

  AttentionShape(c10::SymInt batch, c10::SymInt heads, c10::SymInt q_len, c10::SymInt kv_len,
                 c10::SymInt head_dim, c10::SymInt v_head_dim, c10::SymInt kv_heads)
      : batch(std::move(batch)), heads(std::move(heads)), q_len(std::move(q_len)), kv_len(std::move(kv_len)),
        head_dim(std::move(head_dim)), v_head_dim(std::move(v_head_dim)), kv_heads(std::move(kv_heads)) {}
  // NOLINTNEXTLINE(google-explicit-constructor): a device kernel's params are a (concrete) shape.
  AttentionShape(const AttentionParams& p)
      : AttentionShape(p.batch, p.heads, p.q_len, p.kv_len, p.head_dim, p.v_head_dim, p.kv_heads) {}
};

// ---- checks ---------------------------------------------------------------------------------
// `op` is the op name used as the message prefix, e.g. "qkv.attention". Every message names
// the argument, what was expected and what came.

// "a 3-D Float tensor of shape [2, 5, 8] on cpu": how messages show a tensor that came.
std::string describe(const at::Tensor& t);
// float32, float64, float16 or bfloat16: the dtypes the kernels take.
bool is_supported_dtype(at::ScalarType t);
// "<name> must be a tensor" of `dim` dimensions, `layout` naming them, e.g. "(batch, heads, query_len, head_dim)".
void check_dims(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout);
// `t` has the query's dtype and device.
void check_like_query(const char* op, const char* name, const at::Tensor& t, const at::Tensor& query);

// Every check of query/key/value/bias/dropout_p/scale/dropout_seed and the score options, on
// symbolic sizes: what the Meta kernels run. Does not read the seed. key and value may have
// fewer heads than the query (a divisor of its heads: grouped-query attention).
AttentionShape check_attention_inputs(const char* op, const at::Tensor& query, const at::Tensor& key,
                                      const at::Tensor& value, const std::optional<at::Tensor>& bias,
                                      double dropout_p, std::optional<double> scale,
                                      const std::optional<at::Tensor>& dropout_seed, int64_t window_left = -1,
                                      int64_t window_right = -1, double softcap = 0.0,
                                      const std::optional<at::Tensor>& alibi_slopes = std::nullopt);

// check_attention_inputs, then the concrete params a device kernel needs, with the dropout seed
// settled: the one given, or, with dropout_p > 0 and none given, a fresh draw.
AttentionParams check_attention_args(const char* op, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const std::optional<at::Tensor>& bias,
                                     double dropout_p, bool is_causal, bool bottom_right,
                                     std::optional<double> scale,
                                     const std::optional<at::Tensor>& dropout_seed, int64_t window_left = -1,
                                     int64_t window_right = -1, double softcap = 0.0,
                                     const std::optional<at::Tensor>& alibi_slopes = std::nullopt);

// The options of issue 17 (docs/flash-attn-api.md): window_left/right >= -1, softcap finite and
// >= 0, alibi_slopes a float32 (heads,) or (batch, heads) tensor on the query's device.
void check_score_options(const char* op, const at::Tensor& query, const AttentionShape& shape, int64_t window_left,
                         int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes);
// Stores them, checked, in a device kernel's params.
void set_score_options(AttentionParams& p, bool is_causal, bool bottom_right, int64_t window_left,
                       int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes);

// "query's heads (H) must be divisible by key's heads (Hk)": grouped-query attention.
void check_head_groups(const char* op, const c10::SymInt& heads, const c10::SymInt& kv_heads);

// The seed a device kernel uses: the one given (a CPU tensor, read without a device sync), or
// a fresh draw with dropout_p > 0; 0 without dropout or on meta tensors.
uint64_t settle_dropout_seed(const at::Tensor& query, double dropout_p, const std::optional<at::Tensor>& dropout_seed);

// The dropout seed contract: absent, or a 0-dim int64 tensor on the CPU (a seed of any other
// device would have to be read back first; a 0-dim CPU tensor is also the one kind of tensor
// that fake-tensor device propagation accepts beside inputs of any device). A meta seed is
// accepted only with a meta query (shape-only calls, where nothing reads it).
void check_dropout_seed(const char* op, const at::Tensor& query, const std::optional<at::Tensor>& dropout_seed);

// A tensor the op receives besides query/key/value/bias (logsumexp, out, gradients): a `dtype`
// tensor of exactly `shape` on the query's device.
void check_tensor_arg(const char* op, const char* name, const at::Tensor& t, const at::Tensor& query,
                      at::ScalarType dtype, c10::SymIntArrayRef shape);

// A backward op must drop what its forward dropped: with dropout_p > 0 the forward's seed is
// required (a fresh draw would give gradients of a different mask).
void check_replay_seed(const char* op, double dropout_p, const std::optional<at::Tensor>& dropout_seed);

// The tensors the backward op receives besides query/key/value/bias, and its seed.
void check_backward_args(const char* op, const at::Tensor& query, const at::Tensor& grad_out,
                         const at::Tensor& out, const at::Tensor& logsumexp, const AttentionShape& shape,
                         double dropout_p, const std::optional<at::Tensor>& dropout_seed);
void check_logsumexp_for_weights(const char* op, const at::Tensor& query, const at::Tensor& logsumexp,
                                 const AttentionShape& shape);

// qkv.attention_weights's checks (key is also the value, plus the logsumexp): symbolic for the
// Meta kernel, and with the concrete params for the device kernels.
AttentionShape check_attention_weights_inputs(const at::Tensor& query, const at::Tensor& key,
                                              const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                              double dropout_p, std::optional<double> scale,
                                              const std::optional<at::Tensor>& dropout_seed, int64_t window_left = -1,
                                              int64_t window_right = -1, double softcap = 0.0,
                                              const std::optional<at::Tensor>& alibi_slopes = std::nullopt);
AttentionParams check_attention_weights_args(const at::Tensor& query, const at::Tensor& key,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& logsumexp,
                                             double dropout_p, bool is_causal, bool bottom_right,
                                             std::optional<double> scale,
                                             const std::optional<at::Tensor>& dropout_seed, int64_t window_left = -1,
                                             int64_t window_right = -1, double softcap = 0.0,
                                             const std::optional<at::Tensor>& alibi_slopes = std::nullopt);

// ---- packed self-attention (attention_qkvpacked) ----------------------------------------------

// qkv is a packed (batch, seq, 3, heads, head_dim) tensor of a dtype the kernels take; the messages
// name `qkv`. (Everything else `attention` checks, on the three views.)
void check_qkvpacked(const char* op, const at::Tensor& qkv);
// The query, key and value of a packed (B, L, 3, H, D) tensor as (B, H, L, D) views (no copies):
// packed[:, :, i].transpose(1, 2). Also the views a gradient buffer is written through.
std::array<at::Tensor, 3> split_packed_qkv(const at::Tensor& packed);
// The buffer of qkv's gradient: qkv's strides when it is dense and non-overlapping (the gradient of
// a projection's view stays a view of one buffer all the way back), contiguous otherwise. Every
// device's kernel allocates it here, so fake tensors get the real strides.
at::Tensor empty_qkv_gradient(const at::Tensor& qkv);

// ---- layouts ----------------------------------------------------------------------------------

// The bias as a 4-D (B, H, L, S) view with zero strides on broadcast dimensions (no copy).
at::Tensor expand_bias(const at::Tensor& bias, const AttentionShape& shape);

// A (B, H, L, last_dim) tensor shaped like `like` but stored as (B, L, H, last_dim): the
// layout of outputs and gradients, so merging heads afterwards needs no copy.
at::Tensor empty_token_major(const at::Tensor& like, const c10::SymInt& last_dim);
at::Tensor empty_attention_output(const at::Tensor& query, const AttentionShape& shape);
// Attention weights: (B, H, L, S), or (B, L, S) when averaged over heads.
at::Tensor empty_attention_weights(const at::Tensor& query, const AttentionShape& shape, bool average_heads);
// The bias gradient (bias's shape), or an empty tensor when it is not wanted.
at::Tensor empty_grad_bias(const std::optional<at::Tensor>& bias, bool bias_requires_grad,
                           const at::Tensor& query);
// Logsumexp (B, H, L) in the accumulation type: float32 for reduced precision, else query's dtype.
at::ScalarType logsumexp_dtype(const at::Tensor& query);
at::Tensor empty_logsumexp(const at::Tensor& query, const AttentionShape& shape);

// ---- dropout seed -----------------------------------------------------------------------------

// Draws a fresh seed, a 0-dim int64 CPU tensor, from torch's default CPU generator (honours
// torch.manual_seed).
at::Tensor draw_dropout_seed();
// The seed a call settled on (`AttentionParams::dropout_seed`) as the tensor the ops take, so
// that a call passing work on to other ops does not draw a second one.
at::Tensor dropout_seed_tensor(uint64_t seed);

// attention_with_weights as its two ops, `attention` then `attention_weights` from its
// logsumexp, under one dropout seed: the kernel wherever no fused one is registered
// (composite_ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_then_weights(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& bias,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed, bool average_heads, int64_t window_left = -1,
    int64_t window_right = -1, double softcap = 0.0, const std::optional<at::Tensor>& alibi_slopes = std::nullopt);

}  // namespace qkv
