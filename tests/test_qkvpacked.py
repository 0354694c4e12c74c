"""torch.ops.qkv.attention_qkvpacked: self-attention on one packed qkv (B, L, 3, H, D) whose backward
writes the gradient of qkv as one tensor (no stack of three gradients).

Checked: outputs and gradients against the float64 reference (causal, windows, softcap, ALiBi, bias
with its gradient, odd sizes, contiguous / sequence-first / strided qkv, expanded bias); bitwise
equality with the core op on qkv's views (dropout included, same seed); the gradient's strides;
gradcheck and gradgradcheck; Meta shapes and strides; errors; and that qkv.MultiheadAttention's
self-attention now runs it: no stack/unbind in its backward graph, no copy of the projection's
gradient, outputs and gradients as torch.nn.MultiheadAttention's.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import qkv
from reference import alibi_slopes, dropout_seed, feature_reference, grad_tolerance, tolerance

pytestmark = pytest.mark.usefixtures("device")  # cpu, and cuda when present (conftest.py)

ops = torch.ops.qkv
F64 = torch.float64


def packed(B, L, H, D, layout="contiguous", dtype=F64):
    """A fresh random qkv (B, L, 3, H, D) in one of several memory layouts."""
    if layout == "contiguous":
        t = torch.randn(B, L, 3, H, D, dtype=dtype)
    elif layout == "seq_first":  # (L, B, 3E) from a sequence-first projection, viewed batch-first
        t = torch.randn(L, B, 3, H, D, dtype=dtype).permute(1, 0, 2, 3, 4)
    elif layout == "strided":  # rows cut from a wider tensor: not dense
        t = torch.randn(B, L, 3, H, D + 5, dtype=dtype)[..., 2:2 + D]
    elif layout == "heads_first":  # (B, 3, H, L, D) memory: unit-stride rows, token stride D
        t = torch.randn(B, 3, H, L, D, dtype=dtype).permute(0, 3, 1, 2, 4)
    else:
        raise ValueError(layout)
    return t.requires_grad_()


def views(t):
    """The core op's (B, H, L, D) query, key and value of a packed qkv."""
    return [t[:, :, i].transpose(1, 2) for i in range(3)]


def option_args(options, H, B, L):
    """The op's keyword-free arguments after qkv for `options`."""
    window = options.get("window", (-1, -1))
    slopes = None
    if options.get("alibi"):
        slopes = alibi_slopes(H, B) if options["alibi"] == "per_batch" else alibi_slopes(H)
    return dict(is_causal=options.get("causal", False), scale=options.get("scale"), window=window,
                softcap=options.get("softcap", 0.0), alibi_slopes=slopes)


def call(t, bias=None, dropout_p=0.0, seed=None, is_causal=False, scale=None, window=(-1, -1), softcap=0.0,
         alibi_slopes=None):
    return ops.attention_qkvpacked(t, bias, dropout_p, is_causal, scale, seed, window[0], window[1], softcap,
                                   alibi_slopes)


def call_views(t, bias=None, dropout_p=0.0, seed=None, is_causal=False, scale=None, window=(-1, -1), softcap=0.0,
               alibi_slopes=None):
    q, k, v = views(t)
    return ops.attention(q, k, v, bias, dropout_p, is_causal, False, scale, seed, window[0], window[1], softcap,
                         alibi_slopes)


OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window=(3, 1)),
    "causal_window_softcap": dict(causal=True, window=(4, -1), softcap=1.5),
    "alibi_scale": dict(alibi="per_batch", scale=0.3),
    "bias": dict(bias="full"),
    "causal_expanded_bias": dict(causal=True, bias="expanded"),
    "key_padding_bias": dict(bias="key_padding"),
}


