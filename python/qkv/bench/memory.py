"""Peak memory of one side of a case, each measured in its own fresh child process.

Why a child per measurement: the allocator keeps freed memory, so a side measured after another
in the same process looks cheaper than it is. Why not ``ru_maxrss`` alone: on Linux a child
started by exec inherits its parent's peak RSS as its own ru_maxrss (exec_mmap folds the old
address space's high-water mark into the process's), so a child of a large parent reports the
parent's peak. The child therefore reads VmHWM, the peak RSS of its own address space, after
resetting it to the current RSS (``/proc/self/clear_refs`` = 5) once imports, a tiny warm-up of
the same code path (thread pools, library buffers) and the inputs are in place; where /proc is
unavailable it falls back to ru_maxrss differences. Children fork from a small server process
(``python -m qkv.bench.memory_server``) that has imported torch and qkv and done nothing else, so each
costs a fraction of a second instead of a full ``import torch``.

On a GPU the caching allocator's own counters are exact (they count live tensor bytes, not
cached blocks), so CUDA peaks are taken in-process with ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import atexit
import gc
import json
import os
import resource
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import qkv  # registers torch.ops.qkv before the server forks

from .cases import Case
from .workloads import Side, make_inputs, make_sides

CHILD_TIMEOUT_S = 600.0
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@dataclass
class MemoryResult:
    peak_bytes: int | None
    method: str
    error: str | None = None


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRssProbe:
    """Peak resident memory of this process above a baseline taken at ``start()``."""

    def start(self) -> None:
        try:
            self._baseline = _status_kib("VmRSS") * 1024
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method = "peak RSS (VmHWM reset at baseline) in a child process"
            self._read = lambda: _status_kib("VmHWM") * 1024
        except OSError:
            # ru_maxrss is in KiB on Linux, bytes on macOS.
            unit = 1 if sys.platform == "darwin" else 1024
            self._read = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
            self._baseline = self._read()
            self.method = "ru_maxrss above baseline in a child process"

    def peak_above_baseline(self) -> int:
        return max(0, self._read() - self._baseline)


def _build_side(case: Case, side_name: str, device: str, dtype: torch.dtype, seed: int) -> tuple[object, Side]:
    inputs = make_inputs(case, device, dtype, seed)
    side = make_sides(case, inputs, (side_name,), device, dtype, seed)[side_name]
    if isinstance(side, Exception):
        raise side
    return inputs, side


def measure_here(case: Case, side_name: str, device: str, dtype: torch.dtype, threads: int, seed: int) -> MemoryResult:
    """Measure in the current (fresh) process: the body of the child."""
    torch.set_num_threads(threads)
    tiny_inputs, tiny = _build_side(case.tiny(), side_name, device, dtype, seed)
    with tiny.context():
        tiny.compute()
    del tiny, tiny_inputs
    inputs, side = _build_side(case, side_name, device, dtype, seed)
    gc.collect()
    probe = PeakRssProbe()
    probe.start()
    with side.context():
        result = side.compute()
    peak = probe.peak_above_baseline()
    del result, inputs, side
    return MemoryResult(peak, probe.method)


def _measure_spec(spec: dict) -> dict:
    try:
        result = measure_here(
            Case.from_dict(spec["case"]), spec["side"], spec["device"], getattr(torch, spec["dtype"]),
            spec["threads"], spec["seed"],
        )
        return {"peak_bytes": result.peak_bytes, "method": result.method, "error": None}
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent as text
        return {"peak_bytes": None, "method": "child process", "error": f"{type(exc).__name__}: {exc}"}


def _fork_and_measure(spec: dict) -> dict:
    """Fork a fresh child of this (import-only) server, measure there, return its answer."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        os.dup2(2, 1)  # stray prints must not corrupt the server's answer stream
        code = 0
        try:
            payload = json.dumps(_measure_spec(spec)).encode()
            with os.fdopen(write_fd, "wb") as out:
                out.write(payload)
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"peak_bytes": None, "method": "child process",
                "error": f"child died ({_describe_status(status)})"}
    return json.loads(data)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


def serve() -> None:
    """The memory server: one JSON spec per stdin line, one JSON answer per stdout line.

    It only imports torch and qkv and never runs an op itself, so every forked child starts from
    the same clean state (no thread pools, no allocator caches) at the cost of a fork.
    """
    for line in sys.stdin:
        if line.strip():
            answer = _fork_and_measure(json.loads(line))
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()


class MemoryServer:
    """Client of ``python -m qkv.bench.memory_server``, started on first use and reused."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        package_root = str(Path(qkv.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        return subprocess.Popen(
            [sys.executable, "-m", "qkv.bench.memory_server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=env, start_new_session=True,
        )

    def measure(self, spec: dict, timeout_s: float = CHILD_TIMEOUT_S) -> MemoryResult:
        if self._process is None or self._process.poll() is not None:
            self._process = self._start()
        process = self._process
        try:
            process.stdin.write(json.dumps(spec) + "\n")
            process.stdin.flush()
        except BrokenPipeError:
            self.close()
            return MemoryResult(None, "child process", "memory server exited")
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        line = process.stdout.readline() if ready else ""
        if not line:
            reason = f"timed out after {timeout_s:.0f} s" if not ready else "memory server exited"
            self.close()
            return MemoryResult(None, "child process", reason)
        answer = json.loads(line)
        return MemoryResult(answer["peak_bytes"], answer["method"], answer["error"])

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the server and any child it forked
            except ProcessLookupError:
                pass
        process.wait()
        for stream in (process.stdin, process.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


_server: MemoryServer | None = None


def measure_in_child(case: Case, side_name: str, device: str, dtype: torch.dtype, threads: int, seed: int) -> MemoryResult:
    """Peak memory of one call of ``side_name`` on ``case``, measured in a fresh child process."""
    global _server
    if _server is None:
        _server = MemoryServer()
        atexit.register(_server.close)
    spec = {"case": case.to_dict(), "side": side_name, "device": device,
            "dtype": str(dtype).removeprefix("torch."), "threads": threads, "seed": seed}
    return _server.measure(spec)


def measure_cuda(side: Side) -> MemoryResult:
    """Peak CUDA memory of one call above what was allocated before it (same process)."""
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with side.context():
        result = side.compute()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline
    del result
    return MemoryResult(max(0, peak), "torch.cuda.max_memory_allocated above baseline")
