"""qkv.functional: multi_head_attention_forward (static_k/static_v, separate weights, errors),
dropout semantics, gradcheck under a fixed seed, the scaled_dot_product_attention twin, and a
check that torch's softmax / SDPA / native MHA never run inside qkv."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import qkv
import qkv.functional as QF
from dropin_utils import (DTYPE_TOL, F64, TOL, assert_close_relative, assert_same_error, finite_mask,
                          finite_mask_cases, finite_mask_tolerance, mha_pair)

E, H = 8, 2
D = E // H


def _params(separate: bool = False, bias_kv: bool = False, kdim: int = E, vdim: int = E) -> dict:
    torch.manual_seed(1)
    p = dict(
        embed_dim_to_check=E,
        num_heads=H,
        in_proj_weight=None if separate else torch.randn(3 * E, E, dtype=F64) / 3,
        in_proj_bias=torch.randn(3 * E, dtype=F64) / 3,
        bias_k=torch.randn(1, 1, E, dtype=F64) if bias_kv else None,
        bias_v=torch.randn(1, 1, E, dtype=F64) if bias_kv else None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=torch.randn(E, E, dtype=F64) / 3,
        out_proj_bias=torch.randn(E, dtype=F64),
    )
    if separate:
        p.update(
            use_separate_proj_weight=True,
            q_proj_weight=torch.randn(E, E, dtype=F64) / 3,
            k_proj_weight=torch.randn(E, kdim, dtype=F64) / 3,
            v_proj_weight=torch.randn(E, vdim, dtype=F64) / 3,
        )
    return p


def _both(query, key, value, **kwargs):
    expected = F.multi_head_attention_forward(query, key, value, **kwargs)
    got = QF.multi_head_attention_forward(query, key, value, **kwargs)
    return expected, got


def _assert_pair_close(expected, got) -> None:
    torch.testing.assert_close(got[0], expected[0], **TOL)
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1], **TOL)


def test_signature_matches_torch() -> None:
    import inspect

    ours = inspect.signature(QF.multi_head_attention_forward)
    theirs = inspect.signature(F.multi_head_attention_forward)
    assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == [
        (p.name, p.default, p.kind) for p in theirs.parameters.values()
    ]
    sdpa = inspect.signature(QF.scaled_dot_product_attention)
    assert list(sdpa.parameters) == [
        "query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"
    ]


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("add_zero_attn", [False, True])
@pytest.mark.parametrize("which", ["k", "v", "kv"])
def test_static_k_v(which: str, add_zero_attn: bool, need_weights: bool) -> None:
    torch.manual_seed(2)
    L, S, N = 4, 5, 3
    query, key = torch.randn(L, N, E, dtype=F64), torch.randn(S, N, E, dtype=F64)
    statics = {}
    if "k" in which:
        statics["static_k"] = torch.randn(N * H, S, D, dtype=F64, requires_grad=True)
    if "v" in which:
        statics["static_v"] = torch.randn(N * H, S, D, dtype=F64, requires_grad=True)
    kpm = torch.rand(N, S) < 0.3
    kpm[:, 0] = False
    p = _params() | dict(add_zero_attn=add_zero_attn)
    expected, got = _both(query, key, key, **p, key_padding_mask=kpm, need_weights=need_weights, **statics)
    _assert_pair_close(expected, got)
    leaves = list(statics.values())
    for g_got, g_expected in zip(torch.autograd.grad(got[0].sum(), leaves), torch.autograd.grad(expected[0].sum(), leaves)):
        torch.testing.assert_close(g_got, g_expected, **TOL)


@pytest.mark.parametrize("batched", [True, False])
def test_separate_projection_weights(batched: bool) -> None:
    torch.manual_seed(3)
    shape = (lambda t, f: (t, 2, f)) if batched else (lambda t, f: (t, f))
    query = torch.randn(shape(4, E), dtype=F64)
    key, value = torch.randn(shape(6, 5), dtype=F64), torch.randn(shape(6, 7), dtype=F64)
    p = _params(separate=True, bias_kv=True, kdim=5, vdim=7) | dict(add_zero_attn=True)
    expected, got = _both(query, key, value, **p, attn_mask=torch.rand(4, 6) < 0.2, average_attn_weights=False)
    _assert_pair_close(expected, got)


def test_outputs_are_contiguous() -> None:
    ref, ours = mha_pair(embed_dim=E, num_heads=H, batch_first=True)
    x = torch.randn(2, 5, E, dtype=F64)
    assert ours(x, x, x)[0].is_contiguous()
    x = torch.randn(5, 2, E, dtype=F64)
    out = QF.multi_head_attention_forward(x, x, x, **_params())[0]
    assert out.is_contiguous() and out.shape == (5, 2, E)


def _static(n: int, s: int, d: int) -> torch.Tensor:
    return torch.randn(n, s, d, dtype=F64)


q5, k6 = torch.randn(5, 3, E, dtype=F64), torch.randn(6, 3, E, dtype=F64)
BAD_FUNCTIONAL = {
    "static_k_with_bias_k": (_params(bias_kv=True), dict(static_k=_static(3 * H, 6, D))),
    "static_v_with_bias_v": (_params(bias_kv=True), dict(static_v=_static(3 * H, 6, D))),
    "static_k_wrong_batch_heads": (_params(), dict(static_k=_static(3 * H + 1, 6, D))),
    "static_k_wrong_head_dim": (_params(), dict(static_k=_static(3 * H, 6, D + 1))),
    "static_v_wrong_batch_heads": (_params(), dict(static_v=_static(2, 6, D))),
    "static_v_wrong_head_dim": (_params(), dict(static_v=_static(3 * H, 6, 1))),
    "bias_k_without_bias_v": (_params(bias_kv=True) | dict(bias_v=None), {}),
    "bias_v_without_bias_k": (_params(bias_kv=True) | dict(bias_k=None), {}),
    "no_in_proj_weight": (_params() | dict(in_proj_weight=None), {}),
    "separate_no_q_weight": (_params(separate=True) | dict(q_proj_weight=None), {}),
    "separate_no_k_weight": (_params(separate=True) | dict(k_proj_weight=None), {}),
    "separate_no_v_weight": (_params(separate=True) | dict(v_proj_weight=None), {}),
    "separate_bad_q_weight": (_params(separate=True) | dict(q_proj_weight=torch.zeros(E, E + 1, dtype=F64)), {}),
    "separate_bad_bias": (_params(separate=True) | dict(in_proj_bias=torch.zeros(3 * E + 3, dtype=F64)), {}),
    "embed_dim_to_check": (_params() | dict(embed_dim_to_check=E + 1), {}),
    "num_heads_not_dividing": (_params() | dict(num_heads=3), {}),
    "packed_weight_wrong_rows": (_params() | dict(in_proj_weight=torch.zeros(3 * E - 3, E, dtype=F64)), {}),
    "attn_mask_5_dims_after_check": (_params(), dict(attn_mask=torch.zeros(2, 5, 6))),
}


@pytest.mark.parametrize("name", sorted(BAD_FUNCTIONAL))
def test_functional_errors_match_torch(name: str) -> None:
    params, extra = BAD_FUNCTIONAL[name]
    assert_same_error(
        lambda: F.multi_head_attention_forward(q5, k6, k6, **params, **extra),
        lambda: QF.multi_head_attention_forward(q5, k6, k6, **params, **extra),
    )


def test_torch_function_override_is_honoured() -> None:
    """Tensor subclasses with __torch_function__ see the call, as with torch's function."""
    seen = []

    class Traced(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is QF.multi_head_attention_forward:
                seen.append(func)
                return "intercepted"
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(5, 3, E, dtype=F64).as_subclass(Traced)
    assert QF.multi_head_attention_forward(x, x, x, **_params()) == "intercepted"
    assert seen == [QF.multi_head_attention_forward]


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------

P = 0.4


def _dropout_module() -> qkv.MultiheadAttention:
    torch.manual_seed(4)
    module = qkv.MultiheadAttention(16, 4, dropout=P, batch_first=True, dtype=F64)
    with torch.no_grad():
        module.in_proj_bias.normal_()
    return module.train()


def test_dropout_weights_are_the_ones_the_output_used() -> None:
    module = _dropout_module()
    x = torch.randn(3, 9, 16, dtype=F64)
    out, weights = module(x, x, x, average_attn_weights=False)
    v = F.linear(x, module.in_proj_weight[32:], module.in_proj_bias[32:]).unflatten(-1, (4, 4)).transpose(1, 2)
    context = (weights @ v).transpose(1, 2).flatten(2)
    torch.testing.assert_close(out, module.out_proj(context), **TOL)
    # averaged weights are the mean of the same dropped weights
    torch.manual_seed(11)
    out_a, avg = module(x, x, x)
    torch.manual_seed(11)
    out_b, per_head = module(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(out_a, out_b, atol=0, rtol=0)
    torch.testing.assert_close(avg, per_head.mean(1), **TOL)


def test_dropout_fraction_and_scaling() -> None:
    module = _dropout_module()
    x = torch.randn(4, 40, 16, dtype=F64)
    _, dropped = module(x, x, x, average_attn_weights=False)
    module.eval()
    _, probs = module(x, x, x, average_attn_weights=False)
    assert (probs > 0).all()
    zero = dropped == 0
    fraction = zero.double().mean().item()
    assert abs(fraction - P) < 0.02, fraction  # 25600 draws: std 0.003
    torch.testing.assert_close(dropped[~zero], probs[~zero] / (1 - P), **TOL)


def test_dropout_only_in_training_and_seeded() -> None:
    module = _dropout_module()
    x = torch.randn(2, 6, 16, dtype=F64)
    torch.manual_seed(7)
    first = module(x, x, x)
    torch.manual_seed(7)
    again = module(x, x, x)
    torch.manual_seed(8)
    other = module(x, x, x)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.allclose(first[0], other[0])
    module.eval()
    eval_a, eval_b = module(x, x, x)[0], module(x, x, x)[0]
    assert torch.equal(eval_a, eval_b)
    assert not torch.allclose(first[0], eval_a)
    # functional: training=False disables dropout whatever dropout_p says
    p = _params() | dict(dropout_p=0.9)
    xs = torch.randn(5, 2, E, dtype=F64)
    no_dropout = QF.multi_head_attention_forward(xs, xs, xs, **p | dict(dropout_p=0.0))
    off = QF.multi_head_attention_forward(xs, xs, xs, **p, training=False)
    torch.testing.assert_close(off[0], no_dropout[0], atol=0, rtol=0)


def test_gradcheck_with_dropout_under_fixed_seed() -> None:
    torch.manual_seed(5)
    L, S, N = 3, 4, 2
    query = torch.randn(L, N, 4, dtype=F64, requires_grad=True)
    key = torch.randn(S, N, 4, dtype=F64, requires_grad=True)
    w_in = (torch.randn(12, 4, dtype=F64) / 2).requires_grad_()
    b_in = torch.randn(12, dtype=F64, requires_grad=True)
    w_out = (torch.randn(4, 4, dtype=F64) / 2).requires_grad_()
    mask = torch.randn(L, S, dtype=F64, requires_grad=True)

    def fn(query, key, w_in, b_in, w_out, mask):
        torch.manual_seed(1234)  # same dropout mask on every evaluation
        return QF.multi_head_attention_forward(
            query, key, key, 4, 2, w_in, b_in, None, None, False, 0.3, w_out, None,
            training=True, attn_mask=mask, average_attn_weights=False,
        )

    out, weights = fn(query, key, w_in, b_in, w_out, mask)
    assert (weights == 0).any(), "the seed must actually drop something"
    assert torch.autograd.gradcheck(fn, (query, key, w_in, b_in, w_out, mask))


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention twin
# ---------------------------------------------------------------------------------------------

def _qkv(q_shape, k_shape, v_shape):
    return tuple(torch.randn(s, dtype=F64, requires_grad=True) for s in (q_shape, k_shape, v_shape))


SDPA_CASES = {
    "4d": ((2, 3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 4), {}),
    "3d": ((3, 5, 8), (3, 6, 8), (3, 6, 8), {}),
    "2d": ((5, 8), (6, 8), (6, 8), {}),
    "5d": ((2, 2, 3, 5, 8), (2, 2, 3, 6, 8), (2, 2, 3, 6, 8), {}),
    "broadcast_kv_batch": ((2, 3, 5, 8), (1, 3, 6, 8), (3, 6, 8), {}),
    "bool_mask_2d": ((2, 3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), dict(attn_mask="bool", mask_shape=(5, 6))),
    "bool_mask_4d": ((2, 3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), dict(attn_mask="bool", mask_shape=(2, 1, 5, 6))),
    "float_mask_4d": ((2, 3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), dict(attn_mask="float", mask_shape=(2, 3, 5, 6))),
    "float_mask_3d": ((2, 3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), dict(attn_mask="float", mask_shape=(3, 1, 6))),
    "float_mask_5d_batch": ((2, 2, 3, 5, 8), (2, 2, 3, 6, 8), (2, 2, 3, 6, 8),
                            dict(attn_mask="float", mask_shape=(2, 1, 3, 5, 6))),
    "causal_short_query": ((2, 3, 4, 8), (2, 3, 7, 8), (2, 3, 7, 8), dict(is_causal=True)),
    "causal_long_query": ((2, 3, 7, 8), (2, 3, 4, 8), (2, 3, 4, 8), dict(is_causal=True)),
    "bool_mask_1d": ((2, 3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), dict(attn_mask="bool", mask_shape=(6,))),
    "scale": ((2, 3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), dict(scale=0.37)),
    "gqa": ((2, 6, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), dict(enable_gqa=True)),
    "mqa": ((2, 6, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8), dict(enable_gqa=True, is_causal=True)),
    "gqa_3d": ((6, 5, 8), (3, 6, 8), (3, 6, 8), dict(enable_gqa=True)),
}


@pytest.mark.parametrize("name", sorted(SDPA_CASES))
def test_sdpa_matches_torch(name: str) -> None:
    torch.manual_seed(6)
    q_shape, k_shape, v_shape, opts = SDPA_CASES[name]
    query, key, value = _qkv(q_shape, k_shape, v_shape)
    opts = dict(opts)
    kind, mask_shape = opts.pop("attn_mask", None), opts.pop("mask_shape", None)
    mask = None
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.3
        mask[..., 0] = True  # every row keeps a key (torch gives NaN otherwise)
    elif kind == "float":
        mask = torch.randn(mask_shape, dtype=F64, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):  # torch's reference formulation
        expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, **opts)
    got = QF.scaled_dot_product_attention(query, key, value, attn_mask=mask, **opts)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)
    leaves = [t for t in (query, key, value, mask) if t is not None and t.requires_grad]
    cotangent = torch.randn_like(expected)
    for g_got, g_expected in zip(torch.autograd.grad(got, leaves, cotangent),
                                 torch.autograd.grad(expected, leaves, cotangent)):
        torch.testing.assert_close(g_got, g_expected, **TOL)


