// A LibTorch program that trains a small encoder-decoder Transformer with qkv's C++ API.
//
// Task: reverse digit sequences of length 1..kMaxLen (right-padded, so every attention call
// gets a key-padding mask). The encoder's self-attention is qkv::multi_head_attention, the
// decoder uses qkv::masked_self_attention (causal, no mask tensor) and qkv::cross_attention.
// At start-up the program also checks that the core op qkv::attention, called on projected
// heads by hand, gives what qkv::multi_head_attention gives.
//
//   qkv_seq2seq [steps]     (default 1500, about 10 s) prints the loss as it falls; exits 1 if it does not.
//   qkv_seq2seq --smoke     120 steps: seconds.
#include <qkv/qkv.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>

namespace {

constexpr int64_t kPad = 0, kBos = 1, kEos = 2, kVocab = 13;  // digit d is token d + 3
constexpr int64_t kMaxLen = 8, kEmbed = 32, kHeads = 4, kHidden = 64, kBatch = 64;

// The parameters of one attention layer, laid out (and initialised) like
// torch.nn.MultiheadAttention: packed (3E, E) q;k;v projection, a packed bias, out_proj.
struct AttentionParamsImpl : torch::nn::Module {
  torch::Tensor in_proj_weight, in_proj_bias;
  torch::nn::Linear out_proj{nullptr};

  explicit AttentionParamsImpl(int64_t embed) {
    in_proj_weight = register_parameter("in_proj_weight", torch::empty({3 * embed, embed}));
    in_proj_bias = register_parameter("in_proj_bias", torch::zeros({3 * embed}));
    out_proj = register_module("out_proj", torch::nn::Linear(embed, embed));
    torch::nn::init::xavier_uniform_(in_proj_weight);
    torch::nn::init::zeros_(out_proj->bias);
  }
};
TORCH_MODULE(AttentionParams);

// -inf where a key is padding, 0 elsewhere, shaped (N, 1, 1, S) to broadcast over heads
// and queries: the additive form of a key-padding mask that the qkv ops take.
torch::Tensor padding_bias(const torch::Tensor& tokens) {
  auto bias = torch::zeros(tokens.sizes(), torch::kFloat)
                  .masked_fill(tokens == kPad, -std::numeric_limits<float>::infinity());
  return bias.view({tokens.size(0), 1, 1, tokens.size(1)});
}

torch::nn::Sequential feed_forward() {
  return torch::nn::Sequential(torch::nn::Linear(kEmbed, kHidden), torch::nn::ReLU(),
                               torch::nn::Linear(kHidden, kEmbed));
}

// Pre-LayerNorm encoder layer: x + SelfAttention(LN(x)), then x + FF(LN(x)).
struct EncoderLayerImpl : torch::nn::Module {
  torch::nn::LayerNorm norm_attn{nullptr}, norm_ff{nullptr};
  AttentionParams attn{nullptr};
  torch::nn::Sequential ff{nullptr};

  EncoderLayerImpl() {
    norm_attn = register_module("norm_attn", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kEmbed})));
    attn = register_module("attn", AttentionParams(kEmbed));
    norm_ff = register_module("norm_ff", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kEmbed})));
    ff = register_module("ff", feed_forward());
  }

  torch::Tensor forward(torch::Tensor x, const torch::Tensor& pad_bias) {
    auto h = norm_attn(x);
    x = x + qkv::multi_head_attention(h, h, h, kHeads, attn->in_proj_weight, attn->in_proj_bias,
                                      attn->out_proj->weight, attn->out_proj->bias, pad_bias);
    return x + ff->forward(norm_ff(x));
  }
};
TORCH_MODULE(EncoderLayer);

// Pre-LayerNorm decoder layer: causal self-attention, cross-attention to the encoder, FF.
struct DecoderLayerImpl : torch::nn::Module {
  torch::nn::LayerNorm norm_self{nullptr}, norm_cross{nullptr}, norm_ff{nullptr};
  AttentionParams self_attn{nullptr}, cross_attn{nullptr};
  torch::nn::Sequential ff{nullptr};

