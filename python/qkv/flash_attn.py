"""flash-attn's Python API on the qkv kernels: ``flash_attn_func``, ``flash_attn_qkvpacked_func``,
``flash_attn_kvpacked_func``, ``flash_attn_varlen_func`` and ``flash_attn_with_kvcache`` with
flash-attn's names, argument order, layouts and semantics (docs/flash-attn-api.md), on every device
qkv runs on.

These are thin doors: layouts become strided views (flash-attn's ``(batch, seqlen, nheads, headdim)``
is a transpose of qkv's ``(batch, nheads, seqlen, headdim)``), and the work happens in
``torch.ops.qkv.attention``, ``attention_qkvpacked``, ``attention_varlen`` and ``attention_kvcache``:
grouped key/value heads, windows, ALiBi and softcap are options of the one kernel, not tensors built
here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.qkv.*)
from ._attention_bias import draw_dropout_seed

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_with_kvcache"]


def _window(window_size, name: str = "window_size") -> tuple[int, int]:
    """flash-attn's ``(left, right)``, -1 = unbounded on that side."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (left, right) of ints, -1 for unbounded; got {window_size!r}") from None
    return int(left), int(right)


def _seed(dropout_p: float) -> Tensor | None:
    # Drawn here, once per call, so that a traced graph takes the seed as an input.
    return draw_dropout_seed() if dropout_p > 0.0 else None


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """flash-attn's ``flash_attn_func`` (dropout_p should be 0.0 in evaluation).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k: ``(batch, seqlen_k, nheads_k, headdim)``; ``nheads % nheads_k == 0`` (GQA/MQA: query head
            ``h`` uses key/value head ``h // (nheads // nheads_k)``, read in place).
        v: ``(batch, seqlen_k, nheads_k, headdim_v)``.
        dropout_p: dropout probability on the attention probabilities.
        softmax_scale: default ``1 / sqrt(headdim)``.
        causal: bottom-right aligned causal mask (query ``i`` sees keys ``j <= i + seqlen_k - seqlen_q``).
        window_size: ``(left, right)``: query ``i`` sees keys ``j`` in
            ``[i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]``; -1 = unbounded.
        softcap: when > 0, scores ``s`` become ``softcap * tanh(s / softcap)`` (before ALiBi and masks).
        alibi_slopes: ``(nheads,)`` or ``(batch, nheads)`` float32: adds
            ``-slope * |i + seqlen_k - seqlen_q - j|`` to the scores.
        deterministic: accepted for compatibility; qkv's backward is always deterministic.
        return_attn_probs: also return the logsumexp and the attention probabilities.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim_v)``; with ``return_attn_probs``,
        ``(out, softmax_lse (batch, nheads, seqlen_q), probs (batch, nheads, seqlen_q, seqlen_k))``,
        the probabilities after dropout.
    """
    _check_layout("flash_attn_func", q, k, v, 4, "(batch, seqlen, nheads, headdim)")
    left, right = _window(window_size)
    seed = _seed(dropout_p)
    q4, k4, v4 = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out, lse = torch.ops.qkv.attention(
        q4, k4, v4, None, dropout_p, causal, True, softmax_scale, seed, left, right, softcap, alibi_slopes)
    out = out.transpose(1, 2)  # stored (batch, seqlen_q, nheads, headdim_v): contiguous
    if not return_attn_probs:
        return out
    probs = torch.ops.qkv.attention_weights(
        q4.detach(), k4.detach(), None, lse, dropout_p, causal, True, softmax_scale, seed, False,
        left, right, softcap, alibi_slopes)
    return out, lse, probs


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """flash-attn's ``flash_attn_qkvpacked_func``: self-attention on query, key and value stacked in
    one tensor. The same as :func:`flash_attn_func` on ``qkv.unbind(2)``, but the backward writes the
    gradient of ``qkv`` as one tensor (``torch.ops.qkv.attention_qkvpacked``) instead of stacking
    three gradients with a copy.

    Args:
        qkv: ``(batch, seqlen, 3, nheads, headdim)``, any strides.
        The other arguments as :func:`flash_attn_func` (seqlen_q == seqlen_k: the causal alignment
        does not matter).

    Returns:
        ``out`` ``(batch, seqlen, nheads, headdim)``; with ``return_attn_probs``,
        ``(out, softmax_lse (batch, nheads, seqlen), probs (batch, nheads, seqlen, seqlen))``.
    """
    _check_tensor("flash_attn_qkvpacked_func", "qkv", qkv, 5, "(batch, seqlen, 3, nheads, headdim)")
    left, right = _window(window_size)
    seed = _seed(dropout_p)
    out, lse = torch.ops.qkv.attention_qkvpacked(
        qkv, None, dropout_p, causal, softmax_scale, seed, left, right, softcap, alibi_slopes)
    out = out.transpose(1, 2)  # stored (batch, seqlen, nheads, headdim): contiguous
    if not return_attn_probs:
        return out
    q4, k4 = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    probs = torch.ops.qkv.attention_weights(
        q4.detach(), k4.detach(), None, lse, dropout_p, causal, False, softmax_scale, seed, False,
        left, right, softcap, alibi_slopes)
    return out, lse, probs


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """flash-attn's ``flash_attn_kvpacked_func``: key and value stacked in one tensor.

    This one goes through views of the core op: :func:`flash_attn_func` on ``kv.unbind(2)``, so its
    backward stacks the key and value gradients into ``kv``'s with one copy (flash-attn writes them
    in place; a kvpacked backward op would too, and is not written yet).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        kv: ``(batch, seqlen_k, 2, nheads_k, headdim)``; ``nheads % nheads_k == 0`` (GQA/MQA).
        The other arguments as :func:`flash_attn_func` (bottom-right aligned).

    Returns:
        As :func:`flash_attn_func`.
    """
    _check_tensor("flash_attn_kvpacked_func", "q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    _check_tensor("flash_attn_kvpacked_func", "kv", kv, 5, "(batch, seqlen_k, 2, nheads_k, headdim)")
    if kv.size(2) != 2:
        raise ValueError("qkv.flash_attn_kvpacked_func: kv must have shape (batch, seqlen_k, 2, nheads_k, headdim) "
                         f"(key and value stacked in dimension 2); got shape {tuple(kv.shape)}")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
):
    """flash-attn's ``flash_attn_varlen_func``: a batch of sequences packed without padding.

    Args:
        q: ``(total_q, nheads, headdim)``; sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``.
        k, v: ``(total_k, nheads_k, headdim)`` / ``(total_k, nheads_k, headdim_v)``.
        cu_seqlens_q, cu_seqlens_k: ``(batch + 1,)`` int32 (or int64) offsets, starting at 0.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence (at least).
        The other arguments as :func:`flash_attn_func`, per sequence (bottom-right aligned).
        block_table: paged key/value caches are not supported (must be None).

    Returns:
        ``out`` ``(total_q, nheads, headdim_v)``; with ``return_attn_probs``,
        ``(out, softmax_lse (nheads, total_q), None)``.
    """
    if block_table is not None:
        raise NotImplementedError("qkv.flash_attn_varlen_func: block_table (paged KV cache) is not supported")
    _check_layout("flash_attn_varlen_func", q, k, v, 3, "(total, nheads, headdim)")
    left, right = _window(window_size)
    out, lse = torch.ops.qkv.attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, True,
        softmax_scale, _seed(dropout_p), left, right, softcap, alibi_slopes)
    if not return_attn_probs:
        return out
    return out, lse, None


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: int | Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    block_table: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """flash-attn's ``flash_attn_with_kvcache``: attention of new queries over a KV cache (inference).

    When ``k`` and ``v`` are given they are written into ``k_cache`` / ``v_cache`` in place at rows
    ``cache_seqlens[b] : cache_seqlens[b] + seqlen_new``; then ``q`` attends to the first
    ``cache_seqlens[b] + seqlen_new`` keys of each cache, bottom-right aligned. ``cache_seqlens``
    is not updated.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k_cache, v_cache: ``(batch, seqlen_cache, nheads_k, headdim)`` / ``(..., headdim_v)``.
        k, v: ``(batch, seqlen_new, nheads_k, headdim)`` / ``(..., headdim_v)``, or None.
        cache_seqlens: an int, an int32 ``(batch,)`` tensor, or None (the whole cache is in use).
        rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, block_table: not supported (must be None).
        num_splits: ignored (qkv splits the keys across threads itself when that pays).
        return_softmax_lse: also return the logsumexp ``(batch, nheads, seqlen_q)``.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim_v)``, or ``(out, softmax_lse)``.
    """
    for name, value in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), ("cache_batch_idx", cache_batch_idx),
                        ("cache_leftpad", cache_leftpad), ("block_table", block_table)):
        if value is not None:
            raise NotImplementedError(f"qkv.flash_attn_with_kvcache: {name} is not supported (must be None)")
    _check_layout("flash_attn_with_kvcache", q, k_cache, v_cache, 4, "(batch, seqlen, nheads, headdim)",
                  names=("q", "k_cache", "v_cache"))
    if (k is None) != (v is None):
        raise ValueError("qkv.flash_attn_with_kvcache: k and v must be given together")
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.size(0),), cache_seqlens, dtype=torch.int32, device=k_cache.device)
    left, right = _window(window_size)
    out, lse = torch.ops.qkv.attention_kvcache(
        q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
        None if k is None else k.transpose(1, 2), None if v is None else v.transpose(1, 2),
        cache_seqlens, causal, softmax_scale, left, right, softcap, alibi_slopes)
    out = out.transpose(1, 2)
    return (out, lse) if return_softmax_lse else out


def _check_layout(fn: str, q: Tensor, k: Tensor, v: Tensor, dim: int, layout: str,
                  names: tuple[str, str, str] = ("q", "k", "v")) -> None:
    """Rank errors in flash-attn's terms (the ops check everything else, in qkv's layout)."""
    for name, t in zip(names, (q, k, v)):
        _check_tensor(fn, name, t, dim, layout)


def _check_tensor(fn: str, name: str, t: Tensor, dim: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"qkv.{fn}: {name} must be a tensor; got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"qkv.{fn}: {name} must be a {dim}-D tensor {layout}; got shape {tuple(t.shape)}")
