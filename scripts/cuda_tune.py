#!/usr/bin/env python3
"""Times the fa2 CUDA kernels' tile choices against qkv's mma kernels and SDPA's flash and cuDNN
backends on the GPU grid, in one process, so that a GPU session picks the fa2 tiles in one call.

Build first with the tuning tiles compiled in (they are off in normal builds, for build time):

    NVCC_APPEND_FLAGS=-DQKV_FA2_TUNING QKV_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \\
        python3 setup.py build_ext --inplace
    PYTHONPATH=python python3 scripts/cuda_tune.py            # the whole grid, ~3 minutes on an H100
    PYTHONPATH=python python3 scripts/cuda_tune.py --dims 128 --lengths 4096 --modes fwd

The grid is the benchmark's (`python -m qkv.bench --device cuda`): B * L = 16k tokens, H * D =
2048, bfloat16, causal and not. Every side of a case runs on the same inputs, in interleaved rounds
(A B C ..., then reversed), timed with CUDA events; a side's time is its median over rounds.
Before timing, every qkv side's output (and gradients) is compared with the flash backend's: the
"err" column is max |qkv - flash| / max |flash| over out (and dq, dk, dv), so a tile that computes
garbage shows up instead of winning. FLOP counts follow FlashAttention (forward 4 B H L S D, halved
when causal; backward 2.5x forward). Tiles that this build lacks are listed and skipped.

Sides: "fa2:<fwd tile>" (forward), "fa2:<fwd tile>/<bwd tile>" (forward + backward), "fa2-det"
(the default tiles with torch.use_deterministic_algorithms on: the fixed dQ order), "mma" (D 64
and 128), "flash", "cudnn", and with --sm90 "sm90" (D 64 and 128: the opt-in Hopper forward,
QKV_CUDA_KERNEL=sm90, whose backward is auto's; dropped with a note on other GPUs).
--default-tiles times only each head dim's default fa2 tiles (a short run). The last table ranks the tiles per head dim by the geometric mean of
their speed over the flash backend.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

# Must match csrc/cuda/fa2_tiles.cuh: the default tile first (for D = 256 the default depends on the
# GPU: 64x64x4 where a multiprocessor holds two 96 KB blocks, as on H100).
FORWARD_TILES = {64: ["128x128x4", "128x64x4", "64x64x4"], 96: ["128x64x4", "64x64x4"],
                 128: ["128x64x4", "128x32x4", "64x64x4", "128x128x8"], 256: ["64x64x4", "128x64x8"]}
BACKWARD_TILES = {64: ["128x128x8", "64x128x8"], 96: ["64x128x8"], 128: ["64x128x8", "64x64x4"], 256: ["64x64x8"]}
TOKENS, HIDDEN = 16 * 1024, 2048
DEVICE = "cuda"  # tests/test_cuda_tune_script.py runs the script's logic on the CPU


@contextlib.contextmanager
def environment(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def deterministic(on: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def flops(b, h, l, d, causal, mode):
    forward = 4.0 * b * h * l * l * d / (2 if causal else 1)
    return forward * (1.0 if mode == "fwd" else 3.5)


class Side:
    """One way of computing a case: `run()` does one timed call and returns the tensors to check."""

    def __init__(self, name, forward, context, inputs, mode):
        self.name, self.forward, self.context, self.mode = name, forward, context, mode
        self.q, self.k, self.v, self.dout = inputs

    def run(self):
        with self.context():
            out = self.forward()
            if self.mode == "fwd":
                return [out]
            return [out, *torch.autograd.grad(out, (self.q, self.k, self.v), self.dout)]


def qkv_side(name, inputs, mode, causal, kernel, fwd_tile=None, bwd_tile=None, det=False):
    q, k, v, _ = inputs

    def forward():
        return torch.ops.qkv.attention(q, k, v, None, 0.0, causal)[0]

    def context():
        stack = contextlib.ExitStack()
        stack.enter_context(environment(QKV_CUDA_KERNEL=kernel, QKV_FA2_FORWARD_TILE=fwd_tile,
                                        QKV_FA2_BACKWARD_TILE=bwd_tile))
        stack.enter_context(deterministic(det))
        return stack
    return Side(name, forward, context, inputs, mode)


def sdpa_side(name, inputs, mode, causal, backend):
    from torch.nn.attention import sdpa_kernel
    q, k, v, _ = inputs
    return Side(name, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                lambda: sdpa_kernel(backend), inputs, mode)


def time_sides(sides, rounds, block_s=0.025):
    """Median ms per call of each side, interleaved rounds (order reversed every other round)."""
    def block(side, inner):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            side.run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner

    inner = {}
    for s in sides:  # warm-up, then size the blocks
        s.run()
        t = block(s, 1)
        inner[s.name] = max(1, min(50, int(block_s / max(t * 1e-3, 1e-6))))
    samples = {s.name: [] for s in sides}
    for r in range(rounds):
        for s in (sides if r % 2 == 0 else sides[::-1]):
            samples[s.name].append(block(s, inner[s.name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def relative_error(got, want):
    worst = 0.0
    for g, w in zip(got, want):
        scale = w.float().abs().max().item() or 1.0
        worst = max(worst, (g.float() - w.float()).abs().max().item() / scale)
    return worst


def available_tiles(d, dtype):
    """The tiles of this build (a tiny call per tile; a missing one raises 'is not a ... tile')."""
    q = torch.randn(1, 1, 64, d, device=DEVICE, dtype=dtype, requires_grad=True)
    fwd, bwd = [], []
    for tile in FORWARD_TILES[d]:
        try:
            with environment(QKV_CUDA_KERNEL="fa2", QKV_FA2_FORWARD_TILE=tile):
                torch.ops.qkv.attention(q, q, q)
            fwd.append(tile)
        except RuntimeError as e:
            if "is not a forward tile" not in str(e):
                raise
    for tile in BACKWARD_TILES[d]:
        try:
            with environment(QKV_CUDA_KERNEL="fa2", QKV_FA2_BACKWARD_TILE=tile):
                out = torch.ops.qkv.attention(q, q, q)[0]
                torch.autograd.grad(out, q, torch.ones_like(out))
            bwd.append(tile)
        except RuntimeError as e:
            if "is not a backward tile" not in str(e):
                raise
    return fwd, bwd


def matmul_ceiling(dtype, n=8192):
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 2.0 * n**3 / (start.elapsed_time(end) / 10 * 1e-3) / 1e12


TABLE_HEADER = "| case | side | ms | TFLOP/s | % mm | x flash | x cudnn | err |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"


def table_row(r, mm):
    err = "-" if r["err"] is None else f"{r['err']:.1e}" + (" BAD" if r["err"] > 2e-2 else "")
    x_cudnn = "-" if r["x_cudnn"] is None else f"{r['x_cudnn']:.2f}"
    return (f"| {r['case']} | {r['side']} | {r['ms']:.3f} | {r['tflops']:.0f} | {100 * r['tflops'] / mm:.0f}% | "
            f"{r['x_flash']:.2f} | {x_cudnn} | {err} |")


def save(path, device, dtype, mm, rows):
    with open(path, "w") as f:
        json.dump(dict(device=device, torch=torch.__version__, dtype=dtype, matmul_tflops=mm, rows=rows), f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="64,96,128,256")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--modes", default="fwd,fwdbwd")
    parser.add_argument("--causal", default="0,1", help="0 (full), 1 (causal) or both")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-mma", action="store_true", help="skip qkv's mma kernels (slow at long L)")
    parser.add_argument("--sm90", action="store_true", help="add the sm90 (Hopper) forward, D 64 and 128")
    parser.add_argument("--default-tiles", action="store_true", help="only the default fa2 tiles")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="B * L of every case")
    parser.add_argument("--matmul-n", type=int, default=8192, help="size of the matmul ceiling probe")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "cuda_tune.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("cuda_tune: no CUDA device")
    import qkv  # noqa: F401  (registers torch.ops.qkv)
    from torch.nn.attention import SDPBackend

    dtype = getattr(torch, args.dtype)
    dims = [int(x) for x in args.dims.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    modes = args.modes.split(",")
    causals = [bool(int(x)) for x in args.causal.split(",")]
    device = torch.cuda.get_device_name()
    mm = matmul_ceiling(dtype, args.matmul_n)
    print(f"cuda_tune: {device}, torch {torch.__version__}, {args.dtype}, matmul ceiling {mm:.0f} TFLOP/s")
    tiles = {}
    for d in dims:
        tiles[d] = available_tiles(d, dtype)
        if args.default_tiles:
            tiles[d] = tuple(found[:1] for found in tiles[d])
        missing = [t for t in FORWARD_TILES[d] if t not in tiles[d][0]] + \
                  [t for t in BACKWARD_TILES[d] if t not in tiles[d][1]]
        print(f"  D={d}: forward tiles {tiles[d][0]}, backward tiles {tiles[d][1]}"
              + (f"; not in this build: {missing}" if missing else ""))

    rows = []
    for d in dims:
        h = HIDDEN // d
        for l in lengths:
            b = max(1, args.tokens // l)
            for causal in causals:
                gen = torch.Generator().manual_seed(d * 7 + l)
                inputs = [torch.randn(b, h, l, d, generator=gen).to(DEVICE, dtype).requires_grad_(i < 3)
                          for i in range(4)]
                for mode in modes:
                    fwd_tiles, bwd_tiles = tiles[d]
                    sides = [sdpa_side("flash", inputs, mode, causal, SDPBackend.FLASH_ATTENTION),
                             sdpa_side("cudnn", inputs, mode, causal, SDPBackend.CUDNN_ATTENTION)]
                    if mode == "fwd":
                        sides += [qkv_side(f"fa2:{t}", inputs, mode, causal, "fa2", fwd_tile=t) for t in fwd_tiles]
                    else:
                        default_fwd = fwd_tiles[0] if fwd_tiles else None
                        sides += [qkv_side(f"fa2:{default_fwd}/{t}", inputs, mode, causal, "fa2", default_fwd, t)
                                  for t in bwd_tiles]
                        if bwd_tiles:
                            sides.append(qkv_side("fa2-det", inputs, mode, causal, "fa2", default_fwd, bwd_tiles[0],
                                                  det=True))
                    if d in (64, 128) and not args.no_mma:
                        sides.append(qkv_side("mma", inputs, mode, causal, "mma"))
                    if d in (64, 128) and args.sm90:
                        sides.append(qkv_side("sm90", inputs, mode, causal, "sm90"))
                    case = f"d{d}-L{l}{'-causal' if causal else ''}-{mode}"
                    # Every side once: the flash backend is the reference; a side that raises (a
                    # backend that refuses the shape, out of memory) is dropped with a note.
                    results, kept = {}, []
                    for s in sides:
                        try:
                            results[s.name] = s.run()
                            kept.append(s)
                        except RuntimeError as e:
                            print(f"  {case}: {s.name} dropped: {str(e).splitlines()[0][:120]}")
                    if "flash" not in results:
                        continue
                    errors = {s.name: relative_error(results[s.name], results["flash"]) for s in kept
                              if s.name not in ("flash", "cudnn")}
                    del results
                    try:
                        times = time_sides(kept, args.rounds)
                    except RuntimeError as e:
                        print(f"  {case}: timing failed: {str(e).splitlines()[0][:120]}")
                        continue
                    work = flops(b, h, l, d, causal, mode)
                    for s in kept:
                        ms = times[s.name]
                        rows.append(dict(case=case, d=d, l=l, causal=causal, mode=mode, side=s.name, ms=ms,
                                         tflops=work / (ms * 1e-3) / 1e12, x_flash=times["flash"] / ms,
                                         x_cudnn=times["cudnn"] / ms if "cudnn" in times else None,
                                         err=errors.get(s.name)))
                        # Each row as soon as it is timed, and the file rewritten after every case:
                        # a run cut short by the lease keeps what it measured.
                        print(table_row(rows[-1], mm), flush=True)
                    save(args.json, device, args.dtype, mm, rows)
                    torch.cuda.empty_cache()
                print(f"  done d{d}-L{l}{'-causal' if causal else ''}", flush=True)

    save(args.json, device, args.dtype, mm, rows)
    print(f"\n{TABLE_HEADER}")
    for r in rows:
        print(table_row(r, mm))
    # Ranking: per head dim and mode, geometric mean over the cases of each qkv side's x flash.
    print("\n| D | mode | side | geomean x flash | min x flash | geomean x cudnn | cases |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for d in dims:
        for mode in modes:
            by_side = {}
            for r in rows:
                if r["d"] == d and r["mode"] == mode and r["side"] not in ("flash", "cudnn"):
                    by_side.setdefault(r["side"], []).append(r)
            ranked = sorted(by_side.items(), key=lambda kv: -statistics.geometric_mean([x["x_flash"] for x in kv[1]]))
            for side, rs in ranked:
                cudnn = [x["x_cudnn"] for x in rs if x["x_cudnn"] is not None]
                print(f"| {d} | {mode} | {side} | {statistics.geometric_mean([x['x_flash'] for x in rs]):.2f} | "
                      f"{min(x['x_flash'] for x in rs):.2f} | "
                      f"{statistics.geometric_mean(cudnn) if cudnn else float('nan'):.2f} | {len(rs)} |")
    print(f"\nfull results: {args.json}")


if __name__ == "__main__":
    main()
