"""qkv.MultiheadAttention as a module (construction, initialisation, state_dict, pickling,
qkv.convert, use inside torch's Transformer layers, torch.compile, autocast) and the modern
SelfAttention / CausalSelfAttention / CrossAttention modules."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import qkv
from dropin_utils import F64, TOL, mha_pair

# Expected torch warnings: mixed bool/float masks, and TransformerEncoder's nested-tensor notes.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Support for mismatched:UserWarning",
    "ignore:enable_nested_tensor is True:UserWarning",
    "ignore:The PyTorch API of nested tensors:UserWarning",
)

CONFIGS = {
    "default": dict(embed_dim=8, num_heads=2),
    "no_bias": dict(embed_dim=8, num_heads=4, bias=False),
    "bias_kv_zero_attn": dict(embed_dim=8, num_heads=2, add_bias_kv=True, add_zero_attn=True),
    "kdim_vdim": dict(embed_dim=8, num_heads=2, kdim=5, vdim=7, dropout=0.25),
    "everything": dict(embed_dim=12, num_heads=3, bias=False, add_bias_kv=True, add_zero_attn=True, kdim=4,
                       vdim=4, batch_first=True, dropout=0.1),
}
ATTRIBUTES = ["embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
              "head_dim", "add_zero_attn", "training"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_seed_for_seed_identical_construction(name: str) -> None:
    kwargs = CONFIGS[name]
    torch.manual_seed(123)
    ref = nn.MultiheadAttention(**kwargs)
    after_ref = torch.rand(3)
    torch.manual_seed(123)
    ours = qkv.MultiheadAttention(**kwargs)
    after_ours = torch.rand(3)
    assert torch.equal(after_ours, after_ref), "construction must draw exactly the same random numbers"
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    for (n, p), (_, r) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, r), n
    assert list(ours._parameters) == list(ref._parameters)  # registration order, None slots included
    assert [k for k, v in ours._parameters.items() if v is None] == [k for k, v in ref._parameters.items() if v is None]
    for attr in ATTRIBUTES:
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert (ours.bias_k is None) == (ref.bias_k is None) and (ours.bias_v is None) == (ref.bias_v is None)
    assert type(ours.out_proj) is NonDynamicallyQuantizableLinear
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_factory_kwargs() -> None:
    ours = qkv.MultiheadAttention(8, 2, kdim=3, vdim=5, device="cpu", dtype=torch.float16)
    assert all(p.dtype == torch.float16 and p.device.type == "cpu" for p in ours.parameters())


def test_reset_parameters_matches_torch() -> None:
    ref, ours = mha_pair(embed_dim=8, num_heads=2, add_bias_kv=True)
    torch.manual_seed(3)
    ref._reset_parameters()
    torch.manual_seed(3)
    ours._reset_parameters()
    for (n, p), r in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, r), n


@pytest.mark.parametrize("name", ["default", "kdim_vdim", "bias_kv_zero_attn"])
def test_state_dict_both_ways(name: str) -> None:
    ref, ours = mha_pair(**CONFIGS[name])
    fresh_ref = nn.MultiheadAttention(**CONFIGS[name], dtype=F64)
    fresh_ref.load_state_dict(ours.state_dict())  # strict
    fresh_ours = qkv.MultiheadAttention(**CONFIGS[name], dtype=F64)
    fresh_ours.load_state_dict(ref.state_dict())
    for module in (fresh_ref, fresh_ours):
        for key, value in ref.state_dict().items():
            assert torch.equal(module.state_dict()[key], value), key


def test_setstate_defaults_same_embed_dim_for_old_pickles() -> None:
    ours = qkv.MultiheadAttention(8, 2)
    state = dict(ours.__dict__)
    del state["_qkv_same_embed_dim"]
    revived = qkv.MultiheadAttention.__new__(qkv.MultiheadAttention)
    revived.__setstate__(state)
    assert revived._qkv_same_embed_dim is True


def _forward_all(module: nn.Module, x: torch.Tensor):
    module.eval()
    return module(x, x, x, attn_mask=torch.rand(5, 5) < 0.3)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copy_and_pickle(how: str) -> None:
    _, ours = mha_pair(embed_dim=8, num_heads=2, add_bias_kv=True, batch_first=True)
    if how == "deepcopy":
        clone = copy.deepcopy(ours)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(ours))
    else:
        buffer = io.BytesIO()
        torch.save(ours, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    assert type(clone) is qkv.MultiheadAttention
    x = torch.randn(2, 5, 8, dtype=F64)
    torch.manual_seed(0)
    expected = _forward_all(ours, x)
    torch.manual_seed(0)
    got = _forward_all(clone, x)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(clone.parameters(), ours.parameters()))
    assert len(clone._forward_pre_hooks) == 1  # the hook that keeps transformer layers on our forward


# ---------------------------------------------------------------------------------------------
# qkv.convert
# ---------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=6, dropout=0.0)
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.ModuleDict({"deep": nn.MultiheadAttention(8, 4, bias=False)}))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        y = self.attn(x, memory, memory)[0]
        z = self.inner[0](y).transpose(0, 1)
        return self.inner[1]["deep"](z, z, z, need_weights=False)[0]


def test_convert_keeps_parameters_config_and_behaviour() -> None:
    torch.manual_seed(0)
    model = _Block().double()
    shared = nn.MultiheadAttention(8, 2, dtype=F64)
    model.shared_a, model.shared_b = shared, shared
    model.inner[1]["deep"].eval()  # a submodule in another mode than its parent
    x, memory = torch.randn(2, 5, 8, dtype=F64), torch.randn(2, 7, 6, dtype=F64)
    expected = model(x, memory)
    params_before = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch_attn = model.attn
    calls = []
    torch_attn.register_forward_hook(lambda *args: calls.append(1))

    rng_before = torch.random.get_rng_state()
    assert qkv.convert(model) is model
    assert torch.equal(torch.random.get_rng_state(), rng_before), "convert must not draw random numbers"

    for path in ("attn", "inner.1.deep", "shared_a", "shared_b"):
        assert type(model.get_submodule(path)) is qkv.MultiheadAttention, path
    assert model.shared_a is model.shared_b
    assert dict(model.named_parameters()).keys() == params_before.keys()
    for name, p in model.named_parameters():
        assert p is params_before[name], name
    for attr in ATTRIBUTES:
        assert getattr(model.attn, attr) == getattr(torch_attn, attr), attr
    assert model.attn.out_proj is torch_attn.out_proj
    assert model.inner[1]["deep"].training is False and model.attn.training is True

    got = model(x, memory)
    torch.testing.assert_close(got, expected, **TOL)
    assert calls, "user hooks of the original module are carried over"
    got.sum().backward()
    before = model.attn.k_proj_weight.detach().clone()
    optimizer.step()  # the optimizer built before convert still drives the converted module
    assert not torch.equal(model.attn.k_proj_weight, before)


def test_convert_root_and_subclasses() -> None:
    root = nn.MultiheadAttention(8, 2)
    converted = qkv.convert(root)
    assert type(converted) is qkv.MultiheadAttention and converted.in_proj_weight is root.in_proj_weight

    class Custom(nn.MultiheadAttention):
        pass

    holder = nn.Sequential(Custom(8, 2))
    assert type(qkv.convert(holder)[0]) is Custom  # subclasses may override forward: left alone


# ---------------------------------------------------------------------------------------------
# Inside torch's Transformer modules
# ---------------------------------------------------------------------------------------------


def _named_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_converted_matches_torch(batch_first: bool, norm_first: bool) -> None:
    torch.manual_seed(1)
    ref = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first,
                                     dtype=F64)
    ours = qkv.convert(copy.deepcopy(ref))
    assert type(ours.self_attn) is qkv.MultiheadAttention and ours.training
    N, L = 3, 6
    src = torch.randn((N, L, 16) if batch_first else (L, N, 16), dtype=F64)
    mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, 4:] = True
    for kwargs in (dict(src_mask=mask, is_causal=True), dict(src_mask=mask, src_key_padding_mask=kpm), {}):
        src_ref, src_ours = src.clone().requires_grad_(), src.clone().requires_grad_()
        expected, got = ref(src_ref, **kwargs), ours(src_ours, **kwargs)
        torch.testing.assert_close(got, expected, **TOL)
        cotangent = torch.randn_like(expected)
        ref.zero_grad()
        ours.zero_grad()
        expected.backward(cotangent)
        got.backward(cotangent)
        torch.testing.assert_close(src_ours.grad, src_ref.grad, **TOL)
        for name, g in _named_grads(ref).items():
            torch.testing.assert_close(_named_grads(ours)[name], g, **TOL, msg=name)


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_converted_matches_torch(batch_first: bool) -> None:
    torch.manual_seed(2)
    ref = nn.Transformer(16, 4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, dropout=0.0,
                         batch_first=batch_first, dtype=F64)
    ours = qkv.convert(copy.deepcopy(ref))
    assert sum(type(m) is qkv.MultiheadAttention for m in ours.modules()) == 6
    assert not any(type(m) is nn.MultiheadAttention for m in ours.modules())
    N, S, T = 2, 7, 5
    shape = (lambda n: (N, n, 16)) if batch_first else (lambda n: (n, N, 16))
    src, tgt = torch.randn(shape(S), dtype=F64), torch.randn(shape(T), dtype=F64)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=F64)
    src_kpm = torch.zeros(N, S, dtype=torch.bool)
    src_kpm[0, 5:] = True
    kwargs = dict(tgt_mask=tgt_mask, src_key_padding_mask=src_kpm, memory_key_padding_mask=src_kpm,
                  tgt_is_causal=True)
    expected, got = ref(src, tgt, **kwargs), ours(src, tgt, **kwargs)
    torch.testing.assert_close(got, expected, **TOL)
    cotangent = torch.randn_like(expected)
    expected.backward(cotangent)
    got.backward(cotangent)
    for name, g in _named_grads(ref).items():
        torch.testing.assert_close(_named_grads(ours)[name], g, **TOL, msg=name)


class _CountingAttention:
    """Counts calls of qkv.MultiheadAttention.forward without adding a hook (hooks themselves turn
    torch's fast paths off, so they cannot be the probe)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = qkv.MultiheadAttention.forward

        def counting(module, *args, **kwargs):
            self.calls += 1
            return original(module, *args, **kwargs)

        monkeypatch.setattr(qkv.MultiheadAttention, "forward", counting)


def test_inference_fast_paths_fall_back_to_our_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """In eval under no_grad, TransformerEncoderLayer would run torch's fused kernel with our
    weights; after convert it calls our forward, and TransformerEncoder's NestedTensors reach it too."""
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, dtype=F64)
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    assert ref.use_nested_tensor
    ours = qkv.convert(copy.deepcopy(ref))
    assert ours.use_nested_tensor
    counter = _CountingAttention(monkeypatch)
    src = torch.randn(3, 6, 16, dtype=F64)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[0, 4:] = True
    with torch.no_grad():
        got_layer = ours.layers[0](src)
        assert counter.calls == 1
        expected = ref(src, src_key_padding_mask=kpm)
        got = ours(src, src_key_padding_mask=kpm)
        assert counter.calls == 3
        expected_layer = ref.layers[0](src)
    torch.testing.assert_close(got_layer, expected_layer, atol=1e-6, rtol=1e-6)  # torch's fused path
    # Padded positions included: both took the nested path, which leaves zeros there.
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------------------------


