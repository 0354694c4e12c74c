// The C++ API computes attention and its gradients through autograd, matching a plain
// torch::matmul / softmax reference.
#include <gtest/gtest.h>
#include <qkv/qkv.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

namespace {

torch::Tensor reference_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  const torch::Tensor& bias, bool causal) {
  auto scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(q.size(-1)));
  if (bias.defined()) scores = scores + bias;
  if (causal) {
    auto hidden = torch::ones({q.size(2), k.size(2)}, torch::kBool).triu(1);
    scores = scores.masked_fill(hidden, -std::numeric_limits<double>::infinity());
  }
  return torch::matmul(torch::softmax(scores, -1), v);
}

torch::Tensor randn(torch::IntArrayRef shape, bool grad = true) {
  return torch::randn(shape, torch::kDouble).requires_grad_(grad);
}

TEST(QkvApi, ForwardMatchesReference) {
  torch::manual_seed(0);
  for (bool causal : {false, true}) {
    auto q = randn({2, 3, 17, 12}, false), k = randn({2, 3, 17, 12}, false), v = randn({2, 3, 17, 5}, false);
    auto bias = randn({3, 17, 17}, false);
    auto [out, lse] = qkv::attention(q, k, v, bias, 0.0, causal);
    EXPECT_EQ(out.sizes(), torch::IntArrayRef({2, 3, 17, 5}));
    EXPECT_EQ(lse.sizes(), torch::IntArrayRef({2, 3, 17}));
    EXPECT_TRUE(torch::allclose(out, reference_attention(q, k, v, bias, causal), 1e-10, 1e-10));
  }
}

TEST(QkvApi, BackwardThroughAutogradMatchesReference) {
  torch::manual_seed(1);
  auto q = randn({1, 2, 9, 7}), k = randn({1, 2, 13, 7}), v = randn({1, 2, 13, 4});
  auto bias = randn({1, 1, 9, 13});
  auto grad_out = torch::randn({1, 2, 9, 4}, torch::kDouble);

  auto [out, lse] = qkv::attention(q, k, v, bias);
  auto got = torch::autograd::grad({out}, {q, k, v, bias}, {grad_out});
  auto want = torch::autograd::grad({reference_attention(q, k, v, bias, false)}, {q, k, v, bias}, {grad_out});
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(torch::allclose(got[i], want[i], 1e-9, 1e-9)) << "gradient " << i;
  }
}

// Issue 17's options through the C++ API: grouped key heads and a bottom-right window, against
// the reference on repeated heads and an explicit band.
TEST(QkvApi, GroupedHeadsAndWindow) {
  torch::manual_seed(4);
  auto q = randn({1, 4, 9, 8}), k = randn({1, 2, 12, 8}), v = randn({1, 2, 12, 8});
  auto [out, lse] = qkv::attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/true, /*bottom_right=*/true,
                                   std::nullopt, std::nullopt, /*window_left=*/3);
  auto i = torch::arange(9, torch::kLong).unsqueeze(1) + 3, j = torch::arange(12, torch::kLong).unsqueeze(0);
  auto band = torch::full({9, 12}, 0.0, torch::kDouble)
                  .masked_fill((j > i).logical_or(j < i - 3), -std::numeric_limits<double>::infinity());
  auto k_rep = k.repeat_interleave(2, 1), v_rep = v.repeat_interleave(2, 1);
  EXPECT_TRUE(torch::allclose(out, reference_attention(q, k_rep, v_rep, band, false), 1e-10, 1e-10));
  auto grads = torch::autograd::grad({out.sum()}, {k});
  EXPECT_EQ(grads[0].sizes(), k.sizes());
}

