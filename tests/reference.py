"""The ground truth of every test, on every device: plain attention written out in float64, the
tolerances per device and dtype, and input builders.

One module for the CPU and the CUDA suites (the core tests run on each device through the
`device` fixture of conftest.py; test_cuda.py and the CUDA emulation tests use the same
references). Everything is computed on the inputs' device.

- `reference_probs` / `reference_attention`: softmax(q k^T * scale + bias) and its output.
- `feature_reference`: (out, lse) for every option of the core op (GQA/MQA, windows, ALiBi,
  softcap, dropout keep mask); `varlen_reference` and `kvcache_reference` build on it.
- `dtype=` other than float64: a plain same-precision implementation (scores and P @ V rounded to
  the dtype, softmax in float32), against which reduced-precision kernels are judged as
  flash-attention's tests do (`assert_matches`): at most a small multiple of its error.
- `tolerance(dtype)`, `grad_tolerance(dtype)`: assert_close bounds for outputs and gradients, per
  device and dtype (the device the test runs on).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---- tolerances ---------------------------------------------------------------------------------

# Accumulation is float32 (float64 for float64 inputs). The CUDA kernels' float32 bounds are
# those test_cuda.py held them to on an H100; their reduced-precision kernels round P to the
# input dtype before P @ V (as flash-attention does), hence the wider float16/bfloat16 bounds.
TOLERANCES = {
    "cpu": {
        torch.float64: dict(atol=1e-10, rtol=1e-10),
        torch.float32: dict(atol=2e-5, rtol=2e-5),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
        torch.float16: dict(atol=3e-3, rtol=3e-3),
    },
    "cuda": {
        torch.float64: dict(atol=1e-9, rtol=1e-9),
        torch.float32: dict(atol=1e-4, rtol=2e-4),
        torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
        torch.float16: dict(atol=5e-3, rtol=5e-3),
    },
}


def tolerance(dtype: torch.dtype, device=None) -> dict:
    """assert_close bounds for outputs of `dtype` computed on `device` (default: the device the
    test runs on, i.e. torch's default device, which conftest's `device` fixture sets)."""
    device = torch.get_default_device() if device is None else torch.device(device)
    return TOLERANCES[device.type][dtype]


# Gradients sum over rows or keys: a few ulps of the dtype per term (absolute = relative bound).
# CUDA: test_cuda.py's float32 bound on an H100; its float16/bfloat16 bounds are not calibrated
# on a GPU yet (the tensor-core backward rounds P and dS to the input dtype).
GRAD_TOLERANCES = {
    "cpu": {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2},
    "cuda": {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 2e-2},
}


def grad_tolerance(dtype: torch.dtype, device=None) -> dict:
    """assert_close bounds for gradients of `dtype` computed on `device` (default: as tolerance)."""
    device = torch.get_default_device() if device is None else torch.device(device)
    bound = GRAD_TOLERANCES[device.type][dtype]
    return dict(atol=bound, rtol=bound)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches(name: str, got: torch.Tensor, ref64: torch.Tensor, low_ref: torch.Tensor | None, dtype):
    """float32/64: tight absolute/relative bounds; float16/bfloat16: within 3x the error of a plain
    same-precision implementation (`low_ref`, plus a floor), and a relative-norm bound."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    if got.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    got64, ref = got.double().cpu(), ref64.double().cpu()
    if dtype == torch.float64:
        torch.testing.assert_close(got64, ref, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    elif dtype == torch.float32:
        # atol: gradients such as dS = P * (dP - delta) cancel terms of size |dO| |V| ~ sqrt(Dv)
        torch.testing.assert_close(got64, ref, rtol=2e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    else:
        err = max_err(got64, ref)
        base = max_err(low_ref.cpu(), ref)
        floor = 2e-3 if dtype == torch.float16 else 1e-2
        scale = max(ref.abs().max().item(), 1.0)
        assert err <= 3 * base + floor * scale, f"{name}: max error {err:.3g} vs same-precision reference {base:.3g}"
        norm = ref.norm().item()
        if ref.abs().max().item() > 1e-3:  # e.g. the gradient of a bias constant along keys is exactly 0
            rel = (got64 - ref).norm().item() / norm
            assert rel < (5e-3 if dtype == torch.float16 else 2e-2), f"{name}: relative error {rel:.3g}"


# ---- masks and biases, written plainly ----------------------------------------------------------


def causal_hidden(q_len: int, kv_len: int, bottom_right: bool, device=None) -> torch.Tensor:
    """Bool (L, S) mask, True where key j is hidden from query i."""
    return ~visible_keys(q_len, kv_len, True, (-1, -1), bottom_right, device)


def visible_keys(q_len: int, kv_len: int, is_causal=False, window=(-1, -1), bottom_right=False,
                 device=None) -> torch.Tensor:
    """Bool (L, S), True where key j is visible to query i: flash-attn's band
    i + off - left <= j <= i + off + right (-1 = unbounded; causal sets right = 0),
    off = S - L when bottom_right, else 0."""
    left, right = window
    if is_causal:
        right = 0
    offset = kv_len - q_len if bottom_right else 0
    i = torch.arange(q_len, device=device)[:, None] + offset
    j = torch.arange(kv_len, device=device)[None, :]
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    return visible


def alibi_bias(slopes: torch.Tensor, batch: int, heads: int, q_len: int, kv_len: int, bottom_right=False):
    """(B, H, L, S) float64: -slope[b, h] * |i + off - j|."""
    offset = kv_len - q_len if bottom_right else 0
    i = torch.arange(q_len, device=slopes.device)[:, None] + offset
    distance = (i - torch.arange(kv_len, device=slopes.device)[None, :]).abs().double()
    slopes = slopes.double().expand(batch, heads)  # (H,) or (B, H)
    return -slopes[:, :, None, None] * distance


def alibi_slopes(heads: int, batch: int | None = None) -> torch.Tensor:
    """ALiBi's geometric slopes (BLOOM's, for a power of two) as float32 (H,), or (B, H) with a
    different multiple per batch element."""
    base = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32)
    return base if batch is None else base * torch.linspace(0.5, 1.5, batch)[:, None]


def seeded_generator(seed: int) -> torch.Generator:
    """A seeded generator on the device the test runs on (torch's default device), for random
    inputs drawn there."""
    return torch.Generator(torch.get_default_device()).manual_seed(seed)


def dropout_seed(value: int) -> torch.Tensor:
    """The ops' dropout seed: a 0-dim int64 tensor on the CPU, whatever the inputs' device."""
    return torch.tensor(value, dtype=torch.int64, device="cpu")


# ---- references ---------------------------------------------------------------------------------


def feature_scores(q, k, bias=None, is_causal=False, bottom_right=False, scale=None, window=(-1, -1), softcap=0.0,
                   alibi_slopes=None, dtype=torch.float64):
    """(B, H, L, S) scores with -inf where hidden; key heads repeated for GQA. In float64, or for
    another `dtype` q k^T rounded to it and the rest in its accumulation type (float32)."""
    q, k = q.to(dtype), k.to(dtype)
    B, H, L, _ = q.shape
    S = k.shape[-2]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale  # in dtype
    if softcap > 0 or alibi_slopes is not None:
        scores = scores.to(acc)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, B, H, L, S, bottom_right).to(acc)
    if bias is not None:  # added in dtype when nothing above left it
        scores = scores + bias.to(dtype).to(scores.dtype)
    scores = scores.to(acc)
    hidden = ~visible_keys(L, S, is_causal, window, bottom_right, q.device)
    return scores.masked_fill(hidden, float("-inf"))


