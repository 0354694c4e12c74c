"""Double backward (a gradient of a gradient: gradient penalties, meta-learning, gradgradcheck).

A backward run with create_graph=True computes the core ops' gradients with a differentiable
composite (csrc/double_backward.cpp); with create_graph=False the flash backward kernel runs as
before. Checked: gradgradcheck in float64 for the core op with every option, the weights ops and
qkv.MultiheadAttention; the composite's first derivatives equal the kernel's (dropout replays the
same mask); torch's MultiheadAttention gives the same second derivatives; the kernel still serves
create_graph=False."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import qkv
from reference import alibi_slopes

attention = torch.ops.qkv.attention
F64 = torch.float64


def leaves(*shapes):
    return [torch.randn(*s, dtype=F64, requires_grad=True) for s in shapes]


class _OpRecorder(TorchDispatchMode):
    """Records the ops dispatched while it is on (qkv.attention_backward: the flash kernel ran)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# Each case: (H, Hk, L, S, options); options are the core op's keyword arguments after value.
CASES = {
    "plain": (2, 2, 3, 5, {}),
    "bias_with_hidden_keys": (2, 2, 4, 5, dict(bias=True)),
    "causal_top_left": (2, 2, 5, 3, dict(is_causal=True)),
    "causal_bottom_right": (2, 2, 3, 6, dict(is_causal=True, bottom_right=True)),
    "causal_bottom_right_rows_see_nothing": (2, 2, 6, 3, dict(is_causal=True, bottom_right=True, bias=True)),
    "softcap": (2, 2, 4, 5, dict(softcap=1.5)),
    "alibi": (2, 2, 4, 6, dict(alibi=True, bottom_right=True)),
    "window": (2, 2, 6, 6, dict(window=(2, 1))),
    "gqa_causal_window_softcap_alibi": (4, 2, 5, 7, dict(is_causal=True, window=(3, -1), softcap=2.0, alibi=True)),
    "mqa_scale": (4, 1, 3, 4, dict(scale=0.7)),
    "dropout": (2, 2, 4, 6, dict(dropout_p=0.3)),
    "dropout_gqa_bias_window": (4, 2, 5, 6, dict(dropout_p=0.4, bias=True, window=(1, 2))),
}


def make_case(name):
    H, Hk, L, S, options = CASES[name]
    q, k, v = leaves((2, H, L, 3), (2, Hk, S, 3), (2, Hk, S, 4))
    tensors = [q, k, v]
    bias = None
    if options.get("bias"):
        bias = torch.randn(2, 1, L, S, dtype=F64)
        bias[0, 0, 1, 2:] = float("-inf")   # hidden keys
        bias[1, 0, 0, :] = float("-inf")    # a row that sees nothing
        bias.requires_grad_()
        tensors.append(bias)
    dropout_p = options.get("dropout_p", 0.0)
    seed = torch.tensor(1234) if dropout_p else None
    window = options.get("window", (-1, -1))
    slopes = alibi_slopes(H) * 4 if options.get("alibi") else None

    def fn(q, k, v, *maybe_bias):
        return attention(q * 2.0, k, v, maybe_bias[0] if maybe_bias else None, dropout_p,
                         options.get("is_causal", False), options.get("bottom_right", False), options.get("scale"),
                         seed, window[0], window[1], options.get("softcap", 0.0), slopes)[0]

    return fn, tensors


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradgradcheck_core_op(name):
    fn, tensors = make_case(name)
    assert gradgradcheck(fn, tensors)


@pytest.mark.parametrize("name", sorted(CASES))
def test_composite_first_derivatives_equal_the_kernels(name):
    """The differentiable path (create_graph=True) gives the kernel's gradients: the same scores,
    masks and, with dropout, the same dropped probabilities."""
    fn, tensors = make_case(name)
    out = fn(*tensors)
    grad_out = torch.randn_like(out)
    kernel = torch.autograd.grad(out, tensors, grad_out)
    out = fn(*tensors)
    with _OpRecorder() as recorder:
        composite = torch.autograd.grad(out, tensors, grad_out, create_graph=True)
    assert "qkv.attention_backward" not in recorder.ops  # the composite ran, not the kernel
    assert all(g.requires_grad for g in composite)
    for got, want in zip(composite, kernel):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradgradcheck_weights_ops(average, dropout_p):
    q, k, v, bias = leaves((2, 2, 3, 3), (2, 2, 4, 3), (2, 2, 4, 3), (1, 2, 3, 4))
    seed = torch.tensor(55) if dropout_p else None

    def with_weights(q, k, v, b):
        out, _, w = torch.ops.qkv.attention_with_weights(q, k, v, b, dropout_p, True, True, None, seed, average,
                                                         -1, -1, 1.5)
        return out, w

    def weights_only(q, k, b):
        _, lse = attention(q, k, v, b, dropout_p, False, False, None, seed)
        return torch.ops.qkv.attention_weights(q, k, b, lse.detach(), dropout_p, False, False, None, seed, average)

    assert gradgradcheck(with_weights, (q, k, v, bias))
    assert gradgradcheck(weights_only, (q, k, bias))


