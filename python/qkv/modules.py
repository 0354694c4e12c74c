"""Attention modules on the qkv kernels.

- :class:`MultiheadAttention`: a drop-in replacement for ``torch.nn.MultiheadAttention`` (same
  constructor, attributes, parameters and their order, seed-for-seed identical initialisation,
  forward, outputs and errors).
- :class:`SelfAttention`, :class:`CausalSelfAttention`, :class:`CrossAttention`: lean batch-first
  modules, each backed by one projection op, a whole attention layer in one op
  (``torch.ops.qkv.multi_head_attention``, ``masked_self_attention``, ``cross_attention``). Their parameters carry MultiheadAttention's
  names, so weights copy across with ``load_state_dict``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.parameter import Parameter

from . import _C  # noqa: F401  (registers torch.ops.qkv.*)
from ._attention_bias import add_biases, draw_dropout_seed, masked_out_to_bias
from ._nested import check_nested_call, pack, packed_attention, unpack
from .functional import _mha_forward, _packed_in_projection

__all__ = ["MultiheadAttention", "SelfAttention", "CausalSelfAttention", "CrossAttention"]


def _keep_transformer_slow_path(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing, registered on every qkv MultiheadAttention.

    ``nn.TransformerEncoderLayer``'s inference fast path reads ``self_attn``'s weights and runs
    torch's fused kernel without calling ``self_attn`` at all; it is skipped when any submodule
    has a forward hook. Registering this one keeps the layer on its regular path, which calls our
    forward. (Module-level so that modules holding it still pickle.)
    """
    return None


def _init_attention_parameters(
    module: nn.Module,
    embed_dim: int,
    kdim: int,
    vdim: int,
    bias: bool,
    add_bias_kv: bool,
    factory_kwargs: dict[str, Any],
    kv_embed_dim: int | None = None,
) -> None:
    """Registers and initialises the projection parameters exactly as torch's MultiheadAttention:
    same names, registration order, shapes, and the same random draws in the same order (the
    out_proj Linear's own init first, then xavier_uniform_ over the input projections, zero
    biases, xavier_normal_ for bias_k/bias_v), so a seeded construction gives equal tensors.

    ``kv_embed_dim`` (grouped-query attention: num_kv_heads * head_dim, default embed_dim) is the
    rows of the key and value projections; the packed weight is then
    (embed_dim + 2 * kv_embed_dim, embed_dim)."""
    kv_embed_dim = embed_dim if kv_embed_dim is None else kv_embed_dim
    packed_rows = embed_dim + 2 * kv_embed_dim
    if kdim == embed_dim and vdim == embed_dim:
        module.in_proj_weight = Parameter(torch.empty((packed_rows, embed_dim), **factory_kwargs))
        module.register_parameter("q_proj_weight", None)
        module.register_parameter("k_proj_weight", None)
        module.register_parameter("v_proj_weight", None)
    else:
        module.q_proj_weight = Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
        module.k_proj_weight = Parameter(torch.empty((kv_embed_dim, kdim), **factory_kwargs))
        module.v_proj_weight = Parameter(torch.empty((kv_embed_dim, vdim), **factory_kwargs))
        module.register_parameter("in_proj_weight", None)
    if bias:
        module.in_proj_bias = Parameter(torch.empty(packed_rows, **factory_kwargs))
    else:
        module.register_parameter("in_proj_bias", None)
    module.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
    if add_bias_kv:
        module.bias_k = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        module.bias_v = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
    else:
        module.bias_k = module.bias_v = None
    _reset_attention_parameters(module)


def _reset_attention_parameters(module: nn.Module) -> None:
    """torch's MultiheadAttention._reset_parameters: the same draws in the same order
    (out_proj.weight keeps the Linear's own init)."""
    if module.in_proj_weight is not None:
        xavier_uniform_(module.in_proj_weight)
    else:
        xavier_uniform_(module.q_proj_weight)
        xavier_uniform_(module.k_proj_weight)
        xavier_uniform_(module.v_proj_weight)
    if module.in_proj_bias is not None:
        constant_(module.in_proj_bias, 0.0)
        constant_(module.out_proj.bias, 0.0)
    if module.bias_k is not None:
        xavier_normal_(module.bias_k)
    if module.bias_v is not None:
        xavier_normal_(module.bias_v)


