"""The doors of issue 17: qkv.flash_attn_func / flash_attn_qkvpacked_func / flash_attn_kvpacked_func /
flash_attn_varlen_func / flash_attn_with_kvcache (flash-attn's layouts and semantics), enable_gqa in qkv.functional.scaled_dot_product_attention,
and num_kv_heads / window in the modules; each against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import qkv
from reference import alibi_slopes, feature_reference, kvcache_reference, tolerance, varlen_reference

F32 = tolerance(torch.float32)




def flash_layout(B, H, Hk, Sq, Sk, D, requires_grad=False, dtype=torch.float32):
    return (torch.randn(B, Sq, H, D, dtype=dtype, requires_grad=requires_grad),
            torch.randn(B, Sk, Hk, D, dtype=dtype, requires_grad=requires_grad),
            torch.randn(B, Sk, Hk, D, dtype=dtype, requires_grad=requires_grad))


def heads_first(*ts):
    return [t.transpose(1, 2) for t in ts]


class RecordQkvCalls(TorchDispatchMode):
    """Records the argument shapes every torch.ops.qkv op receives."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "qkv":
            self.calls.append((func.__name__.split(".")[0], [tuple(a.shape) if isinstance(a, torch.Tensor) else a
                                                           for a in args]))
        return func(*args, **(kwargs or {}))


# ---- flash_attn_func ----------------------------------------------------------------------------

@pytest.mark.parametrize("Sq,Sk", [(7, 19), (19, 7), (1, 300)])
@pytest.mark.parametrize("options", [
    dict(),
    dict(causal=True),
    dict(causal=True, window_size=(4, 0)),
    dict(window_size=(3, 2), softcap=2.0),
    dict(alibi_slopes="per_batch", softmax_scale=0.4),
], ids=lambda o: "-".join(sorted(o)) or "plain")
def test_flash_attn_func_matches_reference(Sq, Sk, options):
    q, k, v = flash_layout(2, 6, 2, Sq, Sk, 16, requires_grad=True)
    options = dict(options)
    if options.get("alibi_slopes") == "per_batch":
        options["alibi_slopes"] = alibi_slopes(6, 2)
    out = qkv.flash_attn_func(q, k, v, **options)
    assert out.shape == (2, Sq, 6, 16) and out.is_contiguous()
    want, _ = feature_reference(*heads_first(q, k, v), is_causal=options.get("causal", False), bottom_right=True,
                                scale=options.get("softmax_scale"), window=options.get("window_size", (-1, -1)),
                                softcap=options.get("softcap", 0.0), alibi_slopes=options.get("alibi_slopes"))
    torch.testing.assert_close(out.double(), want.transpose(1, 2), **F32)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_flash_attn_func_returns_lse_and_probabilities():
    q, k, v = flash_layout(2, 4, 2, 5, 9, 8, dtype=torch.float64)
    out, lse, probs = qkv.flash_attn_func(q, k, v, causal=True, window_size=(3, 0), softcap=1.0,
                                          return_attn_probs=True)
    want, want_lse = feature_reference(*heads_first(q, k, v), is_causal=True, bottom_right=True, window=(3, 0),
                                       softcap=1.0)
    assert lse.shape == (2, 4, 5) and probs.shape == (2, 4, 5, 9)
    torch.testing.assert_close(lse, want_lse)
    torch.testing.assert_close(probs @ v.transpose(1, 2).repeat_interleave(2, 1), out.transpose(1, 2))


def test_flash_attn_func_dropout_follows_the_global_seed():
    q, k, v = flash_layout(2, 4, 4, 16, 16, 8)
    torch.manual_seed(3)
    a = qkv.flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    b = qkv.flash_attn_func(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, qkv.flash_attn_func(q, k, v))


def test_flash_attn_func_errors():
    q, k, v = flash_layout(2, 6, 4, 5, 5, 8)
    with pytest.raises(RuntimeError, match=r"heads \(6\) must be divisible by .* \(4\)"):
        qkv.flash_attn_func(q, k, v)
    with pytest.raises(ValueError, match="q must be a 4-D tensor"):
        qkv.flash_attn_func(q[0], k, v)
    with pytest.raises(ValueError, match="window_size must be a pair"):
        qkv.flash_attn_func(q, k[:, :, :2], v[:, :, :2], window_size=3)
    with pytest.raises(RuntimeError, match=r"window_left must be -1 \(unbounded\) or >= 0; got -2"):
        qkv.flash_attn_func(q, k[:, :, :2], v[:, :, :2], window_size=(-2, 0))
    with pytest.raises(RuntimeError, match=r"softcap must be a finite number >= 0"):
        qkv.flash_attn_func(q, k[:, :, :2], v[:, :, :2], softcap=-1.0)
    with pytest.raises(RuntimeError, match=r"alibi_slopes must be a float32 tensor of shape \(6\) or \(2, 6\)"):
        qkv.flash_attn_func(q, k[:, :, :2], v[:, :, :2], alibi_slopes=torch.ones(4))


