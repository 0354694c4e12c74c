"""What only the CUDA kernels have, against the plain float64 references of reference.py: the kernel
paths (QKV_CUDA_KERNEL = auto, generic, mma, fa2) and which calls each forced path must refuse,
the tensor-core kernels of each head dim, fa2's deterministic backward, the opt-in split-KV decode
forward (QKV_CUDA_DECODE=split-required: decode shapes, split counts, the KV-cache door, fallback and
refusal), CUDA-only limits and errors, and agreement with the CPU kernels (dropout masks, projection ops).

Everything else the ops promise is checked on the GPU by the core tests themselves, which run on
every device (conftest.py's `device` fixture: test_core_*.py, test_features_*.py, test_varlen.py,
test_kvcache.py); `make gpu-check` runs both (`-m "not cpu"`).

Skipped when no GPU is available: this file tests a different machine. On a machine without a
GPU, ``QKV_CUDA_TEST_DEVICE=cpu`` runs the same checks against the CPU kernels, which validates
the references and tolerances of this file itself (the CUDA-only path switch is then a no-op).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import qkv  # noqa: F401  (registers torch.ops.qkv)
from reference import (ALL_DTYPES, CAUSAL, LOW_PRECISION, SHAPES, Shape, assert_matches, dropout_seed,
                       feature_reference, low_precision_reference, reference_attention, reference_grads,
                       reference_probs, seed_of)
from reference import make_bias as _make_bias
from reference import make_qkv as _make_qkv

pytestmark = pytest.mark.cuda
DEVICE = os.environ.get("QKV_CUDA_TEST_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA kernels run on a GPU machine", allow_module_level=True)

ops = torch.ops.qkv
# (dtype, kernel path), the path being a QKV_CUDA_KERNEL value: "auto" dispatches as in production
# (the fa2 kernels where the call qualifies, else mma, else generic), "generic" forces the generic kernels, "mma"
# and "fa2" force those tensor-core kernels, which refuse (raise) a call they cannot serve instead
# of falling back; float32/float64 only have the generic kernels.
DTYPE_PATHS = [
    pytest.param(torch.float32, "auto", id="float32"),
    pytest.param(torch.float64, "auto", id="float64"),
] + [pytest.param(dtype, path, id=f"{str(dtype)[6:]}-{path}") for dtype in LOW_PRECISION
     for path in ("auto", "generic", "mma", "fa2")]
# The head dims (head_dim == value_head_dim) each forced tensor-core path serves.
FORCED_PATH_HEAD_DIMS = {"mma": (64, 128), "fa2": (64, 96, 128, 256)}


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
    ref, ref_lse = feature_reference(q, k, v, None, is_causal, bottom_right)
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
    ref = reference_attention(q, k, v, None, True, True)
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
    ref, ref_lse = feature_reference(q, k, v, bias)
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
        ref, ref_lse = feature_reference(q, k, v, b, is_causal, bottom_right)
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
    seed = dropout_seed(31337)
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


# ---- dropout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_dropout_masks_identical_on_cpu_and_cuda(dtype):
    shape = Shape(2, 3, 37, 70, 64, 64)
    q, k, v = make_qkv(shape, dtype, seed=19)
    bias = make_bias("rows_cols", shape, dtype)
    seed = dropout_seed(987654321)
    for is_causal, bottom_right in CAUSAL:
        _, lse = ops.attention(q, k, v, bias, 0.25, is_causal, bottom_right, None, seed)
        w_dev = ops.attention_weights(q, k, bias, lse, 0.25, is_causal, bottom_right, None, seed)
        qc, kc, bc = q.cpu(), k.cpu(), bias.cpu()
        _, lse_cpu = ops.attention(qc, kc, v.cpu(), bc, 0.25, is_causal, bottom_right, None, seed)
        w_cpu = ops.attention_weights(qc, kc, bc, lse_cpu, 0.25, is_causal, bottom_right, None, seed)
        probs = reference_probs(q, k, bias, is_causal, bottom_right)
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
    seed, p = dropout_seed(4242), 0.4
    if forced_path_refuses(path, q, k, v):
        with pytest.raises(RuntimeError, match="does not qualify"):
            ops.attention(q, k, v, None, p, True, True, None, seed)
        return
    out, lse = ops.attention(q, k, v, None, p, True, True, None, seed)
    weights = ops.attention_weights(q, k, None, lse, p, True, True, None, seed)
    probs = reference_probs(q, k, None, True, True)
    keep = weights != 0
    ref = reference_attention(q, k, v, None, True, True, keep=keep, dropout_p=p)
    low = low_precision_reference(q, k, v, None, True, True, dtype, keep=keep, dropout_p=p)
    assert_matches("out", out, ref, low, dtype)
    # Kept weights are the probabilities scaled by 1 / (1 - p).
    kept = keep & (probs > 0)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(weights[kept].double().cpu(), (probs[kept] / (1 - p)).cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_dropout_gradients_match_reference(dtype):
    shape = Shape(2, 2, 33, 47, 64, 64)
    q, k, v = make_qkv(shape, dtype, seed=31)
    bias = make_bias("rows_cols", shape, dtype)
    seed, p = dropout_seed(99), 0.3
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
    ref = reference_probs(q, k, bias, is_causal, bottom_right)
    low = reference_probs(q, k, bias, is_causal, bottom_right, dtype=dtype) if dtype in LOW_PRECISION else None
    assert w.is_contiguous() and w.shape == (2, 2, 45, 38)
    assert_matches("weights", w, ref, low, dtype)


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


# ---- issue 17's options: GQA/MQA, windows, softcap, ALiBi, varlen, KV cache (generic kernels) --------

from reference import alibi_slopes as _alibi_slopes  # noqa: E402
from reference import feature_reference, kvcache_reference, varlen_reference  # noqa: E402

FEATURE_TOL = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-4, 1e-4), torch.float16: (2e-2, 2e-2),
               torch.bfloat16: (8e-2, 8e-2)}
# (nheads, nheads_k, window, softcap, ALiBi (None, "h", "bh"), causal): GQA 4:1 and MQA, windows
# narrower and wider than a tile, rows that see nothing (a (0, 0) window with seqlen_q > seqlen_k).
FEATURE_CASES = {
    "gqa4_window_narrow": (8, 2, (5, 3), 0.0, None, False),
    "mqa_softcap_causal": (4, 1, (-1, -1), 5.0, None, True),
    "alibi_bh_window_wide": (4, 4, (70, -1), 0.0, "bh", True),
    "alibi_h_softcap_gqa": (6, 3, (-1, 2), 3.0, "h", False),
    "rows_see_nothing": (2, 1, (0, 0), 0.0, None, False),
}


def feature_close(name, got, want, dtype):
    rtol, atol = FEATURE_TOL[dtype]
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(got.double().cpu(), want.double(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{name}: {m}")


def feature_inputs(B, Hq, Hk, L, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, H, D, generator=g, dtype=torch.float64)
               for n, H in ((L, Hq), (S, Hk), (S, Hk)))
    return [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("case", list(FEATURE_CASES))
@pytest.mark.parametrize("LS", [(33, 65), (70, 31), (1, 40)], ids=lambda x: f"L{x[0]}S{x[1]}")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("path", ["auto", "generic"])
def test_flash_attn_features_match_reference(case, LS, dtype, path, monkeypatch):
    """flash_attn_func with each option, forced onto the generic kernels and through the production
    dispatch (which takes them for these options), output and gradients against the float64 reference."""
    select_kernel_path(monkeypatch, path)
    Hq, Hk, window, softcap, slope_kind, causal = FEATURE_CASES[case]
    L, S = LS
    B, D = 2, 64
    slopes = None if slope_kind is None else _alibi_slopes(Hq, B if slope_kind == "bh" else None)
    q, k, v = feature_inputs(B, Hq, Hk, L, S, D, dtype, seed=seed_of(case, LS))
    out = qkv.flash_attn_func(q, k, v, softmax_scale=0.2, causal=causal, window_size=window, softcap=softcap,
                              alibi_slopes=None if slopes is None else slopes.to(DEVICE))
    leaves = [t.detach().cpu().double().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    want, _ = feature_reference(*leaves, is_causal=causal, bottom_right=True, scale=0.2, window=window,
                                softcap=softcap, alibi_slopes=slopes)
    feature_close("out", out, want.transpose(1, 2), dtype)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.backward(grad_out.to(DEVICE, dtype))
    want_grads = torch.autograd.grad(want, leaves, grad_out.transpose(1, 2))
    for name, t, w in zip(("dq", "dk", "dv"), (q, k, v), want_grads):
        feature_close(name, t.grad, w.transpose(1, 2), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_varlen_matches_reference(dtype, causal):
    """Packed sequences, empty ones included (no queries; no keys: rows that see nothing), GQA 2:1,
    a window and ALiBi; rows past the last offset stay zero."""
    lengths = [(5, 7), (0, 3), (40, 33), (6, 0), (17, 70), (1, 1)]
    cu_q = torch.tensor([0] + list(torch.tensor([a for a, _ in lengths]).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor([b for _, b in lengths]).cumsum(0)), dtype=torch.int32)
    H, Hk, D = 4, 2, 32
    g = torch.Generator().manual_seed(7)
    q = torch.randn(int(cu_q[-1]) + 3, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(int(cu_k[-1]), Hk, D, generator=g, dtype=torch.float64)
    v = torch.randn(int(cu_k[-1]), Hk, D, generator=g, dtype=torch.float64)
    slopes = _alibi_slopes(H, len(lengths))
    dq, dk, dv = (t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v))
    out = qkv.flash_attn_varlen_func(dq, dk, dv, cu_q.to(DEVICE), cu_k.to(DEVICE), 40, 70, softmax_scale=0.3,
                                     causal=causal, window_size=(20, -1), alibi_slopes=slopes.to(DEVICE))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want, _ = varlen_reference(*leaves, cu_q, cu_k, scale=0.3, is_causal=causal, bottom_right=True, window=(20, -1),
                               alibi_slopes=slopes)
    feature_close("out", out, want, dtype)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad_out.to(DEVICE, dtype))
    for name, t, w in zip(("dq", "dk", "dv"), (dq, dk, dv), torch.autograd.grad(want, leaves, grad_out)):
        feature_close(name, t.grad, w, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("seqlen_new", [1, 4])
def test_flash_attn_with_kvcache_matches_reference(dtype, seqlen_new):
    """Decoding with GQA 4:1: the new keys are written into the caches at cache_seqlens[b], then each
    batch element attends to its first cache_seqlens[b] + seqlen_new keys (bottom-right aligned)."""
    B, H, Hk, D, cache = 3, 8, 2, 64, 96
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, seqlen_new, H, D, generator=g, dtype=torch.float64)
    k_cache = torch.randn(B, cache, Hk, D, generator=g, dtype=torch.float64)
    v_cache = torch.randn(B, cache, Hk, D, generator=g, dtype=torch.float64)
    k_new = torch.randn(B, seqlen_new, Hk, D, generator=g, dtype=torch.float64)
    v_new = torch.randn(B, seqlen_new, Hk, D, generator=g, dtype=torch.float64)
    cache_seqlens = torch.tensor([0, 37, cache - seqlen_new], dtype=torch.int32)
    kc, vc = k_cache.to(DEVICE, dtype), v_cache.to(DEVICE, dtype)
    out = qkv.flash_attn_with_kvcache(q.to(DEVICE, dtype), kc, vc, k_new.to(DEVICE, dtype), v_new.to(DEVICE, dtype),
                                      cache_seqlens=cache_seqlens.to(DEVICE), softmax_scale=0.125, causal=True,
                                      window_size=(50, -1), softcap=4.0)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    want, _, k_after, v_after = kvcache_reference(t(q), t(k_cache), t(v_cache), t(k_new), t(v_new), cache_seqlens,
                                                  is_causal=True, scale=0.125, window=(50, -1), softcap=4.0)
    feature_close("out", out, t(want), dtype)
    feature_close("k_cache", kc, t(k_after), dtype)
    feature_close("v_cache", vc, t(v_after), dtype)


@pytest.mark.parametrize("path", ["mma", "fa2"])
def test_forced_fast_path_names_the_generic_only_option(path, monkeypatch):
    """The mma and fa2 kernels do not implement issue 17's options: forcing them is an error that
    names the option (never a silent fallback or a wrong answer)."""
    if DEVICE != "cuda":
        pytest.skip("QKV_CUDA_KERNEL only steers the CUDA kernels")
    select_kernel_path(monkeypatch, path)
    q, k, v = (t.detach() for t in feature_inputs(1, 4, 1, 16, 16, 64, torch.float16, seed=1))
    with pytest.raises(RuntimeError, match="grouped key/value heads"):
        qkv.flash_attn_func(q, k, v)
    q, k, v = (t.detach() for t in feature_inputs(1, 4, 4, 16, 16, 64, torch.float16, seed=1))
    with pytest.raises(RuntimeError, match="softcap"):
        qkv.flash_attn_func(q, k, v, softcap=2.0)
    with pytest.raises(RuntimeError, match="window_size"):
        qkv.flash_attn_func(q, k, v, window_size=(4, 4))
    with pytest.raises(RuntimeError, match="alibi_slopes"):
        qkv.flash_attn_func(q, k, v, alibi_slopes=_alibi_slopes(4).to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_varlen_dropout_masks_identical_on_cpu_and_cuda(dtype):
    """The dropout counter of packed sequences (logical sequence index, max_seqlen strides) is the CPU
    kernel's: same seed, same output and gradients."""
    if DEVICE != "cuda":
        pytest.skip("compares the CUDA kernels with the CPU kernels")
    lengths = [(5, 7), (0, 3), (40, 33), (17, 70)]
    cu_q = torch.tensor([0] + list(torch.tensor([a for a, _ in lengths]).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor([b for _, b in lengths]).cumsum(0)), dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(int(cu_q[-1]), 4, 32, generator=g).to(dtype)
    k = torch.randn(int(cu_k[-1]), 2, 32, generator=g).to(dtype)
    v = torch.randn(int(cu_k[-1]), 2, 32, generator=g).to(dtype)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.detach().to(device).requires_grad_() for t in (q, k, v)]
        out, _ = ops.attention_varlen(*leaves, cu_q.to(device), cu_k.to(device), 40, 70, 0.3, True, True, 0.2,
                                      torch.tensor(99), 25, -1, 0.0, None)
        out.backward(torch.ones_like(out))
        results.append([out.detach().cpu().double()] + [t.grad.cpu().double() for t in leaves])
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


