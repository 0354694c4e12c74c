"""Run a list of cases: check each side, time them interleaved, measure their peak memory."""
from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from . import correctness
from .cases import Case
from .machine import describe_machine
from .memory import MemoryResult, measure_cuda, measure_in_child
from .memory_budget import available_bytes, too_large
from .flops import matmul_flops
from .timing import (MATMUL, SideTiming, TimingConfig, make_matmul_side, matmul_rate, paired_fraction_of_matmul,
                     paired_speedup, time_interleaved, timer_for)
from .workloads import (ONE_THREAD_SUFFIX, QKV, Side, at_threads, is_qkv_side, make_inputs, make_sides,
                        qkv_module_class, side_names, split_thread_suffix)

# Below this, peak-memory differences are page-granularity noise and no ratio is reported.
MIN_MEMORY_FOR_RATIO = 1 << 20


@dataclass
class RunConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    threads: int = 1
    seed: int = 0
    memory: bool = True
    timing: TimingConfig = field(default_factory=TimingConfig)
    matmul_n: int = 1536  # the torch.mm probe: n x n x n, large enough to reach the SGEMM plateau


@dataclass
class SideResult:
    name: str
    status: str = "ok"  # ok | error | wrong | skipped (estimated to exceed the free memory)
    message: str = ""
    max_error: float | None = None
    timing: SideTiming | None = None
    gflops: float | None = None
    peak_bytes: int | None = None
    memory_message: str = ""

    @property
    def median_s(self) -> float | None:
        return self.timing.median if self.timing and self.timing.samples else None


@dataclass
class CaseResult:
    case: Case
    status: str  # ok | wrong | error | skipped
    message: str = ""
    sides: dict[str, SideResult] = field(default_factory=dict)
    speedups: dict[str, float] = field(default_factory=dict)  # reference side -> t_ref / t_qkv
    memory_ratios: dict[str, float] = field(default_factory=dict)  # reference side -> peak_ref / peak_qkv
    fraction_of_matmul: float | None = None  # qkv FLOP/s / torch.mm FLOP/s, paired per round
    matmul_gflops: float | None = None  # the torch.mm probe's median rate during this case
    # Thread-scaling cases: side -> time at 1 thread / time at case.scaling_threads, paired per round
    # ("matmul": the torch.mm probe, the machine's own scaling).
    thread_scaling: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResult:
    meta: dict
    results: list[CaseResult]

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status in ("wrong", "error")]


def _default_log(message: str) -> None:
    print(message, file=sys.stderr)


class _NoProgress:
    def update(self, n: int = 1) -> None: ...
    def set_description_str(self, s: str) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoProgress(), _default_log
    try:
        from tqdm.auto import tqdm
    except ImportError:
        _default_log("note: no progress bar (pip install tqdm, or qkv[bench])")
        return _NoProgress(), _default_log

    bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
    return bar, lambda message: tqdm.write(message, file=sys.stderr)


def run_cases(cases: list[Case], config: RunConfig, progress: bool = True) -> RunResult:
    """Benchmark ``cases``; never raises for a failing case, it is reported in the result."""
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    meta = describe_machine(config.device, config.dtype, config.threads)
    results: list[CaseResult] = []
    runnable = list(cases)
    skipped = [c for c in cases if c.level == "module"] if qkv_module_class() is None else []
    bar, log = _progress(len(cases) - len(skipped), progress)
    if skipped:
        log(
            f"NOTICE: qkv.MultiheadAttention is not in this qkv build ({meta['qkv']}); skipping "
            f"{len(skipped)} module case(s): {', '.join(c.name for c in skipped)}"
        )
        runnable = [c for c in cases if c not in skipped]
        results += [CaseResult(c, "skipped", "qkv.MultiheadAttention not available") for c in skipped]

    bar.set_description_str("matmul ceiling")
    matmul_start = matmul_rate(config.device, config.dtype, config.matmul_n)
    # The same torch.mm also runs in every timing round, so "% of matmul" is a paired ratio.
    matmul_probe = make_matmul_side(config.device, config.dtype, config.matmul_n)
    done: list[CaseResult] = []
    for case in runnable:
        bar.set_description_str(case.name)
        done.append(_run_case(case, config, bar, log, matmul_probe))
        bar.update(1)
        gc.collect()
    bar.set_description_str("matmul ceiling")
    matmul_end = matmul_rate(config.device, config.dtype, config.matmul_n)
    bar.close()

    meta.update(
        matmul_gflops=max(matmul_start, matmul_end) / 1e9,
        matmul_gflops_start=matmul_start / 1e9,
        matmul_gflops_end=matmul_end / 1e9,
        matmul_n=config.matmul_n,
        seed=config.seed,
        timing=vars(config.timing).copy(),
        memory_measured=config.memory,
        memory_method=next((s.memory_message for r in done for s in r.sides.values()
                            if s.peak_bytes is not None), None),
        duration_s=round(time.perf_counter() - started, 1),
    )
    order = {c.name: i for i, c in enumerate(cases)}
    results = sorted(done + results, key=lambda r: order[r.case.name])
    return RunResult(meta, results)


