"""The machinery of the one suite for every device (tests/conftest.py), checked without a GPU: a
throwaway test module run by pytest in a child process, with this conftest.py, and the `device`
parameter set to "cuda" by hand (direct parametrization overrides the fixture, so no GPU is needed
to see how a cuda run is judged)."""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

MODULE = '''
import pytest


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fails(device):
    raise RuntimeError("illegal memory access")


@pytest.mark.parametrize("device", ["cuda"])
def test_served(device):
    pass
'''


def run_pytest(tmp_path, *args):
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_module.py").write_text(textwrap.dedent(MODULE))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q", *args, str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    return proc.stdout + proc.stderr


def outcomes(text):
    return {line.split()[1].split("::")[-1]: line.split()[0] for line in text.splitlines()
            if line.split() and line.split()[0] in ("PASSED", "FAILED", "XFAIL", "SKIPPED", "ERROR")
            and "::" in line}


def test_a_cuda_run_is_judged_like_a_cpu_run(tmp_path):
    got = outcomes(run_pytest(tmp_path))
    assert got == {"test_fails[cpu]": "FAILED", "test_fails[cuda]": "FAILED", "test_served[cuda]": "PASSED"}, got


def test_runs_carry_their_device_mark(tmp_path):
    # -m cpu keeps exactly the cpu runs (so -m "not cpu" keeps exactly the others: gpu-check's selection)
    assert list(outcomes(run_pytest(tmp_path, "-m", "cpu"))) == ["test_fails[cpu]"]
