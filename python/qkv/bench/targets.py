"""Issue 4's CPU performance targets: which measured ratio each one reads, what it requires, and
whether this run met it.

Every target is a ratio taken in one run by the runner's interleaved method (speedups and
thread scaling: medians of per-round ratios; memory: each side's peak in its own child
process), read from the cases of ``cases.targets_grid()`` (``--cases targets``). This module
only reads a RunResult: nothing here measures.

REQUIRED RATIOS are issue 4's: core forward 1.2x SDPA, forward+backward 1.5x, the MHA training
step 1.5x torch's need_weights=False path and 3x its default need_weights=True path (2x for qkv
with need_weights=True), the forward at 60% or more of torch.mm's rate in the same rounds, peak
memory no more than torch's need_weights=False path and at most a quarter of its default path,
decode and small shapes no worse than SDPA, and 1.8x from 1 to 2 threads. Rows with no
requirement are context (SDPA's and torch.mm's own scaling, memory growth with L) and are never
"met" or "missed". The numbers live in TARGETS, in one place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .runner import CaseResult, RunResult
from .timing import MATMUL

# Metrics a target can read from a case.
SPEEDUP = "speedup"  # time(reference) / time(qkv)
MATMUL_SHARE = "matmul share"  # qkv FLOP/s / torch.mm FLOP/s, paired per round (side: "qkv")
MEMORY = "memory"  # peak(reference) / peak(qkv)
SCALING = "scaling"  # time(side at 1 thread) / time(side at the case's threads)
GROWTH = "growth"  # peak(side, case) / peak(side, base_case): memory growth with L
# (peak(side) + the bytes of the query heads qkv has beyond side's) / peak(qkv): GQA against MHA
# with only the key heads ("no more memory than MHA with the key heads plus the queries").
MEMORY_PLUS_QUERIES = "memory plus queries"
METRICS = (SPEEDUP, MATMUL_SHARE, MEMORY, SCALING, GROWTH, MEMORY_PLUS_QUERIES)


@dataclass(frozen=True)
class Target:
    """One line of the issue 4 table: a ratio read from one case (two for growth)."""

    item: int  # the numbered target in issue 4
    label: str
    case: str
    metric: str
    side: str  # the reference (speedup, memory) or the side whose ratio it is (scaling, growth)
    required: float | None  # None: context only
    base_case: str | None = None  # growth: the shorter case the peak is divided by
    at_most: bool = False  # met when measured <= required (growth) instead of >=

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"Target {self.label!r}: metric must be one of {METRICS}; got {self.metric!r}")
        if (self.metric == GROWTH) != (self.base_case is not None):
            raise ValueError(f"Target {self.label!r}: base_case is required for growth and only for growth")
        if self.required is not None and not self.required > 0:
            raise ValueError(f"Target {self.label!r}: required must be > 0 or None; got {self.required}")


@dataclass(frozen=True)
class TargetRow:
    """A target evaluated on one run."""

    target: Target
    measured: float | None
    met: bool | None  # None: context only, or not measured
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "not measured"
        if self.target.required is None:
            return "info"
        return "yes" if self.met else "NO"


def _parity(item: int, label: str, case: str, metric: str, side: str, required: float = 1.0) -> Target:
    return Target(item, label, case, metric, side, required)


TARGETS: tuple[Target, ...] = (
    # 1. Core forward vs SDPA (default CPU backend).
    _parity(1, "core fwd B1 H8 L2048 D64 vs SDPA", "long2k-fwd", SPEEDUP, "sdpa", 1.2),
    _parity(1, "core fwd B1 H8 L2048 D128 vs SDPA", "long2k-d128-fwd", SPEEDUP, "sdpa", 1.2),
    _parity(1, "core fwd B2 H8 L512 D64 vs SDPA", "mid-fwd", SPEEDUP, "sdpa", 1.2),
    # 2. Core forward+backward vs SDPA, causal and not.
    _parity(2, "core fwd+bwd B1 H8 L2048 D64 vs SDPA", "long2k-fwdbwd", SPEEDUP, "sdpa", 1.5),
    _parity(2, "core fwd+bwd causal B1 H8 L2048 D64 vs SDPA", "long2k-causal-fwdbwd", SPEEDUP, "sdpa", 1.5),
    # 3. MHA training step, E=512 H=8 N=2.
    *(t for l in (1024, 2048) for t in (
        _parity(3, f"MHA train L{l}: qkv nw=False vs torch nw=False", f"module-L{l}-train", SPEEDUP, "torch_mha", 1.5),
        _parity(3, f"MHA train L{l}: qkv nw=False vs torch nw=True", f"module-L{l}-train", SPEEDUP,
                "torch_mha_weights", 3.0),
        _parity(3, f"MHA train L{l}: qkv nw=True vs torch nw=True", f"module-L{l}-train-weights", SPEEDUP,
                "torch_mha", 2.0),
    )),
    # 4. Core forward at L=2048: its share of the machine's float32 matmul rate.
    Target(4, "core fwd B1 H8 L2048 D64: share of torch.mm's rate", "long2k-fwd", MATMUL_SHARE, "qkv", 0.6),
    Target(4, "core fwd B1 H8 L2048 D128: share of torch.mm's rate", "long2k-d128-fwd", MATMUL_SHARE, "qkv", None),
    # 5. Peak memory of a training step, E=256 H=4 N=2, and its growth with L.
    *(t for l in (1024, 2048, 4096) for t in (
        _parity(5, f"MHA train peak mem L{l}: qkv vs torch nw=False", f"module-E256-L{l}-train", MEMORY, "torch_mha"),
        _parity(5, f"MHA train peak mem L{l}: qkv vs torch nw=True", f"module-E256-L{l}-train", MEMORY,
                "torch_mha_weights", 4.0),
    )),
    *(Target(5, f"peak mem growth L1024 -> L4096: {who}", "module-E256-L4096-train", GROWTH, side, None,
             base_case="module-E256-L1024-train")
      for who, side in (("qkv", "qkv"), ("torch nw=False", "torch_mha"), ("torch nw=True", "torch_mha_weights"))),
    # 6. Decode and small shapes.
    _parity(6, "decode fwd B4 H8 L1 S2048 D64 vs SDPA", "decode-fwd", SPEEDUP, "sdpa"),
    _parity(6, "small fwd B4 H8 L128 D64 vs SDPA", "small-fwd", SPEEDUP, "sdpa"),
    _parity(6, "small fwd+bwd B4 H8 L128 D64 vs SDPA", "small-fwdbwd", SPEEDUP, "sdpa"),
    # 7. Thread scaling, time(1 thread) / time(2 threads); torch.mm's is the machine's own.
    *(t for mode, case in (("fwd", "threads-long2k-fwd"), ("fwd+bwd", "threads-long2k-fwdbwd")) for t in (
        Target(7, f"thread scaling 1->2, {mode} L2048: qkv", case, SCALING, "qkv", 1.8),
        Target(7, f"thread scaling 1->2, {mode} L2048: SDPA", case, SCALING, "sdpa", None),
        Target(7, f"thread scaling 1->2, torch.mm n=1536 (during {mode})", case, SCALING, MATMUL, None),
    )),
)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _peak(result: CaseResult | None, side: str) -> int | None:
    s = result.sides.get(side) if result and result.status == "ok" else None
    return s.peak_bytes if s else None


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB"


def measure(target: Target, results: dict[str, CaseResult], dtype_size: int = 4) -> tuple[float | None, str]:
    """The measured ratio of ``target`` (None when the run lacks it) and a note on why or how."""
    result = results.get(target.case)
    if result is None:
        return None, "case not in this run"
    if result.status != "ok":
        return None, f"case {result.status}"
    note = ""
    if target.metric == SPEEDUP:
        value = result.speedups.get(target.side)
        qkv = result.sides.get("qkv")
        if result.case.level == "core" and qkv and qkv.gflops is not None and result.fraction_of_matmul is not None:
            note = f"qkv {qkv.gflops:.1f} GFLOP/s, {100 * result.fraction_of_matmul:.0f}% of mm"
    elif target.metric == MATMUL_SHARE:
        value = result.fraction_of_matmul
        if result.matmul_gflops is not None:
            note = f"torch.mm {result.matmul_gflops:.1f} GFLOP/s in the same rounds"
    elif target.metric == MEMORY:
        value = result.memory_ratios.get(target.side)
        peaks = [p for p in (_peak(result, "qkv"), _peak(result, target.side)) if p is not None]
        if len(peaks) == 2:
            note = f"qkv {_mib(peaks[0])}, {target.side} {_mib(peaks[1])}"
    elif target.metric == MEMORY_PLUS_QUERIES:
        from .feature_workloads import extra_query_bytes

        peak, yardstick = _peak(result, "qkv"), _peak(result, target.side)
        value = None
        if peak and yardstick is not None:
            extra = extra_query_bytes(result.case, dtype_size)
            value = (yardstick + extra) / peak
            note = f"qkv {_mib(peak)}, {target.side} {_mib(yardstick)} + queries {_mib(extra)}"
    elif target.metric == SCALING:
        value = result.thread_scaling.get(target.side)
    else:
        base = results.get(target.base_case)
        if base is None:
            return None, f"{target.base_case} not in this run"
        peak, base_peak = _peak(result, target.side), _peak(base, target.side)
        value = peak / base_peak if peak is not None and base_peak else None
        if value is not None:
            note = f"{_mib(base_peak)} at L{base.case.q_len} -> {_mib(peak)} at L{result.case.q_len}"
    value = _finite(value)
    if value is None:
        return None, f"no {target.metric} ratio for {target.side}"
    return value, note


def is_met(target: Target, measured: float | None) -> bool | None:
    """True / False against the requirement; None for context rows and missing numbers."""
    if measured is None or target.required is None:
        return None
    return measured <= target.required if target.at_most else measured >= target.required


def evaluate(run: RunResult, targets: tuple[Target, ...] = TARGETS) -> list[TargetRow]:
    results = {r.case.name: r for r in run.results}
    dtype_size = {"float64": 8, "float16": 2, "bfloat16": 2}.get(str(run.meta.get("dtype", "")).removeprefix("torch."), 4)
    rows = []
    for target in targets:
        measured, note = measure(target, results, dtype_size)
        rows.append(TargetRow(target, measured, is_met(target, measured), note))
    return rows


def format_required(target: Target) -> str:
    if target.required is None:
        return "-"
    if target.metric == MATMUL_SHARE:
        return f">= {100 * target.required:.0f}%"
    return ("<= " if target.at_most else ">= ") + f"{target.required:.2f}x"


def format_measured(row: TargetRow) -> str:
    """Two decimals, or three where two would print the requirement itself (0.998x, not 1.00x,
    beside a "NO")."""
    if row.measured is None:
        return "-"
    if row.target.metric == MATMUL_SHARE:
        return f"{100 * row.measured:.0f}%"
    text = f"{row.measured:.2f}"
    if row.target.required is not None and text == f"{row.target.required:.2f}":
        text = f"{row.measured:.3f}"
    return text + "x"


def target_table(rows: list[TargetRow]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the compact table: target, required, measured, met."""
    header = ["#", "target", "case", "required", "measured", "met", "note"]
    body = [
        [str(r.target.item), r.target.label, r.target.case, format_required(r.target),
         format_measured(r), r.verdict, r.note]
        for r in rows
    ]
    return header, body