def test_sdpa_float32_mask_with_float64_query_like_torch() -> None:
    query, key, value = _qkv((2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 4))
    mask = torch.randn(3, 5)
    torch.testing.assert_close(
        QF.scaled_dot_product_attention(query, key, value, attn_mask=mask),
        F.scaled_dot_product_attention(query, key, value, attn_mask=mask), **TOL,
    )


@pytest.mark.parametrize(
    "dtype, mask_dtype, value", finite_mask_cases(), ids=lambda x: str(x).replace("torch.", "")
)
def test_sdpa_finite_negative_and_mixed_dtype_masks_match_torch(dtype, mask_dtype, value) -> None:
    """Hugging Face masks (finfo.min on every key of a row: torch attends to all of them equally)
    and float32 masks with half-precision queries (1e5 and -1e9 stay finite), forward and
    gradients of query, key, value and mask, against torch's SDPA in the same dtypes."""
    torch.manual_seed(8)
    query, key, value_ = (t.detach().to(dtype).requires_grad_() for t in _qkv((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8)))
    mask = finite_mask((2, 1, 5, 7), value, mask_dtype)
    if mask_dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16):
        mask[1, :, 3, 2] = 1e5  # beyond float16: the whole row goes to key 2
    mask.requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):  # torch's reference formulation
        expected = F.scaled_dot_product_attention(query, key, value_, attn_mask=mask)
    got = QF.scaled_dot_product_attention(query, key, value_, attn_mask=mask)
    tol = finite_mask_tolerance(dtype, value)
    assert got.dtype == dtype
    assert_close_relative("out", got, expected, tol)
    cotangent = torch.randn_like(expected)
    leaves = (query, key, value_, mask)
    grads = zip(torch.autograd.grad(got, leaves, cotangent), torch.autograd.grad(expected, leaves, cotangent))
    for name, (g_got, g_expected) in zip(("query", "key", "value", "mask"), grads):
        assert g_got.dtype == g_expected.dtype, name
        assert_close_relative(f"grad {name}", g_got, g_expected, max(tol, DTYPE_TOL[g_got.dtype]))


