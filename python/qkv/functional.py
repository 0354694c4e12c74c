"""Functional twins of torch's attention functions, computed by the qkv kernels.

- :func:`multi_head_attention_forward`: the signature and semantics of
  ``torch.nn.functional.multi_head_attention_forward`` (the installed torch is the authority).
- :func:`scaled_dot_product_attention`: the semantics of
  ``torch.nn.functional.scaled_dot_product_attention``.

Both run the in/out projections with ``F.linear`` and the attention itself with
``torch.ops.qkv.attention`` on strided per-head views; torch's softmax, SDPA and native MHA never
run. When attention weights are asked for, ``torch.ops.qkv.attention_with_weights`` returns them
with the output from one kernel.

The one deliberate difference from torch: a query row that may attend to no key at all (every
key masked) outputs zeros with zero gradient, and its weights are zeros, where torch returns NaN
on some of its paths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from . import _C  # noqa: F401  (registers torch.ops.qkv.*)
from ._attention_bias import add_biases, bias_dtype, draw_dropout_seed
from ._sdpa import scaled_dot_product_attention

__all__ = ["multi_head_attention_forward", "scaled_dot_product_attention"]


def multi_head_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    bias_k: Tensor | None,
    bias_v: Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None,
    static_v: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    r"""Multi-head attention forward, a drop-in for ``torch.nn.functional.multi_head_attention_forward``.

    Same arguments, shapes, defaults, warnings and exceptions as torch's function (see
    :class:`torch.nn.MultiheadAttention`): sequence-first ``(L, N, E)`` batched or ``(L, E)``
    unbatched inputs; ``attn_mask`` ``(L, S)`` or ``(N * num_heads, L, S)`` and ``key_padding_mask``
    ``(N, S)`` or ``(S,)``, bool (``True`` = masked out) or float (added to the scores);
    ``bias_k``/``bias_v``, ``add_zero_attn``, separate projection weights, ``static_k``/``static_v``;
    dropout on the attention probabilities only when ``training``.

    ``is_causal`` is a hint as in torch: it needs ``attn_mask``; with no ``key_padding_mask`` and
    ``need_weights=False`` the kernel's own causal flag (top-left) replaces the mask, which is then
    not read at all; otherwise the mask is used.

    Returns ``(attn_output, attn_weights)``; weights are ``None`` unless ``need_weights``, averaged
    over heads ``(N, L, S)`` or per head ``(N, num_heads, L, S)`` (no ``N`` when unbatched), and
    in training they are the post-dropout weights the output was computed with.

    Deliberate difference: a query row with every key masked gives zeros (output and weights),
    not NaN.
    """
    tens_ops = (query, key, value, in_proj_weight, in_proj_bias, bias_k, bias_v, out_proj_weight, out_proj_bias)
    if has_torch_function(tens_ops):
        return handle_torch_function(
            multi_head_attention_forward,
            tens_ops,
            query,
            key,
            value,
            embed_dim_to_check,
            num_heads,
            in_proj_weight,
            in_proj_bias,
            bias_k,
            bias_v,
            add_zero_attn,
            dropout_p,
            out_proj_weight,
            out_proj_bias,
            training=training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            is_causal=is_causal,
            use_separate_proj_weight=use_separate_proj_weight,
            q_proj_weight=q_proj_weight,
            k_proj_weight=k_proj_weight,
            v_proj_weight=v_proj_weight,
            static_k=static_k,
            static_v=static_v,
            average_attn_weights=average_attn_weights,
        )
    return _mha_forward(
        query,
        key,
        value,
        embed_dim_to_check,
        num_heads,
        in_proj_weight,
        in_proj_bias,
        bias_k,
        bias_v,
        add_zero_attn,
        dropout_p,
        out_proj_weight,
        out_proj_bias,
        training=training,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        use_separate_proj_weight=use_separate_proj_weight,
        q_proj_weight=q_proj_weight,
        k_proj_weight=k_proj_weight,
        v_proj_weight=v_proj_weight,
        static_k=static_k,
        static_v=static_v,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
        batch_first=False,
    )


def _mha_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    bias_k: Tensor | None,
    bias_v: Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None,
    static_v: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    batch_first: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`multi_head_attention_forward` with a layout switch (internal; qkv.MultiheadAttention
    calls it).

    ``batch_first=True`` reads batched inputs as ``(N, L, E)`` and returns ``(N, L, E)`` without
    the two transposes torch's module wraps around the sequence-first function: the projections
    run on the caller's layout and the heads are strided views of them. Checks, their order and
    their messages are torch's (shapes in messages are reported sequence-first, as torch sees them).
    """
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)

    # Internally batched 3-D tensors with the batch at `bdim`. Unbatched inputs get a leading batch
    # of one (either position would do; 0 keeps the output contiguous after the squeeze).
    bdim = 0 if (batch_first or not is_batched) else 1
    if not is_batched:
        query, key, value = _unsqueeze_keeping_identity(query, key, value)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)

    tgt_len, bsz, embed_dim = _seq_first_shape(query, bdim)
    src_len = key.shape[1 - bdim]

    key_padding_mask, attn_mask, use_causal_flag = _canonical_masks(
        key_padding_mask, attn_mask, query.dtype, is_causal, need_weights)
    head_dim = _check_shapes(key, value, embed_dim, embed_dim_to_check, num_heads, use_separate_proj_weight, bdim)

    # Self-attention whose keys are the projected inputs as they are (no static or appended keys)
    # and whose weights are not asked for: one GEMM, viewed as (N, L, 3, H, D) and attended by
    # attention_qkvpacked, whose backward writes that view's gradient as one buffer (q/k/v views
    # of it would cost a stack of their three gradients, a copy of the whole projection's).
    packed_self_attention = (
        not use_separate_proj_weight and query is key and key is value and static_k is None and static_v is None
        and bias_k is None and bias_v is None and not add_zero_attn and not need_weights)

    # In-projection (F.linear on the caller's layout; q/k/v may be views of one GEMM).
    if not use_separate_proj_weight:
        if in_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
        if packed_self_attention:
            qkv = _packed_self_projection(query, in_proj_weight, in_proj_bias, num_heads, head_dim, bdim)
        else:
            q, k, v = _packed_in_projection(query, key, value, in_proj_weight, in_proj_bias)
    else:
        if q_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is True but q_proj_weight is None")
        if k_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is True but k_proj_weight is None")
        if v_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is True but v_proj_weight is None")
        b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        # torch's own helper: its weight/bias shape checks and three F.linear calls.
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight, b_q, b_k, b_v)

    _check_attn_mask_shape(attn_mask, tgt_len, src_len, bsz, num_heads)
    if not training:
        dropout_p = 0.0
    if packed_self_attention:
        bias = _masks_to_bias(attn_mask, key_padding_mask, bsz, num_heads, src_len, qkv.dtype)
        seed = draw_dropout_seed() if dropout_p > 0.0 else None
        out, _ = torch.ops.qkv.attention_qkvpacked(qkv, bias, dropout_p, use_causal_flag, None, seed)
        return _finish(_merge_heads_and_project(out, out_proj_weight, out_proj_bias, bdim), None, is_batched)

    _check_bias_kv(bias_k, bias_v, static_k, static_v)

    # Heads: (N, H, T, D) strided views of the projections, no copies.
    q = _split_heads(q, num_heads, bdim)
    if static_k is None:
        k = _split_heads(k, num_heads, bdim)
    else:
        k = _static_heads("static_k", static_k, bsz, num_heads, head_dim)
    if static_v is None:
        v = _split_heads(v, num_heads, bdim)
    else:
        v = _static_heads("static_v", static_v, bsz, num_heads, head_dim)
    k, v, attn_mask, key_padding_mask = _append_bias_kv_and_zero_attn(
        k, v, attn_mask, key_padding_mask, bias_k, bias_v, add_zero_attn)

    bias = _masks_to_bias(attn_mask, key_padding_mask, bsz, num_heads, k.size(2), q.dtype)
    seed = draw_dropout_seed() if dropout_p > 0.0 else None

    attn_weights = None
    if need_weights:
        # One kernel for both: Q K^T is computed once. Averaged weights are summed over heads
        # inside it, so no (N, H, L, S) tensor exists.
        out, _, attn_weights = torch.ops.qkv.attention_with_weights(
            q, k, v, bias, dropout_p, use_causal_flag, False, None, seed, average_attn_weights)
    else:
        out, _ = torch.ops.qkv.attention(q, k, v, bias, dropout_p, use_causal_flag, False, None, seed)

    return _finish(_merge_heads_and_project(out, out_proj_weight, out_proj_bias, bdim), attn_weights, is_batched)