# ---- the split-KV decode forward (QKV_CUDA_DECODE, opt-in; csrc/cuda/decode_kernels.cuh) ------------

# (B, H, Hk, L, S, D): MHA with one row per block, a GQA group of 4 sharing a block, 8 heads x 4
# rows in four row chunks, odd S, head dims of every lanes-per-key choice.
DECODE_CASES = {
    "mha_L1": (1, 16, 16, 1, 4099, 128),
    "gqa4_L1": (3, 8, 2, 1, 1000, 64),
    "gqa8_L4": (2, 16, 2, 4, 777, 128),
    "mha_L3_d256": (2, 4, 4, 3, 301, 256),
    "mqa_L1_d32": (2, 6, 1, 1, 515, 32),
}


def select_decode(monkeypatch, mode: str, splits=None) -> None:
    """QKV_CUDA_DECODE=mode ("split-required": the split kernel must serve the call) and
    QKV_DECODE_SPLITS (None: the heuristic). The CPU kernels ignore both."""
    monkeypatch.setenv("QKV_CUDA_DECODE", mode)
    if splits is None:
        monkeypatch.delenv("QKV_DECODE_SPLITS", raising=False)
    else:
        monkeypatch.setenv("QKV_DECODE_SPLITS", str(splits))


def decode_inputs(B, H, Hk, L, S, D, dtype, seed):
    """Token-major q, k, v ((B, H, L, D) views of (B, L, H, D) memory), requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, h, D, generator=g, dtype=torch.float64) for n, h in ((L, H), (S, Hk), (S, Hk)))
    return [t.to(DEVICE, dtype).transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("case", list(DECODE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "causal_bottom_right"])
@pytest.mark.parametrize("splits", [None, 1, 7, 256])
def test_split_decode_matches_reference_and_generic(case, dtype, causal, splits, monkeypatch):
    """Output and logsumexp of the split decode forward against the float64 reference and the generic
    forward, and the gradients the backward computes from that logsumexp."""
    B, H, Hk, L, S, D = DECODE_CASES[case]
    is_causal, bottom_right = causal
    q, k, v = decode_inputs(B, H, Hk, L, S, D, dtype, seed=seed_of("decode", case, str(dtype)))
    select_decode(monkeypatch, "split-required", splits)
    out, lse = ops.attention(q, k, v, None, 0.0, is_causal, bottom_right, 0.1)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    want, want_lse = feature_reference(*leaves, None, is_causal, bottom_right, 0.1)
    feature_close("out", out, want, dtype)
    assert torch.equal(torch.isneginf(lse).cpu(), torch.isneginf(want_lse)), "lse -inf exactly on hidden rows"
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.double().cpu()[finite], want_lse.detach()[finite], rtol=1e-4, atol=1e-4)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad_out.to(DEVICE, dtype))
    for name, g, w in zip(("dq", "dk", "dv"), got, torch.autograd.grad(want, leaves, grad_out)):
        feature_close(name, g, w, dtype)
    select_decode(monkeypatch, "generic")
    generic_out, generic_lse = ops.attention(q, k, v, None, 0.0, is_causal, bottom_right, 0.1)
    feature_close("out vs generic", out, generic_out.detach().cpu(), dtype)
    torch.testing.assert_close(lse[finite.to(lse.device)], generic_lse[finite.to(lse.device)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seqlen_new", [1, 4])
@pytest.mark.parametrize("splits", [None, 3])
def test_split_decode_kv_cache_matches_reference(dtype, seqlen_new, splits, monkeypatch):
    """The KV-cache door on the split decode forward: GQA 4:1, per-batch lengths from an empty cache
    to a full one, a window and softcap."""
    select_decode(monkeypatch, "split-required", splits)
    B, H, Hk, D, cache = 4, 8, 2, 128, 2000
    g = torch.Generator().manual_seed(21)
    q = torch.randn(B, seqlen_new, H, D, generator=g, dtype=torch.float64)
    k_cache = torch.randn(B, cache, Hk, D, generator=g, dtype=torch.float64)
    v_cache = torch.randn(B, cache, Hk, D, generator=g, dtype=torch.float64)
    k_new = torch.randn(B, seqlen_new, Hk, D, generator=g, dtype=torch.float64)
    v_new = torch.randn(B, seqlen_new, Hk, D, generator=g, dtype=torch.float64)
    cache_seqlens = torch.tensor([0, 37, 1500, cache - seqlen_new], dtype=torch.int32)
    for window, softcap in (((-1, -1), 0.0), ((700, -1), 4.0)):
        kc, vc = k_cache.to(DEVICE, dtype), v_cache.to(DEVICE, dtype)
        out = qkv.flash_attn_with_kvcache(q.to(DEVICE, dtype), kc, vc, k_new.to(DEVICE, dtype),
                                          v_new.to(DEVICE, dtype), cache_seqlens=cache_seqlens.to(DEVICE),
                                          softmax_scale=0.08, causal=True, window_size=window, softcap=softcap)
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        want, _, _, _ = kvcache_reference(t(q), t(k_cache), t(v_cache), t(k_new), t(v_new), cache_seqlens,
                                          is_causal=True, scale=0.08, window=window, softcap=softcap)
        feature_close("out", out, t(want), dtype)


def test_split_decode_falls_back_or_refuses(monkeypatch):
    """QKV_CUDA_DECODE=split leaves a call it does not serve to the usual dispatch (float64, prefill-
    sized q_len, dropout, head dims not a multiple of 8); split-required raises for it; bad values of
    the variables are clear errors."""
    if DEVICE != "cuda":
        pytest.skip("QKV_CUDA_DECODE only steers the CUDA kernels")
    calls = [(torch.float64, 1, 64, 0.0), (torch.bfloat16, 40, 64, 0.0), (torch.bfloat16, 1, 60, 0.0)]
    for dtype, L, D, dropout in calls:
        q, k, v = (t.detach() for t in decode_inputs(2, 4, 4, L, 300, D, dtype, seed=3))
        select_decode(monkeypatch, "split")
        out, _ = ops.attention(q, k, v, None, dropout, True, True)
        want, _ = feature_reference(q.cpu(), k.cpu(), v.cpu(), None, True, True)
        feature_close("out", out, want, dtype)
        select_decode(monkeypatch, "split-required")
        with pytest.raises(RuntimeError, match="does not qualify for the split decode"):
            ops.attention(q, k, v, None, dropout, True, True)
    q, k, v = (t.detach() for t in decode_inputs(1, 4, 4, 1, 300, 64, torch.bfloat16, seed=4))
    with pytest.raises(RuntimeError, match="does not qualify for the split decode"):
        ops.attention(q, k, v, None, 0.1, False, False, None, dropout_seed(5))
    monkeypatch.setenv("QKV_CUDA_DECODE", "splitt")
    with pytest.raises(RuntimeError, match="QKV_CUDA_DECODE must be generic, split or split-required"):
        ops.attention(q, k, v)
    for bad in ("0", "257", "x", "4x"):
        select_decode(monkeypatch, "split", bad)
        with pytest.raises(RuntimeError, match="QKV_DECODE_SPLITS must be an integer from 1 to 256"):
            ops.attention(q, k, v)
    # A forced tensor-core path keeps its own contract: QKV_CUDA_DECODE does not take its calls.
    select_decode(monkeypatch, "split-required")
    monkeypatch.setenv("QKV_CUDA_KERNEL", "fa2")
    out, _ = ops.attention(q, k, v)
    feature_close("out", out, feature_reference(q.cpu(), k.cpu(), v.cpu())[0], torch.bfloat16)


# ---- the sm90 (Hopper) forward: opt-in, QKV_CUDA_KERNEL=sm90 ------------------------------------
# sm_90a code (wgmma, TMA, mbarriers: csrc/cuda/sm90_forward.cuh), so it runs on compute capability
# 9.0 only; csrc/cuda/sm90_plan.h says which calls it serves (tests/test_cuda_sm90_plan.py checks
# that on the CPU). Every case prints its errors (and fa2's on the same inputs), and a mismatch
# reports where it is, so one GPU run is enough to debug a wrong answer (scripts/gpu_lease.sh's sm90
# step runs `-k sm90 -s`). The backward after an sm90 forward is auto's (it reads the logsumexp).

# (B, H, Hk, L, S): one query and key, L and S off every tile size, S != L both ways, several blocks.
SM90_SHAPES = [(1, 2, 2, 1, 1), (2, 3, 3, 77, 77), (1, 2, 2, 300, 300), (1, 2, 2, 1000, 1000), (2, 2, 2, 77, 300),
               (1, 2, 2, 300, 77), (1, 4, 4, 1000, 129)]


def require_sm90_gpu():
    if DEVICE != "cuda":
        pytest.skip("QKV_CUDA_KERNEL only steers the CUDA kernels")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        pytest.skip(f"the sm90 forward is sm_90a code (compute capability 9.0, H100/H200); this GPU is {major}.{minor}")


def mismatch_report(name, got, want, atol):
    """Where `got` is off `want` (both indexed (b, h, i[, j])): the largest error and its index, the
    first element off by more than atol, and which query rows (128-row blocks, 64-row warpgroup
    halves) and columns hold the errors."""
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    both_inf = torch.isinf(got64) & torch.isinf(want64) & (torch.sign(got64) == torch.sign(want64))
    diff = torch.where(both_inf, torch.zeros_like(got64), (got64 - want64).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    lines = [f"{name}: shape {tuple(got.shape)}, non-finite got {int((~torch.isfinite(got64)).sum())} "
             f"(want {int((~torch.isfinite(want64)).sum())})"]
    if diff.numel() == 0:
        return lines[0]
    worst = diff.argmax().item()
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    lines.append(f"  max error {diff.flatten()[worst].item():.4g} at {index}: got {got64[index].item():.6g}, "
                 f"want {want64[index].item():.6g}")
    bad = (diff > atol).nonzero()
    if len(bad):
        first = tuple(int(i) for i in bad[0])
        rows = bad[:, 2]
        lines.append(f"  {len(bad)} of {diff.numel()} off by > {atol:.3g}; first at {first}: got "
                     f"{got64[first].item():.6g}, want {want64[first].item():.6g}")
        lines.append(f"  rows {rows.min().item()}..{rows.max().item()}, 128-row blocks "
                     f"{sorted(set((rows // 128).tolist()))[:12]}, warpgroup halves {sorted(set(((rows % 128) // 64).tolist()))}, "
                     f"rows mod 16 {sorted(set((rows % 16).tolist()))}")
        if bad.shape[1] > 3:
            cols = bad[:, 3]
            lines.append(f"  columns {cols.min().item()}..{cols.max().item()}, mod 8 {sorted(set((cols % 8).tolist()))}")
    return "\n".join(lines)


def sm90_check(label, q, k, v, is_causal, bottom_right, monkeypatch, fa2_inputs=None):
    """The sm90 forward against the float64 reference (out and lse) and against the fa2 kernel on the
    same inputs (`fa2_inputs`: inputs fa2 accepts for the same function, e.g. materialised heads)."""
    dtype = q.dtype
    select_kernel_path(monkeypatch, "sm90")
    out, lse = ops.attention(q, k, v, None, 0.0, is_causal, bottom_right)
    select_kernel_path(monkeypatch, "fa2")
    out_fa2, _ = ops.attention(*(fa2_inputs or (q, k, v)), None, 0.0, is_causal, bottom_right)
    ref, ref_lse = feature_reference(q, k, v, None, is_causal, bottom_right)
    low = feature_reference(q, k, v, None, is_causal, bottom_right, dtype=dtype)[0]
    scale = max(ref.abs().max().item(), 1.0)
    floor = (2e-3 if dtype == torch.float16 else 1e-2) * scale
    err, err_fa2, err_low = max_err(out, ref), max_err(out_fa2, ref), max_err(low, ref)
    finite = torch.isfinite(ref_lse)
    lse_err = max_err(lse[finite], ref_lse[finite]) if finite.any() else 0.0
    print(f"sm90 {label}: out max err {err:.3g} (fa2 {err_fa2:.3g}, same-precision reference {err_low:.3g}), "
          f"lse max err {lse_err:.3g}")
    report = mismatch_report("out", out, ref, 3 * err_low + floor)
    assert torch.isfinite(out).all() and err <= 3 * err_low + floor, f"sm90 {label}:\n{report}"
    assert err <= 2 * err_fa2 + floor, f"sm90 {label}: error {err:.3g}, fa2's {err_fa2:.3g}\n{report}"
    assert torch.equal(torch.isfinite(lse).cpu(), finite.cpu()), \
        f"sm90 {label}: lse is -inf exactly on the rows that see no key\n{mismatch_report('lse', lse, ref_lse, 1e-4)}"
    assert lse_err <= 1e-4 * max(ref_lse[finite].abs().max().item() if finite.any() else 1.0, 1.0), \
        f"sm90 {label}:\n{mismatch_report('lse', lse, ref_lse, 1e-4)}"
    return out, lse


def max_err(a, b):
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "causal_bottom_right"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape", SM90_SHAPES, ids=lambda s: "B{}H{}Hk{}L{}S{}".format(*s))
def test_sm90_forward_matches_reference_and_fa2(shape, D, dtype, causal, monkeypatch):
    require_sm90_gpu()
    B, H, Hk, L, S = shape
    q, k, v = make_qkv(Shape(B, H, L, S, D, D), dtype, "token_major", seed=seed_of("sm90", shape, D, causal))
    sm90_check(f"{shape} D{D} {str(dtype)[6:]} causal={causal}", q, k, v, *causal, monkeypatch)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads", ["gqa4", "mqa", "expanded"])
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal", "causal_bottom_right"])
def test_sm90_forward_serves_grouped_key_value_heads(D, heads, causal, monkeypatch):
    """Query head h reads key/value head h / (H / Hk) (the fa2 kernels take materialised heads)."""
    require_sm90_gpu()
    B, H, L, S = 2, 8, 300, 500
    Hk = {"gqa4": 2, "mqa": 1, "expanded": 1}[heads]
    g = torch.Generator().manual_seed(seed_of("sm90-gqa", D, heads))
    q = torch.randn(B, L, H, D, generator=g).bfloat16().to(DEVICE).transpose(1, 2)
    k, v = (torch.randn(B, S, Hk, D, generator=g).bfloat16().to(DEVICE).transpose(1, 2) for _ in range(2))
    full = tuple(t.repeat_interleave(H // Hk, dim=1) for t in (k, v))
    if heads == "expanded":  # one key/value head seen by every query head through stride 0
        k, v = k.expand(B, H, S, D), v.expand(B, H, S, D)
    sm90_check(f"{heads} D{D} causal={causal}", q, k, v, *causal, monkeypatch, fa2_inputs=(q, *full))


@pytest.mark.parametrize("layout", ["contiguous", "packed_projection", "sliced", "batch_expanded", "offset_rows"])
@pytest.mark.parametrize("D", [64, 128])
def test_sm90_forward_reads_strided_views(layout, D, monkeypatch):
    require_sm90_gpu()
    B, H, L, S, dtype = 2, 3, 200, 333, torch.float16
    g = torch.Generator().manual_seed(seed_of("sm90-views", layout, D))

    def rand(*size):
        return torch.randn(*size, generator=g).to(dtype).to(DEVICE)

    if layout == "contiguous":
        q, k, v = rand(B, H, L, D), rand(B, H, S, D), rand(B, H, S, D)
    elif layout == "packed_projection":  # (B, L, 3, H, D): heads and q/k/v split out of one projection
        packed = rand(B, L, 3, H, D)
        q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    elif layout == "sliced":  # every other key row; queries from a longer buffer
        q, k, v = rand(B, H, L + 40, D)[:, :, 40:], rand(B, H, 2 * S, D)[:, :, ::2], rand(B, H, 2 * S, D)[:, :, 1::2]
    elif layout == "batch_expanded":  # keys/values shared by the batch (stride 0)
        q, k, v = rand(B, H, L, D), rand(1, H, S, D).expand(B, H, S, D), rand(1, H, S, D).expand(B, H, S, D)
    else:  # rows padded to D + 8 elements, columns from 8 on: 16-byte aligned, not contiguous
        q, k, v = (rand(B, H, n, D + 8)[..., 8:] for n in (L, S, S))
    for causal in CAUSAL:
        sm90_check(f"{layout} D{D} causal={causal}", q, k, v, *causal, monkeypatch)


@pytest.mark.parametrize("D", [64, 128])
def test_sm90_forward_then_the_backward_from_its_logsumexp(D, monkeypatch):
    """With QKV_CUDA_KERNEL=sm90 the backward is auto's (fa2 here), reading the sm90 logsumexp."""
    require_sm90_gpu()
    select_kernel_path(monkeypatch, "sm90")
    shape = Shape(2, 3, 300, 200, D, D)
    q, k, v = make_qkv(shape, torch.bfloat16, "token_major", seed=seed_of("sm90-bwd", D))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, _ = ops.attention(*leaves, None, 0.0, True, True)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).bfloat16().to(DEVICE)
    got = torch.autograd.grad(out, leaves, grad_out)
    ref = reference_grads(q, k, v, None, grad_out, True, True, torch.float64)
    low = reference_grads(q, k, v, None, grad_out, True, True, torch.bfloat16)
    for name, g, r, lo in zip(("dq", "dk", "dv"), got, ref, low):
        print(f"sm90 backward D{D} {name}: max err {max_err(g, r):.3g} (same-precision reference {max_err(lo, r):.3g})")
        assert_matches(name, g, r, lo, torch.bfloat16)