def _run_case(case: Case, config: RunConfig, bar, log: Callable[[str], None], matmul_probe: Side) -> CaseResult:
    names = side_names(case, config.device)
    result = CaseResult(case, "ok", sides={n: SideResult(n) for n in names})
    oversized = too_large(case, names, config.dtype, config.device, available_bytes(config.device))
    for name, reason in oversized.items():
        result.sides[name].status, result.sides[name].message = "skipped", reason
        log(f"note: {case.name}: {name} {reason}")
    if any(is_qkv_side(name) for name in oversized):
        result.status = "skipped"
        result.message = f"qkv {oversized.get(QKV) or next(iter(oversized.values()))}"
        return result
    names = tuple(n for n in names if n not in oversized)
    try:
        bar.set_postfix_str("check")
        inputs = make_inputs(case, config.device, config.dtype, config.seed)
        sides = make_sides(case, inputs, names, config.device, config.dtype, config.seed)
        runnable, first_call_s = _check(case, inputs, sides, config, result)
    except Exception as exc:  # noqa: BLE001 - one broken case must not end the run
        runnable, first_call_s = {}, {}
        result.status, result.message = "error", f"{case.name}: {type(exc).__name__}: {exc}"
    if result.status != "ok":
        log(("FAIL (wrong result, not timed): " if result.status == "wrong" else "ERROR (not timed): ") + result.message)
        return result
    for side in result.sides.values():
        if side.status not in ("ok", "skipped"):  # skipped ones were reported above
            log(f"note: {case.name}: {side.name} left out: {side.message}")

    bar.set_postfix_str("time")
    probes = [matmul_probe]
    if case.scaling_threads:  # how the machine's own matmul scales, beside the attention sides
        probes.append(at_threads(matmul_probe, MATMUL + ONE_THREAD_SUFFIX, 1))
    # A side that fails while timed (e.g. out of memory in a reference) costs that side only.
    failures: dict[str, str] = {}
    timings = time_interleaved([*runnable.values(), *probes], timer_for(config.device), config.timing,
                               first_call_s, failures)
    for name, reason in failures.items():
        if name in result.sides:
            result.sides[name].status, result.sides[name].message = "error", reason
            runnable.pop(name)
        log(f"note: {case.name}: {name} left out: {reason}")
    failed_qkv = [n for n in failures if is_qkv_side(n)]
    if failed_qkv:
        result.status, result.message = "error", f"{case.name}: {failed_qkv[0]} {failures[failed_qkv[0]]}"
        log("ERROR: " + result.message)
    matmul_timing = timings.pop(MATMUL, None)
    matmul_one_thread = timings.pop(MATMUL + ONE_THREAD_SUFFIX, None)
    if matmul_timing is not None:
        result.matmul_gflops = matmul_flops(config.matmul_n) / matmul_timing.median / 1e9
    for name, timing in timings.items():
        side = result.sides[name]
        side.timing = timing
        side.gflops = case.flops / timing.median / 1e9
    if failed_qkv:
        return result
    qkv_timing = timings[QKV]
    if matmul_timing is not None:
        result.fraction_of_matmul = paired_fraction_of_matmul(qkv_timing, case.flops, matmul_timing, config.matmul_n)
    # Each reference is paired with qkv at its own thread count ("sdpa_1t" with "qkv_1t").
    result.speedups = {
        n: paired_speedup(t, timings[QKV + ONE_THREAD_SUFFIX if split_thread_suffix(n)[1] else QKV])
        for n, t in timings.items() if not is_qkv_side(n)
    }
    result.thread_scaling = {
        n: paired_speedup(timings[n + ONE_THREAD_SUFFIX], t)
        for n, t in timings.items() if n + ONE_THREAD_SUFFIX in timings
    }
    if matmul_one_thread is not None and matmul_timing is not None:
        result.thread_scaling[MATMUL] = paired_speedup(matmul_one_thread, matmul_timing)

    # Thread-scaling cases are timed only: they answer how time falls with threads, not memory.
    if config.memory and not case.scaling_threads:
        bar.set_postfix_str("memory")
        for name, side_obj in runnable.items():
            memory = _measure_memory(case, name, side_obj, config)
            result.sides[name].peak_bytes = memory.peak_bytes
            result.sides[name].memory_message = memory.error or memory.method
            if memory.error:
                log(f"note: {case.name}: peak memory of {name} not measured: {memory.error}")
        qkv_peak = result.sides[QKV].peak_bytes
        for name in runnable:
            peak = result.sides[name].peak_bytes
            if name != QKV and peak is not None and qkv_peak and max(peak, qkv_peak) >= MIN_MEMORY_FOR_RATIO:
                result.memory_ratios[name] = peak / qkv_peak
    return result