def _finish(attn_output: Tensor, attn_weights: Tensor | None, is_batched: bool) -> tuple[Tensor, Tensor | None]:
    """The caller's batching: unbatched inputs lose the batch of one added for the kernel."""
    if not is_batched:
        attn_output = attn_output.squeeze(0)
        if attn_weights is not None:
            attn_weights = attn_weights.squeeze(0)
    return attn_output, attn_weights


# ---- mask canonicalisation ----------------------------------------------------------------------


def _canonical_masks(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    dtype: torch.dtype,
    is_causal: bool,
    need_weights: bool,
) -> tuple[Tensor | None, Tensor | None, bool]:
    """torch's mask handling: both masks as float masks of ``dtype`` (torch's warnings and errors),
    and the ``is_causal`` hint resolved. Returns ``(key_padding_mask, attn_mask, use_causal_flag)``:
    the mask is used whenever it survives; the kernel's causal flag only when it does not."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=dtype,
    )

    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. "
            "You may use the Transformer module method "
            "`generate_square_subsequent_mask` to create this mask."
        )

    if is_causal and key_padding_mask is None and not need_weights:
        # As torch: the hint replaces the mask (the kernel's causal flag, no mask read at all).
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=dtype,
            check_other=False,
        )
        if key_padding_mask is not None:
            # The merged mask is no longer causal.
            is_causal = False
    return key_padding_mask, attn_mask, is_causal and attn_mask is None


# ---- shape checks (torch's order and messages) --------------------------------------------------


def _check_shapes(
    key: Tensor,
    value: Tensor,
    embed_dim: int,
    embed_dim_to_check: int,
    num_heads: int,
    use_separate_proj_weight: bool,
    bdim: int,
) -> int:
    """The embedding, head and key/value checks torch makes before the in-projection; returns
    head_dim."""
    if embed_dim != embed_dim_to_check:
        raise AssertionError(f"was expecting embedding dimension of {embed_dim_to_check}, but got {embed_dim}")
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
    if use_separate_proj_weight:
        key_seq_first, value_seq_first = _seq_first_shape(key, bdim), _seq_first_shape(value, bdim)
        if key_seq_first[:2] != value_seq_first[:2]:
            raise AssertionError(
                f"key's sequence and batch dims {key_seq_first[:2]} do not match value's {value_seq_first[:2]}"
            )
    elif key.shape != value.shape:
        raise AssertionError(
            f"key shape {_seq_first_shape(key, bdim)} does not match value shape {_seq_first_shape(value, bdim)}"
        )
    return head_dim


def _check_attn_mask_shape(attn_mask: Tensor | None, tgt_len: int, src_len: int, bsz: int, num_heads: int) -> None:
    """A 2-D mask is (L, S), a 3-D one (N * num_heads, L, S): torch's checks after the projection."""
    if attn_mask is None:
        return
    if attn_mask.dim() == 2:
        correct_2d_size = (tgt_len, src_len)
        if attn_mask.shape != correct_2d_size:
            raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {correct_2d_size}.")
    elif attn_mask.dim() == 3:
        correct_3d_size = (bsz * num_heads, tgt_len, src_len)
        if attn_mask.shape != correct_3d_size:
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {correct_3d_size}.")
    else:
        raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")


