#!/usr/bin/env python3
"""Cross-compiles qkv's CPU extension for aarch64, as an aarch64 build would compile it.

What it proves: on aarch64 the build chooses only the portable copy of the CPU kernels and passes
no x86 flag, and every C++ translation unit of the CPU extension (csrc/sources.txt's core, python
and cpu_kernel groups: the cpu_kernel group once, as the DEFAULT copy) compiles to an aarch64
object: no x86 intrinsic, header or builtin (cpuid) outside the x86-64 copies' guards.
  1. setup.py's choice: scripts/build_config.py (what setup.py reads) is asked for the copies and
     flags of machine "aarch64", and each translation unit is compiled with the cross compiler
     and those flags against this Python's torch headers; every object must be ELF aarch64.
  2. CMake's choice (--part cmake or all, needs cmake): CMakeLists.txt is configured with an aarch64
     toolchain file; its compile commands must hold each kernel source once (one copy) and no x86
     flag. Nothing is compiled by this part: the sources are the ones step 1 compiles.
What it cannot prove: linking and running. There is no aarch64 torch (libtorch, Python) here,
so nothing is linked, loaded or tested on aarch64.

The Python headers: the translation unit that includes Python.h (python_module.cpp) is compiled
against this (x86-64) Python's pyconfig.h, the only one here. Python.h itself is portable; its
pyconfig.h records the build machine's type sizes and features. A probe checks, on the aarch64
target, that every SIZEOF_/ALIGNOF_ value of that pyconfig.h equals the target's own (both are
LP64 Linux), so the headers describe the target's types. Debian's multiarch pyconfig.h (which
would look for aarch64-linux-gnu/python3.X/pyconfig.h) is pointed at the host's through a
one-line header in a temporary folder.

Usage: scripts/aarch64_compile_check.py [--cxx aarch64-linux-gnu-g++] [--jobs N] [--part setup|cmake|all]
Exit status 0 when every step passes; the compiler's messages otherwise.
"""
import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_config import ROOT, baseline_cxx_flags, cpu_capabilities, read_source_list  # noqa: E402

EM_AARCH64 = 183  # e_machine of an ELF object for aarch64
# Flags that only an x86 target knows: none may reach an aarch64 compile.
X86_FLAG = re.compile(r"^-m(avx|fma|f16c|sse|ssse|bmi|amx|popcnt|lzcnt|arch=x86|arch=haswell|arch=skylake)")

PYCONFIG_PROBE = r"""
#include <Python.h>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <cwchar>
#include <pthread.h>
#include <sys/types.h>
#define QKV_SAME(macro, type) static_assert(macro == sizeof(type), #macro " of pyconfig.h is not sizeof(" #type ") on the target")
QKV_SAME(SIZEOF_SHORT, short);
QKV_SAME(SIZEOF_INT, int);
QKV_SAME(SIZEOF_LONG, long);
QKV_SAME(SIZEOF_LONG_LONG, long long);
QKV_SAME(SIZEOF_FLOAT, float);
QKV_SAME(SIZEOF_DOUBLE, double);
QKV_SAME(SIZEOF_LONG_DOUBLE, long double);
QKV_SAME(SIZEOF_VOID_P, void*);
QKV_SAME(SIZEOF_SIZE_T, size_t);
QKV_SAME(SIZEOF_UINTPTR_T, uintptr_t);
QKV_SAME(SIZEOF_WCHAR_T, wchar_t);
QKV_SAME(SIZEOF_TIME_T, time_t);
QKV_SAME(SIZEOF_OFF_T, off_t);
QKV_SAME(SIZEOF_PID_T, pid_t);
QKV_SAME(SIZEOF_PTHREAD_T, pthread_t);
QKV_SAME(SIZEOF_PTHREAD_KEY_T, pthread_key_t);
QKV_SAME(SIZEOF_FPOS_T, fpos_t);
QKV_SAME(SIZEOF__BOOL, bool);
static_assert(ALIGNOF_LONG == alignof(long), "ALIGNOF_LONG of pyconfig.h is not alignof(long) on the target");
static_assert(ALIGNOF_SIZE_T == alignof(size_t), "ALIGNOF_SIZE_T of pyconfig.h is not alignof(size_t) on the target");
#if defined(WORDS_BIGENDIAN) || !defined(DOUBLE_IS_LITTLE_ENDIAN_IEEE754)
#error "pyconfig.h describes a big-endian machine; aarch64 Linux is little-endian"
#endif
"""