def feature_reference(q, k, v, bias=None, is_causal=False, bottom_right=False, scale=None, window=(-1, -1),
                      softcap=0.0, alibi_slopes=None, keep=None, dropout_p=0.0, dtype=torch.float64):
    """(out, lse) for every option of the core op, out in `dtype` (float64 by default), lse in its
    accumulation type; rows that see nothing: out 0, lse -inf. ``keep`` is an optional bool
    dropout mask over (B, H, L, S). NaN-free under autograd (gradients of hidden rows are 0)."""
    scores = feature_scores(q, k, bias, is_causal, bottom_right, scale, window, softcap, alibi_slopes, dtype)
    v = v.to(dtype).repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if scores.shape[-1] == 0:  # no keys at all: every row sees nothing (out 0, lse -inf), kept in
        # the autograd graph (empty scores @ empty values) so every input gets a zero gradient
        return scores.to(dtype) @ v, torch.full(scores.shape[:-1], float("-inf"), dtype=scores.dtype,
                                                device=q.device)
    row_max = scores.amax(-1, keepdim=True)
    empty = torch.isneginf(row_max)
    probs = torch.exp(scores - torch.where(empty, torch.zeros_like(row_max), row_max))
    total = probs.sum(-1, keepdim=True)
    probs = torch.where(empty, torch.zeros_like(probs), probs / torch.where(empty, torch.ones_like(total), total))
    lse = torch.where(empty, row_max, row_max + torch.log(torch.where(empty, torch.ones_like(total), total)))
    probs = probs.to(dtype)
    if keep is not None:  # dropout_p = 1 keeps nothing: 0, not 0 * inf
        probs = torch.where(keep.bool(), probs / (1.0 - dropout_p), 0.0) if dropout_p < 1 else probs * 0
    return probs @ v, lse.squeeze(-1)


