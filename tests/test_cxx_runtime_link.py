"""qkv's libraries use the shared C++ runtime torch uses (issue 14, defect 1).

On the H100 machine qkv._C came out with libstdc++.a linked in, and every TORCH_CHECK crashed in
ostream formatting (on the CPU machines such a build cuts every error message at its first
number instead). These tests check the built extension itself, and rebuild a one-function
extension under each environment known to produce such a link, with setuptools' plain build_ext
(the cause must reproduce, or the case proves nothing) and with the build_ext of qkv's setup.py
(scripts/shared_cxx_runtime.py), which must produce a library bound to libstdc++.so.6.
CMake's libqkv.so is checked by ctest (tests/cpp/CMakeLists.txt).
"""
import os
import pathlib
import subprocess
import sys

import pytest

import qkv

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import cxx_runtime_check  # noqa: E402

BUILD_TINY = ROOT / "tests" / "cxx_runtime_link" / "build_tiny.py"


def test_the_built_extension_uses_the_shared_cxx_runtime():
    report = cxx_runtime_check.inspect(qkv._C.__file__)
    assert report.ok, report.verdict()


def test_the_check_counts_runtime_members_not_the_stream_operators_a_program_instantiates():
    member = cxx_runtime_check.RUNTIME_MEMBER
    # what a build linked against libstdc++.so.6 defines (qkv._C, g++ 12): not runtime members
    assert not member.search("std::basic_ostream<char, std::char_traits<char> >& std::operator<< "
                             "<std::char_traits<char> >(std::basic_ostream<char, std::char_traits<char> >&, char const*)")
    assert not member.search("qkv::(anonymous namespace)::check_cuda_limits(char const*)")
    # what libstdc++.a brings in (the H100 build's backtrace and nm)
    assert member.search("std::basic_ostream<char, std::char_traits<char> >& std::basic_ostream<char, "
                         "std::char_traits<char> >::_M_insert<long>(long)")
    assert member.search("std::codecvt<char16_t, char, __mbstate_t>::do_unshift(__mbstate_t&, char*, char*, char*&) const")
    assert member.search("guard variable for std::__cxx11::numpunct<char>::id")


@pytest.fixture(scope="module")
def toolchain_traps(tmp_path_factory):
    """Folders and a compiler wrapper that each make a link take libstdc++.a."""
    root = tmp_path_factory.mktemp("traps")
    archive = subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    shared = subprocess.run(["g++", "-print-file-name=libstdc++.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(archive):
        pytest.fail("g++ has no libstdc++.a: install the libstdc++ development package (it comes with g++)")
    static_only = root / "static_only"  # like a lib folder that ships libstdc++.a but no libstdc++.so
    static_only.mkdir()
    (static_only / "libstdc++.a").symlink_to(archive)
    script = root / "script"  # a gcc-toolset style libstdc++.so linker script pulling an archive
    script.mkdir()
    (script / "libstdc++_nonshared.a").symlink_to(archive)
    (script / "libstdc++.so").write_text(f"INPUT(-lstdc++_nonshared {os.path.realpath(shared)})\n")
    wrapper = root / "g++-static-runtime"  # a toolchain whose driver links the runtime statically
    wrapper.write_text('#!/bin/sh\nexec g++ "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    return {"static_only": str(static_only), "script": str(script), "wrapper": str(wrapper)}


CAUSES = {
    "LDFLAGS=-static-libstdc++": lambda t: {"LDFLAGS": "-static-libstdc++"},
    # CFLAGS reach the C++ link line in older setuptools, CXXFLAGS in newer ones
    "CFLAGS/CXXFLAGS=-static-libstdc++": lambda t: {"CFLAGS": "-static-libstdc++", "CXXFLAGS": "-static-libstdc++"},
    "LDFLAGS=-L<folder with only libstdc++.a>": lambda t: {"LDFLAGS": "-L" + t["static_only"]},
    "library_dirs holds only libstdc++.a (as torch/lib, CUDA lib)": lambda t: {"QKV_TEST_LIBRARY_DIRS": t["static_only"]},
    "CXX=driver adding -static-libstdc++": lambda t: {"CXX": t["wrapper"]},
    "CXX=gcc (C driver links C++)": lambda t: {"CXX": "gcc"},
    "libstdc++.so is a linker script pulling an archive": lambda t: {"LDFLAGS": "-L" + t["script"]},
}


def build_tiny(mode, out_dir, env):
    proc = subprocess.run([sys.executable, str(BUILD_TINY), mode, str(out_dir)], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=out_dir.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()[-1], proc.stdout


@pytest.mark.parametrize("cause", list(CAUSES))
def test_each_cause_of_a_static_runtime_is_defeated(cause, toolchain_traps, tmp_path):
    env = CAUSES[cause](toolchain_traps)
    plain, _ = build_tiny("plain", tmp_path / "plain", env)
    assert not cxx_runtime_check.inspect(plain).ok, f"{cause} did not reproduce a static C++ runtime here"
    fixed, output = build_tiny("qkv", tmp_path / "qkv", env)
    report = cxx_runtime_check.inspect(fixed)
    assert report.ok, report.verdict() + "\n" + output
    record = (tmp_path / "qkv" / "temp" / "link-command.txt").read_text()
    assert "runtime check: OK" in record and "command run:" in record and "collect2" in record


def test_the_link_record_names_what_was_dropped(toolchain_traps, tmp_path):
    build_tiny("qkv", tmp_path / "qkv", {"LDFLAGS": "-static-libstdc++"})
    record = (tmp_path / "qkv" / "temp" / "link-command.txt").read_text()
    assert "dropped (static C++ runtime): ['-static-libstdc++']" in record
    assert "loaded in the build process" in record
