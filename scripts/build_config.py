"""What setup.py compiles, and with which flags, for a given target machine.

setup.py builds qkv._C from it; scripts/aarch64_compile_check.py asks it what an aarch64 build
would compile (only the portable copy of the CPU kernels, no x86 flag) and cross-compiles that.
CMakeLists.txt makes the same choice from CMAKE_SYSTEM_PROCESSOR.
"""
import os
import platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# platform.machine() of the x86-64 machines (Linux, macOS; Windows says AMD64).
X86_64_MACHINES = ("x86_64", "amd64")

# -Wno-(maybe-)uninitialized: GCC 12 warns inside its own _mm512_max_ps and other intrinsics that
# start from _mm512_undefined_ps (GCC bug 105593); the same sources' other copies still get the warning.
_X86_64_COPIES = [
    ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
    ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c",
                "-Wno-uninitialized", "-Wno-maybe-uninitialized"]),
]


def cpu_capabilities(machine=None):
    """The copies of the CPU kernels for `machine` (platform.machine() style; default: this one),
    lowest first: [(name, compiler flags)]. CPU_CAPABILITY=<name> names the inline namespace of
    each copy (as in ATen, whose vector types follow the same macro), so no two copies share an
    inline function. Only x86-64 has copies beyond the portable one; elsewhere (aarch64, arm64,
    ...) the portable copy is the whole build and no instruction-set flag is passed."""
    machine = (platform.machine() if machine is None else machine).lower()
    copies = [("DEFAULT", [])]
    if machine in X86_64_MACHINES:
        copies += _X86_64_COPIES
    return copies


def baseline_cxx_flags(debug=False):
    """The flags of everything that is not a kernel copy (and of the copies, before their own):
    no instruction set beyond the architecture's baseline."""
    return (["-O0", "-g"] if debug else ["-O3"]) + ["-std=c++20", "-fopenmp"]


def read_source_list(path=os.path.join("csrc", "sources.txt")):
    """csrc/sources.txt, the one source list (CMake reads it too): {group: [path, ...]}."""
    groups = {}
    with open(os.path.join(ROOT, path)) as f:
        for number, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(f"{path}:{number}: expected `<group> <path>`, got {line.strip()!r}")
            groups.setdefault(fields[0], []).append(fields[1])
    return groups
