"""Builds qkv._C, the C++ (and, when a CUDA toolchain and a CUDA build of torch are
present, CUDA) extension that registers the torch.ops.qkv operators.

Environment switches:
  QKV_CUDA=1 / QKV_CUDA=0   force the CUDA build on or off (default: auto-detect)
  QKV_CUDA_ARCHS="8.0;9.0"  CUDA architectures (TORCH_CUDA_ARCH_LIST is honoured too)
  MAX_JOBS=N                parallel compile jobs (torch.utils.cpp_extension)
  QKV_DEBUG=1               -O0 -g build

The CPU kernel translation units are compiled once per instruction set (portable, AVX2,
AVX-512), each copy with its own flags; the library chooses one at load time
(csrc/cpu/cpu_capability.h, QKV_CPU_CAPABILITY). Everything else is built for the baseline
of the architecture, so the extension imports on any x86-64 CPU.

Install into your own environment with `pip install --no-build-isolation .` so the build
uses your installed torch (pip's isolated build would download an unpinned one).
"""
import glob
import os
import platform

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))

# The copies of the CPU kernels: (name, compiler flags). CPU_CAPABILITY names the inline
# namespace of each copy (as in ATen, whose vector types follow the same macro), so no two
# copies share an inline function. Only x86-64 has copies beyond the portable one.
CPU_CAPABILITIES = [("DEFAULT", [])]
if platform.machine().lower() in ("x86_64", "amd64"):
    CPU_CAPABILITIES += [
        ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
        # -Wno-(maybe-)uninitialized: GCC 12 warns inside its own _mm512_max_ps and other
        # intrinsics that start from _mm512_undefined_ps (GCC bug 105593);
        # the same sources' other copies still get the warning.
        ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c",
                    "-Wno-uninitialized", "-Wno-maybe-uninitialized"]),
    ]


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


def _sources(*patterns):
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join("csrc", pattern)))


# The CPU kernel translation units, compiled once per CPU capability (the cpu_kernel group).
CPU_KERNEL_SOURCES = ["csrc/cpu/attention_cpu.cpp", "csrc/cpu/attention_weights_cpu.cpp"]


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
        flags = ext.extra_compile_args
        cxx_flags = list(flags["cxx"] if isinstance(flags, dict) else flags)
        objects = []
        for name, isa_flags in CPU_CAPABILITIES:
            objects += self.compiler.compile(
                kernel_sources,
                output_dir=os.path.join(self.build_temp, "cpu_capability", name),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=cxx_flags + isa_flags + [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}"],
                depends=ext.depends,
            )
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def build_extension():
    debug = os.environ.get("QKV_DEBUG") == "1"
    # Baseline flags only: instruction sets beyond the architecture's baseline are for the
    # per-capability copies of the CPU kernels (BuildExtension above).
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-std=c++20", "-fopenmp"]
    sources = [p for p in _sources("*.cpp", "cpu/*.cpp") if p not in CPU_KERNEL_SOURCES]
    kwargs = dict(
        name="qkv._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        # setuptools relinks only when one of these is newer than the library; the copies'
        # objects are rebuilt by ninja from their own dependency files.
        depends=CPU_KERNEL_SOURCES + _sources("*.h", "cpu/*.h", "kernels/*.h", "include/qkv/*.h"),
    )
    if _cuda_wanted():
        archs = os.environ.get("QKV_CUDA_ARCHS")
        if archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["sources"] = sources + _sources("cuda/*.cu", "cuda/*.cpp")
        ext = cpp_extension.CUDAExtension(
            extra_compile_args={"cxx": cxx_flags + ["-DQKV_WITH_CUDA"], "nvcc": nvcc_flags},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(extra_compile_args={"cxx": cxx_flags}, **kwargs)
    ext.cpu_kernel_sources = CPU_KERNEL_SOURCES
    return ext


setup(
    package_dir={"": "python"},
    packages=["qkv"],
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
