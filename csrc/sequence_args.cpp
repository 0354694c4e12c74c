// Checks and layouts of qkv.attention_varlen and qkv.attention_kvcache (see sequence_args.h).
// Every message names the argument, what was expected and what came. Sizes are compared as
// SymInts where the Meta kernels run the check: nothing here pins a dynamic size.
#include "sequence_args.h"

#include <ATen/ATen.h>
#include <c10/core/SymBool.h>

#include <algorithm>
#include <string>

namespace qkv {
namespace {

void check_index_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& query,
                        const std::string& shape) {
  TORCH_CHECK((t.scalar_type() == at::kInt || t.scalar_type() == at::kLong) && t.device() == query.device(), op,
              ": ", name, " must be an int32 or int64 tensor of shape ", shape, " on ", query.device(), "; got ",
              describe(t));
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be a 1-D tensor of shape ", shape, "; got ", describe(t));
}

void check_scalars(const char* op, const at::Tensor& query, double dropout_p, std::optional<double> scale,
                   const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1]; got ", dropout_p);
  if (scale.has_value()) TORCH_CHECK(std::isfinite(*scale), op, ": scale must be a finite number; got ", *scale);
  check_dropout_seed(op, query, dropout_seed);
}

std::vector<int64_t> to_int64(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU).to(at::kLong).contiguous();
  const int64_t* data = c.const_data_ptr<int64_t>();
  return std::vector<int64_t>(data, data + c.numel());
}

double default_scale(std::optional<double> scale, int64_t head_dim) {
  return scale.has_value() ? *scale : head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0;
}

}  // namespace

// ---- attention_varlen ----------------------------------------------------------------------

AttentionShape check_varlen_inputs(const char* op, const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                   const at::Tensor& cu_seqlens_k, const c10::SymInt& max_seqlen_q,
                                   const c10::SymInt& max_seqlen_k, double dropout_p, std::optional<double> scale,
                                   const std::optional<at::Tensor>& dropout_seed, int64_t window_left,
                                   int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  check_dims(op, "query", query, 3, "(total_q, heads, head_dim)");
  check_dims(op, "key", key, 3, "(total_k, key_heads, head_dim)");
  check_dims(op, "value", value, 3, "(total_k, key_heads, value_head_dim)");
  TORCH_CHECK(is_supported_dtype(query.scalar_type()), op,
              ": query must be float32, float64, float16 or bfloat16; got ", describe(query));
  check_like_query(op, "key", key, query);
  check_like_query(op, "value", value, query);
  check_index_tensor(op, "cu_seqlens_q", cu_seqlens_q, query, "(batch + 1)");
  check_index_tensor(op, "cu_seqlens_k", cu_seqlens_k, query, "(batch + 1)");
  AttentionShape s(cu_seqlens_q.sym_size(0) - 1, query.sym_size(1), max_seqlen_q, max_seqlen_k, query.sym_size(2),
                   value.sym_size(2), key.sym_size(1));
  TORCH_SYM_CHECK(key.sym_size(2).sym_eq(s.head_dim), op, ": key must have shape (total_k, key_heads, ", s.head_dim,
                  ") to match query ", query.sym_sizes(), "; got ", describe(key));
  check_head_groups(op, s.heads, s.kv_heads);
  TORCH_SYM_CHECK(value.sym_size(0).sym_eq(key.sym_size(0)).sym_and(value.sym_size(1).sym_eq(s.kv_heads)), op,
                  ": value must have shape (", key.sym_size(0), ", ", s.kv_heads, ", value_head_dim) to match key ",
                  key.sym_sizes(), "; got ", describe(value));
  TORCH_SYM_CHECK(cu_seqlens_q.sym_size(0).sym_ge(1), op, ": cu_seqlens_q must have batch + 1 >= 1 entries; got ",
                  describe(cu_seqlens_q));
  TORCH_SYM_CHECK(cu_seqlens_k.sym_size(0).sym_eq(cu_seqlens_q.sym_size(0)), op,
                  ": cu_seqlens_k must have batch + 1 = ", cu_seqlens_q.sym_size(0), " entries, as cu_seqlens_q; got ",
                  describe(cu_seqlens_k));
  TORCH_SYM_CHECK(max_seqlen_q.sym_ge(0).sym_and(max_seqlen_k.sym_ge(0)), op,
                  ": max_seqlen_q and max_seqlen_k must be >= 0; got ", max_seqlen_q, " and ", max_seqlen_k);
  check_scalars(op, query, dropout_p, scale, dropout_seed);
  check_score_options(op, query, s, window_left, window_right, softcap, alibi_slopes);
  return s;
}

