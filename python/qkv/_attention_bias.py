"""Helpers shared by the functional twins and the modules: the one additive bias the core op
takes, and the dropout seed that ties the output to the returned weights.

The core op ``torch.ops.qkv.attention`` takes a single additive float ``bias`` (the query's dtype,
or float32) that broadcasts to (batch, heads, query_len, key_len); ``-inf`` hides a key. Every user
mask convention (MultiheadAttention's bool "True = masked out", SDPA's bool "True = attend",
additive float masks) is turned into that form here, at its own broadcast shape, so no
(N, H, L, S) tensor is built unless the caller's mask already is one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["draw_dropout_seed", "masked_out_to_bias", "attend_to_bias", "add_biases", "bias_dtype"]


def draw_dropout_seed() -> Tensor:
    """A fresh dropout seed from torch's default generator: a 0-dim int64 CPU tensor.

    That is the ops' seed contract whatever the inputs' device: the kernels read it on the host,
    and fake tensors (torch.compile, opcheck) accept a 0-dim CPU tensor beside CUDA inputs.
    Honours ``torch.manual_seed``. Drawn once per call, and passing the same seed to
    ``qkv.attention`` and ``qkv.attention_weights`` makes the returned weights exactly the ones
    the output used.
    """
    return torch.randint(0, 2**62, (), dtype=torch.int64)


_HALF_TYPES = (torch.float16, torch.bfloat16)


def bias_dtype(query_dtype: torch.dtype, mask_dtype: torch.dtype) -> torch.dtype:
    """The dtype a floating additive mask reaches the kernel in, for queries of ``query_dtype``.

    The query's dtype, except that float16/bfloat16 queries keep a mask of any other floating
    dtype in float32, their accumulation type: cast to float16, ``1e5`` would become ``inf`` and
    ``-1e9`` ``-inf``, as torch never does.
    """
    if mask_dtype == query_dtype or query_dtype not in _HALF_TYPES:
        return query_dtype
    return torch.float32


def masked_out_to_bias(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """MultiheadAttention convention -> additive bias for queries of ``dtype``, same shape as ``mask``.

    Bool ``True`` means "masked out" (becomes ``-inf``, in ``dtype``); floating masks are added as
    they are, in :func:`bias_dtype`. Other dtypes raise torch's own AssertionError.
    """
    if mask is None:
        return None
    mask = F._canonical_mask(
        mask=mask, mask_name=name, other_type=None, other_name="", target_type=dtype, check_other=False
    )
    return mask.to(bias_dtype(dtype, mask.dtype))


def attend_to_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """SDPA convention -> additive bias for queries of ``dtype``: bool ``True`` means "takes part";
    floats are added, in :func:`bias_dtype`."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask.logical_not(), float("-inf"))
    return mask.to(bias_dtype(dtype, mask.dtype))


def add_biases(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    """Broadcast sum of two optional biases (masks merge by addition, as in torch)."""
    if first is None:
        return second
    if second is None:
        return first
    return first + second