def _check_sizes(embed_dim: int, num_heads: int) -> int:
    """torch's constructor checks; returns head_dim."""
    if embed_dim <= 0 or num_heads <= 0:
        raise ValueError(
            f"embed_dim and num_heads must be greater than 0,"
            f" got embed_dim={embed_dim} and num_heads={num_heads} instead"
        )
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise AssertionError("embed_dim must be divisible by num_heads")
    return head_dim


class MultiheadAttention(nn.Module):
    r"""Drop-in replacement for :class:`torch.nn.MultiheadAttention`, computed by the qkv kernels.

    Same constructor, attributes (``embed_dim``, ``kdim``, ``vdim``, ``_qkv_same_embed_dim``,
    ``num_heads``, ``dropout``, ``batch_first``, ``head_dim``, ``add_zero_attn``, ``bias_k``,
    ``bias_v``), parameters (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
    ``bias_k``, ``bias_v``, ``out_proj``: a ``NonDynamicallyQuantizableLinear``) in torch's
    registration order, seed-for-seed identical initialisation, ``state_dict`` keys, forward
    signature, outputs and exceptions. See :func:`qkv.functional.multi_head_attention_forward`.

    Args:
        embed_dim: total dimension of the model.
        num_heads: number of heads; ``embed_dim`` must be divisible by it.
        dropout: dropout probability on the attention weights (training only).
        bias: add biases to the input/output projections.
        add_bias_kv: learn one extra key/value column (``bias_k``/``bias_v``).
        add_zero_attn: append a zero key/value column.
        kdim, vdim: key/value feature sizes (default ``embed_dim``).
        batch_first: ``(N, L, E)`` instead of ``(L, N, E)`` for batched inputs.
        device, dtype: factory arguments for the parameters.

    Differences from torch, both deliberate: a query row that may attend to nothing outputs zeros
    (torch: NaN on its general path); there is no fused inference fast path (the general path is the
    fast one here). Batch-first outputs are contiguous. NestedTensor inputs (jagged or strided,
    what nn.TransformerEncoder passes in inference) run unpadded through the varlen kernel, also in
    training and for cross-attention (torch: its fused inference path only). Second derivatives
    (``create_graph=True``) are supported.
    """

    __constants__ = ["batch_first"]
    bias_k: Tensor | None
    bias_v: Tensor | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            _check_sizes(embed_dim, num_heads)  # raises torch's ValueError before any state exists
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = _check_sizes(embed_dim, num_heads)
        _init_attention_parameters(self, embed_dim, self.kdim, self.vdim, bias, add_bias_kv, factory_kwargs)
        self.add_zero_attn = add_zero_attn
        self.register_forward_pre_hook(_keep_transformer_slow_path)

    def _reset_parameters(self) -> None:
        """Re-draws the parameters the way torch's ``_reset_parameters`` does (out_proj.weight is
        left alone, as in torch)."""
        _reset_attention_parameters(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Old MultiheadAttention checkpoints (torch v1.1.0) lack _qkv_same_embed_dim.
        if "_qkv_same_embed_dim" not in state:
            state["_qkv_same_embed_dim"] = True
        super().__setstate__(state)

    # torch's own mask-merging helper (public API on nn.MultiheadAttention; reads only num_heads).
    merge_masks = nn.MultiheadAttention.merge_masks

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        r"""Attention of ``query`` over ``key``/``value``; the same contract as torch's.

        Args:
            query: ``(L, E)``, ``(L, N, E)`` or, with ``batch_first``, ``(N, L, E)``.
            key: ``(S, kdim)``, ``(S, N, kdim)`` or ``(N, S, kdim)``.
            value: ``(S, vdim)``, ``(S, N, vdim)`` or ``(N, S, vdim)``.
            key_padding_mask: ``(N, S)`` or ``(S,)``; bool ``True`` = ignore that key, or float (added).
            need_weights: also return the attention weights (computed with the output, one kernel).
            attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)``; bool ``True`` = not allowed, or float.
            average_attn_weights: average the returned weights over heads.
            is_causal: hint that ``attn_mask`` is the causal mask (requires ``attn_mask``).

        Returns:
            ``(attn_output, attn_weights)``: output in the query's layout; weights ``(N, L, S)`` /
            ``(N, num_heads, L, S)`` (unbatched: no ``N``) or ``None``.
        """
        if query.is_nested or key.is_nested or value.is_nested:
            return self._nested_forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        is_batched = query.dim() == 3
        # As torch's module: canonicalise here (this is where the mismatched-mask warning comes from).
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        separate = not self._qkv_same_embed_dim
        return _mha_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=self.q_proj_weight if separate else None,
            k_proj_weight=self.k_proj_weight if separate else None,
            v_proj_weight=self.v_proj_weight if separate else None,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            batch_first=self.batch_first and is_batched,
        )


    def _nested_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """NestedTensor inputs (``(N, ragged L, E)``, jagged or strided; what nn.TransformerEncoder
        passes in inference): packed, no padding, through the varlen kernel; the output is a
        NestedTensor of the query's layout, the weights torch's padded ``(N, L, S)`` (see _nested.py)."""
        name = "qkv.MultiheadAttention"
        check_nested_call(name, {"query": query, "key": key, "value": value},
                          {"key_padding_mask": key_padding_mask, "attn_mask": attn_mask, "is_causal": is_causal})
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError(f"{name}: add_bias_kv and add_zero_attn are not supported with NestedTensor inputs")
        pq = pack(query, "query")
        pk = pq if key is query else pack(key, "key")
        pv = pk if value is key else pq if value is query else pack(value, "value")
        if pk.lengths != pv.lengths:
            raise ValueError(f"{name}: key and value must have the same sequence lengths; got {pk.lengths} and "
                             f"{pv.lengths}")
        for arg, packed, dim in (("query", pq, self.embed_dim), ("key", pk, self.kdim), ("value", pv, self.vdim)):
            if packed.values.size(-1) != dim:
                raise AssertionError(f"was expecting {arg} features of {dim}, but got {packed.values.size(-1)}")
        if self._qkv_same_embed_dim:
            q, k, v = _packed_in_projection(pq.values, pk.values, pv.values, self.in_proj_weight, self.in_proj_bias)
        else:
            b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q = F.linear(pq.values, self.q_proj_weight, b_q)
            k = F.linear(pk.values, self.k_proj_weight, b_k)
            v = F.linear(pv.values, self.v_proj_weight, b_v)
        # torch.unflatten, not Tensor.unflatten: under a torch.device context manager, dynamo
        # (torch 2.11-2.13) cannot trace the Tensor method (a Python override calling super()).
        q, k, v = (torch.unflatten(t, -1, (self.num_heads, self.head_dim)) for t in (q, k, v))
        out, weights = packed_attention(
            pq, pk, q, k, v,
            self.dropout if self.training else 0.0, need_weights=need_weights,
            average_attn_weights=average_attn_weights)
        return unpack(F.linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias), pq), weights