# ---- flash_attn_qkvpacked_func / flash_attn_kvpacked_func ---------------------------------------

PACKED_OPTIONS = [dict(), dict(causal=True), dict(causal=True, window_size=(3, 0), softcap=2.0),
                  dict(window_size=(2, 5), alibi_slopes="per_batch", softmax_scale=0.3)]


def packed_options(options, H, B=2):
    options = dict(options)
    if options.get("alibi_slopes") == "per_batch":
        options["alibi_slopes"] = alibi_slopes(H, B)
    return options


@pytest.mark.parametrize("options", PACKED_OPTIONS, ids=lambda o: "-".join(sorted(o)) or "plain")
@pytest.mark.parametrize("S", [1, 19])
def test_flash_attn_qkvpacked_func_matches_reference(S, options):
    options = packed_options(options, 4)
    packed = torch.randn(2, S, 3, 4, 16, requires_grad=True)
    with RecordQkvCalls() as recorder:
        out = qkv.flash_attn_qkvpacked_func(packed, **options)
    assert [name for name, _ in recorder.calls] == ["attention_qkvpacked"]
    assert out.shape == (2, S, 4, 16) and out.is_contiguous()
    q, k, v = packed.unbind(2)
    want, _ = feature_reference(*heads_first(q, k, v), is_causal=options.get("causal", False), bottom_right=True,
                                scale=options.get("softmax_scale"), window=options.get("window_size", (-1, -1)),
                                softcap=options.get("softcap", 0.0), alibi_slopes=options.get("alibi_slopes"))
    torch.testing.assert_close(out.double(), want.transpose(1, 2), **F32)
    # The gradient of flash_attn_func on the views (same kernel), as one tensor of qkv's layout.
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, packed, grad_out)
    (want_grad,) = torch.autograd.grad(qkv.flash_attn_func(q, k, v, **options), packed, grad_out)
    assert got.stride() == packed.stride()
    torch.testing.assert_close(got, want_grad, rtol=0, atol=0)


