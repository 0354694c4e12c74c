"""NestedTensor inputs (jagged and strided) in qkv.MultiheadAttention and the batch-first modules:
nn.TransformerEncoder's nested inference path after qkv.convert or a class swap, direct calls against
a float64 per-sequence reference, gradients, dropout, and the errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkv
from reference import feature_reference

pytestmark = pytest.mark.filterwarnings(
    "ignore:enable_nested_tensor is True:UserWarning",
    "ignore:The PyTorch API of nested tensors:UserWarning",
)
F64 = torch.float64
LAYOUTS = [torch.strided, torch.jagged]
LENGTH_SETS = {
    "mixed": [6, 1, 4, 3],
    "one_full": [5, 2],
    "equal": [3, 3, 3],
    "single_token": [1, 6, 1],
}


def padding_mask(lengths: list[int], total: int) -> torch.Tensor:
    """(N, total) bool, True at padding (left-aligned sequences, as TransformerEncoder needs)."""
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def nested(parts: list[torch.Tensor], layout) -> torch.Tensor:
    return torch.nested.as_nested_tensor(parts, layout=layout)


class _RecordNested:
    """Records whether each qkv.MultiheadAttention call got a NestedTensor."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.nested_calls = []
        original = qkv.MultiheadAttention.forward

        def recording(module, query, *args, **kwargs):
            self.nested_calls.append(query.is_nested)
            return original(module, query, *args, **kwargs)

        monkeypatch.setattr(qkv.MultiheadAttention, "forward", recording)


def _encoder(seed: int, norm: bool = False) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if norm else None).eval()


@pytest.mark.parametrize("name", sorted(LENGTH_SETS))
@pytest.mark.parametrize("norm", [False, True])
def test_transformer_encoder_after_convert_matches_torch(name, norm, monkeypatch):
    lengths = LENGTH_SETS[name]
    ref = _encoder(1, norm)
    assert ref.use_nested_tensor
    ours = qkv.convert(copy.deepcopy(ref))
    assert ours.use_nested_tensor  # the nested path stays on: qkv takes NestedTensors
    record = _RecordNested(monkeypatch)
    src = torch.randn(len(lengths), 7, 16)
    kpm = padding_mask(lengths, 7)
    with torch.no_grad():
        expected = ref(src, src_key_padding_mask=kpm)
        got = ours(src, src_key_padding_mask=kpm)
    assert record.nested_calls == [True, True]  # each layer's attention got the NestedTensor
    # Everywhere, padded positions included (torch's nested path leaves zeros there, then the norm).
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_transformer_encoder_with_a_class_swap_matches_torch(monkeypatch):
    """Built with qkv.MultiheadAttention in place of nn.MultiheadAttention (how PyTorch's own tests
    are run against qkv): same draws, same outputs, nested path on."""
    lengths = [5, 2, 7]
    ref = _encoder(2)
    monkeypatch.setattr(torch.nn.modules.transformer, "MultiheadAttention", qkv.MultiheadAttention)
    ours = _encoder(2)
    assert isinstance(ours.layers[0].self_attn, qkv.MultiheadAttention)
    assert ours.use_nested_tensor
    record = _RecordNested(monkeypatch)
    src = torch.randn(3, 7, 16)
    kpm = padding_mask(lengths, 7)
    with torch.no_grad():
        expected = ref(src, src_key_padding_mask=kpm)
        got = ours(src, src_key_padding_mask=kpm)
    assert record.nested_calls == [True, True]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


# ---- direct calls against a float64 per-sequence reference ---------------------------------


