"""Inputs, sides and references of issue 17's feature cases (``--cases features``).

Each feature compares qkv with what a user would otherwise run:
- "window": causal attention with a sliding window of ``case.window`` keys (qkv) against full
  causal attention on the same inputs (``qkv_full``);
- "gqa": ``case.kv_heads`` key/value heads read in place (qkv) against SDPA with
  ``enable_gqa=True`` (``sdpa_gqa``) and against qkv's MHA with only the key heads' worth of
  queries (``qkv_mha_kv``: the memory yardstick of the target);
- "varlen": a packed batch of sequences of different lengths (``attention_varlen``) against the
  padded batch with a key-padding bias (``qkv_padded``) or SDPA's boolean mask (``sdpa_padded``);
- "kvcache": ``q_len`` new tokens written into a cache of ``kv_len`` keys and attending to it
  (``attention_kvcache``) against the same write plus SDPA with ``enable_gqa=True``.

Every side's ``compute()`` is one timed call; ``canonical`` (untimed) turns its result into the
checked slice, in one layout for all sides: the first two sequences (or batch elements) and the
query heads of the first key head. The reference is float64 math on that slice, chunked by query
rows and restricted to each chunk's visible keys, so an 8192-token check needs no 8192^2 buffer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cases import Case
from .flops import BACKWARD_FACTOR

QKV = "qkv"
CHECK_SEQUENCES = 2
REFERENCE_CHUNK = 256


def varlen_lengths(case: Case) -> list[int]:
    """Sequence lengths of a "varlen" case: ragged, at most ``q_len``, summing to half the padded
    batch (B * q_len / 2), so half the padded call's tokens are padding."""
    pattern = [1.0, 0.125, 0.75, 0.375, 0.875, 0.25, 0.5, 0.125]
    lengths = [max(1, int(case.q_len * pattern[b % len(pattern)])) for b in range(case.batch)]
    target = case.batch * case.q_len // 2
    lengths[-1] = max(1, min(case.q_len, lengths[-1] + target - sum(lengths)))
    return lengths


def _band_keys(q_len: int, kv_len: int, causal: bool, window: int) -> int:
    """Visible (query, key) pairs of one head, bottom-right aligned."""
    offset = kv_len - q_len
    total = 0
    for i in range(q_len):
        hi = min(kv_len, i + offset + 1) if causal else kv_len
        lo = max(0, i + offset - window + 1) if window else 0
        total += max(0, hi - lo)
    return total


