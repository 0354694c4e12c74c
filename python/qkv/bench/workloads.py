"""Inputs and the callables each side of a case times.

A Side's ``compute()`` is exactly one timed call (forward, backward or both) and returns the
tensors it produced by name, so the same function serves correctness checks, timing and the
memory child. Inputs are fresh random tensors from a seeded generator: the parent and the
memory child build identical problems, and nothing is ever timed on zeros.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F

from .cases import Case

# Side names. "qkv" is always the first side; the others are torch references.
QKV = "qkv"
CPU_CORE_SIDES = (QKV, "sdpa", "sdpa_math")
CUDA_CORE_SIDES = (QKV, "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math")
MODULE_SIDES = (QKV, "torch_mha")

SIDE_LABELS = {
    QKV: "qkv",
    "sdpa": "SDPA (default backend)",
    "sdpa_math": "SDPA math backend",
    "sdpa_flash": "SDPA flash backend",
    "sdpa_efficient": "SDPA mem-efficient backend",
    "sdpa_cudnn": "SDPA cuDNN backend",
    "torch_mha": "torch.nn.MultiheadAttention",
}


def side_names(case: Case, device: str) -> tuple[str, ...]:
    if case.level == "module":
        return MODULE_SIDES
    return CUDA_CORE_SIDES if device == "cuda" else CPU_CORE_SIDES


def qkv_module_class() -> type | None:
    """qkv.MultiheadAttention when this qkv has it (it is being written alongside the bench)."""
    import qkv

    return getattr(qkv, "MultiheadAttention", None)


@dataclass
class Side:
    """One implementation of a case. ``compute()`` runs one timed call; ``context()`` wraps a
    block of calls (a forced SDPA backend, no_grad) so entering it is not timed per call."""

    name: str
    compute: Callable[[], dict[str, torch.Tensor]]
    context: Callable[[], ContextManager[Any]] = contextlib.nullcontext
    keep: list[Any] = field(default_factory=list)  # objects the closure needs alive (graphs)


@dataclass
class CoreInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor | None
    qkv_bias: torch.Tensor | None  # additive, -inf hides a key (qkv's convention)
    sdpa_mask: torch.Tensor | None  # bool, True = attend (SDPA's convention)


@dataclass
class ModuleInputs:
    x: torch.Tensor
    dout: torch.Tensor | None


def _randn(gen: torch.Generator, shape, device: str, dtype: torch.dtype, grad: bool) -> torch.Tensor:
    # Drawn in float32 on the CPU so every device and dtype sees the same numbers.
    t = torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def make_core_inputs(case: Case, device: str, dtype: torch.dtype, seed: int) -> CoreInputs:
    gen = torch.Generator().manual_seed(seed)
    b, h, l, s, d = case.batch, case.heads, case.q_len, case.kv_len, case.head_dim
    grad = case.needs_grad
    q = _randn(gen, (b, h, l, d), device, dtype, grad)
    k = _randn(gen, (b, h, s, d), device, dtype, grad)
    v = _randn(gen, (b, h, s, d), device, dtype, grad)
    dout = _randn(gen, (b, h, l, d), device, dtype, False) if grad else None
    qkv_bias = sdpa_mask = None
    if case.key_padding:
        lens = torch.tensor(case.valid_kv_lens(), device=device)
        attend = torch.arange(s, device=device)[None, :] < lens[:, None]  # (B, S)
        sdpa_mask = attend[:, None, None, :]
        qkv_bias = torch.zeros(b, 1, 1, s, device=device, dtype=dtype).masked_fill(~sdpa_mask, float("-inf"))
    return CoreInputs(q, k, v, dout, qkv_bias, sdpa_mask)


def make_module_inputs(case: Case, device: str, dtype: torch.dtype, seed: int) -> ModuleInputs:
    gen = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.q_len, case.embed_dim)
    grad = case.needs_grad
    x = _randn(gen, shape, device, dtype, grad)
    dout = _randn(gen, shape, device, dtype, False) if grad else None
    return ModuleInputs(x, dout)


def make_inputs(case: Case, device: str, dtype: torch.dtype, seed: int) -> CoreInputs | ModuleInputs:
    if case.level == "core":
        return make_core_inputs(case, device, dtype, seed)
    return make_module_inputs(case, device, dtype, seed)


def _sdpa_backend_context(name: str) -> Callable[[], ContextManager[Any]]:
    if name == "sdpa":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "sdpa_math": SDPBackend.MATH,
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]
    return lambda: sdpa_kernel(backend)


def _with_mode(case: Case, forward: Callable[[], torch.Tensor], wrt: tuple[torch.Tensor, ...],
               dout: torch.Tensor | None, names: tuple[str, ...], context) -> tuple[Callable, list]:
    """Wrap a forward function into the case's timed call: fwd, fwdbwd or bwd only."""
    if case.mode == "fwd":
        return (lambda: {"out": forward()}), []
    if case.mode == "fwdbwd":
        def fwdbwd():
            out = forward()
            grads = torch.autograd.grad(out, wrt, dout)
            return {"out": out, **dict(zip(names, grads))}
        return fwdbwd, []
    # Backward only: the forward graph is built once, outside the timed region, and kept.
    with context():
        out = forward()

    def bwd():
        grads = torch.autograd.grad(out, wrt, dout, retain_graph=True)
        return {"out": out, **dict(zip(names, grads))}
    return bwd, [out]