# ---------------------------------------------------------------------------------------------
# Modern batch-first modules
# ---------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the projections produce: autocast's when it is on for x's device (autocast leaves
    float64 alone), else x's."""
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _as_batched(x: Tensor, name: str) -> tuple[Tensor, bool]:
    """(N, T, E) stays; unbatched (T, E) gets a batch of one. Anything else is an error."""
    if x.dim() == 3:
        return x, True
    if x.dim() == 2:
        return x.unsqueeze(0), False
    raise ValueError(f"{name} must be (batch, seq, features) or unbatched (seq, features); got shape {tuple(x.shape)}")


def _attention_bias(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    batch: int,
    num_heads: int,
    q_len: int,
    kv_len: int,
    dtype: torch.dtype,
    batched: bool,
) -> Tensor | None:
    """MultiheadAttention-convention masks -> one additive bias at its broadcast shape.

    key_padding_mask ``(N, S)`` (unbatched ``(S,)``) becomes ``(N, 1, 1, S)``; attn_mask may be
    ``(L, S)``, MultiheadAttention's ``(N * num_heads, L, S)`` (viewed as ``(N, H, L, S)``) or any
    4-D shape broadcastable to ``(N, H, L, S)``.
    """
    padding = masked_out_to_bias(key_padding_mask, "key_padding_mask", dtype)
    if padding is not None:
        if not batched:
            padding = padding.unsqueeze(0)
        if padding.shape != (batch, kv_len):
            raise ValueError(
                f"key_padding_mask must have shape {(batch, kv_len) if batched else (kv_len,)}; "
                f"got {tuple(key_padding_mask.shape)}"
            )
        padding = padding.view(batch, 1, 1, kv_len)
    mask = masked_out_to_bias(attn_mask, "attn_mask", dtype)
    if mask is not None:
        if mask.dim() == 3:
            if mask.shape != (batch * num_heads, q_len, kv_len):
                raise ValueError(
                    f"a 3-D attn_mask must have shape (batch * num_heads, L, S) = "
                    f"{(batch * num_heads, q_len, kv_len)}; got {tuple(mask.shape)}"
                )
            mask = torch.unflatten(mask, 0, (batch, num_heads))
        elif mask.dim() not in (2, 4):
            raise ValueError(
                "attn_mask must be (L, S), (batch * num_heads, L, S) or 4-D broadcastable to "
                f"(batch, num_heads, L, S); got shape {tuple(mask.shape)}"
            )
    return add_biases(mask, padding)


