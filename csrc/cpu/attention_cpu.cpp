// CPU kernels of the core attention op: flash-style forward (online softmax over key blocks,
// only a per-row logsumexp saved) and backward (probabilities recomputed from the
// logsumexp). No L x S buffer is ever allocated: work happens in (query block x key block)
// tiles held in per-thread scratch. The explicit weights are in attention_weights_cpu.cpp.
//
// The right-hand operand of every tile product is packed into panels (packed_gemm.h), which
// also converts half/bfloat16 to float32 and absorbs any strides; the left-hand operand is
// read in place when it already is float32/float64 rows. Arithmetic accumulates in float32
// (float64 stays float64 for gradcheck).
#include "../sequence_args.h"
#include "backward_tasks.h"
#include "cpu_kernels.h"
#include "amx_backward.h"
#include "amx_tiles.h"
#include "tile_context.h"

#include <ATen/Dispatch.h>

#include <array>
#include <optional>

namespace qkv {
inline namespace CPU_CAPABILITY {  // this copy's instruction set (cpu_capability.h)
namespace {

// ---- forward ----------------------------------------------------------------------------

// The online softmax of a block of rows: running maxima and sums, and P V summed in plain
// partials of kForwardTilesPerPartial key tiles (`acc`) that go into a compensated sum
// (out_sum, out_err) once there is more than one; the row sums are compensated tile by tile.
// Rows that see few tiles (a window's band, short sequences) never touch out_sum and out_err.
template <typename acc_t>
struct OnlineSoftmax {
  acc_t* acc;
  acc_t* out_sum;
  acc_t* out_err;
  acc_t* row_max;
  acc_t* row_sum;
  acc_t* row_sum_err;
  acc_t* tile_max;
  int64_t ld_acc, Dv;
  int64_t partials = 0;  // partials summed into out_sum / out_err so far

  static int64_t scratch_size(int64_t rows, int64_t ld_acc) { return 3 * rows * ld_acc + 4 * rows; }
  OnlineSoftmax(acc_t* scratch, int64_t rows, int64_t ld_acc_, int64_t Dv_) : ld_acc(ld_acc_), Dv(Dv_) {
    acc = scratch;
    out_sum = acc + rows * ld_acc;
    out_err = out_sum + rows * ld_acc;
    row_max = out_err + rows * ld_acc;
    row_sum = row_max + rows;
    row_sum_err = row_sum + rows;
    tile_max = row_sum_err + rows;
  }

  void reset(int64_t rows) {
    std::fill(acc, acc + rows * ld_acc, acc_t(0));
    std::fill(row_max, row_max + rows, -std::numeric_limits<acc_t>::infinity());
    std::fill(row_sum, row_sum + rows, acc_t(0));
    std::fill(row_sum_err, row_sum_err + rows, acc_t(0));
    partials = 0;
  }

  // Row r's scores over [begin, end) of a tile become its unnormalised probabilities, against the
  // running maximum (raised to the tile's, tile_max[r], rescaling what was summed before).
  void update_row(int64_t r, acc_t* s, int64_t begin, int64_t end, acc_t log2_per_unit) const {
    const std::optional<acc_t> shift = raise_max(r, log2_per_unit);
    if (!shift) {  // nothing visible to this row yet
      std::fill(s + begin, s + end, acc_t(0));
      return;
    }
    add_to_sum(r, exp2_and_sum(s + begin, end - begin, *shift, log2_per_unit));
  }

  // The first half of update_row: raises row r's running maximum to the tile's, rescaling what
  // was summed before, and returns it (what its scores' exp2 subtracts), or nothing while the row
  // has seen no key. The caller then adds the tile's probabilities' sum (add_to_sum).
  std::optional<acc_t> raise_max(int64_t r, acc_t log2_per_unit) const {
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    // A NaN score (from a NaN or inf input) must reach the output, never read as "nothing visible".
    const acc_t new_max = std::isnan(tile_max[r]) ? tile_max[r] : std::max(row_max[r], tile_max[r]);
    if (new_max == neg_inf) return std::nullopt;
    if (new_max != row_max[r]) {  // rescale only when the running maximum moves
      const acc_t correction = std::exp2((row_max[r] - new_max) * log2_per_unit);
      row_sum[r] *= correction;
      row_sum_err[r] *= correction;
      scale_row(acc + r * ld_acc, Dv, correction);
      if (partials > 0) {
        scale_row(out_sum + r * ld_acc, Dv, correction);
        scale_row(out_err + r * ld_acc, Dv, correction);
      }
      row_max[r] = new_max;
    }
    return new_max;
  }
  void add_to_sum(int64_t r, acc_t tile_sum) const { add_compensated(row_sum[r], row_sum_err[r], tile_sum); }

  // Called every kForwardTilesPerPartial key tiles: acc goes into the compensated sum.
  void add_partial(int64_t rows) {
    if (partials == 0) {
      std::copy(acc, acc + rows * ld_acc, out_sum);
      std::fill(out_err, out_err + rows * ld_acc, acc_t(0));
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        add_compensated(out_sum + r * ld_acc, out_err + r * ld_acc, acc + r * ld_acc, Dv);
      }
    }
    std::fill(acc, acc + rows * ld_acc, acc_t(0));
    ++partials;
  }

  // Row r's unnormalised output, once every tile is in (the last partial included here), and
  // its row sum.
  std::pair<const acc_t*, acc_t> finish_row(int64_t r) const {
    acc_t* row = acc + r * ld_acc;
    if (partials > 0) {
      acc_t* sum = out_sum + r * ld_acc;
      add_compensated(sum, out_err + r * ld_acc, row, Dv);
      add_scaled_row(sum, out_err + r * ld_acc, Dv, acc_t(1), true);
      row = sum;
    }
    return {row, row_sum[r] + row_sum_err[r]};
  }
};

template <typename scalar_t>
struct ForwardOutputs {
  using acc_t = at::opmath_type<scalar_t>;
  MutableStrided4<scalar_t> o;
  acc_t* lse;
  const SequenceLayout& layout;

  // Stores row (s, h, i): `row` / `sum` (zeros when the row saw nothing) and its logsumexp.
  void store(const TileContext<scalar_t>& ctx, const Sequence& s, int64_t h, int64_t i, const acc_t* row,
             acc_t max, acc_t sum) const {
    const bool empty = sum == acc_t(0);
    store_row(o.at(s.tb, h, s.q0 + i), o.s3, row, ctx.p.v_head_dim, empty ? acc_t(0) : acc_t(1) / sum);
    lse[layout.row(s, h, i)] = empty ? -std::numeric_limits<acc_t>::infinity() : ctx.logsumexp(max, sum);
  }
};

// The tile products of forward_tiled. `FmaProducts`: the AVX-512/AVX2/portable micro-kernels
// on float32 panels (packed_gemm.h), for every dtype. `AmxProducts<Tiles>` (AVX-512 copy,
// bfloat16, capability amx): the same two products on AMX tiles (amx_tiles.h), Q and P rounded to
// bfloat16 as their operands; the scores, softmax, masks and dropout between them are the same
// float32 code.
struct FmaProducts {};
#if defined(CPU_CAPABILITY_AVX512)
template <typename Tiles>
struct AmxProducts {
  using T = Tiles;
};
#endif
template <typename Products>
constexpr bool kOnAmxTiles = !std::is_same_v<Products, FmaProducts>;

// Query blocks of kForwardQueryBlock rows of one (sequence, key/value head): a task is a group
// of them (interleaved, g, g + G, ..., so that under a causal mask groups cost the same) for
// every query head that reads the key head. Its worker packs K and V tile by tile as first
// needed, and every query block of every head of the group reuses them; key tiles outside a
// block's band are never touched.
template <typename scalar_t, typename Products>
void forward_tiled_with(const TileContext<scalar_t>& ctx, const SequenceLayout& layout,
                        const ForwardOutputs<scalar_t>& out, const std::vector<std::array<int64_t, 4>>& tasks) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kAmx = kOnAmxTiles<Products>;
  const AttentionParams& p = ctx.p;
  const int64_t D = p.head_dim, Dv = p.v_head_dim;
  constexpr int64_t QB = kForwardQueryBlock;
  const int64_t BK = std::min(kForwardKeyBlock, std::max<int64_t>(p.kv_len, 1));
  const int64_t ld_s = padded_to_panels<acc_t>(BK), ld_acc = padded_to_panels<acc_t>(Dv);
  const int64_t key_tiles = (p.kv_len + BK - 1) / BK;
  int64_t k_tile_size = ld_s * D, v_tile_size = BK * ld_acc;  // one packed key tile of K^T, of V
  // AMX operands (bfloat16, counted in acc_t): the queries' rows padded to whole tiles, and P.
  int64_t ld_q16 = 0, amx_scratch = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kAmx) {
    static_assert(QB % (2 * amx::kTileRows) == 0 && sizeof(acc_t) == 4, "AMX blocks of 32 float32 rows");
    ld_q16 = amx::round_up(D, amx::kTileDepth);
    k_tile_size = amx::vnni_size(D, ld_s) / 2;  // two bfloat16 per float
    v_tile_size = amx::vnni_size(ld_s, ld_acc) / 2;
    amx_scratch = (QB * ld_q16 + QB * ld_s) / 2;
  }
#endif
  double flops = 0;
  for (int64_t b = 0; b < layout.count(); ++b) flops += 2.0 * p.heads * layout[b].q_len * layout[b].kv_len * (D + Dv);

