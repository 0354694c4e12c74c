"""The amx capability: the AVX-512 copy's bfloat16 forward and backward on AMX tiles
(csrc/cpu/amx_tiles.h, amx_backward.h).

Every case runs twice where it can: `emulated` (the kernel's own packing, blocking and padding,
with the five tile instructions done in software: any AVX-512 CPU) and `hardware` (the AMX
instructions: CPUs with AMX-BF16 only; skipped elsewhere). Each is checked against the float64
reference on fresh random inputs, with masks, odd sizes, strided and expanded inputs.
"""
import pytest
import torch

from qkv import _C
from reference import (Shape, alibi_slopes, assert_matches, dropout_seed, feature_reference, grad_tolerance, make_bias,
                       make_qkv, reference_grads, low_precision_reference, seed_of, tolerance)

BF16 = torch.bfloat16


def _has_avx512() -> bool:
    return "avx512" in _C._supported_cpu_capabilities()


def _has_amx_hardware() -> bool:
    previous = _C._set_amx_emulation(False)
    try:
        return "amx" in _C._supported_cpu_capabilities()
    finally:
        _C._set_amx_emulation(previous)


@pytest.fixture(params=["emulated", "hardware"])
def amx(request):
    """The amx capability active, its tile products emulated or on the CPU's AMX units."""
    mode = request.param
    if mode == "emulated" and not _has_avx512():
        pytest.skip("the AMX emulation runs inside the AVX-512 copy; this CPU has no AVX-512")
    if mode == "hardware" and not _has_amx_hardware():
        pytest.skip("this CPU (or its operating system) offers no AMX-BF16 tiles")
    previous_emulation = _C._set_amx_emulation(mode == "emulated")
    previous = _C._set_cpu_capability("amx")
    try:
        assert _C._amx_tile_mode() == mode
        yield mode
    finally:
        _C._set_cpu_capability(previous)
        _C._set_amx_emulation(previous_emulation)


def attention(q, k, v, bias=None, dropout_p=0.0, is_causal=False, bottom_right=False, scale=None, seed=None,
              window=(-1, -1), softcap=0.0, slopes=None):
    return torch.ops.qkv.attention(q, k, v, bias, dropout_p, is_causal, bottom_right, scale, seed, window[0],
                                   window[1], softcap, slopes)


