"""Shared helpers for the drop-in tests (qkv.MultiheadAttention and the functional twins)."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

import qkv

F64 = torch.float64
# float64 parity with torch: differences are reassociation-level only.
TOL = dict(atol=1e-10, rtol=1e-8)


def mha_pair(**kwargs: Any) -> tuple[nn.MultiheadAttention, qkv.MultiheadAttention]:
    """A torch and a qkv MultiheadAttention in float64 with the same weights (non-zero biases so
    that bias paths are exercised)."""
    ref = nn.MultiheadAttention(**kwargs, dtype=F64)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = qkv.MultiheadAttention(**kwargs, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def capture(fn: Callable[[], Any]) -> tuple[Any, BaseException | None, list[str]]:
    """Runs fn; returns (result, exception, warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(), None, [str(w.message) for w in caught]
        except Exception as exc:  # noqa: BLE001 (we compare whatever is raised)
            return None, exc, [str(w.message) for w in caught]


def assert_same_error(torch_fn: Callable[[], Any], qkv_fn: Callable[[], Any]) -> BaseException:
    """Both raise, with the same exception type and message."""
    _, expected, _ = capture(torch_fn)
    _, got, _ = capture(qkv_fn)
    assert expected is not None, "torch did not raise: the case is not a bad input"
    assert got is not None, f"qkv did not raise; torch raised {type(expected).__name__}: {expected}"
    assert type(got) is type(expected), f"{type(got).__name__}: {got}  vs torch {type(expected).__name__}: {expected}"
    assert str(got) == str(expected)
    return got


def grads_of(tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    return {name: (None if t is None else t.grad) for name, t in tensors.items()}


def assert_grads_close(expected: dict[str, Any], got: dict[str, Any], context: str = "") -> None:
    assert expected.keys() == got.keys()
    for name in expected:
        e, g = expected[name], got[name]
        if e is None or g is None:
            # A gradient torch does not produce must not appear (and vice versa), except that an
            # all-zero gradient is equivalent to none.
            other = g if e is None else e
            assert other is None or not other.any(), f"{context} grad {name}: one side is None"
            continue
        torch.testing.assert_close(g, e, **TOL, msg=lambda m: f"{context} grad {name}: {m}")


# ---- masks with large finite values and masks of another dtype, on every dtype ----------------

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# qkv against torch in the same dtype, relative to the larger of 1 and the largest reference value.
DTYPE_TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 8e-3}


def finite_mask_cases() -> list[tuple[torch.dtype, torch.dtype, float]]:
    """(dtype, mask dtype, value): Hugging Face's torch.finfo(mask dtype).min, -1e9 and -1e30 where
    the mask's dtype holds them, in masks of the inputs' dtype and (mixed) float32."""
    cases = []
    for dtype in DTYPES:
        for mask_dtype in dict.fromkeys([dtype, torch.float32]):
            for value in (torch.finfo(mask_dtype).min, -1e9, -1e30):
                if value >= torch.finfo(mask_dtype).min:
                    cases.append((dtype, mask_dtype, value))
    return cases


def finite_mask(shape: tuple[int, ...], value: float, dtype: torch.dtype) -> torch.Tensor:
    """Random small values, with `value` on every key of query row 0, every other key of row 1 and
    all keys but the last of row 2 (of the last two dims)."""
    mask = torch.randn(shape, dtype=torch.float64)
    mask[..., 0, :] = value
    mask[..., 1, ::2] = value
    mask[..., 2, :-1] = value
    return mask.to(dtype)


def finite_mask_tolerance(dtype: torch.dtype, value: float) -> float:
    """DTYPE_TOL, plus where `value` keeps only part of a score (s + value rounds to a step of
    eps * |value| in the accumulation type) four such steps: two implementations may round to
    neighbouring ones. Where the step exceeds the scores' spread, s + value is `value` in both."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    step = torch.finfo(acc).eps * abs(value)
    return DTYPE_TOL[dtype] + (4 * step if step < 1 else 0.0)


def assert_close_relative(name: str, got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """|got - expected| <= tol * max(1, max |expected|), elementwise, both finite."""
    assert got.shape == expected.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    bound = tol * max(1.0, expected.double().abs().max().item())
    err = (got.double() - expected.double()).abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
