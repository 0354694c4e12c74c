"""torch.library.opcheck on the issue 17 ops and options (schema, autograd registration, fake
tensors, AOT dispatch), and torch.compile(fullgraph=True, dynamic=True) through every door with one
graph serving several sequence lengths."""
import pytest
import torch

import qkv
from reference import alibi_slopes, dropout_seed

pytestmark = pytest.mark.usefixtures("device")

# The backward ops are once-differentiable: with requires_grad the AOT test that backprops
# through them is left out (as in test_core_opcheck.py).
ONCE_DIFFERENTIABLE_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def core_inputs(requires_grad, L=10, S=12):
    q = torch.randn(2, 4, L, 8, requires_grad=requires_grad)
    k = torch.randn(2, 2, S, 8, requires_grad=requires_grad)
    v = torch.randn(2, 2, S, 6, requires_grad=requires_grad)
    return q, k, v


OPTIONS = [  # bias, dropout, is_causal, bottom_right, scale, window_left, window_right, softcap, alibi
    (False, 0.0, True, True, None, 3, -1, 2.0, "heads"),
    (True, 0.2, False, False, 0.5, 2, 4, 0.0, "batch_heads"),
    (False, 0.0, False, True, None, -1, -1, 5.0, None),
]


def core_args(requires_grad, option):
    has_bias, dropout, causal, bottom_right, scale, left, right, softcap, alibi = option
    q, k, v = core_inputs(requires_grad)
    bias = torch.randn(4, 10, 12, requires_grad=requires_grad) if has_bias else None
    slopes = {"heads": alibi_slopes(4), "batch_heads": alibi_slopes(4, 2), None: None}[alibi]
    return (q, k, v, bias, dropout, causal, bottom_right, scale, dropout_seed(7), left, right, softcap, slopes)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("option", OPTIONS)
def test_opcheck_attention(requires_grad, option):
    torch.library.opcheck(torch.ops.qkv.attention.default, core_args(requires_grad, option))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("option", OPTIONS)
def test_opcheck_attention_backward(requires_grad, option):
    args = core_args(False, option)
    q, k, v, bias = args[:4]
    out, lse = torch.ops.qkv.attention(*args)
    grad = torch.randn_like(out).requires_grad_(requires_grad)
    rest = args[4:9]
    torch.library.opcheck(torch.ops.qkv.attention_backward.default,
                          (grad, q, k, v, bias, out, lse, *rest, bias is not None, *args[9:]),
                          test_utils=ONCE_DIFFERENTIABLE_UTILS if requires_grad else torch.library._OPCHECK_DEFAULT_UTILS)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_weights_ops(requires_grad):
    args = core_args(requires_grad, OPTIONS[1])
    q, k, v, bias, dropout, causal, bottom_right, scale, seed, left, right, softcap, slopes = args
    features = (left, right, softcap, slopes)
    _, lse = torch.ops.qkv.attention(*args)
    torch.library.opcheck(torch.ops.qkv.attention_weights.default,
                          (q, k, bias, lse.detach(), dropout, causal, bottom_right, scale, seed, False, *features))
    for average_heads in (False, True):
        torch.library.opcheck(torch.ops.qkv.attention_with_weights.default,
                              (q, k, v, bias, dropout, causal, bottom_right, scale, seed, average_heads, *features))
    grad = torch.randn(2, 4, 10, 12, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.qkv.attention_weights_backward.default,
                          (grad, q.detach(), k.detach(), bias.detach(), lse.detach(), dropout, causal, bottom_right,
                           scale, seed, True, *features),
                          test_utils=ONCE_DIFFERENTIABLE_UTILS if requires_grad else torch.library._OPCHECK_DEFAULT_UTILS)


def varlen_args(requires_grad, dropout=0.0):
    cu_q = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
    q = torch.randn(10, 4, 8, requires_grad=requires_grad)
    k = torch.randn(14, 2, 8, requires_grad=requires_grad)
    v = torch.randn(14, 2, 6, requires_grad=requires_grad)
    return (q, k, v, cu_q, cu_k, 7, 8, dropout, True, True, None, dropout_seed(3), 4, -1, 1.5, alibi_slopes(4))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_opcheck_varlen(requires_grad, dropout):
    args = varlen_args(requires_grad, dropout)
    torch.library.opcheck(torch.ops.qkv.attention_varlen.default, args)
    q, k, v = (t.detach() for t in args[:3])
    out, lse = torch.ops.qkv.attention_varlen(q, k, v, *args[3:])
    grad = torch.randn_like(out).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.qkv.attention_varlen_backward.default, (grad, q, k, v, out, lse, *args[3:]),
                          test_utils=ONCE_DIFFERENTIABLE_UTILS if requires_grad else torch.library._OPCHECK_DEFAULT_UTILS)