def test_sdpa_output_layout_follows_query() -> None:
    query, key, value = (torch.randn(2, 5, 3, 8) for _ in range(3))  # (B, L, H, D) storage
    out = QF.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)))
    assert out.shape == (2, 3, 5, 8) and out.transpose(1, 2).is_contiguous()
    out = QF.scaled_dot_product_attention(*(t.transpose(1, 2).contiguous() for t in (query, key, value)))
    assert out.is_contiguous()


def _sdpa_inputs():
    return tuple(torch.randn(2, 3, 5 if i == 0 else 6, 8) for i in range(3))


SDPA_ERRORS = {
    # name: (kwargs modifier, expected prefix of torch's message)
    "mask_and_causal": lambda q, k, v: dict(args=(q, k, v), attn_mask=torch.ones(5, 6, dtype=torch.bool), is_causal=True),
    "int_mask": lambda q, k, v: dict(args=(q, k, v), attn_mask=torch.ones(5, 6, dtype=torch.int64)),
    "half_mask": lambda q, k, v: dict(args=(q, k, v), attn_mask=torch.ones(5, 6, dtype=torch.float16)),
    "one_dim": lambda q, k, v: dict(args=(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])),
    "dtype_mismatch": lambda q, k, v: dict(args=(q, k.double(), v)),
    "dropout_above_one": lambda q, k, v: dict(args=(q, k, v), dropout_p=1.5),
    "mask_not_broadcastable": lambda q, k, v: dict(args=(q, k, v), attn_mask=torch.zeros(4, 6)),
    "mask_more_dims": lambda q, k, v: dict(args=(q, k, v), attn_mask=torch.zeros(1, 2, 3, 5, 6)),
    "gqa_not_dividing": lambda q, k, v: dict(args=(torch.randn(2, 6, 5, 8), torch.randn(2, 4, 6, 8),
                                                   torch.randn(2, 4, 6, 8)), enable_gqa=True),
    "gqa_2d": lambda q, k, v: dict(args=(q[0, 0], k[0, 0], v[0, 0]), enable_gqa=True),
}


