"""The split-KV decode forward (csrc/cuda/decode_kernels.cuh) run on the CPU through the emulation of
tests/cuda_emulation (see test_cuda_emulation.py): the split kernel and the combine, against the
float64 references of tests/reference.py and against the emulated generic forward, for decode
shapes (L = 1 to 16, odd S), every split count from 1 to more splits than keys, grouped key/value
heads (rows of a group sharing a block, in one or several row chunks), KV-cache key counts (0
included), both causal alignments, windows, softcap, ALiBi, a bias, float32/float16/bfloat16, and the
calls the kernel must refuse. The heuristic's split counts are checked too (decode_plan.h)."""
from __future__ import annotations

import zlib

import pytest
import torch

import qkv  # noqa: F401  (registers torch.ops.qkv)
from reference import alibi_slopes, feature_reference
from test_cuda_emulation import emulated  # noqa: F401  (the fixture that builds the emulated kernels)

# Bounds against the float64 reference, relative to max |out| (at least 1): the kernel accumulates in
# float32 and rounds only the output to the input dtype.
OUT_TOL = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
LSE_TOL = 3e-5


def randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def token_major(B, H, L, D, dtype, seed):
    """(B, H, L, D) views of (B, L, H, D) memory: the layout of projections and KV caches."""
    return randn(B, L, H, D, dtype=dtype, seed=seed).transpose(1, 2)


def seed_of(*parts):
    return zlib.crc32(repr(parts).encode()) % 10000


def assert_out(got, want, dtype):
    tol = OUT_TOL[dtype]
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=tol * scale)


def assert_lse(got, want):
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "lse is -inf exactly on rows that see nothing"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite].double(), rtol=LSE_TOL, atol=LSE_TOL)


def split_forward(ops, q, k, v, splits, bias=None, scale=0.3, is_causal=False, bottom_right=False, kernel=None,
                  **options):
    offset = k.shape[2] - q.shape[2] if bottom_right else 0
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    name = kernel or (f"split:{splits}" if splits else "split")
    return ops.forward(q, k, v, bias, scale, is_causal, offset, 0.0, 0, name, bottom_right=bottom_right, **options)


def reference(q, k, v, bias=None, scale=0.3, is_causal=False, bottom_right=False, window=(-1, -1), softcap=0.0,
              slopes=None):
    return feature_reference(q, k, v, bias, is_causal, bottom_right, scale, window, softcap, slopes)


# (query heads, key/value heads): one row per block (MHA, L = 1), a group of 4 sharing a block, a
# group of 3 padded to 4 rows, and 8 heads x L rows in several row chunks of 8.
HEADS = {"mha": (4, 4), "gqa4": (8, 2), "mqa3": (3, 1), "gqa8": (16, 2)}
SPLITS = [1, 3, 64]  # 64: more splits than key steps, most of them empty


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("L", [1, 3])
def test_split_decode_matches_reference(emulated, splits, heads, L):
    H, Hk = HEADS[heads]
    B, S, D = 2, 203, 64
    seed = seed_of("ref", splits, heads, L)
    for dtype in (torch.float32, torch.bfloat16):
        q = token_major(B, H, L, D, dtype, seed)
        k, v = token_major(B, Hk, S, D, dtype, seed + 1), token_major(B, Hk, S, D, dtype, seed + 2)
        out, lse = split_forward(emulated, q, k, v, splits)
        want, want_lse = reference(q, k, v)
        assert_out(out, want, dtype)
        assert_lse(lse, want_lse)
        # The generic forward computes the same function (both accumulate in float32).
        gen_out, gen_lse = split_forward(emulated, q, k, v, 0, kernel="generic")
        assert_out(out, gen_out, dtype)
        assert_lse(lse, gen_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [8, 32, 64, 128, 256])
def test_split_decode_head_dims(emulated, dtype, D):
    """Every lanes-per-key choice (4, 8, 16, 32 lanes; two 16-byte chunks per lane for float32
    D = 256) and head dims narrower than the lanes cover."""
    if D == 8 and dtype == torch.float32:
        D = 4
    B, H, S = 1, 2, 77
    seed = seed_of("dims", str(dtype), D)
    q = token_major(B, H, 1, D, dtype, seed)
    k, v = token_major(B, H, S, D, dtype, seed + 1), token_major(B, H, S, D, dtype, seed + 2)
    out, lse = split_forward(emulated, q, k, v, 5, scale=D ** -0.5)
    want, want_lse = reference(q, k, v, scale=D ** -0.5)
    assert_out(out, want, dtype)
    assert_lse(lse, want_lse)


CAUSAL = {"full": (False, False), "causal": (True, False), "causal_bottom_right": (True, True)}