def _reference_mha(mha: qkv.MultiheadAttention, queries, keys, values, average=True):
    """torch's MultiheadAttention, float64, one unpadded sequence at a time: outputs and padded weights."""
    ref = nn.MultiheadAttention(mha.embed_dim, mha.num_heads, kdim=mha.kdim, vdim=mha.vdim, batch_first=True,
                                dtype=F64)
    ref.load_state_dict({k: v.detach().double() for k, v in mha.state_dict().items()})
    outs, weights = [], torch.zeros(len(queries), *(() if average else (mha.num_heads,)),
                                    max(q.shape[0] for q in queries), max(k.shape[0] for k in keys), dtype=F64)
    for b, (q, k, v) in enumerate(zip(queries, keys, values)):
        o, w = ref(q.double()[None], k.double()[None], v.double()[None], average_attn_weights=average)
        outs.append(o[0])
        weights[b, ..., : q.shape[0], : k.shape[0]] = w[0]
    return outs, weights


@pytest.mark.parametrize("layout", LAYOUTS, ids=["strided", "jagged"])
@pytest.mark.parametrize("kind", ["self", "cross", "kdim_vdim"])
@pytest.mark.parametrize("average", [True, False])
def test_mha_nested_matches_per_sequence_reference(layout, kind, average):
    E, H = 12, 3
    extra = dict(kdim=5, vdim=7) if kind == "kdim_vdim" else {}
    mha = qkv.MultiheadAttention(E, H, batch_first=True, **extra).eval()
    q_lengths, k_lengths = [4, 1, 6], ([4, 1, 6] if kind == "self" else [3, 7, 0])
    queries = [torch.randn(n, E) for n in q_lengths]
    keys = queries if kind == "self" else [torch.randn(n, mha.kdim) for n in k_lengths]
    values = queries if kind == "self" else [torch.randn(n, mha.vdim) for n in k_lengths]
    query = nested(queries, layout)
    key = value = query if kind == "self" else nested(keys, layout)
    if kind != "self":
        value = nested(values, layout)
    out, weights = mha(query, key, value, average_attn_weights=average)
    assert out.is_nested and out.layout == layout
    want_out, want_weights = _reference_mha(mha, queries, keys, values, average)
    for got, want in zip(out.unbind(), want_out):
        if want.shape[0] and not torch.isnan(want).any():  # torch's weights path: NaN with no keys
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    want_weights = torch.nan_to_num(want_weights)  # (the same rows: qkv gives zeros)
    torch.testing.assert_close(weights.double(), want_weights, atol=2e-6, rtol=2e-5)