@pytest.mark.parametrize("name", sorted(SDPA_ERRORS))
def test_sdpa_errors_like_torch(name: str) -> None:
    """Same exception type as torch and a message that starts with torch's (ours may add the
    sizes where torch's stops short)."""
    call = SDPA_ERRORS[name](*_sdpa_inputs())
    args = call.pop("args")
    with sdpa_kernel(SDPBackend.MATH):  # torch's reference path (its CPU flash path skips some checks)
        with pytest.raises(Exception) as expected:
            F.scaled_dot_product_attention(*args, **call)
    with pytest.raises(Exception) as got:
        QF.scaled_dot_product_attention(*args, **call)
    assert got.type is expected.type, (got.value, expected.value)
    assert str(got.value).startswith(str(expected.value)), (str(got.value), str(expected.value))


def test_sdpa_dropout_statistics() -> None:
    """Uniform probabilities (q = k = 0) and v = identity expose each dropped weight directly."""
    S, p = 64, 0.3
    query = torch.zeros(4, 4, S, 8, dtype=F64)
    value = torch.eye(S, dtype=F64).expand(4, 4, S, S)
    torch.manual_seed(9)
    out = QF.scaled_dot_product_attention(query, query, value, dropout_p=p)
    kept = out != 0
    assert abs(1 - kept.double().mean().item() - p) < 0.02  # 65536 draws
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (S * (1 - p))), **TOL)
    torch.manual_seed(9)
    assert torch.equal(out, QF.scaled_dot_product_attention(query, query, value, dropout_p=p))


