"""Issue 17's options on the generic CUDA kernels, run on the CPU through the emulation of
tests/cuda_emulation (see test_cuda_emulation.py): grouped key/value heads (GQA 4:1, MQA), sliding
windows narrower and wider than a tile, softcap, ALiBi ((H,) and (B, H) slopes), packed varlen
sequences (empty ones included) and KV-cache key counts, forward and backward, against the plain
float64 references of tests/reference.py (and, with dropout, against the CPU kernels, whose
dropout masks must agree)."""
from __future__ import annotations

import zlib

import pytest
import torch

import qkv  # noqa: F401  (registers torch.ops.qkv)
from reference import alibi_slopes, feature_reference, feature_scores, kvcache_reference, varlen_reference
from test_cuda_emulation import emulated  # noqa: F401  (the fixture that builds the emulated kernels)

TOL = {torch.float64: 1e-10, torch.float32: 3e-5}


def randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def token_major(B, H, L, D, dtype, seed):
    """(B, H, L, D) stored as (B, L, H, D): the layout the modules hand the kernels."""
    return randn(B, L, H, D, dtype=dtype, seed=seed).transpose(1, 2)


def close(name, got, want, dtype):
    tol = TOL[dtype]
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def options_of(case):
    """(kernel keyword arguments, reference keyword arguments) of one case."""
    window, softcap, slopes, is_causal, bottom_right = case
    kernel = dict(window_left=window[0], window_right=window[1], softcap=softcap, alibi_slopes=slopes,
                  bottom_right=bottom_right)
    ref = dict(window=window, softcap=softcap, alibi_slopes=slopes, is_causal=is_causal, bottom_right=bottom_right)
    return kernel, ref


def emulated_dense(ops, q, k, v, case, scale, kernel="generic"):
    opts, _ = options_of(case)
    is_causal, bottom_right = case[3], case[4]
    offset = k.shape[2] - q.shape[2] if bottom_right else 0
    return ops.forward(q, k, v, None, scale, is_causal, offset, 0.0, 0, kernel, **opts)


# (window, softcap, ALiBi slopes (None, "h" or "bh"), is_causal, bottom_right)
CASES = {
    "window_narrow": ((5, 3), 0.0, None, False, False),  # narrower than a tile
    "window_wide_causal": ((40, -1), 0.0, None, True, True),  # wider than a tile
    "window_left_only": ((-1, 2), 0.0, None, False, True),
    "window_nothing_seen": ((0, 0), 0.0, None, False, False),  # L > S: rows past S see nothing
    "softcap": ((-1, -1), 3.0, None, False, False),
    "alibi_h_causal": ((-1, -1), 0.0, "h", True, True),
    "alibi_bh_softcap_window": ((7, 9), 2.0, "bh", False, True),
}
SHAPES = [(1, 1), (33, 65), (70, 31), (16, 16)]  # (L, S): tile edges, L < S, L > S
# (query heads, key/value heads): GQA 4:1 with two key/value heads (so a wrong head map shows), MQA.
HEADS = {"mha": (4, 4), "gqa4": (8, 2), "mqa": (3, 1)}


def slopes_of(kind, B, H):
    return None if kind is None else alibi_slopes(H, B if kind == "bh" else None)


@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("LS", SHAPES, ids=lambda x: f"L{x[0]}S{x[1]}")
@pytest.mark.parametrize("heads", ["mha", "gqa4"])
def test_feature_forward(emulated, case, LS, heads):
    L, S = LS
    (H, Hk), B, D, Dv = HEADS[heads], 2, 16, 24
    window, softcap, slope_kind, is_causal, bottom_right = CASES[case]
    slopes = slopes_of(slope_kind, B, H)
    c = (window, softcap, slopes, is_causal, bottom_right)
    seed = zlib.crc32(repr((case, LS, heads)).encode()) % 1000
    for dtype in (torch.float64, torch.float32):
        q, k, v = token_major(B, H, L, D, dtype, seed), token_major(B, Hk, S, D, dtype, seed + 1), \
            token_major(B, Hk, S, Dv, dtype, seed + 2)
        out, lse = emulated_dense(emulated, q, k, v, c, 0.7)
        want, want_lse = feature_reference(q, k, v, scale=0.7, **options_of(c)[1])
        close("out", out, want, dtype)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
        finite = torch.isfinite(want_lse)
        close("lse", lse[finite], want_lse[finite], dtype)


def reference_grads(q, k, v, grad_out, **options):
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out, _ = feature_reference(*leaves, **options)
    return torch.autograd.grad(out, leaves, grad_out.double())


def emulated_backward(ops, q, k, v, out, lse, grad_out, case, scale):
    opts, _ = options_of(case)
    is_causal, bottom_right = case[3], case[4]
    offset = k.shape[2] - q.shape[2] if bottom_right else 0
    return ops.backward(grad_out, q, k, v, None, None, out, lse, scale, is_causal, offset, 0.0, 0, False, "generic",
                        **opts)[:3]


