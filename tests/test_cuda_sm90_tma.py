"""The TMA descriptors of the sm90 (Hopper) forward, checked without a GPU.

tests/cuda_emulation/sm90_tma_probe.cu runs the launcher's own make_forward_params (sm90_forward.cuh:
CuTe's make_tma_copy over sm90_plan.h's views) with cuTensorMapEncodeTiled replaced by a recorder, so
every descriptor the GPU would get is printed: for Q, K and V^T the global dims and byte strides
(innermost first), the box and the swizzle. A wrong stride, a broadcast dimension that was not
collapsed, V described as something other than its own rows, or a box that does not match the
kernel's tiles would load the wrong data on the device; here it fails on any machine with nvcc. The
same probe checks the register-fragment layouts the kernel's softmax and P V product rely on.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_config  # noqa: E402

SOURCES = [ROOT / "tests" / "cuda_emulation" / "sm90_tma_probe.cu"] + [
    ROOT / "csrc" / "cuda" / name
    for name in ("sm90_forward.cuh", "sm90_plan.h", "kernel_params.h", "masking.cuh", "device_utils.cuh")]
SWIZZLE_128B = 3  # CU_TENSOR_MAP_SWIZZLE_128B
BLOCK_M = 128
BLOCK_N = {64: 128, 128: 64}  # keys per tile (sm90_forward.cuh's ForwardTraits)


def nvcc():
    for candidate in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"), shutil.which("nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def cutlass_include(build: Path) -> Path:
    """The pinned CUTLASS headers: the installed wheel's, else unpacked from .deps/ (make cutlass-wheel)."""
    try:
        return Path(build_config.cutlass_include_dir())
    except RuntimeError:
        pass
    wheels = sorted(Path(build_config.CUTLASS_WHEEL_DIR).glob(f"nvidia_cutlass-{build_config.CUTLASS_VERSION}-*.whl"))
    if not wheels:
        pytest.fail(f"no CUTLASS headers: run `make cutlass-wheel` ({build_config.CUTLASS_REQUIREMENT} into .deps/)")
    unpacked = build / f"cutlass-{build_config.CUTLASS_VERSION}"
    if not (unpacked / "cutlass_library" / "source" / "include" / "cute" / "tensor.hpp").exists():
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(unpacked, [n for n in wheel.namelist() if n.startswith("cutlass_library/source/include/")])
    return unpacked / "cutlass_library" / "source" / "include"


@pytest.fixture(scope="module")
def probe():
    """Compiles the probe once per source state (host code only; ~25 CPU-seconds of nvcc)."""
    compiler = nvcc()
    if compiler is None:
        pytest.skip("no nvcc: the TMA probe compiles CuTe's host code with the CUDA compiler (make cuda-check's machine)")
    build = ROOT / "build" / "cuda-sm90-tma-probe"
    build.mkdir(parents=True, exist_ok=True)
    include = cutlass_include(build)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + str(include).encode()).hexdigest()[:16]
    binary = build / f"probe-{digest}"
    if not binary.exists():
        subprocess.run([compiler, "-std=c++20", "--expt-relaxed-constexpr", "-DCUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL",
                        "-I", str(ROOT / "csrc"), "-I", str(include), str(SOURCES[0]), "-o", str(binary)], check=True)
    return binary


def run(probe, calls):
    """calls: (dtype, D, B, H, Hk, L, S, q strides, k strides, v strides) -> per call (refusal, [descriptors], params)."""
    text = "\n".join(" ".join(str(x) for x in (*c[:7], *c[7], *c[8], *c[9])) for c in calls) + "\n"
    out = subprocess.run([str(probe)], input=text, capture_output=True, text=True, check=True).stdout
    results = []
    for line in out.splitlines():
        kind, *fields = line.split()
        if kind == "call":
            results.append({"refusal": fields[1].split("=")[1], "tma": [], "params": {}})
        else:
            values = dict(f.split("=") for f in fields)
            if kind == "tma":
                results[-1]["tma"].append({k: int(v) if k in ("rank", "swizzle") else [int(x) for x in v.split(",")]
                                           for k, v in values.items()})
            else:
                results[-1]["params"] = {k: int(v) for k, v in values.items()}
    assert len(results) == len(calls), out
    return results


