"""The portable path builds on aarch64 (issue 16): scripts/aarch64_compile_check.py.

On aarch64 the build must compile only the portable (DEFAULT) copy of the CPU kernels, pass no x86
flag, and every C++ translation unit of the CPU extension must compile there (no x86 intrinsic or
cpuid outside the x86-64 guards). The cross-compile tests run where aarch64-linux-gnu-g++ is on
PATH (`make test` installs Debian's g++-aarch64-linux-gnu and sets QKV_REQUIRE_AARCH64_CHECK=1:
there a missing cross compiler fails them); elsewhere they skip with the reason. Nothing is linked
or run on aarch64: there is no aarch64 torch here.
"""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import aarch64_compile_check as check  # noqa: E402
from build_config import cpu_capabilities  # noqa: E402

CXX = os.environ.get("QKV_AARCH64_CXX", "aarch64-linux-gnu-g++")
if shutil.which(CXX) is None and os.environ.get("QKV_REQUIRE_AARCH64_CHECK") == "1":
    raise RuntimeError(f"QKV_REQUIRE_AARCH64_CHECK=1 but {CXX} is not on PATH (apt-get install g++-aarch64-linux-gnu)")
needs_cross_compiler = pytest.mark.skipif(
    shutil.which(CXX) is None, reason=f"no {CXX} on PATH (Debian: apt-get install g++-aarch64-linux-gnu)")


def run_check(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "aarch64_compile_check.py"), "--cxx", CXX, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)


def test_setup_takes_its_copies_from_build_config():
    """The check below asks scripts/build_config.py what an aarch64 build compiles: setup.py must
    build from the same answer, or the check proves nothing about it."""
    assert "CPU_CAPABILITIES = cpu_capabilities()" in (ROOT / "setup.py").read_text()


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le"])
def test_setup_builds_only_the_portable_copy_off_x86(machine):
    assert cpu_capabilities(machine) == [("DEFAULT", [])]


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_setup_builds_every_copy_on_x86_64(machine):
    assert [name for name, _ in cpu_capabilities(machine)] == ["DEFAULT", "AVX2", "AVX512"]


@needs_cross_compiler
def test_every_translation_unit_compiles_for_aarch64():
    """setup.py's translation units, with its flags for aarch64, compile to aarch64 objects."""
    result = run_check("--part", "setup", "--jobs", os.environ.get("MAX_JOBS", "2"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-12000:]
    assert "aarch64 check: passed" in result.stdout


@needs_cross_compiler
@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake on PATH")
def test_cmake_builds_only_the_portable_copy_for_aarch64():
    result = run_check("--part", "cmake")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    assert "the kernel sources once each, no x86 flag" in result.stdout


@needs_cross_compiler
def test_the_check_fails_on_x86_code_outside_the_guards(tmp_path):
    """The check can fail: cpu_capability.cpp with its x86-64 guard removed (cpuid on aarch64), and
    an AVX2 intrinsic in code the portable copy compiles, are both refused."""
    unguarded = tmp_path / "cpu_capability_unguarded.cpp"
    source = (ROOT / "csrc" / "cpu" / "cpu_capability.cpp").read_text()
    guard = "#if defined(__x86_64__) || defined(_M_X64)"
    assert guard in source
    unguarded.write_text(source.replace(guard, "#if 1").replace('#include "cpu_capability.h"',
                                                                 f'#include "{ROOT}/csrc/cpu/cpu_capability.h"'))
    intrinsic = tmp_path / "portable_with_intrinsic.cpp"
    intrinsic.write_text('#include <immintrin.h>\n'
                         "float first(const float* p) { return _mm256_cvtss_f32(_mm256_loadu_ps(p)); }\n")
    includes = [f"-I{ROOT / 'csrc'}", *(f"-isystem{d}" for d in check.torch_include_dirs())]
    flags = ["-std=c++20", "-O0", "-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
    for path in (unguarded, intrinsic):
        failure = check.compile_one(CXX, includes, (str(path), flags, str(tmp_path / (path.name + ".o"))))
        assert failure is not None and "error" in failure, f"{path.name} compiled for aarch64: {failure}"