  for_each_task(static_cast<int64_t>(tasks.size()), flops, [&](int64_t) {
    auto scratch = worker_scratch<acc_t>(QB * D + key_tiles * (k_tile_size + v_tile_size) + QB * ld_s +
                                                        OnlineSoftmax<acc_t>::scratch_size(QB, ld_acc) + amx_scratch);
    auto packed = worker_scratch<char>(key_tiles);
    return [&, scratch, packed](int64_t task) {
      acc_t* qs = scratch->data();
      acc_t* k_packed = qs + QB * D;
      acc_t* v_packed = k_packed + key_tiles * k_tile_size;
      acc_t* st = v_packed + key_tiles * v_tile_size;
      OnlineSoftmax<acc_t> softmax(st + QB * ld_s, QB, ld_acc, Dv);
      [[maybe_unused]] uint16_t* q16 = reinterpret_cast<uint16_t*>(st + QB * ld_s + OnlineSoftmax<acc_t>::scratch_size(QB, ld_acc));
      [[maybe_unused]] uint16_t* p16 = q16 + QB * ld_q16;
      const auto [b, kh, group, groups] = tasks[task];
      const Sequence s = layout[b];
      const int64_t q_blocks = (s.q_len + QB - 1) / QB;
      std::fill(packed->begin(), packed->end(), char(0));
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kAmx) Products::T::configure();  // the tile shapes, per thread
#endif

      for (int64_t h = kh * ctx.group; h < (kh + 1) * ctx.group; ++h) {
        for (int64_t qb = group; qb < q_blocks; qb += groups) {
          const int64_t i0 = qb * QB, rows = std::min(QB, s.q_len - i0);
          // The queries times score_scale: the products come out as scores, no pass over them.
          scaled_rows(ctx.q, s.tb, h, s.q0 + i0, rows, D, ctx.score_scale, qs);
#if defined(CPU_CAPABILITY_AVX512)
          // AMX: those rows rounded to bfloat16 (as torch's math path rounds q * scale), the
          // padding rows and columns zero.
          const int64_t tile_rows = kAmx ? amx::round_up(rows, amx::kTileRows) : rows;
          if constexpr (kAmx) {
            for (int64_t r = 0; r < tile_rows; ++r) {
              amx::bf16_row(qs + r * D, 0, r < rows ? D : 0, ld_q16, 1.0f, q16 + r * ld_q16);
            }
          }
#endif
          if (qb + groups < q_blocks) {  // the next block's queries and output rows, while this one computes
            const int64_t next = i0 + groups * QB, next_rows = std::min(QB, s.q_len - next);
            prefetch_rows(ctx.q.at(s.tb, h, s.q0 + next), ctx.q.s2, next_rows, D, ctx.q.s3, false);
            prefetch_rows(out.o.at(s.tb, h, s.q0 + next), out.o.s2, next_rows, Dv, out.o.s3, true);
          }
          softmax.reset(rows);
          const int64_t j_begin = s.key_begin(i0) / BK * BK, j_end = s.key_end(i0 + rows - 1);
          int64_t tiles_done = 0;
          for (int64_t j0 = j_begin; j0 < j_end; j0 += BK) {
            const int64_t cols = std::min(BK, j_end - j0), tile = j0 / BK;
            // This tile's panels, packed whole: a later query block may see more of it.
            const int64_t full = std::min(BK, s.kv_len - j0);
            acc_t* k_space = k_packed + tile * k_tile_size;
            acc_t* v_space = v_packed + tile * v_tile_size;
            if (!(*packed)[tile]) {
              if constexpr (kAmx) {
#if defined(CPU_CAPABILITY_AVX512)
                // K^T (D x keys) and V (keys x Dv) as VNNI tiles, keys padded to ld_s.
                amx::pack_vnni(ctx.k_row(s, h, j0), D, full, ctx.k.s3, ctx.k.s2, ld_q16, reinterpret_cast<uint16_t*>(k_space));
                amx::pack_vnni(ctx.v_row(s, h, j0), full, Dv, ctx.v.s2, ctx.v.s3, ld_s, reinterpret_cast<uint16_t*>(v_space));
#endif
              } else {
                ctx.pack_keys_transposed(k_space, s, h, j0, full);
                ctx.pack_values(v_space, s, h, j0, full);
              }
              (*packed)[tile] = 1;
            }
            if constexpr (kAmx) {
#if defined(CPU_CAPABILITY_AVX512)
              // The products of each block of 32 rows over the keys it sees (block_keys), then the
              // scores' pass (finish_scores: masks, softcap, ALiBi, bias, the row maxima).
              const int64_t col_end = amx::round_up(cols, amx::kTileCols);
              amx::gemm<typename Products::T>(tile_rows, col_end, ld_q16, q16, ld_q16,
                                              reinterpret_cast<const uint16_t*>(k_space), st, ld_s, false,
                                              [&](int64_t r0, int64_t mr) {
                                                const auto [kb, ke] = ctx.block_keys(s, i0, j0, cols, r0, std::min(mr, rows - r0));
                                                return amx::TileExtent{kb, ke, 0, INT64_MAX};
                                              });
              ctx.finish_scores(st, ld_s, s, h, i0, rows, j0, cols, softmax.tile_max, /*whole_rows=*/false);
#endif
            } else {
              // Each row's pass covers its product block's keys only (row_span): under a narrow
              // window most of a tile is outside every row of a block.
              ctx.scores(st, ld_s, qs, D, Panels<acc_t>{k_space, D}, s, h, i0, rows, j0, cols, softmax.tile_max,
                         /*whole_rows=*/false);
            }
            for (int64_t r = 0; r < rows; ++r) {
              const auto [begin, end] = ctx.row_span(s, i0, rows, j0, cols, r, false);
              acc_t* row = st + r * ld_s;
#if defined(CPU_CAPABILITY_AVX512)
              if constexpr (kAmx) {
                if (p.dropout_p == 0) {  // P straight into bfloat16, 0 off its span: one pass, not three
                  const std::optional<acc_t> shift = softmax.raise_max(r, ctx.log2_per_unit);
                  if (shift) {
                    softmax.add_to_sum(r, amx::exp2_sum_bf16_row(row, begin, end, ld_s, *shift, ctx.log2_per_unit,
                                                                 p16 + r * ld_s));
                  } else {
                    std::fill(p16 + r * ld_s, p16 + (r + 1) * ld_s, uint16_t(0));
                  }
                  continue;
                }
              }
#endif
              softmax.update_row(r, row, begin, end, ctx.log2_per_unit);
              if (p.dropout_p > 0) ctx.dropout_row(row + begin, s, h, i0 + r, j0 + begin, end - begin);
#if defined(CPU_CAPABILITY_AVX512)
              if constexpr (kAmx) amx::bf16_row(row, begin, end, ld_s, 1.0f, p16 + r * ld_s);  // P, 0 off its span
#endif
            }
            if constexpr (kAmx) {
#if defined(CPU_CAPABILITY_AVX512)
              amx::gemm<typename Products::T>(tile_rows, amx::round_up(Dv, amx::kTileCols), ld_s, p16, ld_s, reinterpret_cast<const uint16_t*>(v_space),
                                              softmax.acc, ld_acc, true, [&](int64_t r0, int64_t mr) {
                                                const auto [kb, ke] = ctx.block_keys(s, i0, j0, cols, r0, std::min(mr, rows - r0));
                                                return amx::TileExtent{0, INT64_MAX, kb, ke};
                                              });
#endif
            } else {
              gemm_packed<acc_t>(rows, Dv, cols, st, ld_s, 1, Panels<acc_t>{v_space, full}, softmax.acc, ld_acc, true,
                                 ctx.visible_key_depth(s, i0, j0, cols));
            }
            if (++tiles_done % kForwardTilesPerPartial == 0) softmax.add_partial(rows);
          }
          for (int64_t r = 0; r < rows; ++r) {
            const auto [row, sum] = softmax.finish_row(r);
            out.store(ctx, s, h, i0 + r, row, softmax.row_max[r], sum);
          }
        }
      }
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kAmx) Products::T::release();  // the tile state is 8 KiB of every context switch
#endif
    };
  });
}

template <typename scalar_t>
void forward_tiled(const TileContext<scalar_t>& ctx, const SequenceLayout& layout, const ForwardOutputs<scalar_t>& out,
                   const std::vector<std::array<int64_t, 4>>& tasks) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    switch (amx_tile_mode()) {
      case AmxTileMode::Hardware:
        return forward_tiled_with<scalar_t, AmxProducts<amx::AmxHardware>>(ctx, layout, out, tasks);
      case AmxTileMode::Emulated:
        return forward_tiled_with<scalar_t, AmxProducts<amx::AmxEmulated>>(ctx, layout, out, tasks);
      case AmxTileMode::Off:
        break;
    }
  }
#endif
  forward_tiled_with<scalar_t, FmaProducts>(ctx, layout, out, tasks);
}

// Keys per task of the decode path: a sequence's keys split into chunks this long (fixed, so
// the result does not depend on the thread count), their partial softmax results combined by
// their maxima and sums (the logsumexp). 8 batch x 8 key heads x 4096 keys makes 320 tasks.
constexpr int64_t kDecodeKeyChunk = 1024;

