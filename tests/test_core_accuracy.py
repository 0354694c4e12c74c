"""Accuracy that must not degrade with size, judged against float64 and against torch's own error
on the same inputs.

- Long key sequences: P V and the row sums run over every key. Summed into one float32
  accumulator, their error grew with S (at S = 2^20 about 10x torch's; with 2^20+ identical keys
  1e-3 to 1e-2). The kernels sum per key tile and combine the tiles with compensation.
- Long backward reductions (dV, dK over query blocks; dQ over key blocks) likewise.
- Gradients that are zero in theory: a bias broadcast over keys shifts every score of a row by
  the same amount, which the softmax ignores. Its gradient once came out as the rounding of the
  output times every key (float16: 1e-3 where torch gives 1e-6).

Long sequences without long tensors: K and V rows are overlapping windows of one buffer
(row j = buffer[j : j + D], strides (1, 1)), S distinct rows in S + D numbers.
"""
import math

import pytest
import torch
import torch.nn.functional as F

attention = torch.ops.qkv.attention


def windows(buffer, S, D):
    """(1, 1, S, D) with row j = buffer[j : j + D]."""
    return buffer.as_strided((1, 1, S, D), (0, 0, 1, 1))


def reference_out(q, k, v, chunk=1 << 16):
    """Attention in float64 over key chunks (the (L, S) scores fit; the (S, D) keys are never
    materialised in float64 at once)."""
    q = q.double()
    S = k.shape[2]
    scores = torch.cat([q @ k[:, :, j:j + chunk].double().transpose(-1, -2) for j in range(0, S, chunk)], -1)
    probs = torch.softmax(scores / math.sqrt(q.shape[-1]), -1)
    return sum(probs[..., j:j + chunk] @ v[:, :, j:j + chunk].double() for j in range(0, S, chunk))


def relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("L", [2, 8], ids=["few_rows", "panels"])
@pytest.mark.parametrize("log2_S", [16, 20])
def test_long_key_sequence_error_does_not_grow(log2_S, L):
    S, D = 1 << log2_S, 32
    g = torch.Generator().manual_seed(log2_S * 10 + L)
    q = torch.randn(1, 1, L, D, generator=g) * 0.5
    k = windows(torch.randn(S + D, generator=g), S, D)
    v = windows(torch.rand(S + D, generator=g) + 0.5, S, D)  # positive: every partial sum grows
    want = reference_out(q, k, v)
    err = relative_error(attention(q, k, v)[0], want)
    torch_err = relative_error(F.scaled_dot_product_attention(q, k.contiguous(), v.contiguous()), want)
    # Measured: qkv 1.5e-7..2.2e-7 at every S; torch 1.3e-6 (2^16) and 4.9e-6 (2^20); one float32
    # accumulator gave 1.3e-5 and 4.7e-5.
    assert err <= 1e-6, f"S=2^{log2_S}: {err:.3g}"
    assert err <= 2 * torch_err, f"S=2^{log2_S}: {err:.3g} vs torch's {torch_err:.3g}"


@pytest.mark.parametrize("L", [1, 8], ids=["few_rows", "panels"])
def test_many_identical_keys_give_their_value(L):
    """2^22 copies of one key and value: every probability is equal and the output is the value.
    A single float32 accumulator stopped growing long before (4% off at 2^22)."""
    S, D = 1 << 22, 64
    g = torch.Generator().manual_seed(L)
    q = torch.randn(1, 1, L, D, generator=g)
    k = torch.randn(D, generator=g).as_strided((1, 1, S, D), (0, 0, 0, 1))
    v = (torch.rand(D, generator=g) + 0.5).as_strided((1, 1, S, D), (0, 0, 0, 1))
    out, lse = attention(q, k, v)
    want = v[0, 0, 0].double().expand(1, 1, L, D)
    assert relative_error(out, want) <= 1e-5
    scores = (q.double() @ k[0, 0, 0].double()) / math.sqrt(D)
    torch.testing.assert_close(lse.double(), scores + math.log(S), rtol=0, atol=1e-5 * math.log(S))


def reference_grads(q, k, v, grad_out, chunk=1024):
    """(out, dq, dk, dv) in float64, query block by query block."""
    q, k, v, grad_out = (t.double() for t in (q, k, v, grad_out))
    scale = 1 / math.sqrt(q.shape[-1])
    out, dq = torch.empty_like(grad_out), torch.empty_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for i in range(0, q.shape[2], chunk):
        rows = slice(i, i + chunk)
        p = torch.softmax(q[:, :, rows] @ k.transpose(-1, -2) * scale, -1)
        o = p @ v
        g = grad_out[:, :, rows]
        ds = p * (g @ v.transpose(-1, -2) - (g * o).sum(-1, keepdim=True))
        out[:, :, rows], dq[:, :, rows] = o, ds @ k * scale
        dk += ds.transpose(-1, -2) @ q[:, :, rows] * scale
        dv += p.transpose(-1, -2) @ g
    return out, dq, dk, dv


