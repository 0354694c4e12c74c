"""qkv.MultiheadAttention against torch.nn.MultiheadAttention (float64, identical weights):
outputs, weights, gradients (inputs, parameters, float masks) and warnings over a seeded random
sample of constructor x forward options; error parity; fully masked rows."""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import qkv
from dropin_utils import (DTYPE_TOL, F64, TOL, assert_close_relative, assert_grads_close, assert_same_error, capture,
                          finite_mask, finite_mask_cases, finite_mask_tolerance, mha_pair)

EMBED = 8


@dataclass
class Case:
    num_heads: int
    bias: bool
    add_bias_kv: bool
    add_zero_attn: bool
    kdim: int | None
    vdim: int | None
    batch_first: bool
    batched: bool
    sharing: str  # "self" (q is k is v), "kv" (k is v), "none"
    attn_mask: str | None  # None | "bool2d" | "float2d" | "bool3d" | "float3d"
    key_padding_mask: str | None  # None | "bool" | "float"
    is_causal: bool
    need_weights: bool
    average: bool
    training: bool
    q_len: int
    kv_len: int
    batch: int


def random_cases(count: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        kdim, vdim = rng.choice([(None, None), (None, None), (5, 7), (6, 6), (EMBED, EMBED)])
        same_dims = (kdim or EMBED) == EMBED and (vdim or EMBED) == EMBED
        sharing = rng.choice(["self", "kv", "none"])
        if not same_dims:
            sharing = "kv" if kdim == vdim and rng.random() < 0.5 else "none"
        q_len = rng.randint(1, 6)
        kv_len = q_len if sharing == "self" else rng.randint(1, 7)
        attn_mask = rng.choice([None, "bool2d", "float2d", "bool3d", "float3d"])
        cases.append(
            Case(
                num_heads=rng.choice([1, 2, 4]),
                bias=rng.random() < 0.75,
                add_bias_kv=rng.random() < 0.3,
                add_zero_attn=rng.random() < 0.3,
                kdim=kdim,
                vdim=vdim,
                batch_first=rng.random() < 0.5,
                batched=rng.random() < 0.8,
                sharing=sharing,
                attn_mask=attn_mask,
                key_padding_mask=rng.choice([None, "bool", "float"]),
                is_causal=attn_mask is not None and rng.random() < 0.3,
                need_weights=rng.random() < 0.6,
                average=rng.random() < 0.5,
                training=rng.random() < 0.5,
                q_len=q_len,
                kv_len=kv_len,
                batch=rng.randint(1, 3),
            )
        )
    return cases


CASES = random_cases(140, seed=20240611)


def _sequence(case: Case, length: int, features: int) -> torch.Tensor:
    if not case.batched:
        return torch.randn(length, features, dtype=F64)
    shape = (case.batch, length, features) if case.batch_first else (length, case.batch, features)
    return torch.randn(shape, dtype=F64)


def _attn_mask(case: Case) -> torch.Tensor | None:
    """Random masks that never hide key 0, so no row is fully masked (torch gives NaN there);
    with is_causal, the causal mask the hint promises (top-left)."""
    if case.attn_mask is None:
        return None
    L, S = case.q_len, case.kv_len
    if case.is_causal:
        hidden = torch.ones(L, S, dtype=torch.bool).triu(1)
    else:
        hidden = torch.rand(L, S) < 0.35
        hidden[:, 0] = False
    if case.attn_mask.endswith("3d"):
        heads = case.num_heads * (case.batch if case.batched else 1)
        hidden = hidden.expand(heads, L, S).clone()
        if not case.is_causal:
            hidden |= torch.rand(heads, L, S) < 0.2
            hidden[..., 0] = False
    if case.attn_mask.startswith("bool"):
        return hidden
    mask = torch.randn(hidden.shape, dtype=F64).masked_fill(hidden, float("-inf"))
    return mask.requires_grad_()


def _key_padding_mask(case: Case) -> torch.Tensor | None:
    if case.key_padding_mask is None:
        return None
    shape = (case.batch, case.kv_len) if case.batched else (case.kv_len,)
    padded = torch.rand(shape) < 0.3
    padded[..., 0] = False
    if case.key_padding_mask == "bool":
        return padded
    return torch.randn(shape, dtype=F64).masked_fill(padded, float("-inf")).requires_grad_()


def _run(module: nn.Module, case: Case, inputs: dict[str, torch.Tensor | None], grad_seeds: dict[str, torch.Tensor]):
    module.train(case.training)
    query, key, value = inputs["query"], inputs["key"], inputs["value"]
    (out, weights), error, warns = capture(
        lambda: module(
            query,
            key,
            value,
            key_padding_mask=inputs["key_padding_mask"],
            need_weights=case.need_weights,
            attn_mask=inputs["attn_mask"],
            average_attn_weights=case.average,
            is_causal=case.is_causal,
        )
    )
    assert error is None, error
    loss = (out * grad_seeds["out"]).sum()
    if weights is not None:
        loss = loss + (weights * grad_seeds["weights"]).sum()
    leaves = {name: t for name, t in inputs.items() if t is not None and t.requires_grad}
    leaves.update({f"param.{n}": p for n, p in module.named_parameters()})
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return out, weights, dict(zip(leaves, grads)), warns


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c.num_heads}-{c.sharing}-{c.attn_mask}-{c.key_padding_mask}")
def test_matches_torch(case: Case) -> None:
    torch.manual_seed(hash((case.q_len, case.kv_len, case.num_heads)) % 1000)
    ref, ours = mha_pair(
        embed_dim=EMBED,
        num_heads=case.num_heads,
        dropout=0.0,  # dropout has its own tests (the two draw different masks)
        bias=case.bias,
        add_bias_kv=case.add_bias_kv,
        add_zero_attn=case.add_zero_attn,
        kdim=case.kdim,
        vdim=case.vdim,
        batch_first=case.batch_first,
    )
    query = _sequence(case, case.q_len, EMBED).requires_grad_()
    if case.sharing == "self":
        key = value = query
    else:
        key = _sequence(case, case.kv_len, case.kdim or EMBED).requires_grad_()
        value = key if case.sharing == "kv" else _sequence(case, case.kv_len, case.vdim or EMBED).requires_grad_()
    inputs = dict(
        query=query, key=key, value=value, attn_mask=_attn_mask(case), key_padding_mask=_key_padding_mask(case)
    )
    seeds = _grad_seeds(ref, case, inputs)
    expected_out, expected_w, expected_grads, expected_warns = _run(ref, case, inputs, seeds)
    out, weights, grads, warns = _run(ours, case, inputs, seeds)

    assert out.shape == expected_out.shape
    torch.testing.assert_close(out, expected_out, **TOL)
    if case.need_weights:
        assert weights.shape == expected_w.shape
        torch.testing.assert_close(weights, expected_w, **TOL)
    else:
        assert weights is None
    assert warns == expected_warns
    assert_grads_close(expected_grads, grads, context=str(case))


