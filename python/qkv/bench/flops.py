"""The standard FLOP counts used to turn times into throughput.

Attention follows the FlashAttention convention so numbers compare with published figures:
forward = 4 * B * H * L * S * D (two matmuls, QK^T and PV, 2 FLOPs per multiply-add), halved
for causal masks (half the score matrix is skipped), backward = 2.5x forward (five matmuls
instead of two). Softmax, masking and exp are not counted: they are overhead, not useful work.
"""
from __future__ import annotations

BACKWARD_FACTOR = 2.5

# How many forward-sized units of work one timed call of each mode does.
_MODE_FACTORS = {
    "fwd": 1.0,
    "bwd": BACKWARD_FACTOR,
    "fwdbwd": 1.0 + BACKWARD_FACTOR,
}


def attention_flops(
    batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False, mode: str = "fwd"
) -> float:
    """FLOPs of one attention call of ``mode`` ("fwd", "bwd" or "fwdbwd")."""
    if mode not in _MODE_FACTORS:
        raise ValueError(f"attention_flops: mode must be one of {sorted(_MODE_FACTORS)}; got {mode!r}")
    forward = 4.0 * batch * heads * q_len * kv_len * head_dim
    if causal:
        forward /= 2.0
    return forward * _MODE_FACTORS[mode]


def projection_flops(tokens: int, embed_dim: int, mode: str = "fwd") -> float:
    """FLOPs of multi-head attention's input (3E x E) and output (E x E) projections.

    A linear layer costs 2 * tokens * in * out forward; its backward computes both the input
    and the weight gradient, so twice the forward.
    """
    forward = 2.0 * tokens * embed_dim * (4 * embed_dim)
    factors = {"fwd": 1.0, "bwd": 2.0, "fwdbwd": 3.0}
    if mode not in factors:
        raise ValueError(f"projection_flops: mode must be one of {sorted(factors)}; got {mode!r}")
    return forward * factors[mode]


def matmul_flops(n: int) -> float:
    """FLOPs of one n x n by n x n matrix multiply."""
    return 2.0 * n**3