// Packed sequences equal the per-sequence calls; a KV cache takes the new keys in place.
TEST(QkvApi, VarlenAndKvcache) {
  torch::manual_seed(5);
  auto q = randn({7, 2, 4}, false), k = randn({7, 2, 4}, false), v = randn({7, 2, 4}, false);
  auto cu = torch::tensor({0, 3, 7}, torch::kInt);
  auto [out, lse] = qkv::attention_varlen(q, k, v, cu, cu, 4, 4, 0.0, /*is_causal=*/true, /*bottom_right=*/true);
  for (int64_t b = 0; b < 2; ++b) {
    const int64_t start = b == 0 ? 0 : 3, len = b == 0 ? 3 : 4;
    auto seq = [&](const torch::Tensor& t) { return t.narrow(0, start, len).transpose(0, 1).unsqueeze(0); };
    auto [want, want_lse] = qkv::attention(seq(q), seq(k), seq(v), std::nullopt, 0.0, true, true);
    EXPECT_TRUE(torch::allclose(seq(out), want, 1e-10, 1e-10)) << "sequence " << b;
  }
  auto k_cache = torch::zeros({1, 1, 8, 4}, torch::kDouble), v_cache = torch::zeros({1, 1, 8, 4}, torch::kDouble);
  auto k_new = randn({1, 1, 1, 4}, false), v_new = randn({1, 1, 1, 4}, false);
  auto query = randn({1, 2, 1, 4}, false);
  auto [decoded, decoded_lse] =
      qkv::attention_kvcache(query, k_cache, v_cache, k_new, v_new, torch::tensor({5}, torch::kInt), true);
  EXPECT_TRUE(torch::equal(k_cache[0][0][5], k_new[0][0][0]));
  EXPECT_EQ(decoded.sizes(), torch::IntArrayRef({1, 2, 1, 4}));
}

TEST(QkvApi, WeightsRebuiltFromLogsumexpMatchSoftmax) {
  torch::manual_seed(2);
  auto q = randn({2, 2, 6, 8}, false), k = randn({2, 2, 10, 8}, false), v = randn({2, 2, 10, 8}, false);
  auto [out, lse] = qkv::attention(q, k, v);
  auto weights = qkv::attention_weights(q, k, std::nullopt, lse);
  auto want = torch::softmax(torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(8.0), -1);
  EXPECT_TRUE(torch::allclose(weights, want, 1e-10, 1e-10));
  EXPECT_TRUE(torch::allclose(torch::matmul(weights, v), out, 1e-10, 1e-10));
}

TEST(QkvApi, AttentionWithWeightsMatchesTheTwoOps) {
  torch::manual_seed(3);
  auto q = randn({2, 3, 30, 8}, false), k = randn({2, 3, 40, 8}, false), v = randn({2, 3, 40, 5}, false);
  auto [out, lse, weights] = qkv::attention_with_weights(q, k, v, std::nullopt, 0.0, true, false, std::nullopt,
                                                         std::nullopt, /*average_heads=*/true);
  auto [want_out, want_lse] = qkv::attention(q, k, v, std::nullopt, 0.0, true);
  auto want_weights = qkv::attention_weights(q, k, std::nullopt, want_lse, 0.0, true, false, std::nullopt,
                                             std::nullopt, true);
  EXPECT_TRUE(torch::allclose(out, want_out, 1e-10, 1e-10));
  EXPECT_TRUE(torch::allclose(lse, want_lse, 1e-10, 1e-10));
  EXPECT_TRUE(torch::allclose(weights, want_weights, 1e-10, 1e-10));
}

// Packed self-attention: the core op on qkv's views, and the gradient of qkv as one tensor of
// qkv's strides (here a sequence-first projection viewed batch-first).
TEST(QkvApi, QkvpackedIsAttentionOnItsViews) {
  torch::manual_seed(6);
  auto packed = randn({11, 2, 3, 2, 8}, false).permute({1, 0, 2, 3, 4}).requires_grad_();
  auto bias = randn({2, 1, 11, 11});
  auto view = [&](int64_t i) { return packed.select(2, i).transpose(1, 2); };
  auto [out, lse] = qkv::attention_qkvpacked(packed, bias, 0.0, /*is_causal=*/true);
  auto [want, want_lse] = qkv::attention(view(0), view(1), view(2), bias, 0.0, /*is_causal=*/true);
  EXPECT_TRUE(torch::equal(out, want));
  EXPECT_TRUE(torch::equal(lse, want_lse));
  auto grad_out = torch::randn_like(out);
  auto got = torch::autograd::grad({out}, {packed, bias}, {grad_out});
  auto ref = torch::autograd::grad({reference_attention(view(0), view(1), view(2), bias, true)}, {packed, bias},
                                   {grad_out});
  EXPECT_EQ(got[0].strides(), packed.strides());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(torch::allclose(got[i], ref[i], 1e-9, 1e-9)) << "gradient " << i;
  }
}

