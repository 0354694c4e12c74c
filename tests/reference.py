"""Plain float64 attention used as the ground truth by the tests."""
import math
from typing import Optional

import torch


def causal_hidden(q_len: int, kv_len: int, bottom_right: bool) -> torch.Tensor:
    """Bool (L, S) mask, True where key j is hidden from query i."""
    offset = kv_len - q_len if bottom_right else 0
    i = torch.arange(q_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    return j > i + offset


def reference_probs(q, k, bias=None, is_causal=False, bottom_right=False, scale=None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) in float64; rows that see nothing are all zero."""
    q, k = q.double(), k.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        scores = scores + bias.double()
    if is_causal:
        scores = scores.masked_fill(causal_hidden(q.shape[-2], k.shape[-2], bottom_right), float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    empty = torch.isinf(row_max) & (row_max < 0)
    probs = torch.exp(scores - torch.where(empty, torch.zeros_like(row_max), row_max))
    total = probs.sum(-1, keepdim=True)
    return torch.where(empty, torch.zeros_like(probs), probs / torch.where(empty, torch.ones_like(total), total))


def reference_attention(q, k, v, bias=None, is_causal=False, bottom_right=False, scale=None,
                        keep: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention output in float64, with an explicit dropout keep mask if given."""
    probs = reference_probs(q, k, bias, is_causal, bottom_right, scale)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return probs @ v.double()


def tolerance(dtype: torch.dtype) -> dict:
    """Absolute/relative tolerances that reflect each dtype's precision (accumulation is float32)."""
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-10),
        torch.float32: dict(atol=2e-5, rtol=2e-5),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
        torch.float16: dict(atol=3e-3, rtol=3e-3),
    }[dtype]
