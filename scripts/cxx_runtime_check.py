#!/usr/bin/env python3
"""Checks that a built qkv library uses the shared C++ runtime (libstdc++.so.6) instead of
carrying a private copy of it.

Why: on the H100 machine of 2026-11-25 the extension was linked with libstdc++.a. Two C++
runtimes (two sets of locale facets, two ios_base::Init) then lived in one process, and every
TORCH_CHECK failure crashed inside ostream formatting instead of raising (see
/work/shared/measurements/h100-2026-11-25/crash-backtrace.txt).

A library passes when
  * `readelf -d` lists libstdc++.so.6 among its NEEDED entries, and
  * `nm -C --defined-only` finds at most MAX_RUNTIME_MEMBERS members of libstdc++'s stream and
    locale classes (num_put, locale, ios_base, basic_ostream, ...) defined in it. A library
    linked against the shared runtime defines only inline instantiations from the headers
    (measured here, g++ 12: 0 in the CPU build of qkv._C, 3 copies of ~basic_stringbuf in the
    CUDA build); one with libstdc++.a inside defines hundreds (995 for a one-line ostringstream
    library, 1020 in qkv._C here; the H100 build had 189 ostream/num_put symbols).

Usage: cxx_runtime_check.py LIBRARY...  (prints one verdict line per library; exit 1 if any fails)
"""
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

RUNTIME_SONAME = "libstdc++.so.6"
MAX_RUNTIME_MEMBERS = 8
# Members (Class<...>::name) of libstdc++'s stream/locale classes. Template instantiations a
# program may legitimately emit (std::operator<< and friends) are not members and do not match.
RUNTIME_MEMBER = re.compile(
    r"\bstd::(?:__cxx11::)?(?:basic_ostream|basic_istream|basic_iostream|basic_ios|ios_base|locale|"
    r"num_put|num_get|numpunct|codecvt|ctype|basic_streambuf|basic_stringbuf|__basic_file)"
    r"(?:<[^()]*>)?::")


@dataclass
class RuntimeReport:
    path: str
    needed: list = field(default_factory=list)
    runtime_members: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return RUNTIME_SONAME in self.needed and len(self.runtime_members) <= MAX_RUNTIME_MEMBERS

    def verdict(self) -> str:
        problems = []
        if RUNTIME_SONAME not in self.needed:
            problems.append(f"{RUNTIME_SONAME} is not among its NEEDED entries {self.needed}")
        if len(self.runtime_members) > MAX_RUNTIME_MEMBERS:
            examples = "; ".join(self.runtime_members[:3])
            problems.append(f"it defines {len(self.runtime_members)} libstdc++ stream/locale members "
                            f"(at most {MAX_RUNTIME_MEMBERS} allowed), e.g. {examples}")
        if not problems:
            return (f"OK: {self.path} uses the shared C++ runtime (NEEDED {RUNTIME_SONAME}, "
                    f"{len(self.runtime_members)} libstdc++ stream/locale members defined)")
        return (f"FAIL: {self.path} carries its own C++ runtime: " + "; and ".join(problems)
                + ". Errors raised from C++ would crash the process instead of raising.")


def _run(tool: str, *args: str) -> list:
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} (binutils) is needed to check the C++ runtime of a built library")
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True).stdout.splitlines()


def inspect(path: str) -> RuntimeReport:
    needed = [m.group(1) for line in _run("readelf", "-d", "-W", path)
              if (m := re.search(r"\(NEEDED\).*\[(.+)\]", line))]
    members = [line.split(" ", 2)[-1] for line in _run("nm", "-C", "--defined-only", path)
               if RUNTIME_MEMBER.search(line)]
    return RuntimeReport(path, needed, members)


def main(paths) -> int:
    if not paths:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    reports = [inspect(p) for p in paths]
    for report in reports:
        print(report.verdict())
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
