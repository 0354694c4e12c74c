"""Interleaved timing: the sides of a case alternate on the same inputs, so machine drift
(other jobs, frequency changes) hits all of them alike and their ratio holds.

Each side is timed in blocks of ``inner`` calls long enough for the clock (and, on a GPU, launch
overhead) not to matter; rounds run the sides in alternating order (A B C, C B A, A B C ...), and
each side's time is the median over rounds. Speedups are medians of per-round ratios: each round
pairs samples taken seconds apart, which cancels slow drift better than a ratio of medians.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .flops import matmul_flops
from .workloads import Side


@dataclass
class TimingConfig:
    block_s: float = 0.02  # aim for blocks of at least this long
    min_repeats: int = 3
    max_repeats: int = 7
    case_budget_s: float = 2.5  # rounds are cut to fit this, but never below min_repeats


@dataclass
class SideTiming:
    inner: int
    samples: list[float] = field(default_factory=list)  # seconds per call, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median over rounds: a quick noise indicator."""
        return (max(self.samples) - min(self.samples)) / self.median if self.samples else math.nan


class Timer:
    """Wall-clock timing of calls; the CUDA subclass uses events and synchronises."""

    def call(self, side: Side) -> tuple[float, dict]:
        """Seconds of one call, and its result (used for the correctness check)."""
        with side.context():
            start = time.perf_counter()
            result = side.compute()
            return time.perf_counter() - start, result

    def block(self, side: Side, inner: int) -> float:
        """Seconds of ``inner`` back-to-back calls."""
        with side.context():
            start = time.perf_counter()
            for _ in range(inner):
                side.compute()
            return time.perf_counter() - start


    def release(self) -> None:
        """After a failed call: nothing to hand back on the CPU."""


class CudaTimer(Timer):
    def call(self, side: Side) -> tuple[float, dict]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with side.context():
            torch.cuda.synchronize()
            start.record()
            result = side.compute()
            end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, result

    def block(self, side: Side, inner: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with side.context():
            torch.cuda.synchronize()
            start.record()
            for _ in range(inner):
                side.compute()
            end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


    def release(self) -> None:
        """After a failed call (often out of memory): hand cached blocks back to the device."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def timer_for(device: str) -> Timer:
    return CudaTimer() if device == "cuda" else Timer()


def time_interleaved(
    sides: Sequence[Side], timer: Timer, config: TimingConfig, estimates: dict[str, float] | None = None,
    failures: dict[str, str] | None = None,
) -> dict[str, SideTiming]:
    """Median seconds per call for each side, the sides alternating round by round.

    Every side must already have run once (the warm-up: the correctness check). ``estimates``
    are the seconds those calls took; they size the blocks and the number of rounds (a first
    call is slow, so blocks err on the short side). Sides without an estimate get one
    calibration call.

    A side that raises (out of memory, or anything else) leaves the rounds; the others go on.
    It is missing from the result, and ``failures`` (when given) maps its name to the reason.
    """
    estimates = dict(estimates or {})
    failed = {} if failures is None else failures

    def attempt(side: Side, inner: int) -> float | None:
        try:
            return timer.block(side, inner)
        except Exception as exc:  # noqa: BLE001 - costs this side only
            failed[side.name] = f"timing failed: {type(exc).__name__}: {exc}".strip()
        timer.release()  # the exception (and the tensors its frames held) is gone by now
        return None

    for side in sides:
        if side.name not in estimates:
            seconds = attempt(side, 1)
            if seconds is not None:
                estimates[side.name] = seconds
    order = [s for s in sides if s.name not in failed]
    single = {s.name: max(estimates[s.name], 1e-7) for s in order}
    timings = {s.name: SideTiming(inner=max(1, math.ceil(config.block_s / single[s.name]))) for s in order}
    round_s = sum(timings[n].inner * single[n] for n in single)
    repeats = int(min(config.max_repeats, max(config.min_repeats, config.case_budget_s // max(round_s, 1e-9))))
    for r in range(repeats):
        for side in order if r % 2 == 0 else reversed(order):
            if side.name in failed:
                continue
            t = timings[side.name]
            seconds = attempt(side, t.inner)
            if seconds is not None:
                t.samples.append(seconds / t.inner)
    return {name: t for name, t in timings.items() if name not in failed}


def paired_speedup(reference: SideTiming, candidate: SideTiming) -> float:
    """Median over rounds of reference_time / candidate_time (> 1: the candidate is faster)."""
    ratios = [r / c for r, c in zip(reference.samples, candidate.samples) if c > 0]
    return statistics.median(ratios) if ratios else math.nan


MATMUL = "matmul"


def make_matmul_side(device: str, dtype: torch.dtype, n: int) -> Side:
    """One n x n x n torch.mm: the machine's practical ceiling for attention's matmuls."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    return Side(MATMUL, lambda: {"out": torch.mm(a, b)}, keep=[a, b])


def matmul_rate(device: str, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of a large square torch.mm over a few calls (the ceiling is what the machine
    can do, so the best, not the median)."""
    side = make_matmul_side(device, dtype, n)
    timer = timer_for(device)
    timer.block(side, 1)  # warm-up
    best = min(timer.block(side, 1) for _ in range(repeats))
    return matmul_flops(n) / best


def paired_fraction_of_matmul(candidate: SideTiming, candidate_flops: float, matmul: SideTiming, n: int) -> float:
    """Median over rounds of (candidate FLOP/s) / (matmul FLOP/s), both timed in the same round,
    so a slow spell on a shared machine cancels out as it does in the speedups."""
    ratios = [
        (candidate_flops / c) / (matmul_flops(n) / m)
        for c, m in zip(candidate.samples, matmul.samples) if c > 0 and m > 0
    ]
    return statistics.median(ratios) if ratios else math.nan