def make_bias(kind, B, H, L, dtype):
    if kind is None:
        return None
    if kind == "full":
        return torch.randn(B, H, L, L, dtype=dtype, requires_grad=True)
    if kind == "expanded":  # a stride-0 view: its gradient is summed over the broadcast dimensions
        return torch.randn(1, 1, L, L, dtype=dtype, requires_grad=True).expand(B, H, L, L)
    if kind == "key_padding":  # (B, 1, 1, L) with the last keys of batch 0 hidden
        b = torch.randn(B, 1, 1, L, dtype=dtype)
        b[0, ..., L // 2 + 1:] = float("-inf")
        return b.requires_grad_()
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "seq_first", "strided", "heads_first"])
@pytest.mark.parametrize("L,D", [(1, 8), (7, 24), (33, 8)])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_matches_the_float64_reference(name, L, D, layout, dtype):
    options = OPTIONS[name]
    B, H = 2, 3
    t = packed(B, L, H, D, layout, dtype)
    bias = make_bias(options.get("bias"), B, H, L, dtype)
    args = option_args(options, H, B, L)
    out, lse = call(t, bias, **args)
    assert out.shape == (B, H, L, D) and lse.shape == (B, H, L)

    leaf_bias = bias if bias is None or bias.is_leaf else bias._base  # the expanded bias's own tensor
    q, k, v = (x.detach().double().requires_grad_() for x in views(t))
    ref_bias = None if bias is None else bias.detach().double().requires_grad_()
    want, want_lse = feature_reference(q, k, v, ref_bias, args["is_causal"], False, args["scale"], args["window"],
                                       args["softcap"], args["alibi_slopes"])
    torch.testing.assert_close(out.double(), want, **tolerance(dtype))
    torch.testing.assert_close(lse.double(), want_lse, **tolerance(dtype))

    grad_out = torch.randn_like(out)
    inputs = [t] + ([leaf_bias] if bias is not None else [])
    got = torch.autograd.grad(out, inputs, grad_out)
    ref_inputs = [q, k, v] + ([ref_bias] if bias is not None else [])
    ref = torch.autograd.grad(want, ref_inputs, grad_out.double())
    torch.testing.assert_close(got[0].double(), torch.stack([g.transpose(1, 2) for g in ref[:3]], 2),
                               **grad_tolerance(dtype))
    if bias is not None:
        want_bias_grad = ref[3] if bias.is_leaf else ref[3].sum((0, 1), keepdim=True)
        torch.testing.assert_close(got[1].double(), want_bias_grad, **grad_tolerance(dtype))


@pytest.mark.parametrize("layout", ["contiguous", "seq_first", "strided"])
@pytest.mark.parametrize("options", [
    dict(), dict(causal=True, bias="key_padding"), dict(window=(2, 2), softcap=2.0, alibi="heads"),
    dict(dropout_p=0.3), dict(dropout_p=0.5, causal=True, bias="full", window=(5, -1))],
    ids=["plain", "causal_bias", "window_softcap_alibi", "dropout", "dropout_causal_bias_window"])
def test_bitwise_the_core_op_on_its_views(options, layout):
    """The same kernel on the same views, forward and backward: dropout with one seed drops the same
    probabilities, and writing dQ/dK/dV into one buffer changes no bit of them."""
    B, L, H, D = 2, 37, 4, 16
    t = packed(B, L, H, D, layout, torch.float32)
    bias = make_bias(options.get("bias"), B, H, L, torch.float32)
    args = option_args(options, H, B, L)
    dropout_p = options.get("dropout_p", 0.0)
    seed = dropout_seed(77) if dropout_p else None
    out, lse = call(t, bias, dropout_p, seed, **args)
    want, want_lse = call_views(t, bias, dropout_p, seed, **args)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    grad_out = torch.randn_like(out)
    inputs = [t] + ([bias] if bias is not None else [])
    got = torch.autograd.grad(out, inputs, grad_out)
    ref = torch.autograd.grad(want, inputs, grad_out)
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g, r)


def test_dropout_without_a_seed_replays_the_forward_mask():
    """The autograd layer draws the seed once (torch's generator) and replays it in the backward."""
    t = packed(1, 9, 2, 8, dtype=torch.float32)
    torch.manual_seed(5)
    out, _ = call(t, None, 0.4)
    (got,) = torch.autograd.grad(out.sum(), t)
    torch.manual_seed(5)
    want, _ = call_views(t, None, 0.4)
    (ref,) = torch.autograd.grad(want.sum(), t)
    assert torch.equal(out, want) and torch.equal(got, ref)


@pytest.mark.parametrize("layout,dense", [("contiguous", True), ("seq_first", True), ("heads_first", True),
                                          ("strided", False)])