AttentionParams check_varlen_args(const char* op, const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                  const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                  double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
                                  const std::optional<at::Tensor>& dropout_seed, int64_t window_left,
                                  int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  check_varlen_inputs(op, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale,
                      dropout_seed, window_left, window_right, softcap, alibi_slopes);
  AttentionParams p;
  p.batch = cu_seqlens_q.size(0) - 1;
  p.heads = query.size(1);
  p.kv_heads = key.size(1);
  p.q_len = max_seqlen_q;
  p.kv_len = max_seqlen_k;
  p.head_dim = query.size(2);
  p.v_head_dim = value.size(2);
  p.dropout_p = dropout_p;
  p.scale = default_scale(scale, p.head_dim);
  set_score_options(p, is_causal, bottom_right, window_left, window_right, softcap, alibi_slopes);
  p.dropout_seed = settle_dropout_seed(query, dropout_p, dropout_seed);
  return p;
}

std::vector<int64_t> read_offsets(const char* op, const char* name, const at::Tensor& cu_seqlens, int64_t rows,
                                  const char* tensor_name, const char* max_name, int64_t max_seqlen,
                                  const char* which) {
  std::vector<int64_t> offsets = to_int64(cu_seqlens);
  TORCH_CHECK(offsets[0] == 0, op, ": ", name, " must start at 0; got ", offsets[0]);
  int64_t longest = 0;
  for (size_t b = 1; b < offsets.size(); ++b) {
    TORCH_CHECK(offsets[b] >= offsets[b - 1], op, ": ", name, " must be non-decreasing; got ", name, "[", b - 1,
                "] = ", offsets[b - 1], " > ", name, "[", b, "] = ", offsets[b]);
    longest = std::max(longest, offsets[b] - offsets[b - 1]);
  }
  TORCH_CHECK(offsets.back() <= rows, op, ": ", name, "'s last offset ", offsets.back(), " is past ", tensor_name,
              "'s ", rows, " rows");
  TORCH_CHECK(longest <= max_seqlen, op, ": ", max_name, " (", max_seqlen, ") must be at least the longest ", which,
              " sequence (", longest, ")");
  return offsets;
}

void check_varlen_backward_args(const char* op, const at::Tensor& query, const at::Tensor& grad_out,
                                const at::Tensor& out, const at::Tensor& logsumexp, const AttentionShape& s,
                                double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  const c10::SymInt out_shape[] = {query.sym_size(0), s.heads, s.v_head_dim};
  check_tensor_arg(op, "grad_out", grad_out, query, query.scalar_type(), out_shape);
  check_tensor_arg(op, "out", out, query, query.scalar_type(), out_shape);
  const c10::SymInt lse_shape[] = {s.heads, query.sym_size(0)};
  check_tensor_arg(op, "logsumexp", logsumexp, query, logsumexp_dtype(query), lse_shape);
  check_replay_seed(op, dropout_p, dropout_seed);
}

at::Tensor packed_as_4d(const at::Tensor& t) { return t.transpose(0, 1).unsqueeze(0); }

at::Tensor empty_varlen_output(const at::Tensor& query, const AttentionShape& s) {
  return at::empty_symint({query.sym_size(0), s.heads, s.v_head_dim}, query.options());
}