  DecoderLayerImpl() {
    norm_self = register_module("norm_self", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kEmbed})));
    self_attn = register_module("self_attn", AttentionParams(kEmbed));
    norm_cross = register_module("norm_cross", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kEmbed})));
    cross_attn = register_module("cross_attn", AttentionParams(kEmbed));
    norm_ff = register_module("norm_ff", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kEmbed})));
    ff = register_module("ff", feed_forward());
  }

  torch::Tensor forward(torch::Tensor y, const torch::Tensor& memory, const torch::Tensor& src_pad_bias) {
    // Target padding only follows EOS; causal masking already keeps real positions off it.
    y = y + qkv::masked_self_attention(norm_self(y), kHeads, self_attn->in_proj_weight, self_attn->in_proj_bias,
                                       self_attn->out_proj->weight, self_attn->out_proj->bias);
    // cross_attention takes separate q/k/v weights: rows of the packed projection, as views.
    auto w = cross_attn->in_proj_weight.chunk(3, 0);
    y = y + qkv::cross_attention(norm_cross(y), memory, kHeads, w[0], w[1], w[2], cross_attn->in_proj_bias,
                                 cross_attn->out_proj->weight, cross_attn->out_proj->bias, src_pad_bias);
    return y + ff->forward(norm_ff(y));
  }
};
TORCH_MODULE(DecoderLayer);

// Fixed sin/cos positional encoding, (max_len, E).
torch::Tensor sinusoidal_positions(int64_t max_len, int64_t embed) {
  auto position = torch::arange(max_len, torch::kFloat).unsqueeze(1);
  auto frequency = torch::exp(torch::arange(0, embed, 2, torch::kFloat) * (-std::log(10000.0) / embed));
  auto table = torch::zeros({max_len, embed});
  table.index_put_({torch::indexing::Slice(), torch::indexing::Slice(0, torch::indexing::None, 2)},
                   torch::sin(position * frequency));
  table.index_put_({torch::indexing::Slice(), torch::indexing::Slice(1, torch::indexing::None, 2)},
                   torch::cos(position * frequency));
  return table;
}

struct Seq2SeqImpl : torch::nn::Module {
  torch::nn::Embedding src_embed{nullptr}, tgt_embed{nullptr};
  EncoderLayer encoder{nullptr};
  DecoderLayer decoder{nullptr};
  torch::nn::LayerNorm encoder_norm{nullptr}, decoder_norm{nullptr};
  torch::nn::Linear to_logits{nullptr};
  torch::Tensor positions;

