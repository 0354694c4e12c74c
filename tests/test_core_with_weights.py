"""qkv.attention_with_weights: the output, logsumexp and weights from one call (need_weights=True).

The CPU kernel computes them in one pass (its own tiling: 24 query rows, whole score rows, key
tiles of 256); below 4 query rows it runs `attention` then `attention_weights`. Both paths are
held to the float64 reference, to the two separate ops (same dropout seed, same mask), and to
gradcheck through both outputs.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from reference import causal_hidden, dropout_seed, reference_attention, reference_probs, tolerance

pytestmark = pytest.mark.usefixtures("device")  # cpu, and cuda when present (conftest.py)

# Every test runs on each copy of the CPU kernels this CPU has (conftest.cpu_capability).
pytestmark = pytest.mark.usefixtures("cpu_capability")

ops = torch.ops.qkv
F64 = torch.float64


def make_qkv(B, H, L, S, D, Dv=None, dtype=torch.float32, requires_grad=False):
    Dv = D if Dv is None else Dv
    return tuple(torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)
                 for shape in ((B, H, L, D), (B, H, S, D), (B, H, S, Dv)))


def reference_lse(q, k, bias, is_causal, bottom_right):
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.double()
    if is_causal:
        scores = scores.masked_fill(causal_hidden(q.shape[-2], k.shape[-2], bottom_right), float("-inf"))
    return torch.logsumexp(scores, -1)


SHAPES = [  # B, H, L, S, D, Dv: the fused kernel's 24-row blocks and 256-key tiles, each side of them
    (2, 3, 23, 255, 16, 16),
    (2, 3, 24, 256, 33, 33),
    (1, 2, 25, 257, 12, 5),
    (1, 2, 49, 600, 64, 64),
    (2, 1, 26, 1025, 31, 17),  # the AVX-512 copy's 512-key tiles, each side
    (2, 1, 70, 1, 8, 8),     # one key
    (1, 2, 4, 40, 8, 8),     # the fewest rows the fused kernel takes
    (2, 2, 3, 40, 8, 8),     # fewer: the two-op path
    (1, 1, 1, 300, 16, 16),  # decode
]


@pytest.mark.parametrize("B,H,L,S,D,Dv", SHAPES)
@pytest.mark.parametrize("is_causal,bottom_right", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("average_heads", [False, True])
def test_matches_reference(B, H, L, S, D, Dv, is_causal, bottom_right, average_heads):
    q, k, v = make_qkv(B, H, L, S, D, Dv)
    bias = torch.randn(B, 1, L, S)
    out, lse, weights = ops.attention_with_weights(q, k, v, bias, 0.0, is_causal, bottom_right, None, None,
                                                   average_heads)
    tol = tolerance(torch.float32)
    probs = reference_probs(q, k, bias, is_causal, bottom_right)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, bias, is_causal, bottom_right), **tol)
    torch.testing.assert_close(weights.double(), probs.mean(1) if average_heads else probs, **tol)
    torch.testing.assert_close(lse.double(), reference_lse(q, k, bias, is_causal, bottom_right), **tol)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), L=st.integers(1, 60), S=st.integers(1, 300),
       D=st.integers(1, 40), causal=st.booleans(), bottom_right=st.booleans(), with_bias=st.booleans(),
       average_heads=st.booleans())
def test_random_shapes_property(B, H, L, S, D, causal, bottom_right, with_bias, average_heads):
    q, k, v = make_qkv(B, H, L, S, D, dtype=F64)
    bias = torch.randn(H, L, S, dtype=F64) if with_bias else None
    out, _, weights = ops.attention_with_weights(q, k, v, bias, 0.0, causal, bottom_right, None, None,
                                                 average_heads)
    probs = reference_probs(q, k, bias, causal, bottom_right)
    torch.testing.assert_close(out, probs @ v, **tolerance(F64))
    torch.testing.assert_close(weights, probs.mean(1) if average_heads else probs, **tolerance(F64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("average_heads", [False, True])
def test_dtypes(dtype, average_heads):
    # Half types sum heads in a float row buffer; float and double in the output itself.
    q, k, v = make_qkv(2, 3, 50, 300, 24, dtype=dtype)
    bias = torch.randn(50, 300, dtype=dtype)
    out, lse, weights = ops.attention_with_weights(q, k, v, bias, 0.0, True, True, None, None, average_heads)
    assert out.dtype == weights.dtype == dtype
    assert lse.dtype == (F64 if dtype == F64 else torch.float32)
    probs = reference_probs(q, k, bias, True, True)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, bias, True, True), **tolerance(dtype))
    torch.testing.assert_close(weights.double(), probs.mean(1) if average_heads else probs, **tolerance(dtype))


def test_strided_and_expanded_inputs():
    # Token-major q (a projection's layout), a key with strided head dim, a value broadcast over
    # batch and a bias broadcast over heads and queries.
    q = torch.randn(2, 40, 3, 16).transpose(1, 2)
    k = torch.randn(2, 3, 16, 90).transpose(-2, -1)
    v = torch.randn(1, 3, 90, 16).expand(2, 3, 90, 16)
    bias = torch.randn(2, 1, 1, 90)
    out, _, weights = ops.attention_with_weights(q, k, v, bias, 0.0, False, False, None, None, False)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, bias), **tolerance(torch.float32))
    torch.testing.assert_close(weights.double(), reference_probs(q, k, bias), **tolerance(torch.float32))


def test_rows_that_see_no_key():
    # Bottom-right causal with L > S: the first L - S rows see nothing. A bias row of -inf hides
    # every key from one more row.
    q, k, v = make_qkv(1, 2, 60, 20, 8)
    bias = torch.zeros(60, 20)
    bias[50] = float("-inf")
    out, lse, weights = ops.attention_with_weights(q, k, v, bias, 0.0, True, True, None, None, False)
    empty = torch.zeros(60, dtype=torch.bool)
    empty[:40] = True
    empty[50] = True
    assert (out[:, :, empty] == 0).all() and (weights[:, :, empty] == 0).all()
    assert torch.isneginf(lse[:, :, empty]).all() and torch.isfinite(lse[:, :, ~empty]).all()
    torch.testing.assert_close(weights.sum(-1)[:, :, ~empty], torch.ones(1, 2, int((~empty).sum())))


def test_hidden_keys_get_exactly_zero_weight():
    q, k, v = make_qkv(1, 2, 40, 300, 16)
    _, _, weights = ops.attention_with_weights(q, k, v, None, 0.0, True)
    hidden = torch.ones(40, 300, dtype=torch.bool).triu(1)
    assert (weights[..., hidden] == 0).all() and (weights[..., ~hidden] > 0).all()


def test_nan_query_row_reaches_output_and_weights():
    q, k, v = make_qkv(1, 1, 30, 70, 8)
    q[0, 0, 7, 3] = float("nan")
    out, lse, weights = ops.attention_with_weights(q, k, v, None, 0.0, False)
    assert out[0, 0, 7].isnan().all() and lse[0, 0, 7].isnan() and weights[0, 0, 7].isnan().all()
    rest = torch.arange(30) != 7
    assert torch.isfinite(out[0, 0, rest]).all() and torch.isfinite(weights[0, 0, rest]).all()


@pytest.mark.parametrize("L", [3, 50])  # the two-op path, the fused kernel
@pytest.mark.parametrize("average_heads", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_matches_the_two_ops(L, average_heads, dtype):
    q, k, v = make_qkv(2, 3, L, 270, 16, dtype=dtype)
    bias = torch.randn(3, 1, 270, dtype=dtype)
    seed = dropout_seed(1234)
    out, lse, weights = ops.attention_with_weights(q, k, v, bias, 0.3, True, False, None, seed, average_heads)
    want_out, want_lse = ops.attention(q, k, v, bias, 0.3, True, False, None, seed)
    want_weights = ops.attention_weights(q, k, bias, want_lse, 0.3, True, False, None, seed, average_heads)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    torch.testing.assert_close(weights, want_weights)
    if not average_heads:  # the same probabilities are dropped
        assert torch.equal(weights == 0, want_weights == 0)
        assert ((weights == 0) & ~causal_hidden(L, 270, False)).any()


@pytest.mark.parametrize("L", [3, 30])  # the two-op path (one seed drawn for both), the fused kernel
def test_dropout_without_a_seed_drops_the_same_probabilities_in_out_and_weights(L):
    # The weights returned must be the ones the output was computed with. Inference mode skips
    # the autograd layer, which would otherwise draw the seed before the kernel sees the call.
    q, k, v = make_qkv(1, 2, L, 50, 8, dtype=F64)
    with torch.inference_mode():
        out, _, weights = ops.attention_with_weights(q, k, v, None, 0.4, False)
    assert (weights == 0).any()
    torch.testing.assert_close(out, weights @ v)


@pytest.mark.parametrize("L", [3, 20])
@pytest.mark.parametrize("average_heads", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_through_out_and_weights(L, average_heads, dropout_p):
    q, k, v = make_qkv(1, 2, L, 30, 5, 4, dtype=F64, requires_grad=True)
    bias = torch.randn(2, L, 30, dtype=F64, requires_grad=True)
    seed = dropout_seed(99)
    w_grad = torch.randn((1, L, 30) if average_heads else (1, 2, L, 30), dtype=F64)

    def fn(q, k, v, bias):
        out, _, weights = ops.attention_with_weights(q, k, v, bias, dropout_p, True, True, None, seed,
                                                     average_heads)
        return out, (weights * w_grad).sum()

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_gradients_flow_from_either_output_alone():
    q, k, v = make_qkv(1, 2, 20, 30, 8, dtype=F64, requires_grad=True)
    out, _, weights = ops.attention_with_weights(q, k, v, None, 0.0, False)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    want = torch.autograd.grad(ops.attention(q, k, v)[0].sum(), (q, k, v))
    for got, exp in zip((dq, dk, dv), want):
        torch.testing.assert_close(got, exp)
    dq, dk, dv = torch.autograd.grad(weights.pow(2).sum(), (q, k, v), allow_unused=True)
    assert (dv is None or (dv == 0).all()) and dq.abs().sum() > 0 and dk.abs().sum() > 0


def test_unused_weights_cost_no_backward():
    # need_weights=True is nn.MultiheadAttention's default and the weights are rarely used: a
    # loss on the output alone must not run the weights backward (on zeros).
    q, k, v = make_qkv(1, 2, 20, 30, 8, requires_grad=True)
    out, _, _ = ops.attention_with_weights(q, k, v, None, 0.0, False, False, None, None, True)
    with torch.profiler.profile() as prof:
        out.sum().backward()
    names = {event.name for event in prof.events()}
    assert "qkv::attention_backward" in names and "qkv::attention_weights_backward" not in names


@pytest.mark.parametrize("L", [2, 30])  # the two-op path, the fused kernel
@pytest.mark.parametrize("inference", [False, True])
def test_dropout_draws_exactly_one_seed(L, inference):
    # One draw from torch's generator per call, whichever path runs and whoever draws it (the
    # autograd layer, the kernel's argument check, or the two-op path): the weights match the
    # output, and seeded runs stay reproducible.
    q, k, v = make_qkv(1, 2, L, 40, 8)

    def next_draw_after(call):
        torch.manual_seed(7)
        with torch.inference_mode(inference):
            call()
        return torch.randint(0, 2**62, (1,), device="cpu")

    got = next_draw_after(lambda: ops.attention_with_weights(q, k, v, None, 0.5, False))
    assert torch.equal(got, next_draw_after(lambda: torch.randint(0, 2**62, (1,), device="cpu")))


def test_only_value_needing_grad_skips_the_weights_backward():
    q, k, _ = make_qkv(1, 2, 20, 30, 8)
    v = torch.randn(1, 2, 30, 8, requires_grad=True)
    out, _, weights = ops.attention_with_weights(q, k, v, None, 0.0, False)
    with torch.profiler.profile() as prof:
        (out.sum() + weights.sum()).backward()
    names = {event.name for event in prof.events()}
    assert "qkv::attention_backward" in names and "qkv::attention_weights_backward" not in names
    assert v.grad is not None


@pytest.mark.parametrize("L", [2, 20])  # errors name this op on both paths
def test_bad_input_names_the_op_and_argument(L):
    q, k, v = make_qkv(1, 2, L, 30, 8)
    with pytest.raises(RuntimeError, match=r"qkv.attention_with_weights: .*value"):
        ops.attention_with_weights(q, k, v[:, :, :29])
    with pytest.raises(RuntimeError, match=r"qkv.attention_with_weights: .*dropout_p"):
        ops.attention_with_weights(q, k, v, None, 1.5)
    with pytest.raises(RuntimeError, match=r"qkv.attention_with_weights: .*value"):
        ops.attention_with_weights(q.to("meta"), k.to("meta"), v[:, :, :29].to("meta"))