def test_sdpa_fully_masked_rows_give_zeros() -> None:
    query, key, value = _qkv((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8))
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2] = False
    out = QF.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    assert torch.equal(out[..., 2, :], torch.zeros_like(out[..., 2, :]))
    grads = torch.autograd.grad(out.sum(), (query, key, value))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][..., 2, :], torch.zeros_like(grads[0][..., 2, :]))


# ---------------------------------------------------------------------------------------------
# torch's softmax, SDPA and native MHA must not run
# ---------------------------------------------------------------------------------------------

FORBIDDEN = {
    "aten::_softmax", "aten::softmax", "aten::_softmax_backward_data", "aten::_log_softmax",
    "aten::_masked_softmax", "aten::scaled_dot_product_attention", "aten::_native_multi_head_attention",
    "aten::_transformer_encoder_layer_fwd", "aten::baddbmm",
}


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def _forbidden(ops: set[str]) -> set[str]:
    return {op for op in ops if op in FORBIDDEN or "scaled_dot_product" in op}


def _record(fn) -> set[str]:
    recorder = _OpRecorder()
    with recorder:
        fn()
    return recorder.ops


def test_recorder_sees_torch_softmax() -> None:
    """Positive control: the recorder does catch torch's attention internals."""
    ref, _ = mha_pair(embed_dim=E, num_heads=H)
    x = torch.randn(5, 2, E, dtype=F64, requires_grad=True)
    ops = _record(lambda: ref(x, x, x)[0].sum().backward())
    assert "aten::_softmax" in ops and "aten::_softmax_backward_data" in ops
    ops = _record(lambda: ref(x, x, x, need_weights=False)[0].sum().backward())
    assert any("scaled_dot_product" in op for op in ops)