def test_mha_nested_matches_torch_fast_path():
    """torch's own nested path (self-attention, eval, no grad): outputs and weights."""
    ref = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    ours = qkv.convert(copy.deepcopy(ref))
    x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8), torch.randn(1, 8)])
    with torch.no_grad():
        want, want_w = ref(x, x, x)
        got, got_w = ours(x, x, x)
    assert got.layout == torch.strided and got.is_nested
    torch.testing.assert_close(got.to_padded_tensor(0.0), want.to_padded_tensor(0.0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["strided", "jagged"])
def test_mha_nested_gradients_match_padded_call(layout):
    """Gradients through a NestedTensor (packing, varlen backward, unpacking) equal those of the padded
    call with a key_padding_mask, in float64."""
    mha = qkv.MultiheadAttention(8, 2, batch_first=True, dtype=F64)
    lengths = [3, 6, 1]
    parts = [torch.randn(n, 8, dtype=F64, requires_grad=True) for n in lengths]
    out, _ = mha(*(nested(parts, layout),) * 3, need_weights=False)
    grads_out = [torch.randn(n, 8, dtype=F64) for n in lengths]
    got = torch.autograd.grad([o for o in out.unbind()], parts + [mha.in_proj_weight], grads_out)
    padded = torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)
    want_out, _ = mha(padded, padded, padded, key_padding_mask=padding_mask(lengths, 6), need_weights=False)
    grad_padded = torch.nn.utils.rnn.pad_sequence(grads_out, batch_first=True)
    want = torch.autograd.grad(want_out, parts + [mha.in_proj_weight], grad_padded)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_mha_nested_dropout_weights_are_the_ones_the_output_used():
    """Training with dropout: the returned per-head weights times V are the output (identity projections)."""
    E, H = 8, 2
    mha = qkv.MultiheadAttention(E, H, dropout=0.5, batch_first=True, bias=False, dtype=F64).train()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.eye(E, dtype=F64).repeat(3, 1))
        mha.out_proj.weight.copy_(torch.eye(E, dtype=F64))
    lengths = [5, 2, 7]
    parts = [torch.randn(n, E, dtype=F64) for n in lengths]
    out, weights = mha(*(nested(parts, torch.jagged),) * 3, average_attn_weights=False)
    assert (weights == 0).any() and (weights > 0).any()
    for b, (o, x) in enumerate(zip(out.unbind(), parts)):
        n = lengths[b]
        v = x.view(n, H, E // H).transpose(0, 1)  # (H, n, D)
        want = (weights[b, :, :n, :n] @ v).transpose(0, 1).reshape(n, E)
        torch.testing.assert_close(o, want, atol=1e-12, rtol=1e-12)
        assert (weights[b, :, n:] == 0).all() and (weights[b, :, :, n:] == 0).all()


def _reference_module(module, xs, memories=None, **options):
    """float64 per-sequence reference of a batch-first module: projections, feature_reference, out_proj."""
    E, H, Hk, D = module.embed_dim, module.num_heads, module.num_kv_heads, module.head_dim
    kv = Hk * D
    if module.in_proj_weight is not None:
        w_q, w_k, w_v = module.in_proj_weight.detach().double().split([E, kv, kv])
    else:
        w_q, w_k, w_v = (w.detach().double() for w in (module.q_proj_weight, module.k_proj_weight,
                                                        module.v_proj_weight))
    b_q, b_k, b_v = module.in_proj_bias.detach().double().split([E, kv, kv])
    outs = []
    for b, x in enumerate(xs):
        m = (x if memories is None else memories[b]).double()
        q = F.linear(x.double(), w_q, b_q).view(-1, H, D).transpose(0, 1)[None]
        k = F.linear(m, w_k, b_k).view(-1, Hk, D).transpose(0, 1)[None]
        v = F.linear(m, w_v, b_v).view(-1, Hk, D).transpose(0, 1)[None]
        o, _ = feature_reference(q, k, v, **options)
        outs.append(F.linear(o[0].transpose(0, 1).reshape(-1, E), module.out_proj.weight.double(),
                             module.out_proj.bias.double()))
    return outs


@pytest.mark.parametrize("layout", LAYOUTS, ids=["strided", "jagged"])
@pytest.mark.parametrize("module_kind", ["self_gqa_window", "causal_window", "causal", "cross_gqa", "cross_kdim"])
def test_modules_nested_match_per_sequence_reference(layout, module_kind):
    E, H = 16, 4
    lengths, mem_lengths = [5, 1, 9, 3], [2, 6, 1, 8]
    if module_kind == "self_gqa_window":
        module = qkv.SelfAttention(E, H, num_kv_heads=2, window=3)
        options = dict(window=(2, 2))
    elif module_kind == "causal_window":
        module = qkv.CausalSelfAttention(E, H, num_kv_heads=1, window=2)
        options = dict(is_causal=True, window=(1, -1))
    elif module_kind == "causal":
        module = qkv.CausalSelfAttention(E, H)
        options = dict(is_causal=True)
    else:
        kdim = 6 if module_kind == "cross_kdim" else None
        module = qkv.CrossAttention(E, H, kdim=kdim, vdim=kdim, num_kv_heads=2 if module_kind == "cross_gqa" else None)
        options = {}
    with torch.no_grad():
        module.in_proj_bias.normal_()
    xs = [torch.randn(n, E) for n in lengths]
    if isinstance(module, qkv.CrossAttention):
        memories = [torch.randn(n, module.kdim) for n in mem_lengths]
        out = module(nested(xs, layout), nested(memories, layout))
    else:
        memories = None
        out = module(nested(xs, layout))
    assert out.is_nested and out.layout == layout
    for got, want in zip(out.unbind(), _reference_module(module, xs, memories, **options)):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_jagged_output_adds_to_its_input():
    """A jagged output keeps the input's offsets: the residual x + attn(x) works as in torch layers."""
    module = qkv.SelfAttention(8, 2)
    x = nested([torch.randn(n, 8) for n in (3, 5)], torch.jagged)
    y = x + module(x)
    assert y.shape[0] == 2 and y.to_padded_tensor(0.0).shape == (2, 5, 8)


# ---- errors ---------------------------------------------------------------------------------


def test_nested_errors_name_the_argument():
    mha = qkv.MultiheadAttention(8, 2, batch_first=True)
    x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)])
    dense = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="query is a NestedTensor but key, value are not"):
        mha(x, dense, dense)
    with pytest.raises(ValueError, match="key_padding_mask cannot be used with NestedTensor"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask cannot be used with NestedTensor"):
        mha(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
    three = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8), torch.randn(1, 8)])
    with pytest.raises(ValueError, match="same batch size"):
        mha(x, three, three)
    other = torch.nested.nested_tensor([torch.randn(4, 8), torch.randn(5, 8)])
    with pytest.raises(ValueError, match="key and value must have the same sequence lengths"):
        mha(x, x, other)
    with pytest.raises(AssertionError, match="expecting key features of 8"):
        mha(x, torch.nested.nested_tensor([torch.randn(3, 4)] * 2), torch.nested.nested_tensor([torch.randn(3, 4)] * 2))
    with pytest.raises(ValueError, match="add_bias_kv and add_zero_attn"):
        qkv.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)(x, x, x)
    with pytest.raises(ValueError, match="key_padding_mask cannot be used"):
        qkv.CausalSelfAttention(8, 2)(x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="memory is a NestedTensor but x is not"):
        qkv.CrossAttention(8, 2)(dense, x)


