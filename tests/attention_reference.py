"""Plain float64 references and input builders shared by the CUDA tests (test_cuda.py on a GPU,
test_cuda_emulation.py on the CPU emulation of the CUDA kernels).

Reduced precision is judged as flash-attention's tests do: a kernel's error against the float64
reference may be at most a small multiple of the error that a plain same-precision implementation
makes, plus a small absolute floor.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def seed_of(*parts) -> int:
    """A reproducible seed per test case (Python's str hash is salted per process)."""
    return zlib.crc32(repr(parts).encode()) % (2**31)


# ---- references ---------------------------------------------------------------------------------


def causal_hidden(L: int, S: int, bottom_right: bool, device) -> torch.Tensor:
    """(L, S) bool: True where key j is hidden from query i."""
    offset = S - L if bottom_right else 0
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return j > i + offset


def reference_probs(q, k, bias=None, is_causal=False, bottom_right=False, scale=None, dtype=torch.float64):
    """(probs, lse): softmax probabilities in `dtype` (scores rounded to it; softmax in float32 for
    reduced precision), rows that see no key -> 0 probabilities and lse -inf. NaN-free in backward."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(dtype)
    if is_causal:
        scores = scores.masked_fill(causal_hidden(q.shape[-2], k.shape[-2], bottom_right, q.device), -math.inf)
    scores = scores.double() if dtype == torch.float64 else scores.float()
    lse = torch.logsumexp(scores.detach(), dim=-1)
    hidden_row = torch.isneginf(scores.detach()).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(hidden_row, 0.0), dim=-1).masked_fill(hidden_row, 0.0)
    return probs.to(dtype), lse


def reference_attention(q, k, v, bias=None, is_causal=False, bottom_right=False, scale=None, keep=None,
                        dropout_p=0.0, dtype=torch.float64):
    """(out, lse) in `dtype`; `keep` is an optional bool dropout mask over (B, H, L, S)."""
    probs, lse = reference_probs(q, k, bias, is_causal, bottom_right, scale, dtype)
    if keep is not None:
        probs = torch.where(keep, probs / (1.0 - dropout_p), torch.zeros_like(probs)) if dropout_p < 1 else probs * 0
    return probs @ v.to(dtype), lse


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches(name: str, got: torch.Tensor, ref64: torch.Tensor, low_ref: torch.Tensor | None, dtype):
    """float32/64: tight absolute/relative bounds; float16/bfloat16: within 3x the error of a plain
    same-precision implementation (plus a floor), and a relative-norm bound."""
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


def low_precision_reference(q, k, v, bias, is_causal, bottom_right, dtype, keep=None, dropout_p=0.0):
    if dtype not in LOW_PRECISION:
        return None
    out, _ = reference_attention(q, k, v, bias, is_causal, bottom_right, keep=keep, dropout_p=dropout_p, dtype=dtype)
    return out


def reference_grads(q, k, v, bias, grad_out, is_causal, bottom_right, dtype, keep=None, dropout_p=0.0):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    b = bias.detach().to(dtype).requires_grad_() if bias is not None else None
    out, _ = reference_attention(*leaves, b, is_causal, bottom_right, keep=keep, dropout_p=dropout_p, dtype=dtype)
    inputs = leaves + ([b] if b is not None else [])
    return torch.autograd.grad(out, inputs, grad_out.to(dtype))


def draw_seed(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


# ---- inputs -------------------------------------------------------------------------------------


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
    """Fresh random q, k, v (never zeros) in one of several memory layouts."""
    g = torch.Generator().manual_seed(seed)
    B, H, L, S, D, Dv = shape.B, shape.H, shape.L, shape.S, shape.D, shape.Dv

    def rand(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).to(dtype).to(device)

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
        return torch.randn(*size, generator=g, dtype=torch.float64)

    if kind == "full":
        b = rand(B, H, L, S)
    elif kind == "rows_cols":
        b = rand(L, S)
    elif kind == "key_padding":  # (B, 1, 1, S): the last keys of batch 0 hidden, one batch fully hidden if B > 1
        b = torch.zeros(B, 1, 1, S, dtype=torch.float64)
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
