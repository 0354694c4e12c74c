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
# Training cases also time torch with its default need_weights=True against qkv with
# need_weights=False: what a script that calls torch's module with defaults gains by switching.
MODULE_TRAIN_SIDES = (QKV, "torch_mha", "torch_mha_weights")
# A side named "<side>_1t" is that side run with one thread (thread-scaling cases).
ONE_THREAD_SUFFIX = "_1t"

SIDE_LABELS = {
    QKV: "qkv",
    "sdpa": "SDPA (default backend)",
    "sdpa_math": "SDPA math backend",
    "sdpa_flash": "SDPA flash backend",
    "sdpa_efficient": "SDPA mem-efficient backend",
    "sdpa_cudnn": "SDPA cuDNN backend",
    "torch_mha": "torch.nn.MultiheadAttention",
    "torch_mha_weights": "torch.nn.MultiheadAttention, need_weights=True",
    # feature cases (feature_workloads.py)
    "qkv_full": "qkv, full causal (no window)",
    "sdpa_gqa": "SDPA, enable_gqa=True",
    "qkv_mha_kv": "qkv MHA with the key heads only",
    "qkv_padded": "qkv on the padded batch",
    "sdpa_padded": "SDPA on the padded batch",
}


def side_label(name: str) -> str:
    base, one_thread = split_thread_suffix(name)
    label = SIDE_LABELS.get(base, base)
    return label + ", 1 thread" if one_thread else label


def split_thread_suffix(name: str) -> tuple[str, bool]:
    """("sdpa", True) for "sdpa_1t"; (name, False) for a side at the case's thread count."""
    if name.endswith(ONE_THREAD_SUFFIX):
        return name[: -len(ONE_THREAD_SUFFIX)], True
    return name, False


def is_qkv_side(name: str) -> bool:
    """qkv itself or qkv at another thread count: never a reference for the correctness check."""
    return split_thread_suffix(name)[0] == QKV


def side_names(case: Case, device: str) -> tuple[str, ...]:
    if case.sides:
        names = case.sides
    elif case.level == "module":
        names = MODULE_TRAIN_SIDES if case.mode == "train" else MODULE_SIDES
    else:
        names = CUDA_CORE_SIDES if device == "cuda" else CPU_CORE_SIDES
    if case.scaling_threads:
        names = (*names, *(n + ONE_THREAD_SUFFIX for n in names))
    return names


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
    # Feature cases: maps a result onto the checked slice, untimed (None: the side is not checked,
    # e.g. a yardstick of another shape).
    canonical: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


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


def make_inputs(case: Case, device: str, dtype: torch.dtype, seed: int):
    if case.feature:
        from .feature_workloads import make_feature_inputs

        return make_feature_inputs(case, device, dtype, seed)
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
    """torch.nn.MultiheadAttention and qkv.MultiheadAttention with the same constructor and weights
    ("torch_mha_weights" is the same torch module, called with need_weights=True)."""
    e, h = case.embed_dim, case.heads
    # Initialised in float32 on the CPU, then converted: the same seed gives the same weights
    # for every dtype and device (float64 draws differ from float32 draws).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reference = torch.nn.MultiheadAttention(e, h, batch_first=True).to(device=device, dtype=dtype)
    modules: dict[str, torch.nn.Module] = {}
    for name in names:
        if name in ("torch_mha", "torch_mha_weights"):
            modules[name] = reference
        elif name == QKV:
            cls = qkv_module_class()
            if cls is None:
                raise RuntimeError("qkv.MultiheadAttention is not available in this qkv build")
            module = cls(e, h, batch_first=True, device=device, dtype=dtype)
            module.load_state_dict(reference.state_dict())
            modules[name] = module
        else:
            raise ValueError(f"unknown module side {name!r}; expected one of {MODULE_TRAIN_SIDES}")
    return modules


def make_module_side(case: Case, inputs: ModuleInputs, name: str, module: torch.nn.Module) -> Side:
    x = inputs.x
    need_weights = case.mode == "train-weights" or name == "torch_mha_weights"
    if case.mode == "eval":
        module.eval()

        def infer():
            # Self-attention with one tensor for q, k, v: the condition for torch's fast path.
            return {"out": module(x, x, x, need_weights=need_weights)[0]}
        return Side(name, infer, torch.no_grad, [module])

    module.train()
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


@contextlib.contextmanager
def _thread_count(threads: int, inner: Callable[[], ContextManager[Any]]):
    """Run a block of calls with ``threads`` intra-op threads, then restore the previous count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with inner():
            yield
    finally:
        torch.set_num_threads(saved)


def at_threads(side: Side, name: str, threads: int) -> Side:
    """``side`` renamed ``name``, run with ``threads`` intra-op threads."""
    inner = side.context
    return Side(name, side.compute, lambda: _thread_count(threads, inner), side.keep, side.canonical)


def make_sides(case: Case, inputs, names, device: str, dtype: torch.dtype, seed: int) -> dict[str, Side | Exception]:
    """Every requested side, or the exception that building it raised (reported, not fatal).

    In a thread-scaling case (``case.scaling_threads``) each side runs at that many threads and
    its "_1t" twin at one; the thread count is set around each block of calls, not per call.
    """
    base_names = tuple(dict.fromkeys(split_thread_suffix(n)[0] for n in names))
    built: dict[str, Side | Exception] = {}
    if case.level == "module":
        try:
            modules = build_modules(case, device, dtype, seed, base_names)
        except Exception as exc:  # noqa: BLE001 - reported per side by the runner
            return {name: exc for name in names}
        for name in base_names:
            built[name] = make_module_side(case, inputs, name, modules[name])
    elif case.feature:
        from .feature_workloads import make_feature_side

        for name in base_names:
            try:
                compute, canonical = make_feature_side(case, inputs, name)
                built[name] = Side(name, compute, canonical=canonical)
            except Exception as exc:  # noqa: BLE001 - reported per side by the runner
                built[name] = exc
    else:
        for name in base_names:
            try:
                built[name] = make_core_side(case, inputs, name)
            except Exception as exc:  # noqa: BLE001 - e.g. a forced backend that rejects this shape
                built[name] = exc
    sides: dict[str, Side | Exception] = {}
    for name in names:
        base, one_thread = split_thread_suffix(name)
        side = built[base]
        threads = 1 if one_thread else case.scaling_threads
        sides[name] = side if isinstance(side, Exception) or not threads else at_threads(side, name, threads)
    return sides