// Sequences with fewer query rows than kMinRowsForPanels (decoding): packing K and V would cost
// as much as using them, so they are read in place. A task is (sequence, key/value head, chunk
// of keys), and its rows are every query row of every query head that reads that key head
// (heads / kv_heads of them): K and V stream from memory once for the whole group.
template <typename scalar_t>
void forward_decode(const TileContext<scalar_t>& ctx, const SequenceLayout& layout, const ForwardOutputs<scalar_t>& out,
                    const std::vector<int64_t>& sequences) {
  using acc_t = at::opmath_type<scalar_t>;
  const AttentionParams& p = ctx.p;
  const int64_t D = p.head_dim, Dv = p.v_head_dim, G = ctx.group, KH = p.heads / G;
  const int64_t BK = std::min(kForwardKeyBlock, std::max<int64_t>(p.kv_len, 1));
  const int64_t ld_s = padded_to_panels<acc_t>(BK), ld_acc = padded_to_panels<acc_t>(Dv);
  const int64_t max_rows = G * (kMinRowsForPanels - 1);
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  // (sequence, key head, chunk) tasks; chunk c of a sequence covers keys [c, c + 1) * chunk.
  struct Task {
    int64_t b, kh, chunk, chunks, key_begin, key_end;
  };
  std::vector<Task> tasks;
  std::vector<int64_t> partial_offset;  // per task: its first row in `partials`, when split
  int64_t partial_rows = 0;
  double flops = 0;
  for (int64_t b : sequences) {
    const Sequence s = layout[b];
    const int64_t begin = s.key_begin(0), end = s.q_len > 0 ? s.key_end(s.q_len - 1) : 0;
    const int64_t first = begin / kDecodeKeyChunk, last = std::max(first + 1, (end + kDecodeKeyChunk - 1) / kDecodeKeyChunk);
    flops += 2.0 * p.heads * s.q_len * std::max<int64_t>(end - begin, 0) * (D + Dv);
    for (int64_t kh = 0; kh < KH; ++kh) {
      for (int64_t c = first; c < last; ++c) {
        tasks.push_back({b, kh, c - first, last - first, std::max(begin, c * kDecodeKeyChunk),
                         std::min(end, (c + 1) * kDecodeKeyChunk)});
        partial_offset.push_back(partial_rows);
        if (last - first > 1) partial_rows += G * s.q_len;
      }
    }
  }
  // A split row's partial: its unnormalised output (Dv), maximum and sum.
  const int64_t partial_size = Dv + 2;
  std::vector<acc_t> partials(partial_rows * partial_size);

  for_each_task(static_cast<int64_t>(tasks.size()), flops, [&](int64_t) {
    auto scratch = worker_scratch<acc_t>(max_rows * D + BK * (D + Dv) + max_rows * ld_s +
                                                        OnlineSoftmax<acc_t>::scratch_size(max_rows, ld_acc));
    return [&, scratch](int64_t t) {
      const Task& task = tasks[t];
      const Sequence s = layout[task.b];
      const int64_t rows = G * s.q_len;  // row r: query head kh * G + r / q_len, query i = r % q_len
      acc_t* qs = scratch->data();
      acc_t* k_rows = qs + max_rows * D;
      acc_t* v_rows = k_rows + BK * D;
      acc_t* st = v_rows + BK * Dv;
      OnlineSoftmax<acc_t> softmax(st + max_rows * ld_s, max_rows, ld_acc, Dv);
      const auto head = [&](int64_t r) { return task.kh * G + r / s.q_len; };
      for (int64_t r = 0; r < rows; ++r) {
        scaled_rows(ctx.q, s.tb, head(r), s.q0 + r % s.q_len, 1, D, ctx.score_scale, qs + r * D);
      }
      softmax.reset(rows);
      int64_t tiles_done = 0;
      for (int64_t j0 = task.key_begin; j0 < task.key_end; j0 += BK) {
        const int64_t cols = std::min(BK, task.key_end - j0);
        int64_t ldk = 0, ldv = 0;
        const acc_t* kt = tile_rows<acc_t>(ctx.k, s.tb, task.kh, s.k0 + j0, cols, D, k_rows, ldk);
        const acc_t* vt = tile_rows<acc_t>(ctx.v, s.tb, task.kh, s.k0 + j0, cols, Dv, v_rows, ldv);
        gemm_nt_dots<acc_t>(rows, cols, D, qs, D, kt, ldk, st, ld_s);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* row = st + r * ld_s;
          const int64_t i = r % s.q_len;
          ctx.finish_scores(row, ld_s, s, head(r), i, 1, j0, cols, softmax.tile_max + r);
          softmax.update_row(r, row, 0, cols, ctx.log2_per_unit);
          if (p.dropout_p > 0) ctx.dropout_row(row, s, head(r), i, j0, cols);
        }
        gemm_nn_axpys<acc_t>(rows, Dv, cols, st, ld_s, vt, ldv, softmax.acc, ld_acc);
        if (++tiles_done % kForwardTilesPerPartial == 0) softmax.add_partial(rows);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const auto [row, sum] = softmax.finish_row(r);
        if (task.chunks == 1) {
          out.store(ctx, s, head(r), r % s.q_len, row, softmax.row_max[r], sum);
        } else {
          acc_t* part = partials.data() + (partial_offset[t] + r) * partial_size;
          std::copy(row, row + Dv, part);
          part[Dv] = softmax.row_max[r];
          part[Dv + 1] = sum;
        }
      }
    };
  });

  // Split rows: the chunks' results combined in chunk order, each weighted by 2^(its max - the
  // overall max), as the online softmax would have.
  std::vector<int64_t> firsts;  // the first task of each split (sequence, key head)
  for (int64_t t = 0; t < static_cast<int64_t>(tasks.size()); ++t) {
    if (tasks[t].chunks > 1 && tasks[t].chunk == 0) firsts.push_back(t);
  }
  at::parallel_for(0, static_cast<int64_t>(firsts.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(Dv), row_err(Dv), weighted(Dv);  // compensated: a million keys are 1024 chunks
    for (int64_t n = begin; n < end; ++n) {
      const Task& first = tasks[firsts[n]];
      const Sequence s = layout[first.b];
      for (int64_t r = 0; r < G * s.q_len; ++r) {
        acc_t max = neg_inf;
        for (int64_t c = 0; c < first.chunks; ++c) {
          const acc_t m = partials[(partial_offset[firsts[n] + c] + r) * partial_size + Dv];
          max = std::isnan(m) ? m : std::max(max, m);
        }
        std::fill(row.begin(), row.end(), acc_t(0));
        std::fill(row_err.begin(), row_err.end(), acc_t(0));
        acc_t sum = 0, err = 0;
        if (max != neg_inf) {
          for (int64_t c = 0; c < first.chunks; ++c) {
            const acc_t* part = partials.data() + (partial_offset[firsts[n] + c] + r) * partial_size;
            if (part[Dv + 1] == acc_t(0)) continue;  // this chunk saw nothing of the row
            const acc_t weight = std::exp2((part[Dv] - max) * ctx.log2_per_unit);
            add_scaled_row(weighted.data(), part, Dv, weight, false);
            add_compensated(row.data(), row_err.data(), weighted.data(), Dv);
            add_compensated(sum, err, part[Dv + 1] * weight);
          }
          add_scaled_row(row.data(), row_err.data(), Dv, acc_t(1), true);
        }
        out.store(ctx, s, first.kh * G + r / s.q_len, r % s.q_len, row.data(), max, sum + err);
      }
    }
  });
}

// The forward of every layout: sequences with enough query rows take the tiled path, the
// others (decoding) the decode path.
template <typename scalar_t>
void attention_forward_cpu_impl(const AttentionParams& p, const SequenceLayout& layout, const at::Tensor& query,
                                const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& alibi_slopes, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileContext<scalar_t> ctx(p, query, key, value, bias, alibi_slopes);
  const ForwardOutputs<scalar_t> outputs{MutableStrided4<scalar_t>(out), lse.data_ptr<acc_t>(), layout};
  const int64_t threads = at::get_num_threads();
  std::vector<std::array<int64_t, 4>> tiled;  // (sequence, key/value head, group, groups)
  std::vector<int64_t> decode;
  int64_t tiled_sequences = 0;
  for (int64_t b = 0; b < layout.count(); ++b) tiled_sequences += layout[b].q_len >= kMinRowsForPanels;
  for (int64_t b = 0; b < layout.count(); ++b) {
    const Sequence s = layout[b];
    if (s.q_len == 0) continue;
    if (s.q_len < kMinRowsForPanels) {
      decode.push_back(b);
      continue;
    }
    // Enough groups to keep every thread busy when there are few (sequence, key head) pairs.
    const int64_t q_blocks = (s.q_len + kForwardQueryBlock - 1) / kForwardQueryBlock;
    const int64_t kv_heads = p.heads / ctx.group, pairs = tiled_sequences * kv_heads;
    const int64_t groups = std::clamp<int64_t>((2 * threads + pairs - 1) / pairs, 1, q_blocks);
    for (int64_t kh = 0; kh < kv_heads; ++kh) {
      for (int64_t g = 0; g < groups; ++g) tiled.push_back({b, kh, g, groups});
    }
  }
  if (layout.is_packed()) {
    // Longest sequences first: workers take tasks round-robin, and the short ones fill in last.
    std::stable_sort(tiled.begin(), tiled.end(), [&](const auto& a, const auto& b) {
      return layout[a[0]].q_len * layout[a[0]].kv_len / a[3] > layout[b[0]].q_len * layout[b[0]].kv_len / b[3];
    });
  }
  if (!tiled.empty()) forward_tiled(ctx, layout, outputs, tiled);
  if (!decode.empty()) forward_decode(ctx, layout, outputs, decode);
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias, double dropout_p, bool is_causal, bool bottom_right,
    std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const auto p = check_attention_args("qkv.attention", query, key, value, bias, dropout_p, is_causal,
                                      bottom_right, scale, dropout_seed, window_left, window_right, softcap,
                                      alibi_slopes);
  at::Tensor out = empty_attention_output(query, p);
  at::Tensor lse = empty_logsumexp(query, p);
  if (p.batch * p.heads == 0) return {out, lse};  // no (b, h): empty outputs, and no tasks to split
  const SequenceLayout layout = SequenceLayout::dense(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "qkv_attention_cpu", [&] {
    attention_forward_cpu_impl<scalar_t>(p, layout, query, key, value, bias, alibi_slopes, out, lse);
  });
  return {out, lse};
}

