"""scripts/cuda_decode_bench.py's own logic, run on the CPU before a GPU session spends device time on
it: its device is the CPU (the qkv CPU kernels ignore QKV_CUDA_DECODE, so every qkv side computes the
same function) and CUDA events are wall-clock stand-ins (test_cuda_tune_script.WallClockEvent). A
small grid, MHA and GQA, goes through end to end: the sides, the error column against SDPA, the
incremental rows, the summary line and the JSON file."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from test_cuda_tune_script import WallClockEvent

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("cuda_decode_bench", ROOT / "scripts" / "cuda_decode_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_decode_bench_runs_a_small_grid_end_to_end(tmp_path, monkeypatch, capsys):
    bench = load_script()
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu stand-in")
    monkeypatch.setattr(torch.cuda, "Event", WallClockEvent)
    out = tmp_path / "decode.json"
    bench.main(["--lengths", "70", "--batches", "1,2", "--heads", "4", "--gqa-kv-heads", "2", "--dim", "32",
                "--splits", "3", "--rounds", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    cases = {r["case"] for r in rows}
    assert cases == {"B1-S70", "B2-S70", "B1-S70-gqa2", "B2-S70-gqa2"}
    for case in cases:
        sides = {r["side"]: r for r in rows if r["case"] == case}
        assert set(sides) == {"default", "generic", "split", "split:3", "sdpa"}
        for name, r in sides.items():
            assert r["us"] > 0
            assert (r["err"] is None) == (name == "sdpa")
            assert name == "sdpa" or r["err"] < 2e-2, f"{case} {name}: err {r['err']}"  # bfloat16 rounding
    assert "| B2-S70-gqa2 | split |" in printed and "split vs sdpa: min" in printed