def feature_flops(case: Case) -> float:
    """FLOPs of the qkv side's call: 4 * D per visible (query, key) pair and head forward (the
    FlashAttention count), the backward 2.5x."""
    d, h = case.head_dim, case.heads
    if case.feature == "varlen":
        pairs = sum(_band_keys(n, n, case.causal, 0) for n in varlen_lengths(case))
    elif case.feature == "window":
        pairs = case.batch * _band_keys(case.q_len, case.kv_len, True, case.window)
    elif case.feature == "kvcache":
        pairs = case.batch * _band_keys(case.q_len, case.kv_len + case.q_len, case.causal, 0)
    else:
        pairs = case.batch * (case.q_len * case.kv_len // (2 if case.causal else 1))
    forward = 4.0 * h * d * pairs
    return forward * (1.0 + BACKWARD_FACTOR if case.mode == "fwdbwd" else BACKWARD_FACTOR if case.mode == "bwd" else 1.0)


@dataclass
class FeatureInputs:
    q: torch.Tensor  # (B, H, L, D); for varlen the padded batch (rows past a length: padding)
    k: torch.Tensor  # (B, Hk, S, D); for kvcache the cache, S = kv_len + q_len (room for the new keys)
    v: torch.Tensor
    dout: torch.Tensor | None
    lengths: list[int] | None = None  # varlen: each sequence's length
    packed: tuple[torch.Tensor, ...] | None = None  # varlen: (q, k, v, dout) packed (total, H, D), own leaves
    cu_seqlens: torch.Tensor | None = None
    key_padding: tuple[torch.Tensor, torch.Tensor] | None = None  # varlen: (qkv bias, SDPA bool mask)
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # kvcache: (k_new, v_new) (B, Hk, q_len, D)
    cache_seqlens: torch.Tensor | None = None


def _randn(gen, shape, dtype, device, grad=False):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_(grad)


def make_feature_inputs(case: Case, device: str, dtype: torch.dtype, seed: int) -> FeatureInputs:
    gen = torch.Generator().manual_seed(seed)
    b, h, hk, l, s, d = case.batch, case.heads, case.key_value_heads, case.q_len, case.kv_len, case.head_dim
    grad = case.needs_grad
    if case.feature == "kvcache":
        q = _randn(gen, (b, h, l, d), dtype, device)
        k, v = _randn(gen, (b, hk, s + l, d), dtype, device), _randn(gen, (b, hk, s + l, d), dtype, device)
        new = (_randn(gen, (b, hk, l, d), dtype, device), _randn(gen, (b, hk, l, d), dtype, device))
        lengths = torch.full((b,), s, dtype=torch.int32, device=device)
        return FeatureInputs(q, k, v, None, new_kv=new, cache_seqlens=lengths)
    if case.feature == "varlen":
        lengths = varlen_lengths(case)
        total = sum(lengths)
        packed = [_randn(gen, (total, n, d), dtype, device) for n in (h, hk, hk, h)]
        padded = [torch.zeros(b, n, l, d, dtype=dtype, device=device) for n in (h, hk, hk, h)]
        start = 0
        for i, n in enumerate(lengths):
            for src, dst in zip(packed, padded):
                dst[i, :, :n] = src[start:start + n].transpose(0, 1)
            start += n
        valid = torch.arange(s, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        causal = torch.ones(l, s, dtype=torch.bool, device=device).tril()
        bias = torch.zeros(b, 1, 1, s, dtype=dtype, device=device).masked_fill(~valid[:, None, None, :], float("-inf"))
        sdpa_mask = valid[:, None, None, :] & causal
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        q_p, k_p, v_p, dout_p = padded
        packed_leaves = tuple(t.requires_grad_(grad) for t in packed[:3]) + (packed[3],)
        return FeatureInputs(q_p.requires_grad_(grad), k_p.requires_grad_(grad), v_p.requires_grad_(grad),
                             dout_p if grad else None, lengths=lengths, packed=packed_leaves, cu_seqlens=cu,
                             key_padding=(bias, sdpa_mask))
    q = _randn(gen, (b, h, l, d), dtype, device, grad)
    k, v = _randn(gen, (b, hk, s, d), dtype, device, grad), _randn(gen, (b, hk, s, d), dtype, device, grad)
    dout = _randn(gen, (b, h, l, d), dtype, device) if grad else None
    return FeatureInputs(q, k, v, dout)


# ---- sides ------------------------------------------------------------------------------------


def _timed(case: Case, forward, wrt, dout):
    """One timed call of the case's mode: {"out": ..., "dq"/"dk"/"dv": ...}."""
    if case.mode == "fwd":
        return lambda: {"out": forward()}

    def fwdbwd():
        out = forward()
        dq, dk, dv = torch.autograd.grad(out, wrt, dout)
        return {"out": out, "dq": dq, "dk": dk, "dv": dv}
    return fwdbwd


def make_feature_side(case: Case, inputs: FeatureInputs, name: str):
    """(compute, canonical) of side ``name``: the timed call, and the untimed map of its result
    onto the checked slice (see the module docstring)."""
    q, k, v, dout = inputs.q, inputs.k, inputs.v, inputs.dout
    f = case.feature
    if f == "window" and name in (QKV, "qkv_full"):
        left = case.window - 1 if name == QKV else -1
        forward = lambda: torch.ops.qkv.attention(q, k, v, None, 0.0, True, True, None, None, left, -1)[0]
        # Full causal attention is the yardstick, another result: not checked against the window's.
        return _timed(case, forward, (q, k, v), dout), _dense_slice(case) if name == QKV else None
    if f == "gqa" and name in (QKV, "sdpa_gqa"):
        if name == QKV:
            forward = lambda: torch.ops.qkv.attention(q, k, v, None, 0.0, case.causal)[0]
        else:
            forward = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=True)
        return _timed(case, forward, (q, k, v), dout), _dense_slice(case)
    if f == "gqa" and name == "qkv_mha_kv":
        hk = case.key_value_heads
        q_kv = q.detach()[:, :hk].requires_grad_(q.requires_grad)
        forward = lambda: torch.ops.qkv.attention(q_kv, k, v, None, 0.0, case.causal)[0]
        grad = None if dout is None else dout[:, :hk]
        return _timed(case, forward, (q_kv, k, v), grad), None  # a yardstick: other shapes, not checked
    if f == "varlen":
        return _varlen_side(case, inputs, name)
    if f == "kvcache":
        return _kvcache_side(case, inputs, name)
    raise ValueError(f"{case.name}: unknown side {name!r} for feature {f!r}")


def _varlen_side(case: Case, inputs: FeatureInputs, name: str):
    lengths, cu = inputs.lengths, inputs.cu_seqlens
    longest = max(lengths)
    if name == QKV:
        pq, pk, pv, pdout = inputs.packed
        forward = lambda: torch.ops.qkv.attention_varlen(pq, pk, pv, cu, cu, longest, longest, 0.0, case.causal, True)[0]
        return _timed(case, forward, (pq, pk, pv), pdout), _packed_slice(case, lengths, packed=True)
    q, k, v, dout = inputs.q, inputs.k, inputs.v, inputs.dout
    bias, mask = inputs.key_padding
    if name == "qkv_padded":
        forward = lambda: torch.ops.qkv.attention(q, k, v, bias, 0.0, case.causal)[0]
    elif name == "sdpa_padded":
        forward = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        raise ValueError(f"{case.name}: unknown side {name!r} for feature 'varlen'")
    return _timed(case, forward, (q, k, v), dout), _packed_slice(case, lengths, packed=False)


def _kvcache_side(case: Case, inputs: FeatureInputs, name: str):
    q, k_cache, v_cache = inputs.q, inputs.k, inputs.v
    k_new, v_new = inputs.new_kv
    lengths = inputs.cache_seqlens
    start, new = case.kv_len, case.q_len
    if name == QKV:
        def compute():
            return {"out": torch.ops.qkv.attention_kvcache(q, k_cache, v_cache, k_new, v_new, lengths, case.causal)[0]}
    elif name == "sdpa_gqa":
        # The same work by hand: write the new keys, attend to the used part of the cache. With
        # one new token a top-left causal mask would hide all but key 0: SDPA gets no mask there.
        causal = case.causal and new > 1

        def compute():
            k_cache[:, :, start:start + new].copy_(k_new)
            v_cache[:, :, start:start + new].copy_(v_new)
            used = start + new
            if causal:
                mask = torch.ones(new, used, dtype=torch.bool, device=q.device).tril(used - new)
                return {"out": F.scaled_dot_product_attention(q, k_cache[:, :, :used], v_cache[:, :, :used],
                                                              attn_mask=mask, enable_gqa=True)}
            return {"out": F.scaled_dot_product_attention(q, k_cache[:, :, :used], v_cache[:, :, :used],
                                                          enable_gqa=True)}
    else:
        raise ValueError(f"{case.name}: unknown side {name!r} for feature 'kvcache'")
    return compute, _dense_slice(case)


# ---- the checked slice and its reference --------------------------------------------------------


def _group(case: Case) -> int:
    return case.heads // case.key_value_heads


def _dense_slice(case: Case):
    """(B, H, ...) results: the first sequences, the query heads of key head 0, key head 0."""
    b, g = CHECK_SEQUENCES, _group(case)

    def canonical(result: dict) -> dict:
        out = {"out": result["out"][:b, :g]}
        for key in ("dq",):
            if key in result:
                out[key] = result[key][:b, :g]
        for key in ("dk", "dv"):
            if key in result:
                out[key] = result[key][:b, :1]
        return {key: t.detach() for key, t in out.items()}
    return canonical


def _packed_slice(case: Case, lengths: list[int], packed: bool):
    """Varlen results in the packed layout (tokens of the first sequences, heads as above)."""
    g = _group(case)
    n = sum(lengths[:CHECK_SEQUENCES])

    def to_packed(t: torch.Tensor, heads: slice) -> torch.Tensor:
        if packed:
            return t[:n, heads]
        return torch.cat([t[i, heads, :lengths[i]].transpose(0, 1) for i in range(CHECK_SEQUENCES)])

    def canonical(result: dict) -> dict:
        out = {"out": to_packed(result["out"], slice(0, g))}
        if "dq" in result:
            out["dq"] = to_packed(result["dq"], slice(0, g))
            out["dk"] = to_packed(result["dk"], slice(0, 1))
            out["dv"] = to_packed(result["dv"], slice(0, 1))
        return {key: t.detach() for key, t in out.items()}
    return canonical


def _attention_chunked(q, k, v, causal: bool, window: int):
    """float64 attention of one sequence, (H, L, D) x (S, D), bottom-right aligned, chunked by
    query rows over each chunk's visible keys only: explicit scores and masks, no L x S buffer."""
    h, l, _ = q.shape
    s = k.shape[0]
    offset = s - l
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs = []
    for i0 in range(0, l, REFERENCE_CHUNK):
        i1 = min(l, i0 + REFERENCE_CHUNK)
        hi = min(s, i1 - 1 + offset + 1) if causal else s
        lo = max(0, i0 + offset - window + 1) if window else 0
        rows = torch.arange(i0, i1)[:, None] + offset
        cols = torch.arange(lo, max(lo, hi))[None, :]
        visible = torch.ones(i1 - i0, cols.shape[1], dtype=torch.bool)
        if causal:
            visible &= cols <= rows
        if window:
            visible &= cols > rows - window
        scores = (q[:, i0:i1] @ k[lo:hi].transpose(0, 1)) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        empty = ~visible.any(-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
        outs.append(probs @ v[lo:hi])
    return torch.cat(outs, 1)


def feature_reference(case: Case, inputs: FeatureInputs) -> dict[str, torch.Tensor]:
    """float64 results on the checked slice (the layout ``canonical`` gives), with gradients."""
    g, grad = _group(case), case.needs_grad
    window = case.window if case.feature == "window" else 0
    if case.feature == "varlen":
        pq, pk, pv, pdout = inputs.packed
        n = sum(inputs.lengths[:CHECK_SEQUENCES])
        q = pq[:n, :g].detach().double().requires_grad_(grad)
        k = pk[:n, :1].detach().double().requires_grad_(grad)
        v = pv[:n, :1].detach().double().requires_grad_(grad)
        outs, start = [], 0
        for length in inputs.lengths[:CHECK_SEQUENCES]:
            rows = slice(start, start + length)
            outs.append(_attention_chunked(q[rows].transpose(0, 1), k[rows, 0], v[rows, 0], case.causal, 0)
                        .transpose(0, 1))
            start += length
        out = torch.cat(outs)
        result = {"out": out}
        if grad:
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), pdout[:n, :g].double())
            result.update(dq=dq, dk=dk, dv=dv)
        return {key: t.detach() for key, t in result.items()}
    b = CHECK_SEQUENCES
    q = inputs.q[:b, :g].detach().double().requires_grad_(grad)
    if case.feature == "kvcache":
        used = case.kv_len + case.q_len
        k_all, v_all = inputs.k[:b, :1, :used].detach().double().clone(), inputs.v[:b, :1, :used].detach().double().clone()
        k_all[:, :, case.kv_len:] = inputs.new_kv[0][:b, :1].double()
        v_all[:, :, case.kv_len:] = inputs.new_kv[1][:b, :1].double()
        k, v = k_all, v_all
    else:
        k = inputs.k[:b, :1].detach().double().requires_grad_(grad)
        v = inputs.v[:b, :1].detach().double().requires_grad_(grad)
    out = torch.stack([_attention_chunked(q[i], k[i, 0], v[i, 0], case.causal, window) for i in range(q.shape[0])])
    result = {"out": out}
    if grad:
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), inputs.dout[:b, :g].double())
        result.update(dq=dq, dk=dk, dv=dv)
    return {key: t.detach() for key, t in result.items()}


def extra_query_bytes(case: Case, item: int) -> int:
    """Bytes of what a GQA call holds per query head beyond MHA with only the key heads: the
    extra heads' output and logsumexp (float32), and with a backward their query gradient and
    the backward's per-row float32 dO . O."""
    extra_rows = case.batch * (case.heads - case.key_value_heads) * case.q_len
    per_row = (case.head_dim * item + 4) * (2 if case.needs_grad else 1)
    return extra_rows * per_row
