"""Gradients of the core op's issue 17 options: float64 gradcheck with softcap (tanh's derivative),
ALiBi, windows and grouped key/value heads, and float32 gradients against the float64 reference at
the backward tile edges (64 query rows x 128 keys)."""
import math

import pytest
import torch

from reference import alibi_slopes, dropout_seed, feature_reference

pytestmark = pytest.mark.usefixtures("device")

attention = torch.ops.qkv.attention


def leaves(B, H, Hk, L, S, D, Dv=None, dtype=torch.float64):
    Dv = D if Dv is None else Dv
    return tuple(torch.randn(*shape, dtype=dtype, requires_grad=True)
                 for shape in ((B, H, L, D), (B, Hk, S, D), (B, Hk, S, Dv)))




@pytest.mark.parametrize("H,Hk", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("L,S", [(1, 5), (6, 9), (9, 4)])
@pytest.mark.parametrize("options", [
    dict(softcap=0.8),
    dict(alibi=True),
    dict(softcap=2.0, alibi=True, window=(2, 1)),
    dict(is_causal=True, bottom_right=True, window=(1, -1), softcap=1.5),
    dict(is_causal=True, window=(3, -1), alibi=True, bias=True),
], ids=lambda o: "-".join(sorted(o)))
def test_gradcheck(H, Hk, L, S, options):
    q, k, v = leaves(2, H, Hk, L, S, 3, 4)
    q_scale = 3.0  # sharp enough that softcap's tanh bends
    alibi = alibi_slopes(H, 2) if options.get("alibi") else None
    window = options.get("window", (-1, -1))
    bias = torch.randn(H, L, S, dtype=torch.float64, requires_grad=True) if options.get("bias") else None

    def fn(q, k, v, *maybe_bias):
        return attention(q * q_scale, k, v, maybe_bias[0] if maybe_bias else None, 0.0,
                         options.get("is_causal", False), options.get("bottom_right", False), None, None,
                         window[0], window[1], options.get("softcap", 0.0), alibi)[0]

    inputs = (q, k, v) + ((bias,) if bias is not None else ())
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_with_dropout_and_groups():
    q, k, v = leaves(2, 4, 2, 6, 9, 4)
    seed = dropout_seed(1234)
    fn = lambda q, k, v: attention(q, k, v, None, 0.35, True, True, None, seed, 4, -1, 1.0, alibi_slopes(4))[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_several_blocks_fast_mode():
    # Past the backward's tiles (64 x 128) and with the key split across tasks.
    q, k, v = leaves(1, 4, 2, 70, 260, 3)
    fn = lambda q, k, v: attention(q, k, v, None, 0.0, True, True, None, None, 100, -1, 2.0, alibi_slopes(4))[0]
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def reference_grads(q, k, v, grad_out, bias=None, **options):
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    b = bias.detach().double().requires_grad_() if bias is not None else None
    out, _ = feature_reference(*inputs, bias=b, **options)
    return torch.autograd.grad(out, inputs + ([b] if b is not None else []), grad_out.double())


@pytest.mark.parametrize("B,H,Hk,L,S,D,Dv", [
    (1, 4, 2, 63, 127, 15, 17),
    (1, 8, 1, 65, 129, 16, 16),   # MQA: 8 query heads summed into one key head
    (2, 8, 2, 130, 300, 33, 8),
    (1, 4, 4, 1, 260, 8, 8),      # a single query row
    (1, 2, 1, 300, 70, 8, 8),     # L > S
])
@pytest.mark.parametrize("options", [
    dict(is_causal=True, bottom_right=True, window=(50, -1)),
    dict(window=(20, 30), softcap=4.0),
    dict(is_causal=True, softcap=2.0, alibi=True, window=(129, -1)),
    dict(alibi=True, bottom_right=True),
], ids=lambda o: "-".join(sorted(o)))
def test_gradients_at_tile_edges(B, H, Hk, L, S, D, Dv, options):
    q, k, v = leaves(B, H, Hk, L, S, D, Dv, dtype=torch.float32)
    q_in = (q * 2).detach().requires_grad_()
    grad_out = torch.randn(B, H, L, Dv)
    alibi = alibi_slopes(H, B) if options.get("alibi") else None
    window = options.get("window", (-1, -1))
    causal, bottom_right, softcap = options.get("is_causal", False), options.get("bottom_right", False), \
        options.get("softcap", 0.0)
    out, _ = attention(q_in, k, v, None, 0.0, causal, bottom_right, None, None, window[0], window[1], softcap, alibi)
    got = torch.autograd.grad(out, (q_in, k, v), grad_out)
    want = reference_grads(q_in, k, v, grad_out, is_causal=causal, bottom_right=bottom_right, window=window,
                           softcap=softcap, alibi_slopes=alibi)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, atol=2e-4, rtol=2e-4, msg=f"grad {name}")


def test_group_gradients_have_the_key_heads_shape_and_sum_over_the_group():
    q, k, v = leaves(2, 6, 2, 10, 12, 4)
    out, _ = attention(q, k, v)
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    assert dk.shape == k.shape and dv.shape == v.shape
    # The same as expanding the key heads and summing the expanded gradients per group.
    k_rep, v_rep = (t.detach().repeat_interleave(3, 1).requires_grad_() for t in (k, v))
    out_rep, _ = attention(q, k_rep, v_rep)
    _, dk_rep, dv_rep = torch.autograd.grad(out_rep, (q, k_rep, v_rep), grad_out)
    torch.testing.assert_close(dk, dk_rep.unflatten(1, (2, 3)).sum(2))
    torch.testing.assert_close(dv, dv_rep.unflatten(1, (2, 3)).sum(2))


def test_bias_gradient_with_features():
    q, k, v = leaves(2, 4, 2, 7, 9, 4)
    bias = torch.randn(2, 1, 7, 9, dtype=torch.float64, requires_grad=True)
    fn = lambda b: attention(q, k, v, b, 0.0, True, True, None, None, 3, -1, 1.0, alibi_slopes(4))[0]
    assert torch.autograd.gradcheck(fn, (bias,))


def test_rows_that_see_nothing_get_zero_gradients():
    q, k, v = leaves(1, 2, 1, 30, 8, 4)
    out, _ = attention(q, k, v, None, 0.0, False, True, None, None, 2, 0, 0.0, None)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dq[:, :, :20] == 0).all()  # rows 0..19: their bands end before key 0