def test_same_tensor_as_query_key_and_value():
    (x,) = leaves((1, 2, 4, 3))
    assert gradgradcheck(lambda x: attention(x, x, x, None, 0.0, True)[0], (x,))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("config", ["default", "kdim_vdim_bias_kv", "padding_mask"])
def test_gradgradcheck_multihead_attention(need_weights, config):
    kwargs = dict(kdim=3, vdim=5, add_bias_kv=True) if config == "kdim_vdim_bias_kv" else {}
    mha = qkv.MultiheadAttention(4, 2, dtype=F64, **kwargs)
    query = torch.randn(3, 2, 4, dtype=F64, requires_grad=True)
    key = torch.randn(5, 2, mha.kdim, dtype=F64, requires_grad=True)
    value = torch.randn(5, 2, mha.vdim, dtype=F64, requires_grad=True)
    kpm = torch.tensor([[False] * 5, [False, False, True, False, True]]) if config == "padding_mask" else None

    # The projection weight is an input by identity: gradgradcheck perturbs it in place.
    def fn(query, key, value, _projection_weight):
        out, weights = mha(query, key, value, key_padding_mask=kpm, need_weights=need_weights)
        return (out, weights) if need_weights else out

    params = mha.in_proj_weight if mha.in_proj_weight is not None else mha.q_proj_weight
    assert gradgradcheck(fn, (query, key, value, params))


@pytest.mark.parametrize("batch_first", [False, True])
def test_gradgradcheck_multihead_self_attention(batch_first):
    """Self-attention without weights runs attention_qkvpacked (its second derivatives through the
    composite on qkv's views), with a key padding mask and dropout."""
    mha = qkv.MultiheadAttention(4, 2, dropout=0.3, batch_first=batch_first, dtype=F64)
    x = torch.randn(*((2, 3, 4) if batch_first else (3, 2, 4)), dtype=F64, requires_grad=True)
    kpm = torch.tensor([[False] * 3, [False, True, False]])  # (N, L)

    def fn(x, _projection_weight):
        torch.manual_seed(11)  # the same dropout mask at every evaluation
        return mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]

    with _OpRecorder() as recorder:
        fn(x, mha.in_proj_weight)
    assert "qkv.attention_qkvpacked" in recorder.ops
    assert gradgradcheck(fn, (x, mha.in_proj_weight))


@pytest.mark.parametrize("name", ["plain", "causal_top_left", "window", "softcap", "dropout", "bias_with_hidden_keys"])
def test_qkvpacked_composite_first_derivatives_equal_the_kernels(name):
    """attention_qkvpacked's differentiable path (create_graph=True: the composite on its views,
    stacked) gives its backward kernel's gradient of qkv and of the bias."""
    H, _, L, _, options = CASES[name]
    (packed,) = leaves((2, L, 3, H, 3))
    bias = None
    if options.get("bias"):
        bias = torch.randn(2, 1, L, L, dtype=F64)
        bias[0, 0, 1, 2:] = float("-inf")
        bias.requires_grad_()
    dropout_p = options.get("dropout_p", 0.0)
    seed = torch.tensor(1234) if dropout_p else None
    window = options.get("window", (-1, -1))
    inputs = [packed] + ([bias] if bias is not None else [])

    def fn():
        return torch.ops.qkv.attention_qkvpacked(packed * 2.0, bias, dropout_p, options.get("is_causal", False), None,
                                                 seed, window[0], window[1], options.get("softcap", 0.0))[0]

    out = fn()
    grad_out = torch.randn_like(out)
    kernel = torch.autograd.grad(out, inputs, grad_out)
    with _OpRecorder() as recorder:
        composite = torch.autograd.grad(fn(), inputs, grad_out, create_graph=True)
    assert "qkv.attention_qkvpacked_backward" not in recorder.ops
    assert all(g.requires_grad for g in composite)
    for got, want in zip(composite, kernel):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert gradgradcheck(lambda *ts: torch.ops.qkv.attention_qkvpacked(
        ts[0] * 2.0, ts[1] if len(ts) > 1 else None, dropout_p, options.get("is_causal", False), None, seed,
        window[0], window[1], options.get("softcap", 0.0))[0], inputs)


