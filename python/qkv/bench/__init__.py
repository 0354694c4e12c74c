"""qkv.bench: the comparison to read before adopting qkv.

``python -m qkv.bench`` (or ``make bench``) times qkv's attention against PyTorch's on a grid of
shapes, interleaved in one process, measures each side's peak memory in its own child process,
checks every result against a float64 reference first, and writes a table, CSV, JSON, markdown
and plots to benchmarks/results/<machine>/. See docs/benchmarks.md.

Modules: cases (the grid), flops (standard FLOP counts), workloads (inputs and timed calls),
correctness, timing, memory, machine, runner, report, plots.
"""
from .cases import Case, cpu_grid, cuda_grid, default_grid, select_cases
from .flops import attention_flops
from .runner import RunConfig, RunResult, run_cases

__all__ = ["Case", "RunConfig", "RunResult", "attention_flops", "cpu_grid", "cuda_grid", "default_grid",
           "run_cases", "select_cases"]