def test_sm90_forward_refuses_calls_it_cannot_serve(monkeypatch):
    """A forced sm90 path serves a call or raises naming why; it never falls back."""
    if DEVICE != "cuda":
        pytest.skip("QKV_CUDA_KERNEL only steers the CUDA kernels")
    select_kernel_path(monkeypatch, "sm90")
    shape = Shape(1, 2, 40, 50, 64, 64)
    q, k, v = make_qkv(shape, torch.float16)
    if torch.cuda.get_device_capability() != (9, 0):
        with pytest.raises(RuntimeError, match="compute capability 9.0"):
            ops.attention(q, k, v)
        return
    cases = [
        (make_qkv(shape, torch.float32), {}, "float16 or bfloat16"),
        (make_qkv(Shape(1, 2, 40, 50, 96, 96), torch.float16), {}, r"head_dim == value_head_dim in \{64, 128\}"),
        (make_qkv(Shape(1, 2, 40, 50, 64, 128), torch.float16), {}, "head_dim == value_head_dim"),
        ((q, k, v), {"bias": make_bias("full", shape, torch.float16)}, "no bias"),
        ((q, k, v), {"dropout_p": 0.1}, "no dropout"),
        ((q, k, v), {"scale": -0.1}, "scale > 0"),
        (make_qkv(shape, torch.float16, "strided"), {}, "unit-stride rows|16-byte-aligned"),
    ]
    for (a, b, c), options, reason in cases:
        with pytest.raises(RuntimeError, match=f"does not qualify for the sm90 \\(Hopper\\) forward: .*({reason})"):
            ops.attention(a, b, c, options.get("bias"), options.get("dropout_p", 0.0), False, False,
                          options.get("scale"), dropout_seed(1))
    with pytest.raises(RuntimeError, match="QKV_CUDA_KERNEL=sm90, but the sm90 kernels do not implement window_size"):
        qkv.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window_size=(4, 4))


def cuda_kernels_run(fn):
    """Names of the CUDA kernels `fn` launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


def test_sm90_forward_runs_only_when_forced(monkeypatch):
    """auto never takes the sm90 forward (opt-in until it passed here); forced, it is what runs."""
    if DEVICE != "cuda":
        pytest.skip("QKV_CUDA_KERNEL only steers the CUDA kernels")
    q, k, v = make_qkv(Shape(2, 2, 300, 300, 128, 128), torch.bfloat16, "token_major")
    select_kernel_path(monkeypatch, "auto")
    names = cuda_kernels_run(lambda: ops.attention(q, k, v, None, 0.0, True))
    assert names and not any("sm90_forward_kernel" in n for n in names), names
    if torch.cuda.get_device_capability() != (9, 0):
        return
    select_kernel_path(monkeypatch, "sm90")
    names = cuda_kernels_run(lambda: ops.attention(q, k, v, None, 0.0, True))
    assert any("sm90_forward_kernel" in n for n in names), names
