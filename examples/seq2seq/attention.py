"""The model's three kinds of attention, from qkv or from torch, behind one interface.

`--attention qkv` uses qkv's layers. `--attention torch` uses torch.nn.MultiheadAttention
with the equivalent masks, through thin subclasses that take the same arguments as the qkv
layers. Because the torch versions *are* MultiheadAttention modules, both backends have the
same parameter names (in_proj_weight, in_proj_bias, out_proj.*) and draw the same random
numbers at construction: with one seed, both models start from identical weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

BACKENDS = ("qkv", "torch")


def _contiguous(out: torch.Tensor) -> torch.Tensor:
    """torch's batch-first MHA returns a transposed view; qkv returns contiguous memory. Dropout
    draws its mask in memory order, so a later nn.Dropout would drop different elements for the
    two backends under one seed. One small copy keeps their training runs comparable."""
    return out.contiguous()


class TorchSelfAttention(nn.MultiheadAttention):
    """torch's MHA as bidirectional self-attention: forward(x, key_padding_mask) -> (N, L, E)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, batch_first=True)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return _contiguous(super().forward(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0])


class TorchCausalSelfAttention(TorchSelfAttention):
    """torch's MHA as decoder self-attention: position i sees positions 0..i.

    torch needs the causal mask as a tensor (is_causal is only a hint to it); True = hidden.
    """

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = x.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        out = nn.MultiheadAttention.forward(
            self, x, x, x, key_padding_mask=key_padding_mask, need_weights=False, attn_mask=causal, is_causal=True
        )[0]
        return _contiguous(out)


class TorchCrossAttention(nn.MultiheadAttention):
    """torch's MHA as cross-attention: queries from x, keys and values from memory."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, batch_first=True)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return _contiguous(super().forward(x, memory, memory, key_padding_mask=key_padding_mask, need_weights=False)[0])


@dataclass(frozen=True)
class AttentionLayers:
    """Constructors (embed_dim, num_heads, dropout=...) for each kind of attention layer."""

    self_attention: Callable[..., nn.Module]
    causal_self_attention: Callable[..., nn.Module]
    cross_attention: Callable[..., nn.Module]


def attention_layers(backend: str) -> AttentionLayers:
    """The attention layer classes for `backend` ("qkv" or "torch")."""
    if backend == "qkv":
        import qkv  # imported here so that `--attention torch` runs without qkv built

        return AttentionLayers(qkv.SelfAttention, qkv.CausalSelfAttention, qkv.CrossAttention)
    if backend == "torch":
        return AttentionLayers(TorchSelfAttention, TorchCausalSelfAttention, TorchCrossAttention)
    raise ValueError(f"attention backend must be one of {BACKENDS}; got {backend!r}")