def elf_machine(path):
    with open(path, "rb") as f:
        header = f.read(20)
    if header[:4] != b"\x7fELF":
        return None
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


def torch_include_dirs():
    from torch.utils import cpp_extension  # the headers setup.py builds against
    return cpp_extension.include_paths()


def python_include_dirs(scratch):
    """This Python's include folder, plus (for Debian's multiarch pyconfig.h) a folder whose
    aarch64-linux-gnu/python3.X/pyconfig.h forwards to the host's: see the module docstring."""
    include = sysconfig.get_paths()["include"]
    dirs = [include]
    with open(os.path.join(include, "pyconfig.h")) as f:
        wrapper = "aarch64-linux-gnu/" in f.read()
    if wrapper:
        version = os.path.basename(include)  # python3.X
        host = os.path.join(os.path.dirname(include), sysconfig.get_config_var("MULTIARCH"), version, "pyconfig.h")
        if not os.path.isfile(host):
            raise SystemExit(f"aarch64 check: {include}/pyconfig.h is Debian's multiarch wrapper, but {host} is missing")
        shim = os.path.join(scratch, "pyconfig-shim", "aarch64-linux-gnu", version)
        os.makedirs(shim, exist_ok=True)
        with open(os.path.join(shim, "pyconfig.h"), "w") as f:
            f.write(f'#include "{host}"\n')
        dirs.append(os.path.join(scratch, "pyconfig-shim"))
    return dirs


def setup_py_compiles(scratch):
    """The translation units setup.py would compile on aarch64: [(source, flags, object)]."""
    copies = cpu_capabilities("aarch64")
    for name, flags in copies:
        bad = [flag for flag in flags if X86_FLAG.match(flag)]
        if bad:
            raise SystemExit(f"aarch64 check: build_config gives the {name} copy x86 flags {bad} on aarch64")
    if [name for name, _ in copies] != ["DEFAULT"]:
        raise SystemExit(f"aarch64 check: an aarch64 build must build only the DEFAULT copy, build_config gives "
                         f"{[name for name, _ in copies]}")
    baseline = baseline_cxx_flags() + ["-fPIC", "-DNDEBUG", "-DTORCH_API_INCLUDE_EXTENSION_H",
                                       "-DTORCH_EXTENSION_NAME=_C"]
    groups = read_source_list()
    jobs = []
    for source in groups["core"] + groups["python"]:
        jobs.append((source, baseline, os.path.join(scratch, "baseline", source + ".o")))
    for name, flags in copies:
        for source in groups["cpu_kernel"]:
            jobs.append((source, baseline + flags + [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}"],
                         os.path.join(scratch, name, source + ".o")))
    return jobs


def compile_one(cxx, includes, job):
    source, flags, obj = job
    os.makedirs(os.path.dirname(obj), exist_ok=True)
    # -Wno-psabi: GCC's note that the ABI of passing 32-byte vectors changed in GCC 4.6 and 10.1
    # (every object here, torch's too, is built by one GCC), repeated for every Vectorized argument.
    cmd = [cxx, *flags, "-Wno-psabi", *includes, "-c", source, "-o", obj]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"FAIL {source}: {' '.join(cmd)}\n{proc.stderr[-8000:]}"
    machine = elf_machine(obj)
    if machine != EM_AARCH64:
        return f"FAIL {source}: {obj} is not an aarch64 object (ELF machine {machine}); is {cxx} a cross compiler?"
    return None