SHAPES = [
    Shape(1, 1, 4, 1, 64, 64),  # the fewest rows the tiled path takes, one key
    Shape(2, 3, 17, 33, 13, 13),  # head dim not a multiple of 16, ragged everything
    Shape(1, 2, 50, 20, 40, 24),  # D != Dv, L > S
    Shape(2, 2, 100, 150, 64, 64),
    Shape(1, 2, 96, 549, 128, 128),  # a whole 96-row block; a second, partial 512-key tile
    Shape(1, 1, 33, 65, 256, 256),  # the largest head dim
    Shape(1, 1, 40, 70, 200, 96),
    Shape(1, 1, 20, 4200, 64, 64),  # more than 8 key tiles: the compensated partials
]
CAUSAL = [(False, False), (True, False), (True, True)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("is_causal,bottom_right", CAUSAL)
def test_forward_matches_the_float64_reference(amx, shape, is_causal, bottom_right):
    q, k, v = make_qkv(shape, BF16, seed=seed_of("amx", str(shape), is_causal, bottom_right))
    out, lse = attention(q, k, v, None, 0.0, is_causal, bottom_right)
    want, want_lse = feature_reference(q, k, v, None, is_causal, bottom_right)
    low = low_precision_reference(q, k, v, None, is_causal, bottom_right, BF16)
    assert_matches(f"{amx} {shape}", out, want, low, BF16)
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    torch.testing.assert_close(lse[seen].double(), want_lse[seen].double(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("layout", ["token_major", "strided", "expanded"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_strided_and_expanded_inputs(amx, layout, is_causal):
    shape = Shape(2, 3, 70, 130, 64, 64)
    q, k, v = make_qkv(shape, BF16, layout=layout, seed=seed_of("amx-layout", layout))
    out, _ = attention(q, k, v, None, 0.0, is_causal, False)
    want, _ = feature_reference(q, k, v, None, is_causal)
    assert_matches(f"{amx} {layout}", out, want, low_precision_reference(q, k, v, None, is_causal, False, BF16), BF16)


@pytest.mark.parametrize("kind", ["full", "key_padding", "per_head_row", "expanded", "masked_row"])
def test_biases(amx, kind):
    shape = Shape(2, 2, 60, 140, 64, 64)
    q, k, v = make_qkv(shape, BF16, seed=seed_of("amx-bias", kind))
    bias = make_bias(kind, shape, BF16)
    out, _ = attention(q, k, v, bias, 0.0, True, True)
    want, _ = feature_reference(q, k, v, bias, True, True)
    assert_matches(f"{amx} {kind}", out, want, low_precision_reference(q, k, v, bias, True, True, BF16), BF16)


@pytest.mark.parametrize("window,softcap,with_alibi", [((40, 0), 0.0, False), ((16, 70), 0.0, False),
                                                      ((-1, -1), 5.0, False), ((-1, -1), 0.0, True),
                                                      ((100, 3), 8.0, True)])
def test_windows_softcap_and_alibi(amx, window, softcap, with_alibi):
    shape = Shape(1, 4, 130, 600, 64, 64)
    q, k, v = make_qkv(shape, BF16, seed=seed_of("amx-features", window, softcap, with_alibi))
    slopes = alibi_slopes(4) if with_alibi else None
    causal = window == (16, 70)  # a window inside the causal band as well
    out, _ = attention(q, k, v, None, 0.0, causal, False, None, None, window, softcap, slopes)
    want, _ = feature_reference(q, k, v, None, causal, False, None, window, softcap, slopes)
    torch.testing.assert_close(out.double(), want, **tolerance(BF16))


def test_grouped_query_heads(amx):
    q = torch.randn(2, 8, 100, 64, dtype=BF16)
    k, v = (torch.randn(2, 2, 300, 64, dtype=BF16) for _ in range(2))
    out, _ = attention(q, k, v, None, 0.0, True, True)
    want, _ = feature_reference(q, k, v, None, True, True)
    torch.testing.assert_close(out.double(), want, **tolerance(BF16))


def test_dropout_keeps_the_same_keys_as_the_float64_kernels(amx):
    # The keep mask hashes (seed, position) whatever the dtype or product: the float64 op with the
    # same seed is the reference.
    q = torch.randn(2, 2, 90, 64, dtype=BF16)
    k, v = (torch.randn(2, 2, 700, 64, dtype=BF16) for _ in range(2))
    seed = dropout_seed(5)
    out, _ = attention(q, k, v, None, 0.3, True, False, None, seed)
    want, _ = torch.ops.qkv.attention(q.double(), k.double(), v.double(), None, 0.3, True, False, None, seed)
    torch.testing.assert_close(out.double(), want, **tolerance(BF16))


def _grads(q, k, v, bias=None, grad_out=None, **options):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)] + ([bias.detach().requires_grad_()] if bias is not None
                                                               and bias.dtype.is_floating_point else [])
    b = leaves[3] if len(leaves) == 4 else bias
    out, _ = attention(*leaves[:3], b, **options)
    return out, torch.autograd.grad(out, leaves, grad_out)


BACKWARD_SHAPES = [
    Shape(1, 2, 80, 200, 64, 64),
    Shape(2, 1, 17, 33, 13, 13),  # ragged everything, head dim not a multiple of 16
    Shape(1, 2, 50, 20, 40, 24),  # D != Dv, L > S
    Shape(1, 1, 200, 600, 128, 128),  # several query blocks and key blocks, partial last ones
    Shape(1, 1, 33, 65, 256, 200),
]


@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=str)
@pytest.mark.parametrize("is_causal,bottom_right", CAUSAL)
def test_backward_matches_the_float64_reference(amx, shape, is_causal, bottom_right):
    q, k, v = make_qkv(shape, BF16, seed=seed_of("amx-bwd", str(shape), is_causal, bottom_right))
    grad_out = torch.randn(shape.B, shape.H, shape.L, shape.Dv, dtype=BF16)
    _, grads = _grads(q, k, v, None, grad_out, is_causal=is_causal, bottom_right=bottom_right)
    want = reference_grads(q, k, v, None, grad_out, is_causal, bottom_right, torch.float64)
    low = reference_grads(q, k, v, None, grad_out, is_causal, bottom_right, BF16)
    for name, got, ref, ref_low in zip("qkv", grads, want, low):
        assert_matches(f"{amx} {shape} d{name}", got, ref, ref_low, BF16)


@pytest.mark.parametrize("layout", ["token_major", "strided", "expanded"])
def test_backward_strided_and_expanded_inputs(amx, layout):
    shape = Shape(2, 3, 70, 300, 64, 64)
    q, k, v = make_qkv(shape, BF16, layout=layout, seed=seed_of("amx-bwd-layout", layout))
    grad_out = torch.randn(2, 3, 70, 64, dtype=BF16)
    _, grads = _grads(q, k, v, None, grad_out, is_causal=True)
    want = reference_grads(q, k, v, None, grad_out, True, False, torch.float64)
    for name, got, ref in zip("qkv", grads, want):
        torch.testing.assert_close(got.double(), ref, **grad_tolerance(BF16), msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("kind", ["full", "key_padding", "masked_row"])
def test_backward_with_a_bias_and_its_gradient(amx, kind):
    shape = Shape(2, 2, 60, 300, 64, 64)
    q, k, v = make_qkv(shape, BF16, seed=seed_of("amx-bwd-bias", kind))
    bias = make_bias(kind, shape, BF16)
    grad_out = torch.randn(2, 2, 60, 64, dtype=BF16)
    _, grads = _grads(q, k, v, bias, grad_out, is_causal=True, bottom_right=True)
    want = reference_grads(q, k, v, bias, grad_out, True, True, torch.float64)
    for name, got, ref in zip(["q", "k", "v", "bias"], grads, want):
        torch.testing.assert_close(got.double(), ref, **grad_tolerance(BF16), msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("window,softcap,with_alibi", [((40, 0), 0.0, False), ((-1, -1), 5.0, True)])
def test_backward_windows_softcap_and_alibi(amx, window, softcap, with_alibi):
    q, k, v = (torch.randn(1, 2, 130, 64, dtype=BF16), torch.randn(1, 2, 600, 64, dtype=BF16),
               torch.randn(1, 2, 600, 64, dtype=BF16))
    slopes = alibi_slopes(2) if with_alibi else None
    grad_out = torch.randn(1, 2, 130, 64, dtype=BF16)
    _, grads = _grads(q, k, v, None, grad_out, window=window, softcap=softcap, slopes=slopes)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want, _ = feature_reference(*leaves, None, False, False, None, window, softcap, slopes)
    want = torch.autograd.grad(want, leaves, grad_out.double())
    for name, got, ref in zip("qkv", grads, want):
        torch.testing.assert_close(got.double(), ref, **grad_tolerance(BF16), msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 1)])
def test_backward_grouped_query_heads(amx, heads, kv_heads):
    q = torch.randn(2, heads, 100, 64, dtype=BF16)
    k, v = (torch.randn(2, kv_heads, 300, 64, dtype=BF16) for _ in range(2))
    grad_out = torch.randn(2, heads, 100, 64, dtype=BF16)
    _, grads = _grads(q, k, v, None, grad_out, is_causal=True, bottom_right=True)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want, _ = feature_reference(*leaves, None, True, True)
    want = torch.autograd.grad(want, leaves, grad_out.double())
    for name, got, ref in zip("qkv", grads, want):
        torch.testing.assert_close(got.double(), ref, **grad_tolerance(BF16), msg=lambda m: f"d{name}: {m}")


def test_backward_with_dropout_keeps_the_float64_kernels_mask(amx):
    q = torch.randn(2, 2, 90, 64, dtype=BF16)
    k, v = (torch.randn(2, 2, 300, 64, dtype=BF16) for _ in range(2))
    grad_out = torch.randn(2, 2, 90, 64, dtype=BF16)
    seed = dropout_seed(9)
    options = dict(dropout_p=0.25, is_causal=True, seed=seed)
    _, grads = _grads(q, k, v, None, grad_out, **options)
    _, want = _grads(q.double(), k.double(), v.double(), None, grad_out.double(), **options)
    for name, got, ref in zip("qkv", grads, want):
        torch.testing.assert_close(got.double(), ref, **grad_tolerance(BF16), msg=lambda m: f"d{name}: {m}")


def test_backward_on_tiles_differs_from_the_avx512_products(amx):
    q, k, v = (torch.randn(1, 2, 64, 64, dtype=BF16) for _ in range(3))
    grad_out = torch.randn(1, 2, 64, 64, dtype=BF16)
    out_amx = torch.ops.qkv.attention(q, k, v)
    grads_amx = torch.ops.qkv.attention_backward(grad_out, q, k, v, None, *out_amx, 0.0, False, False, None, None, False)
    previous = _C._set_cpu_capability("avx512")
    try:
        grads_avx512 = torch.ops.qkv.attention_backward(grad_out, q, k, v, None, *out_amx, 0.0, False, False, None, None, False)
    finally:
        _C._set_cpu_capability(previous)
    for name, a, b in zip("qkv", grads_amx[:3], grads_avx512[:3]):
        assert not torch.equal(a, b), f"d{name}: identical bits"
        torch.testing.assert_close(a.double(), b.double(), **grad_tolerance(BF16), msg=lambda m: f"d{name}: {m}")


def test_the_tiles_compute_the_product_the_micro_kernels_do_not(amx):
    # The AMX path rounds q * scale and P to bfloat16; the AVX-512 path multiplies float32 copies.
    # Identical bits would mean the switch kept the AVX-512 products.
    q, k, v = (torch.randn(1, 2, 64, 64, dtype=BF16) for _ in range(3))
    out_amx = attention(q, k, v)[0]
    previous = _C._set_cpu_capability("avx512")
    try:
        assert _C._amx_tile_mode() == "off"
        out_avx512 = attention(q, k, v)[0]
    finally:
        _C._set_cpu_capability(previous)
    assert not torch.equal(out_amx, out_avx512)
    torch.testing.assert_close(out_amx.double(), out_avx512.double(), **tolerance(BF16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_keep_the_avx512_products(amx, dtype):
    # AMX-BF16 multiplies bfloat16 only: float16 would lose three mantissa bits, float32 sixteen.
    q, k, v = (torch.randn(1, 2, 64, 64, dtype=dtype) for _ in range(3))
    out_amx = attention(q, k, v)[0]
    previous = _C._set_cpu_capability("avx512")
    try:
        out_avx512 = attention(q, k, v)[0]
    finally:
        _C._set_cpu_capability(previous)
    assert torch.equal(out_amx, out_avx512)


def test_emulation_off_leaves_no_amx_on_a_cpu_without_it():
    if not _has_avx512() or _has_amx_hardware():
        pytest.skip("needs an AVX-512 CPU without AMX")
    previous = _C._set_amx_emulation(True)
    try:
        assert "amx" in _C._supported_cpu_capabilities()
        _C._set_cpu_capability("amx")
        _C._set_amx_emulation(False)
        assert _C._cpu_capability() == "avx512" and _C._amx_tile_mode() == "off"
        with pytest.raises(RuntimeError, match="this CPU cannot run the amx kernels"):
            _C._set_cpu_capability("amx")
    finally:
        _C._set_amx_emulation(previous)
        _C._set_cpu_capability("avx512")


def test_sharp_and_huge_scores_stay_finite(amx):
    # Scores of thousands (a bfloat16 Q K^T with large inputs) and a row masked with finfo.min.
    q = torch.randn(1, 1, 40, 64, dtype=BF16) * 30
    k = torch.randn(1, 1, 90, 64, dtype=BF16) * 30
    v = torch.randn(1, 1, 90, 64, dtype=BF16)
    bias = torch.zeros(40, 90, dtype=BF16)
    bias[3] = torch.finfo(BF16).min
    out, lse = attention(q, k, v, bias)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # Row 3: equal finite scores, the mean of V (not the zeros of a row that sees nothing).
    torch.testing.assert_close(out[0, 0, 3].double(), v[0, 0].double().mean(0), **tolerance(BF16))
    # The other rows: a convex combination of V's rows (such sharp rows pick one key; which one
    # bfloat16's rounding of q * scale may change, as in torch's bfloat16 math path).
    assert (out.double().abs() <= v.double().abs().amax(2, keepdim=True) + 1e-2).all()


@pytest.mark.parametrize("case", ["keys_by_column", "every_stride_odd", "odd_head_dim"])
def test_each_packing_path(amx, case):
    # K and V reach the packing with unit stride along the head dim (gathered pairs for K,
    # interleaved rows for V), along the keys, or along neither (element by element).
    B, H, L, S, D = 2, 2, 40, 90, 64
    q = torch.randn(B, H, L, D, dtype=BF16)
    if case == "keys_by_column":  # K with unit stride along keys, V with unit stride along keys
        k = torch.randn(B, H, D, S, dtype=BF16).transpose(-1, -2)
        v = torch.randn(B, H, D, S, dtype=BF16).transpose(-1, -2)
    elif case == "every_stride_odd":  # no unit stride anywhere
        k = torch.randn(B, H, S, D, 2, dtype=BF16)[..., 0]
        v = torch.randn(B, H, S, D, 3, dtype=BF16)[..., 1]
    else:  # an odd head dim: the last pair of K's rows has one element
        q, k, v = (torch.randn(B, H, n, 37, dtype=BF16) for n in (L, S, S))
    out, _ = attention(q, k, v, None, 0.0, True, True)
    want, _ = feature_reference(q, k, v, None, True, True)
    torch.testing.assert_close(out.double(), want, **tolerance(BF16))


# ---- rounding to bfloat16 ------------------------------------------------------------------

def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_native_rounding_is_on_exactly_where_the_cpu_has_avx512_bf16():
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    assert _C._bf16_native_rounding() == ("avx512_bf16" in flags and "avx512f" in flags)
    previous = _C._set_bf16_native_rounding(True)  # cannot switch it on where the CPU lacks it
    try:
        assert _C._bf16_native_rounding() == ("avx512_bf16" in flags)
    finally:
        _C._set_bf16_native_rounding(previous)


@pytest.fixture
def both_roundings():
    """Runs a callable with VCVTNEPS2BF16 and with the AVX-512F rounding; returns both results."""
    if not _C._bf16_native_rounding():
        pytest.skip("this CPU has no AVX512-BF16: only the AVX-512F rounding runs here")

    def run(fn):
        results = []
        for native in (True, False):
            previous = _C._set_bf16_native_rounding(native)
            try:
                results.append(fn())
            finally:
                _C._set_bf16_native_rounding(previous)
        return results

    return run


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[7]], ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
def test_both_roundings_give_the_same_bits(amx, both_roundings, shape, is_causal):
    # VCVTNEPS2BF16 and the integer rounding agree on everything but float32 denormals (none
    # here), so the forward and backward must not differ in one bit.
    seed = seed_of("both roundings", shape, is_causal)
    q, k, v = make_qkv(shape, BF16, seed=seed)
    grad_out = torch.randn(shape.B, shape.H, shape.L, shape.Dv, generator=torch.Generator().manual_seed(seed)).to(BF16)

    def forward_backward():
        out, lse = attention(q, k, v, is_causal=is_causal)
        grads = torch.ops.qkv.attention_backward(grad_out, q, k, v, None, out, lse, 0.0, is_causal, False, None, None,
                                                 False)
        return out, lse, *grads[:3]

    native, integer = both_roundings(forward_backward)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], native, integer):
        assert torch.equal(a, b), f"{name}: the two roundings differ"


# ---- NaN ---------------------------------------------------------------------------------

@pytest.mark.parametrize("is_causal", [False, True])
def test_nan_reaches_exactly_the_rows_that_see_it(amx, is_causal):
    # Every AMX tile takes its row maxima in a pass of its own (mask_row_max), which drops a NaN
    # beside a finite maximum and finds it where there is none: a NaN query row and a NaN key
    # must both reach the outputs they touch, and nothing else.
    L = 150
    q, k, v = (torch.randn(1, 1, L, 64, dtype=BF16) for _ in range(3))
    q[0, 0, 7, 5] = float("nan")
    k[0, 0, 100, 3] = float("nan")
    out, _ = attention(q, k, v, is_causal=is_causal)
    rows = out[0, 0].isnan().any(-1)
    expected = torch.zeros(L, dtype=torch.bool)
    expected[7] = True
    expected[100 if is_causal else 0:] = True
    assert torch.equal(rows, expected)


def test_backward_keeps_a_sequences_nan_out_of_the_next(amx):
    # Sequence 0 (a whole 256-key block) has an infinite value, so its dS rows are NaN at every
    # key; sequence 1 (200 keys) runs next in the same thread's scratch. Its dQ product reads dS up
    # to the next 32 keys (224), past the 208 its rows are written to: those columns must be zeros,
    # not sequence 0's NaN, although K's padding rows are zero (NaN * 0 is NaN).
    cu_q = torch.tensor([0, 64, 128], dtype=torch.int32)
    cu_k = torch.tensor([0, 256, 456], dtype=torch.int32)
    q, go = torch.randn(128, 1, 64, dtype=BF16), torch.randn(128, 1, 64, dtype=BF16)
    k, v = torch.randn(456, 1, 64, dtype=BF16), torch.randn(456, 1, 64, dtype=BF16)
    v[210] = float("inf")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out, lse = torch.ops.qkv.attention_varlen(q, k, v, cu_q, cu_k, 64, 256)
        grads = torch.ops.qkv.attention_varlen_backward(go, q, k, v, out, lse, cu_q, cu_k, 64, 256, 0.0, False, False,
                                                        None, None)
    finally:
        torch.set_num_threads(threads)
    assert not torch.isfinite(grads[0][:64].float()).all()  # sequence 0's own gradients are not finite
    rows = (slice(64, 128), slice(256, 456), slice(256, 456))  # sequence 1's
    leaves = [t[r].double().requires_grad_() for t, r in zip((q, k, v), rows)]
    want, _ = feature_reference(*(t.transpose(0, 1)[None] for t in leaves), None, False, False)
    want = torch.autograd.grad(want, leaves, go[64:].double().transpose(0, 1)[None])
    for name, got, ref in zip("qkv", (g[r] for g, r in zip(grads, rows)), want):
        torch.testing.assert_close(got.double(), ref, **grad_tolerance(BF16), msg=lambda m: f"d{name}: {m}")
