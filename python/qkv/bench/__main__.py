"""``python -m qkv.bench``: how much faster and leaner qkv is than torch, at which shapes.

Run ``python -m qkv.bench --help`` for the options; docs/benchmarks.md explains the output.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .cases import FEATURES_GROUP, TARGETS_GROUP, default_grid, extra_cases, group_aliases, select_cases
from .machine import available_cores, machine_slug
from .report import FEATURES_META, TARGETS_META, format_terminal, write_all
from .runner import RunConfig, run_cases
from .timing import TimingConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m qkv.bench",
        description="Compare qkv's attention with PyTorch's: speed (interleaved, medians, ratios), "
        "peak memory (one child process per side), correctness against a float64 reference.",
    )
    parser.add_argument("--quick", action="store_true", help="a representative subset, fewer repeats (under a minute on CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (default) or cuda (GPU grid)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for every side (default: all available cores)")
    parser.add_argument("--cases", help="comma list of case names, globs, groups or levels (see --list); "
                        "'targets' = issue 4's CPU targets, 'features' = issue 17's (neither in the default run)")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<machine>)")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--repeats", type=int, help="timing rounds per case (default: adaptive, 5-9; quick: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for inputs and weights (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def timing_config(quick: bool, repeats: int | None) -> TimingConfig:
    config = TimingConfig(block_s=0.01, min_repeats=3, max_repeats=3, case_budget_s=0.5) if quick else TimingConfig()
    if repeats is not None:
        config.min_repeats = config.max_repeats = repeats
    return config


def wants_targets(selection: str | None, group: str = TARGETS_GROUP) -> bool:
    """Whether --cases asked for a targets group (then the outputs end with its table)."""
    return group in [t.strip() for t in (selection or "").split(",")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be >= 1; got {args.threads}", file=sys.stderr)
        return 2
    if args.repeats is not None and args.repeats < 1:
        print(f"error: --repeats must be >= 1; got {args.repeats}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    threads = args.threads or available_cores()
    try:
        cases = select_cases(default_grid(args.device, args.quick), args.cases,
                             extra=extra_cases(args.device, args.quick), aliases=group_aliases(args.device))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for case in cases:
            print(f"{case.name:28s} {case.level:7s} {case.mode:14s} {case.shape}"
                  + (" causal" if case.causal else "") + (" key-padding" if case.key_padding else "")
                  + (f" threads 1 vs {case.scaling_threads}" if case.scaling_threads else ""))
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
        print(f"error: --device cuda needs a CUDA GPU, but torch.cuda.is_available() is False ({build}).",
              file=sys.stderr)
        return 2

    import qkv  # noqa: F401  (registers torch.ops.qkv before anything is built)

    config = RunConfig(
        device=args.device, dtype=dtype, threads=threads, seed=args.seed, memory=not args.no_memory,
        timing=timing_config(args.quick, args.repeats), matmul_n=1536,
    )
    if args.device == "cuda":
        config.matmul_n = 8192
    print(f"qkv.bench: {len(cases)} case(s) on {args.device}, {str(dtype).removeprefix('torch.')}, "
          f"{threads} thread(s)", file=sys.stderr)
    run = run_cases(cases, config, progress=not args.no_progress)
    run.meta[TARGETS_META] = wants_targets(args.cases)
    run.meta[FEATURES_META] = wants_targets(args.cases, FEATURES_GROUP)
    out_dir = args.out or Path("benchmarks") / "results" / machine_slug(args.device, threads)
    written = write_all(run, out_dir, plots=not args.no_plots)
    print(format_terminal(run))
    print("\nwrote " + ", ".join(str(p) for p in written.values()))
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