def check_setup_py(cxx, jobs_count, scratch):
    includes = [f"-I{os.path.join(ROOT, 'csrc', 'include')}", f"-I{os.path.join(ROOT, 'csrc')}"]
    includes += [f"-isystem{d}" for d in torch_include_dirs() + python_include_dirs(scratch)]
    jobs = setup_py_compiles(scratch)
    probe = os.path.join(scratch, "pyconfig_probe.cpp")
    with open(probe, "w") as f:
        f.write(PYCONFIG_PROBE)
    jobs.insert(0, (probe, baseline_cxx_flags(), os.path.join(scratch, "pyconfig_probe.o")))
    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs_count) as pool:
        for job, failure in zip(jobs, pool.map(lambda job: compile_one(cxx, includes, job), jobs)):
            print(f"{'FAIL' if failure else 'ok  '} {os.path.relpath(job[2], scratch)}", flush=True)
            if failure:
                failures.append(failure)
    return failures, len(jobs)


TOOLCHAIN = """set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER {cxx})
"""


def check_cmake(cxx, scratch):
    """Configures CMakeLists.txt for aarch64; returns the failures found in its compile commands."""
    import torch
    cmake = shutil.which("cmake")
    if cmake is None:
        raise SystemExit("aarch64 check: --part cmake needs cmake on PATH")
    build = os.path.join(scratch, "cmake")
    os.makedirs(build, exist_ok=True)
    toolchain = os.path.join(build, "aarch64.cmake")
    with open(toolchain, "w") as f:
        f.write(TOOLCHAIN.format(cxx=shutil.which(cxx) or cxx))
    proc = subprocess.run([cmake, "-S", ROOT, "-B", build, f"-DCMAKE_TOOLCHAIN_FILE={toolchain}",
                           "-DCMAKE_BUILD_TYPE=Release", "-DQKV_CUDA=OFF", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
                           f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return [f"FAIL cmake configure for aarch64:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"]
    with open(os.path.join(build, "compile_commands.json")) as f:
        commands = json.load(f)
    failures = []
    groups = read_source_list()
    compiled = [os.path.relpath(entry["file"], ROOT) for entry in commands]
    for source in groups["core"] + groups["cpu_kernel"]:
        if compiled.count(source) != 1:
            failures.append(f"FAIL cmake: {source} is compiled {compiled.count(source)} times for aarch64 (want once)")
    for entry in commands:
        args = entry.get("arguments") or entry["command"].split()
        bad = [arg for arg in args if X86_FLAG.match(arg)]
        if bad:
            failures.append(f"FAIL cmake: {entry['file']} gets x86 flags {bad} for aarch64")
        if "CPU_CAPABILITY_" in entry.get("command", " ".join(args)) and "-DCPU_CAPABILITY_DEFAULT" not in args:
            failures.append(f"FAIL cmake: {entry['file']} is built as a non-portable copy for aarch64")
    print(f"{'FAIL' if failures else 'ok  '} cmake: {len(commands)} compile commands for aarch64, "
          f"the kernel sources once each, no x86 flag", flush=True)
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cxx", default=os.environ.get("QKV_AARCH64_CXX", "aarch64-linux-gnu-g++"))
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    parser.add_argument("--part", choices=("setup", "cmake", "all"), default="all")
    parser.add_argument("--keep", help="write the objects here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    if shutil.which(args.cxx) is None:
        raise SystemExit(f"aarch64 check: no {args.cxx} on PATH (Debian: apt-get install g++-aarch64-linux-gnu)")
    scratch = args.keep or tempfile.mkdtemp(prefix="qkv-aarch64-")
    try:
        failures = []
        if args.part in ("setup", "all"):
            found, count = check_setup_py(args.cxx, max(1, args.jobs), scratch)
            failures += found
            print(f"setup.py build for aarch64: {count - len(found)} of {count} translation units compiled "
                  f"to aarch64 objects (the pyconfig.h probe included)")
        if args.part in ("cmake", "all"):
            failures += check_cmake(args.cxx, scratch)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    for failure in failures:
        print(failure, file=sys.stderr)
    print("aarch64 check: " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