TEST(QkvApi, FullyMaskedRowsGiveZerosAndZeroGradients) {
  auto q = randn({1, 1, 4, 8}), k = randn({1, 1, 5, 8}), v = randn({1, 1, 5, 8});
  auto bias = torch::zeros({1, 1, 4, 5}, torch::kDouble);
  bias.index_put_({0, 0, 2}, -std::numeric_limits<double>::infinity());
  auto [out, lse] = qkv::attention(q, k, v, bias);
  EXPECT_TRUE(out.index({0, 0, 2}).eq(0).all().item<bool>());
  EXPECT_TRUE(std::isinf(lse.index({0, 0, 2}).item<double>()));
  out.sum().backward();
  EXPECT_FALSE(q.grad().isnan().any().item<bool>());
  EXPECT_TRUE(q.grad().index({0, 0, 2}).eq(0).all().item<bool>());
}

TEST(QkvApi, ProjectionOpsMatchComposedReference) {
  torch::manual_seed(3);
  const int64_t N = 2, L = 6, S = 9, E = 8, H = 2, kdim = 5;
  auto x = randn({N, L, E}), memory = randn({N, S, kdim});
  auto w_in = randn({3 * E, E}), b_in = randn({3 * E}), w_out = randn({E, E}), b_out = randn({E});
  auto heads = [&](const torch::Tensor& t) { return t.view({N, t.size(1), H, E / H}).transpose(1, 2); };
  auto merge = [&](const torch::Tensor& t) { return t.transpose(1, 2).reshape({N, t.size(2), E}); };
  auto chunks = w_in.chunk(3), bias_chunks = b_in.chunk(3);
  auto q = heads(torch::nn::functional::linear(x, chunks[0], bias_chunks[0]));
  auto k = heads(torch::nn::functional::linear(x, chunks[1], bias_chunks[1]));
  auto v = heads(torch::nn::functional::linear(x, chunks[2], bias_chunks[2]));

  auto self_ref = torch::nn::functional::linear(merge(reference_attention(q, k, v, {}, false)), w_out, b_out);
  EXPECT_TRUE(torch::allclose(qkv::multi_head_attention(x, x, x, H, w_in, b_in, w_out, b_out), self_ref, 1e-10, 1e-10));

  auto causal_ref = torch::nn::functional::linear(merge(reference_attention(q, k, v, {}, true)), w_out, b_out);
  auto causal = qkv::masked_self_attention(x, H, w_in, b_in, w_out, b_out);
  EXPECT_TRUE(torch::allclose(causal, causal_ref, 1e-10, 1e-10));
  auto grads = torch::autograd::grad({causal.sum()}, {x, w_in});
  auto ref_grads = torch::autograd::grad({causal_ref.sum()}, {x, w_in});
  EXPECT_TRUE(torch::allclose(grads[0], ref_grads[0], 1e-9, 1e-9));
  EXPECT_TRUE(torch::allclose(grads[1], ref_grads[1], 1e-9, 1e-9));

  auto wq = randn({E, E}), wk = randn({E, kdim}), wv = randn({E, kdim});
  auto cq = heads(torch::nn::functional::linear(x, wq, bias_chunks[0]));
  auto ck = heads(torch::nn::functional::linear(memory, wk, bias_chunks[1]));
  auto cv = heads(torch::nn::functional::linear(memory, wv, bias_chunks[2]));
  auto cross_ref = torch::nn::functional::linear(merge(reference_attention(cq, ck, cv, {}, false)), w_out, b_out);
  auto cross = qkv::cross_attention(x, memory, H, wq, wk, wv, b_in, w_out, b_out);
  EXPECT_TRUE(torch::allclose(cross, cross_ref, 1e-10, 1e-10));
}

TEST(QkvApi, BadInputRaisesClearError) {
  auto q = torch::randn({2, 3, 4}), k = torch::randn({1, 2, 3, 4});
  try {
    qkv::attention(q, k, k);
    FAIL() << "expected an error for a 3-D query";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("query must be a 4-D tensor"), std::string::npos) << e.what();
  }
  EXPECT_THROW(qkv::attention(k, k, k.to(torch::kDouble)), c10::Error);
  try {
    qkv::attention_qkvpacked(torch::randn({2, 5, 2, 2, 8}));
    FAIL() << "expected an error for a qkv of 2 tensors";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("qkv.attention_qkvpacked: qkv must have shape (batch, seq, 3, heads, head_dim)"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(qkv::multi_head_attention(torch::randn({2, 3, 8}), torch::randn({2, 3, 8}), torch::randn({2, 3, 8}), 3,
                                         torch::randn({24, 8}), std::nullopt, torch::randn({8, 8}), std::nullopt),
               c10::Error);
}

}  // namespace