def _grad_seeds(ref: nn.Module, case: Case, inputs) -> dict[str, torch.Tensor]:
    """Random output cotangents, drawn once from torch's output shapes."""
    ref.train(case.training)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mismatched-mask warning is compared in _run
        out, weights = ref(
            inputs["query"], inputs["key"], inputs["value"],
            key_padding_mask=inputs["key_padding_mask"], need_weights=case.need_weights,
            attn_mask=inputs["attn_mask"], average_attn_weights=case.average, is_causal=case.is_causal,
        )
    seeds = {"out": torch.randn_like(out)}
    if weights is not None:
        seeds["weights"] = torch.randn_like(weights)
    return seeds


def test_grid_covers_the_options() -> None:
    """The random sample must actually exercise every option value (so the grid cannot silently
    shrink to easy cases)."""
    seen = {field: {getattr(c, field) for c in CASES} for field in Case.__dataclass_fields__}
    for field in ("bias", "add_bias_kv", "add_zero_attn", "batch_first", "batched", "is_causal",
                  "need_weights", "average", "training"):
        assert seen[field] == {False, True}, field
    assert seen["attn_mask"] == {None, "bool2d", "float2d", "bool3d", "float3d"}
    assert seen["key_padding_mask"] == {None, "bool", "float"}
    assert seen["sharing"] == {"self", "kv", "none"}
    assert {(c.kdim, c.vdim) for c in CASES} >= {(None, None), (5, 7), (6, 6)}
    causal_with_kpm = [c for c in CASES if c.is_causal and c.key_padding_mask]
    causal_sdpa_path = [c for c in CASES if c.is_causal and not c.key_padding_mask and not c.need_weights]
    assert causal_with_kpm and causal_sdpa_path


# ---------------------------------------------------------------------------------------------
# Error parity: same exception type and message as torch for bad inputs
# ---------------------------------------------------------------------------------------------

