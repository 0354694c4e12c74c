"""The sm90 (Hopper) forward's host side, without a GPU: csrc/cuda/sm90_plan.h, compiled for the CPU
(tests/cuda_emulation/sm90_plan_ops.cpp) and fed through the launcher's own kernel_args.h helpers.

It decides which calls QKV_CUDA_KERNEL=sm90 serves (anything else raises, naming why) and how the
TMA unit sees each tensor: a descriptor built from a view TMA cannot read would fault on the device,
or read the wrong rows, so every refusal below is one the kernel needs. The kernel itself (wgmma,
TMA, mbarriers) has no CPU emulation: tests/test_cuda.py checks it on an H100 (docs/cuda.md).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plan():
    """Builds (once; cached under build/cuda-sm90-plan) and loads torch.ops.qkv_sm90_plan."""
    from torch.utils import cpp_extension

    build_dir = ROOT / "build" / "cuda-sm90-plan"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="qkv_cuda_sm90_plan",
        sources=[str(ROOT / "tests" / "cuda_emulation" / "sm90_plan_ops.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O1", "-std=c++20"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.qkv_sm90_plan


def qkv_tensors(B=2, H=4, L=77, S=300, D=64, Dv=None, Hk=None, dtype=torch.bfloat16, layout="contiguous"):
    Dv, Hk = Dv or D, Hk or H
    g = torch.Generator().manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=g).to(dtype)

    if layout == "contiguous":
        return rand(B, H, L, D), rand(B, Hk, S, D), rand(B, Hk, S, Dv)
    if layout == "token_major":  # (B, L, H, D) memory, as after a projection
        return rand(B, L, H, D).transpose(1, 2), rand(B, S, Hk, D).transpose(1, 2), rand(B, S, Hk, Dv).transpose(1, 2)
    if layout == "packed":  # q, k, v split out of one (B, L, 3, H, D) projection
        qkv_ = rand(B, L, 3, H, D)
        return tuple(qkv_[:, :, i].transpose(1, 2) for i in range(3))
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["contiguous", "token_major", "packed"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_serves_half_precision_head_dims_64_and_128_in_the_usual_layouts(plan, layout, D, dtype):
    L = S = 77 if layout == "packed" else None
    q, k, v = qkv_tensors(D=D, dtype=dtype, layout=layout, **({"L": L, "S": S} if L else {}))
    for causal in (False, True):
        assert plan.refusal(q, k, v, is_causal=causal) == ""


@pytest.mark.parametrize("Hk", [1, 2])
def test_serves_grouped_and_shared_key_value_heads(plan, Hk):
    q, k, v = qkv_tensors(H=8, Hk=Hk)
    assert plan.refusal(q, k, v) == ""
    # key/value expanded over the heads (stride 0), as a caller repeating them without copying does
    q, k, v = qkv_tensors(H=8, Hk=1)
    assert plan.refusal(q, k.expand(-1, 8, -1, -1), v.expand(-1, 8, -1, -1)) == ""


def test_serves_one_query_and_one_key(plan):
    q, k, v = qkv_tensors(L=1, S=1)
    assert plan.refusal(q, k, v) == ""


@pytest.mark.parametrize("major, minor", [(8, 0), (8, 9), (10, 0), (12, 0)])
def test_refuses_every_device_but_compute_capability_9_0(plan, major, minor):
    q, k, v = qkv_tensors()
    assert "compute capability 9.0" in plan.refusal(q, k, v, major=major, minor=minor)


def test_refuses_what_the_kernel_does_not_implement(plan):
    q, k, v = qkv_tensors()
    assert "float16 or bfloat16" in plan.refusal(*(t.float() for t in (q, k, v)))
    assert "head_dim == value_head_dim" in plan.refusal(*qkv_tensors(D=96))
    assert "head_dim == value_head_dim" in plan.refusal(*qkv_tensors(D=256))
    assert "head_dim == value_head_dim" in plan.refusal(*qkv_tensors(D=128, Dv=64))
    assert "no bias" in plan.refusal(q, k, v, bias=torch.zeros(2, 4, 77, 300, dtype=q.dtype))
    assert "no dropout" in plan.refusal(q, k, v, dropout_p=0.1)
    assert "scale > 0" in plan.refusal(q, k, v, scale=0.0)
    assert "scale > 0" in plan.refusal(q, k, v, scale=-0.125)
    assert "scale > 0" in plan.refusal(q, k, v, scale=float("inf"))
    assert "windows" in plan.refusal(q, k, v, window_left=16)
    assert "softcap" in plan.refusal(q, k, v, softcap=30.0)
    assert "at least one query and one key" in plan.refusal(*qkv_tensors(S=0))


def test_refuses_views_the_tma_unit_cannot_read(plan):
    q, k, v = qkv_tensors(D=64)
    # a column stride: V read transposed
    vt = torch.randn(2, 4, 64, 300).to(v.dtype).transpose(-1, -2)
    assert "unit-stride rows" in plan.refusal(q, k, vt)
    # rows 2 bytes past a 16-byte boundary
    shifted = torch.randn(2 * 4 * 77 * 64 + 1).to(q.dtype)[1:].view(2, 4, 77, 64)
    assert "16-byte-aligned" in plan.refusal(shifted, k, v)
    # a row stride that is not a multiple of 8 elements (cut from rows of 69)
    narrow = torch.randn(2, 4, 300, 69).to(k.dtype)[..., :64]
    assert "multiples of 8" in plan.refusal(q, narrow, v)
    # keys repeated along the sequence with stride 0: no TMA box walks such rows
    repeated = k[:, :, :1].expand(-1, -1, 300, -1)
    assert "query, key and value" in plan.refusal(q, repeated, v)
    # the output is written in 16-byte chunks
    out = torch.empty(2 * 4 * 77 * 64 + 1, dtype=q.dtype)[1:].view(2, 4, 77, 64)
    assert "output" in plan.refusal(q, k, v, out=out)


def test_tma_views_collapse_broadcast_and_single_dimensions(plan):
    t = torch.randn(2, 4, 77, 64).bfloat16()
    assert plan.tma_view(t) == [77, 64, 4, 2, 64, 77 * 64, 4 * 77 * 64]
    token_major = torch.randn(2, 77, 4, 64).bfloat16().transpose(1, 2)
    assert plan.tma_view(token_major) == [77, 64, 4, 2, 4 * 64, 64, 77 * 4 * 64]
    # a head (or batch) broadcast becomes one head read at coordinate 0, with a valid stride
    expanded = torch.randn(2, 1, 77, 64).bfloat16().expand(2, 4, 77, 64)
    assert plan.tma_view(expanded) == [77, 64, 1, 2, 64, 8, 77 * 64]
    batch_expanded = torch.randn(1, 4, 77, 64).bfloat16().expand(2, 4, 77, 64)
    assert plan.tma_view(batch_expanded) == [77, 64, 4, 1, 64, 77 * 64, 8]
    # a single row may have any stride in torch (here 0): described as one row, stride 8
    one_row = torch.randn(2, 4, 1, 64).bfloat16().as_strided((2, 4, 1, 64), (256, 64, 0, 1))
    assert plan.tma_view(one_row) == [1, 64, 4, 2, 8, 64, 256]
