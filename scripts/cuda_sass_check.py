#!/usr/bin/env python3
"""Reads the machine code of the built CUDA extension (no GPU needed) and checks the tensor-core
kernels: per kernel and architecture, the registers, stack and local memory the compiler gave it,
and the instructions that make it fast.

    scripts/cuda_sass_check.py [path to _C*.so or a folder holding it]   (default: build/cuda-check/lib/qkv)

Checks: every tensor-core kernel contains HMMA (mma.sync); the fa2 forward/backward kernels also
LDSM (ldmatrix) and LDGSTS (cp.async); the mma kernels use no local memory (no LDL/STL, STACK:0);
the split-KV decode kernels read K/V with 128-bit loads (LDG.E.128) and, like the fa2 kernels,
spill at most SPILL_BUDGET bytes (at 8 query rows per block they sit at the register cap: 8-16 bytes
on sm_80);
the fa2 kernels, which sit at the 255-register cap as FlashAttention-2's do, spill at most
SPILL_BUDGET bytes (ptxas parks a few cold lane values there; the table shows each kernel's
stack bytes and LDL+STL count, and a larger spill fails); the sm90 (Hopper) forward kernels exist
only as sm_90a code and must use wgmma (HGMMA), TMA loads (UTMALDG) and mbarriers (SYNCS), within
the same spill budget. The exit status is 1 when a check fails.
Part of `make cuda-check`.

cuobjdump and nvdisasm come from CUDA_HOME/bin or the PATH; where the toolkit lacks them (the
CUDA check's pip-installed toolkit does), they are pip-installed (--no-deps, pinned below) into
the venv that runs this script.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPILL_BUDGET = 128  # bytes of stack an fa2 or split decode kernel may use for spills
# The PyPI packages of the two tools (cuobjdump runs nvdisasm), for toolkits without them.
TOOL_PACKAGES = ["nvidia-cuda-cuobjdump==13.4.92", "nvidia-cuda-nvdisasm==13.4.92"]


def _pip_tool_dir() -> str:
    import sysconfig
    return os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13", "bin")


def tool(name: str) -> str:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (os.path.join(cuda_home, "bin", name), shutil.which(name), os.path.join(_pip_tool_dir(), name)):
        if candidate and os.path.exists(candidate):
            return candidate
    print(f"cuda_sass_check: {name} not in {cuda_home}/bin or the PATH; installing {' '.join(TOOL_PACKAGES)}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *TOOL_PACKAGES], check=True)
    found = os.path.join(_pip_tool_dir(), name)
    if not os.path.exists(found):
        sys.exit(f"cuda_sass_check: {name} not found after installing {TOOL_PACKAGES}")
    return found


def library(path: str) -> str:
    if os.path.isdir(path):
        matches = sorted(glob.glob(os.path.join(path, "_C*.so")))
        if not matches:
            sys.exit(f"cuda_sass_check: no _C*.so in {path}")
        return matches[0]
    return path


def demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(demangled: str) -> str:
    """qkv::cuda::fa2::fa2_forward_kernel<__nv_bfloat16, 128, qkv::cuda::fa2::ForwardTile<128, 64, 4>, false>
    -> fa2_forward_kernel<bf16, 128, ForwardTile<128, 64, 4>, false>"""
    name = demangled.split("(")[0].removeprefix("void ")
    name = re.sub(r"qkv::cuda::(fa2::|mma::|decode::|sm90::)?", "", name)
    name = name.replace("cutlass::bfloat16_t", "bf16").replace("cutlass::half_t", "f16")
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "f16")


def resource_usage(so: str) -> dict[tuple[str, str], dict[str, int]]:
    text = subprocess.run([tool("cuobjdump"), "-res-usage", so], capture_output=True, text=True, check=True).stdout
    usage, arch, function = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+a?)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function and "REG:" in line:
            usage[(arch, function)] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            function = None
    return usage


def instruction_counts(so: str) -> dict[tuple[str, str], dict[str, int]]:
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    env = dict(os.environ, PATH=os.path.dirname(tool("nvdisasm")) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.Popen([tool("cuobjdump"), "-sass", so], stdout=subprocess.PIPE, text=True, env=env)
    arch = function = None
    for line in proc.stdout:
        if m := re.match(r"\s*code for (sm_\d+a?)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            function = m.group(1)
        elif function and (m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)):
            op = m.group(1)
            for key in ("HMMA", "LDSM", "LDGSTS", "LDL", "STL", "HGMMA", "UTMALDG", "SYNCS"):
                if op == key:
                    counts[(arch, function)][key] += 1
            if op == "LDG" and re.search(r"LDG\.E(\.\w+)*\.128", line):
                counts[(arch, function)]["LDG128"] += 1
    proc.wait()
    return counts


def main(argv: list[str]) -> int:
    so = library(argv[1] if len(argv) > 1 else os.path.join(ROOT, "build", "cuda-check", "lib", "qkv"))
    usage = resource_usage(so)
    counts = instruction_counts(so)
    keys = [k for k in usage if re.search(r"(fa2|mma|split_decode|sm90)_\w*kernel", k[1])]
    names = demangle(sorted({k[1] for k in keys}))
    failures = []
    rows = []
    for arch, function in sorted(keys, key=lambda k: (names[k[1]], k[0])):
        u, c = usage[(arch, function)], counts.get((arch, function), {})
        name = short_name(names[function])
        problems = []
        spilled = u.get("LOCAL", 0) or u.get("STACK", 0) or c.get("LDL", 0) or c.get("STL", 0)
        if spilled and name.startswith("mma_"):
            problems.append("local memory")
        if name.startswith("split_decode_kernel") and not c.get("LDG128"):
            problems.append("no 128-bit K/V loads")
        hopper = "sm90_" in name
        if ("fa2_" in name or "split_decode" in name or hopper) and u.get("STACK", 0) + u.get("LOCAL", 0) > SPILL_BUDGET:
            problems.append(f"spills over {SPILL_BUDGET} bytes")
        if hopper and arch != "sm_90a":
            problems.append("sm90 code outside sm_90a")
        if hopper and not (c.get("HGMMA") and c.get("UTMALDG") and c.get("SYNCS")):
            problems.append("no HGMMA/UTMALDG/SYNCS")
        tensor_core = "convert_dq" not in name and "split_decode" not in name and not hopper
        if tensor_core and not c.get("HMMA"):
            problems.append("no HMMA")
        if "fa2_" in name and tensor_core and not (c.get("LDSM") and c.get("LDGSTS")):
            problems.append("no LDSM/LDGSTS")
        rows.append((arch, name, u.get("REG", 0), u.get("STACK", 0), u.get("LOCAL", 0), c.get("HMMA", 0),
                     c.get("LDSM", 0), c.get("LDGSTS", 0), c.get("LDG128", 0), c.get("HGMMA", 0),
                     c.get("UTMALDG", 0), c.get("LDL", 0) + c.get("STL", 0), ", ".join(problems)))
        if problems:
            failures.append(f"{arch} {name}: {', '.join(problems)}")
    print(f"cuda_sass_check: {so}")
    print("| arch | kernel | REG | STACK | LOCAL | HMMA | LDSM | LDGSTS | LDG.128 | HGMMA | UTMALDG | LDL+STL | problem |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    if not rows:
        failures.append("no mma/fa2/split_decode kernel found")
    # A build for 9.0 must carry the Hopper kernels (QKV_CUDA_SM90); their absence is a build bug.
    if any(arch == "sm_90" for arch, _ in usage) and not any("sm90_" in short_name(names[f]) for _, f in keys):
        failures.append("a build for sm_90 without the sm90 (sm_90a) kernels")
    for f in failures:
        print(f"cuda_sass_check: FAIL: {f}")
    print(f"cuda_sass_check: {len(rows)} kernels, {len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