// ---- backward ---------------------------------------------------------------------------

// The gradient of a bias with one key column (broadcast over keys: (L, 1), (B, H, L, 1), ...).
// It adds the same amount to every score of a row, which the softmax ignores: its gradient
// sum_j dS_ij = sum_j P_ij dP_ij - delta_i sum_j P_ij is zero in exact arithmetic. Summing the
// tiles' dS would add up the error of delta = dO . O, taken from the rounded output (2^-11
// relative in float16), times every key. Instead delta is taken from the same recomputed numbers,
// as the P-weighted mean of dP, sum_j P_ij dP_ij / sum_j P_ij (the forward's output is normalised
// by its row sum too), and the two terms cancel down to their rounding, as torch's do. Dropout
// keeps the identity (dP is the masked one).
template <typename acc_t>
struct RowShiftBiasGrad {
  bool active = false;
  int64_t rows_per_chunk = 0;  // batch * heads * query_len
  // (chunks, B * H, L, 4): sum_j P dP and its rounding error, sum_j P and its rounding error,
  // over the keys of one chunk of key blocks.
  at::Tensor sums;

  RowShiftBiasGrad(const AttentionParams& p, const std::optional<at::Tensor>& bias, bool wanted, int64_t chunks) {
    if (!wanted || !p.has_bias || !BiasGradLayout(p, *bias).shifts_rows()) return;
    active = true;
    rows_per_chunk = p.batch * p.heads * p.q_len;
    sums = at::zeros({chunks * rows_per_chunk * 4}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }

  // The sums of slice bh's rows over the keys of `chunk`, 4 per row.
  acc_t* sums_of(int64_t chunk, int64_t bh, int64_t q_len) const {
    return sums.data_ptr<acc_t>() + (chunk * rows_per_chunk + bh * q_len) * 4;
  }

  // Adds a tile row's keys: probabilities `prob` and (dropout-masked) dP `dp`.
  static void add_row(acc_t* row_sums, const acc_t* prob, const acc_t* dp, int64_t n) {
    using Vec = at::vec::Vectorized<acc_t>;
    const auto add = [](Vec a, Vec b) { return a + b; };
    const acc_t p_dp = at::vec::map2_reduce_all<acc_t>([](Vec a, Vec b) { return a * b; }, add, prob, dp, n);
    const acc_t p_sum = at::vec::reduce_all<acc_t>(add, prob, n);
    add_compensated(row_sums[0], row_sums[1], p_dp);
    add_compensated(row_sums[2], row_sums[3], p_sum);
  }

  // The gradient, in the bias's dtype and shape.
  at::Tensor result(const AttentionParams& p, const at::Tensor& bias) const {
    const BiasGradLayout layout(p, bias);
    at::Tensor grad = at::zeros({layout.numel}, sums.options());
    acc_t* g = grad.data_ptr<acc_t>();
    const acc_t* s = sums.const_data_ptr<acc_t>();
    const int64_t chunks = sums.numel() / std::max<int64_t>(rows_per_chunk * 4, 1);
    for (int64_t row = 0; row < rows_per_chunk; ++row) {  // in order: rows that share an element add up the same way
      acc_t p_dp = 0, p_sum = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const acc_t* r = s + (chunk * rows_per_chunk + row) * 4;
        p_dp += r[0] + r[1];
        p_sum += r[2] + r[3];
      }
      const int64_t i = row % p.q_len, bh = row / p.q_len, b = bh / p.heads, h = bh % p.heads;
      const acc_t delta = p_sum == acc_t(0) ? acc_t(0) : p_dp / p_sum;  // a row that sees no key: 0
      g[b * layout.strides[0] + h * layout.strides[1] + i * layout.strides[2]] += p_dp - delta * p_sum;
    }
    return grad.to(bias.scalar_type()).view(bias.sizes());
  }
};

// dS = P * (dP - delta) with dP = dO V^T (rows x cols, ld `ld`), computed in the product's
// epilogue (SoftmaxGradEpilogue) from the probabilities `prob` (same layout) over the panels that
// `extent_of` keeps: float32 only; returns false, having done nothing, for float64.
template <typename acc_t, typename ExtentOf>
bool softmax_grad_in_product(int64_t rows, int64_t cols, int64_t Dv, const acc_t* dot, int64_t ldo,
                             Panels<acc_t> vt_panels, acc_t* dpt, int64_t ld, const acc_t* prob, const acc_t* delta,
                             const ExtentOf& extent_of) {
  if constexpr (!std::is_same_v<acc_t, float>) {
    return false;
  } else {
    gemm_packed_epilogue<float>(rows, cols, Dv, dot, ldo, 1, vt_panels, dpt, ld, extent_of,
                                SoftmaxGradEpilogue{prob, ld, delta});
    return true;
  }
}

// sum_c float(a[c]) * float(b[c]) for bfloat16/float16 rows (unit stride), in float32 vectors.
template <typename scalar_t>
float dot_widened(const scalar_t* a, const scalar_t* b, int64_t n) {
  if constexpr (!at::is_reduced_floating_point_v<scalar_t>) {
    TORCH_INTERNAL_ASSERT(false, "dot_widened: bfloat16 or float16 only");
  } else {
    using bVec = at::vec::Vectorized<scalar_t>;
    using fVec = at::vec::Vectorized<float>;
    fVec acc0(0.0f), acc1(0.0f);
    int64_t c = 0;
    for (; c + bVec::size() <= n; c += bVec::size()) {
      const auto [a0, a1] = at::vec::convert_to_float<scalar_t>(bVec::loadu(a + c));
      const auto [b0, b1] = at::vec::convert_to_float<scalar_t>(bVec::loadu(b + c));
      acc0 = at::vec::fmadd(a0, b0, acc0);
      acc1 = at::vec::fmadd(a1, b1, acc1);
    }
    float sum = at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, acc0 + acc1);
    for (; c < n; ++c) sum += static_cast<float>(a[c]) * static_cast<float>(b[c]);
    return sum;
  }
}

