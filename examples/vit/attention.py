"""Self-attention from qkv or from torch, behind one interface.

`--attention torch` uses a thin subclass of torch.nn.MultiheadAttention that takes the same
arguments as qkv.SelfAttention. Both have the same parameters (in_proj_weight, in_proj_bias,
out_proj.*) and draw the same random numbers at construction, so one seed gives both
backends identical initial weights.
"""
from __future__ import annotations

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
    """torch's MHA as batch-first self-attention: forward(x, key_padding_mask) -> (N, L, E)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, batch_first=True)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return _contiguous(super().forward(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0])


def self_attention_layer(backend: str) -> Callable[..., nn.Module]:
    """The self-attention class (embed_dim, num_heads, dropout=...) for `backend`."""
    if backend == "qkv":
        import qkv  # imported here so that `--attention torch` runs without qkv built

        return qkv.SelfAttention
    if backend == "torch":
        return TorchSelfAttention
    raise ValueError(f"attention backend must be one of {BACKENDS}; got {backend!r}")