def _compile_cases():
    torch.manual_seed(4)
    mha_seq = qkv.MultiheadAttention(8, 2, add_bias_kv=True, dtype=F64)
    mha_bf = qkv.MultiheadAttention(8, 2, kdim=5, vdim=5, batch_first=True, dtype=F64)
    x_seq, x_bf, mem = torch.randn(5, 2, 8, dtype=F64), torch.randn(2, 5, 8, dtype=F64), torch.randn(2, 7, 5, dtype=F64)
    mask = torch.randn(5, 5, dtype=F64)
    kpm = torch.rand(2, 7) < 0.3
    kpm[:, 0] = False
    return {
        "mha_seq_first_weights": (mha_seq, lambda m: sum(t.sum() for t in m(x_seq, x_seq, x_seq, attn_mask=mask))),
        "mha_batch_first_cross": (mha_bf, lambda m: m(x_bf, mem, mem, key_padding_mask=kpm, need_weights=False)[0].sum()),
        "self_attention": (qkv.SelfAttention(8, 2, dtype=F64), lambda m: m(x_bf, attn_mask=mask).sum()),
        "causal_self_attention": (qkv.CausalSelfAttention(8, 2, dtype=F64), lambda m: m(x_bf).sum()),
        "cross_attention": (qkv.CrossAttention(8, 2, kdim=5, vdim=5, dtype=F64),
                            lambda m: m(x_bf, mem, key_padding_mask=kpm).sum()),
    }