// Tasks are (group of (sequence, key/value head) pairs, chunk of key blocks or one query head),
// the split a function of the problem alone (backward_tasks.h): every thread has work when
// there are few pairs, and the gradients do not depend on the thread count. A chunk's task owns
// the key and value gradients of its key blocks: it runs every query head that reads its key
// head against them (grouped-query attention sums their contributions in one task, no copies).
// A task per query head writes its dQ whole and hands its key blocks' dK and dV to kv_sums.
template <typename scalar_t, typename Products>
void backward_with(const AttentionParams& p, const SequenceLayout& layout, const at::Tensor& grad_out,
                   const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alibi_slopes,
                   const at::Tensor& out, const at::Tensor& lse, at::Tensor& grad_q, at::Tensor& grad_k,
                   at::Tensor& grad_v, bool bias_requires_grad, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kAmx = kOnAmxTiles<Products>;
  const TileContext<scalar_t> ctx(p, query, key, value, bias, alibi_slopes);
  const Strided4<scalar_t> dout(grad_out), o(out);
  const MutableStrided4<scalar_t> dq(grad_q), dk(grad_k), dv(grad_v);
  const at::Tensor lse_c = lse.contiguous();
  const acc_t* lse_data = lse_c.const_data_ptr<acc_t>();
  const at::Tensor normalizers = lse_normalizers(ctx, layout, lse_data);
  const acc_t* normalizer_data = normalizers.defined() ? normalizers.const_data_ptr<acc_t>() : nullptr;
  const int64_t D = p.head_dim, Dv = p.v_head_dim, L = p.q_len, G = ctx.group, KH = p.heads / G;
  constexpr int64_t BK = kBackwardKeyBlock, QB = kQueryBlock;
  const int64_t kv_blocks = (p.kv_len + BK - 1) / BK;
  const int64_t rows_total = layout.rows();

  std::vector<int64_t> sequences;  // the ones with work: queries and keys
  double flops = 0;
  for (int64_t b = 0; b < layout.count(); ++b) {
    const Sequence s = layout[b];
    if (s.q_len > 0 && s.kv_len > 0) sequences.push_back(b);
    flops += 2.0 * p.heads * s.q_len * s.kv_len * (3 * D + 2 * Dv);
  }
  const int64_t n_sequences = static_cast<int64_t>(sequences.size());
  const bool bias_grad_per_key = bias_requires_grad && p.has_bias && !BiasGradLayout(p, *bias).shifts_rows();
  const BackwardTasks tasks(p, n_sequences, KH, bias, bias_grad_per_key, kv_blocks);
  const int64_t chunks = tasks.chunks, subsets = tasks.subsets;
  const int64_t blocks_per_chunk = (kv_blocks + chunks - 1) / chunks;
  // A band bounded on both sides (a sliding window) shows every key block about the same number
  // of queries: chunks take contiguous key blocks, and each packs and writes only the queries that
  // see them (about L / chunks + window rows). Other masks fold the blocks (ChunkBlocks).
  const bool contiguous_chunks = p.window_left >= 0 && (p.is_causal || p.window_right >= 0);
  TORCH_INTERNAL_ASSERT(chunks <= kBackwardTargetTasks);  // the dQ sum's table of chunk rows
  const auto blocks_of = [&](int64_t chunk, int64_t seq_blocks) {
    return contiguous_chunks ? ChunkBlocks::contiguous(chunk, chunks, seq_blocks)
                             : ChunkBlocks::folded(chunk, chunks, seq_blocks);
  };
  // Accumulator rows are padded to whole panels, the row stride gemm_packed writes with.
  const int64_t ld_dq = padded_to_panels<acc_t>(D), ld_dv = padded_to_panels<acc_t>(Dv);
  // A task that runs every key block of a query head (one chunk) writes its dQ whole: straight
  // into grad_q when that already is acc_t rows that no panel padding overruns, else through
  // one partial. With chunks, the dQ partials of (sequence with work n, query head h), as
  // n * heads + h, per chunk.
  const bool dq_in_place = std::is_same_v<scalar_t, acc_t> && chunks == 1 && dq.s3 == 1 && D == ld_dq;
  DqPartials<acc_t> dq_partials(n_sequences * p.heads, chunks, L, ld_dq);
  // With a task per query head, dK and dV of (sequence with work n, key head kh, key block kb),
  // as (n * KH + kh) * kv_blocks + kb, summed over the heads block by block: in grad_k and
  // grad_v themselves when they are acc_t rows without panel padding, else in buffers.
  const bool kv_in_place = std::is_same_v<scalar_t, acc_t> && dk.s3 == 1 && dv.s3 == 1 && D == ld_dq && Dv == ld_dv;
  KvBlockSums<acc_t> kv_sums(subsets > 1 ? n_sequences * KH * kv_blocks : 0, subsets, BK * (ld_dq + ld_dv),
                             !kv_in_place);
  const BiasGradAccumulator<acc_t> bias_grad(p, bias, bias_requires_grad);
  const RowShiftBiasGrad<acc_t> row_shift_grad(p, bias, bias_requires_grad, chunks);

  // delta_i = dO_i . O_i (= rowsum(dP * P)), computed once per row.
  at::Tensor delta_t = at::zeros({rows_total}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* delta = delta_t.data_ptr<acc_t>();
  at::parallel_for(0, layout.count() * p.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const Sequence s = layout[bh / p.heads];
      const int64_t h = bh % p.heads;
      for (int64_t i = 0; i < s.q_len; ++i) {
        const scalar_t* g = dout.at(s.tb, h, s.q0 + i);
        const scalar_t* y = o.at(s.tb, h, s.q0 + i);
        acc_t sum = 0;
        if (std::is_same_v<scalar_t, acc_t> && dout.s3 == 1 && o.s3 == 1) {
          // Vectorised: the scalar loop was 6% of a sliding-window backward (B1 L8192 H8 D64,
          // window 256, one thread), whose products are short.
          using Vec = at::vec::Vectorized<acc_t>;
          sum = at::vec::map2_reduce_all<acc_t>([](Vec a, Vec b) { return a * b; },
                                                [](Vec a, Vec b) { return a + b; },
                                                reinterpret_cast<const acc_t*>(g), reinterpret_cast<const acc_t*>(y), Dv);
        } else if (at::is_reduced_floating_point_v<scalar_t> && dout.s3 == 1 && o.s3 == 1) {
          // bfloat16/float16 rows widened in vectors: the scalar loop, a chain of dependent
          // adds, took 11 ms of a bfloat16 backward (B1 H8 L2048 D64, one thread, Xeon).
          sum = dot_widened(g, y, Dv);
        } else {
          for (int64_t c = 0; c < Dv; ++c) sum += static_cast<acc_t>(g[c * dout.s3]) * static_cast<acc_t>(y[c * o.s3]);
        }
        delta[layout.row(s, h, i)] = sum;
      }
    }
  });

  const int64_t L_padded = (L + QB - 1) / QB * QB;
  // The query rows a chunk of sequence `s` works on: queries [begin, end) see its keys, and the
  // sum of the dQ partials reads each only there; its products write whole query blocks, up to
  // written_end (rows past `end` get zeros: those queries see none of its keys).
  struct ChunkRows {
    int64_t begin = 0, end = 0, written_end = 0;
  };
  const auto rows_of = [&](const Sequence& s, const ChunkBlocks& blocks) {
    ChunkRows r;
    if (blocks.empty()) return r;
    r.begin = s.query_begin(blocks.first() * BK) / QB * QB;
    r.end = s.query_end(std::min(s.kv_len, (blocks.last() + 1) * BK) - 1);
    r.written_end = r.end > r.begin ? std::min(s.q_len, (r.end + QB - 1) / QB * QB) : r.begin;
    return r;
  };
  const bool dout_in_place = reads_rows_in_place<acc_t>(dout, L, Dv);
  // With several query heads per key head, a task's key and value gradients add up over its
  // heads: they live in the task's scratch for all its key blocks (K- and V-sized at most). A
  // task of one query head (G == 1, or a task per head) is done with a key block after it.
  const bool kv_per_block = G == 1 || subsets > 1;
  const int64_t kv_acc_rows = (kv_per_block ? 1 : blocks_per_chunk) * BK;
  const int64_t cap_grad_size = p.softcap > 0 ? QB * BK : 0;

  // AMX (bfloat16 on tiles; AmxBackwardSpace): the five products' operands in bfloat16 and the
  // transposed key and value gradients in float32.
  [[maybe_unused]] const AmxBackwardSpace amx_space(kAmx ? D : 0, Dv, L_padded);
  for_each_task(tasks.count(), flops, [&](int64_t) {
    auto amx16 = worker_scratch<uint16_t>(kAmx ? amx_space.bf16_size() : 0);
    auto amx32 = worker_scratch<float>(kAmx ? amx_space.float_size(ld_dq) : 0);
    // Whole-slice panels (L rows): each (pair, head) packs Q and dO once, not once per key block.
    auto scratch = worker_scratch<acc_t>(
        QB * D + (dout_in_place ? 0 : L * Dv) + L_padded * (ld_dq + ld_dv) + BK * (D + ld_dq + Dv) + 2 * QB * BK +
        cap_grad_size + kv_acc_rows * (ld_dq + ld_dv) + D);
    return [&, scratch, amx16, amx32](int64_t task) {
      [[maybe_unused]] const AmxBackwardSpace::Views amx =
          kAmx ? amx_space.views(amx16->data(), amx32->data(), ld_dq) : AmxBackwardSpace::Views{};
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kAmx) Products::T::configure();  // the tile shapes, per thread
#endif
      acc_t* qs = scratch->data();               // query rows (when not read in place), for S
      acc_t* do_rows = qs + QB * D;              // dO rows (when not read in place), for dP
      acc_t* q_space = do_rows + (dout_in_place ? 0 : L * Dv);  // Q, per query block (rows x D) panels, for dK
      acc_t* do_space = q_space + L_padded * ld_dq;  // dO, per query block (rows x Dv) panels, for dV
      acc_t* kt_space = do_space + L_padded * ld_dv;  // K^T (D x keys), for S
      acc_t* k_space = kt_space + BK * D;        // K (keys x D), for dQ
      acc_t* vt_space = k_space + BK * ld_dq;    // V^T (Dv x keys), for dP
      acc_t* st = vt_space + BK * Dv;
      acc_t* dpt = st + QB * BK;
      acc_t* cap_grad = p.softcap > 0 ? dpt + QB * BK : nullptr;  // softcap's tanh derivative per score
      acc_t* dk_all = dpt + QB * BK + cap_grad_size;
      acc_t* dv_all = dk_all + kv_acc_rows * ld_dq;
      acc_t* dq_row = dv_all + kv_acc_rows * ld_dv;  // one row of the summed dQ partials
      const int64_t group = tasks.group_of(task), chunk = tasks.chunk_of(task);
      const auto [head_first, head_last] = tasks.heads_of(tasks.subset_of(task));  // of the pair's G

      for (int64_t m = 0; m < tasks.pairs_per_group; ++m) {
        const int64_t pair = tasks.pair(group, m), seq = pair / KH, kh = pair % KH;
        const Sequence s = layout[sequences[seq]];
        const int64_t seq_blocks = (s.kv_len + BK - 1) / BK;
        // The task that finishes the last chunk of (sequence, head h) sums its dQ partials in
        // chunk order, whichever task that is; chunks past a short sequence's keys have none.
        const auto finish_dq = [&](int64_t h) {
          if (dq_in_place) {
            for (int64_t i = 0; i < s.q_len; ++i) {
              scale_row(reinterpret_cast<acc_t*>(dq.at(s.tb, h, s.q0 + i)), D, acc_t(p.scale));
            }
            return;
          }
          const int64_t n = seq * p.heads + h;
          if (!dq_partials.finish(n)) return;
          std::array<ChunkRows, kBackwardTargetTasks> defined;  // chunks <= kBackwardTargetTasks
          for (int64_t c = 0; c < chunks; ++c) defined[c] = rows_of(s, blocks_of(c, seq_blocks));
          for (int64_t i = 0; i < s.q_len; ++i) {  // in chunk order, each partial where it is defined
            if (i + 8 < s.q_len) prefetch_rows(dq.at(s.tb, h, s.q0 + i + 8), dq.s2, 1, D, dq.s3, true);
            bool first = true;
            for (int64_t c = 0; c < chunks; ++c) {
              if (i < defined[c].begin || i >= defined[c].end) continue;
              const acc_t* part = dq_partials.partial(n, c) + i * ld_dq;
              if (first) {
                std::copy_n(part, D, dq_row);
              } else {
                for (int64_t d = 0; d < D; ++d) dq_row[d] += part[d];
              }
              first = false;
            }
            if (first) std::fill_n(dq_row, D, acc_t(0));  // a query that sees no key
            store_row(dq.at(s.tb, h, s.q0 + i), dq.s3, dq_row, D, acc_t(p.scale));
          }
          dq_partials.release(n);
        };
        // With a task per query head: hands in this head's dK and dV of a key block (`block`: BK
        // rows of dK, then of dV), added over the pair's heads in head order (KvBlockSums); the
        // call that adds the last head's scales the sum into grad_k and grad_v.
        const auto add_key_block = [&](int64_t slot, int64_t head, int64_t j0, int64_t cols, const acc_t* block) {
          const auto k_row = [&](acc_t* sum, int64_t c) {
            return sum != nullptr ? sum + c * ld_dq : reinterpret_cast<acc_t*>(dk.at(s.tb, kh, s.k0 + j0 + c));
          };
          const auto v_row = [&](acc_t* sum, int64_t c) {
            return sum != nullptr ? sum + BK * ld_dq + c * ld_dv
                                  : reinterpret_cast<acc_t*>(dv.at(s.tb, kh, s.k0 + j0 + c));
          };
          const auto add = [&](acc_t* sum, const acc_t* x, bool first) {
            for (int64_t c = 0; c < cols; ++c) {
              sum_into(k_row(sum, c), x + c * ld_dq, D, first);
              sum_into(v_row(sum, c), x + BK * ld_dq + c * ld_dv, Dv, first);
            }
          };
          if (!kv_sums.hand_in(slot, head, block, add)) return;
          acc_t* sum = kv_sums.sum(slot);
          for (int64_t c = 0; c < cols; ++c) {
            if (sum == nullptr) {  // summed in place: dV is done, dK takes its scale
              scale_row(k_row(nullptr, c), D, acc_t(p.scale));
            } else {
              store_row(dk.at(s.tb, kh, s.k0 + j0 + c), dk.s3, k_row(sum, c), D, acc_t(p.scale));
              store_row(dv.at(s.tb, kh, s.k0 + j0 + c), dv.s3, v_row(sum, c), Dv, acc_t(1));
            }
          }
          kv_sums.release(slot);
        };
        const ChunkBlocks blocks = blocks_of(chunk, seq_blocks);
        if (blocks.empty()) {  // a short sequence has fewer key blocks than chunks
          for (int64_t h = kh * G; h < (kh + 1) * G; ++h) finish_dq(h);
          continue;
        }
        if (!kv_per_block) {
          std::fill(dk_all, dk_all + kv_acc_rows * ld_dq, acc_t(0));
          std::fill(dv_all, dv_all + kv_acc_rows * ld_dv, acc_t(0));
        }
        // Queries that see some key of this chunk.
        const ChunkRows chunk_rows = rows_of(s, blocks);
        const int64_t q_begin = chunk_rows.begin, q_end = chunk_rows.end;
        // The chunk's first key block writes its query blocks of the dQ partial (a product
        // without accumulate: no zero-filling pass), the later blocks add to them (they are seen
        // by no earlier query); the rows the first block does not reach are zeroed, up to the
        // partial's end (the whole of grad_q when dQ is written in place).
        const int64_t first_q_end = s.query_end(std::min(s.kv_len, (blocks.first() + 1) * BK) - 1);
        const int64_t first_written_end =
            first_q_end > q_begin ? std::min(s.q_len, q_begin + (first_q_end - q_begin + QB - 1) / QB * QB) : q_begin;

        for (int64_t h = kh * G + head_first; h < kh * G + head_last; ++h) {
          const acc_t* lse_row = lse_data + layout.row(s, h, 0);
          const acc_t* delta_row = delta + layout.row(s, h, 0);
          const acc_t* normalizer_row = normalizer_data == nullptr ? nullptr : normalizer_data + layout.row(s, h, 0);
          acc_t* dq_acc = nullptr;
          int64_t ld_dq_acc = ld_dq;
          if (dq_in_place) {
            dq_acc = reinterpret_cast<acc_t*>(dq.at(s.tb, h, s.q0));  // acc_t is scalar_t here
            ld_dq_acc = dq.s2;
          } else {
            dq_acc = dq_partials.take(seq * p.heads + h, chunk);
          }
          const auto zero_dq_rows = [&](int64_t from, int64_t to) {
            for (int64_t i = from; i < to; ++i) std::fill_n(dq_acc + i * ld_dq_acc, ld_dq, acc_t(0));
          };
          if (dq_in_place) zero_dq_rows(0, q_begin);
          zero_dq_rows(first_written_end, dq_in_place ? s.q_len : chunk_rows.written_end);
          acc_t* row_shift_sums = row_shift_grad.active ? row_shift_grad.sums_of(chunk, s.b * p.heads + h, L) : nullptr;
          int64_t ldq, ldo;
          // dO rows [q_begin, q_end) (converted to acc_t unless read in place), indexed by query row.
          const acc_t* dot_chunk =
              tile_rows<acc_t>(dout, s.tb, h, s.q0 + q_begin, std::max<int64_t>(q_end - q_begin, 0), Dv, do_rows, ldo);
          const auto dot_row = [&](int64_t i) { return dot_chunk + (i - q_begin) * ldo; };
          for (int64_t i0 = q_begin; i0 < q_end; i0 += QB) {
            const int64_t rows = std::min(QB, s.q_len - i0);
            if (const int64_t next = i0 + QB; next < q_end) {  // rows 2 KiB apart: see prefetch_rows
              const int64_t next_rows = std::min(QB, s.q_len - next);
              prefetch_rows(ctx.q.at(s.tb, h, s.q0 + next), ctx.q.s2, next_rows, D, ctx.q.s3, false);
              prefetch_rows(dout.at(s.tb, h, s.q0 + next), dout.s2, next_rows, Dv, dout.s3, false);
            }
            const acc_t* qt = tile_rows<acc_t>(ctx.q, s.tb, h, s.q0 + i0, rows, D, qs, ldq);
            if constexpr (kAmx) {
#if defined(CPU_CAPABILITY_AVX512)
              amx_space.pack_query_block(amx, i0, rows, qt, ldq, dot_row(i0), ldo, ctx.score_scale);
#endif
            } else {
              pack_panels(qt, rows, D, ldq, int64_t(1), q_space + i0 * ld_dq);
              pack_panels(dot_row(i0), rows, Dv, ldo, int64_t(1), do_space + i0 * ld_dv);
            }
          }

          // Without a window the chunks take folded key blocks (ChunkBlocks): under a causal mask
          // early keys see more queries, so contiguous ranges would leave one task most of the work.
          for (int64_t kb = blocks.first(); kb < blocks.end(); kb = blocks.next(kb)) {
            const int64_t j0 = kb * BK, cols = std::min(BK, s.kv_len - j0);
            if (const int64_t next = blocks.next(kb); next < blocks.end()) {  // the next block's K and V rows
              const int64_t next_cols = std::min(BK, s.kv_len - next * BK);
              prefetch_rows(ctx.k_row(s, h, next * BK), ctx.k.s2, next_cols, D, ctx.k.s3, false);
              prefetch_rows(ctx.v_row(s, h, next * BK), ctx.v.s2, next_cols, Dv, ctx.v.s3, false);
            }
            if (G == 1) {  // this block's dK and dV rows, stored when it is done
              prefetch_rows(dk.at(s.tb, kh, s.k0 + j0), dk.s2, cols, D, dk.s3, true);
              prefetch_rows(dv.at(s.tb, kh, s.k0 + j0), dv.s2, cols, Dv, dv.s3, true);
            }
            acc_t* dk_acc = kv_per_block ? dk_all : dk_all + blocks.index(kb) * BK * ld_dq;
            acc_t* dv_acc = kv_per_block ? dv_all : dv_all + blocks.index(kb) * BK * ld_dv;
            // K^T times score_scale: the products with Q are the scores themselves.
            Panels<acc_t> kt_panels{kt_space, D}, k_panels{k_space, cols}, vt_panels{vt_space, Dv};
            if constexpr (kAmx) {
#if defined(CPU_CAPABILITY_AVX512)
              amx_space.pack_key_block(amx, ctx.k_row(s, h, j0), ctx.k.s2, ctx.k.s3, ctx.v_row(s, h, j0), ctx.v.s2,
                                       ctx.v.s3, cols);
#endif
            } else {
              kt_panels = ctx.pack_keys_transposed(kt_space, s, h, j0, cols);
              scale_row(kt_space, padded_to_panels<acc_t>(cols) * D, ctx.score_scale);
              k_panels = pack_panels(ctx.k_row(s, h, j0), cols, D, ctx.k.s2, ctx.k.s3, k_space);
              vt_panels = pack_panels(ctx.v_row(s, h, j0), Dv, cols, ctx.v.s3, ctx.v.s2, vt_space);
            }
            if (kv_per_block) {
              std::fill(dk_acc, dk_acc + cols * ld_dq, acc_t(0));
              std::fill(dv_acc, dv_acc + cols * ld_dv, acc_t(0));
            }
            const int64_t block_q_end = s.query_end(j0 + cols - 1);
            for (int64_t i0 = s.query_begin(j0) / QB * QB; i0 < block_q_end; i0 += QB) {
              const int64_t rows = std::min(QB, s.q_len - i0);
              const acc_t* qt = kAmx ? nullptr : tile_rows<acc_t>(ctx.q, s.tb, h, s.q0 + i0, rows, D, qs, ldq);
              const acc_t* dot = dot_row(i0);
              const Panels<acc_t> q_panels{q_space + i0 * ld_dq, rows}, do_panels{do_space + i0 * ld_dv, rows};
              // P, in the scores' product where it can (plain scores, float32), else scores then a
              // pass per row.
              const auto visible_keys = ctx.visible_key_columns(s, i0, j0, cols);
              // On tiles in the common case (dS for the products alone, P' = P), P and dS are taken
              // in the pass that rounds the products' operands (AmxBackwardSpace::round_gradient_operands).
              const bool amx_fused_grad = kAmx && p.dropout_p == 0 && row_shift_sums == nullptr &&
                                          !bias_grad.active && cap_grad == nullptr;
              // The float32 row passes for P and dS below; the fused pass does their work for every row.
              const int64_t row_pass_rows = amx_fused_grad ? 0 : rows;
              const bool p_in_product = !kAmx && normalizer_row == nullptr &&
                                        ctx.probabilities_in_product(st, BK, qt, ldq, kt_panels, s, i0, rows, j0,
                                                                     cols, lse_row + i0);
              if constexpr (kAmx) {
#if defined(CPU_CAPABILITY_AVX512)
                // S = (Q scale) K^T on tiles (the forward's bfloat16 scores, bit for bit), then its pass.
                amx_space.products<typename Products::T>(amx, AmxBackwardSpace::kScores, i0, rows, cols, st, BK, false,
                                                         visible_keys);
                // (Nothing to add or hide, no maximum wanted: the products are the scores. The fused
                // pass reads only the keys each row sees, so it needs no -inf at the hidden ones.)
                if (ctx.transforms_scores() || (!amx_fused_grad && !s.sees_all(i0, i0 + rows, j0, j0 + cols))) {
                  ctx.finish_scores(st, BK, s, h, i0, rows, j0, cols, nullptr, /*whole_rows=*/true, cap_grad);
                }
#endif
              } else if (!p_in_product) {
                ctx.scores(st, BK, qt, ldq, kt_panels, s, h, i0, rows, j0, cols, nullptr, /*whole_rows=*/true,
                           cap_grad);
              }
              for (int64_t r = 0; r < row_pass_rows; ++r) {
                const auto [begin, end] = s.visible(i0 + r, j0, cols);
                acc_t* prob = st + r * BK;
                std::fill(prob, prob + begin, acc_t(0));  // hidden keys: probability 0, no exp2 spent
                std::fill(prob + end, prob + cols, acc_t(0));
                if (!p_in_product) {
                  const acc_t normalizer = normalizer_row == nullptr ? acc_t(1) : normalizer_row[i0 + r];
                  ctx.probabilities_row(prob + begin, end - begin, lse_row[i0 + r], normalizer);
                }
              }
              // The products below skip what the band hides; the dP columns they leave unwritten
              // are zeroed per row. dS = P * (dP - delta) goes in dP's product too where no
              // dropout mask or row sums come between.
              const bool ds_in_product = p_in_product && p.dropout_p == 0 && row_shift_sums == nullptr &&
                                         softmax_grad_in_product(rows, cols, Dv, dot, ldo, vt_panels, dpt, BK, st,
                                                                 delta_row + i0, visible_keys);
              if constexpr (kAmx) {
#if defined(CPU_CAPABILITY_AVX512)
                amx_space.products<typename Products::T>(amx, AmxBackwardSpace::kProbabilityGrad, i0, rows, cols, dpt,
                                                         BK, false, visible_keys);  // dP = dO V^T
#endif
              } else if (!ds_in_product) {
                gemm_packed<acc_t>(rows, cols, Dv, dot, ldo, 1, vt_panels, dpt, BK, false, visible_keys);  // dP = dO V^T
              }
              for (int64_t r = 0; r < row_pass_rows; ++r) {
                acc_t* prob = st + r * BK;
                acc_t* dp = dpt + r * BK;
                const auto [begin, end] = s.visible(i0 + r, j0, cols);
                if (!ds_in_product) {
                  // The forward used P' = P * keep / (1 - p): dP needs the same mask, dV needs P'.
                  if (p.dropout_p > 0) ctx.dropout_row(dp + begin, s, h, i0 + r, j0 + begin, end - begin);
                  if (row_shift_sums != nullptr) {
                    row_shift_grad.add_row(row_shift_sums + (i0 + r) * 4, prob + begin, dp + begin, end - begin);
                  }
                  softmax_grad_row(dp + begin, prob + begin, end - begin, delta_row[i0 + r]);  // dS = P * (dP - delta)
                }
                std::fill(dp, dp + begin, acc_t(0));
                std::fill(dp + end, dp + cols, acc_t(0));
                if (p.dropout_p > 0) ctx.dropout_row(prob, s, h, i0 + r, j0, cols);
              }
              // The bias gets dS itself; Q and K get it through softcap's tanh (ds/dx = 1 - tanh^2).
              if (bias_grad.active) bias_grad.add_tile(bias_grad.data(), dpt, BK, s.b, h, i0, rows, j0, cols);
              if (cap_grad != nullptr) {
                for (int64_t r = 0; r < rows; ++r) {
                  const auto [begin, end] = s.visible(i0 + r, j0, cols);
                  multiply_row(dpt + r * BK, cap_grad + r * BK, begin, end);
                }
              }
              if constexpr (kAmx) {
#if defined(CPU_CAPABILITY_AVX512)
                // dV^T += dO^T P', dK^T += Q^T dS (their transposes go into dv_acc and dk_acc with the
                // key block), dQ (+)= dS K through a tile of its own (the tiles write whole 16-row blocks).
                if (amx_fused_grad) {
                  std::array<AmxBackwardSpace::ProbabilityRow, QB> prob_rows;
                  for (int64_t r = 0; r < rows; ++r) {  // probabilities_row's shift, normalizer, empty rows
                    const acc_t lse = lse_row[i0 + r];
                    prob_rows[r] = {ctx.lse_shift(lse), normalizer_row == nullptr ? acc_t(1) : normalizer_row[i0 + r],
                                    lse == -std::numeric_limits<acc_t>::infinity()};
                  }
                  amx_space.round_gradient_operands(amx, rows, cols, st, dpt, BK, prob_rows.data(), ctx.log2_per_unit,
                                                    delta_row + i0,
                                                    [&](int64_t r) { return s.visible(i0 + r, j0, cols); });
                } else {
                  amx_space.pack_gradient_operands(amx, rows, cols, st, dpt, BK);
                }
                amx_space.gradient_products<typename Products::T>(amx, i0, rows, cols,
                                                                  [&](int64_t r0, int64_t mr) {
                                                                    const auto [kb0, ke0] = ctx.block_keys(s, i0, j0, cols, r0, std::min(mr, rows - r0));
                                                                    return amx::TileExtent{0, INT64_MAX, kb0, ke0};
                                                                  });
                for (int64_t r = 0; r < rows; ++r) {
                  sum_into(dq_acc + (i0 + r) * ld_dq_acc, amx.dq_tile + r * ld_dq, D, kb == blocks.first());
                }
#endif
              } else {
                const auto seeing = ctx.seeing_extent(s, i0, j0);
                gemm_packed<acc_t>(cols, Dv, rows, st, 1, BK, do_panels, dv_acc, ld_dv, true, seeing);  // dV += P'^T dO
                gemm_packed<acc_t>(cols, D, rows, dpt, 1, BK, q_panels, dk_acc, ld_dq, true, seeing);   // dK += dS^T Q
                gemm_packed<acc_t>(rows, D, cols, dpt, BK, 1, k_panels, dq_acc + i0 * ld_dq_acc, ld_dq_acc,
                                   kb != blocks.first(), ctx.visible_key_depth(s, i0, j0, cols));  // dQ (+)= dS K
              }
            }
#if defined(CPU_CAPABILITY_AVX512)
            if constexpr (kAmx) amx_space.add_transposed_key_grads(amx, cols, dk_acc, ld_dq, dv_acc, ld_dv);
#endif
            if (G == 1) {
              for (int64_t c = 0; c < cols; ++c) {
                store_row(dk.at(s.tb, kh, s.k0 + j0 + c), dk.s3, dk_acc + c * ld_dq, D, acc_t(p.scale));
                store_row(dv.at(s.tb, kh, s.k0 + j0 + c), dv.s3, dv_acc + c * ld_dv, Dv, acc_t(1));
              }
            } else if (subsets > 1) {
              add_key_block(pair * kv_blocks + kb, h - kh * G, j0, cols, dk_acc);
            }
          }
          finish_dq(h);
        }
        if (!kv_per_block) {  // the group's summed key and value gradients
          for (int64_t kb = blocks.first(); kb < blocks.end(); kb = blocks.next(kb)) {
            const int64_t j0 = kb * BK, cols = std::min(BK, s.kv_len - j0);
            const acc_t* dk_acc = dk_all + blocks.index(kb) * BK * ld_dq;
            const acc_t* dv_acc = dv_all + blocks.index(kb) * BK * ld_dv;
            for (int64_t c = 0; c < cols; ++c) {
              store_row(dk.at(s.tb, kh, s.k0 + j0 + c), dk.s3, dk_acc + c * ld_dq, D, acc_t(p.scale));
              store_row(dv.at(s.tb, kh, s.k0 + j0 + c), dv.s3, dv_acc + c * ld_dv, Dv, acc_t(1));
            }
          }
        }
      }
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kAmx) Products::T::release();
#endif
    };
  });

  if (bias_grad.active) grad_bias.copy_(bias_grad.result(*bias));
  if (row_shift_grad.active) grad_bias.copy_(row_shift_grad.result(p, *bias));
}