at::Tensor empty_varlen_logsumexp(const at::Tensor& query) {
  return at::empty_symint({query.sym_size(1), query.sym_size(0)}, query.options().dtype(logsumexp_dtype(query)));
}

at::Tensor empty_varlen_gradient(const at::Tensor& t) { return at::empty_symint(t.sym_sizes(), t.options()); }

// ---- attention_kvcache -----------------------------------------------------------------------

AttentionShape check_kvcache_inputs(const char* op, const at::Tensor& query, const at::Tensor& k_cache,
                                    const at::Tensor& v_cache, const std::optional<at::Tensor>& key,
                                    const std::optional<at::Tensor>& value,
                                    const std::optional<at::Tensor>& cache_seqlens, std::optional<double> scale,
                                    int64_t window_left, int64_t window_right, double softcap,
                                    const std::optional<at::Tensor>& alibi_slopes) {
  check_dims(op, "query", query, 4, "(batch, heads, query_len, head_dim)");
  check_dims(op, "k_cache", k_cache, 4, "(batch, key_heads, cache_len, head_dim)");
  check_dims(op, "v_cache", v_cache, 4, "(batch, key_heads, cache_len, value_head_dim)");
  TORCH_CHECK(is_supported_dtype(query.scalar_type()), op,
              ": query must be float32, float64, float16 or bfloat16; got ", describe(query));
  check_like_query(op, "k_cache", k_cache, query);
  check_like_query(op, "v_cache", v_cache, query);
  AttentionShape s(query.sym_size(0), query.sym_size(1), query.sym_size(2), k_cache.sym_size(2), query.sym_size(3),
                   v_cache.sym_size(3), k_cache.sym_size(1));
  TORCH_SYM_CHECK(k_cache.sym_size(0).sym_eq(s.batch).sym_and(k_cache.sym_size(3).sym_eq(s.head_dim)), op,
                  ": k_cache must have shape (", s.batch, ", key_heads, cache_len, ", s.head_dim, ") to match query ",
                  query.sym_sizes(), "; got ", describe(k_cache));
  check_head_groups(op, s.heads, s.kv_heads);
  TORCH_SYM_CHECK(v_cache.sym_size(0).sym_eq(s.batch).sym_and(v_cache.sym_size(1).sym_eq(s.kv_heads))
                      .sym_and(v_cache.sym_size(2).sym_eq(s.kv_len)),
                  op, ": v_cache must have shape (", s.batch, ", ", s.kv_heads, ", ", s.kv_len,
                  ", value_head_dim) to match k_cache ", k_cache.sym_sizes(), "; got ", describe(v_cache));
  const bool has_key = key.has_value() && key->defined(), has_value = value.has_value() && value->defined();
  TORCH_CHECK(has_key == has_value, op, ": key and value must be given together (the new keys and their values); got ",
              has_key ? "key" : "value", " only");
  if (has_key) {
    check_dims(op, "key", *key, 4, "(batch, key_heads, seqlen_new, head_dim)");
    check_dims(op, "value", *value, 4, "(batch, key_heads, seqlen_new, value_head_dim)");
    check_like_query(op, "key", *key, query);
    check_like_query(op, "value", *value, query);
    TORCH_SYM_CHECK(key->sym_size(0).sym_eq(s.batch).sym_and(key->sym_size(1).sym_eq(s.kv_heads))
                        .sym_and(key->sym_size(3).sym_eq(s.head_dim)),
                    op, ": key must have shape (", s.batch, ", ", s.kv_heads, ", seqlen_new, ", s.head_dim,
                    ") to match k_cache ", k_cache.sym_sizes(), "; got ", describe(*key));
    TORCH_SYM_CHECK(value->sym_size(0).sym_eq(s.batch).sym_and(value->sym_size(1).sym_eq(s.kv_heads))
                        .sym_and(value->sym_size(2).sym_eq(key->sym_size(2)))
                        .sym_and(value->sym_size(3).sym_eq(s.v_head_dim)),
                    op, ": value must have shape (", s.batch, ", ", s.kv_heads, ", ", key->sym_size(2), ", ",
                    s.v_head_dim, ") to match key and v_cache; got ", describe(*value));
  }
  const bool has_lengths = cache_seqlens.has_value() && cache_seqlens->defined();
  TORCH_CHECK(has_lengths || !has_key, op,
              ": cache_seqlens is required when key and value are given (where the new keys go); got None");
  if (has_lengths) {
    const std::string shape = "(" + c10::str(s.batch) + ")";
    check_index_tensor(op, "cache_seqlens", *cache_seqlens, query, shape);
    TORCH_SYM_CHECK(cache_seqlens->sym_size(0).sym_eq(s.batch), op, ": cache_seqlens must have shape ", shape,
                    "; got ", describe(*cache_seqlens));
  }
  if (scale.has_value()) TORCH_CHECK(std::isfinite(*scale), op, ": scale must be a finite number; got ", *scale);
  check_score_options(op, query, s, window_left, window_right, softcap, alibi_slopes);
  return s;
}

