"""Bad input to the ops raises a clear error naming the argument, the expectation and what came."""
import pytest
import torch

attention = torch.ops.qkv.attention
SEED_ERROR = r"dropout_seed must be a 0-dim int64 tensor on the CPU"


def qkv_tensors(dtype=torch.float32):
    return torch.randn(2, 3, 5, 8, dtype=dtype), torch.randn(2, 3, 7, 8, dtype=dtype), torch.randn(2, 3, 7, 4, dtype=dtype)


@pytest.mark.parametrize("make_args,message", [
    (lambda q, k, v: (q[0], k, v), r"query must be a 4-D tensor .* got a 3-D"),
    (lambda q, k, v: (q, k[..., :6], v), r"key must have shape \(2, key_heads, key_len, 8\) .* got"),
    (lambda q, k, v: (q, k, v[:, :, :6]), r"value must have shape \(2, 3, 7, value_head_dim\)"),
    (lambda q, k, v: (q, k[:1], v), r"key must have shape"),
    (lambda q, k, v: (q, k.double(), v), r"key must have the query's dtype Float; got .*Double"),
    (lambda q, k, v: (q.int(), k, v), r"query must be float32, float64, float16 or bfloat16"),
    (lambda q, k, v: (q, k, v, torch.zeros(5, 6)), r"bias must be broadcastable to \(batch, heads, query_len, key_len\) = \(2, 3, 5, 7\)"),
    (lambda q, k, v: (q, k, v, torch.zeros(5, 7, dtype=torch.bool)), r"bias must be a floating tensor of the query's dtype"),
    (lambda q, k, v: (q, k, v, torch.zeros(1, 2, 3, 5, 7)), r"bias must be broadcastable"),
    (lambda q, k, v: (q, k, v, None, 1.5), r"dropout_p must be in \[0, 1\]; got 1.5"),
    (lambda q, k, v: (q, k, v, None, -0.1), r"dropout_p must be in \[0, 1\]"),
    (lambda q, k, v: (q, k, v, None, 0.0, False, False, float("nan")), r"scale must be a finite number"),
    (lambda q, k, v: (q, k, v, None, 0.1, False, False, None, torch.tensor(1.0)), SEED_ERROR + ".*Float"),
    (lambda q, k, v: (q, k, v, None, 0.1, False, False, None, torch.tensor([1, 2])), SEED_ERROR + ".*1-D"),
    # The old one-element 1-D form: fake tensors reject it beside CUDA inputs.
    (lambda q, k, v: (q, k, v, None, 0.1, False, False, None, torch.tensor([1])), SEED_ERROR + r".*1-D Long tensor of shape \[1\]"),
    # A meta seed with real inputs cannot be read: it used to give uninitialised outputs.
    (lambda q, k, v: (q, k, v, None, 0.1, False, False, None, torch.tensor(1, device="meta")), SEED_ERROR + ".*on meta"),
    (lambda q, k, v: (q, k, v, None, 0.0, False, False, None, torch.tensor(1, device="meta")), SEED_ERROR + ".*on meta"),
])
def test_attention_errors(make_args, message):
    with pytest.raises(RuntimeError, match=message):
        attention(*make_args(*qkv_tensors()))


def test_errors_are_raised_under_fake_tensors_too():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k, v = qkv_tensors()
        with pytest.raises(RuntimeError, match="key must have shape"):
            attention(q, k[..., :6], v)


def test_weights_op_checks_logsumexp():
    q, k, v = qkv_tensors()
    _, lse = attention(q, k, v)
    with pytest.raises(RuntimeError, match=r"logsumexp must be a Float tensor of shape \[2, 3, 5\]"):
        torch.ops.qkv.attention_weights(q, k, None, lse[:, :, :4])
    with pytest.raises(RuntimeError, match="logsumexp must be a Float tensor"):
        torch.ops.qkv.attention_weights(q, k, None, lse.double())


def test_backward_op_checks_grad_out():
    q, k, v = qkv_tensors()
    out, lse = attention(q, k, v)
    with pytest.raises(RuntimeError, match=r"grad_out must be a Float tensor of shape \[2, 3, 5, 4\]"):
        torch.ops.qkv.attention_backward(out[..., :3], q, k, v, None, out, lse, 0.0, False, False, None, None, False)


@pytest.mark.parametrize("call,message", [
    (lambda x, w: torch.ops.qkv.multi_head_attention(x[0], x[0], x[0], 2, w(24, 8), None, w(8, 8), None),
     r"query must be a 3-D batch-first tensor"),
    (lambda x, w: torch.ops.qkv.multi_head_attention(x, x, x, 3, w(24, 8), None, w(8, 8), None),
     r"embed_dim 8 must be divisible by num_heads 3"),
    (lambda x, w: torch.ops.qkv.multi_head_attention(x, x, x, 0, w(24, 8), None, w(8, 8), None),
     r"num_heads must be positive; got 0"),
    (lambda x, w: torch.ops.qkv.multi_head_attention(x, x, x, 2, w(16, 8), None, w(8, 8), None),
     r"in_proj_weight must have shape \(24, 8\); got \[16, 8\]"),
    (lambda x, w: torch.ops.qkv.multi_head_attention(x, x, x, 2, w(24, 8), w(23), w(8, 8), None),
     r"in_proj_bias must have shape \(24\)"),
    (lambda x, w: torch.ops.qkv.masked_self_attention(x, 2, w(24, 8), None, w(8, 9), None),
     r"out_proj_weight must have shape \(8, 8\)"),
    (lambda x, w: torch.ops.qkv.cross_attention(x, torch.randn(3, 4, 5), 2, w(8, 8), w(8, 5), w(8, 5), None, w(8, 8), None),
     r"memory must have the query's batch size 2"),
    (lambda x, w: torch.ops.qkv.cross_attention(x, torch.randn(2, 4, 5), 2, w(8, 8), w(8, 6), w(8, 5), None, w(8, 8), None),
     r"k_proj_weight must have shape \(8, 5\); got \[8, 6\]"),
])
def test_projection_op_errors(call, message):
    x = torch.randn(2, 4, 8)
    with pytest.raises(RuntimeError, match=message):
        call(x, lambda *s: torch.randn(*s))