# ---- qkv.functional.scaled_dot_product_attention on jagged NestedTensors ---------------------


def _jagged_heads(lengths, heads, features):
    """torch's SDPA layout for NestedTensors: (B, H, ragged L, E), a jagged (B, ragged L, H, E) transposed."""
    parts = [torch.randn(n, heads, features) for n in lengths]
    return torch.nested.nested_tensor(parts, layout=torch.jagged).transpose(1, 2), parts


@pytest.mark.parametrize("options", [{}, dict(is_causal=True), dict(enable_gqa=True, scale=0.3),
                                     dict(is_causal=True, enable_gqa=True)], ids=str)
def test_sdpa_jagged_matches_per_sequence_reference(options):
    lengths, k_lengths = [4, 1, 7], [4, 1, 7]
    gqa = options.get("enable_gqa", False)
    query, qs = _jagged_heads(lengths, 4, 8)
    key, ks = _jagged_heads(k_lengths, 2 if gqa else 4, 8)
    value, vs = _jagged_heads(k_lengths, 2 if gqa else 4, 5)
    out = qkv.functional.scaled_dot_product_attention(query, key, value, **options)
    assert out.is_nested and out.layout == torch.jagged and out.shape[1] == 4
    for got, q, k, v in zip(out.unbind(), qs, ks, vs):
        want, _ = feature_reference(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                    is_causal=options.get("is_causal", False), scale=options.get("scale"))
        torch.testing.assert_close(got.double(), want[0], atol=2e-6, rtol=2e-5)


def test_sdpa_nested_errors():
    query, _ = _jagged_heads([3, 2], 2, 4)
    sdpa = qkv.functional.scaled_dot_product_attention
    with pytest.raises(ValueError, match="attn_mask cannot be used with NestedTensor"):
        sdpa(query, query, query, attn_mask=torch.ones(3, 3, dtype=torch.bool))
    strided = torch.nested.nested_tensor([torch.randn(2, 3, 4), torch.randn(2, 2, 4)])
    with pytest.raises(ValueError, match="must be jagged"):
        sdpa(strided, strided, strided)
    fewer, _ = _jagged_heads([3, 2], 1, 4)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        sdpa(query, fewer, fewer)
