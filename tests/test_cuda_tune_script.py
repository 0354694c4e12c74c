"""scripts/cuda_tune.py's own logic, run on the CPU before a GPU session spends device time on it.

The script times CUDA kernels; here its device is the CPU (the qkv CPU kernels ignore the tile
variables, so every "tile" computes the same function) and CUDA events are wall-clock stand-ins.
This checks that a small grid goes through end to end: the tile probe, the sides of both modes, a
backend that refuses the shape being dropped (cuDNN has no CPU kernel), the error column against
the flash backend, the tables and the JSON file.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class WallClockEvent:
    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def load_script():
    spec = importlib.util.spec_from_file_location("cuda_tune", ROOT / "scripts" / "cuda_tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_tune_runs_a_small_grid_end_to_end(tmp_path, monkeypatch, capsys):
    tune = load_script()
    monkeypatch.setattr(tune, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu stand-in")
    monkeypatch.setattr(torch.cuda, "Event", WallClockEvent)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = tmp_path / "tune.json"
    tune.main(["--dims", "64", "--lengths", "32", "--tokens", "64", "--rounds", "1", "--matmul-n", "64",
               "--dtype", "float16", "--sm90", "--json", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    sides = {(r["mode"], r["side"]) for r in result["rows"]}
    assert ("fwd", "fa2:128x128x4") in sides and ("fwd", "mma") in sides and ("fwd", "flash") in sides
    assert ("fwdbwd", "fa2:128x128x4/128x128x8") in sides and ("fwdbwd", "fa2-det") in sides
    assert ("fwd", "sm90") in sides and ("fwdbwd", "sm90") in sides  # --sm90 (the CPU ignores the kernel choice)
    assert not any(side == "cudnn" for _, side in sides), "a backend without a kernel for the call is dropped"
    assert "cudnn dropped" in printed
    for r in result["rows"]:
        assert r["ms"] > 0 and r["tflops"] > 0
        if r["side"].startswith(("fa2", "mma", "sm90")):
            assert r["err"] is not None and r["err"] < 2e-2, r  # the same function as the flash backend
    assert "| 64 | fwd | fa2:128x128x4 |" in printed  # the ranking table
