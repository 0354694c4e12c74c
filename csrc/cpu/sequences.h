#pragma once
// Where each sequence of a call lives in the tensors the CPU kernels read, and which keys each
// of its queries sees. One kernel serves three layouts:
//  - dense (qkv.attention): sequence b is batch b, every sequence q_len x kv_len;
//  - packed (qkv.attention_varlen): (total, H, D) tensors seen as (1, H, total, D); sequence b
//    is rows cu_seqlens[b]..cu_seqlens[b + 1] of batch 0, no padding anywhere;
//  - dense with per-batch key counts (qkv.attention_kvcache): sequence b uses the first
//    kv_lens[b] keys of its cache.
// The logical index b (not the tensor batch) drives the dropout counter and the ALiBi slopes.
#include "../attention_common.h"

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace qkv {
inline namespace CPU_CAPABILITY {  // this copy's instruction set (cpu_capability.h)

struct Sequence {
  int64_t b = 0;           // the sequence's index: dropout counter, ALiBi slopes, bias
  int64_t tb = 0;          // its batch index in the tensors (0 for packed tensors)
  int64_t q0 = 0, k0 = 0;  // its first query / key row in the tensors' sequence dimension
  int64_t q_len = 0, kv_len = 0;
  int64_t offset = 0;             // kv_len - q_len when bottom-right aligned, else 0
  int64_t left = -1, right = -1;  // the window around i + offset; -1 unbounded (causal: right = 0)

  // Query i sees keys [key_begin(i), key_end(i)) (empty when begin >= end); both grow with i.
  int64_t key_begin(int64_t i) const { return left < 0 ? 0 : std::clamp<int64_t>(i + offset - left, 0, kv_len); }
  int64_t key_end(int64_t i) const {
    return right < 0 ? kv_len : std::clamp<int64_t>(i + offset + right + 1, 0, kv_len);
  }
  // Key j is seen by queries [query_begin(j), query_end(j)); both grow with j.
  int64_t query_begin(int64_t j) const { return right < 0 ? 0 : std::clamp<int64_t>(j - offset - right, 0, q_len); }
  int64_t query_end(int64_t j) const {
    return left < 0 ? q_len : std::clamp<int64_t>(j - offset + left + 1, 0, q_len);
  }
  // The keys [begin, end) of tile [j0, j0 + cols) that query i sees, relative to j0 (begin >= end: none).
  std::pair<int64_t, int64_t> visible(int64_t i, int64_t j0, int64_t cols) const {
    const int64_t begin = std::clamp<int64_t>(key_begin(i) - j0, 0, cols);
    return {begin, std::max(begin, std::clamp<int64_t>(key_end(i) - j0, 0, cols))};
  }
  // Whether every query of [i0, i1) sees every key of [j0, j1).
  bool sees_all(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return key_begin(i1 - 1) <= j0 && key_end(i0) >= j1;
  }
};

class SequenceLayout {
 public:
  // Sequence b is batch b of the tensors, q_len x kv_len (kv_lens: per-batch key counts).
  static SequenceLayout dense(const AttentionParams& p, std::vector<int64_t> kv_lens = {}) {
    SequenceLayout layout(p);
    layout.count_ = p.batch;
    layout.kv_lens_ = std::move(kv_lens);
    layout.lse_batch_stride_ = p.heads * p.q_len;
    layout.lse_head_stride_ = p.q_len;
    layout.rows_ = p.batch * p.heads * p.q_len;
    return layout;
  }
  // Packed sequences: b is rows cu_q[b]..cu_q[b + 1] (keys: cu_k) of a (1, H, total, D) view;
  // the logsumexp is (H, total_q).
  static SequenceLayout packed(const AttentionParams& p, std::vector<int64_t> cu_q, std::vector<int64_t> cu_k,
                               int64_t total_q) {
    SequenceLayout layout(p);
    layout.count_ = static_cast<int64_t>(cu_q.size()) - 1;
    layout.cu_q_ = std::move(cu_q);
    layout.cu_k_ = std::move(cu_k);
    layout.lse_batch_stride_ = 0;
    layout.lse_head_stride_ = total_q;
    layout.rows_ = p.heads * total_q;
    return layout;
  }

  int64_t count() const { return count_; }
  bool is_packed() const { return !cu_q_.empty(); }

  Sequence operator[](int64_t b) const {
    Sequence s;
    s.b = b;
    if (is_packed()) {
      s.tb = 0;
      s.q0 = cu_q_[b], s.k0 = cu_k_[b];
      s.q_len = cu_q_[b + 1] - cu_q_[b], s.kv_len = cu_k_[b + 1] - cu_k_[b];
    } else {
      s.tb = b;
      s.q_len = q_len_;
      s.kv_len = kv_lens_.empty() ? kv_len_ : kv_lens_[b];
    }
    s.offset = bottom_right_ ? s.kv_len - s.q_len : 0;
    s.left = left_, s.right = right_;
    return s;
  }

  // The index of query row (s, h, i) in the logsumexp, and in every per-row buffer (delta, dQ
  // partials, normalizers): a bijection onto [0, rows()).
  int64_t row(const Sequence& s, int64_t h, int64_t i) const {
    return s.tb * lse_batch_stride_ + h * lse_head_stride_ + s.q0 + i;
  }
  int64_t rows() const { return rows_; }

 private:
  explicit SequenceLayout(const AttentionParams& p)
      : q_len_(p.q_len), kv_len_(p.kv_len), bottom_right_(p.bottom_right), left_(p.window_left),
        right_(p.is_causal ? 0 : p.window_right) {}

  int64_t count_ = 0, q_len_ = 0, kv_len_ = 0;
  bool bottom_right_ = false;
  int64_t left_ = -1, right_ = -1;
  std::vector<int64_t> cu_q_, cu_k_, kv_lens_;
  int64_t lse_batch_stride_ = 0, lse_head_stride_ = 0, rows_ = 0;
};

}  // namespace CPU_CAPABILITY
}  // namespace qkv