def _kv_heads(num_heads: int, num_kv_heads: int | None) -> int:
    if num_kv_heads is None:
        return num_heads
    if not isinstance(num_kv_heads, int) or num_kv_heads <= 0:
        raise ValueError(f"num_kv_heads must be positive; got {num_kv_heads!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    return num_kv_heads


def _window_bounds(window: int | tuple[int, int] | None) -> tuple[int, int]:
    """A module's ``window`` as flash-attn's (left, right): ``w`` keys, |i - j| < w, is (w - 1, w - 1)
    (a causal module then keeps right = 0); a pair is taken as is; None is unbounded."""
    if window is None:
        return -1, -1
    if isinstance(window, int) and not isinstance(window, bool) and window >= 1:
        return window - 1, window - 1
    if (isinstance(window, (tuple, list)) and len(window) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        return int(window[0]), int(window[1])
    raise ValueError(
        "window must be a positive int (keys within that distance, the query's own included) or a (left, right) "
        f"pair of ints >= -1 (flash-attn's window_size, -1 unbounded); got {window!r}")


class _BatchFirstAttention(nn.Module):
    """Shared constructor and parameters of the modern modules (MultiheadAttention's names)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float,
        bias: bool,
        kdim: int | None,
        vdim: int | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        num_kv_heads: int | None = None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            _check_sizes(embed_dim, num_heads)
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1]; got {dropout}")
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = _check_sizes(embed_dim, num_heads)
        self.num_kv_heads = _kv_heads(num_heads, num_kv_heads)
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout = dropout
        _init_attention_parameters(
            self, embed_dim, self.kdim, self.vdim, bias, False, {"device": device, "dtype": dtype},
            kv_embed_dim=self.num_kv_heads * self.head_dim,
        )

    def _nested_forward(
        self, x: Tensor, memory: Tensor | None, masks: dict[str, Tensor | None], is_causal: bool = False,
        window: tuple[int, int] = (-1, -1),
    ) -> Tensor:
        """NestedTensor ``x`` (and ``memory``): ``(N, ragged L, E)``, jagged or strided, packed without
        padding through the varlen kernel; returns a NestedTensor of x's layout (see _nested.py)."""
        name = f"qkv.{type(self).__name__}"
        check_nested_call(name, {"x": x} if memory is None else {"x": x, "memory": memory}, masks)
        px = pack(x, "x")
        pm = px if memory is None else pack(memory, "memory")
        kv_rows = self.num_kv_heads * self.head_dim
        rows = [self.embed_dim, kv_rows, kv_rows]
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.split(rows)
        if memory is None:  # one GEMM for the three projections
            q, k, v = F.linear(px.values, self.in_proj_weight, self.in_proj_bias).split(rows, -1)
        else:
            if self.in_proj_weight is not None:
                w_q, w_k, w_v = self.in_proj_weight.split(rows)
            else:
                w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            q, k, v = F.linear(px.values, w_q, b_q), F.linear(pm.values, w_k, b_k), F.linear(pm.values, w_v, b_v)
        kv_heads = (self.num_kv_heads, self.head_dim)
        out, _ = packed_attention(
            px, pm, torch.unflatten(q, -1, (self.num_heads, self.head_dim)), torch.unflatten(k, -1, kv_heads),
            torch.unflatten(v, -1, kv_heads), self.dropout if self.training else 0.0, is_causal, window)
        return unpack(F.linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias), px)

    def _dropout_args(self) -> tuple[float, Tensor | None]:
        p = self.dropout if self.training else 0.0
        return p, (draw_dropout_seed() if p > 0.0 else None)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"
        if self.num_kv_heads != self.num_heads:
            s += f", num_kv_heads={self.num_kv_heads}"
        if getattr(self, "window", None) is not None:
            s += f", window={self.window}"
        if not self._qkv_same_embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        return s + f", bias={self.in_proj_bias is not None}"


class SelfAttention(_BatchFirstAttention):
    r"""Batch-first multi-head self-attention on ``torch.ops.qkv.multi_head_attention``.

    ``forward(x, key_padding_mask=None, attn_mask=None) -> Tensor`` with ``x`` of shape
    ``(N, L, E)`` (or unbatched ``(L, E)``); returns the same shape. Masks follow
    MultiheadAttention: bool ``True`` = masked out, or float added to the scores;
    ``key_padding_mask`` ``(N, S)``, ``attn_mask`` ``(L, S)``, ``(N * num_heads, L, S)`` or 4-D
    broadcastable to ``(N, num_heads, L, S)``. Parameters: ``in_proj_weight`` ``(3E, E)``,
    ``in_proj_bias``, ``out_proj`` (MultiheadAttention's names and initialisation).
    Dropout on the attention probabilities in training only. A row with every key masked gives
    zeros before ``out_proj``.

    ``num_kv_heads`` (grouped-query attention, default ``num_heads``): the key and value
    projections produce that many heads, each shared by ``num_heads // num_kv_heads`` query heads;
    ``in_proj_weight`` is then ``((num_heads + 2 * num_kv_heads) * head_dim, E)``. ``window``: a
    sliding window, ``w`` (position ``i`` attends to ``j`` with ``|i - j| < w``) or flash-attn's
    ``(left, right)``; the kernel skips the keys outside it. See docs/flash-attn-api.md.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        num_kv_heads: int | None = None,
        window: int | tuple[int, int] | None = None,
    ) -> None:
        _window_bounds(window)  # checked before any state exists
        super().__init__(embed_dim, num_heads, dropout, bias, None, None, device, dtype, num_kv_heads)
        self.window = window

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        """Self-attention of ``x`` ``(N, L, E)``; returns ``(N, L, E)``. A NestedTensor ``x`` (no masks)
        runs unpadded and returns a NestedTensor."""
        if x.is_nested:
            return self._nested_forward(x, None, {"key_padding_mask": key_padding_mask, "attn_mask": attn_mask},
                                        window=_window_bounds(self.window))
        xb, batched = _as_batched(x, "x")
        n, length, _ = xb.shape
        bias = _attention_bias(
            key_padding_mask, attn_mask, n, self.num_heads, length, length, _compute_dtype(x), batched
        )
        p, seed = self._dropout_args()
        out = torch.ops.qkv.multi_head_attention(
            xb, xb, xb, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.out_proj.weight, self.out_proj.bias, bias, False, p, seed,
            self.num_kv_heads, *_window_bounds(self.window),
        )
        return out if batched else out.squeeze(0)


class CausalSelfAttention(_BatchFirstAttention):
    r"""Batch-first causal self-attention on ``torch.ops.qkv.masked_self_attention``.

    ``forward(x, key_padding_mask=None) -> Tensor``: position ``i`` attends to positions
    ``j <= i`` only. The causal structure is the kernel's own flag: no mask tensor is built.
    ``key_padding_mask`` ``(N, L)``: bool ``True`` = padding, or float added. Parameters as
    :class:`SelfAttention`, ``num_kv_heads`` too. ``window=w``: Mistral's sliding window, position
    ``i`` attends to ``i - w < j <= i`` (a pair: flash-attn's ``(left, right)``, right kept 0).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        num_kv_heads: int | None = None,
        window: int | tuple[int, int] | None = None,
    ) -> None:
        _window_bounds(window)  # checked before any state exists
        super().__init__(embed_dim, num_heads, dropout, bias, None, None, device, dtype, num_kv_heads)
        self.window = window

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Causal self-attention of ``x`` ``(N, L, E)``; returns ``(N, L, E)``. A NestedTensor ``x`` (no
        mask) runs unpadded, each sequence causal on its own, and returns a NestedTensor."""
        if x.is_nested:
            return self._nested_forward(x, None, {"key_padding_mask": key_padding_mask}, is_causal=True,
                                        window=(_window_bounds(self.window)[0], -1))
        xb, batched = _as_batched(x, "x")
        n, length, _ = xb.shape
        bias = _attention_bias(key_padding_mask, None, n, self.num_heads, length, length, _compute_dtype(x), batched)
        p, seed = self._dropout_args()
        out = torch.ops.qkv.masked_self_attention(
            xb, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.out_proj.weight, self.out_proj.bias, bias, p, seed,
            self.num_kv_heads, _window_bounds(self.window)[0],
        )
        return out if batched else out.squeeze(0)


class CrossAttention(_BatchFirstAttention):
    r"""Batch-first cross-attention of ``x`` over ``memory`` on ``torch.ops.qkv.cross_attention``.

    ``forward(x, memory, key_padding_mask=None, attn_mask=None) -> Tensor``; ``x`` ``(N, L, E)``,
    ``memory`` ``(N, S, kdim)`` (or both unbatched). Keys and values are both projections of
    ``memory``, so ``vdim`` must equal ``kdim`` (a ValueError otherwise). Parameters carry
    MultiheadAttention's names for the same ``kdim``: the packed ``in_proj_weight`` when
    ``kdim == embed_dim``, else ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``; then
    ``in_proj_bias`` and ``out_proj``. Masks as :class:`SelfAttention` with ``S`` = memory length.
    ``num_kv_heads`` (grouped-query attention) as :class:`SelfAttention`: the key/value projections
    have ``num_kv_heads * head_dim`` rows. (No window: queries and memory share no positions.)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        num_kv_heads: int | None = None,
    ) -> None:
        resolved_kdim = kdim if kdim is not None else embed_dim
        resolved_vdim = vdim if vdim is not None else embed_dim
        if resolved_kdim != resolved_vdim:
            raise ValueError(
                "CrossAttention projects keys and values from the same memory tensor, so vdim must equal "
                f"kdim; got kdim={resolved_kdim}, vdim={resolved_vdim} (use qkv.MultiheadAttention for "
                "separate key and value inputs)"
            )
        super().__init__(embed_dim, num_heads, dropout, bias, kdim, vdim, device, dtype, num_kv_heads)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Attention of ``x`` ``(N, L, E)`` over ``memory`` ``(N, S, kdim)``; returns ``(N, L, E)``.
        NestedTensor ``x`` and ``memory`` (no masks) run unpadded and return a NestedTensor."""
        if x.is_nested or memory.is_nested:
            return self._nested_forward(x, memory, {"key_padding_mask": key_padding_mask, "attn_mask": attn_mask})
        xb, batched = _as_batched(x, "x")
        mb, memory_batched = _as_batched(memory, "memory")
        if memory_batched != batched:
            raise ValueError(
                f"x and memory must both be batched or both unbatched; got x of shape {tuple(x.shape)} "
                f"and memory of shape {tuple(memory.shape)}"
            )
        n, q_len, _ = xb.shape
        bias = _attention_bias(
            key_padding_mask, attn_mask, n, self.num_heads, q_len, mb.shape[1], _compute_dtype(x), batched
        )
        if self.in_proj_weight is not None:
            # Packed (E + 2 * num_kv_heads * head_dim, E) weight: the op takes its row blocks as views.
            kv_rows = self.num_kv_heads * self.head_dim
            w_q, w_k, w_v = self.in_proj_weight.split([self.embed_dim, kv_rows, kv_rows])
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        p, seed = self._dropout_args()
        out = torch.ops.qkv.cross_attention(
            xb, mb, self.num_heads, w_q, w_k, w_v, self.in_proj_bias,
            self.out_proj.weight, self.out_proj.bias, bias, p, seed, self.num_kv_heads,
        )
        return out if batched else out.squeeze(0)