@pytest.mark.parametrize("causal", list(CAUSAL))
@pytest.mark.parametrize("LS", [(4, 150), (9, 6)], ids=lambda x: f"L{x[0]}S{x[1]}")
def test_split_decode_causal_alignments(emulated, causal, LS):
    """Top-left and bottom-right causal masks; L > S leaves bottom-right rows that see nothing."""
    is_causal, bottom_right = CAUSAL[causal]
    L, S = LS
    B, H, Hk, D = 2, 4, 2, 32
    seed = seed_of("causal", causal, LS)
    q = token_major(B, H, L, D, torch.float32, seed)
    k, v = token_major(B, Hk, S, D, torch.float32, seed + 1), token_major(B, Hk, S, D, torch.float32, seed + 2)
    for splits in (1, 4):
        out, lse = split_forward(emulated, q, k, v, splits, is_causal=is_causal, bottom_right=bottom_right)
        want, want_lse = reference(q, k, v, is_causal=is_causal, bottom_right=bottom_right)
        assert_out(out, want, torch.float32)
        assert_lse(lse, want_lse)


OPTIONS = {
    "window": dict(window=(20, 3), softcap=0.0, slopes=None),
    "softcap": dict(window=(-1, -1), softcap=2.5, slopes=None),
    "alibi_bh_window_left": dict(window=(60, -1), softcap=0.0, slopes="bh"),
    "alibi_h_softcap": dict(window=(-1, -1), softcap=4.0, slopes="h"),
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_split_decode_options(emulated, case):
    """Windows (the block's key range narrows to the rows' bands), softcap and ALiBi per query head."""
    B, H, Hk, L, S, D = 2, 8, 2, 2, 181, 32
    o = OPTIONS[case]
    slopes = None if o["slopes"] is None else alibi_slopes(H, B if o["slopes"] == "bh" else None)
    seed = seed_of("opt", case)
    q = token_major(B, H, L, D, torch.float32, seed)
    k, v = token_major(B, Hk, S, D, torch.float32, seed + 1), token_major(B, Hk, S, D, torch.float32, seed + 2)
    for splits in (1, 6):
        out, lse = split_forward(emulated, q, k, v, splits, is_causal=True, bottom_right=True,
                                 window_left=o["window"][0], window_right=o["window"][1], softcap=o["softcap"],
                                 alibi_slopes=slopes)
        want, want_lse = reference(q, k, v, is_causal=True, bottom_right=True, window=o["window"],
                                   softcap=o["softcap"], slopes=slopes)
        assert_out(out, want, torch.float32)
        assert_lse(lse, want_lse)


def test_split_decode_bias(emulated):
    """A key-padding bias with -inf entries (batch 1 hides every key: out 0, lse -inf) and a finite
    per-element bias with huge negative entries (finite: still visible)."""
    B, H, L, S, D = 2, 4, 2, 99, 32
    q = token_major(B, H, L, D, torch.bfloat16, 1)
    k, v = token_major(B, H, S, D, torch.bfloat16, 2), token_major(B, H, S, D, torch.bfloat16, 3)
    padding = torch.zeros(B, 1, 1, S, dtype=torch.bfloat16)
    padding[0, ..., 60:] = float("-inf")
    padding[1] = float("-inf")
    full = randn(B, H, L, S, dtype=torch.bfloat16, seed=4)
    full[..., ::7] = torch.finfo(torch.bfloat16).min
    for bias in (padding, full):
        out, lse = split_forward(emulated, q, k, v, 7, bias=bias)
        want, want_lse = reference(q, k, v, bias=bias)
        assert_out(out, want, torch.bfloat16)
        assert_lse(lse, want_lse)


@pytest.mark.parametrize("Sq", [1, 3])
@pytest.mark.parametrize("splits", [None, 1, 9])
def test_split_decode_kv_cache_lengths(emulated, Sq, splits):
    """Per-batch key counts of a KV cache (bottom-right causal): 0 keys (out 0 and lse -inf, as the
    generic forward), fewer keys than Sq, part of the cache, the whole cache."""
    B, H, Hk, D, cache = 4, 8, 2, 64, 150
    kv_lens = torch.tensor([0, 2, 77, cache])
    seed = seed_of("kv", Sq, splits)
    q = token_major(B, H, Sq, D, torch.bfloat16, seed)
    k, v = token_major(B, Hk, cache, D, torch.bfloat16, seed + 1), token_major(B, Hk, cache, D, torch.bfloat16, seed + 2)
    out, lse = split_forward(emulated, q, k, v, splits, is_causal=True, bottom_right=True, kv_lens=kv_lens)
    gen_out, gen_lse = split_forward(emulated, q, k, v, 0, is_causal=True, bottom_right=True, kv_lens=kv_lens,
                                     kernel="generic")
    assert_out(out, gen_out, torch.bfloat16)
    assert_lse(lse, gen_lse)
    for b, n in enumerate(kv_lens.tolist()):
        want, want_lse = reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], is_causal=True, bottom_right=True)
        assert_out(out[b:b + 1], want, torch.bfloat16)
        assert_lse(lse[b:b + 1], want_lse)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()


