"""torch.library.opcheck on every op (schema, autograd registration, fake tensors, AOT dispatch)
and torch.compile(fullgraph=True) through each op."""
import pytest
import torch

from reference import dropout_seed

pytestmark = pytest.mark.usefixtures("device")  # cpu, and cuda when present (conftest.py)


def core_args(requires_grad, bias=True, dropout=0.0):
    q = torch.randn(2, 3, 10, 8, requires_grad=requires_grad)
    k = torch.randn(2, 3, 12, 8, requires_grad=requires_grad)
    v = torch.randn(2, 3, 12, 6, requires_grad=requires_grad)
    b = torch.randn(3, 10, 12, requires_grad=requires_grad) if bias else None
    return q, k, v, b


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("bias,is_causal,bottom_right,scale,dropout", [
    (True, False, False, None, 0.0), (False, True, True, 0.5, 0.0), (True, True, False, None, 0.2)])
def test_opcheck_attention(requires_grad, bias, is_causal, bottom_right, scale, dropout):
    q, k, v, b = core_args(requires_grad, bias)
    seed = dropout_seed(17)
    torch.library.opcheck(torch.ops.qkv.attention.default, (q, k, v, b, dropout, is_causal, bottom_right, scale, seed))


# The backward ops are deliberately once-differentiable (a second derivative raises, see
# test_core_backward), so with requires_grad the AOT test that backprops through them is left out.
ONCE_DIFFERENTIABLE_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def backward_utils(requires_grad):
    return ONCE_DIFFERENTIABLE_UTILS if requires_grad else torch.library._OPCHECK_DEFAULT_UTILS


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_opcheck_attention_backward(requires_grad, dropout):
    q, k, v, b = core_args(False)
    seed = dropout_seed(3)
    out, lse = torch.ops.qkv.attention(q, k, v, b, dropout, True, False, None, seed)
    grad = torch.randn_like(out).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.qkv.attention_backward.default,
                          (grad, q, k, v, b, out, lse, dropout, True, False, None, seed, True),
                          test_utils=backward_utils(requires_grad))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_opcheck_attention_weights(requires_grad, dropout):
    q, k, v, b = core_args(requires_grad)
    seed = dropout_seed(8)
    _, lse = torch.ops.qkv.attention(q, k, v, b, dropout, False, False, None, seed)
    for average_heads in (False, True):
        torch.library.opcheck(torch.ops.qkv.attention_weights.default,
                              (q, k, b, lse.detach(), dropout, False, False, None, seed, average_heads))
    grad = torch.randn(2, 3, 10, 12, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.qkv.attention_weights_backward.default,
                          (grad, q.detach(), k.detach(), b.detach(), lse.detach(), dropout, False, False, None, seed, True),
                          test_utils=backward_utils(requires_grad))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("L", [2, 10])  # the two-op path, the fused CPU kernel
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_opcheck_attention_with_weights(requires_grad, L, dropout):
    q, k, v, b = core_args(requires_grad)
    q, b = q[:, :, :L], b[:, :L]
    for average_heads in (False, True):
        torch.library.opcheck(torch.ops.qkv.attention_with_weights.default,
                              (q, k, v, b, dropout, True, False, None, dropout_seed(5), average_heads))


def projection_args(requires_grad):
    x = torch.randn(2, 7, 16, requires_grad=requires_grad)
    mem = torch.randn(2, 9, 12, requires_grad=requires_grad)
    w = lambda *s: (torch.randn(*s) * 0.2).requires_grad_(requires_grad)
    return x, mem, w


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_opcheck_projection_ops(requires_grad, dropout):
    x, mem, w = projection_args(requires_grad)
    kpm = torch.zeros(2, 1, 1, 7)
    kpm[1, ..., -2:] = float("-inf")
    seed = dropout_seed(11)
    torch.library.opcheck(torch.ops.qkv.multi_head_attention.default,
                          (x, x, x, 4, w(48, 16), w(48), w(16, 16), w(16), kpm, False, dropout, seed))
    torch.library.opcheck(torch.ops.qkv.masked_self_attention.default,
                          (x, 2, w(48, 16), None, w(16, 16), None, None, dropout, seed))
    torch.library.opcheck(torch.ops.qkv.cross_attention.default,
                          (x, mem, 4, w(16, 16), w(16, 12), w(16, 12), w(48), w(16, 16), w(16), None, dropout, seed))


def test_compile_fullgraph_through_each_op():
    q, k, v, b = core_args(True)
    x, mem, w = projection_args(True)
    w_in, w_out, wq, wk, wv = w(48, 16), w(16, 16), w(16, 16), w(16, 12), w(16, 12)

    def model(q, k, v, b, x, mem):
        out, lse = torch.ops.qkv.attention(q, k, v, b, 0.0, True)
        weights = torch.ops.qkv.attention_weights(q, k, b, lse)
        out2, _, weights2 = torch.ops.qkv.attention_with_weights(q, k, v, b, 0.0, False, False, None, None, True)
        out3, _ = torch.ops.qkv.attention_qkvpacked(torch.stack([q, k[:, :, :10], k[:, :, 2:]], 2)
                                                    .transpose(1, 3), b[:, :, :10], 0.0, True)
        y = torch.ops.qkv.multi_head_attention(x, x, x, 4, w_in, None, w_out, None)
        y = y + torch.ops.qkv.masked_self_attention(x, 4, w_in, None, w_out, None)
        y = y + torch.ops.qkv.cross_attention(x, mem, 4, wq, wk, wv, None, w_out, None)
        return out.sum() + weights.sum() + y.sum() + out2.sum() + weights2.pow(2).sum() + out3.pow(2).sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    args = (q, k, v, b, x, mem)
    eager_loss = model(*args)
    eager_grads = torch.autograd.grad(eager_loss, args)
    compiled_loss = compiled(*args)
    compiled_grads = torch.autograd.grad(compiled_loss, args)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for g, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, e)
