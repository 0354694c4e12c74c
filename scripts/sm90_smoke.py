#!/usr/bin/env python3
"""The sm90 (Hopper) forward on a few small cases, one line each: the first look of a GPU session
at a kernel that has not run on a GPU before (scripts/gpu_lease.sh's sm90 step runs each case in a
process of its own under a time limit, so a hang names its case; compute-sanitizer runs two).

    PYTHONPATH=python python3 scripts/sm90_smoke.py              # every case
    PYTHONPATH=python python3 scripts/sm90_smoke.py --case 2     # one case (exit 1 when it is wrong)
    PYTHONPATH=python python3 scripts/sm90_smoke.py --list       # the number of cases

Each case runs QKV_CUDA_KERNEL=sm90 and fa2 on the same inputs and compares both with a float64
reference: the largest error and where it is, the first element off by more than the tolerance,
which query rows (128-row blocks, 64-row warpgroup halves) and columns are off, and the logsumexp.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

# (dtype, D, B, H, Hk, L, S, causal, bottom_right)
CASES = [
    ("bfloat16", 64, 1, 1, 1, 128, 128, False, False),   # one block, one key tile
    ("bfloat16", 128, 1, 1, 1, 128, 128, False, False),  # one block, two key tiles
    ("float16", 64, 2, 4, 2, 77, 300, True, True),       # ragged tiles, grouped heads, bottom-right
    ("float16", 128, 1, 2, 2, 300, 77, True, True),      # rows and whole blocks that see no key
    ("bfloat16", 128, 2, 3, 3, 1000, 1000, True, False),  # many blocks and key tiles, causal
    ("bfloat16", 64, 1, 2, 2, 1, 1, False, False),       # one query, one key
]


def inputs(case, seed=0):
    dtype, D, B, H, Hk, L, S, _, _ = case
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    # (B, L, H, D) memory, as after a projection
    q = torch.randn(B, L, H, D, generator=g).to(dt).cuda().transpose(1, 2)
    k = torch.randn(B, S, Hk, D, generator=g).to(dt).cuda().transpose(1, 2)
    v = torch.randn(B, S, Hk, D, generator=g).to(dt).cuda().transpose(1, 2)
    return q, k, v


def reference(q, k, v, causal, bottom_right):
    """float64 (out, lse); rows that see no key: out 0, lse -inf."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    L, S = s.shape[-2:]
    if causal:
        offset = S - L if bottom_right else 0
        hidden = torch.arange(S, device=s.device)[None, :] > torch.arange(L, device=s.device)[:, None] + offset
        s = s.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    return p @ v, lse


def describe(name, got, want, atol):
    got, want = got.double().cpu(), want.double().cpu()
    same_inf = torch.isinf(got) & torch.isinf(want) & (got.sign() == want.sign())
    diff = torch.where(same_inf, torch.zeros_like(got), (got - want).abs()).nan_to_num(nan=float("inf"))
    worst = int(diff.argmax())
    at = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    lines = [f"    {name}: max error {diff.flatten()[worst]:.4g} at {at}: got {got[at]:.6g}, want {want[at]:.6g}; "
             f"non-finite {int((~torch.isfinite(got)).sum())} (want {int((~torch.isfinite(want)).sum())})"]
    bad = (diff > atol).nonzero()
    if len(bad):
        first = tuple(int(i) for i in bad[0])
        rows = bad[:, 2]
        lines.append(f"    {len(bad)} of {diff.numel()} off by > {atol:.3g}, first at {first}: got {got[first]:.6g}, "
                     f"want {want[first]:.6g}; rows {int(rows.min())}..{int(rows.max())}, blocks "
                     f"{sorted(set((rows // 128).tolist()))[:10]}, warpgroup halves {sorted(set(((rows % 128) // 64).tolist()))}"
                     + (f", columns mod 8 {sorted(set((bad[:, 3] % 8).tolist()))}" if bad.shape[1] > 3 else ""))
    return "\n".join(lines)


def run_case(index):
    import qkv  # noqa: F401  (registers torch.ops.qkv)

    case = CASES[index]
    dtype, D, B, H, Hk, L, S, causal, bottom_right = case
    q, k, v = inputs(case, seed=index)
    os.environ["QKV_CUDA_KERNEL"] = "sm90"
    out, lse = torch.ops.qkv.attention(q, k, v, None, 0.0, causal, bottom_right)
    torch.cuda.synchronize()
    group = H // Hk
    os.environ["QKV_CUDA_KERNEL"] = "fa2"  # fa2 takes materialised heads
    out_fa2, _ = torch.ops.qkv.attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), None, 0.0,
                                         causal, bottom_right)
    ref, ref_lse = reference(q, k, v, causal, bottom_right)
    err = (out.double() - ref).abs().max().item()
    err_fa2 = (out_fa2.double() - ref).abs().max().item()
    finite = torch.isfinite(ref_lse)
    lse_ok = torch.equal(torch.isfinite(lse), finite)
    lse_err = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
    tol = 2 * err_fa2 + (2e-3 if dtype == "float16" else 1e-2)
    ok = bool(torch.isfinite(out).all()) and err <= tol and lse_ok and lse_err <= 1e-3
    print(f"case {index} {dtype} D{D} B{B} H{H} Hk{Hk} L{L} S{S} causal={causal} bottom_right={bottom_right}: "
          f"out max err {err:.3g} (fa2 {err_fa2:.3g}), lse max err {lse_err:.3g}, lse -inf rows "
          f"{'match' if lse_ok else 'DIFFER'}: {'OK' if ok else 'WRONG'}", flush=True)
    if not ok:
        print(describe("out", out, ref, tol))
        print(describe("lse", lse, ref_lse, 1e-3))
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=int, help="run only this case")
    parser.add_argument("--list", action="store_true", help="print the number of cases")
    args = parser.parse_args(argv)
    if args.list:
        print(len(CASES))
        return 0
    if not torch.cuda.is_available():
        sys.exit("sm90_smoke: no CUDA device")
    indices = [args.case] if args.case is not None else range(len(CASES))
    return 0 if all([run_case(i) for i in indices]) else 1


if __name__ == "__main__":
    sys.exit(main())
