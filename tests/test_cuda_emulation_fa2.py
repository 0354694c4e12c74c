"""The fa2 CUDA kernels (csrc/cuda/fa2_*.cuh) run on the CPU emulation of the CUDA built-ins.

Same approach as test_cuda_emulation.py (whose build fixture and helpers this file reuses): the
kernels' own source, compiled by the host compiler against tests/cuda_emulation, checked against
the CPU kernels of torch.ops.qkv (same dropout hash, so the same dropout masks) and against float64
references, over head dims 64/96/128/256, ragged sequence ends, both causal alignments, bias
broadcasts (with -inf and with huge finite negative entries), dropout, the bias gradient, strided
inputs, the deterministic dQ order and the tile shapes dispatch uses. The emulation also checks
what the hardware would not report: ldmatrix and cp.async addresses inside shared memory and
16-byte aligned, no read of a cp.async destination before its wait (and barrier), no deterministic
wait on a block dispatched later.

Shapes stay small: every emulated mma is 32 cooperative fibers, and CI has two cores.
"""
from __future__ import annotations

import math

import pytest
import torch

from attention_reference import (CAUSAL, Shape, assert_matches, low_precision_reference, make_bias, make_qkv,
                                 reference_attention, reference_grads, seed_of)
from test_cuda_emulation import (assert_close_to_cpu_kernel, cpu_forward, emulated, emulated_backward,  # noqa: F401
                                 emulated_forward, expand_bias, resolved)

CAUSAL_IDS = ["full", "causal", "causal_bottom_right"]
HALF_TYPES = [torch.float16, torch.bfloat16]


def check_forward(emulated, q, k, v, bias, dropout_p, is_causal, bottom_right, scale=None, seed=0, kernel="fa2",
                  reference=True, against="cpu"):
    """fa2 against the CPU kernel (or the emulated generic CUDA kernel: against="generic") and the
    float64 reference."""
    out, lse = emulated_forward(emulated, q, k, v, bias, dropout_p, is_causal, bottom_right, scale, seed, kernel)
    if against == "cpu":
        want, want_lse = cpu_forward(q, k, v, bias, dropout_p, is_causal, bottom_right, scale, seed)
    else:
        want, want_lse = emulated_forward(emulated, q, k, v, bias, dropout_p, is_causal, bottom_right, scale, seed,
                                          "generic")
    assert out.stride() == want.stride()
    assert_close_to_cpu_kernel("out", out, want, q.dtype)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse)), "lse is -inf exactly on rows that see no key"
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite], want_lse[finite], rtol=1e-5, atol=1e-5)
    if reference and dropout_p == 0.0:
        ref, _ = reference_attention(q, k, v, bias, is_causal, bottom_right, scale)
        assert_matches("out", out, ref, low_precision_reference(q, k, v, bias, is_causal, bottom_right, q.dtype),
                       q.dtype)
    return out, lse


# Per head dim, sequence lengths that leave partial query and key tiles (the default tiles are
# 128 query rows and 64 or 128 keys), L > S (rows hidden under the bottom-right mask) and L < S.
FORWARD_LENGTHS = {64: [(130, 200), (33, 70)], 96: [(70, 130)], 128: [(130, 97), (20, 150)], 256: [(40, 70)]}
FORWARD_CASES = [pytest.param(D, L, S, id=f"D{D}-L{L}S{S}") for D, ls in FORWARD_LENGTHS.items() for L, S in ls]


