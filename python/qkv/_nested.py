"""NestedTensor inputs for the modules: a batch of sequences of different lengths, without padding.

``nn.TransformerEncoder`` (``enable_nested_tensor=True``, the default) turns a padded batch and its
``src_key_padding_mask`` into a NestedTensor in inference and hands it to each layer's attention.
Here the sequences of a NestedTensor (jagged or strided layout) are packed one after the other
into a ``(total, features)`` tensor, projected, run through ``torch.ops.qkv.attention_varlen``
(per-sequence offsets: no padding to the longest sequence anywhere) and handed back as a
NestedTensor of the input's layout. Differentiable (the packing is torch's own differentiable
ops).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from ._attention_bias import draw_dropout_seed

__all__ = ["Packed", "pack", "unpack", "check_nested_call", "packed_attention", "nested_sdpa"]


@dataclass
class Packed:
    """The sequences of one NestedTensor, packed: ``values`` ``(total, features)``, sequence ``b``
    is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``."""

    values: Tensor
    cu_seqlens: Tensor  # int32 (batch + 1,), on values' device
    lengths: list[int]
    nested: Tensor  # the NestedTensor it came from (its layout and offsets are the output's)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths, default=0)


def pack(nested: Tensor, name: str, dims: int = 3) -> Packed:
    """Packs a ``(batch, ragged length, features...)`` NestedTensor (``dims`` dimensions) of either layout."""
    if nested.dim() != dims:
        raise ValueError(f"{name}: a NestedTensor input must have {dims} dimensions, (batch, ragged seq, ...); got "
                         f"{nested.dim()}")
    if nested.layout == torch.jagged:
        if nested._ragged_idx != 1:
            raise ValueError(f"{name}: the ragged dimension of a jagged NestedTensor must be dim 1 (the sequence); "
                             f"got dim {nested._ragged_idx}")
        if nested.lengths() is None:  # contiguous sequences: the values are the packed tensor already
            values = nested.values()
            lengths = nested.offsets().diff().tolist()
        else:  # sequences with holes between them (a narrow()ed NestedTensor): gather them
            parts = nested.unbind()
            values, lengths = torch.cat(parts), [p.shape[0] for p in parts]
    else:
        parts = nested.unbind()
        features = {p.shape[1:] for p in parts}
        if len(features) > 1:
            raise ValueError(f"{name}: every sequence of a NestedTensor input must be (seq, features) with the same "
                             f"features; got shapes {[tuple(p.shape) for p in parts]}")
        values, lengths = torch.cat(parts), [p.shape[0] for p in parts]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=values.device)
    return Packed(values, cu_seqlens, lengths, nested)


def unpack(values: Tensor, like: Packed) -> Tensor:
    """``values`` ``(total, features)`` as a NestedTensor with ``like``'s sequences and layout (a jagged
    input keeps its offsets tensor, so the result adds to it)."""
    nested = like.nested
    if nested.layout == torch.jagged:
        # (The cached extreme lengths let to_padded_tensor pad to the longest sequence.)
        offsets = nested.offsets() if nested.lengths() is None else like.cu_seqlens.to(torch.int64)
        return torch.nested.nested_tensor_from_jagged(
            values, offsets=offsets, min_seqlen=min(like.lengths, default=0), max_seqlen=like.max_seqlen)
    return torch.nested.as_nested_tensor(list(values.split(like.lengths)), layout=torch.strided)


def check_nested_call(module: str, tensors: dict[str, Tensor], masks: dict[str, object]) -> None:
    """Either every tensor input is a NestedTensor or none is; masks do not go with NestedTensors
    (a NestedTensor's sequences are its own padding mask), as in torch."""
    nested = [name for name, t in tensors.items() if t.is_nested]
    if len(nested) != len(tensors):
        plain = [name for name in tensors if name not in nested]
        raise ValueError(f"{module}: {', '.join(nested)} {'is a' if len(nested) == 1 else 'are'} NestedTensor"
                         f"{'' if len(nested) == 1 else 's'} but {', '.join(plain)} "
                         f"{'is' if len(plain) == 1 else 'are'} not; pass all or none as NestedTensors")
    given = [name for name, m in masks.items() if m is not None and m is not False]
    if given:
        raise ValueError(f"{module}: {', '.join(given)} cannot be used with NestedTensor inputs (the sequences' own "
                         "lengths are the padding); pass padded tensors with masks instead")
    batches = {name: t.size(0) for name, t in tensors.items()}
    if len(set(batches.values())) > 1:
        raise ValueError(f"{module}: NestedTensor inputs must have the same batch size; got {batches}")


def packed_attention(
    query: Packed,
    key: Packed,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float,
    is_causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    need_weights: bool = False,
    average_attn_weights: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Attention of the packed heads ``q`` ``(total_q, H, D)`` over ``k``/``v`` ``(total_k, Hk, D)``
    through ``attention_varlen``; returns ``(out (total_q, H, Dv), weights or None)``.

    The weights (``need_weights``) are torch's for NestedTensors: a padded ``(batch, max_q, max_k)``
    (or per head ``(batch, H, max_q, max_k)``) tensor, zero outside each sequence. They come from
    ``attention_weights`` on padded copies of q and k with the same seed: the dropout counter of a
    packed batch is that of the padded call, so they are exactly the probabilities ``out`` used.
    """
    seed = draw_dropout_seed() if dropout_p > 0.0 else None
    max_q, max_k = query.max_seqlen, key.max_seqlen
    out, lse = torch.ops.qkv.attention_varlen(
        q, k, v, query.cu_seqlens, key.cu_seqlens, max_q, max_k, dropout_p, is_causal, False, None, seed,
        window[0], window[1])
    if not need_weights:
        return out, None
    batch = len(query.lengths)
    q_pad = pad_sequence(list(q.split(query.lengths)), batch_first=True).transpose(1, 2)  # (B, H, max_q, D)
    k_pad = pad_sequence(list(k.split(key.lengths)), batch_first=True).transpose(1, 2)
    positions = torch.arange(max_q, device=q.device)
    q_lengths = torch.tensor(query.lengths, device=q.device)
    k_lengths = torch.tensor(key.lengths, device=q.device)
    padded_row = positions[None, :] >= q_lengths[:, None]  # (B, max_q)
    padded_key = torch.arange(max_k, device=q.device)[None, :] >= k_lengths[:, None]  # (B, max_k)
    bias = torch.zeros(batch, 1, 1, max_k, dtype=q.dtype, device=q.device).masked_fill(
        padded_key[:, None, None, :], float("-inf"))
    # A padded query row gets logsumexp 0 (finite weights, masked below, zero gradients).
    lse_pad = pad_sequence(list(lse.transpose(0, 1).split(query.lengths)), batch_first=True).transpose(1, 2)
    weights = torch.ops.qkv.attention_weights(
        q_pad, k_pad, bias, lse_pad.contiguous(), dropout_p, is_causal, False, None, seed, False,
        window[0], window[1])
    weights = weights.masked_fill(padded_row[:, None, :, None], 0.0)
    return out, (weights.mean(1) if average_attn_weights else weights)


def nested_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float,
                is_causal: bool, scale: float | None, enable_gqa: bool) -> Tensor:
    """``scaled_dot_product_attention`` on jagged NestedTensors in torch's layout ``(B, H, ragged L, E)``
    (a ``(B, ragged L, H, E)`` jagged tensor transposed): per-sequence attention through
    ``attention_varlen``, is_causal top-left within each sequence. Returns ``(B, H, ragged L, Ev)``."""
    tensors = {"query": query, "key": key, "value": value}
    check_nested_call("qkv.functional.scaled_dot_product_attention", tensors, {"attn_mask": attn_mask})
    for name, t in tensors.items():
        if t.layout != torch.jagged or t.dim() != 4 or t._ragged_idx != 2:
            raise ValueError(f"qkv.functional.scaled_dot_product_attention: NestedTensor {name} must be jagged "
                             "(batch, heads, ragged seq, features), a (batch, ragged seq, heads, features) jagged "
                             f"tensor transposed; got layout {t.layout} with {t.dim()} dimensions")
    pq = pack(query.transpose(1, 2), "query", 4)
    pk = pack(key.transpose(1, 2), "key", 4)
    pv = pk if value is key else pack(value.transpose(1, 2), "value", 4)
    if pk.lengths != pv.lengths:
        raise ValueError(f"qkv.functional.scaled_dot_product_attention: key and value must have the same sequence "
                         f"lengths; got {pk.lengths} and {pv.lengths}")
    heads, kv_heads = pq.values.size(1), pk.values.size(1)
    if heads != kv_heads and not enable_gqa:
        raise ValueError(f"qkv.functional.scaled_dot_product_attention: query has {heads} heads and key {kv_heads}; "
                         "pass enable_gqa=True for grouped-query attention")
    seed = draw_dropout_seed() if dropout_p > 0.0 else None
    out, _ = torch.ops.qkv.attention_varlen(
        pq.values, pk.values, pv.values, pq.cu_seqlens, pk.cu_seqlens, pq.max_seqlen, pk.max_seqlen, dropout_p,
        is_causal, False, scale, seed)
    return unpack(out, pq).transpose(1, 2)
