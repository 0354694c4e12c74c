#!/usr/bin/env python3
"""The Python pieces of scripts/gpu_check.sh (`make gpu-check`), one subcommand each:

  device                 the visible GPU as shell assignments (GPU_NAME, GPU_ARCHS, MACHINE), or
                         exit 2 with a clear message when torch sees no CUDA GPU
  run-tests OUT PYTEST_ARGS...
                         runs pytest so that a test that crashes its process fails alone: with
                         pytest-xdist (a crashed worker is replaced, its test reported as failed),
                         else in a resume-after-crash loop; writes OUT.xml (JUnit) and OUT.log
  device-tests           the test files that run on every device (they declare conftest.py's
                         `device` fixture), one a line: run with -m "not cpu" for their GPU runs
  test-summary XML       counts, then one line per failure or error
  ncu-metrics            reads `ncu --query-metrics` output on stdin, prints the --metrics list
  ncu-summary CSV        per-kernel table from `ncu --csv --page raw` output
  collect DEST FILE...   copies at most 8 of the files (the ones that exist) into DEST

Kept free of qkv imports (only torch where needed) so it runs before the build and is unit
tested on machines without a GPU (tests/test_gpu_check.py).
"""
from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_COLLECTED = 8  # the device tool hands back at most 8 files

# ---- device -------------------------------------------------------------------------------------

def arch_list(capability: tuple[int, int]) -> str:
    """TORCH_CUDA_ARCH_LIST for this GPU: its own arch. The sm_90a-only kernels (wgmma, TMA: the
    cuda_sm90 group of csrc/sources.txt) get their own gencode from setup.py whenever the list has
    9.0, so the rest of the extension is not compiled twice (for sm_90 and sm_90a)."""
    major, minor = capability
    return f"{major}.{minor}"


def machine_name(gpu_name: str) -> str:
    """The benchmark's folder name for this GPU (qkv.bench.machine, loaded without importing qkv)."""
    spec = importlib.util.spec_from_file_location("qkv_bench_machine", ROOT / "python" / "qkv" / "bench" / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.slugify(f"cuda-{gpu_name}")


def device() -> int:
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda} build" if torch.version.cuda
                                                   else "a CPU-only build")
        print(f"gpu-check: no CUDA GPU visible to {sys.executable} ({build}); nothing to check here. "
              "Run it on a machine with a GPU (docs/cuda.md).", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0)
    print(f"GPU_NAME={shell_quote(name)}")
    print(f"GPU_ARCHS={shell_quote(arch_list(torch.cuda.get_device_capability(0)))}")
    print(f"MACHINE={shell_quote(machine_name(name))}")
    print(f"TORCH_VERSION={shell_quote(torch.__version__)}")
    return 0


def shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


# ---- tests --------------------------------------------------------------------------------------

def has_xdist() -> bool:
    return importlib.util.find_spec("xdist") is not None


DEVICE_FIXTURE = 'pytest.mark.usefixtures("device")'


def device_test_files(tests: Path = ROOT / "tests") -> list[str]:
    """The test modules parametrized over the device (tests/conftest.py), relative to ROOT: the
    core suite, which `make gpu-check` runs on the GPU beside tests/test_cuda.py."""
    return [str(f.relative_to(ROOT)) for f in sorted(tests.glob("test_*.py")) if DEVICE_FIXTURE in f.read_text()]


def run_tests(out: str, pytest_args: list[str], workers: int) -> int:
    """pytest with crash isolation; returns pytest's exit status (of the last round)."""
    log_path, xml_path = Path(out + ".log"), Path(out + ".xml")
    # --durations: the slowest tests, to keep the whole check inside its few minutes
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfE", "--durations=25", *pytest_args]
    if importlib.util.find_spec("pytest_timeout") is not None:
        base.append("--timeout=300")  # a hung test fails instead of eating the session
    with open(log_path, "w") as log:
        if has_xdist():
            cmd = base + ["-n", str(workers), f"--junitxml={xml_path}"]
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        paths = [a for a in base if os.path.exists(a.split("::")[0]) and a != sys.executable]
        return _resume_after_crash([a for a in base if a not in paths], paths, xml_path, log)