@pytest.mark.parametrize("module", ["self_gqa_window", "causal", "cross"])
def test_gradgradcheck_batch_first_modules(module):
    if module == "self_gqa_window":
        m = qkv.SelfAttention(4, 2, num_kv_heads=1, window=2, dtype=F64)
    elif module == "causal":
        m = qkv.CausalSelfAttention(4, 2, dtype=F64)
    else:
        m = qkv.CrossAttention(4, 2, kdim=3, vdim=3, dtype=F64)
    x = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    memory = torch.randn(2, 5, 3, dtype=F64, requires_grad=True)
    if module == "cross":
        assert gradgradcheck(lambda x, memory: m(x, memory), (x, memory))
    else:
        assert gradgradcheck(lambda x: m(x), (x,))


def test_second_derivatives_match_torch_multihead_attention():
    """A gradient penalty through qkv.MultiheadAttention equals torch's (float64, need_weights=True)."""
    torch.manual_seed(4)
    ref = nn.MultiheadAttention(8, 2, dtype=F64)
    ours = qkv.MultiheadAttention(8, 2, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 8, dtype=F64)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1, 3:] = True

    def penalty(module):
        inp = x.clone().requires_grad_()
        out, w = module(inp, inp, inp, key_padding_mask=kpm)
        (g,) = torch.autograd.grad((out.tanh().sum() + (w * w).sum()), inp, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), list(module.parameters()))

    for got, want in zip(penalty(ours), penalty(ref)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def test_the_flash_backward_kernel_still_serves_first_order_gradients():
    q, k, v = leaves((1, 2, 4, 3), (1, 2, 5, 3), (1, 2, 5, 3))
    for create_graph in (False, True):
        out = attention(q, k, v, None, 0.0, True)[0]
        with _OpRecorder() as recorder:
            torch.autograd.grad(out.sum(), (q, k, v), create_graph=create_graph)
        assert ("qkv.attention_backward" in recorder.ops) == (not create_graph), recorder.ops
    (x,) = leaves((1, 4, 3, 2, 3))
    for create_graph in (False, True):
        out = torch.ops.qkv.attention_qkvpacked(x, None, 0.0, True)[0]
        with _OpRecorder() as recorder:
            torch.autograd.grad(out.sum(), x, create_graph=create_graph)
        assert ("qkv.attention_qkvpacked_backward" in recorder.ops) == (not create_graph), recorder.ops
    # The module too: first-order training gradients never build the L x S composite (its
    # self-attention runs the packed op).
    mha = qkv.MultiheadAttention(4, 2, dtype=F64)
    x = torch.randn(3, 2, 4, dtype=F64, requires_grad=True)
    out, _ = mha(x, x, x, need_weights=False)
    with _OpRecorder() as recorder:
        out.sum().backward()
    assert "qkv.attention_qkvpacked_backward" in recorder.ops and "aten._softmax" not in recorder.ops


VARLEN_OPTIONS = {
    "plain": {},
    "causal_bottom_right_window": dict(is_causal=True, bottom_right=True, window=(2, -1)),
    "causal_top_left_softcap": dict(is_causal=True, softcap=1.5),
    "alibi_per_sequence_window": dict(alibi="per_batch", window=(1, 2), bottom_right=True),
}


@pytest.mark.parametrize("name", sorted(VARLEN_OPTIONS))
def test_gradgradcheck_varlen(name):
    """The packed op: sequences of different lengths (one with no keys), GQA, rows past the last offset."""
    options = dict(VARLEN_OPTIONS[name])
    cu_q = torch.tensor([0, 2, 6, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 5, 5], dtype=torch.int32)
    q, k, v = leaves((8, 4, 3), (5, 2, 3), (5, 2, 2))
    alibi = options.pop("alibi", None)
    slopes = alibi_slopes(4, 3) * 4 if alibi else None
    window = options.pop("window", (-1, -1))

    def fn(q, k, v):
        return torch.ops.qkv.attention_varlen(
            q * 2.0, k, v, cu_q, cu_k, 4, 3, 0.0, options.get("is_causal", False), options.get("bottom_right", False),
            None, None, window[0], window[1], options.get("softcap", 0.0), slopes)[0]

    assert gradgradcheck(fn, (q, k, v))
    out = fn(q, k, v)
    grad_out = torch.randn_like(out)
    kernel = torch.autograd.grad(out, (q, k, v), grad_out)
    composite = torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out, create_graph=True)
    for got, want in zip(composite, kernel):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_varlen_double_backward_with_dropout_raises_a_clear_error():
    q, k, v = leaves((5, 2, 3), (5, 2, 3), (5, 2, 3))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    out, _ = torch.ops.qkv.attention_varlen(q, k, v, cu, cu, 3, 3, 0.2, False, False, None, torch.tensor(3))
    with pytest.raises(RuntimeError, match="attention_varlen: double backward .* with dropout_p > 0 is not supported"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