def expected_view(size, rows, heads, batch, strides, D):
    """A TMA view as sm90_plan.h describes it: dims (D, rows, heads, batch), byte strides of the last
    three; a dimension of size 1 or stride 0 collapses to size 1 with a 16-byte placeholder stride."""
    dims, byte_strides = [D], []
    for n, stride in ((rows, strides[2]), (heads, strides[1]), (batch, strides[0])):
        collapsed = n == 1 or stride == 0
        dims.append(1 if collapsed else n)
        byte_strides.append(16 if collapsed else stride * size)
    return dims, byte_strides


def contiguous(B, H, L, D):
    return (H * L * D, L * D, D)


def token_major(B, H, L, D):
    return (L * H * D, D, H * D)


CASES = {
    # name: (dtype, D, B, H, Hk, L, S, q strides, k strides, v strides)
    "contiguous-d64": ("bfloat16", 64, 2, 4, 4, 77, 300, contiguous(2, 4, 77, 64), contiguous(2, 4, 300, 64),
                       contiguous(2, 4, 300, 64)),
    "token-major-d128": ("float16", 128, 2, 4, 4, 300, 77, token_major(2, 4, 300, 128), token_major(2, 4, 77, 128),
                         token_major(2, 4, 77, 128)),
    "gqa-d128": ("bfloat16", 128, 1, 8, 2, 1000, 129, token_major(1, 8, 1000, 128), token_major(1, 2, 129, 128),
                 token_major(1, 2, 129, 128)),
    "heads-expanded-d64": ("float16", 64, 2, 4, 4, 200, 333, contiguous(2, 4, 200, 64), (333 * 64, 0, 64),
                           (333 * 64, 0, 64)),
    "batch-expanded-d128": ("bfloat16", 128, 3, 2, 2, 64, 64, contiguous(3, 2, 64, 128), (0, 64 * 128, 128),
                            (0, 64 * 128, 128)),
    "one-query-d64": ("bfloat16", 64, 2, 3, 3, 1, 37, (3 * 64, 64, 0), contiguous(2, 3, 37, 64),
                      contiguous(2, 3, 37, 64)),
    "packed-projection-d64": ("float16", 64, 2, 3, 3, 50, 50, (50 * 3 * 3 * 64, 64, 3 * 3 * 64),
                              (50 * 3 * 3 * 64, 64, 3 * 3 * 64), (50 * 3 * 3 * 64, 64, 3 * 3 * 64)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tma_descriptors_describe_each_tensor_and_the_kernels_tiles(probe, name):
    dtype, D, B, H, Hk, L, S, qs, ks, vs = CASES[name]
    (result,) = run(probe, [CASES[name]])
    assert result["refusal"] == "none", "sm90_plan.h accepts every case here"
    q, k, v = result["tma"]
    kv_heads = Hk
    for desc, (rows, heads, strides, box_rows) in zip(
            (q, k, v), ((L, H, qs, BLOCK_M), (S, kv_heads, ks, BLOCK_N[D]), (S, kv_heads, vs, BLOCK_N[D]))):
        dims, byte_strides = expected_view(2, rows, heads, B, strides, D)
        assert desc["rank"] == 4
        assert desc["dims"] == dims, (name, desc)
        assert desc["strides"] == byte_strides, (name, desc)
        # 64 elements (128 bytes, the swizzle span) of the head dim by a whole tile of rows; D = 128
        # takes two boxes per tile. V^T's box is V's own rows: 64 columns x the key tile.
        assert desc["box"] == [64, box_rows, 1, 1], (name, desc)
        assert desc["elem"] == [1, 1, 1, 1]
        assert desc["swizzle"] == SWIZZLE_128B
    assert result["params"] == {"heads": H, "group": H // Hk, "m_blocks": -(-L // BLOCK_M)}


def test_fragment_layouts_the_softmax_and_the_p_v_product_rely_on(probe):
    """From CuTe's own partitions of the kernel's tiled MMAs (host-evaluable layout algebra), for
    each dtype and head dim: the S accumulator registers, read through accumulator_as_operand_a, are
    register for register the A operand the RS wgmma of P V expects (P reuses S in place); each row
    of accumulator_rows_cols lies on one query row, the same in S and O, and the 4 threads of a row
    quad share it (the max/sum shuffles); one thread writes each row's logsumexp; every S element
    has exactly one owner; warpgroup w owns rows [64 w, 64 w + 64)."""
    out = subprocess.run([str(probe), "layouts"], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["layouts D=64 ok", "layouts D=128 ok"] * 2, out
