"""Additive masks with large finite values, and masks in another dtype than the query's.

- Hugging Face builds masks with torch.finfo(dtype).min, not -inf: a row whose every key carries
  it is still a softmax over finite scores (torch gives the mean of V), and only -inf hides a key.
  The kernels once multiplied the bias by log2(e) and overflowed to -inf there (zeros out).
- float16/bfloat16 queries take a float32 bias, kept in float32 (cast to float16, 1e5 becomes inf
  and -1e9 -inf: NaN out); its gradient comes back in float32.

The reference adds the bias to the scores in the accumulation type (float32, or float64 for
float64 inputs), as torch and the kernels do: s + finfo.min rounds to finfo.min there.
"""
import math

import pytest
import torch

attention = torch.ops.qkv.attention

ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Relative to the largest reference value (at least 1): the dtype's rounding of inputs/outputs.
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def acc_type(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference(q, k, v, bias, grad_out):
    """(out, grads of q, k, v, bias) in float64, the bias added to the scores in the accumulation
    type (gradients pass through that rounding unchanged)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    q64, k64, v64, b64 = leaves
    scores = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1]) + b64
    rounded = scores.detach().to(acc_type(q.dtype)).double()
    scores = scores + (rounded - scores).detach()
    out = torch.softmax(scores, -1) @ v64
    return (out, *torch.autograd.grad(out, leaves, grad_out.double()))


def assert_close(name, got, want, dtype, extra=0.0):
    assert got.shape == want.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - want).abs().max().item()
    bound = (TOL[dtype] + extra) * max(1.0, want.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def score_rounding(dtype, value):
    """Extra tolerance where `value` keeps only part of a score: s + value rounds to a step of
    eps * |value| in the accumulation type, and the kernel's s and the reference's may round to
    neighbouring steps. (Where that step exceeds the scores' spread, every s + value rounds to the
    same number in both.)"""
    step = torch.finfo(acc_type(dtype)).eps * abs(value)
    return 4 * step if step < 1 else 0.0


def finite_mask(shape, value, dtype, generator):
    """Random scores-sized values with rows (or batches) carrying `value`: the first query row on
    every key, the second on every other key, the third on all keys but the last."""
    mask = torch.randn(shape, generator=generator, dtype=torch.float64)
    mask[..., 0, :] = value
    mask[..., 1, ::2] = value
    mask[..., 2, :-1] = value
    return mask.to(dtype)


def mask_values(mask_dtype):
    """finfo.min of the mask's dtype, and -1e9 / -1e30 where the mask's dtype holds them."""
    values = [("finfo_min", torch.finfo(mask_dtype).min)]
    values += [(str(v), v) for v in (-1e9, -1e30) if v >= torch.finfo(mask_dtype).min]
    return values


CASES = [
    pytest.param(dtype, mask_dtype, name, value, id=f"{str(dtype)[6:]}-mask_{str(mask_dtype)[6:]}-{name}")
    for dtype in ALL_DTYPES
    for mask_dtype in dict.fromkeys([dtype, torch.float32])
    for name, value in mask_values(mask_dtype)
]


@pytest.mark.parametrize("shape", [(2, 2, 5, 9, 8), (1, 2, 70, 300, 16)], ids=["small", "several_tiles"])
@pytest.mark.parametrize("dtype, mask_dtype, name, value", CASES)
def test_large_finite_mask_values_stay_finite(dtype, mask_dtype, name, value, shape):
    B, H, L, S, D = shape
    g = torch.Generator().manual_seed(L + S)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64).to(dtype) for n in (L, S, S))
    bias = finite_mask((L, S), value, mask_dtype, g).requires_grad_()
    grad_out = torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, bias)
    grads = torch.autograd.grad(out, [*leaves, bias], grad_out)
    want = reference(q, k, v, bias, grad_out)
    extra = score_rounding(dtype, value)
    assert_close("out", out, want[0], dtype, extra)
    # Only -inf means "hidden": a row whose every key carries the value sees all of them.
    assert torch.isfinite(lse).all()
    for name_, got, ref in zip(("dq", "dk", "dv"), grads, want[1:]):
        assert_close(name_, got, ref, dtype, extra)
    assert grads[3].dtype == mask_dtype
    coarser = max(dtype, mask_dtype, key=TOL.get)
    assert_close("dbias", grads[3], want[4], coarser, extra)


@pytest.mark.parametrize("dtype, mask_dtype, name, value", CASES)
def test_large_finite_mask_values_in_the_weights_ops(dtype, mask_dtype, name, value):
    """attention_with_weights (need_weights=True) and attention_weights from a logsumexp."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64).to(dtype) for n in (6, 9, 9))
    bias = finite_mask((2, 1, 6, 9), value, mask_dtype, g)
    out, lse, weights = torch.ops.qkv.attention_with_weights(q, k, v, bias)
    want = reference(q, k, v, bias, torch.ones(2, 2, 6, 8, dtype=dtype))
    extra = score_rounding(dtype, value)
    assert_close("out", out, want[0], dtype, extra)
    rounded = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(8) + bias.double()).to(acc_type(dtype))
    probs = torch.softmax(rounded.double(), -1)
    assert_close("weights", weights, probs, dtype, extra)
    assert_close("weights from lse", torch.ops.qkv.attention_weights(q, k, bias, lse), probs, dtype, extra)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_mask_with_half_queries(dtype):
    """1e5 and -1e9 are float32 values a float16 bias cannot hold: the op keeps them in float32."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g, dtype=torch.float64).to(dtype) for n in (12, 40, 40))
    bias = torch.randn(12, 40, generator=g, dtype=torch.float64).float()
    bias[:, 3] = 1e5  # dominates every row
    bias[1:4, 5:9] = -1e9
    bias[5] = -1e9  # a whole row: the mean of V
    bias = bias.requires_grad_()
    grad_out = torch.randn(2, 2, 12, 16, generator=g, dtype=torch.float64).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, _ = attention(*leaves, bias)
    grads = torch.autograd.grad(out, [*leaves, bias], grad_out)
    want = reference(q, k, v, bias, grad_out)
    assert_close("out", out, want[0], dtype)
    assert grads[3].dtype == torch.float32
    for name, got, ref in zip(("dq", "dk", "dv", "dbias"), grads, want[1:]):
        assert_close(name, got, ref, dtype)


def test_float32_bias_with_float64_queries():
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for n in (5, 7, 7))
    bias = torch.randn(5, 7).requires_grad_()
    out, _ = attention(q, k, v, bias)
    (grad,) = torch.autograd.grad(out.sum(), bias)
    want = reference(q, k, v, bias, torch.ones_like(out))
    torch.testing.assert_close(out, want[0], atol=1e-12, rtol=1e-12)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad.double(), want[4], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_other_bias_dtypes_are_rejected(dtype):
    other = torch.float16 if dtype != torch.float16 else torch.bfloat16
    q = torch.randn(1, 1, 3, 4, dtype=dtype)
    with pytest.raises(RuntimeError, match="bias must be a floating tensor of the query's dtype .* or float32"):
        attention(q, q, q, torch.zeros(3, 3, dtype=other))