def _x(*shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


BAD_CONSTRUCTORS = {
    "embed_dim_zero": dict(embed_dim=0, num_heads=2),
    "num_heads_negative": dict(embed_dim=8, num_heads=-1),
    "not_divisible": dict(embed_dim=10, num_heads=3),
}


@pytest.mark.parametrize("name", sorted(BAD_CONSTRUCTORS))
def test_constructor_errors_match_torch(name: str) -> None:
    kwargs = BAD_CONSTRUCTORS[name]
    assert_same_error(lambda: nn.MultiheadAttention(**kwargs), lambda: qkv.MultiheadAttention(**kwargs))


x3 = _x(5, 3, 8)
BAD_FORWARDS = {
    # name: (constructor kwargs, forward args, forward kwargs)
    "query_4d": ({}, (_x(1, 5, 3, 8),) * 3, {}),
    "query_1d": ({}, (_x(8),) * 3, {}),
    "key_2d_for_batched_query": ({}, (x3, _x(5, 8), _x(5, 8)), {}),
    "key_3d_for_unbatched_query": ({}, (_x(5, 8), x3, x3), {}),
    "kpm_3d": ({}, (x3, x3, x3), dict(key_padding_mask=torch.zeros(3, 5, 1, dtype=torch.bool))),
    "kpm_2d_unbatched": ({}, (_x(5, 8),) * 3, dict(key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))),
    "attn_mask_4d": ({}, (x3, x3, x3), dict(attn_mask=torch.zeros(1, 1, 5, 5))),
    "attn_mask_1d_unbatched": ({}, (_x(5, 8),) * 3, dict(attn_mask=torch.zeros(5))),
    "attn_mask_3d_unbatched_shape": ({}, (_x(5, 8),) * 3, dict(attn_mask=torch.zeros(3, 5, 5))),
    "attn_mask_int": ({}, (x3, x3, x3), dict(attn_mask=torch.zeros(5, 5, dtype=torch.int64))),
    "attn_mask_int_with_causal_hint": (
        {}, (x3, x3, x3), dict(attn_mask=torch.zeros(5, 5, dtype=torch.int32), is_causal=True, need_weights=False)),
    "kpm_int": ({}, (x3, x3, x3), dict(key_padding_mask=torch.zeros(3, 5, dtype=torch.uint8))),
    "causal_without_mask": ({}, (x3, x3, x3), dict(is_causal=True)),
    "embed_dim_mismatch": ({}, (_x(5, 3, 6),) * 3, {}),
    "key_value_shape_mismatch": ({}, (x3, _x(5, 3, 8), _x(4, 3, 8)), {}),
    "key_value_shape_mismatch_batch_first": (
        dict(batch_first=True), (_x(3, 5, 8), _x(3, 5, 8), _x(3, 4, 8)), {}),
    "attn_mask_2d_wrong_shape": ({}, (x3, x3, x3), dict(attn_mask=torch.zeros(4, 5, dtype=torch.bool))),
    "attn_mask_3d_wrong_shape": ({}, (x3, x3, x3), dict(attn_mask=torch.zeros(5, 5, 5))),
    "attn_mask_3d_wrong_shape_batch_first": (
        dict(batch_first=True), (_x(3, 5, 8),) * 3, dict(attn_mask=torch.zeros(4, 5, 5))),
    "kpm_wrong_length": ({}, (x3, x3, x3), dict(key_padding_mask=torch.zeros(3, 4, dtype=torch.bool))),
    "kpm_wrong_batch": ({}, (x3, x3, x3), dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))),
    "kpm_wrong_length_with_bias_kv": (
        dict(add_bias_kv=True, add_zero_attn=True), (x3, x3, x3),
        dict(key_padding_mask=torch.zeros(3, 4, dtype=torch.bool))),
    "kdim_wrong_key_features": (dict(kdim=5, vdim=7), (x3, _x(6, 3, 4), _x(6, 3, 7)), {}),
    "vdim_wrong_value_features": (dict(kdim=5, vdim=7), (x3, _x(6, 3, 5), _x(6, 3, 5)), {}),
    "separate_key_value_seq_mismatch": (dict(kdim=5, vdim=7), (x3, _x(6, 3, 5), _x(4, 3, 7)), {}),
    "query_dtype_mismatch": ({}, (_x(5, 3, 8, dtype=torch.float32),) * 3, {}),
}


@pytest.mark.parametrize("name", sorted(BAD_FORWARDS))
def test_forward_errors_match_torch(name: str) -> None:
    ctor, args, kwargs = BAD_FORWARDS[name]
    ref, ours = mha_pair(embed_dim=8, num_heads=2, **ctor)
    assert_same_error(lambda: ref(*args, **kwargs), lambda: ours(*args, **kwargs))


def test_causal_hint_ignores_the_mask_like_torch() -> None:
    """torch replaces the hinted mask by SDPA's causal flag when there is no key_padding_mask and
    no weights are wanted; the mask is then not even shape-checked. qkv does the same (kernel flag)."""
    ref, ours = mha_pair(embed_dim=8, num_heads=2)
    x = _x(5, 3, 8)
    wrong_shape_mask = torch.zeros(4, 5)
    expected, _ = ref(x, x, x, attn_mask=wrong_shape_mask, is_causal=True, need_weights=False)
    got, _ = ours(x, x, x, attn_mask=wrong_shape_mask, is_causal=True, need_weights=False)
    torch.testing.assert_close(got, expected, **TOL)
    causal, _ = ours(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=F64))
    torch.testing.assert_close(got, causal, **TOL)