def _check_bias_kv(
    bias_k: Tensor | None, bias_v: Tensor | None, static_k: Tensor | None, static_v: Tensor | None
) -> None:
    if bias_k is not None and bias_v is not None:
        if static_k is not None:
            raise AssertionError("bias cannot be added to static key.")
        if static_v is not None:
            raise AssertionError("bias cannot be added to static value.")
    else:
        if bias_k is not None:
            raise AssertionError("bias_k is set but bias_v is None")
        if bias_v is not None:
            raise AssertionError("bias_v is set but bias_k is None")


def _check_key_padding_mask(key_padding_mask: Tensor, src_len: int, bsz: int) -> None:
    """torch's check and messages (F._check_key_padding_mask), written as plain ``if``s: torch's
    version uses torch._check_with with a closure, which torch.compile(fullgraph=True) rejects."""
    if key_padding_mask.shape[0] != bsz:
        raise AssertionError(f"Expected key_padded_mask.shape[0] to be {bsz}, but got {key_padding_mask.shape[0]}")
    if key_padding_mask.shape[1] != src_len:
        raise AssertionError(
            f"Expected key_padded_mask.shape[1] to be {src_len}, but got {key_padding_mask.shape[1]}"
        )


# ---- bias_k/bias_v and the zero-attention slot --------------------------------------------------


