"""The core op's issue 17 options, forward, against the plain float64 reference (reference.py):
grouped key/value heads (GQA/MQA), sliding windows, ALiBi, softcap, and all of them together, at
tile edges (forward tiles: 128 query rows x 256 keys), with Sq != Sk both ways and rows that see
no key."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from reference import alibi_slopes, dropout_seed, feature_reference, tolerance, visible_keys

pytestmark = pytest.mark.usefixtures("device")

attention = torch.ops.qkv.attention


def make_inputs(B, H, Hk, L, S, D, Dv=None, dtype=torch.float32, requires_grad=False):
    Dv = D if Dv is None else Dv
    return tuple(torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)
                 for shape in ((B, H, L, D), (B, Hk, S, D), (B, Hk, S, Dv)))




def run(q, k, v, bias=None, is_causal=False, bottom_right=False, scale=None, window=(-1, -1), softcap=0.0,
        alibi=None):
    return attention(q, k, v, bias, 0.0, is_causal, bottom_right, scale, None, window[0], window[1], softcap, alibi)


def check(q, k, v, dtype=torch.float32, **options):
    out, lse = run(q, k, v, **options)
    renamed = dict(options)
    renamed["alibi_slopes"] = renamed.pop("alibi", None)
    want, want_lse = feature_reference(q, k, v, **renamed)
    assert out.shape == want.shape and lse.shape == want_lse.shape
    torch.testing.assert_close(out.double(), want, **tolerance(dtype))
    finite = torch.isfinite(want_lse)
    assert torch.isneginf(lse[~finite]).all()
    torch.testing.assert_close(lse.double()[finite], want_lse[finite], **tolerance(dtype))
    return out


# ---- GQA / MQA ----------------------------------------------------------------------------------

@pytest.mark.parametrize("H,Hk", [(4, 4), (4, 2), (8, 2), (8, 1), (16, 2)])  # group 1, 2, 4, 8 (MQA), 8
@pytest.mark.parametrize("L,S", [(1, 300), (3, 257), (127, 255), (129, 257), (70, 40)])
@pytest.mark.parametrize("is_causal,bottom_right", [(False, False), (True, False), (True, True)])
def test_grouped_heads(H, Hk, L, S, is_causal, bottom_right):
    q, k, v = make_inputs(2, H, Hk, L, S, 24, 17)
    check(q, k, v, is_causal=is_causal, bottom_right=bottom_right)


def test_grouped_heads_read_key_heads_in_place():
    # Key/value heads cut from wider, token-major and expanded tensors: no copy, any strides.
    packed = torch.randn(2, 50, 4 + 2 + 2, 16)  # (B, T, q heads + k heads + v heads, D): one projection
    q, k, v = packed[:, :, :4].transpose(1, 2), packed[:, :, 4:6].transpose(1, 2), packed[:, :, 6:].transpose(1, 2)
    check(q, k, v, is_causal=True)
    k_shared = torch.randn(2, 1, 60, 16).expand(2, 2, 60, 16)
    v_shared = torch.randn(2, 1, 60, 16).expand(2, 2, 60, 16)
    check(torch.randn(2, 6, 30, 32)[..., ::2], k_shared, v_shared)


def test_each_query_head_reads_its_own_group():
    # Key head g differs wildly from the others: a query head reading the wrong group shows.
    q, k, v = make_inputs(1, 6, 3, 20, 30, 8)
    v[:, 1] += 100.0
    out = check(q, k, v)
    assert (out[:, 2:4] > 50).all() and (out[:, :2] < 50).all() and (out[:, 4:] < 50).all()


# ---- windows ------------------------------------------------------------------------------------

WINDOWS = [(0, 0), (3, 5), (16, 0), (0, 16), (100, -1), (-1, 7), (300, 300), (255, 0), (256, 1), (600, 0)]


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("L,S", [(300, 300), (129, 600), (600, 129), (1, 513)])
@pytest.mark.parametrize("bottom_right", [False, True])
def test_windows(window, L, S, bottom_right):
    q, k, v = make_inputs(1, 2, 2, L, S, 16)
    check(q, k, v, window=window, bottom_right=bottom_right)


@pytest.mark.parametrize("window", [(0, -1), (5, -1), (255, -1), (256, -1), (1000, -1)], ids=str)
@pytest.mark.parametrize("L,S", [(513, 513), (100, 700), (700, 100)])
def test_causal_windows(window, L, S):
    # causal sets right = 0: the sliding window of Mistral (left = window - 1).
    q, k, v = make_inputs(1, 2, 1, L, S, 32)
    check(q, k, v, is_causal=True, bottom_right=True, window=window)
    check(q, k, v, is_causal=True, bottom_right=False, window=(window[0], 9))  # right ignored under causal


def test_rows_outside_every_window_output_zeros():
    # Bottom-right with more queries than keys: the first rows' bands lie before key 0.
    q, k, v = make_inputs(2, 2, 1, 40, 10, 8)
    out = check(q, k, v, window=(3, 0), bottom_right=True)
    hidden_rows = ~visible_keys(40, 10, False, (3, 0), True).any(-1)
    assert hidden_rows.sum() == 30 and (out[:, :, hidden_rows] == 0).all()
    # Top-left, window (2, 2) over 10 keys: rows from 12 on see nothing.
    out = check(q, k, v, window=(2, 2))
    assert (out[:, :, 12:] == 0).all() and (out[:, :, :12] != 0).any(-1).all()


@pytest.mark.cpu_only("where NaN shows depends on the CPU forward tiles (128 x 256)")
def test_key_blocks_outside_the_band_are_skipped():
    # Whole key blocks outside the band are never read: NaN keys there would poison a row whose
    # block was computed and masked afterwards (0 * NaN in P V), so finite rows prove the skip,
    # and the cost grows with L x window, not L^2. Forward tiles: 128 query rows x 256 keys.
    q, k, v = make_inputs(1, 1, 1, 1024, 1024, 16)
    for t in (k, v):
        t[:, :, :256] = float("nan")   # before the band of rows >= 384 (window 128)
        t[:, :, 640:] = float("nan")   # after every causal row < 640 of blocks ending there
    out, _ = run(q, k, v, is_causal=True, window=(128, -1))
    assert not out[:, :, 384:512].isnan().any()
    assert out[:, :, :256].isnan().all()  # these rows do see NaN keys


# ---- ALiBi and softcap ------------------------------------------------------------------------

@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("L,S", [(1, 300), (129, 257), (257, 129)])
@pytest.mark.parametrize("is_causal,bottom_right", [(False, False), (True, False), (True, True), (False, True)])
def test_alibi(per_batch, L, S, is_causal, bottom_right):
    q, k, v = make_inputs(2, 4, 2, L, S, 16)
    check(q, k, v, is_causal=is_causal, bottom_right=bottom_right, alibi=alibi_slopes(4, 2 if per_batch else None))


@pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
@pytest.mark.parametrize("L,S", [(1, 40), (127, 255), (130, 600)])
def test_softcap(softcap, L, S):
    q, k, v = make_inputs(2, 2, 2, L, S, 32)
    check(q * 4, k, v, softcap=softcap)  # sharp scores, so that the cap matters
    check(q * 4, k, v, softcap=softcap, is_causal=True, bottom_right=True)


def test_softcap_applies_before_alibi_and_bias():
    q, k, v = make_inputs(1, 2, 2, 9, 11, 8)
    bias = torch.randn(9, 11)
    check(q * 8, k, v, bias=bias, softcap=1.0, alibi=alibi_slopes(2))


# ---- everything together ------------------------------------------------------------------------

@pytest.mark.parametrize("B,H,Hk,L,S,D,Dv", [
    (2, 4, 2, 127, 255, 15, 17),
    (1, 8, 1, 128, 256, 16, 16),
    (2, 6, 3, 129, 257, 33, 8),
    (1, 2, 1, 3, 600, 20, 9),    # few query rows: keys read in place
    (1, 4, 2, 500, 70, 24, 24),  # L > S
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_options_together(B, H, Hk, L, S, D, Dv, dtype):
    q, k, v = make_inputs(B, H, Hk, L, S, D, Dv, dtype=dtype)
    bias = torch.randn(B, 1, 1, S, dtype=dtype)
    bias[0, ..., :3] = -math.inf
    check(q, k, v, dtype=dtype, bias=bias, is_causal=True, bottom_right=True, window=(90, -1), softcap=3.0,
          alibi=alibi_slopes(H, B), scale=0.3)
    check(q, k, v, dtype=dtype, window=(40, 20), softcap=10.0, alibi=alibi_slopes(H))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision(dtype):
    q, k, v = make_inputs(2, 4, 2, 70, 300, 32, dtype=dtype)
    check(q, k, v, dtype=dtype, is_causal=True, bottom_right=True, window=(64, -1), softcap=5.0,
          alibi=alibi_slopes(4))


def test_dropout_is_replayed_by_the_weights_op():
    q, k, v = make_inputs(2, 4, 2, 40, 70, 8, dtype=torch.float64)
    seed = dropout_seed(77)
    options = (16, 4, 2.0, alibi_slopes(4))
    out, lse = attention(q, k, v, None, 0.3, True, True, None, seed, *options)
    weights = torch.ops.qkv.attention_weights(q, k, None, lse, 0.3, True, True, None, seed, False, *options)
    torch.testing.assert_close(weights @ v.repeat_interleave(2, 1), out, **tolerance(torch.float64))
    probs = torch.ops.qkv.attention_weights(q, k, None, lse, 0.0, True, True, None, None, False, *options)
    kept = weights != 0
    assert 0.6 < kept.sum() / (probs != 0).sum() < 0.8
    torch.testing.assert_close(weights[kept], probs[kept] / 0.7, **tolerance(torch.float64))


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), Hk=st.integers(1, 3), group=st.sampled_from([1, 2, 4]), L=st.integers(1, 80),
       S=st.integers(1, 300), D=st.integers(1, 24), causal=st.booleans(), bottom_right=st.booleans(),
       left=st.integers(-1, 300), right=st.integers(-1, 300), softcap=st.sampled_from([0.0, 0.7, 20.0]),
       alibi=st.booleans())
def test_random_options_property(B, Hk, group, L, S, D, causal, bottom_right, left, right, softcap, alibi):
    H = Hk * group
    q, k, v = make_inputs(B, H, Hk, L, S, D, dtype=torch.float64)
    check(q, k, v, dtype=torch.float64, is_causal=causal, bottom_right=bottom_right, window=(left, right),
          softcap=softcap, alibi=alibi_slopes(H) if alibi else None)


@pytest.mark.parametrize("make_args,message", [
    (lambda q, k, v: (q[:, :3], k, v), r"query's heads \(3\) must be divisible by key's heads \(2\)"),
    (lambda q, k, v: (q, k, v[:, :1]), r"value must have shape \(2, 2, 7, value_head_dim\)"),
    (lambda q, k, v: (q, k, v, None, 0.0, False, False, None, None, -2), r"window_left must be -1 \(unbounded\) or >= 0; got -2"),
    (lambda q, k, v: (q, k, v, None, 0.0, False, False, None, None, -1, -5), r"window_right must be -1 \(unbounded\) or >= 0; got -5"),
    (lambda q, k, v: (q, k, v, None, 0.0, False, False, None, None, -1, -1, -0.5), r"softcap must be a finite number >= 0 \(0: off\); got -0.5"),
    (lambda q, k, v: (q, k, v, None, 0.0, False, False, None, None, -1, -1, float("inf")), r"softcap must be a finite number"),
    (lambda q, k, v: (q, k, v, None, 0.0, False, False, None, None, -1, -1, 0.0, torch.ones(3)),
     r"alibi_slopes must be a float32 tensor of shape \(4\) or \(2, 4\) on (cpu|cuda:\d+); got .*\[3\]"),
    (lambda q, k, v: (q, k, v, None, 0.0, False, False, None, None, -1, -1, 0.0, torch.ones(4, dtype=torch.float64)),
     r"alibi_slopes must be a float32 tensor"),
    (lambda q, k, v: (q, k, v, None, 0.0, False, False, None, None, -1, -1, 0.0, torch.ones(1, 4)),
     r"alibi_slopes must be a float32 tensor of shape \(4\) or \(2, 4\)"),
])
def test_errors_name_the_argument(make_args, message):
    q, k, v = make_inputs(2, 4, 2, 5, 7, 8)
    with pytest.raises(RuntimeError, match=message):
        attention(*make_args(q, k, v))
