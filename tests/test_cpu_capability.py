"""The run-time choice of the CPU kernels' instruction set (csrc/cpu/cpu_capability.h).

The kernel translation units are built once per capability (default, avx2, avx512); the
library runs the best one this CPU supports up to avx512, or the one QKV_CPU_CAPABILITY names.
amx (the AVX-512 copy with AMX tile products for bfloat16) is opt-in; tests/test_cpu_amx.py
covers its kernels.
"""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import qkv
from qkv import _C
from reference import reference_attention, tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORTED = _C._supported_cpu_capabilities()
ALL = ("default", "avx2", "avx512", "amx")
AUTOMATIC = ("default", "avx2", "avx512")  # what an unset variable may choose


def run_python(code: str, capability: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    env.pop("QKV_CPU_CAPABILITY", None)
    if capability is not None:
        env["QKV_CPU_CAPABILITY"] = capability
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


CHECK_FORWARD = """
import torch, qkv
q, k, v = (torch.randn(2, 3, n, 40) for n in (70, 150, 150))
out, _ = torch.ops.qkv.attention(q, k, v, None, 0.0, True)
p = torch.softmax((q.double() @ k.double().transpose(-1, -2) / 40 ** 0.5).masked_fill(
    torch.ones(70, 150).triu(1).bool(), float('-inf')), -1)
print(qkv._C._cpu_capability(), (out.double() - p @ v.double()).abs().max().item())
"""


@pytest.mark.parametrize("capability", ALL)
def test_the_variable_selects_a_copy(capability):
    if capability not in SUPPORTED:
        pytest.skip(f"this CPU cannot run the {capability} kernels")
    result = run_python(CHECK_FORWARD, capability.upper() if capability == "avx2" else capability)
    assert result.returncode == 0, result.stderr
    name, error = result.stdout.split()
    assert name == capability and float(error) < 1e-5
    assert "Warning" not in result.stderr


def test_unset_selects_the_best_the_cpu_supports_up_to_avx512():
    result = run_python("import qkv; print(qkv._C._cpu_capability())", None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [[c for c in SUPPORTED if c in AUTOMATIC][-1]]


@pytest.mark.parametrize("capability", ALL)
def test_a_capability_the_cpu_lacks_is_refused_with_a_warning(capability):
    if capability in SUPPORTED:
        pytest.skip(f"this CPU supports {capability}; the refusal is covered by test_choice_of_a_capability")
    result = run_python(CHECK_FORWARD, capability)
    assert result.returncode == 0, result.stderr
    assert f"this CPU does not support {capability}" in result.stderr
    assert result.stdout.split()[0] == SUPPORTED[-1]


def test_a_value_that_names_no_capability_fails_the_import():
    result = run_python("import qkv", "avx1024")
    assert result.returncode != 0
    assert "QKV_CPU_CAPABILITY='avx1024' names no CPU capability" in result.stderr


@pytest.mark.parametrize("requested,best,chosen,warned", [
    ("", "avx512", "avx512", False),
    ("", "default", "default", False),
    ("default", "avx512", "default", False),
    ("AVX2", "avx512", "avx2", False),
    ("avx512", "avx512", "avx512", False),
    ("avx512", "avx2", "avx2", True),
    ("avx2", "default", "default", True),
    ("amx", "avx512", "avx512", True),
    ("AMX", "amx", "amx", False),
    ("", "amx", "avx512", False),  # amx is opt-in until it has run on an AMX CPU
])
def test_choice_of_a_capability(requested, best, chosen, warned):
    name, warning = _C._choose_cpu_capability(requested, best)
    assert name == chosen
    assert bool(warning) == warned
    if warned:
        assert f"this CPU does not support {requested}; using {best}" in warning


def test_setting_an_unknown_capability_is_a_clear_error():
    with pytest.raises(RuntimeError, match="'sse9' names no CPU capability"):
        _C._set_cpu_capability("sse9")


@pytest.mark.parametrize("capability", ALL)
def test_setting_a_capability_the_cpu_lacks_is_refused(capability):
    if capability in SUPPORTED:
        pytest.skip(f"this CPU supports {capability}")
    with pytest.raises(RuntimeError, match=f"this CPU cannot run the {capability} kernels"):
        _C._set_cpu_capability(capability)


def test_each_copy_runs_its_own_code():
    # The copies round differently (exp2 method, vector width of the row sums), so a switch
    # that silently kept one copy would show up as identical bits.
    q, k, v = (torch.randn(1, 2, n, 64) for n in (40, 300, 300))
    previous = _C._cpu_capability()
    try:
        outputs = {}
        for name in SUPPORTED:
            _C._set_cpu_capability(name)
            outputs[name] = torch.ops.qkv.attention(q, k, v)[0]
    finally:
        _C._set_cpu_capability(previous)
    want = reference_attention(q, k, v)
    for name, out in outputs.items():
        torch.testing.assert_close(out.double(), want, **tolerance(torch.float32), msg=name)
    copies = [name for name in SUPPORTED if name != "amx"]  # amx runs the AVX-512 copy; float32 is the same there
    for a, b in zip(copies, copies[1:]):
        assert not torch.equal(outputs[a], outputs[b]), f"{a} and {b} gave identical bits"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 instruction check")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_only_the_kernel_copies_use_avx():
    """Everything outside the qkv::AVX2 and qkv::AVX512 namespaces is built for plain x86-64:
    no VEX or EVEX instruction (their mnemonics start with 'v'), so the library loads and the
    default copy runs on a CPU without AVX."""
    library = qkv._C.__file__
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                             check=True).stdout
    # The mangled namespaces of the copies (qkv's, and ATen's vector types), wherever they occur in a symbol.
    in_copy = re.compile(r"3qkv(4AVX2|6AVX512)|2at3vec(4AVX2|6AVX512)")
    # GCC's clones (constant propagation, scalar replacement, split parts) are local symbols: only
    # the object that made them calls them, so one with AVX came from a copy and serves only it.
    # A cold part goes with its function: it is local when that function is a clone.
    local_clone = re.compile(r"\.(constprop|isra|part)\.\d+(\.cold)?$")
    offenders, function = {}, None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        fields = line.split("\t")
        if (function and len(fields) >= 2 and fields[1].startswith("v") and not in_copy.search(function)
                and not local_clone.search(function)):
            offenders.setdefault(function, fields[1].strip())
    assert not offenders, f"{len(offenders)} baseline functions use AVX, e.g. {list(offenders.items())[:5]}"