def reference_probs(q, k, bias=None, is_causal=False, bottom_right=False, scale=None, dtype=torch.float64):
    """softmax(q k^T * scale + bias) in `dtype`; rows that see nothing are all zero."""
    scores = feature_scores(q, k, bias, is_causal, bottom_right, scale, dtype=dtype)
    row_max = scores.amax(-1, keepdim=True)
    empty = torch.isneginf(row_max)
    probs = torch.exp(scores - torch.where(empty, torch.zeros_like(row_max), row_max))
    total = probs.sum(-1, keepdim=True)
    probs = torch.where(empty, torch.zeros_like(probs), probs / torch.where(empty, torch.ones_like(total), total))
    return probs.to(dtype)


def reference_attention(q, k, v, bias=None, is_causal=False, bottom_right=False, scale=None,
                        keep: Optional[torch.Tensor] = None, dropout_p: float = 0.0, dtype=torch.float64) -> torch.Tensor:
    """Attention output in `dtype` (float64 by default), with an explicit dropout keep mask if given."""
    return feature_reference(q, k, v, bias, is_causal, bottom_right, scale, keep=keep, dropout_p=dropout_p,
                             dtype=dtype)[0]


def low_precision_reference(q, k, v, bias, is_causal, bottom_right, dtype, keep=None, dropout_p=0.0):
    """The same-precision output `assert_matches` judges float16/bfloat16 by; None otherwise."""
    if dtype not in LOW_PRECISION:
        return None
    return reference_attention(q, k, v, bias, is_causal, bottom_right, keep=keep, dropout_p=dropout_p, dtype=dtype)