@pytest.mark.parametrize("name", sorted(_compile_cases()))
def test_torch_compile_fullgraph(name: str) -> None:
    torch._dynamo.reset()
    module, loss_fn = _compile_cases()[name]
    expected = loss_fn(module)
    expected_grads = torch.autograd.grad(expected, list(module.parameters()))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got = loss_fn(compiled)
    got_grads = torch.autograd.grad(got, list(module.parameters()))
    torch.testing.assert_close(got, expected, **TOL)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, **TOL)


def test_torch_compile_with_dropout_in_training() -> None:
    torch._dynamo.reset()
    module = qkv.MultiheadAttention(8, 2, dropout=0.5, batch_first=True).train()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 8)
    out, weights = compiled(x, x, x, average_attn_weights=False)
    assert (weights == 0).any() and torch.isfinite(out).all()
    out.sum().backward()
    assert module.in_proj_weight.grad is not None


# ---------------------------------------------------------------------------------------------
# dtypes and autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduced_precision_close_to_torch(dtype: torch.dtype) -> None:
    ref, ours = mha_pair(embed_dim=16, num_heads=4, batch_first=True)
    ref, ours = ref.to(dtype), ours.to(dtype)
    x = torch.randn(2, 9, 16, dtype=dtype)
    mask = torch.rand(9, 9) < 0.3
    mask[:, 0] = False
    expected = ref.double()(x.double(), x.double(), x.double(), attn_mask=mask)
    got = ours(x, x, x, attn_mask=mask)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got[0].double(), expected[0], atol=tol, rtol=tol)
    torch.testing.assert_close(got[1].double(), expected[1], atol=tol, rtol=tol)