def test_the_gradient_has_qkvs_strides_when_qkv_is_dense(layout, dense):
    t = packed(2, 6, 3, 8, layout)
    out, _ = call(t, None, 0.0, None, True)
    (grad,) = torch.autograd.grad(out.sum(), t)
    want = t.stride() if dense else torch.empty(t.shape).stride()
    assert grad.shape == t.shape and grad.stride() == want
    # The Meta kernel allocates the same layout (fake tensors must match real ones to the stride).
    meta = t.detach().to("meta")
    meta_out, meta_lse = call(meta, None, 0.0, None, True)
    meta_grad, _ = ops.attention_qkvpacked_backward(meta_out, meta, None, meta_out, meta_lse, 0.0, True, None, None,
                                                    False)
    assert (meta_out.shape, meta_out.stride()) == (out.shape, out.stride())
    assert (meta_grad.shape, meta_grad.stride()) == (grad.shape, grad.stride())


def test_a_non_dense_qkv_with_channels_last_like_strides_gets_a_contiguous_gradient():
    # (B, 3, H, D, L') memory viewed as (B, L, 3, H, D) with L < L': the sequence has stride 1, the
    # pattern of channels_last_3d, and rows are missing. empty_like would pick channels_last_3d.
    t = torch.randn(2, 3, 5, 6, 8, dtype=F64).permute(0, 4, 1, 2, 3)[:, :4].requires_grad_()
    assert t.storage_offset() == 0 and t.numel() < t.untyped_storage().nbytes() // 8  # rows missing: not dense
    assert torch.empty_like(t).stride() != torch.empty(t.shape).stride()  # the trap being avoided
    out, _ = call(t)
    (grad,) = torch.autograd.grad(out.sum(), t)
    assert grad.is_contiguous()


def test_no_keys_and_no_batch():
    for shape in [(0, 4, 3, 2, 8), (2, 0, 3, 2, 8), (2, 4, 3, 0, 8)]:
        t = torch.randn(*shape, dtype=F64, requires_grad=True)
        out, lse = call(t, None, 0.0, None, True)
        assert out.shape == (shape[0], shape[3], shape[1], shape[4])
        (grad,) = torch.autograd.grad(out.sum(), t)
        assert grad.shape == t.shape and not grad.any()


@pytest.mark.parametrize("options", [dict(causal=True), dict(window=(1, 2), softcap=1.5, alibi="heads"),
                                     dict(bias="key_padding"), dict(dropout_p=0.3)],
                         ids=["causal", "window_softcap_alibi", "bias", "dropout"])
def test_gradcheck_and_gradgradcheck(options):
    B, L, H = 2, 5, 2
    t = packed(B, L, H, 3)
    bias = make_bias(options.get("bias"), B, H, L, F64)
    args = option_args(options, H, B, L)
    dropout_p = options.get("dropout_p", 0.0)
    seed = dropout_seed(9) if dropout_p else None
    inputs = (t,) if bias is None else (t, bias)

    def fn(t, *maybe_bias):
        return call(t * 2.0, maybe_bias[0] if maybe_bias else None, dropout_p, seed, **args)[0]

    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_opcheck(requires_grad, dropout):
    t = torch.randn(2, 10, 3, 3, 8, requires_grad=requires_grad)
    bias = torch.randn(3, 10, 10, requires_grad=requires_grad)
    seed = dropout_seed(5)
    torch.library.opcheck(ops.attention_qkvpacked.default, (t, bias, dropout, True, None, seed, 4, -1, 1.5))
    out, lse = ops.attention_qkvpacked(t.detach(), bias.detach(), dropout, True, None, seed)
    grad = torch.randn_like(out).requires_grad_(requires_grad)
    # Once differentiable (a second derivative through it raises): no AOT backprop through it.
    utils = (("test_schema", "test_autograd_registration", "test_faketensor") if requires_grad
             else torch.library._OPCHECK_DEFAULT_UTILS)
    torch.library.opcheck(ops.attention_qkvpacked_backward.default,
                          (grad, t.detach(), bias.detach(), out, lse, dropout, True, None, seed, True),
                          test_utils=utils)