def reference_grads(q, k, v, bias, grad_out, is_causal, bottom_right, dtype, keep=None, dropout_p=0.0):
    """Gradients of reference_attention in `dtype` for q, k, v (and bias when given)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    b = bias.detach().to(dtype).requires_grad_() if bias is not None else None
    out = reference_attention(*leaves, b, is_causal, bottom_right, keep=keep, dropout_p=dropout_p, dtype=dtype)
    inputs = leaves + ([b] if b is not None else [])
    return torch.autograd.grad(out, inputs, grad_out.to(dtype))


def varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, **options):
    """Packed (total, H, D) inputs: each sequence through feature_reference on its own.
    Returns (out (total_q, H, Dv), lse (H, total_q)) in float64; rows past the last offset are 0 / -inf."""
    total_q, H = q.shape[0], q.shape[1]
    out = torch.zeros(total_q, H, v.shape[-1], dtype=torch.float64, device=q.device)
    lse = torch.full((H, total_q), float("-inf"), dtype=torch.float64, device=q.device)
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


# ---- inputs: shapes, layouts and biases the CUDA tests sweep ------------------------------------


def seed_of(*parts) -> int:
    """A reproducible seed per test case (Python's str hash is salted per process)."""
    return zlib.crc32(repr(parts).encode()) % (2**31)


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    L: int
    S: int
    D: int
    Dv: int

    def __str__(self) -> str:
        return f"B{self.B}H{self.H}L{self.L}S{self.S}D{self.D}Dv{self.Dv}"


SHAPES = [
    Shape(1, 1, 1, 1, 8, 8),  # one query, one key
    Shape(2, 3, 1, 37, 64, 64),  # decoding: L = 1
    Shape(2, 2, 17, 33, 13, 13),  # head dim not a multiple of 8
    Shape(1, 2, 50, 20, 40, 24),  # D != Dv, L > S
    Shape(2, 2, 64, 64, 64, 64),
    Shape(2, 2, 100, 77, 128, 128),  # ragged tiles on the tensor-core path
    Shape(1, 2, 130, 257, 64, 64),  # several key tiles
    Shape(1, 1, 33, 65, 256, 256),  # the largest head dim
    Shape(1, 1, 40, 70, 200, 96),
]
CAUSAL = [(False, False), (True, False), (True, True)]


def make_qkv(shape: Shape, dtype, layout: str = "contiguous", seed: int = 0, device="cpu"):
    """Fresh random q, k, v (never zeros) in one of several memory layouts; the same values on
    every device (drawn on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    B, H, L, S, D, Dv = shape.B, shape.H, shape.L, shape.S, shape.D, shape.Dv

    def rand(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64, device="cpu").to(dtype).to(device)

    if layout == "contiguous":
        return rand(B, H, L, D), rand(B, H, S, D), rand(B, H, S, Dv)
    if layout == "token_major":  # (B, L, H, D) memory, as after a projection: heads are strided views
        return (rand(B, L, H, D).transpose(1, 2), rand(B, S, H, D).transpose(1, 2), rand(B, S, H, Dv).transpose(1, 2))
    if layout == "strided":  # unit-stride rows cut from wider tensors, value read with a non-unit column stride
        q = rand(B, H, L, D + 5)[..., 3:3 + D]
        k = rand(B, H, 2 * S, D)[:, :, ::2]
        v = rand(B, H, Dv, S).transpose(-1, -2)
        return q, k, v
    if layout == "expanded":  # key/value shared across heads (stride 0 on the head dim)
        return rand(B, H, L, D), rand(B, 1, S, D).expand(B, H, S, D), rand(B, 1, S, Dv).expand(B, H, S, Dv)
    raise ValueError(layout)


def make_bias(kind: str, shape: Shape, dtype, seed: int = 1, device="cpu"):
    """Additive biases of several broadcast shapes, with -inf entries where the kind hides keys."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    B, H, L, S = shape.B, shape.H, shape.L, shape.S

    def rand(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64, device="cpu")

    if kind == "full":
        b = rand(B, H, L, S)
    elif kind == "rows_cols":
        b = rand(L, S)
    elif kind == "key_padding":  # (B, 1, 1, S): the last keys of batch 0 hidden, one batch fully hidden if B > 1
        b = torch.zeros(B, 1, 1, S, dtype=torch.float64, device="cpu")
        b[0, ..., S // 2 + 1:] = -math.inf
        if B > 1:
            b[1] = -math.inf
    elif kind == "per_head_row":  # (H, L, 1): broadcast over batch and keys
        b = rand(H, L, 1)
    elif kind == "expanded":  # an expanded (stride-0) 4-D view
        b = rand(1, 1, L, S).expand(B, H, L, S)
    elif kind == "masked_row":  # (L, S) with query row 0 seeing nothing
        b = rand(L, S)
        b[0] = -math.inf
    else:
        raise ValueError(kind)
    return b.to(dtype).to(device)
