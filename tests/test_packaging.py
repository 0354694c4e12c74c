"""An sdist of the committed tree builds, and its wheel installs and works (issue 14, defect 3).

From a clean clone of HEAD: build the sdist; build a wheel from that sdist (one compile, with
--no-build-isolation so the installed torch is used: it proves the sdist carries every file the
build needs); install the wheel with --no-deps into an empty folder; from a folder outside the
repository, with only that folder on the path (plus this interpreter's torch), run
`python -m qkv.bench --list`, `import qkv` and one op call. Takes a full compile (MAX_JOBS, 2 by
default). Uncommitted changes are not in the clone: commit before relying on this test.
"""
import os
import pathlib
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(cmd, cwd, env=None, timeout=1800):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({proc.returncode}) in {cwd}:\n"
                    f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packaging")
    if not (ROOT / ".git").exists():
        pytest.fail(f"{ROOT} is not a git checkout: this test packages a clean clone of HEAD")
    head = run(["git", "rev-parse", "HEAD"], ROOT).strip()
    clone = tmp / "clone"
    run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(clone)], tmp)
    run(["git", "checkout", "-q", head], clone)
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "dist")], clone, env)
    (sdist,) = (tmp / "dist").glob("qkv-*.tar.gz")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(tmp / "wheels"),
         str(sdist)], tmp, env)
    (wheel,) = (tmp / "wheels").glob("qkv-*.whl")
    target = tmp / "target"
    target.mkdir()
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], tmp, env)
    return {"sdist": sdist, "wheel": wheel, "target": target, "env": {**env, "PYTHONPATH": str(target)},
            "cwd": tmp}


def test_the_sdist_carries_what_the_build_reads(installed):
    names = {name.split("/", 1)[1] for name in tarfile.open(installed["sdist"]).getnames() if "/" in name}
    for needed in ("csrc/sources.txt", "csrc/include/qkv/qkv.h", "csrc/cuda/mma_common.cuh", "csrc/cuda/mma_attention.cu",
                   "scripts/shared_cxx_runtime.py", "scripts/build_config.py",
                   "CMakeLists.txt", "cmake/QkvSources.cmake", "cmake/sm90a/CMakeLists.txt", "csrc/cuda/sm90_forward.cu",
                   "csrc/cuda/sm90_plan.h", "python/qkv/bench/__main__.py"):
        assert needed in names, f"{needed} is not in the sdist"


def test_the_installed_wheel_runs_the_benchmark_cli(installed):
    out = run([sys.executable, "-m", "qkv.bench", "--list", "--quick"], installed["cwd"], installed["env"], timeout=300)
    assert "fwd" in out, out


def test_the_installed_wheel_imports_and_runs_an_op(installed):
    script = textwrap.dedent("""
        import sys, torch, qkv
        assert qkv.__file__.startswith(sys.argv[1]), qkv.__file__
        q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
        out, _ = torch.ops.qkv.attention(q, q, q)
        ref = torch.softmax(q @ q.transpose(-1, -2) / 8 ** 0.5, -1) @ q
        assert torch.allclose(out, ref)
        print("ok", qkv.__file__)
    """)
    out = run([sys.executable, "-c", script, str(installed["target"])], installed["cwd"], installed["env"], timeout=300)
    assert out.startswith("ok")