def test_autocast_bfloat16() -> None:
    torch.manual_seed(5)
    ref, ours = nn.MultiheadAttention(16, 4), qkv.MultiheadAttention(16, 4)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 2, 16, requires_grad=True)
    float_mask = torch.randn(6, 6)
    kpm = torch.rand(2, 6) < 0.3
    kpm[:, 0] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_w = ours(x, x, x, attn_mask=float_mask, key_padding_mask=kpm.float().masked_fill(kpm, -1e9))
        expected, _ = ref(x, x, x, attn_mask=float_mask, key_padding_mask=kpm.float().masked_fill(kpm, -1e9))
        modern = [
            qkv.SelfAttention(16, 4)(x.transpose(0, 1), key_padding_mask=kpm, attn_mask=float_mask),
            qkv.CausalSelfAttention(16, 4)(x.transpose(0, 1), key_padding_mask=kpm),
            qkv.CrossAttention(16, 4, kdim=3, vdim=3)(x.transpose(0, 1), torch.randn(2, 4, 3), attn_mask=torch.randn(6, 4)),
        ]
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=5e-2, rtol=5e-2)
    assert all(m.dtype == torch.bfloat16 and torch.isfinite(m).all() for m in modern)
    got.float().sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------
# Modern modules
# ---------------------------------------------------------------------------------------------


def _modern_reference(module: nn.Module, kdim: int | None = None) -> nn.MultiheadAttention:
    """A batch-first torch MultiheadAttention holding the modern module's weights."""
    ref = nn.MultiheadAttention(module.embed_dim, module.num_heads, kdim=kdim, vdim=kdim, batch_first=True,
                                bias=module.in_proj_bias is not None, dtype=F64)
    ref.load_state_dict(module.state_dict())
    return ref


def _random_biases(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def test_modern_modules_initialise_like_multihead_attention() -> None:
    for cls, kwargs in ((qkv.SelfAttention, {}), (qkv.CausalSelfAttention, {}), (qkv.CrossAttention, dict(kdim=5, vdim=5))):
        torch.manual_seed(9)
        ours = cls(8, 2, **kwargs)
        torch.manual_seed(9)
        ref = nn.MultiheadAttention(8, 2, **kwargs)
        assert list(ours.state_dict()) == list(ref.state_dict()), cls
        for key, value in ref.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), (cls, key)