def test_flash_attn_qkvpacked_func_returns_lse_and_probabilities_and_replays_dropout():
    packed = torch.randn(2, 9, 3, 4, 8, dtype=torch.float64)
    out, lse, probs = qkv.flash_attn_qkvpacked_func(packed, causal=True, window_size=(3, 0), return_attn_probs=True)
    want, want_lse, want_probs = qkv.flash_attn_func(*packed.unbind(2), causal=True, window_size=(3, 0),
                                                     return_attn_probs=True)
    assert lse.shape == (2, 4, 9) and probs.shape == (2, 4, 9, 9)
    for got, ref in ((out, want), (lse, want_lse), (probs, want_probs)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.manual_seed(3)
    a, _, dropped = qkv.flash_attn_qkvpacked_func(packed, dropout_p=0.3, return_attn_probs=True)
    torch.manual_seed(3)
    b = qkv.flash_attn_func(*packed.unbind(2), dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, out)
    torch.testing.assert_close(dropped @ packed[:, :, 2].transpose(1, 2), a.transpose(1, 2))


@pytest.mark.parametrize("options", PACKED_OPTIONS, ids=lambda o: "-".join(sorted(o)) or "plain")
def test_flash_attn_kvpacked_func_is_flash_attn_func_on_its_views(options):
    options = packed_options(options, 6)
    q = torch.randn(2, 7, 6, 16, requires_grad=True)
    kv = torch.randn(2, 12, 2, 3, 16, requires_grad=True)  # GQA: 3 key/value heads
    out = qkv.flash_attn_kvpacked_func(q, kv, **options)
    want, _ = feature_reference(*heads_first(q, *kv.unbind(2)), is_causal=options.get("causal", False),
                                bottom_right=True, scale=options.get("softmax_scale"),
                                window=options.get("window_size", (-1, -1)), softcap=options.get("softcap", 0.0),
                                alibi_slopes=options.get("alibi_slopes"))
    assert out.shape == (2, 7, 6, 16)
    torch.testing.assert_close(out.double(), want.transpose(1, 2), **F32)
    grads = torch.autograd.grad(out.sum(), (q, kv))
    assert [g.shape for g in grads] == [q.shape, kv.shape]


def test_flash_attn_packed_errors():
    with pytest.raises(ValueError, match=r"qkv.flash_attn_qkvpacked_func: qkv must be a 5-D tensor "
                                         r"\(batch, seqlen, 3, nheads, headdim\); got shape \(2, 5, 3, 8\)"):
        qkv.flash_attn_qkvpacked_func(torch.randn(2, 5, 3, 8))
    with pytest.raises(TypeError, match=r"qkv.flash_attn_qkvpacked_func: qkv must be a tensor"):
        qkv.flash_attn_qkvpacked_func([torch.randn(2, 5, 3, 2, 8)])
    with pytest.raises(RuntimeError, match=r"qkv.attention_qkvpacked: qkv must have shape \(batch, seq, 3, heads"):
        qkv.flash_attn_qkvpacked_func(torch.randn(2, 5, 2, 2, 8))
    q = torch.randn(2, 5, 4, 8)
    with pytest.raises(ValueError, match=r"qkv.flash_attn_kvpacked_func: kv must have shape "
                                         r"\(batch, seqlen_k, 2, nheads_k, headdim\).*got shape \(2, 6, 3, 2, 8\)"):
        qkv.flash_attn_kvpacked_func(q, torch.randn(2, 6, 3, 2, 8))
    with pytest.raises(ValueError, match=r"qkv.flash_attn_kvpacked_func: kv must be a 5-D tensor"):
        qkv.flash_attn_kvpacked_func(q, torch.randn(2, 6, 2, 8))
    with pytest.raises(ValueError, match=r"qkv.flash_attn_kvpacked_func: q must be a 4-D tensor"):
        qkv.flash_attn_kvpacked_func(q[0], torch.randn(2, 6, 2, 2, 8))


# ---- flash_attn_varlen_func ---------------------------------------------------------------------

def test_flash_attn_varlen_func_matches_reference():
    lengths_q, lengths_k = [3, 0, 40, 1], [5, 2, 40, 9]
    cu_q = torch.tensor([0, 3, 3, 43, 44], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 47, 56], dtype=torch.int32)
    q = torch.randn(44, 4, 16, requires_grad=True)
    k, v = torch.randn(56, 2, 16, requires_grad=True), torch.randn(56, 2, 16, requires_grad=True)
    out, lse, probs = qkv.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=True,
                                                 window_size=(8, -1), softcap=3.0, alibi_slopes=alibi_slopes(4),
                                                 return_attn_probs=True)
    want, want_lse = varlen_reference(q, k, v, cu_q, cu_k, is_causal=True, bottom_right=True, window=(8, -1),
                                      softcap=3.0, alibi_slopes=alibi_slopes(4))
    torch.testing.assert_close(out.double(), want, **F32)
    assert lse.shape == (4, 44) and probs is None
    assert [g.shape for g in torch.autograd.grad(out.sum(), (q, k, v))] == [q.shape, k.shape, v.shape]
    with pytest.raises(NotImplementedError, match="block_table"):
        qkv.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 40, block_table=torch.zeros(1))


# ---- flash_attn_with_kvcache -------------------------------------------------------------------

@pytest.mark.parametrize("cache_seqlens", [17, "tensor"])
def test_flash_attn_with_kvcache_writes_and_attends(cache_seqlens):
    B, H, Hk, Sc, D = 3, 8, 2, 64, 16
    q = torch.randn(B, 1, H, D)
    k_cache, v_cache = torch.randn(B, Sc, Hk, D), torch.randn(B, Sc, Hk, D)
    k_new, v_new = torch.randn(B, 1, Hk, D), torch.randn(B, 1, Hk, D)
    lengths = torch.tensor([0, 17, 63], dtype=torch.int32) if cache_seqlens == "tensor" else cache_seqlens
    want, want_lse, k_after, v_after = kvcache_reference(
        *heads_first(q, k_cache, v_cache, k_new, v_new),
        lengths if torch.is_tensor(lengths) else torch.full((B,), lengths), is_causal=True, window=(-1, -1),
        softcap=0.0)
    out, lse = qkv.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths, causal=True,
                                           return_softmax_lse=True)
    assert out.shape == (B, 1, H, D) and lse.shape == (B, H, 1)
    torch.testing.assert_close(out.double(), want.transpose(1, 2), **F32)
    torch.testing.assert_close(k_cache.double(), k_after.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(v_cache.double(), v_after.transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["rotary_cos", "rotary_sin", "cache_batch_idx", "cache_leftpad", "block_table"])
def test_flash_attn_with_kvcache_refuses_what_it_lacks(name):
    q, k_cache, v_cache = torch.randn(1, 1, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match=name):
        qkv.flash_attn_with_kvcache(q, k_cache, v_cache, **{name: torch.zeros(1)})


# ---- scaled_dot_product_attention(enable_gqa=True) ----------------------------------------------

def test_sdpa_enable_gqa_reads_the_shared_heads_in_place():
    q = torch.randn(2, 8, 10, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 12, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 12, 16, dtype=torch.float64, requires_grad=True)
    with RecordQkvCalls() as recorder:
        got = qkv.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    name, shapes = recorder.calls[0]
    assert name == "attention" and shapes[1] == (2, 2, 12, 16)  # key's 2 heads reach the kernel
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want)
    cot = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), cot), torch.autograd.grad(want, (q, k, v), cot)):
        torch.testing.assert_close(g, w)


