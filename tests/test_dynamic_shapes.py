"""torch.compile(dynamic=True) over many sequence lengths: one graph per entry point, and the
compiled results match torch's eager results (outputs and gradients) at every length.

A shape function that reads a concrete size (a C++ Meta kernel calling size(), an at::empty
with integer sizes, a reshape with int64 sizes in a composite op) pins that size with a guard,
and each new length recompiles; with fullgraph=True the ninth raises FailOnRecompileLimitHit,
without it torch silently falls back to eager. Each entry point here is compiled once with a
dynamic=True and called on 12 lengths (2..13: dynamo specialises sizes 0 and 1, so a length of 1
would add a second graph by design; none is used here), counting the graphs dynamo compiled. The
backend is aot_eager, so the backward graphs (through the qkv backward ops' Meta kernels) are
traced symbolically too.
"""
import contextlib

import pytest
import torch
import torch.fx.experimental._config
import torch.nn.functional as F
from torch._dynamo.utils import counters

import qkv

LENGTHS = range(2, 14)
E, H = 16, 4


def compiled_once(fn, fullgraph=True):
    """fn compiled with dynamic shapes, and a function that says how many graphs it took.

    Graphs are counted by dynamo's own unique_graphs statistic rather than by calls to the
    backend: with dynamic=True a float default (dropout_p=0.0) is first traced as a symbol, then
    specialised, and dynamo restarts the analysis of that same frame, calling the backend twice
    for what ends up one graph (a restart within one compile, not a recompile)."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=fullgraph)
    return compiled, lambda: counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def counting_recompiles():
    """Recompiles are counted, not failed on; and sizes that happen to be equal in the first call
    (a length of 2 beside a batch of 2) are not merged into one symbol (duck sizing), which would
    recompile for reasons that have nothing to do with the shape functions under test."""
    with torch._dynamo.config.patch(recompile_limit=len(LENGTHS) + 1), \
            torch.fx.experimental._config.patch(use_duck_shape=False):
        yield


def run_over_lengths(qkv_fn, torch_fn, make_inputs, fullgraph=True):
    """Calls the compiled qkv_fn and the eager torch_fn on inputs of every length; compares outputs
    and the gradients of the inputs; returns how many graphs were compiled."""
    compiled, graphs = compiled_once(qkv_fn, fullgraph)
    with counting_recompiles():
        for length in LENGTHS:
            inputs = make_inputs(length)
            got, want = compiled(*inputs), torch_fn(*inputs)
            got = got if isinstance(got, tuple) else (got,)
            want = want if isinstance(want, tuple) else (want,)
            leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
            got_grads = torch.autograd.grad(sum(g.pow(2).sum() for g in got), leaves, allow_unused=True)
            want_grads = torch.autograd.grad(sum(w.pow(2).sum() for w in want), leaves, allow_unused=True)
            for g, w in zip(got_grads, want_grads, strict=True):
                assert (g is None) == (w is None)
                if w is not None:
                    torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    return graphs()


def leaf(*shape):
    return torch.randn(*shape, requires_grad=True)


def paired_mha(**kwargs):
    torch_mha = torch.nn.MultiheadAttention(E, H, **kwargs).eval()
    qkv_mha = qkv.MultiheadAttention(E, H, **kwargs).eval()
    qkv_mha.load_state_dict(torch_mha.state_dict())
    return qkv_mha, torch_mha


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("device_context", [False, True], ids=["", "device_context"])
def test_multihead_attention(batch_first, need_weights, device_context):
    """device_context: inside `with torch.device(...)` (a torch-function mode, as the cuda runs of the
    device suites and many training scripts use), where dynamo could not trace Tensor.unflatten
    (torch 2.11-2.13): qkv must still compile to one graph."""
    qkv_mha, torch_mha = paired_mha(batch_first=batch_first)

    def make_inputs(length):
        shape = (3, length, E) if batch_first else (length, 3, E)
        memory_shape = (3, length + 3, E) if batch_first else (length + 3, 3, E)
        padding = torch.zeros(3, length + 3, dtype=torch.bool)
        padding[1, -2:] = True
        return leaf(*shape), leaf(*memory_shape), padding

    def call(module):
        def fn(x, memory, padding):
            out, weights = module(x, memory, memory, key_padding_mask=padding, need_weights=need_weights)
            return (out,) if weights is None else (out, weights)
        return fn

    with torch.device("cpu") if device_context else contextlib.nullcontext():
        assert run_over_lengths(call(qkv_mha), call(torch_mha), make_inputs) == 1


def test_multihead_attention_self_attention_causal_training():
    # Training with dropout: the seed is drawn inside the graph; counted, not compared.
    module = qkv.MultiheadAttention(E, H, dropout=0.1, batch_first=True).train()
    mask_of = lambda length: torch.nn.Transformer.generate_square_subsequent_mask(length)
    compiled, graphs = compiled_once(
        lambda x, mask: module(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0])
    with counting_recompiles():
        for length in LENGTHS:
            x = leaf(2, length, E)
            compiled(x, mask_of(length)).sum().backward()
            assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert graphs() == 1


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_modules(causal):
    module = (qkv.CausalSelfAttention if causal else qkv.SelfAttention)(E, H).eval()
    reference = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    reference.load_state_dict(module.state_dict())

    def torch_fn(x):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.size(1)) if causal else None
        return reference(x, x, x, attn_mask=mask, need_weights=False)[0]

    assert run_over_lengths(module, torch_fn, lambda length: (leaf(2, length, E),)) == 1


def test_cross_attention_module():
    module = qkv.CrossAttention(E, H, kdim=12, vdim=12).eval()
    reference = torch.nn.MultiheadAttention(E, H, kdim=12, vdim=12, batch_first=True).eval()
    reference.load_state_dict(module.state_dict())
    count = run_over_lengths(module, lambda x, m: reference(x, m, m, need_weights=False)[0],
                             lambda length: (leaf(2, length, E), leaf(2, 2 * length + 1, 12)))
    assert count == 1


def test_functional_multi_head_attention_forward():
    qkv_mha, _ = paired_mha()
    weights = (E, H, qkv_mha.in_proj_weight, qkv_mha.in_proj_bias, None, None, False, 0.0, qkv_mha.out_proj.weight,
               qkv_mha.out_proj.bias)

    def call(fn):
        return lambda q, k, v, mask: fn(q, k, v, *weights, attn_mask=mask, training=False)

    make_inputs = lambda length: (leaf(length, 2, E), leaf(length + 1, 2, E), leaf(length + 1, 2, E),
                                  torch.randn(length, length + 1))
    assert run_over_lengths(call(qkv.functional.multi_head_attention_forward),
                            call(F.multi_head_attention_forward), make_inputs) == 1


@pytest.mark.parametrize("batch", [(2, 3), (2, 2, 3)], ids=["4-D", "5-D"])
@pytest.mark.parametrize("mask", [None, "bool", "causal"])
def test_scaled_dot_product_attention(batch, mask):
    def make_inputs(length):
        q, k, v = leaf(*batch, length, 8), leaf(*batch, length + 2, 8), leaf(*batch, length + 2, 6)
        attn_mask = torch.rand(*batch, length, length + 2) > 0.2 if mask == "bool" else None
        if attn_mask is not None:
            attn_mask[..., 0] = True  # no row without a key (torch gives NaN there, qkv zeros)
        return q, k, v, attn_mask

    def call(fn):
        return lambda q, k, v, attn_mask: fn(q, k, v, attn_mask, is_causal=mask == "causal")

    count = run_over_lengths(call(qkv.functional.scaled_dot_product_attention),
                             call(F.scaled_dot_product_attention), make_inputs)
    assert count == 1


# ---- the core ops, through autograd ------------------------------------------------------------


def core_inputs(length):
    return leaf(2, 3, length, 8), leaf(2, 3, length + 3, 8), leaf(2, 3, length + 3, 4), leaf(length, length + 3)


def sdpa(q, k, v, bias, is_causal=False):
    return F.scaled_dot_product_attention(q, k, v, bias, is_causal=is_causal)


def sdpa_weights(q, k, bias):
    return torch.softmax(q @ k.transpose(-2, -1) / q.size(-1) ** 0.5 + bias, dim=-1)


@pytest.mark.parametrize("name", ["attention", "attention causal", "attention_weights", "attention_with_weights",
                                  "attention_with_weights averaged"])
def test_core_ops(name):
    ops = torch.ops.qkv
    qkv_fn, torch_fn = {
        "attention": (lambda q, k, v, b: ops.attention(q, k, v, b)[0], sdpa),
        "attention causal": (lambda q, k, v, b: ops.attention(q, k, v, None, 0.0, True)[0],
                             lambda q, k, v, b: sdpa(q, k, v, None, True)),
        "attention_weights": (lambda q, k, v, b: ops.attention_weights(q, k, b, ops.attention(q, k, v, b)[1]),
                              lambda q, k, v, b: sdpa_weights(q, k, b)),
        "attention_with_weights": (lambda q, k, v, b: ops.attention_with_weights(q, k, v, b)[::2],
                                   lambda q, k, v, b: (sdpa(q, k, v, b), sdpa_weights(q, k, b))),
        "attention_with_weights averaged": (
            lambda q, k, v, b: ops.attention_with_weights(q, k, v, b, 0.0, False, False, None, None, True)[::2],
            lambda q, k, v, b: (sdpa(q, k, v, b), sdpa_weights(q, k, b).mean(1))),
    }[name]
    assert run_over_lengths(qkv_fn, torch_fn, core_inputs) == 1


@pytest.mark.parametrize("layout", ["batch_first", "seq_first"])
def test_attention_qkvpacked(layout):
    """The packed op and its backward op (whose gradient takes qkv's strides) on symbolic lengths."""
    def make_inputs(length):
        if layout == "batch_first":
            qkv = torch.randn(2, length, 3, 3, 8)
        else:
            qkv = torch.randn(length, 2, 3, 3, 8).permute(1, 0, 2, 3, 4)
        return qkv.requires_grad_(), leaf(length, length)

    def qkv_fn(qkv, bias):
        return torch.ops.qkv.attention_qkvpacked(qkv, bias, 0.0, True)[0]

    def torch_fn(qkv, bias):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        causal = torch.ones(q.size(2), q.size(2), dtype=torch.bool).tril()
        return sdpa(q, k, v, bias.masked_fill(~causal, float("-inf")))

    assert run_over_lengths(qkv_fn, torch_fn, make_inputs) == 1


@pytest.mark.parametrize("op", ["multi_head_attention", "masked_self_attention", "cross_attention"])
def test_projection_ops(op):
    reference = torch.nn.MultiheadAttention(E, H, batch_first=True)
    with torch.no_grad():  # non-zero projection biases
        reference.in_proj_bias.normal_()
        reference.out_proj.bias.normal_()
    qkv_fn = {
        "multi_head_attention": lambda x, m: torch.ops.qkv.multi_head_attention(
            x, m, m, H, reference.in_proj_weight, reference.in_proj_bias, reference.out_proj.weight,
            reference.out_proj.bias),
        "masked_self_attention": lambda x, m: torch.ops.qkv.masked_self_attention(
            x, H, reference.in_proj_weight, reference.in_proj_bias, reference.out_proj.weight,
            reference.out_proj.bias),
        "cross_attention": lambda x, m: torch.ops.qkv.cross_attention(
            x, m, H, *reference.in_proj_weight.chunk(3),
            reference.in_proj_bias, reference.out_proj.weight, reference.out_proj.bias),
    }[op]

    def torch_fn(x, m):
        if op == "masked_self_attention":
            mask = torch.nn.Transformer.generate_square_subsequent_mask(x.size(1))
            return reference(x, x, x, attn_mask=mask, need_weights=False)[0]
        return reference(x, m, m, need_weights=False)[0]

    assert run_over_lengths(qkv_fn, torch_fn, lambda length: (leaf(2, length, E), leaf(2, length + 4, E))) == 1
