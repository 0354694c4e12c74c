#!/usr/bin/env python3
"""Times qkv's decode forward (one new token over a long KV cache) against SDPA on a GPU, in one
process: issue 15's decode target (L = 1, S = 4096-16384, batch 1-32: at least 1.0x SDPA).

    PYTHONPATH=python python3 scripts/cuda_decode_bench.py              # ~15 s on an H100
    PYTHONPATH=python python3 scripts/cuda_decode_bench.py --lengths 16384 --batches 1 --splits 8,16,32

Sides, all on the same bfloat16 inputs (q (B, H, 1, D), k/v (B, Hk, S, D) contiguous):
  default  qkv.attention with QKV_CUDA_DECODE unset: what ships (fa2 for MHA, generic for GQA)
  generic  QKV_CUDA_KERNEL=generic: the generic forward
  split    QKV_CUDA_DECODE=split-required: the split-KV decode forward, split count by the heuristic
  split:N  the same with QKV_DECODE_SPLITS=N (--splits)
  sdpa     F.scaled_dot_product_attention, its default backend (enable_gqa for grouped heads)
Rounds are interleaved (A B C ..., then reversed), each side timed over blocks of calls with CUDA
events; a side's time is its median. Before timing, each qkv side's output is compared with SDPA's
("err": max |qkv - sdpa| / max |sdpa|; BAD above 2e-2). Each row is printed as soon as it is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_tune import environment  # noqa: E402  (the same environment switch as the tuning script)

DEVICE = "cuda"  # tests/test_cuda_decode_bench_script.py runs the logic on the CPU


def qkv_side(q, k, v, **env):
    def run():
        with environment(**env):
            return torch.ops.qkv.attention(q, k, v, None, 0.0, False)[0]
    return run


def sdpa_side(q, k, v):
    gqa = q.shape[1] != k.shape[1]
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa) if gqa else \
        F.scaled_dot_product_attention(q, k, v)


def time_sides(sides, rounds, block_s=0.02):
    """Median ms per call of each side (name -> run), interleaved rounds."""
    def block(run, inner):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner

    inner = {}
    for name, run in sides.items():  # warm-up, then size the blocks
        run()
        t = block(run, 1)
        inner[name] = max(1, min(200, int(block_s / max(t * 1e-3, 1e-6))))
    samples = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name].append(block(sides[name], inner[name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def relative_error(got, want):
    scale = want.float().abs().max().item() or 1.0
    return (got.float() - want.float()).abs().max().item() / scale


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--batches", default="1,4,32")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--gqa-kv-heads", type=int, default=4, help="key/value heads of the GQA cases (0: none)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--splits", default="", help="extra split:N sides, e.g. 8,16,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "cuda_decode_bench.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("cuda_decode_bench: no CUDA device")
    import qkv  # noqa: F401  (registers torch.ops.qkv)

    dtype = torch.bfloat16
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    extra = [int(x) for x in args.splits.split(",") if x]
    kv_heads = [args.heads] + ([args.gqa_kv_heads] if args.gqa_kv_heads else [])
    device = torch.cuda.get_device_name()
    print(f"cuda_decode_bench: {device}, torch {torch.__version__}, bfloat16, H={args.heads}, D={args.dim}, L=1",
          flush=True)
    print("| case | side | us | x sdpa | x default | err |\n| --- | --- | ---: | ---: | ---: | ---: |", flush=True)
    rows = []
    for hk in kv_heads:
        for s in lengths:
            for b in batches:
                case = f"B{b}-S{s}" + (f"-gqa{args.heads // hk}" if hk != args.heads else "")
                torch.manual_seed(b * 131 + s + hk)  # drawn on the device: gigabytes at B 32
                q, k, v = (torch.randn(b, h, n, args.dim, device=DEVICE, dtype=dtype)
                           for h, n in ((args.heads, 1), (hk, s), (hk, s)))
                auto = dict(QKV_CUDA_KERNEL=None)  # whatever the caller's environment says
                sides = {"default": qkv_side(q, k, v, **auto, QKV_CUDA_DECODE=None, QKV_DECODE_SPLITS=None),
                         "generic": qkv_side(q, k, v, QKV_CUDA_KERNEL="generic", QKV_CUDA_DECODE=None),
                         "split": qkv_side(q, k, v, **auto, QKV_CUDA_DECODE="split-required",
                                           QKV_DECODE_SPLITS=None)}
                for n in extra:
                    sides[f"split:{n}"] = qkv_side(q, k, v, **auto, QKV_CUDA_DECODE="split-required",
                                                   QKV_DECODE_SPLITS=str(n))
                sides["sdpa"] = sdpa_side(q, k, v)
                want = sides["sdpa"]()
                errors, kept = {}, {}
                for name, run in sides.items():
                    try:
                        errors[name] = None if name == "sdpa" else relative_error(run(), want)
                        kept[name] = run
                    except RuntimeError as e:
                        print(f"  {case}: {name} dropped: {str(e).splitlines()[0][:120]}", flush=True)
                times = time_sides(kept, args.rounds)
                for name, ms in times.items():
                    err = errors[name]
                    row = dict(case=case, b=b, s=s, heads=args.heads, kv_heads=hk, side=name, us=ms * 1e3,
                               x_sdpa=times["sdpa"] / ms, x_default=times["default"] / ms if "default" in times
                               else None, err=err)
                    rows.append(row)
                    err_s = "-" if err is None else f"{err:.1e}" + (" BAD" if err > 2e-2 else "")
                    x_def = "-" if row["x_default"] is None else f"{row['x_default']:.2f}"
                    print(f"| {case} | {name} | {row['us']:.1f} | {row['x_sdpa']:.2f} | {x_def} | {err_s} |",
                          flush=True)
                with open(args.json, "w") as f:
                    json.dump(dict(device=device, torch=torch.__version__, rows=rows), f, indent=1)
                del q, k, v, want
    # The target: split (heuristic) at least 1.0x SDPA on every case.
    split_rows = [r for r in rows if r["side"] == "split"]
    if split_rows:
        worst = min(split_rows, key=lambda r: r["x_sdpa"])
        print(f"split vs sdpa: min {worst['x_sdpa']:.2f}x ({worst['case']}), "
              f"geomean {statistics.geometric_mean([r['x_sdpa'] for r in split_rows]):.2f}x over {len(split_rows)} cases",
              flush=True)


if __name__ == "__main__":
    main()