def test_the_backward_op_is_once_differentiable():
    t = packed(1, 4, 2, 3)
    out, lse = call(t)
    grad_out = torch.randn_like(out, requires_grad=True)
    grad_qkv, _ = ops.attention_qkvpacked_backward(grad_out, t, None, out, lse, 0.0, False, None, None, False)
    with pytest.raises(RuntimeError, match="qkv.attention_qkvpacked_backward: double backward"):
        grad_qkv.sum().backward()


def test_compile_fullgraph():
    t = packed(2, 7, 2, 8, dtype=torch.float32)

    def fn(t):
        out, _ = ops.attention_qkvpacked(t, None, 0.0, True)
        return out.pow(2).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (want,) = torch.autograd.grad(fn(t), t)
    (got,) = torch.autograd.grad(compiled(t), t)
    torch.testing.assert_close(got, want)


# ---- errors ---------------------------------------------------------------------------------------


def bad_calls():
    t = torch.randn(2, 5, 3, 2, 8)
    out, lse = ops.attention_qkvpacked(t)
    bwd = lambda go=torch.randn_like(out), qkv=t, l=lse: ops.attention_qkvpacked_backward(
        go, qkv, None, out, l, 0.0, False, None, None, False)
    return [
        ("4-D", lambda: ops.attention_qkvpacked(t[:, :, 0]),
         r"qkv.attention_qkvpacked: qkv must be a 5-D tensor \(batch, seq, 3, heads, head_dim\); got a 4-D"),
        ("size(2) 2", lambda: ops.attention_qkvpacked(t[:, :, :2]),
         r"qkv.attention_qkvpacked: qkv must have shape \(batch, seq, 3, heads, head_dim\).*\[2, 5, 2, 2, 8\]"),
        ("int dtype", lambda: ops.attention_qkvpacked(t.int()),
         r"qkv.attention_qkvpacked: qkv must be float32, float64, float16 or bfloat16; got .* Int"),
        ("meta bias", lambda: ops.attention_qkvpacked(t, torch.zeros(5, 5, device="meta")),
         r"qkv.attention_qkvpacked: bias must be on the query's device"),
        ("bias shape", lambda: ops.attention_qkvpacked(t, torch.zeros(5, 4)),
         r"qkv.attention_qkvpacked: bias must be broadcastable to \(batch, heads, query_len, key_len\) = "
         r"\(2, 2, 5, 5\)"),
        ("dropout_p", lambda: ops.attention_qkvpacked(t, None, 1.5), r"qkv.attention_qkvpacked: dropout_p must be"),
        ("window", lambda: ops.attention_qkvpacked(t, None, 0.0, False, None, None, -2),
         r"qkv.attention_qkvpacked: window_left must be -1"),
        ("alibi", lambda: ops.attention_qkvpacked(t, None, 0.0, False, None, None, -1, -1, 0.0, torch.ones(3)),
         r"qkv.attention_qkvpacked: alibi_slopes must be a float32 tensor of shape \(2\)"),
        ("backward size(2)", lambda: bwd(qkv=t[:, :, :2]),
         r"qkv.attention_qkvpacked_backward: qkv must have shape \(batch, seq, 3, heads, head_dim\)"),
        ("backward 6-D", lambda: bwd(qkv=t[None]), r"qkv.attention_qkvpacked_backward: qkv must be a 5-D tensor"),
        ("backward grad_out", lambda: bwd(go=out[..., :4]),
         r"qkv.attention_qkvpacked_backward: grad_out must be a Float tensor of shape \[2, 2, 5, 8\]"),
        ("backward logsumexp", lambda: bwd(l=lse.double()),
         r"qkv.attention_qkvpacked_backward: logsumexp must be a Float tensor"),
        ("backward needs the seed", lambda: ops.attention_qkvpacked_backward(
            out, t, None, out, lse, 0.3, False, None, None, False),
         r"qkv.attention_qkvpacked_backward: with dropout_p > 0 .*dropout_seed must be the seed of the forward"),
    ]


@pytest.mark.parametrize("case", bad_calls(), ids=lambda case: case[0])
def test_errors_name_the_op_and_the_argument(case):
    _, fn, message = case
    with pytest.raises(RuntimeError, match=message):
        fn()