# ---- modules ------------------------------------------------------------------------------------

def project_heads(x, w, b, heads):
    return F.linear(x, w, b).unflatten(-1, (heads, -1)).transpose(1, 2)


def module_reference(module, x, memory=None, is_causal=False, window=(-1, -1)):
    H, Hk, E = module.num_heads, module.num_kv_heads, module.embed_dim
    D = E // H
    if module.in_proj_weight is not None:
        w_q, w_k, w_v = module.in_proj_weight.split([H * D, Hk * D, Hk * D])
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    b_q, b_k, b_v = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.split([H * D, Hk * D, Hk * D])
    source = x if memory is None else memory
    q, k, v = project_heads(x, w_q, b_q, H), project_heads(source, w_k, b_k, Hk), project_heads(source, w_v, b_v, Hk)
    out, _ = feature_reference(q, k, v, is_causal=is_causal, window=window)
    return F.linear(out.transpose(1, 2).flatten(2).to(x.dtype), module.out_proj.weight, module.out_proj.bias)


def test_self_attention_with_kv_heads_and_window():
    module = qkv.SelfAttention(64, 8, num_kv_heads=2, window=5)
    assert module.in_proj_weight.shape == (64 + 2 * 2 * 8, 64) and module.in_proj_bias.shape == (96,)
    x = torch.randn(3, 20, 64)
    torch.testing.assert_close(module(x), module_reference(module, x, window=(4, 4)), **F32)


def test_causal_self_attention_with_kv_heads_and_window():
    module = qkv.CausalSelfAttention(64, 8, num_kv_heads=1, window=6)
    x = torch.randn(2, 30, 64, requires_grad=True)
    out = module(x)
    torch.testing.assert_close(out, module_reference(module, x, is_causal=True, window=(5, -1)), **F32)
    out.sum().backward()
    assert module.in_proj_weight.grad.shape == (64 + 2 * 8, 64)


def test_window_tuple_is_flash_attn_window_size():
    module = qkv.SelfAttention(32, 4, window=(2, 0))
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(module(x), module_reference(module, x, window=(2, 0)), **F32)


@pytest.mark.parametrize("kdim", [None, 24])
def test_cross_attention_with_kv_heads(kdim):
    module = qkv.CrossAttention(64, 8, kdim=kdim, vdim=kdim, num_kv_heads=4)
    x, memory = torch.randn(2, 7, 64), torch.randn(2, 11, kdim or 64)
    torch.testing.assert_close(module(x, memory), module_reference(module, x, memory), **F32)
    if kdim:
        assert module.k_proj_weight.shape == (32, kdim) and module.q_proj_weight.shape == (64, 64)


def test_default_modules_keep_multihead_attention_parameters():
    module = qkv.SelfAttention(32, 4)
    assert module.num_kv_heads == 4 and module.in_proj_weight.shape == (96, 32)
    torch_mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    module.load_state_dict(torch_mha.state_dict())


@pytest.mark.parametrize("make,error,message", [
    (lambda: qkv.SelfAttention(64, 8, num_kv_heads=3), ValueError, r"num_heads \(8\) must be divisible by num_kv_heads \(3\)"),
    (lambda: qkv.SelfAttention(64, 8, num_kv_heads=0), ValueError, r"num_kv_heads must be positive"),
    (lambda: qkv.CausalSelfAttention(64, 8, window=0), ValueError, r"window must be a positive int .* or a \(left, right\) pair of ints >= -1 .*; got"),
    (lambda: qkv.SelfAttention(64, 8, window=(1, -3)), ValueError, r"window must be a positive int .* or a \(left, right\) pair of ints >= -1 .*; got"),
])
def test_module_argument_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()