@pytest.mark.parametrize("D, L, S", FORWARD_CASES)
@pytest.mark.parametrize("causal", CAUSAL, ids=CAUSAL_IDS)
def test_fa2_forward(emulated, D, L, S, causal):
    is_causal, bottom_right = causal
    dtype = HALF_TYPES[(D // 32 + L) % 2]  # both types across the cases, without doubling them
    q, k, v = make_qkv(Shape(1, 2, L, S, D, D), dtype, "token_major", seed=seed_of("fa2", D, L, S, causal))
    check_forward(emulated, q, k, v, None, 0.0, is_causal, bottom_right)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("kind", ["full", "key_padding", "per_head_row", "masked_row", "huge_negative"])
def test_fa2_forward_with_bias(emulated, dtype, kind):
    shape = Shape(2, 2, 70, 90, 64, 64)
    q, k, v = make_qkv(shape, dtype, "token_major", seed=seed_of("fa2-bias", kind, dtype))
    against = "cpu"
    if kind == "huge_negative":
        # A finite mask value as large as the dtype allows: it must stay finite (only -inf hides a
        # key), so a row where every key has it still attends, never outputs 0. (Compared with the
        # generic CUDA kernel: the CPU kernel of this commit gives such bfloat16 rows 0 output and
        # -inf logsumexp, which the float64 reference does not.)
        bias = make_bias("rows_cols", shape, dtype)
        bias[: shape.L // 2] = torch.finfo(dtype).min
        against = "generic"
    else:
        bias = make_bias(kind, shape, dtype)
    check_forward(emulated, q, k, v, bias, 0.0, True, True, against=against)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_fa2_forward_dropout_matches_cpu_kernel(emulated, dtype, D):
    shape = Shape(2, 2, 37, 150, D, D)
    q, k, v = make_qkv(shape, dtype, "token_major", seed=seed_of("fa2-dropout", dtype, D))
    bias = make_bias("rows_cols", shape, dtype)
    for p, seed in ((0.3, 12345), (0.9, 2**61 + 7)):
        check_forward(emulated, q, k, v, bias, p, True, False, seed=seed)


@pytest.mark.parametrize("scale", [-0.2, 0.0, 0.05])
def test_fa2_forward_scales(emulated, scale):
    """Negative and zero scales take the general path (the fast path keeps its running max on raw
    scores, which needs scale > 0); a masked score must never become 0 * -inf there."""
    shape = Shape(1, 2, 40, 70, 64, 64)
    q, k, v = make_qkv(shape, torch.bfloat16, "token_major", seed=seed_of("fa2-scale", scale))
    check_forward(emulated, q, k, v, None, 0.0, True, True, scale=scale)


@pytest.mark.parametrize("tile", ["64x64x4", "128x64x8"])
def test_fa2_forward_head_dim_256_tiles(emulated, tile):
    """Both D = 256 tiles dispatch picks (H100: 64x64x4, two blocks per SM; A100: 128x64x8)."""
    shape = Shape(1, 1, 70, 100, 256, 256)
    q, k, v = make_qkv(shape, torch.float16, "token_major", seed=seed_of("fa2-256", tile))
    check_forward(emulated, q, k, v, None, 0.0, True, False, kernel=f"fa2:{tile}")


@pytest.mark.parametrize("layout", ["contiguous", "expanded", "aligned_slices"])
def test_fa2_forward_layouts(emulated, layout):
    shape = Shape(2, 3, 45, 70, 96, 96)
    if layout == "aligned_slices":  # unit-stride rows cut from wider tensors at 8-element offsets
        g = torch.Generator().manual_seed(3)
        q = torch.randn(2, 3, 45, 96 + 16, generator=g).bfloat16()[..., 8:104]
        k = torch.randn(2, 3, 140, 96, generator=g).bfloat16()[:, :, ::2]
        v = torch.randn(2, 70, 3, 2 * 96, generator=g).bfloat16()[..., 96:].transpose(1, 2)
    else:
        q, k, v = make_qkv(shape, torch.bfloat16, layout, seed=seed_of("fa2-layout", layout))
    check_forward(emulated, q, k, v, None, 0.0, True, True)


def test_fa2_forward_refuses_unaligned_rows(emulated):
    q, k, v = make_qkv(Shape(1, 2, 8, 8, 64, 64), torch.bfloat16, "strided")  # v has a non-unit column stride
    with pytest.raises(RuntimeError, match="does not qualify for fa2"):
        emulated_forward(emulated, q, k, v, kernel="fa2")
    q, k, v = make_qkv(Shape(1, 2, 8, 8, 64, 64), torch.bfloat16)
    with pytest.raises(RuntimeError, match="does not qualify for fa2"):
        emulated_forward(emulated, q[..., :48], k[..., :48], v[..., :48], kernel="fa2")  # head dim 48


@pytest.mark.parametrize("L, S", [(1, 37), (9, 0), (1, 1)])
def test_fa2_forward_edge_lengths(emulated, L, S):
    q, k, v = make_qkv(Shape(2, 2, L, S, 128, 128), torch.float16, "token_major", seed=seed_of("fa2-edge", L, S))
    for causal in CAUSAL:
        check_forward(emulated, q, k, v, None, 0.0, *causal, reference=S > 0)


def test_fa2_nan_in_a_query_reaches_its_output_row(emulated):
    q, k, v = make_qkv(Shape(1, 1, 20, 40, 64, 64), torch.bfloat16, "token_major", seed=seed_of("fa2-nan"))
    q[0, 0, 1, 3] = float("nan")
    bias = make_bias("rows_cols", Shape(1, 1, 20, 40, 64, 64), torch.bfloat16)
    for b in (None, bias):  # the fast and the general path
        out, lse = emulated_forward(emulated, q, k, v, b, kernel="fa2")
        assert out[0, 0, 1].isnan().all() and lse[0, 0, 1].isnan()
        assert not out[0, 0, 0].isnan().any() and not lse[0, 0, 0].isnan()


# ---- backward -----------------------------------------------------------------------------------


def check_backward(emulated, q, k, v, bias, dropout_p, is_causal, bottom_right, seed=0, bias_grad=False,
                   kernel="fa2", reference=True):
    dtype = q.dtype
    out, lse = cpu_forward(q, k, v, bias, dropout_p, is_causal, bottom_right, seed=seed)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(dtype)
    got = emulated_backward(emulated, grad_out, q, k, v, bias, out, lse, dropout_p, is_causal, bottom_right, seed,
                            bias_grad, kernel)
    want = torch.ops.qkv.attention_backward(grad_out, q, k, v, bias, out, lse, dropout_p, is_causal, bottom_right,
                                            None, torch.tensor(seed, dtype=torch.int64), bias_grad)
    names = ("dq", "dk", "dv", "dbias")[: 4 if bias_grad else 3]
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape and g.stride() == w.stride(), name
        assert_close_to_cpu_kernel(name, g, w, dtype)
    if reference and dropout_p == 0.0:
        ref = reference_grads(q, k, v, bias, grad_out, is_causal, bottom_right, torch.float64)
        low = reference_grads(q, k, v, bias, grad_out, is_causal, bottom_right, dtype)
        for name, g, r, lo in zip(names, got, ref, low):
            assert_matches(name, g, r, lo, dtype)
    return got


BACKWARD_LENGTHS = {64: (140, 150), 96: (70, 130), 128: (100, 140), 256: (40, 70)}
BACKWARD_CASES = [pytest.param(D, L, S, id=f"D{D}-L{L}S{S}") for D, (L, S) in BACKWARD_LENGTHS.items()]


@pytest.mark.parametrize("D, L, S", BACKWARD_CASES)
@pytest.mark.parametrize("causal", CAUSAL, ids=CAUSAL_IDS)
def test_fa2_backward(emulated, D, L, S, causal):
    is_causal, bottom_right = causal
    dtype = HALF_TYPES[(D // 32 + int(is_causal)) % 2]
    q, k, v = make_qkv(Shape(1, 2, L, S, D, D), dtype, "token_major", seed=seed_of("fa2-bwd", D, causal))
    check_backward(emulated, q, k, v, None, 0.0, is_causal, bottom_right)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kind", ["full", "key_padding", "per_head_row", "huge_negative"])
def test_fa2_backward_bias_gradient(emulated, D, kind):
    shape = Shape(2, 2, 70, 90, D, D)
    dtype = torch.bfloat16 if D == 64 else torch.float16
    q, k, v = make_qkv(shape, dtype, "token_major", seed=seed_of("fa2-dbias", D, kind))
    if kind == "huge_negative":
        bias = make_bias("rows_cols", shape, dtype)
        bias[:, ::3] = torch.finfo(dtype).min
    else:
        bias = make_bias(kind, shape, dtype)
    if bias.shape[-1] == 1:
        # A bias with one key column takes its gradient from row sums over every key (the generic
        # dQ kernel): fa2, parallel over keys, refuses it.
        with pytest.raises(RuntimeError, match="does not qualify for fa2"):
            check_backward(emulated, q, k, v, bias, 0.0, True, True, bias_grad=True)
        return
    check_backward(emulated, q, k, v, bias, 0.0, True, True, bias_grad=True)


@pytest.mark.parametrize("D", [64, 96])
def test_fa2_backward_dropout_matches_cpu_kernel(emulated, D):
    shape = Shape(2, 2, 70, 130, D, D)
    q, k, v = make_qkv(shape, torch.bfloat16, "token_major", seed=seed_of("fa2-bwd-dropout", D))
    bias = make_bias("key_padding", shape, torch.bfloat16)
    check_backward(emulated, q, k, v, bias, 0.25, True, False, seed=77)
    check_backward(emulated, q, k, v, None, 0.25, False, False, seed=78, bias_grad=False)


@pytest.mark.parametrize("D", [64, 128])
def test_fa2_backward_deterministic_order(emulated, D):
    """The deterministic dQ order: every block waits only for blocks of lower index (the emulator
    fails a wait that is not already satisfied) and the gradients are those of the atomic order."""
    shape = Shape(1, 1, 130, 260, D, D)  # several key blocks and query tiles
    q, k, v = make_qkv(shape, torch.float16, "token_major", seed=seed_of("fa2-det", D))
    for causal in CAUSAL:
        got = check_backward(emulated, q, k, v, None, 0.0, *causal, kernel="fa2-deterministic", reference=False)
        again = check_backward(emulated, q, k, v, None, 0.0, *causal, kernel="fa2", reference=False)
        for g, a in zip(got, again):
            assert torch.equal(g, a)  # sequential blocks: the same additions in the same order


def test_fa2_backward_layouts_and_edges(emulated):
    q, k, v = make_qkv(Shape(2, 2, 33, 45, 64, 64), torch.bfloat16, "expanded", seed=seed_of("fa2-bwd-expanded"))
    check_backward(emulated, q, k, v, None, 0.0, True, True)
    q, k, v = make_qkv(Shape(1, 2, 1, 9, 128, 128), torch.float16, "token_major", seed=seed_of("fa2-bwd-L1"))
    check_backward(emulated, q, k, v, None, 0.0, True, True)
    q, k, v = make_qkv(Shape(1, 2, 5, 0, 64, 64), torch.float16, "token_major", seed=seed_of("fa2-bwd-S0"))
    got = check_backward(emulated, q, k, v, None, 0.0, False, False, reference=False)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    q, k, v = make_qkv(Shape(1, 2, 70, 20, 96, 96), torch.float16, "token_major", seed=seed_of("fa2-bwd-LgtS"))
    check_backward(emulated, q, k, v, None, 0.0, True, True)  # rows that see no key: zero gradients


# ---- the emulator itself ------------------------------------------------------------------------


def test_emulated_ldmatrix_feeds_mma_correctly(emulated):
    """ldmatrix x1/x2/x4, with and without .trans, loading the fragments of one m16n8k16 product
    four different ways: each gives A @ B (small integers: exact in float16 and float32)."""
    g = torch.Generator().manual_seed(11)
    a = torch.randint(-8, 9, (16, 16), generator=g).half()
    b = torch.randint(-8, 9, (16, 8), generator=g).half()
    got = emulated.ldmatrix_probe(a, b)
    want = a.float() @ b.float()
    for route in range(4):
        assert torch.equal(got[route], want), f"route {route}"


@pytest.mark.parametrize("rows", [32, 64, 128])
@pytest.mark.parametrize("cols", [64, 96, 128, 256])
def test_swizzle_is_a_conflict_free_bijection(emulated, rows, cols):
    """fa2::SmemTile's addresses (the C++ function itself): every 16-byte chunk of the tile at its
    own aligned place, and no shared-memory bank conflict in the three access patterns the kernels
    use: an ldmatrix phase (8 consecutive rows at one chunk), a 16-byte copy phase (8 consecutive
    threads, page by page as load_tile_async and store_tile walk) and a warp's 32-bit fragment
    stores (rows g of an 8-row block, words t of one chunk)."""
    address = emulated.swizzle_probe(rows, cols)
    chunks = cols // 8
    flat = address.flatten().tolist()
    assert sorted(flat) == list(range(0, rows * cols * 2, 16)), "a bijection onto the tile's 16-byte chunks"

    def group(a):  # which 16-byte bank group (of 8) a chunk lands in
        return (a >> 4) % 8

    for r0 in range(0, rows, 8):
        for c in range(chunks):
            assert len({group(address[r0 + i, c].item()) for i in range(8)}) == 8, f"ldmatrix rows {r0}+, chunk {c}"
            banks = {((address[r0 + g, c].item() + 4 * t) >> 2) % 32 for g in range(8) for t in range(4)}
            assert len(banks) == 32, f"fragment stores rows {r0}+, chunk {c}"
    page_chunks = (64 if cols % 64 == 0 else 32) // 8
    per_page = rows * page_chunks
    page_major = [((k % per_page) // page_chunks, (k // per_page) * page_chunks + k % page_chunks)
                  for k in range(rows * chunks)]
    for k0 in range(0, len(page_major), 8):
        groups = {group(address[r, c].item()) for r, c in page_major[k0:k0 + 8]}
        assert len(groups) == 8, f"copy threads {k0}..{k0 + 7}"
