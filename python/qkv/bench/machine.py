"""Describe the machine a run happened on: recorded with every result, and used to name the
results folder, because numbers mean nothing without the hardware and versions behind them."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def gpu_name() -> str | None:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return None


def slugify(text: str) -> str:
    """Lowercase, runs of anything but letters and digits become one '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "unknown"


def machine_slug(device: str, threads: int) -> str:
    """Folder name for results: cpu-<model>-<n>threads or cuda-<gpu name>."""
    if device == "cuda":
        return slugify(f"cuda-{gpu_name() or 'unknown-gpu'}")
    model = re.sub(r"\((r|tm)\)|\b(processor|cpu)\b|\d+-core", " ", cpu_model(), flags=re.IGNORECASE)
    return slugify(f"cpu-{model}") + f"-{threads}threads"


def qkv_source_revision() -> str | None:
    """The git commit of the qkv source tree this run imported, when it is a checkout."""
    import qkv

    root = Path(qkv.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def describe_machine(device: str, dtype: torch.dtype, threads: int) -> dict:
    """Everything needed to interpret (and reproduce) the numbers of this run."""
    import qkv

    info = {
        "machine": machine_slug(device, threads),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,
        "cores_available": available_cores(),
        "cpu_model": cpu_model(),
        "cpu_capability": _cpu_capability(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "qkv": getattr(qkv, "__version__", "unknown"),
        "qkv_revision": qkv_source_revision(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def _cpu_capability() -> str | None:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        return None
