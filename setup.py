"""Builds qkv._C, the C++ (and, when a CUDA toolchain and a CUDA build of torch are
present, CUDA) extension that registers the torch.ops.qkv operators.

Environment switches:
  QKV_CUDA=1 / QKV_CUDA=0   force the CUDA build on or off (default: auto-detect)
  QKV_CUDA_ARCHS="8.0;9.0"  CUDA architectures (TORCH_CUDA_ARCH_LIST is honoured too); with 9.0 in the
                            list the sm90 group of csrc/sources.txt is built too, for sm_90a only, against
                            CUTLASS's headers (scripts/build_config.py: cutlass_include_dir)
  QKV_CUDA_SM90=0           leave the sm90 kernels out even when the archs include 9.0
  MAX_JOBS=N                parallel compile jobs (torch.utils.cpp_extension)
  QKV_DEBUG=1               -O0 -g build
  QKV_VERBOSE_BUILD=1       print the full link record (always written to <build_temp>/link-command.txt)

The CPU kernel translation units are compiled once per instruction set (portable, AVX2,
AVX-512), each copy with its own flags; the library chooses one at load time
(csrc/cpu/cpu_capability.h, QKV_CPU_CAPABILITY). Everything else is built for the baseline
of the architecture, so the extension imports on any x86-64 CPU.

Install into your own environment with `pip install --no-build-isolation .` so the build
uses your installed torch (pip's isolated build would download an unpinned one).
"""
import concurrent.futures
import os
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from build_config import (baseline_cxx_flags, cpu_capabilities, cutlass_include_dir, read_source_list,  # noqa: E402
                          sm90_wanted)
from shared_cxx_runtime import with_shared_cxx_runtime  # noqa: E402

# The copies of the CPU kernels for this machine (only x86-64 has more than the portable one),
# the baseline flags and the source list: scripts/build_config.py, which the aarch64 compile check
# (scripts/aarch64_compile_check.py) reads too.
CPU_CAPABILITIES = cpu_capabilities()


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


def _headers():
    """Every header under csrc/: setuptools relinks the library when one is newer than it."""
    return sorted(os.path.relpath(os.path.join(folder, name), ROOT)
                  for folder, _, names in os.walk(os.path.join(ROOT, "csrc"))
                  for name in names if name.endswith((".h", ".cuh")))


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus the per-capability copies of the CPU kernels.

    An extension may carry `cpu_kernel_sources`: each is compiled once per CPU_CAPABILITIES
    entry, with that entry's flags and -DCPU_CAPABILITY=<name>, into its own folder, and the
    objects are linked after the extension's own (baseline) objects, lowest capability first.
    That order matters: an inline function from a shared header (std::, c10) that several
    objects emit is kept from the first object that has it, so a caller always gets a copy
    built for its own capability or a lower one, never an instruction its CPU may lack.
    """

    def build_extension(self, ext):
        kernel_sources = getattr(ext, "cpu_kernel_sources", [])
        sm90_sources = getattr(ext, "sm90_sources", [])
        flags = ext.extra_compile_args
        cxx_flags = list(flags["cxx"] if isinstance(flags, dict) else flags)

        def compile_copy(capability):
            name, isa_flags = capability
            return self.compiler.compile(
                kernel_sources,
                output_dir=os.path.join(self.build_temp, "cpu_capability", name),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=cxx_flags + isa_flags + [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}"],
                depends=ext.depends,
            )

        def compile_sm90():
            # sm_90a code only: an explicit -gencode keeps torch from adding TORCH_CUDA_ARCH_LIST's.
            return self.compiler.compile(
                sm90_sources,
                output_dir=os.path.join(self.build_temp, "sm90a"),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs + [ext.cutlass_include],
                debug=self.debug,
                extra_postargs={"cxx": cxx_flags, "nvcc": list(flags["nvcc"]) + ["-gencode=arch=compute_90a,code=sm_90a"]},
                depends=ext.depends,
            ) if sm90_sources else []

        # The copies build concurrently (each its own ninja run in its own folder): one after the
        # other they left most of a 16-core machine idle (165 s of a CUDA build on the H100 host,
        # 2026-11-26, most of it three 2-file compiles in a row). The link order stays the list's.
        # The sm_90a sources (their own gencode, so their own ninja run) build beside them.
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(CPU_CAPABILITIES) + 1) as pool:
            sm90 = pool.submit(compile_sm90)
            objects = [obj for copy in pool.map(compile_copy, CPU_CAPABILITIES) for obj in copy]
            objects += sm90.result()
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def build_extension():
    debug = os.environ.get("QKV_DEBUG") == "1"
    # Baseline flags only: instruction sets beyond the architecture's baseline are for the
    # per-capability copies of the CPU kernels (BuildExtension above).
    cxx_flags = baseline_cxx_flags(debug)
    groups = read_source_list()
    # core and python build once with the baseline flags; the cpu_kernel group is compiled once
    # per capability by BuildExtension above.
    sources = groups["core"] + groups["python"]
    kwargs = dict(
        name="qkv._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        # setuptools relinks only when one of these is newer than the library; the copies'
        # objects are rebuilt by ninja from their own dependency files.
        depends=groups["cpu_kernel"] + _headers(),
    )
    if _cuda_wanted():
        archs = os.environ.get("QKV_CUDA_ARCHS")
        if archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["sources"] = sources + groups["cuda"]
        # The Hopper kernels (group cuda_sm90): sm_90a code on CUTLASS/CuTe, compiled by
        # BuildExtension above with their own gencode; QKV_CUDA_SM90 tells the dispatch they exist.
        with_sm90 = sm90_wanted(os.environ["TORCH_CUDA_ARCH_LIST"]) and os.environ.get("QKV_CUDA_SM90") != "0"
        cutlass_include = cutlass_include_dir() if with_sm90 else None
        sm90_flags = ["-DQKV_CUDA_SM90"] if with_sm90 else []
        ext = cpp_extension.CUDAExtension(
            extra_compile_args={"cxx": cxx_flags + ["-DQKV_WITH_CUDA"] + sm90_flags, "nvcc": nvcc_flags + sm90_flags},
            **kwargs,
        )
        if with_sm90:
            ext.sm90_sources = groups["cuda_sm90"]
            ext.cutlass_include = cutlass_include
    else:
        ext = cpp_extension.CppExtension(extra_compile_args={"cxx": cxx_flags}, **kwargs)
    ext.cpu_kernel_sources = groups["cpu_kernel"]
    return ext


setup(
    package_dir={"": "python"},
    packages=find_packages("python"),  # every package under python/ (qkv and its subpackages)
    ext_modules=[build_extension()],
    # Links against the shared C++ runtime torch uses, and records the link (see the module).
    cmdclass={"build_ext": with_shared_cxx_runtime(BuildExtension).with_options(use_ninja=True)},
)
