"""CUDA kernels of the qkv ops against plain float64 references.

Skipped when no GPU is available: this file tests a different machine. On a machine without a
GPU, ``QKV_CUDA_TEST_DEVICE=cpu`` runs the same checks against the CPU kernels, which validates
the references and tolerances of this file itself (the CUDA-only path switch is then a no-op).

References, tolerances and input builders live in attention_reference.py.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import qkv  # noqa: F401  (registers torch.ops.qkv)
from attention_reference import (ALL_DTYPES, CAUSAL, LOW_PRECISION, SHAPES, Shape, assert_matches, draw_seed,
                                 low_precision_reference, reference_attention, reference_grads, reference_probs,
                                 seed_of)
from attention_reference import make_bias as _make_bias
from attention_reference import make_qkv as _make_qkv

DEVICE = os.environ.get("QKV_CUDA_TEST_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA kernels run on a GPU machine", allow_module_level=True)

ops = torch.ops.qkv
# (dtype, kernel path), the path being a QKV_CUDA_KERNEL value: "auto" dispatches as in production
# (the tensor-core forward where the call qualifies), "generic" forces the generic kernels, "mma"
# and "fa2" force those tensor-core kernels, which refuse (raise) a call they cannot serve instead
# of falling back; float32/float64 only have the generic kernels.
DTYPE_PATHS = [
    pytest.param(torch.float32, "auto", id="float32"),
    pytest.param(torch.float64, "auto", id="float64"),
] + [pytest.param(dtype, path, id=f"{str(dtype)[6:]}-{path}") for dtype in LOW_PRECISION
     for path in ("auto", "generic", "mma", "fa2")]
# The head dims (head_dim == value_head_dim) each forced tensor-core path serves.
FORCED_PATH_HEAD_DIMS = {"mma": (64, 128), "fa2": (64, 96, 128, 256)}


# ---- references ---------------------------------------------------------------------------------


# ---- inputs -------------------------------------------------------------------------------------


def make_qkv(shape: Shape, dtype, layout: str = "contiguous", seed: int = 0):
    return _make_qkv(shape, dtype, layout, seed, device=DEVICE)


def make_bias(kind: str, shape: Shape, dtype, seed: int = 1):
    return _make_bias(kind, shape, dtype, seed, device=DEVICE)


@pytest.fixture(autouse=True)
def poison_allocator():
    """Fill the caching allocator's free blocks with NaN (one large block, and whole 2 MB segments of
    the small-block pool) so that an output element a kernel never writes shows up as NaN."""
    if DEVICE == "cuda":
        large = torch.full((64 << 20,), float("nan"), device="cuda")
        small = [torch.full((128 << 10,), float("nan"), device="cuda") for _ in range(32)]
        del large, small
    yield


def select_kernel_path(monkeypatch, path: str) -> None:
    """QKV_CUDA_KERNEL: "auto" (production dispatch), "generic", "mma" or "fa2" (those kernels required)."""
    monkeypatch.setenv("QKV_CUDA_KERNEL", path)


def forced_path_refuses(path: str, q, k, v, bias_grad: bool = False, bias_one_key_column: bool = False) -> bool:
    """Whether QKV_CUDA_KERNEL=path must refuse this call (forward, or backward with `bias_grad`):
    the mma and fa2 paths serve float16/bfloat16, their head dims, 16-byte-aligned unit-stride rows
    (mma no bias gradient, fa2 none for a bias with one key column, which comes from row sums over
    every key). "auto" and "generic" serve everything; the CPU ignores the variable."""
    if DEVICE != "cuda" or path not in FORCED_PATH_HEAD_DIMS:
        return False
    if q.dtype not in LOW_PRECISION or q.shape[-1] != v.shape[-1] or q.shape[-1] not in FORCED_PATH_HEAD_DIMS[path]:
        return True
    if path == "mma" and bias_grad:
        return True
    if path == "fa2" and bias_grad and bias_one_key_column:
        return True

    def rows_aligned(t):
        return t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0

    return not all(rows_aligned(t) for t in (q, k, v))


# ---- forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, path", DTYPE_PATHS)
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "causal_bottom_right"])
def test_forward_matches_reference(shape, dtype, path, causal, monkeypatch):
    select_kernel_path(monkeypatch, path)
    is_causal, bottom_right = causal
    q, k, v = make_qkv(shape, dtype, seed=seed_of(shape, dtype, causal))
    if forced_path_refuses(path, q, k, v):
        with pytest.raises(RuntimeError, match="does not qualify"):
            ops.attention(q, k, v, None, 0.0, is_causal, bottom_right)
        return
    out, lse = ops.attention(q, k, v, None, 0.0, is_causal, bottom_right)
    ref, ref_lse = reference_attention(q, k, v, None, is_causal, bottom_right)
    assert out.device.type == DEVICE and out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_matches("out", out, ref, low_precision_reference(q, k, v, None, is_causal, bottom_right, dtype), dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), finite.cpu()), "lse is -inf exactly on the fully masked rows"
    lse_tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(lse.double().cpu()[finite.cpu()], ref_lse.cpu()[finite.cpu()], rtol=lse_tol, atol=lse_tol)


@pytest.mark.parametrize("layout", ["token_major", "strided", "expanded"])
@pytest.mark.parametrize("dtype, path", DTYPE_PATHS)
@pytest.mark.parametrize("shape", [Shape(2, 3, 70, 90, 64, 64), Shape(2, 2, 33, 40, 128, 128), Shape(1, 2, 9, 12, 24, 40)],
                         ids=str)
def test_forward_reads_strided_inputs(layout, dtype, path, shape, monkeypatch):
    select_kernel_path(monkeypatch, path)
    q, k, v = make_qkv(shape, dtype, layout, seed=seed_of(layout, shape))
    if forced_path_refuses(path, q, k, v):
        with pytest.raises(RuntimeError, match="does not qualify"):
            ops.attention(q, k, v, None, 0.0, True, True)
        return
    out, _ = ops.attention(q, k, v, None, 0.0, True, True)
    ref, _ = reference_attention(q, k, v, None, True, True)
    assert_matches("out", out, ref, low_precision_reference(q, k, v, None, True, True, dtype), dtype)
    # The output is a (B, H, L, Dv) view of (B, L, H, Dv) memory, exactly as the CPU and Meta kernels.
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("kind", ["full", "rows_cols", "key_padding", "per_head_row", "expanded", "masked_row"])
@pytest.mark.parametrize("dtype, path", DTYPE_PATHS)
@pytest.mark.parametrize("shape", [Shape(2, 3, 45, 70, 64, 64), Shape(3, 2, 20, 33, 128, 128), Shape(2, 2, 7, 9, 20, 12)],
                         ids=str)
def test_forward_with_bias(kind, dtype, path, shape, monkeypatch):
    select_kernel_path(monkeypatch, path)
    q, k, v = make_qkv(shape, dtype, seed=seed_of(kind, shape))
    bias = make_bias(kind, shape, dtype)
    if forced_path_refuses(path, q, k, v):
        with pytest.raises(RuntimeError, match="does not qualify"):
            ops.attention(q, k, v, bias)
        return
    out, lse = ops.attention(q, k, v, bias)
    ref, ref_lse = reference_attention(q, k, v, bias)
    assert_matches("out", out, ref, low_precision_reference(q, k, v, bias, False, False, dtype), dtype)
    assert torch.equal(torch.isneginf(lse).cpu(), torch.isneginf(ref_lse).cpu())


# (path, head dim) pairs each forced tensor-core path serves.
PATH_HEAD_DIMS = [pytest.param(path, D, id=f"{path}-D{D}") for path, dims in FORCED_PATH_HEAD_DIMS.items() for D in dims]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("path, D", PATH_HEAD_DIMS)
@pytest.mark.parametrize("layout", ["contiguous", "token_major", "expanded"])
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "causal_bottom_right"])
def test_tensor_core_forward_is_taken_and_correct(dtype, path, D, layout, causal, monkeypatch):
    if DEVICE != "cuda":
        pytest.skip("QKV_CUDA_KERNEL only steers the CUDA kernels")
    select_kernel_path(monkeypatch, path)  # an error if the call did not qualify
    is_causal, bottom_right = causal
    shape = Shape(2, 3, 129, 200, D, D)
    q, k, v = make_qkv(shape, dtype, layout, seed=seed_of(D, layout, causal))
    biases = [None, make_bias("key_padding", shape, dtype)]
    if path == "fa2":  # the general fa2 kernel: a bias per element, huge finite negative entries
        full = make_bias("full", shape, dtype)
        full[:, :, ::5] = torch.finfo(dtype).min
        biases.append(full)
    for b in biases:
        out, lse = ops.attention(q, k, v, b, 0.0, is_causal, bottom_right)
        ref, ref_lse = reference_attention(q, k, v, b, is_causal, bottom_right)
        assert_matches("out", out, ref, low_precision_reference(q, k, v, b, is_causal, bottom_right, dtype), dtype)
        finite = torch.isfinite(ref_lse).cpu()
        assert torch.equal(torch.isfinite(lse).cpu(), finite)
        torch.testing.assert_close(lse.double().cpu()[finite], ref_lse.cpu()[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("path, D", PATH_HEAD_DIMS)
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "causal_bottom_right"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_tensor_core_backward_is_taken_and_correct(dtype, path, D, causal, dropout_p, monkeypatch):
    if DEVICE != "cuda":
        pytest.skip("QKV_CUDA_KERNEL only steers the CUDA kernels")
    select_kernel_path(monkeypatch, path)  # forward and backward: an error if a call did not qualify
    is_causal, bottom_right = causal
    shape = Shape(2, 3, 100, 150, D, D)
    q, k, v = make_qkv(shape, dtype, "token_major", seed=seed_of("bwd", D, causal))
    bias = make_bias("key_padding", shape, dtype)  # read; its gradient only on fa2 (mma computes none)
    seed = draw_seed(31337)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if path == "fa2":
        bias = make_bias("rows_cols", shape, dtype).requires_grad_()
        leaves.append(bias)
    out, lse = ops.attention(*leaves[:3], bias, dropout_p, is_causal, bottom_right, None, seed)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype).to(DEVICE)
    got = torch.autograd.grad(out, leaves, grad_out)
    keep = None
    bias = bias.detach()
    if dropout_p > 0:
        keep = ops.attention_weights(q, k, bias, lse.detach(), dropout_p, is_causal, bottom_right, None, seed) != 0
    ref = reference_grads(q, k, v, bias, grad_out, is_causal, bottom_right, torch.float64, keep=keep, dropout_p=dropout_p)
    low = reference_grads(q, k, v, bias, grad_out, is_causal, bottom_right, dtype, keep=keep, dropout_p=dropout_p)
    for name, g, r, lo in zip(("dq", "dk", "dv", "dbias"), got, ref, low):
        assert_matches(name, g, r, lo, dtype)


@pytest.mark.parametrize("D", [64, 128])
def test_fa2_backward_is_deterministic_when_asked(D, monkeypatch):
    """With torch.use_deterministic_algorithms(True) the fa2 backward adds dQ's parts in a fixed
    order: gradients are bitwise identical across runs (many key blocks add into each dQ row)."""
    if DEVICE != "cuda":
        pytest.skip("QKV_CUDA_KERNEL only steers the CUDA kernels")
    select_kernel_path(monkeypatch, "fa2")
    shape = Shape(2, 4, 700, 1500, D, D)
    q, k, v = make_qkv(shape, torch.bfloat16, "token_major", seed=seed_of("det", D))
    grad_out = torch.randn((2, 4, 700, D), generator=torch.Generator().manual_seed(5)).bfloat16().to(DEVICE)

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, _ = ops.attention(*leaves, None, 0.0, True, True)
        return torch.autograd.grad(out, leaves, grad_out)

    atomic = grads()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, a, b, c in zip(("dq", "dk", "dv"), first, second, atomic):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
        torch.testing.assert_close(a.float(), c.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("path", list(FORCED_PATH_HEAD_DIMS))
def test_tensor_core_forward_refuses_calls_it_cannot_serve(path, monkeypatch):
    if DEVICE != "cuda":
        pytest.skip("QKV_CUDA_KERNEL only steers the CUDA kernels")
    select_kernel_path(monkeypatch, path)
    message = "does not qualify for the tensor-core kernel" if path == "mma" else "does not qualify for the fa2 kernels"
    for dtype, shape, layout in [(torch.float32, Shape(1, 2, 8, 8, 64, 64), "contiguous"),
                                 (torch.float16, Shape(1, 2, 8, 8, 80, 80), "contiguous"),
                                 (torch.float16, Shape(1, 2, 8, 8, 64, 32), "contiguous"),
                                 (torch.float16, Shape(1, 2, 8, 8, 64, 64), "strided")]:
        q, k, v = make_qkv(shape, dtype, layout)
        with pytest.raises(RuntimeError, match=message):
            ops.attention(q, k, v)
    if path == "mma":  # the mma backward computes no bias gradient
        shape = Shape(1, 2, 8, 8, 64, 64)
        q, k, v = (t.requires_grad_() for t in make_qkv(shape, torch.float16))
        bias = make_bias("full", shape, torch.float16).requires_grad_()
        out, _ = ops.attention(q, k, v, bias)
        with pytest.raises(RuntimeError, match="does not qualify for the tensor-core"):
            out.sum().backward()


def test_fully_masked_rows_give_zero_output_and_gradients():
    shape = Shape(2, 2, 6, 4, 16, 16)
    q, k, v = (t.requires_grad_() for t in make_qkv(shape, torch.float32, seed=9))
    # bottom-right causal with L > S: the first L - S query rows see no key at all
    out, lse = ops.attention(q, k, v, None, 0.0, True, True)
    assert torch.equal(out[:, :, :2].detach().cpu(), torch.zeros(2, 2, 2, 16))
    assert torch.isneginf(lse[:, :, :2]).all() and torch.isfinite(lse[:, :, 2:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, :2].cpu(), torch.zeros(2, 2, 2, 16))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_empty_sequences(dtype):
    q, k, v = make_qkv(Shape(2, 2, 5, 3, 8, 8), dtype)
    out, lse = ops.attention(q, k[:, :, :0], v[:, :, :0])
    assert torch.equal(out.cpu().double(), torch.zeros(2, 2, 5, 8, dtype=torch.float64))
    assert torch.isneginf(lse).all()
    out, lse = ops.attention(q[:, :, :0], k, v)
    assert out.shape == (2, 2, 0, 8) and lse.shape == (2, 2, 0)


def test_scale_argument():
    q, k, v = make_qkv(Shape(1, 2, 10, 11, 32, 32), torch.float64)
    out, _ = ops.attention(q, k, v, None, 0.0, False, False, 0.37)
    ref, _ = reference_attention(q, k, v, scale=0.37)
    assert_matches("out", out, ref, None, torch.float64)


# ---- backward -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [Shape(2, 2, 37, 45, 64, 64), Shape(1, 3, 70, 33, 128, 128), Shape(2, 2, 19, 21, 13, 29),
                                   Shape(1, 1, 1, 9, 256, 256), Shape(1, 2, 40, 40, 200, 72)], ids=str)
@pytest.mark.parametrize("dtype, path", DTYPE_PATHS)
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "causal_bottom_right"])
@pytest.mark.parametrize("bias_kind", ["none", "full", "key_padding", "rows_cols", "per_head_row"])
def test_gradients_match_reference(shape, dtype, path, causal, bias_kind, monkeypatch):
    select_kernel_path(monkeypatch, path)
    is_causal, bottom_right = causal
    q, k, v = make_qkv(shape, dtype, "token_major", seed=seed_of(shape, dtype, causal, bias_kind))
    bias = make_bias(bias_kind, shape, dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    grad_out = torch.randn((shape.B, shape.H, shape.L, shape.Dv), generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64).to(dtype).to(DEVICE)
    one_key_column = b is not None and (b.shape[-1] == 1 or shape.S == 1)
    if forced_path_refuses(path, q, k, v, bias_grad=b is not None, bias_one_key_column=one_key_column):
        with pytest.raises(RuntimeError, match="does not qualify"):
            out, _ = ops.attention(*leaves, b, 0.0, is_causal, bottom_right)
            torch.autograd.grad(out, leaves + ([b] if b is not None else []), grad_out)
        return
    out, _ = ops.attention(*leaves, b, 0.0, is_causal, bottom_right)
    got = torch.autograd.grad(out, leaves + ([b] if b is not None else []), grad_out)
    ref = reference_grads(q, k, v, bias, grad_out, is_causal, bottom_right, torch.float64)
    low = reference_grads(q, k, v, bias, grad_out, is_causal, bottom_right, dtype) if dtype in LOW_PRECISION else [None] * 4
    for name, g, r, lo in zip(("dq", "dk", "dv", "dbias"), got, ref, low):
        assert g.shape == r.shape and g.dtype == dtype
        assert_matches(name, g, r, lo, dtype)


@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "causal_bottom_right"])
@pytest.mark.parametrize("bias_kind", ["none", "rows_cols", "key_padding", "per_head_row"])
def test_gradcheck_float64(causal, bias_kind):
    is_causal, bottom_right = causal
    shape = Shape(2, 2, 5, 7, 6, 4)
    q, k, v = (t.requires_grad_() for t in make_qkv(shape, torch.float64, seed=13))
    bias = make_bias(bias_kind, shape, torch.float64)
    inputs = (q, k, v)
    if bias is not None and bias_kind != "key_padding":  # -inf entries have no finite-difference gradient
        bias = bias.detach().clone().requires_grad_()
        inputs = inputs + (bias,)

    def fn(*args):
        b = args[3] if len(args) > 3 else bias
        return ops.attention(args[0], args[1], args[2], b, 0.0, is_causal, bottom_right)[0]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64_with_dropout():
    shape = Shape(1, 2, 6, 8, 5, 5)
    q, k, v = (t.requires_grad_() for t in make_qkv(shape, torch.float64, seed=17))
    seed = torch.tensor(12345)
    assert torch.autograd.gradcheck(
        lambda q, k, v: ops.attention(q, k, v, None, 0.3, True, False, None, seed)[0], (q, k, v), eps=1e-6, atol=1e-5)


# ---- dropout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_dropout_masks_identical_on_cpu_and_cuda(dtype):
    shape = Shape(2, 3, 37, 70, 64, 64)
    q, k, v = make_qkv(shape, dtype, seed=19)
    bias = make_bias("rows_cols", shape, dtype)
    seed = draw_seed(987654321)
    for is_causal, bottom_right in CAUSAL:
        _, lse = ops.attention(q, k, v, bias, 0.25, is_causal, bottom_right, None, seed)
        w_dev = ops.attention_weights(q, k, bias, lse, 0.25, is_causal, bottom_right, None, seed)
        qc, kc, bc = q.cpu(), k.cpu(), bias.cpu()
        _, lse_cpu = ops.attention(qc, kc, v.cpu(), bc, 0.25, is_causal, bottom_right, None, seed)
        w_cpu = ops.attention_weights(qc, kc, bc, lse_cpu, 0.25, is_causal, bottom_right, None, seed)
        probs, _ = reference_probs(q, k, bias, is_causal, bottom_right)
        visible = (probs > 0).cpu()
        # Same hash, same seed: the same probabilities are dropped on both devices.
        assert torch.equal((w_dev.cpu() == 0) & visible, (w_cpu == 0) & visible)
        tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(w_dev.cpu().double(), w_cpu.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, path", DTYPE_PATHS)
def test_dropout_output_uses_the_weights_mask(dtype, path, monkeypatch):
    select_kernel_path(monkeypatch, path)
    shape = Shape(2, 2, 50, 130, 64, 64) if dtype in LOW_PRECISION else Shape(2, 2, 50, 130, 48, 40)
    q, k, v = make_qkv(shape, dtype, seed=23)
    seed, p = draw_seed(4242), 0.4
    if forced_path_refuses(path, q, k, v):
        with pytest.raises(RuntimeError, match="does not qualify"):
            ops.attention(q, k, v, None, p, True, True, None, seed)
        return
    out, lse = ops.attention(q, k, v, None, p, True, True, None, seed)
    weights = ops.attention_weights(q, k, None, lse, p, True, True, None, seed)
    probs, _ = reference_probs(q, k, None, True, True)
    keep = weights != 0
    ref, _ = reference_attention(q, k, v, None, True, True, keep=keep, dropout_p=p)
    low = low_precision_reference(q, k, v, None, True, True, dtype, keep=keep, dropout_p=p)
    assert_matches("out", out, ref, low, dtype)
    # Kept weights are the probabilities scaled by 1 / (1 - p).
    kept = keep & (probs > 0)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(weights[kept].double().cpu(), (probs[kept] / (1 - p)).cpu(), rtol=tol, atol=tol)


def test_dropout_statistics():
    shape = Shape(4, 2, 256, 256, 32, 32)
    q, k, v = make_qkv(shape, torch.float32, seed=29)
    for p in (0.1, 0.5, 0.9):
        _, lse = ops.attention(q, k, v, None, p, False, False, None, draw_seed(7))
        w = ops.attention_weights(q, k, None, lse, p, False, False, None, draw_seed(7))
        dropped = (w == 0).double().mean().item()
        n = w.numel()
        assert abs(dropped - p) < 6 * math.sqrt(p * (1 - p) / n) + 1e-9, f"p={p}: dropped fraction {dropped}"
        # Unbiased: the expected row sum of the dropped-out weights is 1.
        assert abs(w.double().sum(-1).mean().item() - 1.0) < 0.04  # about 6 standard deviations at p = 0.9
    # A different seed gives a different mask.
    _, lse = ops.attention(q, k, v, None, 0.5, False, False, None, draw_seed(1))
    w1 = ops.attention_weights(q, k, None, lse, 0.5, False, False, None, draw_seed(1))
    w2 = ops.attention_weights(q, k, None, lse, 0.5, False, False, None, draw_seed(2))
    assert not torch.equal(w1 == 0, w2 == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_dropout_gradients_match_reference(dtype):
    shape = Shape(2, 2, 33, 47, 64, 64)
    q, k, v = make_qkv(shape, dtype, seed=31)
    bias = make_bias("rows_cols", shape, dtype)
    seed, p = draw_seed(99), 0.3
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b = bias.detach().clone().requires_grad_()
    out, lse = ops.attention(*leaves, b, p, True, False, None, seed)
    keep = ops.attention_weights(q, k, bias, lse.detach(), p, True, False, None, seed) != 0
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype).to(DEVICE)
    got = torch.autograd.grad(out, leaves + [b], grad_out)
    ref = reference_grads(q, k, v, bias, grad_out, True, False, torch.float64, keep=keep, dropout_p=p)
    low = reference_grads(q, k, v, bias, grad_out, True, False, dtype, keep=keep, dropout_p=p) \
        if dtype in LOW_PRECISION else [None] * 4
    for name, g, r, lo in zip(("dq", "dk", "dv", "dbias"), got, ref, low):
        assert_matches(name, g, r, lo, dtype)


# ---- attention weights --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "causal_bottom_right"])
def test_attention_weights_match_reference(dtype, causal):
    is_causal, bottom_right = causal
    shape = Shape(2, 2, 45, 38, 24, 24)
    q, k, v = make_qkv(shape, dtype, "token_major", seed=37)
    bias = make_bias("per_head_row", shape, dtype)
    _, lse = ops.attention(q, k, v, bias, 0.0, is_causal, bottom_right)
    w = ops.attention_weights(q, k, bias, lse, 0.0, is_causal, bottom_right)
    ref, _ = reference_probs(q, k, bias, is_causal, bottom_right)
    low = reference_probs(q, k, bias, is_causal, bottom_right, dtype=dtype)[0] if dtype in LOW_PRECISION else None
    assert w.is_contiguous() and w.shape == (2, 2, 45, 38)
    assert_matches("weights", w, ref, low, dtype)


def test_attention_weights_gradients():
    shape = Shape(1, 2, 6, 5, 4, 4)
    q, k, _ = make_qkv(shape, torch.float64, seed=41)
    bias = make_bias("rows_cols", shape, torch.float64).requires_grad_()
    q.requires_grad_()
    k.requires_grad_()

    def fn(q, k, bias):
        _, lse = ops.attention(q.detach(), k.detach(), k.detach(), bias.detach(), 0.0, True, False)
        return ops.attention_weights(q, k, bias, lse, 0.0, True, False)

    w = fn(q, k, bias)
    ref, _ = reference_probs(q, k, bias, True, False)
    gw = torch.randn_like(w)
    got = torch.autograd.grad(w, (q, k, bias), gw)
    want = torch.autograd.grad(ref, (q, k, bias), gw)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


# ---- opcheck ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(dtype, requires_grad):
    shape = Shape(2, 2, 9, 11, 64, 64)
    q, k, v = (t.requires_grad_(requires_grad) for t in make_qkv(shape, dtype, "token_major", seed=43))
    bias = make_bias("rows_cols", shape, dtype).requires_grad_(requires_grad)
    seed = draw_seed(5)
    torch.library.opcheck(ops.attention.default, (q, k, v, bias, 0.0, True, False, None, None))
    torch.library.opcheck(ops.attention.default, (q, k, v, None, 0.2, False, False, 0.5, seed))
    out, lse = ops.attention(q.detach(), k.detach(), v.detach(), bias.detach(), 0.1, True, True, None, seed)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(ops.attention_backward.default,
                          (grad_out, q.detach(), k.detach(), v.detach(), bias.detach(), out, lse, 0.1, True, True, None,
                           seed, True))
    torch.library.opcheck(ops.attention_weights.default, (q, k, bias, lse, 0.1, True, True, None, seed))


# ---- errors -------------------------------------------------------------------------------------


def test_head_dim_limit_is_a_clear_error():
    if DEVICE != "cuda":
        pytest.skip("the 256 head-dim limit is specific to the CUDA kernels")
    q = torch.randn(1, 1, 4, 300, device="cuda")
    with pytest.raises(RuntimeError, match="at most 256"):
        ops.attention(q, q, q)


def test_mixed_devices_are_a_clear_error():
    if DEVICE != "cuda":
        pytest.skip("needs two devices")
    q = torch.randn(1, 1, 4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="key must be on the query's device"):
        ops.attention(q, q.cpu(), q)
    with pytest.raises(RuntimeError, match="bias must be on the query's device"):
        ops.attention(q, q, q, torch.zeros(4, 4))


# ---- the projection ops -------------------------------------------------------------------------


def projection_weights(E: int, kdim: int, dtype, seed: int = 47):
    g = torch.Generator().manual_seed(seed)

    def rand(*size):
        return (torch.randn(*size, generator=g, dtype=torch.float64) / math.sqrt(size[-1])).to(dtype)

    return dict(in_proj_weight=rand(3 * E, E), in_proj_bias=rand(3 * E), out_proj_weight=rand(E, E),
                out_proj_bias=rand(E), q_proj_weight=rand(E, E), k_proj_weight=rand(E, kdim), v_proj_weight=rand(E, kdim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_projection_ops_match_cpu(dtype):
    N, L, S, E, kdim, heads = 2, 13, 17, 32, 24, 4
    g = torch.Generator().manual_seed(53)
    x = torch.randn(N, L, E, generator=g, dtype=dtype)
    mem = torch.randn(N, S, kdim, generator=g, dtype=dtype)
    kv = torch.randn(N, S, E, generator=g, dtype=dtype)
    attn_bias = torch.randn(L, S, generator=g, dtype=dtype)
    w = projection_weights(E, kdim, dtype)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)

    def both(fn, *tensors):
        cpu = fn(*tensors)
        dev = fn(*(t.to(DEVICE) for t in tensors))
        torch.testing.assert_close(dev.cpu(), cpu, **tol)

    both(lambda x, wi, bi, wo, bo: ops.masked_self_attention(x, heads, wi, bi, wo, bo), x, w["in_proj_weight"],
         w["in_proj_bias"], w["out_proj_weight"], w["out_proj_bias"])
    both(lambda x, kv, wi, bi, wo, bo, ab: ops.multi_head_attention(x, kv, kv, heads, wi, bi, wo, bo, ab), x, kv,
         w["in_proj_weight"], w["in_proj_bias"], w["out_proj_weight"], w["out_proj_bias"], attn_bias)
    both(lambda x, m, wq, wk, wv, bi, wo, bo: ops.cross_attention(x, m, heads, wq, wk, wv, bi, wo, bo), x, mem,
         w["q_proj_weight"], w["k_proj_weight"], w["v_proj_weight"], w["in_proj_bias"], w["out_proj_weight"],
         w["out_proj_bias"])


def test_projection_op_gradients_match_cpu():
    N, L, E, heads = 2, 11, 32, 2
    g = torch.Generator().manual_seed(59)
    x = torch.randn(N, L, E, generator=g, dtype=torch.float64)
    w = projection_weights(E, E, torch.float64)
    params = [x, w["in_proj_weight"], w["in_proj_bias"], w["out_proj_weight"], w["out_proj_bias"]]

    def grads(device):
        leaves = [t.to(device).requires_grad_() for t in params]
        out = ops.masked_self_attention(leaves[0], heads, *leaves[1:])
        return torch.autograd.grad(out.square().sum(), leaves)

    for got, want in zip(grads(DEVICE), grads("cpu")):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-10)