@pytest.mark.filterwarnings("ignore:Support for mismatched:UserWarning")
def test_no_torch_attention_kernels_run() -> None:
    torch.manual_seed(10)
    _, ours = mha_pair(embed_dim=E, num_heads=H, dropout=0.2, add_bias_kv=True, add_zero_attn=True)
    x = torch.randn(5, 2, E, dtype=F64, requires_grad=True)
    mask = torch.randn(5, 5, dtype=F64, requires_grad=True)
    kpm = torch.rand(2, 5) < 0.3

    def run_all():
        for need_weights in (True, False):
            out, w = ours(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=need_weights)
            (out.sum() + (w.sum() if w is not None else 0)).backward()
        causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=F64)
        ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0].sum().backward()
        heads = x.permute(1, 0, 2)[None]  # (1, 2, 5, E)
        QF.scaled_dot_product_attention(heads, heads, heads, attn_mask=mask, dropout_p=0.1).sum().backward()
        for module in (qkv.SelfAttention(E, H, dtype=F64), qkv.CausalSelfAttention(E, H, dtype=F64)):
            module(x).sum().backward()
        qkv.CrossAttention(E, H, kdim=3, vdim=3, dtype=F64)(x, torch.randn(5, 4, 3, dtype=F64)).sum().backward()
        layer = qkv.convert(nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True, dtype=F64))
        layer(x).sum().backward()
        layer.eval()
        with torch.no_grad():
            layer(x.detach())

    ops = _record(run_all)
    assert "qkv::attention" in ops and "qkv::attention_with_weights" in ops
    assert "qkv::attention_backward" in ops and "qkv::attention_weights_backward" in ops
    assert not _forbidden(ops), _forbidden(ops)
