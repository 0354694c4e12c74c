#pragma once
// The arguments of the two doors into the core kernel that give each sequence its own length:
// qkv.attention_varlen (packed sequences, offsets cu_seqlens) and qkv.attention_kvcache (a
// cache per batch element, cache_seqlens keys in use). Checks that name the argument (symbolic
// for the Meta kernels, then concrete for the device kernels, as attention_common.h), the views
// the kernels read, and the output layouts shared by the CPU and Meta kernels.
#include "attention_common.h"

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace qkv {

// ---- attention_varlen ----------------------------------------------------------------------

// Shape, dtype and device checks, no offsets read (what the Meta kernel runs). The shape's
// batch is the number of sequences and q_len / kv_len are max_seqlen_q / max_seqlen_k.
AttentionShape check_varlen_inputs(const char* op, const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                   const at::Tensor& cu_seqlens_k, const c10::SymInt& max_seqlen_q,
                                   const c10::SymInt& max_seqlen_k, double dropout_p, std::optional<double> scale,
                                   const std::optional<at::Tensor>& dropout_seed, int64_t window_left,
                                   int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes);

// check_varlen_inputs, then the concrete params: max_seqlen_q / max_seqlen_k as q_len / kv_len
// (the dropout counter's strides), the score options and the settled seed.
AttentionParams check_varlen_args(const char* op, const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                  const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                  double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
                                  const std::optional<at::Tensor>& dropout_seed, int64_t window_left,
                                  int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes);

// The offsets as integers, checked: start at 0, non-decreasing, the last within `rows` of
// `tensor_name`; and max_seqlen at least the longest sequence.
std::vector<int64_t> read_offsets(const char* op, const char* name, const at::Tensor& cu_seqlens, int64_t rows,
                                  const char* tensor_name, const char* max_name, int64_t max_seqlen,
                                  const char* which);

// grad_out and out (total_q, H, Dv) in the query's dtype, logsumexp (H, total_q) in the
// accumulation type, all on the query's device; the forward's seed with dropout.
void check_varlen_backward_args(const char* op, const at::Tensor& query, const at::Tensor& grad_out,
                                const at::Tensor& out, const at::Tensor& logsumexp, const AttentionShape& shape,
                                double dropout_p, const std::optional<at::Tensor>& dropout_seed);

// (total, H, D) as the (1, H, total, D) view the kernels read (no copy).
at::Tensor packed_as_4d(const at::Tensor& t);

// out (total_q, H, Dv) and logsumexp (H, total_q), and a gradient shaped like `t`, contiguous.
at::Tensor empty_varlen_output(const at::Tensor& query, const AttentionShape& shape);
at::Tensor empty_varlen_logsumexp(const at::Tensor& query);
at::Tensor empty_varlen_gradient(const at::Tensor& t);

// ---- attention_kvcache -----------------------------------------------------------------------

// Every check that needs no cache length (what the Meta kernel runs); the shape's kv_len is the
// cache's length. Always bottom-right aligned.
AttentionShape check_kvcache_inputs(const char* op, const at::Tensor& query, const at::Tensor& k_cache,
                                    const at::Tensor& v_cache, const std::optional<at::Tensor>& key,
                                    const std::optional<at::Tensor>& value,
                                    const std::optional<at::Tensor>& cache_seqlens, std::optional<double> scale,
                                    int64_t window_left, int64_t window_right, double softcap,
                                    const std::optional<at::Tensor>& alibi_slopes);

struct KvcacheArgs {
  AttentionParams p;               // kv_len = the cache's length
  int64_t new_len = 0;             // keys written per batch element
  std::vector<int64_t> positions;  // where they go: cache_seqlens
  std::vector<int64_t> kv_lens;    // keys attended per batch element: positions + new_len
};

// check_kvcache_inputs, then the params and the cache lengths (read from cache_seqlens, checked
// against the room in the caches).
KvcacheArgs check_kvcache_args(const char* op, const at::Tensor& query, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const std::optional<at::Tensor>& key,
                               const std::optional<at::Tensor>& value, const std::optional<at::Tensor>& cache_seqlens,
                               bool is_causal, std::optional<double> scale, int64_t window_left, int64_t window_right,
                               double softcap, const std::optional<at::Tensor>& alibi_slopes);

// Writes key/value into the caches at positions[b] (in place).
void write_into_caches(const KvcacheArgs& args, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& key, const at::Tensor& value);

}  // namespace qkv
