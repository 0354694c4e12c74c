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


# ---- the features of issue 17, written plainly: dense scores, explicit masks -----------------


def visible_keys(q_len: int, kv_len: int, is_causal=False, window=(-1, -1), bottom_right=False) -> torch.Tensor:
    """Bool (L, S), True where key j is visible to query i: flash-attn's band
    i + off - left <= j <= i + off + right (-1 = unbounded; causal sets right = 0),
    off = S - L when bottom_right, else 0."""
    left, right = window
    if is_causal:
        right = 0
    offset = kv_len - q_len if bottom_right else 0
    i = torch.arange(q_len)[:, None] + offset
    j = torch.arange(kv_len)[None, :]
    visible = torch.ones(q_len, kv_len, dtype=torch.bool)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    return visible


def alibi_bias(slopes: torch.Tensor, batch: int, heads: int, q_len: int, kv_len: int, bottom_right=False):
    """(B, H, L, S) float64: -slope[b, h] * |i + off - j|."""
    offset = kv_len - q_len if bottom_right else 0
    distance = (torch.arange(q_len)[:, None] + offset - torch.arange(kv_len)[None, :]).abs().double()
    slopes = slopes.double().expand(batch, heads)  # (H,) or (B, H)
    return -slopes[:, :, None, None] * distance


def feature_scores(q, k, bias=None, is_causal=False, bottom_right=False, scale=None, window=(-1, -1), softcap=0.0,
                   alibi_slopes=None):
    """(B, H, L, S) float64 scores with -inf where hidden; key heads repeated for GQA."""
    q, k = q.double(), k.double()
    B, H, L, _ = q.shape
    S = k.shape[-2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, B, H, L, S, bottom_right)
    if bias is not None:
        scores = scores + bias.double()
    hidden = ~visible_keys(L, S, is_causal, window, bottom_right)
    return scores.masked_fill(hidden, float("-inf"))


def feature_reference(q, k, v, bias=None, is_causal=False, bottom_right=False, scale=None, window=(-1, -1),
                      softcap=0.0, alibi_slopes=None, keep=None, dropout_p=0.0):
    """(out, lse) in float64 for every option of the core op; rows that see nothing: out 0, lse -inf.
    ``keep`` is an optional bool dropout mask over (B, H, L, S)."""
    scores = feature_scores(q, k, bias, is_causal, bottom_right, scale, window, softcap, alibi_slopes)
    if scores.shape[-1] == 0:  # no keys at all: every row sees nothing
        out = torch.zeros(*scores.shape[:-1], v.shape[-1], dtype=torch.float64)
        return out, torch.full(scores.shape[:-1], float("-inf"), dtype=torch.float64)
    row_max = scores.amax(-1, keepdim=True)
    empty = torch.isneginf(row_max)
    probs = torch.exp(scores - torch.where(empty, torch.zeros_like(row_max), row_max))
    total = probs.sum(-1, keepdim=True)
    probs = torch.where(empty, torch.zeros_like(probs), probs / torch.where(empty, torch.ones_like(total), total))
    lse = torch.where(empty, row_max, row_max + torch.log(torch.where(empty, torch.ones_like(total), total)))
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    v = v.double().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return probs @ v, lse.squeeze(-1)


def varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, **options):
    """Packed (total, H, D) inputs: each sequence through feature_reference on its own.
    Returns (out (total_q, H, Dv), lse (H, total_q)) in float64; rows past the last offset are 0 / -inf."""
    total_q, H = q.shape[0], q.shape[1]
    out = torch.zeros(total_q, H, v.shape[-1], dtype=torch.float64)
    lse = torch.full((H, total_q), float("-inf"), dtype=torch.float64)
    slopes = options.pop("alibi_slopes", None)
    for b in range(len(cu_seqlens_q) - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        seq_slopes = None if slopes is None else (slopes[b] if slopes.dim() == 2 else slopes)
        o, l = feature_reference(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                                 v[k0:k1].transpose(0, 1)[None], alibi_slopes=seq_slopes, **options)
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = l[0]
    return out, lse


def kvcache_reference(q, k_cache, v_cache, k_new, v_new, cache_seqlens, **options):
    """(B, H, Sq, D) queries over caches (B, Hk, Sc, D) after writing k_new/v_new (B, Hk, Snew, D) at
    cache_seqlens[b]: each batch element sees its first cache_seqlens[b] + Snew keys, bottom-right
    aligned. Returns (out, lse, k_cache_after, v_cache_after) in float64; the caches are not modified."""
    k_after, v_after = k_cache.double().clone(), v_cache.double().clone()
    new = 0 if k_new is None else k_new.shape[2]
    B = q.shape[0]
    lengths = [k_cache.shape[2]] * B if cache_seqlens is None else [int(n) for n in cache_seqlens]
    slopes = options.pop("alibi_slopes", None)
    outs, lses = [], []
    for b in range(B):
        if new:
            k_after[b, :, lengths[b]:lengths[b] + new] = k_new[b].double()
            v_after[b, :, lengths[b]:lengths[b] + new] = v_new[b].double()
        used = lengths[b] + new
        seq_slopes = None if slopes is None else (slopes[b] if slopes.dim() == 2 else slopes)
        o, l = feature_reference(q[b:b + 1], k_after[b:b + 1, :, :used], v_after[b:b + 1, :, :used],
                                 bottom_right=True, alibi_slopes=seq_slopes, **options)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses), k_after, v_after


def alibi_slopes(heads: int, batch: int | None = None) -> torch.Tensor:
    """ALiBi's geometric slopes (BLOOM's, for a power of two) as float32 (H,), or (B, H) with a
    different multiple per batch element."""
    base = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32)
    return base if batch is None else base * torch.linspace(0.5, 1.5, batch)[:, None]