// The backward on AMX tiles for bfloat16 where the active capability is amx (as forward_tiled).
template <typename scalar_t>
void attention_backward_cpu_impl(const AttentionParams& p, const SequenceLayout& layout, const at::Tensor& grad_out,
                                 const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alibi_slopes,
                                 const at::Tensor& out, const at::Tensor& lse, at::Tensor& grad_q, at::Tensor& grad_k,
                                 at::Tensor& grad_v, bool bias_requires_grad, at::Tensor& grad_bias) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    switch (amx_tile_mode()) {
      case AmxTileMode::Hardware:
        return backward_with<scalar_t, AmxProducts<amx::AmxHardware>>(p, layout, grad_out, query, key, value, bias,
                                                                     alibi_slopes, out, lse, grad_q, grad_k, grad_v,
                                                                     bias_requires_grad, grad_bias);
      case AmxTileMode::Emulated:
        return backward_with<scalar_t, AmxProducts<amx::AmxEmulated>>(p, layout, grad_out, query, key, value, bias,
                                                                     alibi_slopes, out, lse, grad_q, grad_k, grad_v,
                                                                     bias_requires_grad, grad_bias);
      case AmxTileMode::Off:
        break;
    }
  }
#endif
  backward_with<scalar_t, FmaProducts>(p, layout, grad_out, query, key, value, bias, alibi_slopes, out, lse, grad_q,
                                       grad_k, grad_v, bias_requires_grad, grad_bias);
}