def _resume_after_crash(options: list[str], paths: list[str], xml_path: Path, log) -> int:
    """Without xdist: run everything; when the process dies, record the test it died in as failed
    and run the tests after it again, until none is left. Outcomes of a round that died come from
    its -v lines (it wrote no JUnit report)."""
    options = [o for o in options if not re.fullmatch(r"-[qv]+", o)]  # rounds run -v, collection -q
    collected = subprocess.run(options + paths + ["--collect-only", "-q"], capture_output=True, text=True).stdout
    remaining = [line.strip() for line in collected.splitlines() if "::" in line]
    suite = ET.Element("testsuite", name="pytest")
    status = 0
    while remaining:
        part = xml_path.with_suffix(f".part{len(suite)}.xml")
        log.write("$ " + " ".join(options) + f" -v <{len(remaining)} tests>\n")
        proc = subprocess.run(options + ["-v", f"--junitxml={part}", *remaining], capture_output=True, text=True)
        log.write(proc.stdout + proc.stderr)
        log.flush()
        if proc.returncode >= 0:  # the round finished: its report is complete
            suite.extend(ET.parse(part).getroot().iter("testcase"))
            part.unlink()
            status = status or proc.returncode
            break
        outcomes = dict(re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", proc.stdout, re.M))
        for nodeid, outcome in outcomes.items():
            if outcome in ("FAILED", "ERROR"):
                _add_case(suite, nodeid, "failure", f"{outcome.lower()} (see the log)")
            else:
                _add_case(suite, nodeid, "skipped" if outcome == "SKIPPED" else None, "")
        pending = [t for t in remaining if t not in outcomes]
        if not pending:
            break
        _add_case(suite, pending[0], "failure", f"the test process died with signal {-proc.returncode}")
        remaining = pending[1:]
        status = 1
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(xml_path)
    return status


def _add_case(suite: ET.Element, nodeid: str, kind: str | None, message: str) -> None:
    path, _, name = nodeid.partition("::")
    case = ET.SubElement(suite, "testcase", classname=path.removesuffix(".py").replace("/", "."), name=name)
    if kind:
        ET.SubElement(case, kind, message=message)


def test_summary(xml_path: str) -> tuple[str, list[str]]:
    """('N passed, N failed, N skipped', ['FAILED nodeid: first line of the reason', ...])."""
    root = ET.parse(xml_path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    lines = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        problem = next((child for child in case if child.tag in ("failure", "error")), None)
        if problem is not None:
            counts["failed"] += 1
            reason = (problem.get("message") or problem.text or "").strip().splitlines()
            kind = "FAILED" if problem.tag == "failure" else "ERROR"
            lines.append(f"{kind} {name}: {reason[0][:300] if reason else '(no message)'}")
        elif any(child.tag == "skipped" for child in case):
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return ", ".join(f"{n} {k}" for k, n in counts.items()), lines


# ---- Nsight Compute -----------------------------------------------------------------------------

# What the summary reports, each with candidate metric names (they differ across GPUs and ncu
# versions); the first that `ncu --query-metrics` lists is used.
NCU_QUANTITIES = {
    "registers/thread": ["launch__registers_per_thread"],
    "theoretical occupancy %": ["sm__maximum_warps_per_active_cycle_pct"],
    "achieved occupancy %": ["sm__warps_active.avg.pct_of_peak_sustained_active"],
    "issue slots busy %": ["sm__inst_issued.avg.pct_of_peak_sustained_active",
                           "smsp__issue_active.avg.pct_of_peak_sustained_active"],
    "tensor pipe %": ["sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
                      "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
                      "sm__inst_executed_pipe_tensor_op_hmma.avg.pct_of_peak_sustained_active"],
    "duration us": ["gpu__time_duration.sum"],
}


def ncu_metrics(query_output: str) -> dict[str, str]:
    """{quantity: metric} for the quantities this ncu can measure (`ncu --query-metrics` lists base
    names; a metric like x.avg.pct_of_peak_sustained_active is available when its base x is)."""
    available = set(re.findall(r"^\s*([a-z0-9_]+__[a-z0-9_]+)", query_output, re.M))
    chosen = {}
    for quantity, candidates in NCU_QUANTITIES.items():
        for metric in candidates:
            base = metric.split(".")[0]
            if base in available or base.startswith("launch__") or base == "gpu__time_duration":
                chosen[quantity] = metric
                break
    return chosen


def quantities_of(metrics: list[str]) -> dict[str, str]:
    """{quantity: metric} for a --metrics list that ncu_metrics chose."""
    return {q: m for q, candidates in NCU_QUANTITIES.items() for m in candidates if m in metrics}


def ncu_summary(csv_text: str, chosen: dict[str, str]) -> str:
    """One row per kernel launch from `ncu --csv --page raw` output (skips ncu's own log lines)."""
    start = csv_text.find('"ID"')
    if start < 0:
        return "ncu wrote no kernel results"
    rows = list(csv.DictReader(io.StringIO(csv_text[start:])))
    units = next((r for r in rows if not r.get("ID", "").isdigit()), {})  # the row under the header
    rows = [r for r in rows if r.get("ID", "").isdigit()]
    header = ["kernel", *chosen]
    table = [header]
    for r in rows:
        name = re.sub(r"\(.*", "", r.get("Kernel Name", "?")).replace("void ", "")
        table.append([name[:70], *(_number(r.get(metric, ""), _scale_to_us(quantity, units.get(metric, "")))
                                   for quantity, metric in chosen.items())])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in table)


# ncu picks the time unit per run (nanoseconds on the H100 of 2026-11-26, microseconds elsewhere).
_SECONDS_PER_UNIT = {"ns": 1e-9, "nsecond": 1e-9, "us": 1e-6, "usecond": 1e-6, "ms": 1e-3, "msecond": 1e-3,
                     "s": 1.0, "second": 1.0}


def _scale_to_us(quantity: str, unit: str) -> float:
    """Factor that turns a value in `unit` into the quantity's microseconds (1 for other quantities)."""
    if not quantity.endswith(" us"):
        return 1.0
    return _SECONDS_PER_UNIT.get(unit.strip(), 1e-6) / 1e-6


def _number(text: str, scale: float = 1.0) -> str:
    try:
        value = float(text.replace(",", "")) * scale
    except ValueError:
        return text or "-"
    return f"{value:.0f}" if value >= 100 or value == int(value) else f"{value:.1f}"


# ---- collecting files ---------------------------------------------------------------------------

def collect(dest: str, files: list[str]) -> list[str]:
    """Copies the first MAX_COLLECTED existing files flat into dest; returns what was copied."""
    existing = [f for f in files if os.path.isfile(f)][:MAX_COLLECTED]
    os.makedirs(dest, exist_ok=True)
    for f in existing:
        shutil.copy(f, os.path.join(dest, os.path.basename(f)))
    return existing


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "device":
        return device()
    if command == "run-tests":
        # One worker per core: on the H100 host (16 cores) 8 workers finished 2256 of the ~3070
        # CUDA tests in 200 s; 16 ran 473 of the slower ones (opcheck, compile) in 36 s.
        workers = int(os.environ.get("QKV_TEST_WORKERS", str(os.cpu_count() or 8)))
        return run_tests(args[0], args[1:], workers=workers)
    if command == "device-tests":
        print("\n".join(device_test_files()))
        return 0
    if command == "test-summary":
        counts, lines = test_summary(args[0])
        print("\n".join([counts, *lines]))
        return 0
    if command == "ncu-metrics":
        chosen = ncu_metrics(sys.stdin.read())
        print(",".join(chosen.values()))
        return 0 if chosen else 1
    if command == "ncu-summary":
        text = Path(args[0]).read_text(errors="replace")
        print(ncu_summary(text, quantities_of(args[1].split(",") if len(args) > 1 else [])))
        return 0
    if command == "collect":
        print("\n".join(collect(args[0], args[1:])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
