"""Check every side against a plain high-precision reference before anything is timed.

A fast wrong answer is worthless, so a case whose qkv result is off is reported loudly and not
timed. The reference is explicit math (softmax(QK^T * scale + mask) V) in float64 (float32 on a
GPU, with TF32 off), on a slice of the batch and heads: attention is independent per (batch,
head), so the slice checks the exact numbers the full timed call produced, at a fraction of the
cost. qkv passes when its error is within the dtype's tolerance or at most twice the error of
the best torch path on the same inputs (the criterion FlashAttention's tests use).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cases import Case
from .workloads import CoreInputs, ModuleInputs, build_modules, is_qkv_side

# Error allowed relative to max(1, max |reference|), per tensor.
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
SLICE_BATCH = 2
SLICE_HEADS = 2


# If torch itself is further than this many tolerances from the reference, the check (not
# qkv) is broken: the case is reported as an error instead of letting "2x torch's error" pass.
INCONSISTENT_FACTOR = 10.0


@dataclass
class CheckResult:
    errors: dict[str, float]  # side -> max relative error over all checked tensors
    allowed: float
    passed: bool
    consistent: bool  # torch agrees with the reference, so the check means something
    message: str


def reference_dtype(device: str) -> torch.dtype:
    return torch.float64 if device == "cpu" else torch.float32


def relative_error(result: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Max over tensors of max |result - reference| / max(1, max |reference|)."""
    missing = sorted(set(reference) - set(result))
    if missing:
        raise ValueError(f"result lacks tensors {missing} that the reference has")
    worst = 0.0
    for key, ref in reference.items():
        got = result[key].detach().to(ref.dtype)
        if got.shape != ref.shape:
            raise ValueError(f"{key}: shape {tuple(got.shape)} differs from the reference's {tuple(ref.shape)}")
        diff = (got - ref).abs().max().item() if ref.numel() else 0.0
        if math.isnan(diff):
            return math.inf
        worst = max(worst, diff / max(1.0, ref.abs().max().item() if ref.numel() else 1.0))
    return worst


def _slice(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t[:SLICE_BATCH, :SLICE_HEADS]


def core_reference(case: Case, inputs: CoreInputs, device: str) -> dict[str, torch.Tensor]:
    """Explicit attention on the (batch, head) slice, in reference precision, with gradients."""
    dtype = reference_dtype(device)
    q, k, v = (_slice(t).detach().to(dtype).requires_grad_(case.needs_grad) for t in (inputs.q, inputs.k, inputs.v))
    with _no_tf32():
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(case.head_dim)
        l, s = case.q_len, case.kv_len
        hidden = torch.zeros(l, s, dtype=torch.bool, device=q.device)
        if case.causal:
            hidden |= torch.ones(l, s, dtype=torch.bool, device=q.device).triu(1)
        hidden = hidden.expand(q.shape[0], 1, l, s).clone()
        for b, valid in enumerate(case.valid_kv_lens()[: q.shape[0]]):
            hidden[b, :, :, valid:] = True
        probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        out = probs @ v
        result = {"out": out}
        if case.needs_grad:
            grads = torch.autograd.grad(out, (q, k, v), _slice(inputs.dout).to(dtype))
            result.update(dq=grads[0], dk=grads[1], dv=grads[2])
    return {key: t.detach() for key, t in result.items()}


def sliced_core_result(result: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: _slice(t) for key, t in result.items()}


def module_check_inputs(inputs: ModuleInputs) -> ModuleInputs:
    """The first batch element: parameter gradients sum over the batch, so the module check
    runs each side again on this slice instead of slicing the full results."""
    x = inputs.x[:1].detach().requires_grad_(inputs.x.requires_grad)
    dout = None if inputs.dout is None else inputs.dout[:1]
    return ModuleInputs(x, dout)


def module_reference(case: Case, inputs: ModuleInputs, device: str, seed: int) -> dict[str, torch.Tensor]:
    """torch.nn.MultiheadAttention in reference precision, in training mode even for eval cases:
    dropout is 0, so the math is the same, and training mode takes the explicit functional path
    rather than a fused kernel."""
    dtype = reference_dtype(device)
    module = build_modules(case, device, dtype, seed, ("torch_mha",))["torch_mha"].train()
    x = inputs.x.detach().to(dtype).requires_grad_(case.needs_grad)
    with _no_tf32(), torch.set_grad_enabled(case.needs_grad):
        out, weights = module(x, x, x, need_weights=case.mode == "train-weights")
        result = {"out": out}
        if weights is not None:
            result["weights"] = weights
        if case.needs_grad:
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            grads = torch.autograd.grad(out, (x, *(p for _, p in named)), inputs.dout.to(dtype))
            result["dx"] = grads[0]
            result.update({"d_" + n: g for (n, _), g in zip(named, grads[1:])})
    return {key: t.detach() for key, t in result.items()}


def judge(case: Case, errors: dict[str, float], dtype: torch.dtype) -> CheckResult:
    """qkv passes within the dtype's tolerance, or within twice the best torch path's error.
    Every qkv side (also qkv at one thread, "qkv_1t") must pass; its worst error is reported."""
    tol = TOLERANCE.get(dtype, 1e-3)
    torch_errors = [e for side, e in errors.items() if not is_qkv_side(side) and math.isfinite(e)]
    best_torch = min(torch_errors) if torch_errors else None
    allowed = max(tol, 2.0 * best_torch) if best_torch is not None else tol
    qkv_errors = [e for side, e in errors.items() if is_qkv_side(side)]
    qkv_error = max(qkv_errors) if qkv_errors else math.inf  # relative_error maps NaN to inf
    consistent = best_torch is None or best_torch <= INCONSISTENT_FACTOR * tol
    passed = consistent and qkv_error <= allowed
    best = "n/a" if best_torch is None else f"{best_torch:.1e}"
    message = (
        f"{case.name}: qkv max relative error {qkv_error:.1e} vs the high-precision reference "
        f"(best torch path {best}; allowed {allowed:.1e})"
    )
    if not consistent:
        message += "; torch itself is off the reference, so the check is inconsistent"
    return CheckResult(errors, allowed, passed, consistent, message)


class _no_tf32:
    """Keep reference matmuls in true float32 on GPUs (TF32 would make the reference the
    least precise thing in the comparison)."""

    def __enter__(self):
        self._saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self._saved
        return False
