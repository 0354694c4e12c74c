#!/usr/bin/env python3
"""Launches each qkv CUDA kernel once, for Nsight Compute (scripts/gpu_check.sh runs it under
`ncu --profile-from-start off`): a typical bfloat16 training shape (B2 H16 L2048 D128, causal),
forward and backward, first on the default path (tensor-core kernels where the call qualifies),
then with QKV_CUDA_KERNEL=generic (the generic kernels). Inputs are made and warmed up outside
the profiled range, so only qkv's kernels (and autograd's gradient bookkeeping) are profiled.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import qkv  # noqa: E402,F401  (registers torch.ops.qkv)


def step(q, k, v, dout):
    out, _ = torch.ops.qkv.attention(q, k, v, is_causal=True)
    torch.autograd.grad(out, (q, k, v), dout)


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 16, 2048, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    for path in ("auto", "generic"):
        os.environ["QKV_CUDA_KERNEL"] = path
        step(q, k, v, dout)  # warm-up, not profiled
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        step(q, k, v, dout)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("profiled qkv forward+backward, B2 H16 L2048 D128 bf16 causal, paths: auto, generic")


if __name__ == "__main__":
    main()