@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("LS", [(33, 65), (70, 31)], ids=lambda x: f"L{x[0]}S{x[1]}")
@pytest.mark.parametrize("heads", ["mha", "gqa4", "mqa"])
def test_feature_backward(emulated, case, LS, heads):
    L, S = LS
    (H, Hk), B, D, Dv = HEADS[heads], 1, 16, 8
    window, softcap, slope_kind, is_causal, bottom_right = CASES[case]
    slopes = slopes_of(slope_kind, B, H)
    c = (window, softcap, slopes, is_causal, bottom_right)
    seed = zlib.crc32(repr((case, LS, heads, "bwd")).encode()) % 1000
    for dtype in (torch.float64, torch.float32):
        q, k, v = token_major(B, H, L, D, dtype, seed), token_major(B, Hk, S, D, dtype, seed + 1), \
            token_major(B, Hk, S, Dv, dtype, seed + 2)
        grad_out = token_major(B, H, L, Dv, dtype, seed + 3)
        out, lse = emulated_dense(emulated, q, k, v, c, 0.6)
        got = emulated_backward(emulated, q, k, v, out, lse, grad_out, c, 0.6)
        want = reference_grads(q, k, v, grad_out, scale=0.6, **options_of(c)[1])
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            assert g.shape == w.shape, name
            close(name, g, w, dtype)


def test_feature_weights(emulated):
    """attention_weights (need_weights) with a window, softcap and ALiBi: softmax of the scores."""
    B, H, L, S, D = 2, 3, 37, 45, 16
    slopes = alibi_slopes(H, B)
    q, k = token_major(B, H, L, D, torch.float64, 5), token_major(B, H, S, D, torch.float64, 6)
    c = ((9, 4), 2.5, slopes, True, True)
    opts, ref_opts = options_of(c)
    _, lse = emulated_dense(emulated, q, k, k, c, 0.5)
    w = emulated.weights(q, k, None, lse, 0.5, True, S - L, 0.0, 0, **opts)
    want = torch.softmax(feature_scores(q, k, scale=0.5, **ref_opts), -1).nan_to_num(0.0)
    close("weights", w, want, torch.float64)


# Sequences (query, key) lengths: an empty query sequence, an empty key sequence (its rows see
# nothing), both empty, and sequences longer / shorter than a tile; 3 rows past the last offset.
VARLEN = [(5, 7), (0, 3), (40, 33), (6, 0), (0, 0), (17, 70), (1, 1)]


def packed(lengths, H, D, dtype, seed, pad):
    total = sum(lengths) + pad
    return randn(total, H, D, dtype=dtype, seed=seed)


def offsets(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int64)


def as_4d(t):
    return t.transpose(0, 1).unsqueeze(0)


@pytest.mark.parametrize("case", ["plain", "causal", "window_narrow", "alibi_bh_softcap_window", "window_wide_causal"])
@pytest.mark.parametrize("heads", ["mha", "gqa4"])
def test_varlen(emulated, case, heads):
    (H, Hk), B, D, Dv = HEADS[heads], len(VARLEN), 16, 8
    c = ((-1, -1), 0.0, None, case == "causal", True) if case in ("plain", "causal") else CASES[case]
    slopes = slopes_of(c[2], B, H)
    c = (c[0], c[1], slopes, c[3], c[4])
    opts, ref_opts = options_of(c)
    cu_q, cu_k = offsets([a for a, _ in VARLEN]), offsets([b for _, b in VARLEN])
    for dtype in (torch.float64, torch.float32):
        q = packed([a for a, _ in VARLEN], H, D, dtype, 1, pad=3)
        k = packed([b for _, b in VARLEN], Hk, D, dtype, 2, pad=2)
        v = packed([b for _, b in VARLEN], Hk, Dv, dtype, 3, pad=2)
        grad_out = randn(q.shape[0], H, Dv, dtype=dtype, seed=4)
        out4, lse = emulated.forward(as_4d(q), as_4d(k), as_4d(v), None, 0.8, c[3], 0, 0.0, 0, "generic",
                                     cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **opts)
        out = out4[0].transpose(0, 1)
        want, want_lse = varlen_reference(q, k, v, cu_q, cu_k, scale=0.8, **ref_opts)
        close("out", out, want, dtype)
        lse = lse[0]
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
        finite = torch.isfinite(want_lse)
        close("lse", lse[finite], want_lse[finite], dtype)

        grads = emulated.backward(as_4d(grad_out), as_4d(q), as_4d(k), as_4d(v), None, None, out4, lse[None], 0.8,
                                  c[3], 0, 0.0, 0, False, "generic", cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **opts)
        leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        ref_out, _ = varlen_reference(*leaves, cu_q, cu_k, scale=0.8, **ref_opts)
        want_grads = torch.autograd.grad(ref_out, leaves, grad_out.double())
        for name, g, w in zip(("dq", "dk", "dv"), grads[:3], want_grads):
            close(name, g[0].transpose(0, 1), w, dtype)


