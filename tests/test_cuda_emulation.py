"""The CUDA kernels' own source, run on the CPU.

tests/cuda_emulation/emulated_ops.cpp compiles csrc/cuda's kernel headers with the host compiler
against a small emulation of the CUDA built-ins (cooperative fibers for threads, barriers,
shuffles, mma.sync fragments, cp.async) and registers them as torch.ops.qkv_emulated.*. This file
checks those kernels against the CPU kernels of torch.ops.qkv (same semantics, same dropout hash,
so dropout masks must agree) and against plain float64 references. It runs on every machine: it
is how the CUDA kernels' indexing, tiling, masking, online softmax, dropout replay, backward and
tensor-core fragment handling are tested where there is no GPU. Timing, memory ordering across
blocks and the real hardware instructions are not covered (see docs/cuda.md).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

import qkv  # noqa: F401  (registers torch.ops.qkv)
from attention_reference import (ALL_DTYPES, CAUSAL, LOW_PRECISION, Shape, assert_matches, low_precision_reference,
                                 make_bias, make_qkv, reference_attention, reference_grads, reference_probs, seed_of)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emulated():
    """Builds (once; cached under build/cuda-emulation) and loads the emulated kernels."""
    from torch.utils import cpp_extension

    build_dir = ROOT / "build" / "cuda-emulation"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="qkv_cuda_emulation",
        sources=[str(ROOT / "tests" / "cuda_emulation" / "emulated_ops.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests" / "cuda_emulation")],
        extra_cflags=["-O1", "-std=c++20"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.qkv_emulated


def expand_bias(bias, q, k):
    """The (B, H, L, S) stride-0 view the CUDA launcher hands the kernels (as expand_bias in C++)."""
    if bias is None:
        return None
    b = bias
    while b.dim() < 4:
        b = b.unsqueeze(0)
    return b.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def resolved(q, k, scale, bottom_right):
    return (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale), (k.shape[2] - q.shape[2] if bottom_right else 0)


def emulated_forward(ops, q, k, v, bias=None, dropout_p=0.0, is_causal=False, bottom_right=False, scale=None, seed=0,
                     kernel="generic"):
    scale, offset = resolved(q, k, scale, bottom_right)
    return ops.forward(q, k, v, expand_bias(bias, q, k), scale, is_causal, offset, dropout_p, seed, kernel)


def cpu_forward(q, k, v, bias=None, dropout_p=0.0, is_causal=False, bottom_right=False, scale=None, seed=0):
    return torch.ops.qkv.attention(q, k, v, bias, dropout_p, is_causal, bottom_right, scale,
                                   torch.tensor(seed, dtype=torch.int64))


def assert_close_to_cpu_kernel(name, got, want, dtype):
    """The CPU kernels compute the same function in the same accumulation type; only the order of
    float operations differs (and, on the tensor-core path, the rounding of P to the input dtype)."""
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    scale = max(want.double().abs().max().item(), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


FORWARD_SHAPES = [
    Shape(1, 1, 1, 1, 8, 8),
    Shape(2, 2, 1, 37, 64, 64),  # decoding
    Shape(2, 2, 19, 45, 13, 29),  # D != Dv, neither a multiple of 8
    Shape(1, 2, 70, 33, 128, 128),  # L > S: fully masked rows with bottom-right causal
    Shape(1, 1, 20, 40, 200, 96),  # the 8-columns-per-lane bucket
    Shape(1, 2, 9, 0, 16, 16),  # no keys at all
]


@pytest.mark.parametrize("shape", FORWARD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "causal_bottom_right"])
def test_generic_forward(emulated, shape, dtype, causal):
    is_causal, bottom_right = causal
    q, k, v = make_qkv(shape, dtype, "token_major", seed=seed_of(shape, dtype, causal))
    out, lse = emulated_forward(emulated, q, k, v, None, 0.0, is_causal, bottom_right)
    want, want_lse = cpu_forward(q, k, v, None, 0.0, is_causal, bottom_right)
    assert out.stride() == want.stride() and lse.stride() == want_lse.stride()
    assert_close_to_cpu_kernel("out", out, want, dtype)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite].double(), want_lse[finite].double(), rtol=1e-6, atol=1e-6)
    ref, _ = reference_attention(q, k, v, None, is_causal, bottom_right)
    assert_matches("out", out, ref, low_precision_reference(q, k, v, None, is_causal, bottom_right, dtype), dtype)


@pytest.mark.parametrize("kind", ["full", "rows_cols", "key_padding", "per_head_row", "expanded", "masked_row"])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_generic_forward_bias_and_layouts(emulated, kind, layout, dtype):
    shape = Shape(2, 2, 21, 35, 24, 40)
    q, k, v = make_qkv(shape, dtype, layout, seed=seed_of(kind, layout))
    bias = make_bias(kind, shape, dtype)
    out, _ = emulated_forward(emulated, q, k, v, bias, 0.0, True, True, 0.3)
    want, _ = cpu_forward(q, k, v, bias, 0.0, True, True, 0.3)
    assert_close_to_cpu_kernel("out", out, want, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "causal_bottom_right"])
@pytest.mark.parametrize("shape_lsd", [(1, 1), (70, 130), (129, 64), (65, 200)], ids=lambda x: f"L{x[0]}S{x[1]}")
def test_tensor_core_forward(emulated, dtype, D, causal, shape_lsd):
    is_causal, bottom_right = causal
    L, S = shape_lsd
    shape = Shape(1, 2, L, S, D, D)
    q, k, v = make_qkv(shape, dtype, "token_major", seed=seed_of(D, L, S, causal))
    bias = make_bias("key_padding", shape, dtype)
    for b in (None, bias):
        out, lse = emulated_forward(emulated, q, k, v, b, 0.0, is_causal, bottom_right, kernel="mma")
        want, want_lse = cpu_forward(q, k, v, b, 0.0, is_causal, bottom_right)
        assert_close_to_cpu_kernel("out", out, want, dtype)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
        finite = torch.isfinite(want_lse)
        torch.testing.assert_close(lse[finite], want_lse[finite], rtol=1e-5, atol=1e-5)
        ref, _ = reference_attention(q, k, v, b, is_causal, bottom_right)
        assert_matches("out", out, ref, low_precision_reference(q, k, v, b, is_causal, bottom_right, dtype), dtype)


@pytest.mark.parametrize("kernel", ["generic", "mma"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_dropout_matches_cpu_kernel(emulated, kernel, dtype):
    if kernel == "mma" and dtype not in LOW_PRECISION:
        dtype = torch.float16 if dtype == torch.float32 else torch.bfloat16  # the tensor-core path's dtypes
    shape = Shape(2, 2, 37, 70, 64, 64)
    q, k, v = make_qkv(shape, dtype, "token_major", seed=seed_of(kernel, dtype))
    bias = make_bias("rows_cols", shape, dtype)
    for p, seed in ((0.3, 12345), (0.9, 2**61 + 7)):
        out, lse = emulated_forward(emulated, q, k, v, bias, p, True, False, seed=seed, kernel=kernel)
        want, want_lse = cpu_forward(q, k, v, bias, p, True, False, seed=seed)
        assert_close_to_cpu_kernel("out", out, want, dtype)
        # the weights kernel replays the same mask as the CPU one
        scale, offset = resolved(q, k, None, False)
        w = emulated.weights(q, k, expand_bias(bias, q, k), want_lse, scale, True, offset, p, seed)
        w_cpu = torch.ops.qkv.attention_weights(q, k, bias, want_lse, p, True, False, None,
                                                torch.tensor(seed, dtype=torch.int64))
        probs, _ = reference_probs(q, k, bias, True, False)
        visible = probs > 0
        assert torch.equal((w == 0) & visible, (w_cpu == 0) & visible)
        assert_close_to_cpu_kernel("weights", w, w_cpu, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "causal_bottom_right"])
def test_weights(emulated, dtype, causal):
    is_causal, bottom_right = causal
    shape = Shape(2, 2, 40, 33, 24, 24)
    q, k, _ = make_qkv(shape, dtype, "strided", seed=seed_of(dtype, causal))
    bias = make_bias("per_head_row", shape, dtype)
    _, lse = cpu_forward(q, k, k, bias, 0.0, is_causal, bottom_right)
    scale, offset = resolved(q, k, None, bottom_right)
    w = emulated.weights(q, k, expand_bias(bias, q, k), lse, scale, is_causal, offset, 0.0, 0)
    want = torch.ops.qkv.attention_weights(q, k, bias, lse, 0.0, is_causal, bottom_right)
    assert w.is_contiguous()
    assert_close_to_cpu_kernel("weights", w, want, dtype)


BACKWARD_SHAPES = [
    Shape(2, 2, 19, 45, 13, 29),
    Shape(1, 2, 40, 33, 64, 64),
    Shape(1, 1, 1, 9, 128, 128),
    Shape(1, 1, 17, 20, 200, 72),
    Shape(1, 2, 5, 0, 8, 8),  # no keys: zero gradients
]


def emulated_backward(ops, grad_out, q, k, v, bias, out, lse, dropout_p, is_causal, bottom_right, seed,
                      bias_requires_grad, kernel="generic"):
    scale, offset = resolved(q, k, None, bottom_right)
    return ops.backward(grad_out, q, k, v, bias, expand_bias(bias, q, k), out, lse, scale, is_causal, offset,
                        dropout_p, seed, bias_requires_grad, kernel)


# Every mask alignment and every bias-gradient reduction path (none, per element, over batch and
# heads, over query rows, over keys), without the full cross product.
MASKS_AND_BIASES = [
    pytest.param((False, False), "none", id="full-none"),
    pytest.param((True, False), "full", id="causal-full"),
    pytest.param((True, True), "rows_cols", id="causal_bottom_right-rows_cols"),
    pytest.param((False, False), "key_padding", id="full-key_padding"),
    pytest.param((True, True), "key_padding", id="causal_bottom_right-key_padding"),
    pytest.param((True, False), "per_head_row", id="causal-per_head_row"),
]


@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("causal, bias_kind", MASKS_AND_BIASES)
def test_backward(emulated, shape, dtype, causal, bias_kind):
    is_causal, bottom_right = causal
    q, k, v = make_qkv(shape, dtype, "token_major", seed=seed_of(shape, dtype, causal, bias_kind))
    bias = make_bias(bias_kind, shape, dtype) if shape.S > 0 else None
    out, lse = cpu_forward(q, k, v, bias, 0.0, is_causal, bottom_right)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    got = emulated_backward(emulated, grad_out, q, k, v, bias, out, lse, 0.0, is_causal, bottom_right, 0,
                            bias is not None)
    want = torch.ops.qkv.attention_backward(grad_out, q, k, v, bias, out, lse, 0.0, is_causal, bottom_right, None,
                                            None, bias is not None)
    names = ("dq", "dk", "dv", "dbias")
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape and g.stride() == w.stride(), name
        assert_close_to_cpu_kernel(name, g, w, dtype)
    ref = reference_grads(q, k, v, bias, grad_out, is_causal, bottom_right, torch.float64)
    low = reference_grads(q, k, v, bias, grad_out, is_causal, bottom_right, dtype) if dtype in LOW_PRECISION \
        else [None] * 4
    for name, g, r, lo in zip(names, got, ref, low):
        assert_matches(name, g, r, lo, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bias_kind", ["full", "key_padding"])
def test_backward_with_dropout(emulated, dtype, bias_kind):
    shape = Shape(2, 2, 33, 47, 40, 24)
    q, k, v = make_qkv(shape, dtype, "strided", seed=seed_of(dtype, bias_kind))
    bias = make_bias(bias_kind, shape, dtype)
    seed, p = 99, 0.3
    out, lse = cpu_forward(q, k, v, bias, p, True, True, seed=seed)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype)
    got = emulated_backward(emulated, grad_out, q, k, v, bias, out, lse, p, True, True, seed, True)
    want = torch.ops.qkv.attention_backward(grad_out, q, k, v, bias, out, lse, p, True, True, None,
                                            torch.tensor(seed, dtype=torch.int64), True)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert_close_to_cpu_kernel(name, g, w, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "causal_bottom_right"])
@pytest.mark.parametrize("shape_ls", [(1, 9), (70, 45), (33, 150)], ids=lambda x: f"L{x[0]}S{x[1]}")
def test_tensor_core_backward(emulated, dtype, D, causal, shape_ls):
    """The tensor-core backward (no bias gradient; bias read, dropout replayed) against the CPU kernel
    and the float64 reference."""
    is_causal, bottom_right = causal
    L, S = shape_ls
    shape = Shape(1, 2, L, S, D, D)
    q, k, v = make_qkv(shape, dtype, "token_major", seed=seed_of("bwd", D, L, S, causal))
    bias = make_bias("key_padding", shape, dtype)
    for b, p, seed in ((None, 0.0, 0), (bias, 0.0, 0), (bias, 0.25, 77)):
        out, lse = cpu_forward(q, k, v, b, p, is_causal, bottom_right, seed=seed)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(dtype)
        got = emulated_backward(emulated, grad_out, q, k, v, b, out, lse, p, is_causal, bottom_right, seed, False,
                                kernel="mma")
        want = torch.ops.qkv.attention_backward(grad_out, q, k, v, b, out, lse, p, is_causal, bottom_right, None,
                                                torch.tensor(seed, dtype=torch.int64), False)
        for name, g, w in zip(("dq", "dk", "dv"), got[:3], want[:3]):
            assert g.stride() == w.stride(), name
            assert_close_to_cpu_kernel(name, g, w, dtype)
        if p == 0.0:
            ref = reference_grads(q, k, v, b, grad_out, is_causal, bottom_right, torch.float64)
            low = reference_grads(q, k, v, b, grad_out, is_causal, bottom_right, dtype)
            for name, g, r, lo in zip(("dq", "dk", "dv"), got[:3], ref[:3], low[:3]):
                assert_matches(name, g, r, lo, dtype)


def test_emulator_catches_a_missing_barrier(emulated):
    """The emulation runs each thread until it blocks, so a read of shared memory that another thread
    writes without a barrier in between sees stale data instead of passing by luck."""
    expected = torch.tensor([float((t + 1) % 128 + 1) for t in range(128)])
    assert torch.equal(emulated.barrier_probe(True), expected)
    assert not torch.equal(emulated.barrier_probe(False), expected)


@pytest.mark.parametrize("kernel", ["generic", "mma"])
def test_nan_in_a_query_reaches_its_output_row(emulated, kernel):
    # As on the CPU: a NaN query row gives NaN output and logsumexp, never zeros and -inf.
    dtype = torch.float32 if kernel == "generic" else torch.bfloat16
    q, k, v = make_qkv(Shape(1, 1, 20, 40, 64, 64), dtype, "token_major", seed=seed_of("nan", kernel))
    q[0, 0, 1, 3] = float("nan")
    out, lse = emulated_forward(emulated, q, k, v, kernel=kernel)
    assert out[0, 0, 1].isnan().all() and lse[0, 0, 1].isnan()
    assert not out[0, 0, 0].isnan().any() and not lse[0, 0, 0].isnan()


# ---- large finite masks, float32 masks with half inputs, zero-in-theory gradients, long key sequences ----


def finite_mask(shape, value, dtype):
    """Random values, with `value` on every key of query row 0, every other key of row 1 and all
    keys but the last of row 2 (Hugging Face masks use finfo.min where torch's use -inf)."""
    g = torch.Generator().manual_seed(21)
    mask = torch.randn(shape, generator=g, dtype=torch.float64)
    mask[..., 0, :] = value
    mask[..., 1, ::2] = value
    mask[..., 2, :-1] = value
    return mask.to(dtype)


FINITE_MASK_CASES = [
    pytest.param(kernel, dtype, mask_dtype, id=f"{kernel}-{str(dtype)[6:]}-mask_{str(mask_dtype)[6:]}")
    for kernel, dtypes in (("generic", ALL_DTYPES), ("mma", LOW_PRECISION))
    for dtype in dtypes
    for mask_dtype in dict.fromkeys([dtype, torch.float32])
]


@pytest.mark.parametrize("kernel, dtype, mask_dtype", FINITE_MASK_CASES)
def test_finite_negative_masks_and_float32_masks(emulated, kernel, dtype, mask_dtype):
    """finfo.min on every key of a row: a softmax over equal finite scores (the mean of V), never a
    hidden row, in the forward, the weights and the backward (whose probabilities need the row's
    lse normalizer: lse = max + log(sum) rounds to max there). A float32 mask reaches half-precision
    kernels as float32. Against the CPU kernels, which the core tests hold to float64."""
    D = 64
    shape = Shape(2, 2, 37, 70, D, D)
    q, k, v = make_qkv(shape, dtype, "token_major", seed=seed_of("finite", kernel, dtype, mask_dtype))
    bias = finite_mask((shape.L, shape.S), torch.finfo(mask_dtype).min, mask_dtype)
    bias[5, 3] = 1e4  # a large positive score too (its row's lse needs a normalizer)
    out, lse = emulated_forward(emulated, q, k, v, bias, kernel=kernel)
    want, want_lse = cpu_forward(q, k, v, bias)
    assert_close_to_cpu_kernel("out", out, want, dtype)
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(lse.double(), want_lse.double(), rtol=1e-6, atol=1e-6)
    scale, offset = resolved(q, k, None, False)
    w = emulated.weights(q, k, expand_bias(bias, q, k), want_lse, scale, False, offset, 0.0, 0)
    assert_close_to_cpu_kernel("weights", w, torch.ops.qkv.attention_weights(q, k, bias, want_lse), dtype)
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    bias_grad = kernel == "generic"  # the tensor-core backward takes no bias gradient
    got = emulated_backward(emulated, grad_out, q, k, v, bias, want, want_lse, 0.0, False, False, 0, bias_grad,
                            kernel=kernel)
    expected = torch.ops.qkv.attention_backward(grad_out, q, k, v, bias, want, want_lse, 0.0, False, False, None,
                                                None, bias_grad)
    for name, g, e in list(zip(("dq", "dk", "dv", "dbias"), got, expected))[:4 if bias_grad else 3]:
        assert g.dtype == e.dtype, name
        assert_close_to_cpu_kernel(name, g, e, max(dtype, g.dtype, key=lambda t: torch.finfo(t).eps))


@pytest.mark.parametrize("bias_shape", [(37, 1), (2, 1, 37, 1), (1, 1)], ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_key_broadcast_bias_gradient_cancels(emulated, dtype, bias_shape):
    """A bias broadcast over keys shifts a row's scores alike: its gradient is zero in theory. Summing
    dS added up the rounding of delta = dO . O (the rounded output) times every key: 1e-3 in
    float16. The generic backward now takes it from the row sums, as the CPU kernel does."""
    shape = Shape(2, 2, 37, 150, 64, 64)
    q, k, v = make_qkv(shape, dtype, "token_major", seed=seed_of("row shift", dtype))
    v = (v.double() + 4).to(dtype)  # values far from 0: a larger rounding of O
    bias = torch.randn(bias_shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    out, lse = cpu_forward(q, k, v, bias)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    got = emulated_backward(emulated, grad_out, q, k, v, bias, out, lse, 0.0, False, False, 0, True)[3]
    cpu = torch.ops.qkv.attention_backward(grad_out, q, k, v, bias, out, lse, 0.0, False, False, None, None, True)[3]
    # The CPU kernel: 1e-5 at most here in float32/float16/bfloat16 (torch: 2e-5), 1e-13 in float64.
    bound = 1e-13 if dtype == torch.float64 else 2e-5
    assert got.abs().max().item() <= bound and cpu.abs().max().item() <= bound


def test_long_key_sequence_generic_forward(emulated):
    """2^14 keys: P V and the row sums are per-tile partials combined with compensation, so the
    error does not grow with S (one running sum over every key: 6e-6 in float32)."""
    dtype = torch.float32
    S, D = 1 << 14, 32
    g = torch.Generator().manual_seed(14)
    q = (torch.randn(1, 1, 4, D, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    k = torch.randn(S + D, generator=g, dtype=torch.float64).to(dtype).as_strided((1, 1, S, D), (0, 0, 1, 1))
    v = (torch.rand(S + D, generator=g, dtype=torch.float64) + 0.5).to(dtype).as_strided((1, 1, S, D), (0, 0, 1, 1))
    out, _ = emulated_forward(emulated, q, k, v)
    ref, _ = reference_attention(q, k, v)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-6, err
