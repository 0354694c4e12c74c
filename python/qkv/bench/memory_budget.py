"""Which sides of a case fit in the device's memory, decided before anything runs.

On the H100 machine a reference side of the L=16384 causal forward+backward case ran out of
memory and took qkv's numbers with it (issue 14, defect 5). The runner now loses only a side that
fails; this module also skips, up front, a side whose rough peak estimate exceeds the memory the
device has free, with the reason in the table.

The estimates are deliberately simple (documented per side below) and err high: a skipped side is
a side whose need is clearly beyond the device, not a close call.
"""
from __future__ import annotations

import torch

from .cases import Case
from .workloads import split_thread_suffix

GIB = 1 << 30
# Sides that build the (B, H, L, S) score matrix: SDPA's math backend (in float32 for half types),
# and torch's module with need_weights=True (the weights are returned). "sdpa" (the default
# backend) takes a fused kernel on CUDA but may fall back to math on the CPU.
_DENSE_SIDES = {"sdpa_math", "torch_mha_weights"}


def _dense_copies(case: Case) -> int:
    """(B, H, L, S) buffers alive at a dense side's peak: scores and probabilities forward, plus
    the saved probabilities and the two score gradients when there is a backward."""
    return 2 if case.flop_mode == "fwd" else 5


def estimate_bytes(case: Case, side: str, dtype: torch.dtype, device: str) -> int:
    """A rough upper estimate of ``side``'s peak memory for one call of ``case``."""
    base = split_thread_suffix(side)[0]
    item = torch.empty((), dtype=dtype).element_size()
    b, h, l, s, d = case.batch, case.heads, case.q_len, case.kv_len, case.head_dim
    tokens = b * h * (2 * l + 2 * s) * d  # q, out, k, v
    if case.level == "module":
        tokens += b * l * h * d * 8  # x, projections, their gradients and the weight gradients' inputs
    io = tokens * item * (3 if case.needs_grad else 1)  # + gradients and grad_out, with slack
    dense = base in _DENSE_SIDES or (base == "sdpa" and device == "cpu" and case.needs_grad)
    if not dense:
        return io
    dense_item = max(item, 4) if base == "sdpa_math" else item
    return io + _dense_copies(case) * b * h * l * s * dense_item


def available_bytes(device: str) -> int | None:
    """Memory the device can still hand out: CUDA free plus what torch's caching allocator holds
    unused; on the CPU the kernel's MemAvailable. None when unknown (nothing is skipped)."""
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def too_large(case: Case, sides, dtype: torch.dtype, device: str, available: int | None) -> dict[str, str]:
    """{side: reason} for the sides whose estimate exceeds ``available`` bytes."""
    if available is None:
        return {}
    reasons = {}
    for side in sides:
        need = estimate_bytes(case, side, dtype, device)
        if need > available:
            reasons[side] = (f"skipped: needs about {need / GIB:.1f} GiB (estimate), "
                             f"{available / GIB:.1f} GiB free on {device}")
    return reasons

