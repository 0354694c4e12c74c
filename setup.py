"""Builds qkv._C, the C++ (and, when a CUDA toolchain and a CUDA build of torch are
present, CUDA) extension that registers the torch.ops.qkv operators.

Environment switches:
  QKV_CUDA=1 / QKV_CUDA=0   force the CUDA build on or off (default: auto-detect)
  QKV_CUDA_ARCHS="8.0;9.0"  CUDA architectures (TORCH_CUDA_ARCH_LIST is honoured too)
  MAX_JOBS=N                parallel compile jobs (torch.utils.cpp_extension)
  QKV_DEBUG=1               -O0 -g build
  QKV_VERBOSE_BUILD=1       print the full link record (always written to <build_temp>/link-command.txt)

Install into your own environment with `pip install --no-build-isolation .` so the build
uses your installed torch (pip's isolated build would download an unpinned one).
"""
import os
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from shared_cxx_runtime import with_shared_cxx_runtime  # noqa: E402


def _cuda_wanted() -> bool:
    switch = os.environ.get("QKV_CUDA", "").strip().lower()
    if switch in ("0", "off", "false", "no"):
        return False
    available = cpp_extension.CUDA_HOME is not None and __import__("torch").version.cuda is not None
    if switch in ("1", "on", "true", "yes"):
        if not available:
            raise RuntimeError("QKV_CUDA=1 but no CUDA toolchain (CUDA_HOME) or no CUDA build of torch was found")
        return True
    return available


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


def build_extension():
    debug = os.environ.get("QKV_DEBUG") == "1"
    # AVX2 + FMA is the baseline this build needs; anything wider must be dispatched at run time.
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-std=c++20", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2",
                  "-DCPU_CAPABILITY=AVX2"]
    groups = read_source_list()
    # core and cpu_kernel share today's AVX2 flags; per-group (per-ISA) flags come with the
    # CPU ISA dispatch work.
    sources = groups["core"] + groups["cpu_kernel"] + groups["python"]
    kwargs = dict(
        name="qkv._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if _cuda_wanted():
        archs = os.environ.get("QKV_CUDA_ARCHS")
        if archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["sources"] = sources + groups["cuda"]
        return cpp_extension.CUDAExtension(
            extra_compile_args={"cxx": cxx_flags + ["-DQKV_WITH_CUDA"], "nvcc": nvcc_flags},
            **kwargs,
        )
    return cpp_extension.CppExtension(extra_compile_args={"cxx": cxx_flags}, **kwargs)


setup(
    package_dir={"": "python"},
    packages=find_packages("python"),  # qkv and qkv.bench
    ext_modules=[build_extension()],
    # Links against the shared C++ runtime torch uses, and records the link (see the module).
    cmdclass={"build_ext": with_shared_cxx_runtime(cpp_extension.BuildExtension).with_options(use_ninja=True)},
)