def _append_bias_kv_and_zero_attn(
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    bias_k: Tensor | None,
    bias_v: Tensor | None,
    add_zero_attn: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """bias_k/bias_v and the zero-attention slot append key columns to (N, H, S, D) k and v (one
    copy of each, only when asked for); the masks get an attendable (0) column for each."""
    bsz, num_heads, _, head_dim = k.shape
    extra_k: list[Tensor] = []
    extra_v: list[Tensor] = []
    if bias_k is not None:
        extra_k.append(_bias_kv_heads(bias_k, bsz, num_heads, k.dtype))
        extra_v.append(_bias_kv_heads(bias_v, bsz, num_heads, v.dtype))
    if add_zero_attn:
        extra_k.append(torch.zeros((bsz, num_heads, 1, head_dim), dtype=k.dtype, device=k.device))
        extra_v.append(torch.zeros((bsz, num_heads, 1, v.size(-1)), dtype=v.dtype, device=v.device))
    if extra_k:
        k = torch.cat([k, *extra_k], dim=2)
        v = torch.cat([v, *extra_v], dim=2)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, len(extra_k)))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, len(extra_k)))
    return k, v, attn_mask, key_padding_mask


def _bias_kv_heads(bias: Tensor, bsz: int, num_heads: int, dtype: torch.dtype) -> Tensor:
    """A (1, 1, E) bias_k/bias_v as one extra key column per (batch, head): (N, H, 1, D)."""
    return bias.to(dtype).reshape(1, num_heads, 1, -1).expand(bsz, -1, -1, -1)


# ---- masks to one bias --------------------------------------------------------------------------


def _masks_to_bias(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    bsz: int,
    num_heads: int,
    src_len: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """The canonical float masks as the one additive bias the kernel takes, at its broadcast shape:
    (L, S) | (N, H, L, S) | (N, 1, 1, S) | their sum, for queries of ``dtype`` (in ``dtype``, or
    float32 for float16/bfloat16 queries: see ``bias_dtype``)."""
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, src_len, bsz)
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len)
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = torch.unflatten(attn_mask, 0, (bsz, num_heads))
    bias = add_biases(attn_mask, key_padding_mask)
    if bias is not None:
        # Float masks of another dtype, and autocast's reduced-precision q: float32 stays float32
        # for half-precision q.
        bias = bias.to(bias_dtype(dtype, bias.dtype))
    return bias


# ---- layouts ------------------------------------------------------------------------------------