def _check(case: Case, inputs, sides: dict[str, Side | Exception], config: RunConfig, result: CaseResult
           ) -> tuple[dict[str, Side], dict[str, float]]:
    """Run every side once (their warm-up), compare with the reference, and return the sides fit
    to time with the seconds their full-size call took. Sets result.status to "wrong" or
    "error" when qkv fails or the check itself is inconsistent."""
    device, timer = config.device, timer_for(config.device)
    if case.feature:
        from .feature_workloads import feature_reference

        reference = feature_reference(case, inputs)
        check_sides, prepare = sides, None
    elif case.level == "core":
        reference = correctness.core_reference(case, inputs, device)
        check_sides, prepare = sides, correctness.sliced_core_result
    else:
        check_case = replace(case, batch=1)
        check_inputs = correctness.module_check_inputs(inputs)
        reference = correctness.module_reference(check_case, check_inputs, device, config.seed)
        check_sides = make_sides(check_case, check_inputs, tuple(sides), device, config.dtype, config.seed)
        prepare = lambda out: out  # noqa: E731

    errors: dict[str, float] = {}
    first_call_s: dict[str, float] = {}
    for name, side in check_sides.items():
        record = result.sides[name]
        try:
            if isinstance(side, Exception):
                raise side
            first_call_s[name], output = timer.call(side)
            if case.feature:  # each side's own layout onto the checked slice; yardsticks are not checked
                if side.canonical is None:
                    del output
                    continue
                output = side.canonical(output)
            else:
                output = prepare(output)
            errors[name] = correctness.relative_error(output, reference)
            del output
        except Exception as exc:  # noqa: BLE001 - recorded per side
            record.status, record.message = "error", f"{type(exc).__name__}: {exc}".strip()
            continue
        record.max_error = errors[name]
        if not math.isfinite(errors[name]):
            record.status, record.message = "wrong", "non-finite values"

    qkv_record = result.sides[QKV]
    for name, record in result.sides.items():
        if is_qkv_side(name) and record.status == "error":
            result.status, result.message = "error", f"{case.name}: {name} raised {record.message}"
            return {}, {}
    verdict = correctness.judge(case, errors, config.dtype)
    if not verdict.passed:
        if verdict.consistent:
            qkv_record.status = "wrong"
        result.status = "wrong" if verdict.consistent else "error"
        result.message = verdict.message
        return {}, {}

    runnable = {n: s for n, s in sides.items() if result.sides[n].status == "ok" and not isinstance(s, Exception)}
    if case.level == "module":
        # The check ran on a batch slice; the full-size warm-up call doubles as the estimate.
        first_call_s = {name: timer.call(side)[0] for name, side in runnable.items()}
    return runnable, first_call_s


def _measure_memory(case: Case, name: str, side: Side, config: RunConfig) -> MemoryResult:
    try:
        if config.device == "cuda":
            return measure_cuda(side)
        return measure_in_child(case, name, config.device, config.dtype, config.threads, config.seed)
    except Exception as exc:  # noqa: BLE001 - a missing number is reported, not fatal
        return MemoryResult(None, "", f"{type(exc).__name__}: {exc}")
