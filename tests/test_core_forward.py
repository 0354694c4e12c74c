"""Core op forward against the float64 reference: shapes, strides, masks, dtypes."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from reference import dropout_seed, reference_attention, reference_probs, tolerance

pytestmark = pytest.mark.usefixtures("device")  # cpu, and cuda when present (conftest.py)

attention = torch.ops.qkv.attention

# Every test runs on each copy of the CPU kernels this CPU has (conftest.cpu_capability).
pytestmark = pytest.mark.usefixtures("cpu_capability")


def make_qkv(B, H, L, S, D, Dv=None, dtype=torch.float32, requires_grad=False):
    Dv = D if Dv is None else Dv
    return tuple(torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)
                 for shape in ((B, H, L, D), (B, H, S, D), (B, H, S, Dv)))


SHAPES = [  # B, H, L, S, D, Dv
    (2, 3, 1, 1, 8, 8),        # single query, single key
    (2, 2, 1, 300, 16, 16),    # decode-like: L=1
    (1, 2, 37, 53, 1, 1),      # D=1
    (2, 1, 65, 31, 33, 33),    # D not a multiple of 8, L > S
    (1, 2, 50, 70, 12, 5),     # Dv != D
    (1, 1, 63, 127, 64, 64),   # block size - 1
    (1, 1, 64, 128, 64, 64),   # block size
    (1, 1, 65, 129, 64, 64),   # block size + 1
    (1, 1, 130, 257, 128, 128),
    # Tiles of the packed kernels: forward 128 query rows x 256 keys, backward 64 x 128,
    # panels of 16 columns, and K/V read in place below 4 query rows.
    (1, 1, 127, 255, 15, 17),
    (1, 2, 128, 256, 16, 16),
    (2, 1, 129, 257, 17, 31),
    (1, 2, 3, 600, 20, 9),     # few query rows, several key tiles
    (1, 1, 4, 513, 24, 24),    # the first row count that packs
    (1, 4, 1000, 1000, 24, 8), # many query blocks share each packed key tile (causal: partly)
    # The AVX-512 copy: forward 96 query rows x 512 keys, 12-row micro-kernel, panels of 32.
    (1, 1, 95, 511, 31, 33),
    (1, 2, 96, 512, 32, 32),
    (2, 1, 97, 513, 65, 63),
    (1, 1, 13, 700, 11, 12),   # one 12-row block and one row
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal,bottom_right", [(False, False), (True, False), (True, True)])
def test_matches_reference(shape, is_causal, bottom_right):
    B, H, L, S, D, Dv = shape
    q, k, v = make_qkv(B, H, L, S, D, Dv)
    out, lse = attention(q, k, v, None, 0.0, is_causal, bottom_right)
    want = reference_attention(q, k, v, is_causal=is_causal, bottom_right=bottom_right)
    torch.testing.assert_close(out.double(), want, **tolerance(torch.float32))
    assert out.shape == (B, H, L, Dv) and lse.shape == (B, H, L)


@pytest.mark.parametrize("bias_shape", [(7, 9), (1, 9), (2, 1, 1, 9), (3, 7, 9), (2, 3, 7, 9), (2, 3, 1, 1)])
def test_bias_broadcasts(bias_shape):
    q, k, v = make_qkv(2, 3, 7, 9, 16)
    bias = torch.randn(bias_shape)
    out, _ = attention(q, k, v, bias)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, bias), **tolerance(torch.float32))


def test_logsumexp_is_that_of_the_scaled_biased_scores():
    q, k, v = make_qkv(2, 2, 11, 13, 8)
    bias = torch.randn(11, 13)
    _, lse = attention(q, k, v, bias, scale=0.3)
    want = torch.logsumexp(q.double() @ k.double().transpose(-2, -1) * 0.3 + bias.double(), -1)
    torch.testing.assert_close(lse.double(), want, atol=1e-5, rtol=1e-5)


def test_custom_scale():
    q, k, v = make_qkv(1, 2, 9, 10, 8)
    out, _ = attention(q, k, v, scale=1.7)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, scale=1.7), **tolerance(torch.float32))


def test_strided_inputs_are_read_in_place():
    # Transposed, sliced and expanded (stride 0) inputs, as projection outputs produce.
    packed = torch.randn(2, 10, 3, 4, 8)  # (N, L, q/k/v, H, D)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    out, _ = attention(q, k, v)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), **tolerance(torch.float32))

    k_shared = torch.randn(2, 1, 12, 8).expand(2, 4, 12, 8)  # one key head shared by all heads
    v_shared = torch.randn(2, 1, 12, 8).expand(2, 4, 12, 8)
    q2 = torch.randn(2, 4, 8, 16)[..., ::2]  # inner stride 2
    out2, _ = attention(q2, k_shared, v_shared)
    torch.testing.assert_close(out2.double(), reference_attention(q2, k_shared, v_shared), **tolerance(torch.float32))


def test_output_layout_is_token_major():
    q, k, v = make_qkv(2, 3, 5, 6, 4)
    out, _ = attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # merging heads afterwards is a free view


def test_fully_masked_rows_give_zeros():
    q, k, v = make_qkv(2, 2, 6, 5, 8)
    bias = torch.zeros(2, 1, 6, 5)
    bias[0, :, 3] = float("-inf")  # one row hidden from everything
    bias[1] = float("-inf")        # a whole batch element
    out, lse = attention(q, k, v, bias)
    assert not out.isnan().any()
    assert (out[0, :, 3] == 0).all() and (out[1] == 0).all()
    assert torch.isneginf(lse[0, :, 3]).all()
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, bias), **tolerance(torch.float32))


def test_bottom_right_with_more_queries_than_keys_hides_leading_rows():
    q, k, v = make_qkv(1, 2, 8, 3, 4)
    out, _ = attention(q, k, v, None, 0.0, True, True)
    assert (out[:, :, :5] == 0).all()
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, is_causal=True, bottom_right=True),
                               **tolerance(torch.float32))


@pytest.mark.parametrize("B,H,L,S", [(2, 2, 0, 5), (2, 2, 4, 0), (0, 2, 10, 12), (2, 0, 10, 12), (0, 0, 0, 0)])
def test_empty_sizes(B, H, L, S):
    # Every op, forward and backward, with nothing to attend over or nobody attending: right
    # shapes, zeros where rows see no key, and no crash (an empty batch or head count used to
    # divide by zero when the CPU forward split its work).
    q, k, v = make_qkv(B, H, L, S, 8, requires_grad=True)
    out, lse = attention(q, k, v)
    assert out.shape == (B, H, L, 8) and lse.shape == (B, H, L)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and (v.grad == 0).all()
    for average_heads in (False, True):
        weights = torch.ops.qkv.attention_weights(q, k, None, lse, 0.0, False, False, None, None, average_heads)
        fused = torch.ops.qkv.attention_with_weights(q, k, v, None, 0.0, False, False, None, None, average_heads)
        assert weights.shape == ((B, L, S) if average_heads else (B, H, L, S)) == fused[2].shape
        assert (weights == 0).all() and (fused[2] == 0).all() and (fused[0] == 0).all()


def test_long_sequence():
    q, k, v = make_qkv(1, 1, 33, 4097, 16)
    out, _ = attention(q, k, v, None, 0.0, True, True)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, is_causal=True, bottom_right=True),
                               **tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    q, k, v = make_qkv(2, 2, 70, 90, 24, dtype=dtype)
    bias = torch.randn(70, 90, dtype=dtype)
    out, lse = attention(q, k, v, bias, 0.0, True)
    assert out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = reference_attention(q, k, v, bias, is_causal=True)
    torch.testing.assert_close(out.double(), want, **tolerance(dtype))


def test_weights_op_matches_reference_probs():
    q, k, v = make_qkv(2, 3, 9, 14, 8, dtype=torch.float64)
    bias = torch.randn(2, 1, 1, 14, dtype=torch.float64)
    out, lse = attention(q, k, v, bias, 0.0, True, True)
    weights = torch.ops.qkv.attention_weights(q, k, bias, lse, 0.0, True, True)
    torch.testing.assert_close(weights, reference_probs(q, k, bias, True, True), **tolerance(torch.float64))
    torch.testing.assert_close(weights @ v, out, **tolerance(torch.float64))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), L=st.integers(1, 80), S=st.integers(1, 150),
       D=st.integers(1, 40), causal=st.booleans(), bottom_right=st.booleans(), with_bias=st.booleans())
def test_random_shapes_property(B, H, L, S, D, causal, bottom_right, with_bias):
    q, k, v = make_qkv(B, H, L, S, D, dtype=torch.float64)
    bias = torch.randn(H, L, S, dtype=torch.float64) if with_bias else None
    out, _ = attention(q, k, v, bias, 0.0, causal, bottom_right)
    want = reference_attention(q, k, v, bias, causal, bottom_right)
    torch.testing.assert_close(out, want, **tolerance(torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_head_averaged_weights_equal_the_mean_of_per_head_weights(dtype):
    q, k, v = make_qkv(2, 4, 70, 600, 8, dtype=dtype)
    bias = torch.randn(2, 1, 1, 600, dtype=dtype)
    seed = dropout_seed(21)
    _, lse = attention(q, k, v, bias, 0.1, True, True, None, seed)
    per_head = torch.ops.qkv.attention_weights(q, k, bias, lse, 0.1, True, True, None, seed)
    averaged = torch.ops.qkv.attention_weights(q, k, bias, lse, 0.1, True, True, None, seed, True)
    assert averaged.shape == (2, 70, 600)
    torch.testing.assert_close(averaged.double(), per_head.double().mean(1), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_causal,bottom_right", [(False, False), (True, False), (True, True)])
def test_weights_without_dropout_match_reference(dtype, is_causal, bottom_right):
    # The no-dropout path adds each head's probabilities straight into the output rows (a float
    # row buffer for bfloat16): per-head and averaged, over several key tiles and query
    # blocks, with rows that see no key (L > S, bottom-right causal) and a bias.
    q, k, _ = make_qkv(2, 3, 130, 77 if is_causal else 600, 12, dtype=dtype)
    bias = torch.randn(1, 3, 1, k.shape[-2], dtype=dtype) if not is_causal else None
    probs = reference_probs(q, k, bias, is_causal, bottom_right)
    v = torch.randn_like(k)
    _, lse = attention(q, k, v, bias, 0.0, is_causal, bottom_right)
    per_head = torch.ops.qkv.attention_weights(q, k, bias, lse, 0.0, is_causal, bottom_right)
    averaged = torch.ops.qkv.attention_weights(q, k, bias, lse, 0.0, is_causal, bottom_right, None, None, True)
    torch.testing.assert_close(per_head.double(), probs, **tolerance(dtype))
    torch.testing.assert_close(averaged.double(), probs.mean(1), **tolerance(dtype))
    if bottom_right:  # the first L - S query rows see no key
        assert (averaged[:, :130 - 77] == 0).all() and (averaged[:, 130 - 77:] > 0).any(-1).all()


@pytest.mark.parametrize("is_causal", [False, True])
def test_sharp_softmax_keeps_float32_accuracy(is_causal):
    # Scores spread over hundreds (logits of a trained model can be this sharp): the kernel's
    # exp2 polynomial and its log2 units must keep float32 accuracy across the whole range.
    q, k, v = make_qkv(1, 2, 150, 300, 32)
    q = q * 12
    out, lse = attention(q, k, v, None, 0.0, is_causal)
    want = reference_attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(out.double(), want, **tolerance(torch.float32))
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(32)
    if is_causal:
        scores = scores.masked_fill(torch.ones(150, 300, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=1e-4, rtol=1e-5)


def test_hidden_keys_get_exactly_zero_weight():
    q, k, v = make_qkv(1, 2, 40, 300, 16)
    _, lse = attention(q, k, v, None, 0.0, True)
    weights = torch.ops.qkv.attention_weights(q, k, None, lse, 0.0, True)
    hidden = torch.ones(40, 300, dtype=torch.bool).triu(1)
    assert (weights[..., hidden] == 0).all()
    assert (weights[..., ~hidden] > 0).all()


@pytest.mark.parametrize("L,S,is_causal", [(200, 300, False), (200, 300, True), (2, 40, False)])
def test_nan_in_a_query_reaches_its_output_row(L, S, is_causal):
    # A NaN must show up, never be swallowed by the fused row maximum or the exp2 clamp.
    q, k, v = make_qkv(1, 1, L, S, 16)
    q[0, 0, 1, 3] = float("nan")
    out, _ = attention(q, k, v, None, 0.0, is_causal)
    assert out[0, 0, 1].isnan().all()
    assert not out[0, 0, 0].isnan().any()