@pytest.mark.parametrize("mask_kind", ["none", "bool_2d", "float_2d", "float_3d_mha", "bool_4d_broadcast"])
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_matches_mha(mask_kind: str, bias: bool) -> None:
    torch.manual_seed(6)
    ours = qkv.SelfAttention(8, 2, bias=bias, dtype=F64)
    _random_biases(ours)
    ref = _modern_reference(ours)
    N, L = 3, 5
    x = torch.randn(N, L, 8, dtype=F64, requires_grad=True)
    kpm = torch.rand(N, L) < 0.3
    kpm[:, 0] = False
    hidden = torch.rand(N, 1, L, L) < 0.3
    hidden[..., 0] = False
    masks = {
        "none": (None, None),
        "bool_2d": (hidden[0, 0], hidden[0, 0]),
        "float_2d": (torch.randn(L, L, dtype=F64),) * 2,
        "float_3d_mha": (torch.randn(N * 2, L, L, dtype=F64),) * 2,
        "bool_4d_broadcast": (hidden, hidden.expand(N, 2, L, L).reshape(N * 2, L, L)),
    }
    ours_mask, ref_mask = masks[mask_kind]
    got = ours(x, key_padding_mask=kpm, attn_mask=ours_mask)
    expected = ref(x, x, x, key_padding_mask=kpm, attn_mask=ref_mask, need_weights=False)[0]
    torch.testing.assert_close(got, expected, **TOL)
    grads = torch.autograd.grad(got.sum(), [x, *ours.parameters()])
    expected_grads = torch.autograd.grad(expected.sum(), [x, *ref.parameters()])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, **TOL)
    torch.testing.assert_close(ours(x[0], attn_mask=ours_mask if mask_kind in ("bool_2d", "float_2d") else None),
                               ref(x[0], x[0], x[0], attn_mask=ref_mask if mask_kind in ("bool_2d", "float_2d") else None)[0],
                               **TOL)


def test_causal_self_attention_matches_mha() -> None:
    torch.manual_seed(7)
    ours = qkv.CausalSelfAttention(8, 4, dtype=F64)
    _random_biases(ours)
    ref = _modern_reference(ours)
    x = torch.randn(2, 6, 8, dtype=F64)
    kpm = torch.tensor([[False] * 6, [False, False, True, False, True, True]])
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=F64)
    for padding in (None, kpm, torch.randn(2, 6, dtype=F64)):
        expected = ref(x, x, x, attn_mask=causal, key_padding_mask=padding, need_weights=False)[0]
        torch.testing.assert_close(ours(x, key_padding_mask=padding), expected, **TOL)


@pytest.mark.parametrize("kdim", [None, 5])
def test_cross_attention_matches_mha(kdim: int | None) -> None:
    torch.manual_seed(8)
    ours = qkv.CrossAttention(8, 2, kdim=kdim, vdim=kdim, dtype=F64)
    _random_biases(ours)
    ref = _modern_reference(ours, kdim=kdim)
    x, memory = torch.randn(2, 4, 8, dtype=F64), torch.randn(2, 7, kdim or 8, dtype=F64, requires_grad=True)
    kpm = torch.rand(2, 7) < 0.3
    kpm[:, 0] = False
    mask = torch.randn(4, 7, dtype=F64)
    got = ours(x, memory, key_padding_mask=kpm, attn_mask=mask)
    expected = ref(x, memory, memory, key_padding_mask=kpm, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(got, expected, **TOL)
    grads = torch.autograd.grad(got.sum(), [memory, *ours.parameters()])
    expected_grads = torch.autograd.grad(expected.sum(), [memory, *ref.parameters()])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, **TOL)


def test_modern_module_errors() -> None:
    with pytest.raises(ValueError, match="vdim must equal kdim"):
        qkv.CrossAttention(8, 2, kdim=4, vdim=6)
    with pytest.raises(ValueError, match="embed_dim and num_heads must be greater than 0"):
        qkv.SelfAttention(0, 2)
    with pytest.raises(AssertionError, match="embed_dim must be divisible by num_heads"):
        qkv.CausalSelfAttention(10, 3)
    module = qkv.SelfAttention(8, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        module(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"3-D attn_mask must have shape"):
        module(x, attn_mask=torch.zeros(3, 5, 5))
    with pytest.raises(AssertionError, match="only bool and floating types of attn_mask"):
        module(x, attn_mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="bias must be broadcastable"):
        module(x, attn_mask=torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match=r"\(batch, seq, features\)"):
        module(torch.randn(1, 2, 5, 8))


def test_modern_modules_dropout() -> None:
    torch.manual_seed(10)
    module = qkv.SelfAttention(16, 4, dropout=0.5).train()
    x = torch.randn(2, 12, 16)
    torch.manual_seed(1)
    a = module(x)
    torch.manual_seed(1)
    b = module(x)
    c = module(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    module.eval()
    assert torch.equal(module(x), module(x)) and not torch.allclose(module(x), a)