def test_varlen_dropout_matches_cpu_kernel(emulated):
    """The dropout counter of a packed sequence (logical sequence index, max_seqlen strides) is the
    CPU kernel's: same seed, same kept entries, same output and gradients."""
    H, D = 2, 16
    lengths = [(5, 7), (0, 3), (40, 33), (17, 70)]
    cu_q, cu_k = offsets([a for a, _ in lengths]), offsets([b for _, b in lengths])
    max_q, max_k = max(a for a, _ in lengths), max(b for _, b in lengths)
    q = packed([a for a, _ in lengths], H, D, torch.float64, 7, pad=0).requires_grad_(True)
    k = packed([b for _, b in lengths], 1, D, torch.float64, 8, pad=0).requires_grad_(True)
    v = packed([b for _, b in lengths], 1, D, torch.float64, 9, pad=0).requires_grad_(True)
    seed = 1234
    out4, lse = emulated.forward(as_4d(q.detach()), as_4d(k.detach()), as_4d(v.detach()), None, 0.25, True, 0, 0.3,
                                 seed, "generic", cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, bottom_right=True,
                                 window_left=20)
    want, want_lse = torch.ops.qkv.attention_varlen(q, k, v, cu_q.int(), cu_k.int(), max_q, max_k, 0.3, True, True,
                                                    0.25, torch.tensor(seed), 20, -1, 0.0, None)
    close("out", out4[0].transpose(0, 1), want.detach(), torch.float64)
    grad_out = randn(*want.shape, dtype=torch.float64, seed=10)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    grads = emulated.backward(as_4d(grad_out), as_4d(q.detach()), as_4d(k.detach()), as_4d(v.detach()), None, None,
                              out4, lse, 0.25, True, 0, 0.3, seed, False, "generic", cu_seqlens_q=cu_q,
                              cu_seqlens_k=cu_k, bottom_right=True, window_left=20)
    for name, g, w in zip(("dq", "dk", "dv"), grads[:3], want_grads):
        close(name, g[0].transpose(0, 1), w, torch.float64)


@pytest.mark.parametrize("Sq", [1, 3])
@pytest.mark.parametrize("options", ["plain", "window_softcap_alibi"])
def test_kvcache(emulated, Sq, options):
    """Decoding from a KV cache: batch element b uses its first cache_seqlens[b] + Sq keys, bottom-
    right aligned (the door writes the new keys first; here the caches already hold them)."""
    B, H, Hk, D, cache = 3, 8, 2, 16, 80
    cache_seqlens = torch.tensor([0, 37, 80 - Sq])
    q = token_major(B, H, Sq, D, torch.float32, 11)
    k_cache, v_cache = randn(B, Hk, cache, D, dtype=torch.float32, seed=12), \
        randn(B, Hk, cache, D, dtype=torch.float32, seed=13)
    k_new, v_new = randn(B, Hk, Sq, D, dtype=torch.float32, seed=14), randn(B, Hk, Sq, D, dtype=torch.float32, seed=15)
    ref_opts = {} if options == "plain" else dict(window=(30, -1), softcap=4.0, alibi_slopes=alibi_slopes(H, B))
    want, want_lse, k_after, v_after = kvcache_reference(q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                                                         is_causal=True, scale=0.3, **ref_opts)
    opts = {} if options == "plain" else dict(window_left=30, softcap=4.0, alibi_slopes=alibi_slopes(H, B))
    out, lse = emulated.forward(q, k_after.float(), v_after.float(), None, 0.3, True, 0, 0.0, 0, "generic",
                                kv_lens=cache_seqlens + Sq, bottom_right=True, **opts)
    close("out", out, want, torch.float32)
    close("lse", lse, want_lse, torch.float32)


@pytest.mark.parametrize("kernel", ["mma", "fa2"])
def test_fast_paths_refuse_the_options(emulated, kernel):
    """The fast paths never run a call with these options (their *_supported test says no)."""
    q, k, v = (token_major(1, 4, 16, 64, torch.float16, s) for s in (1, 2, 3))
    with pytest.raises(RuntimeError, match="does not qualify"):
        emulated_dense(emulated, q, k[:, :1], v[:, :1], ((-1, -1), 0.0, None, False, False), 0.125, kernel)
    with pytest.raises(RuntimeError, match="does not qualify"):
        emulated_dense(emulated, q, k, v, ((4, 0), 0.0, None, False, False), 0.125, kernel)