def _unsqueeze_keeping_identity(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Adds a leading batch of one, keeping ``query is key is value`` (the packed-GEMM fast path)."""
    q = query.unsqueeze(0)
    k = q if key is query else key.unsqueeze(0)
    if value is key:
        v = k
    elif value is query:
        v = q
    else:
        v = value.unsqueeze(0)
    return q, k, v


def _seq_first_shape(x: Tensor, bdim: int) -> torch.Size:
    """The shape torch's sequence-first function would see (used for sizes and messages)."""
    if bdim == 1:
        return x.shape
    return torch.Size((x.shape[1], x.shape[0], *x.shape[2:]))


def _packed_self_projection(x: Tensor, w: Tensor, b: Tensor | None, num_heads: int, head_dim: int,
                            bdim: int) -> Tensor:
    """Self-attention's packed in-projection (torch's GEMM and errors) as attention_qkvpacked's
    (N, L, 3, H, D) layout: a view of the GEMM output, permuted for a sequence-first (L, N, 3E)
    one. Its gradient comes back with the view's strides, so it reaches the GEMM's backward as a
    view too (no copy on the way)."""
    qkv = torch.unflatten(F.linear(x, w, b), -1, (3, num_heads, head_dim))
    return qkv.permute(1, 0, 2, 3, 4) if bdim == 1 else qkv


def _packed_in_projection(
    query: Tensor, key: Tensor, value: Tensor, w: Tensor, b: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """torch's packed in-projection (same GEMM sharing and the same errors), but q/k/v stay views
    of the shared GEMM output instead of being made contiguous.

    The views come from ``unbind``: its backward stacks the three gradients into one buffer,
    where three indexing views would each allocate a zero-filled copy of the whole projection
    and add them up (measured 1-4% of a training step at E=512). Self-attention without weights
    avoids even the stack: see _packed_self_projection."""
    E = query.size(-1)
    if key is value:
        if query is key:
            q, k, v = torch.unflatten(F.linear(query, w, b), -1, (3, E)).unbind(-2)
            return q, k, v
        w_q, w_kv = w.split([E, E * 2])
        b_q, b_kv = (None, None) if b is None else b.split([E, E * 2])
        k, v = torch.unflatten(F.linear(key, w_kv, b_kv), -1, (2, E)).unbind(-2)
        return F.linear(query, w_q, b_q), k, v
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _split_heads(x: Tensor, num_heads: int, bdim: int) -> Tensor:
    """(T, N, E) if bdim == 1 or (N, T, E) if bdim == 0 -> (N, H, T, E // H), a strided view."""
    # torch.unflatten, not Tensor.unflatten: under a torch.device context manager, dynamo
    # (torch 2.11-2.13) cannot trace the Tensor method (a Python override calling super()).
    x = torch.unflatten(x, -1, (num_heads, -1))
    return x.permute(1, 2, 0, 3) if bdim == 1 else x.transpose(1, 2)


def _static_heads(name: str, static: Tensor, bsz: int, num_heads: int, head_dim: int) -> Tensor:
    """A caller's static_k/static_v ``(N * num_heads, S, head_dim)`` as (N, H, S, D), torch's checks."""
    if static.size(0) != bsz * num_heads:
        raise AssertionError(f"expecting {name}.size(0) of {bsz * num_heads}, but got {static.size(0)}")
    if static.size(2) != head_dim:
        raise AssertionError(f"expecting {name}.size(2) of {head_dim}, but got {static.size(2)}")
    return torch.unflatten(static, 0, (bsz, num_heads))


def _merge_heads_and_project(out: Tensor, out_proj_weight: Tensor, out_proj_bias: Tensor | None, bdim: int) -> Tensor:
    """(N, H, L, D) attention output, stored (N, L, H, D), through the out-projection into the
    caller's layout: batch-first (bdim 0) merges heads for free; sequence-first (L, N, E) copies
    once. Sizes are spelled out (no -1): an empty batch or sequence must still reshape."""
    if bdim == 0:
        return F.linear(out.transpose(1, 2).flatten(2), out_proj_weight, out_proj_bias)
    bsz, num_heads, tgt_len, head_dim = out.shape
    merged = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, num_heads * head_dim)
    projected = F.linear(merged, out_proj_weight, out_proj_bias)
    return projected.view(tgt_len, bsz, projected.size(-1))
