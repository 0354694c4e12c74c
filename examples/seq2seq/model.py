"""A small encoder-decoder Transformer (pre-LayerNorm) whose attention layers are pluggable."""
from __future__ import annotations

import math

import torch
from torch import nn

from attention import AttentionLayers
from data import BOS, EOS, PAD


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sin/cos position signal of "Attention Is All You Need" to (N, L, E) inputs."""

    def __init__(self, embed_dim: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, embed_dim, 2, dtype=torch.float32) * (-math.log(10000.0) / embed_dim))
        table = torch.zeros(max_len, embed_dim)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)
        # A buffer, not a parameter: it moves with .to(device) but is never trained.
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.shape[1]]


def feed_forward(embed_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(embed_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, embed_dim)
    )


class EncoderLayer(nn.Module):
    """x + SelfAttention(LN(x)), then x + FeedForward(LN(x))."""

    def __init__(
        self,
        layers: AttentionLayers,
        embed_dim: int,
        num_heads: int,
        hidden_dim: int,
        dropout: float,
        attn_dropout: float,
    ) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(embed_dim)
        self.self_attn = layers.self_attention(embed_dim, num_heads, dropout=attn_dropout)
        self.norm_ff = nn.LayerNorm(embed_dim)
        self.ff = feed_forward(embed_dim, hidden_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm_attn(x), key_padding_mask=padding))
        return x + self.dropout(self.ff(self.norm_ff(x)))


class DecoderLayer(nn.Module):
    """Causal self-attention, then cross-attention to the encoder output, then feed-forward."""

    def __init__(
        self,
        layers: AttentionLayers,
        embed_dim: int,
        num_heads: int,
        hidden_dim: int,
        dropout: float,
        attn_dropout: float,
    ) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(embed_dim)
        self.self_attn = layers.causal_self_attention(embed_dim, num_heads, dropout=attn_dropout)
        self.norm_cross = nn.LayerNorm(embed_dim)
        self.cross_attn = layers.cross_attention(embed_dim, num_heads, dropout=attn_dropout)
        self.norm_ff = nn.LayerNorm(embed_dim)
        self.ff = feed_forward(embed_dim, hidden_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, y: torch.Tensor, memory: torch.Tensor, tgt_padding: torch.Tensor | None, src_padding: torch.Tensor | None
    ) -> torch.Tensor:
        y = y + self.dropout(self.self_attn(self.norm_self(y), key_padding_mask=tgt_padding))
        y = y + self.dropout(self.cross_attn(self.norm_cross(y), memory, key_padding_mask=src_padding))
        return y + self.dropout(self.ff(self.norm_ff(y)))


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer over token ids; padding masks are derived from PAD tokens.

    `dropout` acts on embeddings, residual branches and feed-forward layers; `attn_dropout` on
    the attention probabilities (inside the attention layers).
    """

    def __init__(
        self,
        layers: AttentionLayers,
        vocab_size: int,
        embed_dim: int = 64,
        num_heads: int = 4,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 2,
        hidden_dim: int = 256,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        max_len: int = 64,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.src_embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.tgt_embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.positions = SinusoidalPositionalEncoding(embed_dim, max_len)
        sizes = (layers, embed_dim, num_heads, hidden_dim, dropout, attn_dropout)
        self.encoder = nn.ModuleList(EncoderLayer(*sizes) for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*sizes) for _ in range(num_decoder_layers))
        self.encoder_norm = nn.LayerNorm(embed_dim)
        self.decoder_norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.to_logits = nn.Linear(embed_dim, vocab_size)

    def _embed(self, embedding: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.positions(embedding(tokens) * math.sqrt(self.embed_dim)))

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, S) token ids -> memory (N, S, E) and the source padding mask (N, S), True = PAD."""
        padding = src == PAD
        x = self._embed(self.src_embedding, src)
        for layer in self.encoder:
            x = layer(x, padding)
        return self.encoder_norm(x), padding

    def decode(
        self, tgt_in: torch.Tensor, memory: torch.Tensor, src_padding: torch.Tensor, mask_tgt_padding: bool = True
    ) -> torch.Tensor:
        """(N, T) decoder input ids -> logits (N, T, vocab) for the next token at each position."""
        tgt_padding = tgt_in == PAD if mask_tgt_padding else None
        y = self._embed(self.tgt_embedding, tgt_in)
        for layer in self.decoder:
            y = layer(y, memory, tgt_padding, src_padding)
        return self.to_logits(self.decoder_norm(y))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (N, T, vocab)."""
        memory, src_padding = self.encode(src)
        return self.decode(tgt_in, memory, src_padding)

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, max_steps: int) -> torch.Tensor:
        """Predicted token ids (N, max_steps), each step the most likely token; PAD after EOS."""
        memory, src_padding = self.encode(src)
        tokens = torch.full((src.shape[0], 1), BOS, dtype=torch.long, device=src.device)
        finished = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_steps):
            # No target padding mask: a finished row only appends PAD after its EOS, and what
            # it predicts from then on is discarded.
            next_token = self.decode(tokens, memory, src_padding, mask_tgt_padding=False)[:, -1].argmax(-1)
            next_token = next_token.masked_fill(finished, PAD)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            finished |= next_token == EOS
            if bool(finished.all()):
                break
        predicted = tokens[:, 1:]
        return nn.functional.pad(predicted, (0, max_steps - predicted.shape[1]), value=PAD)
