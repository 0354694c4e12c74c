"""``qkv.functional.scaled_dot_product_attention``: torch's SDPA semantics on the qkv kernel.

Kept apart from functional.py because all of its work is shape plumbing: any number of leading
batch dimensions (broadcast between query, key and value), grouped-query heads and SDPA's mask
convention are mapped onto the kernel's (B, H, L, D) layout with views wherever a view exists.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.qkv.*)
from ._attention_bias import attend_to_bias, draw_dropout_seed

__all__ = ["scaled_dot_product_attention"]

# dtype names as torch's C++ checks print them, so our messages read like torch's.
_CPP_DTYPE_NAMES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "c10::Half",
    torch.bfloat16: "c10::BFloat16",
    torch.bool: "bool",
    torch.int64: "long int",
    torch.int32: "int",
    torch.int16: "short int",
    torch.int8: "signed char",
    torch.uint8: "unsigned char",
}


def _cpp_name(dtype: torch.dtype) -> str:
    return _CPP_DTYPE_NAMES.get(dtype, str(dtype))


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    r"""A twin of ``torch.nn.functional.scaled_dot_product_attention`` on the qkv kernel.

    Args:
        query: ``(..., Hq, L, E)``; at least 2-D; leading dims broadcast against key/value's.
        key: ``(..., H, S, E)``.
        value: ``(..., H, S, Ev)``.
        attn_mask: broadcastable to ``(..., Hq, L, S)``; bool ``True`` means the pair *takes
            part* (the inverse of MultiheadAttention's masks); a float mask (float32 or the
            query's dtype) is added to the scores.
        dropout_p: dropout probability on the attention probabilities; always applied when
            positive (as torch: pass 0.0 in evaluation).
        is_causal: top-left causal masking (key j hidden from query i when j > i), built into the
            kernel: no mask tensor. An error if ``attn_mask`` is also given, as in torch.
        scale: score scale; default ``1 / sqrt(E)``.
        enable_gqa: grouped-query attention: each query head ``h`` uses key/value head
            ``h // (Hq // H)``, read in place by the kernel (no repeated copies).

    Returns:
        ``(..., Hq, L, Ev)``, stored like the query (contiguous for a contiguous query; the
        ``(B, L, H, Ev)`` layout for a query that is a transposed ``(B, L, H, E)`` tensor).

    Deliberate difference: a row that attends to no key gives zeros (never NaN).
    """
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError(
            "Expected query, key, and value to all be  at least 2 dimensional, but got query.dim: "
            f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead."
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(
            f"Expected query, key, and value to have the same dtype, but got query.dtype: {_cpp_name(query.dtype)}"
            f" key.dtype: {_cpp_name(key.dtype)} and value.dtype: {_cpp_name(value.dtype)} instead."
        )
    if not (query.device.type == key.device.type == value.device.type):
        raise RuntimeError(
            f"Expected query, key, and value to have the same device type, but got query.device: {query.device}"
            f" key.device: {key.device} and value.device: {value.device} instead."
        )
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise RuntimeError(
                "Expected attn_mask dtype to be bool or float or to match query dtype, but got attn_mask.dtype: "
                f"{_cpp_name(attn_mask.dtype)} and  query.dtype: {_cpp_name(query.dtype)} instead."
            )
        if is_causal:
            raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")

    kv_heads = _grouped_kv_heads(query, key, value) if enable_gqa else None
    if kv_heads is None and enable_gqa:
        key, value = _repeat_kv_heads(query, key, value)

    q_len, kv_len = query.size(-2), key.size(-2)
    if kv_heads is None:
        batch = _broadcast_shape(_broadcast_shape(query.shape[:-2], key.shape[:-2]), value.shape[:-2])
        kv_batch = batch
    else:
        # Grouped heads: the leading dims broadcast, the head dims stay apart (the kernel reads
        # key/value head h // (Hq // Hk) for query head h, in place).
        lead = _broadcast_shape(_broadcast_shape(query.shape[:-3], key.shape[:-3]), value.shape[:-3])
        batch, kv_batch = (*lead, query.size(-3)), (*lead, kv_heads)
    weights_shape = (*batch, q_len, kv_len)

    bias = None
    if attn_mask is not None:
        merged = _broadcast_shape(weights_shape, attn_mask.shape)
        if tuple(merged) != tuple(weights_shape):
            raise RuntimeError(
                f"output with shape {list(weights_shape)} doesn't match the broadcast shape {list(merged)}"
            )
        bias = attend_to_bias(attn_mask, query.dtype)
        if len(batch) > 2 and bias.dim() > 3:
            # The batch dims are folded into one below; a mask that varies along them follows.
            # (Sizes spelled out: with L or S = 0 a -1 could not be inferred.)
            bias = bias.expand(weights_shape).reshape(math.prod(weights_shape[:-3]), *weights_shape[-3:])

    q4, k4, v4 = _to_4d(query, batch), _to_4d(key, kv_batch), _to_4d(value, kv_batch)
    seed = draw_dropout_seed() if dropout_p > 0.0 else None
    out, _ = torch.ops.qkv.attention(q4, k4, v4, bias, dropout_p, is_causal, False, scale, seed)

    out = out.reshape(*batch, q_len, value.size(-1))
    token_major_query = (
        query.dim() >= 3 and not query.is_contiguous() and query.transpose(-3, -2).is_contiguous()
    )
    return out if token_major_query else out.contiguous()


def _grouped_kv_heads(query: Tensor, key: Tensor, value: Tensor) -> int | None:
    """enable_gqa's checks; the key/value head count the kernel reads in place, or None when
    there is nothing to group (equal head counts) or key and value differ in heads (then they
    are repeated, the one case the kernel's grouping does not cover)."""
    q_heads, k_heads, v_heads = query.size(-3), key.size(-3), value.size(-3)
    if q_heads % k_heads != 0 or q_heads % v_heads != 0:
        raise RuntimeError(
            "Number of heads in key and value must divide the number of heads in query; got query heads "
            f"{q_heads}, key heads {k_heads}, value heads {v_heads}"
        )
    if k_heads != v_heads or k_heads == q_heads:
        return None
    return k_heads


def _repeat_kv_heads(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Repeats key/value heads up to the query's, for key and value of different head counts. An
    expand: a pure view for one head; with several, a (B, H, S, D) strided view cannot express head
    h -> h // g, so reshape copies them once (what torch's repeat_interleave costs too)."""
    q_heads, k_heads, v_heads = query.size(-3), key.size(-3), value.size(-3)

    def repeat(t: Tensor, groups: int) -> Tensor:
        if groups == 1:
            return t
        grouped = t.unsqueeze(-3).expand(*t.shape[:-2], groups, *t.shape[-2:])
        return grouped.flatten(-4, -3)

    return repeat(key, q_heads // k_heads), repeat(value, q_heads // v_heads)


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """torch's broadcasting rule, with torch's infer_size message on mismatch."""
    ndim = max(len(a), len(b))
    out = []
    for i in range(ndim - 1, -1, -1):
        offset = ndim - 1 - i
        size_a = a[len(a) - 1 - offset] if len(a) - 1 - offset >= 0 else 1
        size_b = b[len(b) - 1 - offset] if len(b) - 1 - offset >= 0 else 1
        if size_a != size_b and size_a != 1 and size_b != 1:
            raise RuntimeError(
                f"The size of tensor a ({size_a}) must match the size of tensor b ({size_b}) "
                f"at non-singleton dimension {i}"
            )
        out.append(size_a if size_a != 1 else size_b)
    return tuple(reversed(out))


def _to_4d(t: Tensor, batch: tuple[int, ...]) -> Tensor:
    """(..., T, D) broadcast to ``batch`` and folded to (B, H, T, D); views unless more than two
    batch dims cannot be merged in place."""
    t = t.expand(*batch, *t.shape[-2:])
    if len(batch) == 0:
        return t.unsqueeze(0).unsqueeze(0)
    if len(batch) == 1:
        return t.unsqueeze(0)
    if len(batch) == 2:
        return t
    return t.reshape(math.prod(batch[:-1]), *t.shape[-3:])