# ---------------------------------------------------------------------------------------------
# Fully masked rows: zeros (torch: NaN on its weights path) - the one deliberate difference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("need_weights", [True, False])
def test_fully_masked_rows_give_zeros(need_weights: bool) -> None:
    torch.manual_seed(0)
    ref, ours = mha_pair(embed_dim=8, num_heads=2, batch_first=True)
    x = _x(2, 5, 8).requires_grad_()
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[1] = True  # query 1 may attend to nothing
    out, weights = ours(x, x, x, attn_mask=mask, need_weights=need_weights)
    # Before out_proj the row is exactly 0, so the output row is out_proj's bias.
    torch.testing.assert_close(out[:, 1], ours.out_proj.bias.expand(2, 8), atol=0, rtol=0)
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=need_weights)
    keep = torch.arange(5) != 1
    torch.testing.assert_close(out[:, keep], expected[:, keep], **TOL)
    if need_weights:
        assert torch.isnan(expected[:, 1]).all()  # torch's behaviour we deliberately differ from
        assert torch.equal(weights[:, 1], torch.zeros_like(weights[:, 1]))
        assert torch.isfinite(weights).all()
    loss = out.sum() + (weights.sum() if weights is not None else 0)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()
    for p in ours.parameters():
        (g,) = torch.autograd.grad(ours(x, x, x, attn_mask=mask)[0].sum(), p)
        assert torch.isfinite(g).all()


def test_fully_masked_by_key_padding_gives_zeros() -> None:
    ref, ours = mha_pair(embed_dim=8, num_heads=4)
    x = _x(4, 2, 8)
    kpm = torch.tensor([[False, False, True, False], [True, True, True, True]])  # batch 1: every key padded
    out, weights = ours(x, x, x, key_padding_mask=kpm)
    torch.testing.assert_close(out[:, 1], ours.out_proj.bias.expand(4, 8), atol=0, rtol=0)
    assert torch.equal(weights[1], torch.zeros_like(weights[1]))
    expected, expected_w = ref(x, x, x, key_padding_mask=kpm)
    torch.testing.assert_close(out[:, 0], expected[:, 0], **TOL)
    torch.testing.assert_close(weights[0], expected_w[0], **TOL)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("which", ["attn_mask", "key_padding_mask"])
@pytest.mark.parametrize(
    "dtype, mask_dtype, value", finite_mask_cases(), ids=lambda x: str(x).replace("torch.", "")
)
def test_finite_negative_and_mixed_dtype_masks_match_torch(dtype, mask_dtype, value, which, need_weights) -> None:
    """Hugging Face masks (finfo.min, -1e9, -1e30 instead of -inf; a row or a batch with every key
    masked attends to all of them equally, as in torch), and float32 masks for half-precision
    modules: outputs, weights and the gradients of the input, the parameters and the mask, against
    torch's module in the same dtypes. (One mask at a time: two finfo.min masks add up to -inf.)"""
    if mask_dtype != dtype and need_weights:
        pytest.skip("torch's weights path raises on a mask dtype other than the module's (qkv accepts it)")
    if dtype == torch.float16 and value == torch.finfo(torch.float16).min and need_weights:
        pytest.skip("torch's weights path adds the mask in float16, where s - 65504 rounds to steps of 32 "
                    "(every score equal); qkv and torch's SDPA path add it in float32")
    torch.manual_seed(9)
    ref, ours = mha_pair(embed_dim=16, num_heads=2, batch_first=True)
    ref, ours = ref.to(dtype), ours.to(dtype)
    x = torch.randn(2, 6, 16, dtype=dtype, requires_grad=True)
    if which == "attn_mask":
        mask = finite_mask((6, 6), value, mask_dtype)
    else:
        mask = torch.zeros(2, 6, dtype=mask_dtype)
        mask[0, 4:] = value
        mask[1] = value  # every key of batch 1
    mask.requires_grad_()
    kwargs = {which: mask, "need_weights": need_weights}
    expected, expected_w = ref(x, x, x, **kwargs)
    got, got_w = ours(x, x, x, **kwargs)
    tol = finite_mask_tolerance(dtype, value)
    assert got.dtype == dtype
    assert_close_relative("out", got, expected, tol)
    if need_weights:
        assert_close_relative("weights", got_w, expected_w, tol)
    cotangent = torch.randn_like(expected)
    grads = zip(torch.autograd.grad(got, [x, mask, *ours.parameters()], cotangent),
                torch.autograd.grad(expected, [x, mask, *ref.parameters()], cotangent))
    names = ["x", which] + [n for n, _ in ours.named_parameters()]
    for name, (g_got, g_expected) in zip(names, grads):
        assert g_got.dtype == g_expected.dtype, name
        assert_close_relative(f"grad {name}", g_got, g_expected, max(tol, DTYPE_TOL[g_got.dtype]))