def test_opcheck_kvcache():
    q = torch.randn(2, 4, 1, 8)
    k_cache, v_cache = torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 6)
    k_new, v_new = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 6)
    lengths = torch.tensor([3, 19], dtype=torch.int32)
    torch.library.opcheck(torch.ops.qkv.attention_kvcache.default,
                          (q, k_cache, v_cache, k_new, v_new, lengths, True, None, 8, -1, 3.0, alibi_slopes(4)))
    torch.library.opcheck(torch.ops.qkv.attention_kvcache.default,
                          (q, k_cache, v_cache, None, None, None, False, 0.3, -1, -1, 0.0, None))


def assert_compiles_once(fn, make_inputs, lengths):
    """One graph for every length (test_dynamic_shapes.py's counting: dynamo's unique graphs,
    no duck sizing), with the eager results and gradients at each."""
    from test_dynamic_shapes import compiled_once, counting_recompiles

    compiled, graphs = compiled_once(fn)
    with counting_recompiles():
        for n in lengths:
            inputs = make_inputs(n)
            eager = fn(*inputs)
            got = compiled(*inputs)
            torch.testing.assert_close(got, eager)
            leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
            if leaves:
                for g, e in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(eager.sum(), leaves)):
                    torch.testing.assert_close(g, e)
    assert graphs() == 1, f"{graphs()} graphs for sequence lengths {lengths}"


def test_compile_flash_attn_func_dynamic():
    # The slopes are made outside the compiled function: inside it, dynamo (torch 2.11) puts a
    # constant torch.tensor on the CPU whatever the torch.device context says.
    slopes = alibi_slopes(4)

    def fn(q, k, v):
        return qkv.flash_attn_func(q, k, v, causal=True, window_size=(5, 0), softcap=2.0, alibi_slopes=slopes) * 2

    make = lambda n: tuple(torch.randn(2, n, h, 8, requires_grad=True) for h in (4, 2, 2))
    with torch.device(torch.get_default_device()):  # as the cuda run is: a device context, on every device
        assert_compiles_once(fn, make, [9, 17, 33])


def test_compile_varlen_dynamic():
    def fn(q, k, v, cu, max_len):
        return qkv.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True, window_size=(3, 0)) + 1

    def make(n):
        lengths = [n, 1, 2 * n]
        cu = torch.tensor([0, n, n + 1, 3 * n + 1], dtype=torch.int32)
        total = sum(lengths)
        return (torch.randn(total, 4, 8, requires_grad=True), torch.randn(total, 2, 8, requires_grad=True),
                torch.randn(total, 2, 8, requires_grad=True), cu, 2 * n)

    assert_compiles_once(fn, make, [5, 9, 13])


def test_compile_kvcache_dynamic():
    def fn(q, k_cache, v_cache, k, v, lengths):
        return qkv.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, causal=True) * 1

    def make(n):
        return (torch.randn(2, 1, 4, 8), torch.randn(2, n, 2, 8), torch.randn(2, n, 2, 8), torch.randn(2, 1, 2, 8),
                torch.randn(2, 1, 2, 8), torch.tensor([1, n - 1], dtype=torch.int32))

    assert_compiles_once(fn, make, [10, 20, 40])


def test_compile_sdpa_gqa_and_modules_dynamic():
    layer = qkv.CausalSelfAttention(32, 4, num_kv_heads=2, window=4)

    def fn(x):
        q = torch.unflatten(x, -1, (4, 8)).transpose(1, 2)
        kv = q[:, :2]
        y = qkv.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return layer(x) + y.transpose(1, 2).flatten(2)

    with torch.device(torch.get_default_device()):  # as the cuda run is: a device context, on every device
        assert_compiles_once(fn, lambda n: (torch.randn(2, n, 32, requires_grad=True),), [6, 11, 20])