def make_core_side(case: Case, inputs: CoreInputs, name: str) -> Side:
    q, k, v = inputs.q, inputs.k, inputs.v
    if name == QKV:
        bias, causal = inputs.qkv_bias, case.causal

        def forward():
            return torch.ops.qkv.attention(q, k, v, bias, dropout_p=0.0, is_causal=causal)[0]
        context = contextlib.nullcontext
    else:
        mask, causal = inputs.sdpa_mask, case.causal

        def forward():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        context = _sdpa_backend_context(name)
    compute, keep = _with_mode(case, forward, (q, k, v), inputs.dout, ("dq", "dk", "dv"), context)
    return Side(name, compute, context, keep)


def build_modules(case: Case, device: str, dtype: torch.dtype, seed: int, names=MODULE_SIDES) -> dict[str, torch.nn.Module]:
    """torch.nn.MultiheadAttention and qkv.MultiheadAttention with the same constructor and weights."""
    e, h = case.embed_dim, case.heads
    # Initialised in float32 on the CPU, then converted: the same seed gives the same weights
    # for every dtype and device (float64 draws differ from float32 draws).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reference = torch.nn.MultiheadAttention(e, h, batch_first=True).to(device=device, dtype=dtype)
    modules: dict[str, torch.nn.Module] = {}
    for name in names:
        if name == "torch_mha":
            modules[name] = reference
        elif name == QKV:
            cls = qkv_module_class()
            if cls is None:
                raise RuntimeError("qkv.MultiheadAttention is not available in this qkv build")
            module = cls(e, h, batch_first=True, device=device, dtype=dtype)
            module.load_state_dict(reference.state_dict())
            modules[name] = module
        else:
            raise ValueError(f"unknown module side {name!r}; expected one of {MODULE_SIDES}")
    return modules


def make_module_side(case: Case, inputs: ModuleInputs, name: str, module: torch.nn.Module) -> Side:
    x = inputs.x
    if case.mode == "eval":
        module.eval()

        def infer():
            # Self-attention with one tensor for q, k, v: the condition for torch's fast path.
            return {"out": module(x, x, x, need_weights=False)[0]}
        return Side(name, infer, torch.no_grad, [module])

    module.train()
    need_weights = case.mode == "train-weights"
    params = [p for p in module.parameters() if p.requires_grad]
    param_names = tuple("d_" + n for n, p in module.named_parameters() if p.requires_grad)
    wrt = (x, *params)

    def train_step():
        out, weights = module(x, x, x, need_weights=need_weights)
        grads = torch.autograd.grad(out, wrt, inputs.dout)
        result = {"out": out, "dx": grads[0], **dict(zip(param_names, grads[1:]))}
        if weights is not None:
            result["weights"] = weights
        return result
    return Side(name, train_step, contextlib.nullcontext, [module])


def make_sides(case: Case, inputs, names, device: str, dtype: torch.dtype, seed: int) -> dict[str, Side | Exception]:
    """Every requested side, or the exception that building it raised (reported, not fatal)."""
    sides: dict[str, Side | Exception] = {}
    if case.level == "module":
        try:
            modules = build_modules(case, device, dtype, seed, names)
        except Exception as exc:  # noqa: BLE001 - reported per side by the runner
            return {name: exc for name in names}
        for name in names:
            sides[name] = make_module_side(case, inputs, name, modules[name])
        return sides
    for name in names:
        try:
            sides[name] = make_core_side(case, inputs, name)
        except Exception as exc:  # noqa: BLE001 - e.g. a forced backend that rejects this shape
            sides[name] = exc
    return sides
