"""Links qkv's extension against the shared C++ runtime that torch uses, whatever the toolchain
or environment would otherwise do, and records the real link command with the linker's verdict.

Why: on the H100 machine of 2026-11-25 qkv._C came out with libstdc++.a linked in (no
libstdc++.so.6 among its NEEDED entries, 189 ostream/num_put symbols defined). A second C++
runtime in the process made every TORCH_CHECK crash inside ostream formatting; on the CPU
machines the same defect silently cuts every error message at its first number. Things that
produce such a link (tests/test_cxx_runtime_link.py reproduces each):
  * -static-libstdc++ in LDFLAGS or CXXFLAGS (or CFLAGS with older setuptools), or built into
    the compiler driver or a wrapper that CXX points at;
  * a -L directory (LDFLAGS, LIBRARY_PATH, an extension's library_dirs such as torch/lib or a
    CUDA lib folder) that holds libstdc++.a but no libstdc++.so, searched before gcc's own;
  * a libstdc++.so that is a linker script naming a static archive (gcc-toolset style);
  * a C driver (gcc) linking C++ objects: no libstdc++ at all on the link line.
The defence: name the very libstdc++.so.6 this (torch-importing) process has loaded on the link
line right after the objects, with --no-as-needed, so every C++ runtime reference is bound to
it before the driver's own -lstdc++ (static or not) is reached; and drop -static-libstdc++ and
libstdc++.a from the command. Every link is run with `-v -Wl,--trace` and recorded, with the
runtime check of scripts/cxx_runtime_check.py, in <build_temp>/link-command.txt (printed in
full with QKV_VERBOSE_BUILD=1); a library that still carries its own runtime fails the build.
"""
import inspect
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cxx_runtime_check  # noqa: E402

RECORD_NAME = "link-command.txt"


def loaded_libstdcxx(maps="/proc/self/maps"):
    """Path of the libstdc++.so.6 mapped into this process (torch's), or None."""
    try:
        with open(maps) as f:
            paths = {line.split()[-1] for line in f if "/libstdc++.so" in line}
    except OSError:
        return None
    paths = sorted(p for p in paths if os.path.isfile(p))
    return paths[0] if paths else None


def compiler_libstdcxx(driver):
    """The libstdc++.so.6 the compiler driver would pick, or None."""
    try:
        out = subprocess.run([driver, "-print-file-name=libstdc++.so.6"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return os.path.realpath(out) if os.path.isabs(out) and os.path.isfile(out) else None


def is_static_runtime_arg(arg):
    return arg in ("-static-libstdc++", "-l:libstdc++.a") or os.path.basename(arg) == "libstdc++.a"


def runtime_link_args(libstdcxx):
    return ["-Wl,--push-state,--no-as-needed", libstdcxx, "-Wl,--pop-state"]


def _output_of(cmd):
    return cmd[cmd.index("-o") + 1] if "-o" in cmd else None


def run_recorded_link(cmd, record_path, libstdcxx_source):
    """Runs the link `cmd` without static-runtime arguments, writes the record, checks the result."""
    cmd = [str(a) for a in cmd]
    dropped = [a for a in cmd if is_static_runtime_arg(a)]
    kept = [a for a in cmd if not is_static_runtime_arg(a)]
    if sys.platform.startswith("linux"):  # GNU ld / lld: the driver's and the linker's own account
        kept += ["-v", "-Wl,--trace"]
    proc = subprocess.run(kept, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    runtime_inputs = [line.strip() for line in proc.stdout.splitlines() if "stdc++" in line]
    lines = [f"link command as setuptools built it:\n  {shlex.join(cmd)}",
             f"dropped (static C++ runtime): {dropped or 'nothing'}",
             f"shared runtime named on the line: {libstdcxx_source}",
             f"command run:\n  {shlex.join(kept)}",
             f"exit status: {proc.returncode}",
             "linker inputs naming libstdc++ (ld --trace): " + ("; ".join(runtime_inputs) or "none")]
    verdict, check = None, "runtime check: not run (the link failed)"
    target = _output_of(kept)
    if proc.returncode == 0 and target:
        try:
            verdict = cxx_runtime_check.inspect(target)
            check = "runtime check: " + verdict.verdict()
        except (RuntimeError, subprocess.CalledProcessError) as error:
            check = f"runtime check: not run ({error})"
    lines += [check, "driver and linker output (-v, --trace):\n" + output]
    os.makedirs(os.path.dirname(os.path.abspath(record_path)), exist_ok=True)
    with open(record_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"qkv: link recorded in {record_path}; {check}", flush=True)
    if os.environ.get("QKV_VERBOSE_BUILD") == "1":
        print("\n".join(lines), flush=True)
    if proc.returncode != 0:
        print(output, file=sys.stderr, flush=True)
        raise subprocess.CalledProcessError(proc.returncode, kept)
    if verdict is not None and not verdict.ok:
        raise RuntimeError(f"{verdict.verdict()} The link command and the linker's trace are in "
                           f"{record_path}.")


def with_shared_cxx_runtime(build_ext_class):
    """A build_ext subclass whose extension links go through run_recorded_link with the shared
    C++ runtime named after the objects."""

    class SharedCxxRuntimeBuildExt(build_ext_class):
        def build_extension(self, ext):
            compiler = self.compiler
            if compiler.compiler_type != "unix" or sys.platform == "darwin":
                return super().build_extension(ext)  # libstdc++ is a Linux (GNU toolchain) matter
            driver = (getattr(compiler, "compiler_cxx", None) or ["c++"])[0]
            libstdcxx = loaded_libstdcxx()
            source = f"{libstdcxx} (loaded in the build process)"
            if libstdcxx is None:
                libstdcxx = compiler_libstdcxx(driver)
                source = f"{libstdcxx} ({driver} -print-file-name)" if libstdcxx else "none found"
            record_path = os.path.join(os.path.abspath(self.build_temp), RECORD_NAME)
            original_link = compiler.link

            def link(*args, **kwargs):
                if libstdcxx:
                    bound = inspect.signature(original_link).bind(*args, **kwargs)
                    bound.arguments["extra_postargs"] = (list(bound.arguments.get("extra_postargs") or [])
                                                         + runtime_link_args(libstdcxx))
                    args, kwargs = bound.args, bound.kwargs
                saved = {name: compiler.__dict__.get(name) for name in ("spawn", "call")}

                def execute(cmd, *_, **__):
                    run_recorded_link(cmd, record_path, source)

                for name in saved:
                    if hasattr(compiler, name):
                        setattr(compiler, name, execute)
                try:
                    return original_link(*args, **kwargs)
                finally:
                    for name, value in saved.items():
                        if value is None:
                            compiler.__dict__.pop(name, None)
                        else:
                            setattr(compiler, name, value)

            compiler.link = link
            try:
                super().build_extension(ext)
            finally:
                del compiler.link  # the class's method again

    return SharedCxxRuntimeBuildExt