KvcacheArgs check_kvcache_args(const char* op, const at::Tensor& query, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const std::optional<at::Tensor>& key,
                               const std::optional<at::Tensor>& value, const std::optional<at::Tensor>& cache_seqlens,
                               bool is_causal, std::optional<double> scale, int64_t window_left, int64_t window_right,
                               double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  check_kvcache_inputs(op, query, k_cache, v_cache, key, value, cache_seqlens, scale, window_left, window_right,
                       softcap, alibi_slopes);
  KvcacheArgs args;
  AttentionParams& p = args.p;
  p.batch = query.size(0);
  p.heads = query.size(1);
  p.q_len = query.size(2);
  p.head_dim = query.size(3);
  p.kv_heads = k_cache.size(1);
  p.kv_len = k_cache.size(2);
  p.v_head_dim = v_cache.size(3);
  p.scale = default_scale(scale, p.head_dim);
  set_score_options(p, is_causal, /*bottom_right=*/true, window_left, window_right, softcap, alibi_slopes);
  args.new_len = key.has_value() && key->defined() ? key->size(2) : 0;
  if (cache_seqlens.has_value() && cache_seqlens->defined()) {
    args.positions = to_int64(*cache_seqlens);
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t n = args.positions[b];
      TORCH_CHECK(n >= 0, op, ": cache_seqlens must be >= 0; got ", n, " at batch ", b);
      TORCH_CHECK(n + args.new_len <= p.kv_len, op, ": k_cache has room for ", p.kv_len, " keys; cache_seqlens[", b,
                  "] + seqlen_new = ", n + args.new_len, " (", n, " + ", args.new_len, ")");
      args.kv_lens.push_back(n + args.new_len);
    }
  } else {
    args.kv_lens.assign(p.batch, p.kv_len);
  }
  return args;
}

void write_into_caches(const KvcacheArgs& args, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& key, const at::Tensor& value) {
  if (args.new_len == 0 || args.positions.empty()) return;
  const bool same = std::all_of(args.positions.begin(), args.positions.end(),
                                [&](int64_t n) { return n == args.positions[0]; });
  if (same) {  // one copy per cache (an int cache_seqlens)
    k_cache.narrow(2, args.positions[0], args.new_len).copy_(key);
    v_cache.narrow(2, args.positions[0], args.new_len).copy_(value);
    return;
  }
  for (int64_t b = 0; b < static_cast<int64_t>(args.positions.size()); ++b) {
    k_cache[b].narrow(1, args.positions[b], args.new_len).copy_(key[b]);
    v_cache[b].narrow(1, args.positions[b], args.new_len).copy_(value[b]);
  }
}

}  // namespace qkv
