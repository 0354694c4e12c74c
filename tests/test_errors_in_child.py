"""Bad input raises a Python exception with the whole message, checked in a child process so that
a crash fails one test, naming the signal, instead of killing the run (issue 14, defect 1: with a
second C++ runtime linked in, every TORCH_CHECK crashed on the H100 machine, and on the CPU
machines the message stops at its first number)."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import qkv

# The child imports the qkv this run imports.
QKV_PATH = os.path.dirname(os.path.dirname(os.path.abspath(qkv.__file__)))
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# name -> (statement run in the child with q on `device`, full-message regex)
CASES = {
    "wrong dtype": ("ops.attention(q, q.double(), q)",
                    r"key must have the query's dtype Float; got a 4-D Double tensor of shape \[2, 3, 5, 8\]"),
    "wrong shape": ("ops.attention(q, q[..., :6], q)",
                    r"key must have shape \(2, key_heads, key_len, 8\) to match query \[2, 3, 5, 8\]; got a 4-D Float tensor of shape \[2, 3, 5, 6\]"),
    "dropout out of range": ("ops.attention(q, q, q, None, 1.5)", r"dropout_p must be in \[0, 1\]; got 1.5"),
}
CUDA_CASES = {
    "head dim over 256": ("ops.attention(q.new_zeros(1, 1, 4, 300), q.new_zeros(1, 1, 4, 300), q.new_zeros(1, 1, 4, 300))",
                          r"head_dim and value_head_dim must be at most 256; got 300 and 300"),
    "mixed devices": ("ops.attention(q, q.cpu(), q)", r"key must be on the query's device"),
}

CHILD = textwrap.dedent("""
    import re, sys, torch, qkv
    ops = torch.ops.qkv
    q = torch.randn(2, 3, 5, 8, device=sys.argv[1])
    try:
        {statement}
    except RuntimeError as error:
        message = str(error).splitlines()[0]
        print(message)
        sys.exit(0 if re.search(sys.argv[2], message) else 3)
    sys.exit(4)
""")


def run_in_child(statement, device, pattern):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([QKV_PATH, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", CHILD.format(statement=statement), device, pattern],
                          capture_output=True, text=True, env=env, timeout=120)


def check(statement, device, pattern):
    proc = run_in_child(statement, device, pattern)
    if proc.returncode < 0:
        pytest.fail(f"`{statement}` on {device} killed the process with {signal.Signals(-proc.returncode).name}:\n"
                    + proc.stderr[-3000:])
    assert proc.returncode != 4, f"`{statement}` on {device} raised no error"
    assert proc.returncode == 0, (f"`{statement}` on {device} raised {proc.stdout.strip()!r}, which does not match "
                                  f"{pattern!r}\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_a_full_message_on_cpu(case):
    statement, pattern = CASES[case]
    check(statement, "cpu", pattern)


@requires_cuda
@pytest.mark.parametrize("case", list(CASES) + list(CUDA_CASES))
def test_bad_input_raises_a_full_message_on_cuda(case):
    statement, pattern = {**CASES, **CUDA_CASES}[case]
    check(statement, "cuda", pattern)


def test_a_crash_in_the_child_fails_with_the_signal_named():
    proc = run_in_child("import os; os.kill(os.getpid(), 11)", "cpu", "x")
    assert proc.returncode == -signal.SIGSEGV
    with pytest.raises(pytest.fail.Exception, match="killed the process with SIGSEGV"):
        check("import os; os.kill(os.getpid(), 11)", "cpu", "x")