def forward_backward(fn, q, k, v, grad_out):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))


def test_long_backward_reductions():
    """L = S = 4096: dV and dK sum over every query, dQ over every key. Measured: qkv out 4.1e-7,
    dk 1.2e-6, dv 7.5e-7; torch 4.6e-7, 1.4e-6, 9.8e-7; one float32 accumulator 4.5e-6, 4.6e-6, 2.4e-6."""
    n, D = 4096, 64
    g = torch.Generator().manual_seed(7)
    q, k = (torch.randn(1, 2, n, D, generator=g) for _ in range(2))
    v = torch.rand(1, 2, n, D, generator=g) + 0.5
    grad_out = torch.randn(1, 2, n, D, generator=g)
    want = reference_grads(q, k, v, grad_out)
    ours = forward_backward(lambda q, k, v: attention(q, k, v)[0], q, k, v, grad_out)
    theirs = forward_backward(F.scaled_dot_product_attention, q, k, v, grad_out)
    for name, got, ref, other in zip(("out", "dq", "dk", "dv"), ours, want, theirs):
        err, torch_err = relative_error(got, ref), relative_error(other, ref)
        bound = 4 * torch_err if name == "dq" else 2 * torch_err  # dQ cancels most: noisier on both
        assert err <= max(bound, 1e-6), f"{name}: {err:.3g} vs torch's {torch_err:.3g}"


# ---- gradients that are zero in theory -----------------------------------------------------

ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
KEY_BROADCAST_SHAPES = [(64, 1), (2, 1, 64, 1), (1, 1)]


def zero_gradient_inputs(dtype, bias_shape, value_mean):
    g = torch.Generator().manual_seed(11)
    B, H, L, S, D = 2, 4, 64, 300, 64
    q, k = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (L, S))
    v = (torch.randn(B, H, S, D, generator=g) + value_mean).to(dtype)
    grad_out = torch.randn(B, H, L, D, generator=g).to(dtype)
    bias = torch.randn(bias_shape, generator=g).to(dtype)
    return q, k, v, bias, grad_out


def bias_gradient(fn, q, k, v, bias, grad_out):
    b = bias.detach().clone().requires_grad_()
    return torch.autograd.grad(fn(q, k, v, b), b, grad_out)[0]


@pytest.mark.parametrize("value_mean", [0.0, 4.0])  # values far from 0 make the rounding of O larger
@pytest.mark.parametrize("bias_shape", KEY_BROADCAST_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_key_broadcast_bias_gradient_is_as_small_as_torchs(dtype, bias_shape, value_mean):
    """Measured (float32 / float16 / bfloat16, V mean 4): qkv 7e-6 / 6e-6 / 7e-6, torch (its math
    path, which takes bias gradients) 2e-5 / 2e-5 / 2e-5; before, 6e-5 / 6e-2 / 0.4."""
    inputs = zero_gradient_inputs(dtype, bias_shape, value_mean)
    ours = bias_gradient(lambda q, k, v, b: attention(q, k, v, b)[0], *inputs).abs().max().item()
    theirs = bias_gradient(lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b), *inputs)
    assert ours <= 2 * theirs.abs().max().item(), f"{ours:.3g} vs torch's {theirs.abs().max().item():.3g}"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_key_broadcast_bias_gradient_through_the_weights(dtype):
    """The same through the weights (need_weights=True): their backward works in float32 for
    half inputs, as torch's math path does."""
    q, k, _, bias, _ = zero_gradient_inputs(dtype, (64, 1), 0.0)
    grad_w = torch.randn(2, 4, 64, 300, generator=torch.Generator().manual_seed(12)).to(dtype)
    lse = attention(q, k, k, bias)[1]
    ours = bias_gradient(lambda q, k, v, b: torch.ops.qkv.attention_weights(q, k, b, lse), q, k, k, bias, grad_w)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def torch_weights(q, k, v, b):
        return torch.softmax((q.to(acc) @ k.to(acc).transpose(-1, -2)) / 8 + b.to(acc), -1).to(dtype)

    theirs = bias_gradient(torch_weights, q, k, k, bias, grad_w).abs().max().item()
    assert ours.dtype == dtype
    # Both are rounding noise (float32: 1e-7 to 2e-7 over runs); before, float16 gave 1e-3.
    assert ours.abs().max().item() <= 4 * theirs, f"{ours.abs().max().item():.3g} vs torch's {theirs:.3g}"