// The backward of dense (batch, heads, seq, dim) tensors, checked, into gradients allocated by
// the caller (any strides; every element is written).
void dense_backward(const AttentionParams& p, const at::Tensor& grad_out, const at::Tensor& query,
                    const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& alibi_slopes, const at::Tensor& out, const at::Tensor& logsumexp,
                    at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v, bool bias_requires_grad,
                    at::Tensor& grad_bias) {
  if (p.q_len == 0 || p.kv_len == 0 || p.batch * p.heads == 0) {  // nothing attends: every gradient is zero
    grad_q.zero_(), grad_k.zero_(), grad_v.zero_(), grad_bias.zero_();
    return;
  }
  const SequenceLayout layout = SequenceLayout::dense(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "qkv_attention_backward_cpu", [&] {
    attention_backward_cpu_impl<scalar_t>(p, layout, grad_out, query, key, value, bias, alibi_slopes, out, logsumexp,
                                          grad_q, grad_k, grad_v, bias_requires_grad, grad_bias);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& logsumexp,
    double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed, bool bias_requires_grad, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const auto p = check_attention_args("qkv.attention_backward", query, key, value, bias, dropout_p,
                                      is_causal, bottom_right, scale, dropout_seed, window_left, window_right,
                                      softcap, alibi_slopes);
  check_backward_args("qkv.attention_backward", query, grad_out, out, logsumexp, p, dropout_p, dropout_seed);
  at::Tensor grad_q = empty_token_major(query, p.head_dim);
  at::Tensor grad_k = empty_token_major(key, p.head_dim);
  at::Tensor grad_v = empty_token_major(value, p.v_head_dim);
  at::Tensor grad_bias = empty_grad_bias(bias, bias_requires_grad, query);
  dense_backward(p, grad_out, query, key, value, bias, alibi_slopes, out, logsumexp, grad_q, grad_k, grad_v,
                 bias_requires_grad, grad_bias);
  return {grad_q, grad_k, grad_v, grad_bias};
}

// Packed self-attention: dQ, dK and dV are written straight into the three views of one
// grad_qkv buffer (the kernel writes through any row strides), so no stack of three gradients
// follows. The checks name this op.
std::tuple<at::Tensor, at::Tensor> attention_qkvpacked_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& qkv, const std::optional<at::Tensor>& bias, const at::Tensor& out,
    const at::Tensor& logsumexp, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& dropout_seed, bool bias_requires_grad, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = "qkv.attention_qkvpacked_backward";
  check_qkvpacked(op, qkv);
  const auto [query, key, value] = split_packed_qkv(qkv);
  const auto p = check_attention_args(op, query, key, value, bias, dropout_p, is_causal, /*bottom_right=*/false,
                                      scale, dropout_seed, window_left, window_right, softcap, alibi_slopes);
  check_backward_args(op, query, grad_out, out, logsumexp, p, dropout_p, dropout_seed);
  at::Tensor grad_qkv = empty_qkv_gradient(qkv);
  auto [grad_q, grad_k, grad_v] = split_packed_qkv(grad_qkv);
  at::Tensor grad_bias = empty_grad_bias(bias, bias_requires_grad, query);
  dense_backward(p, grad_out, query, key, value, bias, alibi_slopes, out, logsumexp, grad_q, grad_k, grad_v,
                 bias_requires_grad, grad_bias);
  return {grad_qkv, grad_bias};
}

// ---- the packed (varlen) and KV-cache doors ------------------------------------------------

struct PackedSequences {
  AttentionParams p;
  SequenceLayout layout;
};

PackedSequences packed_sequences(const char* op, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                 const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                 double dropout_p, bool is_causal, bool bottom_right, std::optional<double> scale,
                                 const std::optional<at::Tensor>& dropout_seed, int64_t window_left,
                                 int64_t window_right, double softcap,
                                 const std::optional<at::Tensor>& alibi_slopes) {
  AttentionParams p = check_varlen_args(op, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, dropout_p, is_causal, bottom_right, scale, dropout_seed,
                                          window_left, window_right, softcap, alibi_slopes);
  auto cu_q = read_offsets(op, "cu_seqlens_q", cu_seqlens_q, query.size(0), "query", "max_seqlen_q", max_seqlen_q,
                           "query");
  auto cu_k = read_offsets(op, "cu_seqlens_k", cu_seqlens_k, key.size(0), "key", "max_seqlen_k", max_seqlen_k, "key");
  SequenceLayout layout = SequenceLayout::packed(p, std::move(cu_q), std::move(cu_k), query.size(0));
  return {p, std::move(layout)};
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const auto [p, layout] = packed_sequences("qkv.attention_varlen", query, key, value, cu_seqlens_q, cu_seqlens_k,
                                            max_seqlen_q, max_seqlen_k, dropout_p, is_causal, bottom_right, scale,
                                            dropout_seed, window_left, window_right, softcap, alibi_slopes);
  at::Tensor out = empty_varlen_output(query, p);
  at::Tensor lse = empty_varlen_logsumexp(query);
  // Rows past the last offset belong to no sequence: zeros and -inf, like rows that see nothing.
  out.zero_();
  lse.fill_(-std::numeric_limits<double>::infinity());
  if (p.heads == 0 || layout.count() == 0) return {out, lse};
  at::Tensor out4 = packed_as_4d(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "qkv_attention_varlen_cpu", [&] {
    attention_forward_cpu_impl<scalar_t>(p, layout, packed_as_4d(query), packed_as_4d(key), packed_as_4d(value),
                                         std::nullopt, alibi_slopes, out4, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, bool is_causal,
    bool bottom_right, std::optional<double> scale, const std::optional<at::Tensor>& dropout_seed,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = "qkv.attention_varlen_backward";
  const auto [p, layout] = packed_sequences(op, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                            max_seqlen_k, dropout_p, is_causal, bottom_right, scale, dropout_seed,
                                            window_left, window_right, softcap, alibi_slopes);
  check_varlen_backward_args(op, query, grad_out, out, logsumexp, p, dropout_p, dropout_seed);
  // Rows and keys of no sequence, and keys no query sees, get zero gradients.
  at::Tensor grad_q = at::zeros_like(query, at::MemoryFormat::Contiguous);
  at::Tensor grad_k = at::zeros_like(key, at::MemoryFormat::Contiguous);
  at::Tensor grad_v = at::zeros_like(value, at::MemoryFormat::Contiguous);
  if (p.heads == 0 || layout.count() == 0) return {grad_q, grad_k, grad_v};
  at::Tensor gq4 = packed_as_4d(grad_q), gk4 = packed_as_4d(grad_k), gv4 = packed_as_4d(grad_v);
  at::Tensor no_bias_grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "qkv_attention_varlen_backward_cpu",
                                  [&] {
                                    attention_backward_cpu_impl<scalar_t>(
                                        p, layout, packed_as_4d(grad_out), packed_as_4d(query), packed_as_4d(key),
                                        packed_as_4d(value), std::nullopt, alibi_slopes, packed_as_4d(out),
                                        logsumexp, gq4, gk4, gv4, false, no_bias_grad);
                                  });
  return {grad_q, grad_k, grad_v};
}

std::tuple<at::Tensor, at::Tensor> attention_kvcache_cpu(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& key,
    const std::optional<at::Tensor>& value, const std::optional<at::Tensor>& cache_seqlens, bool is_causal,
    std::optional<double> scale, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  const KvcacheArgs args = check_kvcache_args("qkv.attention_kvcache", query, k_cache, v_cache, key, value,
                                              cache_seqlens, is_causal, scale, window_left, window_right, softcap,
                                              alibi_slopes);
  if (key.has_value() && key->defined()) write_into_caches(args, k_cache, v_cache, *key, *value);
  const AttentionParams& p = args.p;
  at::Tensor out = empty_attention_output(query, p);
  at::Tensor lse = empty_logsumexp(query, p);
  if (p.batch * p.heads == 0) return {out, lse};
  const SequenceLayout layout = SequenceLayout::dense(p, args.kv_lens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "qkv_attention_kvcache_cpu", [&] {
    attention_forward_cpu_impl<scalar_t>(p, layout, query, k_cache, v_cache, std::nullopt, alibi_slopes, out, lse);
  });
  return {out, lse};
}

}  // namespace

QKV_REGISTER_CPU_KERNEL(attention_cpu_kernel, attention_forward_cpu);
QKV_REGISTER_CPU_KERNEL(attention_backward_cpu_kernel, attention_backward_cpu);
QKV_REGISTER_CPU_KERNEL(attention_qkvpacked_backward_cpu_kernel, attention_qkvpacked_backward_cpu);
QKV_REGISTER_CPU_KERNEL(attention_varlen_cpu_kernel, attention_varlen_cpu);
QKV_REGISTER_CPU_KERNEL(attention_varlen_backward_cpu_kernel, attention_varlen_backward_cpu);
QKV_REGISTER_CPU_KERNEL(attention_kvcache_cpu_kernel, attention_kvcache_cpu);

}  // namespace CPU_CAPABILITY
}  // namespace qkv
