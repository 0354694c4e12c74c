"""qkv as a Hugging Face transformers attention implementation: ``attn_implementation="qkv"``.

::

    import qkv.integrations.transformers
    qkv.integrations.transformers.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="qkv")

Two registrations under one name (docs/transformers.md):

- ``AttentionInterface["qkv"]`` (:func:`qkv_attention_forward`): called by every attention layer
  like ``sdpa_attention_forward``, with query ``(B, H, L, D)`` and key/value ``(B, Hk, S, D)``.
  Grouped key/value heads go to ``torch.ops.qkv.attention`` as they are (no ``repeat_kv``), and
  causality, Mistral-style sliding windows and Gemma-style softcap are options of the kernel.
- ``AttentionMaskInterface["qkv"]`` (:func:`qkv_mask`): decides what mask the layers get. For the
  ordinary causal and sliding-window causal patterns, with the queries the last positions of the
  keys (no cache, or a dynamic/sliding cache), it returns what flash-attn gets: ``None`` or the
  ``(B, S)`` key-padding mask, and the kernel builds the pattern itself (bottom-right aligned) and
  skips the key blocks outside a window. Every other pattern (static caches, packed sequences,
  bidirectional or custom masks) gets sdpa's full ``(B, 1, L, S)`` boolean mask, applied as is.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (registers torch.ops.qkv.*)
from .._attention_bias import attend_to_bias, draw_dropout_seed

__all__ = ["NAME", "register", "qkv_attention_forward", "qkv_mask"]

NAME = "qkv"


def register(name: str = NAME) -> None:
    """Registers qkv with transformers as attention implementation ``name`` (default ``"qkv"``):
    its attention function and its mask function. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, qkv_attention_forward)
    AttentionMaskInterface.register(name, qkv_mask)


def qkv_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function contract on the qkv kernel.

    Args:
        module: the calling attention layer (its ``is_causal`` is the default for ``is_causal``).
        query: ``(B, H, L, D)``; key, value: ``(B, Hk, S, D)``, ``H % Hk == 0``, read in place.
        attention_mask: what :func:`qkv_mask` made: None or a ``(B, S)`` bool key-padding mask
            (True = a real token; the causal/window pattern comes from ``is_causal`` and
            ``sliding_window``), or a 4-D mask (bool True = attend, or additive float) that holds
            the whole pattern, as sdpa takes it (also what a caller's own 4-D mask is).
        dropout: attention dropout probability (qkv's own counter-based masks).
        scaling: score scale (default ``1 / sqrt(D)``).
        sliding_window: Mistral's: query ``i`` sees keys ``i - sliding_window < j <= i``.
        softcap: Gemma-2's ``attn_logit_softcapping``: scores become ``softcap * tanh(s / softcap)``.

    Returns:
        ``(attn_output (B, L, H, D) contiguous, None)``: no attention weights, as with sdpa.
    """
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("qkv attention: position_bias (T5-style relative bias) is not supported")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)

    bias = None
    causal, window_left = False, -1
    if attention_mask is None or attention_mask.dim() == 2:
        # Compact form: the kernel builds the causal/window pattern, bottom-right aligned (the
        # queries are the last positions of the keys, as qkv_mask checked).
        if attention_mask is not None:
            if attention_mask.shape != (key.size(0), key.size(2)):
                raise ValueError(
                    f"qkv attention: a 2-D attention_mask must be (batch, key_len) = {(key.size(0), key.size(2))}; "
                    f"got {tuple(attention_mask.shape)}"
                )
            # bool(): a 0/1 integer mask (the tokenizer's) means the same as transformers' bool one.
            bias = attend_to_bias(attention_mask.bool()[:, None, None, :], query.dtype)
        causal = bool(is_causal)
        if causal and sliding_window is not None:
            window_left = int(sliding_window) - 1
    else:
        bias = attend_to_bias(attention_mask, query.dtype)

    seed = draw_dropout_seed() if dropout > 0.0 else None
    out, _ = torch.ops.qkv.attention(
        query, key, value, bias, float(dropout), causal, True, scaling, seed,
        window_left, -1, float(softcap or 0.0), None,
    )
    return out.transpose(1, 2).contiguous(), None


def qkv_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> Tensor | None:
    """transformers' mask-function contract (``sdpa_mask``'s arguments): the compact mask
    :func:`qkv_attention_forward` builds the pattern from, or sdpa's full mask when the pattern is
    not one the kernel builds."""
    from transformers.masking_utils import causal_mask_function, fast_all, prepare_padding_mask, sdpa_mask

    mask_function = mask_function or causal_mask_function

    compact = (
        allow_is_causal_skip  # False when transformers overlays other patterns (packing, custom masks)
        and isinstance(q_offset, int) and isinstance(kv_offset, int)  # tensors: a static cache
        and q_offset + q_length == kv_offset + kv_length  # queries are the last keys: bottom-right
        and _is_causal_pattern(mask_function)
    )
    if not compact:
        return sdpa_mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
            local_size=local_size, allow_is_causal_skip=False, **kwargs,
        )
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return None
    padding = padding[:, kv_offset : kv_offset + kv_length]
    return None if bool(fast_all(padding)) else padding


def _is_causal_pattern(mask_function) -> bool:
    """True for transformers' ``causal_mask_function`` and ``sliding_window_causal_mask_function(w)``
    (whose window the attention layers also pass as ``sliding_window``, as they do for flash-attn)."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return True
    # sliding_window_causal_mask_function(w) is and_masks(sliding_window_overlay(w), causal_mask_function).
    if getattr(mask_function, "__code__", None) is not _and_mask_code():
        return False
    cells = dict(zip(mask_function.__code__.co_freevars, (c.cell_contents for c in mask_function.__closure__)))
    parts = cells.get("mask_functions", ())
    return (
        len(parts) == 2
        and parts[1] is mu.causal_mask_function
        and getattr(parts[0], "__code__", None) is mu.sliding_window_overlay(1).__code__
    )


@functools.cache
def _and_mask_code():
    from transformers import masking_utils as mu

    return mu.and_masks(mu.causal_mask_function).__code__
