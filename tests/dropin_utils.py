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