def test_meta_errors_too():
    t = torch.randn(2, 5, 3, 2, 8, device="meta")
    with pytest.raises(RuntimeError, match=r"qkv.attention_qkvpacked: qkv must be a 5-D tensor"):
        ops.attention_qkvpacked(t[0])
    with pytest.raises(RuntimeError, match=r"qkv.attention_qkvpacked: qkv must have shape \(batch, seq, 3"):
        ops.attention_qkvpacked(t[:, :, 1:])
    out, lse = ops.attention_qkvpacked(t)
    with pytest.raises(RuntimeError, match=r"qkv.attention_qkvpacked_backward: grad_out must be a Float tensor"):
        ops.attention_qkvpacked_backward(out[:, :1], t, None, out, lse, 0.0, False, None, None, False)


# ---- qkv.MultiheadAttention's self-attention runs it ----------------------------------------------------


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def backward_graph(t):
    """The names of every node of t's backward graph."""
    names, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


def assert_packed_backward(out):
    """out's backward runs the packed op, and nothing stacks, slices or copies the projection's gradient."""
    graph = backward_graph(out)
    assert any("AttentionQkvpacked" in name for name in graph), graph
    assert not any(name.startswith(("Stack", "Unbind", "Slice", "Select", "Split", "Narrow")) for name in graph), graph
    with _OpRecorder() as recorder:
        out.sum().backward()
    assert "qkv.attention_qkvpacked_backward" in recorder.ops
    assert not recorder.ops & {"aten.stack", "aten.cat", "aten.clone", "aten.copy_", "aten.slice_backward",
                               "aten.select_backward", "aten._unsafe_view"}, recorder.ops


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_self_attention_backward_holds_no_stack(batch_first):
    mha = qkv.MultiheadAttention(16, 2, batch_first=batch_first, dtype=F64)
    x = torch.randn(3, 5, 16, dtype=F64, requires_grad=True)
    out, _ = mha(x, x, x, need_weights=False)
    assert_packed_backward(out)


@pytest.mark.parametrize("op", ["multi_head_attention", "masked_self_attention"])
def test_projection_ops_self_attention_backward_holds_no_stack(op):
    w_in, w_out = torch.randn(48, 16, requires_grad=True), torch.randn(16, 16, requires_grad=True)
    x = torch.randn(2, 7, 16, requires_grad=True)
    if op == "multi_head_attention":
        out = ops.multi_head_attention(x, x, x, 4, w_in, None, w_out, None)
    else:
        out = ops.masked_self_attention(x, 4, w_in, None, w_out, None)
    assert_packed_backward(out)


def test_grouped_query_self_attention_keeps_the_views():
    # Key/value heads fewer than the query's: no packed layout; the core op on the views, as before.
    module = qkv.SelfAttention(16, 4, num_kv_heads=2)
    x = torch.randn(2, 6, 16, requires_grad=True)
    out = module(x)
    assert not any("AttentionQkvpacked" in name for name in backward_graph(out))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("masks", [None, "padding", "causal", "float_mask_and_padding"])
def test_multihead_attention_matches_torch(batch_first, batched, masks):
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(16, 4, batch_first=batch_first, dtype=F64)
    with torch.no_grad():
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
    ours = qkv.MultiheadAttention(16, 4, batch_first=batch_first, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    N, L = 3, 7
    shape = (N, L, 16) if batch_first else (L, N, 16)
    x = torch.randn(*shape if batched else (L, 16), dtype=F64)
    kwargs = {}
    if masks in ("padding", "float_mask_and_padding"):
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[1, -3:] = True
        if masks == "float_mask_and_padding":  # float like the attn_mask (torch warns on mixed kinds)
            kpm = torch.zeros(N, L, dtype=F64).masked_fill(kpm, float("-inf"))
        kwargs["key_padding_mask"] = kpm if batched else kpm[1]
    if masks == "causal":
        kwargs.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(L, dtype=F64), is_causal=True)
    if masks == "float_mask_and_padding":
        kwargs["attn_mask"] = torch.randn(L, L, dtype=F64)

    def run(module):
        inp = x.clone().requires_grad_()
        out, weights = module(inp, inp, inp, need_weights=False, **kwargs)
        assert weights is None
        grad_out = torch.randn(out.shape, dtype=F64, generator=torch.Generator(out.device).manual_seed(1))
        grads = torch.autograd.grad(out, [inp, *module.parameters()], grad_out)
        return out, grads

    out, grads = run(ours)
    want, want_grads = run(ref)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