def summary_line(rows: list[TargetRow]) -> str:
    judged = [r for r in rows if r.met is not None]
    missing = [r for r in rows if r.measured is None]
    line = f"{sum(r.met for r in judged)} of {len(judged)} targets met"
    if missing:
        line += f"; {len(missing)} not measured"
    return line


def to_json(rows: list[TargetRow]) -> list[dict]:
    return [
        {"item": r.target.item, "target": r.target.label, "case": r.target.case, "metric": r.target.metric,
         "side": r.target.side, "base_case": r.target.base_case, "required": r.target.required,
         "at_most": r.target.at_most, "measured": None if r.measured is None else round(r.measured, 4),
         "met": r.met, "verdict": r.verdict, "note": r.note}
        for r in rows
    ]


# Issue 17's CPU targets, read from the cases of ``cases.features_grid()`` (``--cases features``):
# the items are the target lines.
FEATURE_TARGETS: tuple[Target, ...] = (
    *(_parity(1, f"sliding window 256 over 8192, causal, {mode}: vs full causal", f"swa8k-{case}", SPEEDUP,
              "qkv_full", 10.0) for mode, case in (("fwd", "fwd"), ("fwd+bwd", "fwdbwd"))),
    *(t for mode, case in (("fwd", "fwd"), ("fwd+bwd", "fwdbwd")) for t in (
        _parity(2, f"GQA 8:1 (32/4 heads) {mode}: vs SDPA enable_gqa=True", f"gqa8to1-{case}", SPEEDUP, "sdpa_gqa"),
        _parity(2, f"GQA 8:1 {mode} peak mem: vs MHA with 4 heads plus the queries", f"gqa8to1-{case}",
                MEMORY_PLUS_QUERIES, "qkv_mha_kv"),
        Target(2, f"GQA 8:1 {mode} peak mem: vs SDPA enable_gqa=True", f"gqa8to1-{case}", MEMORY, "sdpa_gqa", None),
    )),
    *(t for mode, case in (("fwd", "fwd"), ("fwd+bwd", "fwdbwd")) for t in (
        _parity(3, f"varlen, half padding, {mode}: vs the padded call", f"varlen-halfpad-{case}", SPEEDUP,
                "qkv_padded", 1.7),
        Target(3, f"varlen, half padding, {mode}: vs SDPA on the padded batch", f"varlen-halfpad-{case}", SPEEDUP,
               "sdpa_padded", None),
    )),
    _parity(4, "KV-cache decode B8 H32/8 1 vs 4096 D128: vs SDPA enable_gqa=True", "kvcache-decode-fwd", SPEEDUP,
            "sdpa_gqa"),
)