  Seq2SeqImpl() {
    src_embed = register_module("src_embed", torch::nn::Embedding(kVocab, kEmbed));
    tgt_embed = register_module("tgt_embed", torch::nn::Embedding(kVocab, kEmbed));
    encoder = register_module("encoder", EncoderLayer());
    decoder = register_module("decoder", DecoderLayer());
    encoder_norm = register_module("encoder_norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kEmbed})));
    decoder_norm = register_module("decoder_norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kEmbed})));
    to_logits = register_module("to_logits", torch::nn::Linear(kEmbed, kVocab));
    positions = register_buffer("positions", sinusoidal_positions(kMaxLen + 1, kEmbed));
  }

  torch::Tensor embed(torch::nn::Embedding& table, const torch::Tensor& tokens) {
    return table(tokens) * std::sqrt(static_cast<double>(kEmbed)) + positions.narrow(0, 0, tokens.size(1));
  }

  // Teacher-forced logits (N, T, vocab).
  torch::Tensor forward(const torch::Tensor& src, const torch::Tensor& tgt_in) {
    auto pad_bias = padding_bias(src);
    auto memory = encoder_norm(encoder(embed(src_embed, src), pad_bias));
    return to_logits(decoder_norm(decoder(embed(tgt_embed, tgt_in), memory, pad_bias)));
  }
};
TORCH_MODULE(Seq2Seq);

struct Batch {
  torch::Tensor src, tgt_in, tgt_out;  // (N, kMaxLen + 1) each
};

// Random digit strings; src = digits, EOS, PAD...; target = reversed digits, EOS.
Batch make_batch(int64_t n) {
  auto lengths = torch::randint(1, kMaxLen + 1, {n}, torch::kLong);
  auto digits = torch::randint(0, 10, {n, kMaxLen}, torch::kLong) + 3;
  auto positions = torch::arange(kMaxLen, torch::kLong).unsqueeze(0);
  auto is_pad = positions >= lengths.unsqueeze(1);
  // Output position i reads input position len - 1 - i.
  auto reversed = digits.gather(1, (lengths.unsqueeze(1) - 1 - positions).clamp_min(0)).masked_fill(is_pad, kPad);
  auto rows = torch::arange(n, torch::kLong);

  Batch b;
  b.src = torch::full({n, kMaxLen + 1}, kPad, torch::kLong);
  b.src.narrow(1, 0, kMaxLen).copy_(digits.masked_fill(is_pad, kPad));
  b.src.index_put_({rows, lengths}, kEos);
  b.tgt_in = torch::full({n, kMaxLen + 1}, kPad, torch::kLong);
  b.tgt_in.select(1, 0).fill_(kBos);
  b.tgt_in.narrow(1, 1, kMaxLen).copy_(reversed);
  b.tgt_out = torch::full({n, kMaxLen + 1}, kPad, torch::kLong);
  b.tgt_out.narrow(1, 0, kMaxLen).copy_(reversed);
  b.tgt_out.index_put_({rows, lengths}, kEos);
  return b;
}

// The core op on hand-projected heads must give what the projection op (the whole layer in one op) gives.
bool core_attention_matches_projection_op(EncoderLayer& layer, const Batch& batch) {
  torch::NoGradGuard no_grad;
  auto x = torch::randn({batch.src.size(0), batch.src.size(1), kEmbed});
  auto bias = padding_bias(batch.src);
  auto& p = *layer->attn;
  auto want = qkv::multi_head_attention(x, x, x, kHeads, p.in_proj_weight, p.in_proj_bias, p.out_proj->weight,
                                        p.out_proj->bias, bias);
  // (N, L, 3E) -> q, k, v as (N, H, L, D) strided views: qkv::attention reads them in place.
  auto qkv_heads = torch::nn::functional::linear(x, p.in_proj_weight, p.in_proj_bias)
                       .unflatten(-1, {3 * kHeads, kEmbed / kHeads})
                       .transpose(1, 2)
                       .chunk(3, 1);
  auto [heads, logsumexp] = qkv::attention(qkv_heads[0], qkv_heads[1], qkv_heads[2], bias);
  auto got = p.out_proj(heads.transpose(1, 2).flatten(2));
  const double diff = (got - want).abs().max().item<double>();
  std::printf("check: qkv::attention on projected heads vs qkv::multi_head_attention, max |diff| %.2e\n", diff);
  return diff < 1e-5;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string arg = argc > 1 ? argv[1] : "1500";
  int64_t steps = 0;
  try {
    steps = arg == "--smoke" ? 120 : std::stol(arg);
  } catch (const std::exception&) {
    steps = 0;
  }
  if (steps < 20) {
    std::fprintf(stderr, "usage: qkv_seq2seq [steps >= 20 | --smoke]; got '%s'\n", arg.c_str());
    return 2;
  }
  torch::manual_seed(0);
  torch::set_num_threads(1);  // a tiny model: threads cost more than they give

  Seq2Seq model;
  if (!core_attention_matches_projection_op(model->encoder, make_batch(4))) {
    std::fprintf(stderr, "FAILED: the core op and the projection op disagree\n");
    return 1;
  }
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(3e-3));
  const auto loss_options = torch::nn::functional::CrossEntropyFuncOptions().ignore_index(kPad);

  double first = 0.0, last = 0.0;  // mean loss over the first and the last 10 steps
  const auto start = std::chrono::steady_clock::now();
  for (int64_t step = 1; step <= steps; ++step) {
    auto batch = make_batch(kBatch);
    auto logits = model(batch.src, batch.tgt_in);
    auto loss = torch::nn::functional::cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), loss_options);
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();

    const double value = loss.item<double>();
    if (step <= 10) first += value / 10;
    if (step > steps - 10) last += value / 10;
    if (step == 1 || step % 25 == 0 || step == steps) {
      std::printf("step %4ld  loss %.4f\n", static_cast<long>(step), value);
    }
  }

  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("trained %ld steps in %.1fs (%.1f ms/step)\n", static_cast<long>(steps), seconds, 1e3 * seconds / steps);

  // Token accuracy with teacher forcing on fresh sequences.
  torch::NoGradGuard no_grad;
  model->eval();
  auto test = make_batch(512);
  auto predicted = model(test.src, test.tgt_in).argmax(-1);
  auto relevant = test.tgt_out != kPad;
  const double accuracy =
      (predicted.eq(test.tgt_out) & relevant).sum().item<double>() / relevant.sum().item<double>();
  std::printf("mean loss: first 10 steps %.4f, last 10 steps %.4f; held-out token accuracy %.2f%%\n", first, last,
              100.0 * accuracy);
  if (!(last < 0.7 * first)) {
    std::fprintf(stderr, "FAILED: the loss did not fall (first %.4f, last %.4f)\n", first, last);
    return 1;
  }
  std::printf("OK: the loss fell\n");
  return 0;
}
