"""Core op backward: float64 gradcheck and gradients against the reference, incl. bias and dropout."""
import pytest
import torch

from reference import dropout_seed, grad_tolerance, reference_attention, reference_probs, tolerance

pytestmark = pytest.mark.usefixtures("device")  # cpu, and cuda when present (conftest.py)

attention = torch.ops.qkv.attention
attention_weights = torch.ops.qkv.attention_weights

# Every test runs on each copy of the CPU kernels this CPU has (conftest.cpu_capability).
pytestmark = pytest.mark.usefixtures("cpu_capability")


def leaf(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("L,S,D", [(1, 1, 3), (5, 7, 4), (9, 4, 5), (70, 130, 3)])
@pytest.mark.parametrize("is_causal,bottom_right", [(False, False), (True, False), (True, True)])
def test_gradcheck(L, S, D, is_causal, bottom_right):
    q, k, v = leaf(1, 2, L, D), leaf(1, 2, S, D), leaf(1, 2, S, D + 1)
    bias = leaf(2, L, S) if L * S < 1000 else leaf(2, 1, S)  # keep numerical Jacobians small
    fn = lambda q, k, v, b: attention(q, k, v, b, 0.0, is_causal, bottom_right)[0]
    # Several key blocks (and the split-dQ path) need L, S past the block size; there
    # gradcheck's fast mode checks random projections of the full Jacobian.
    assert torch.autograd.gradcheck(fn, (q, k, v, bias), fast_mode=L * S > 1000)


@pytest.mark.parametrize("bias_shape", [(1, 1, 1, 6), (2, 1, 1, 6), (5, 6), (2, 3, 5, 6)])
def test_bias_gradient_reduces_over_broadcast_dims(bias_shape):
    q, k, v = leaf(2, 3, 5, 4), leaf(2, 3, 6, 4), leaf(2, 3, 6, 4)
    bias = leaf(*bias_shape)
    assert torch.autograd.gradcheck(lambda b: attention(q, k, v, b)[0], (bias,))


def test_gradcheck_with_dropout_under_fixed_seed():
    q, k, v, bias = leaf(2, 2, 6, 4), leaf(2, 2, 9, 4), leaf(2, 2, 9, 4), leaf(6, 9)
    seed = dropout_seed(1234)
    fn = lambda q, k, v, b: attention(q, k, v, b, 0.35, True, False, None, seed)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_gradcheck_weights_op():
    q, k, bias = leaf(1, 2, 4, 3), leaf(1, 2, 5, 3), leaf(4, 5)
    v = torch.randn(1, 2, 5, 3, dtype=torch.float64)
    seed = dropout_seed(7)

    def weights(q, k, b):
        _, lse = attention(q, k, v, b, 0.25, True, True, None, seed)
        return attention_weights(q, k, b, lse.detach(), 0.25, True, True, None, seed)

    assert torch.autograd.gradcheck(weights, (q, k, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradients_match_reference(dtype):
    q, k, v = leaf(2, 3, 67, 24, dtype=dtype), leaf(2, 3, 131, 24, dtype=dtype), leaf(2, 3, 131, 16, dtype=dtype)
    bias = leaf(2, 1, 1, 131, dtype=dtype)
    grad_out = torch.randn(2, 3, 67, 16, dtype=dtype)
    out, _ = attention(q, k, v, bias, 0.0, True, True)
    got = torch.autograd.grad(out, (q, k, v, bias), grad_out)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    want = torch.autograd.grad(reference_attention(*ref_inputs, is_causal=True, bottom_right=True),
                               ref_inputs, grad_out.double())
    tol = grad_tolerance(dtype)  # gradients sum over rows/keys: a few ulps of the dtype per term
    for name, g, w in zip("q k v bias".split(), got, want):
        assert g.dtype == dtype and g.shape == w.shape
        torch.testing.assert_close(g.double(), w, **tol, msg=f"grad {name}")


@pytest.mark.parametrize("B,H,L,S,D,Dv", [
    (1, 2, 63, 127, 15, 17),   # one short of the backward tile (64 rows x 128 keys), odd panels
    (1, 1, 65, 129, 16, 16),   # one past it, whole panels
    (2, 1, 130, 300, 33, 8),   # several tiles both ways, a partial last panel
    (1, 1, 1, 260, 8, 8),      # a single query row
    (1, 2, 95, 255, 31, 33),   # the AVX-512 backward tile (96 rows x 256 keys), each side
    (1, 1, 97, 257, 32, 32),
    (1, 1, 25, 520, 12, 13),   # 12-row micro-kernel blocks and a tail, three key tiles
])
@pytest.mark.parametrize("is_causal,bottom_right", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_at_tile_boundaries(B, H, L, S, D, Dv, is_causal, bottom_right, dtype):
    q, k, v = leaf(B, H, L, D, dtype=dtype), leaf(B, H, S, D, dtype=dtype), leaf(B, H, S, Dv, dtype=dtype)
    grad_out = torch.randn(B, H, L, Dv, dtype=dtype)
    out, _ = attention(q, k, v, None, 0.0, is_causal, bottom_right)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(reference_attention(*ref_inputs, is_causal=is_causal, bottom_right=bottom_right),
                               ref_inputs, grad_out.double())
    tol = grad_tolerance(dtype)
    for name, g, w in zip("q k v".split(), got, want):
        torch.testing.assert_close(g.double(), w, **tol, msg=f"grad {name}")


def test_fully_masked_rows_have_zero_gradient():
    q, k, v = leaf(1, 2, 4, 8), leaf(1, 2, 5, 8), leaf(1, 2, 5, 8)
    bias = torch.zeros(4, 5, dtype=torch.float64)
    bias[1] = float("-inf")
    out, _ = attention(q, k, v, bias)
    out.sum().backward()
    for t in (q, k, v):
        assert not t.grad.isnan().any()
    assert (q.grad[:, :, 1] == 0).all()


def test_non_contiguous_grad_out():
    q, k, v = leaf(1, 2, 6, 4), leaf(1, 2, 7, 4), leaf(1, 2, 7, 4)
    out, _ = attention(q, k, v)
    grad_out = torch.randn(1, 2, 4, 6, dtype=torch.float64).transpose(-2, -1)  # non-contiguous
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(reference_attention(q, k, v), (q, k, v), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tolerance(torch.float64))


def test_expanded_grad_out_from_sum():
    q, k, v = leaf(1, 1, 3, 4), leaf(1, 1, 5, 4), leaf(1, 1, 5, 4)
    attention(q, k, v)[0].sum().backward()  # grad_out is an expanded (stride 0) tensor
    want = torch.autograd.grad(reference_attention(q, k, v).sum(), q)[0]
    torch.testing.assert_close(q.grad, want, **tolerance(torch.float64))


def test_double_backward_of_the_backward_op_itself_raises_a_clear_error():
    # The core op's own backward is differentiable (test_double_backward.py); the raw backward op,
    # called directly, is differentiable once and says so.
    q, k, v = leaf(1, 1, 3, 4), leaf(1, 1, 5, 4), leaf(1, 1, 5, 4)
    out, lse = attention(q, k, v)
    grad_out = torch.randn_like(out, requires_grad=True)
    grad_q = torch.ops.qkv.attention_backward(grad_out, q, k, v, None, out.detach(), lse, 0.0, False, False, None,
                                            None, False)[0]
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        grad_q.sum().backward()


def test_gradcheck_head_averaged_weights():
    q, k, bias = leaf(2, 3, 4, 3), leaf(2, 3, 5, 3), leaf(1, 3, 4, 5)
    v = torch.randn(2, 3, 5, 3, dtype=torch.float64)
    seed = dropout_seed(9)

    def averaged(q, k, b):
        _, lse = attention(q, k, v, b, 0.2, False, False, None, seed)
        return attention_weights(q, k, b, lse.detach(), 0.2, False, False, None, seed, True)

    assert torch.autograd.gradcheck(averaged, (q, k, bias))


@pytest.mark.parametrize("is_causal", [False, True])
def test_sharp_softmax_gradients_keep_float32_accuracy(is_causal):
    # Scores spread over tens to hundreds: the backward rebuilds P as 2^(s - log2(e) * lse) in
    # float32, so the rounding of both terms must stay within float32 gradient accuracy.
    q = (torch.randn(1, 2, 150, 32) * 8).requires_grad_()
    k, v = leaf(1, 2, 300, 32, dtype=torch.float32), leaf(1, 2, 300, 32, dtype=torch.float32)
    grad_out = torch.randn(1, 2, 150, 32)
    out, _ = attention(q, k, v, None, 0.0, is_causal)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(reference_attention(*ref_inputs, is_causal=is_causal), ref_inputs, grad_out.double())
    for name, g, w in zip("q k v".split(), got, want):
        scale = w.abs().max().item()
        torch.testing.assert_close(g.double(), w, atol=5e-5 * scale, rtol=1e-3, msg=f"grad {name}")
