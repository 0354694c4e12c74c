// The CPU backward's task split and its ordered sums (csrc/cpu/backward_tasks.h), compiled as
// the baseline copy. Issue 17's GQA memory target rests on the split: grouped query heads get a
// task each (no dQ partials), and KvBlockSums adds their key blocks in head order, copying only
// the blocks that come early.
#include <gtest/gtest.h>

#include "cpu/backward_tasks.h"

#include <optional>
#include <vector>

namespace {

using qkv::AttentionParams;
using qkv::BackwardTasks;
using qkv::KvBlockSums;

AttentionParams params(int64_t batch, int64_t heads, int64_t kv_heads, int64_t length, int64_t head_dim) {
  AttentionParams p;
  p.batch = batch, p.heads = heads, p.kv_heads = kv_heads, p.q_len = length, p.kv_len = length;
  p.head_dim = p.v_head_dim = head_dim;
  return p;
}

int64_t key_blocks(int64_t length) { return (length + qkv::kBackwardKeyBlock - 1) / qkv::kBackwardKeyBlock; }

TEST(BackwardTasks, GroupedQueryHeadsGetATaskEach) {
  // The gqa8to1 bench case (B1 H32/4 L2048 D64): 4 pairs of 8 query heads.
  const AttentionParams p = params(1, 32, 4, 2048, 64);
  const BackwardTasks tasks(p, 1, 4, std::nullopt, false, key_blocks(2048));
  EXPECT_EQ(tasks.chunks, 1);  // every task runs all keys: dQ whole, no partials
  EXPECT_EQ(tasks.subsets, 8);
  EXPECT_EQ(tasks.count(), 32);
  EXPECT_EQ(tasks.heads_of(tasks.subset_of(13)), std::make_pair(int64_t(5), int64_t(6)));
}

TEST(BackwardTasks, OneQueryHeadPerKeyHeadSplitsKeys) {
  const AttentionParams p = params(1, 8, 8, 2048, 64);
  const BackwardTasks tasks(p, 1, 8, std::nullopt, false, key_blocks(2048));
  EXPECT_EQ(tasks.subsets, 1);
  EXPECT_EQ(tasks.chunks, 4);  // 2048 keys in chunks of kMinChunkKeys
}

TEST(BackwardTasks, ManyPairsRunWhole) {
  const AttentionParams p = params(4, 16, 8, 2048, 64);
  const BackwardTasks tasks(p, 4, 8, std::nullopt, false, key_blocks(2048));
  EXPECT_EQ(tasks.subsets, 1);
  EXPECT_EQ(tasks.chunks, 1);
  EXPECT_EQ(tasks.count(), 32);
}

TEST(BackwardTasks, BiasGradientOverHeadsKeepsAPairsHeadsTogether) {
  // The heads of a pair add into the same elements of a bias broadcast over heads.
  AttentionParams p = params(1, 32, 4, 2048, 64);
  p.has_bias = true;
  const at::Tensor bias = at::zeros({1, 1, 2048, 2048});
  const BackwardTasks tasks(p, 1, 4, bias, true, key_blocks(2048));
  EXPECT_EQ(tasks.subsets, 1);
  EXPECT_EQ(tasks.chunks, 4);
}

// add(sum, x, first) of a one-element block that logs which block it adds.
struct Log {
  std::vector<const float*> added;
  auto adder() {
    return [this](float* sum, const float* x, bool first) {
      added.push_back(x);
      *sum = first ? *x : *sum + *x;
    };
  }
};

// Every key block belongs to exactly one chunk, each chunk's blocks come in ascending order and
// index() numbers them 0, 1, .. below ceil(blocks / chunks) (the size of a chunk's dK/dV scratch).
void expect_partition(bool contiguous, int64_t chunks, int64_t blocks) {
  std::vector<int> owners(blocks, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    const qkv::ChunkBlocks chunk = contiguous ? qkv::ChunkBlocks::contiguous(c, chunks, blocks)
                                              : qkv::ChunkBlocks::folded(c, chunks, blocks);
    int64_t previous = -1, position = 0;
    for (int64_t kb = chunk.first(); kb < chunk.end(); kb = chunk.next(kb)) {
      ASSERT_GT(kb, previous);
      ASSERT_EQ(chunk.index(kb), position++);
      ASSERT_LT(chunk.index(kb), (blocks + chunks - 1) / chunks);
      ++owners[kb];
      previous = kb;
    }
    EXPECT_EQ(chunk.empty(), position == 0);
    if (position > 0) EXPECT_EQ(chunk.last(), previous);
  }
  for (int64_t kb = 0; kb < blocks; ++kb) EXPECT_EQ(owners[kb], 1) << "block " << kb;
}

TEST(ChunkBlocks, EveryBlockInOneChunkInOrder) {
  for (const bool contiguous : {false, true}) {
    for (int64_t chunks = 1; chunks <= 6; ++chunks) {
      for (int64_t blocks = 1; blocks <= 30; ++blocks) {
        SCOPED_TRACE(testing::Message() << "contiguous " << contiguous << " chunks " << chunks << " blocks " << blocks);
        expect_partition(contiguous, chunks, blocks);
      }
    }
  }
}

TEST(ChunkBlocks, FoldedChunksShareACausalBackwardEvenly) {
  // Under a causal mask block kb of n is seen by about n - kb - 1/2 block rows of queries.
  for (const int64_t blocks : {8, 16, 32}) {
    const int64_t chunks = 4;
    for (int64_t c = 0; c < chunks; ++c) {
      const qkv::ChunkBlocks chunk = qkv::ChunkBlocks::folded(c, chunks, blocks);
      double work = 0;
      for (int64_t kb = chunk.first(); kb < chunk.end(); kb = chunk.next(kb)) work += blocks - kb - 0.5;
      EXPECT_DOUBLE_EQ(work, blocks * blocks / 2.0 / chunks) << "chunk " << c << " of " << blocks << " blocks";
    }
  }
}

TEST(KvBlockSums, AddsInHeadOrderWhateverTheArrivalOrder) {
  // In float32, 1e8 + 1 is 1e8: ((1e8 + 1) - 1e8) + 1 = 1, where arrival order gives 2.
  const float x[4] = {1e8f, 1.0f, -1e8f, 1.0f};
  KvBlockSums<float> sums(1, 4, 1, /*own_sums=*/true);
  Log log;
  EXPECT_FALSE(sums.hand_in(0, 2, &x[2], log.adder()));  // parked
  EXPECT_FALSE(sums.hand_in(0, 0, &x[0], log.adder()));  // added; 1 is not in
  EXPECT_FALSE(sums.hand_in(0, 3, &x[3], log.adder()));  // parked
  EXPECT_TRUE(sums.hand_in(0, 1, &x[1], log.adder()));   // adds 1, then the parked 2 and 3
  EXPECT_EQ(*sums.sum(0), 1.0f);
  ASSERT_EQ(log.added.size(), 4u);
  EXPECT_EQ(log.added[0], &x[0]);  // in place
  EXPECT_EQ(log.added[1], &x[1]);
  EXPECT_NE(log.added[2], &x[2]);  // the parked copies
  EXPECT_NE(log.added[3], &x[3]);
  sums.release(0);
}

TEST(KvBlockSums, BlocksInOrderAreAddedInPlaceNotCopied) {
  const float x[3] = {1.0f, 2.0f, 3.0f};
  KvBlockSums<float> sums(2, 3, 1, /*own_sums=*/true);
  for (int64_t slot = 0; slot < 2; ++slot) {
    Log log;
    for (int64_t head = 0; head < 3; ++head) EXPECT_EQ(sums.hand_in(slot, head, &x[head], log.adder()), head == 2);
    EXPECT_EQ(log.added, (std::vector<const float*>{&x[0], &x[1], &x[2]}));
    EXPECT_EQ(*sums.sum(slot), 6.0f);
    sums.release(slot);
  }
}

}  // namespace