def test_split_decode_reads_strided_queries_and_sliced_caches(emulated):
    """Queries with any strides (read per element), K/V as contiguous (B, H, S, D), as a slice of a
    longer cache, and with the batch stride of an expanded batch."""
    B, H, S, D = 2, 4, 90, 64
    q = randn(B, H, 1, D + 5, dtype=torch.float16, seed=1)[..., 3:3 + D]
    k = randn(B, H, S + 40, D, dtype=torch.float16, seed=2)[:, :, 10:10 + S]
    v = randn(1, H, S, D, dtype=torch.float16, seed=3).expand(B, H, S, D)
    out, lse = split_forward(emulated, q, k, v, 4)
    want, want_lse = reference(q, k, v)
    assert_out(out, want, torch.float16)
    assert_lse(lse, want_lse)


@pytest.mark.parametrize("why", ["float64", "dropout", "head_dim", "d_ne_dv", "value_column_stride",
                                 "value_transposed", "unaligned", "prefill"])
def test_split_decode_refuses_what_it_does_not_serve(emulated, why):
    B, H, L, S, D = 1, 2, 1, 40, 64
    dtype = torch.float64 if why == "float64" else torch.bfloat16
    L = 17 if why == "prefill" else L
    Dq = 60 if why == "head_dim" else D
    q, k = token_major(B, H, L, Dq, dtype, 1), token_major(B, H, S, Dq, dtype, 2)
    v = token_major(B, H, S, 32 if why == "d_ne_dv" else Dq, dtype, 3)
    if why == "value_column_stride":  # rows 16-byte aligned, but every other element
        v = randn(B, H, S, 2 * Dq, dtype=dtype, seed=4)[..., ::2]
    if why == "value_transposed":
        v = randn(B, H, Dq, S, dtype=dtype, seed=4).transpose(-1, -2)
    if why == "unaligned":  # strides in whole 16-byte vectors, the first element 2 bytes past a boundary
        k = randn(B, H, S, Dq + 8, dtype=dtype, seed=5)[..., 1:1 + Dq]
    dropout = 0.1 if why == "dropout" else 0.0
    with pytest.raises(RuntimeError, match="does not qualify for the split decode"):
        emulated.forward(q, k, v, None, 0.1, False, 0, dropout, 0, "split:2")


def test_split_count_heuristic(emulated):
    """decode_plan.h, after FlashAttention-2's num_splits_heuristic: 1 split once the grid fills 80% of
    the resident blocks (528: 132 multiprocessors x 4; 396: x 3); otherwise the smallest split count,
    among those that change the keys per split (blocks of 128 keys), whose last wave is within 85% of
    the fullest one; at most 256."""
    splits = emulated.decode_splits
    assert splits(16, 4096, 528) == 32  # B 1, H 16, MHA, S 4096: 32 key blocks, one per split
    assert splits(16, 16384, 528) == 32  # S 16384: 512 of 528 resident blocks
    assert splits(16, 16384, 396) == 19  # 3 blocks per multiprocessor
    assert splits(64, 16384, 396) == 6  # B 4
    assert splits(256, 16384, 396) == 3  # B 16: 768 blocks, two nearly full waves
    assert splits(100, 16384, 396) == 7  # 700 blocks: 1.77 waves (2 or 3 splits leave one less full)
    assert splits(512, 16384, 528) == 1  # B 32: enough blocks already
    assert splits(4, 16384, 264) == 64  # B 1, GQA 4:1 (4 rows per block)
    assert splits(2, 16384, 528) == 128  # B 1 with 2 key/value heads: one split per key block
    assert splits(1, 1 << 20, 528) == 222  # 222 of 256: the first within 85% of the best wave
    assert splits(1, 200, 528) == 2  # two key blocks
    assert splits(4, 100, 528) == 1  # one key block
    assert splits(4, 0, 528) == 1
    for base in (1, 3, 16, 100, 263, 264, 265, 1000):
        for keys in (1, 128, 129, 5000, 16384):
            n = splits(base, keys, 528)
            assert 1 <= n <= 256 and n <= (keys + 127) // 128
            assert n == 1 or base * 5 < 528 * 4
