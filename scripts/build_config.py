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


# ---- CUTLASS/CuTe: the headers of the sm90a (Hopper) kernels ------------------------------------

# The pinned CUTLASS release, as PyPI's header wheel (6.4 MB; install it with --no-deps: its Python
# dependencies are for CUTLASS's own code generators, which qkv does not use). `make cutlass-wheel`
# downloads exactly this into CUTLASS_WHEEL_DIR; the CUDA check's venv and the GPU machines install
# it from there (docs/cuda.md, "CUTLASS").
CUTLASS_REQUIREMENT = "nvidia-cutlass==4.2.0.0"
CUTLASS_VERSION = CUTLASS_REQUIREMENT.split("==")[1]
CUTLASS_WHEEL_DIR = os.path.join(ROOT, ".deps")  # git-ignored


def sm90_wanted(cuda_archs):
    """Whether a CUDA build for `cuda_archs` (TORCH_CUDA_ARCH_LIST syntax: "8.0;9.0", "9.0a",
    "9.0+PTX") compiles the sm90 group of csrc/sources.txt: those sources are sm_90a code, built
    (for sm_90a only) whenever the list has compute capability 9.0."""
    archs = cuda_archs.replace(" ", ";").split(";")
    return any(arch.split("+")[0] in ("9.0", "9.0a") for arch in archs)


def cutlass_include_dir():
    """The CUTLASS/CuTe include folder (it holds cute/ and cutlass/): $QKV_CUTLASS_INCLUDE when set,
    else the installed nvidia-cutlass wheel's (`cutlass_library.source_path + "/include"`), which
    must be the pinned version. Raises with what to do when neither is there."""
    override = os.environ.get("QKV_CUTLASS_INCLUDE")
    if override:
        folder = override
    else:
        try:
            import cutlass_library
        except ImportError:
            raise RuntimeError(
                f"qkv: the sm90 (Hopper) kernels need CUTLASS's headers: pip install --no-deps '{CUTLASS_REQUIREMENT}' "
                f"(`make cutlass-wheel` downloads the wheel into .deps/ for machines without a network), or set "
                f"QKV_CUTLASS_INCLUDE to a CUTLASS include folder, or leave 9.0 out of QKV_CUDA_ARCHS") from None
        from importlib import metadata
        try:
            installed = metadata.version("nvidia-cutlass")
        except metadata.PackageNotFoundError:
            installed = "unknown"
        if installed != CUTLASS_VERSION:
            raise RuntimeError(f"qkv: CUTLASS {installed} is installed, but the sm90 kernels are built and tested "
                               f"against {CUTLASS_REQUIREMENT}: pip install --no-deps '{CUTLASS_REQUIREMENT}'")
        folder = os.path.join(cutlass_library.source_path, "include")
    for header in ("cute/tensor.hpp", "cutlass/cutlass.h"):
        if not os.path.isfile(os.path.join(folder, header)):
            raise RuntimeError(f"qkv: {folder} has no {header}: not a CUTLASS include folder")
    return os.path.abspath(folder)


if __name__ == "__main__":
    # For CMake and the shell scripts: `build_config.py cutlass-include | cutlass-requirement`.
    import sys

    commands = {"cutlass-include": cutlass_include_dir, "cutlass-requirement": lambda: CUTLASS_REQUIREMENT}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(commands)}")
    try:
        print(commands[sys.argv[1]]())
    except RuntimeError as error:
        sys.exit(str(error))