@pytest.mark.cpu_only("where NaN shows depends on the CPU backward tiles (64 x 128)")
def test_backward_skips_key_blocks_outside_the_band():
    # As the forward: NaN in whole key blocks that no row of a block sees must not reach any
    # gradient of the rows and keys that never meet them (backward tiles: 64 rows x 128 keys).
    q, k, v = leaves(1, 1, 1, 512, 512, 8, dtype=torch.float32)
    with torch.no_grad():
        for t in (k, v):
            t[:, :, :128] = float("nan")
    out, _ = attention(q, k, v, None, 0.0, True, False, None, None, 64, -1, 0.0, None)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert not dq[:, :, 256:].isnan().any()
    assert not dk[:, :, 256:].isnan().any() and not dv[:, :, 256:].isnan().any()
    assert math.isnan(dq[0, 0, 0, 0].item())


def test_gradcheck_weights_ops_with_every_option():
    # attention_weights (its composite backward: grouped heads summed, softcap's derivative) and
    # attention_with_weights (the fused CPU kernel) with every score option.
    q, k, v = leaves(1, 4, 2, 5, 7, 3)
    slopes = alibi_slopes(4)
    options = (2, 1, 1.5, slopes)
    seed = dropout_seed(11)

    def weights(q, k):
        _, lse = attention(q * 2, k, v, None, 0.2, True, True, None, seed, *options)
        return torch.ops.qkv.attention_weights(q * 2, k, None, lse.detach(), 0.2, True, True, None, seed, False,
                                               *options)

    assert torch.autograd.gradcheck(weights, (q, k))

    def fused(q, k, v):
        out, _, w = torch.ops.qkv.attention_with_weights(q * 2, k, v, None, 0.0, False, True, None, None, True,
                                                         *options)
        return out, w

    assert torch.autograd.gradcheck(fused, (q, k, v))


@pytest.mark.parametrize("L", [2, 40])  # the two-op path (few rows), the fused CPU kernel
def test_weights_with_every_option_match_reference(L):
    from reference import feature_scores
    q, k, v = leaves(2, 4, 2, L, 70, 8, dtype=torch.float32)
    slopes = alibi_slopes(4, 2)
    options = (20, 3, 4.0, slopes)
    out, lse, w = torch.ops.qkv.attention_with_weights(q, k, v, None, 0.0, True, True, None, None, False, *options)
    want_out, want_lse = feature_reference(q, k, v, is_causal=True, bottom_right=True, window=(20, 3), softcap=4.0,
                                           alibi_slopes=slopes)
    scores = feature_scores(q, k, None, True, True, None, (20, 3), 4.0, slopes)
    want_w = torch.softmax(scores, -1).nan_to_num(0.0)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(w.double(), want_w, atol=2e-5, rtol=2e-5)
    averaged = torch.ops.qkv.attention_weights(q, k, None, lse, 0.0, True, True, None, None, True, *options)
    torch.testing.assert_close(averaged.double(), want_w.mean(1), atol=2e-5, rtol=2e-5)
