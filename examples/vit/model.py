"""A small vision transformer: patch embedding, pre-LayerNorm self-attention blocks, a class
token or mean pooling, and a linear classifier."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

POOLINGS = ("cls", "mean")


class PatchEmbedding(nn.Module):
    """(N, C, H, W) images -> (N, num_patches, E): each non-overlapping patch, linearly projected.

    A convolution with stride = kernel = patch size is exactly "flatten each patch, apply one
    shared Linear", without the reshapes.
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.num_patches = (image_size // patch_size) ** 2
        self.project = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(images).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """x + SelfAttention(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self,
        attention: Callable[..., nn.Module],
        embed_dim: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float,
        attn_dropout: float,
    ) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(embed_dim)
        self.attn = attention(embed_dim, num_heads, dropout=attn_dropout)
        self.norm_mlp = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, embed_dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm_attn(x)))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


class VisionTransformer(nn.Module):
    """Image classifier; `pool` = "cls" reads a learned class token, "mean" averages the patches.

    `dropout` acts on the residual branches and the MLP; `attn_dropout` on the attention
    probabilities (inside the attention layer).
    """

    def __init__(
        self,
        attention: Callable[..., nn.Module],
        num_classes: int,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        embed_dim: int = 64,
        num_heads: int = 4,
        depth: int = 4,
        mlp_dim: int = 128,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        if pool not in POOLINGS:
            raise ValueError(f"pool must be one of {POOLINGS}; got {pool!r}")
        self.pool = pool
        self.patches = PatchEmbedding(image_size, patch_size, in_channels, embed_dim)
        num_tokens = self.patches.num_patches + (1 if pool == "cls" else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if pool == "cls" else None
        # Learned positions: with 16 patches there is little to gain from a fixed 2-D scheme.
        self.position = nn.Parameter(torch.randn(1, num_tokens, embed_dim) * 0.02)
        self.blocks = nn.Sequential(
            *(Block(attention, embed_dim, num_heads, mlp_dim, dropout, attn_dropout) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> class logits (N, num_classes)."""
        x = self.patches(images)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.position))
        pooled = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return self.head(pooled)
