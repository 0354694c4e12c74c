"""Tests of the benchmark runner (python -m qkv.bench): counts, grids, selection, checks, output.

No timing assertions: speed is measured by the benchmark, never asserted by tests.
"""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import qkv
from qkv.bench import __main__ as cli
from qkv.bench import workloads
from qkv.bench.cases import Case, cpu_grid, cuda_grid, select_cases
from qkv.bench.correctness import judge, relative_error
from qkv.bench.flops import attention_flops, projection_flops
from qkv.bench.machine import machine_slug, slugify
from qkv.bench.memory import PeakRssProbe
from qkv.bench.report import flat_rows, write_all
from qkv.bench.runner import CaseResult, RunConfig, RunResult, SideResult, run_cases
from qkv.bench.timing import SideTiming, TimingConfig, paired_speedup

FAST = TimingConfig(block_s=0.0005, min_repeats=2, max_repeats=2, case_budget_s=0.0)


def micro(name="micro-fwdbwd", mode="fwdbwd", causal=True, key_padding=False, level="core", l=16, s=16):
    return Case(name, name.rsplit("-", 1)[0], level, mode, 2, 2, l, s, 8, causal=causal, key_padding=key_padding)


# ----- FLOP counts --------------------------------------------------------------------------

def test_attention_flops_standard_count():
    assert attention_flops(2, 3, 5, 7, 11) == 4 * 2 * 3 * 5 * 7 * 11
    assert attention_flops(2, 3, 5, 7, 11, causal=True) == 2 * 2 * 3 * 5 * 7 * 11
    fwd = attention_flops(1, 8, 512, 512, 64)
    assert attention_flops(1, 8, 512, 512, 64, mode="bwd") == 2.5 * fwd
    assert attention_flops(1, 8, 512, 512, 64, mode="fwdbwd") == 3.5 * fwd
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 1, 1, 1, mode="backward")


def test_module_case_flops_add_projections():
    case = Case("m", "m", "module", "eval", 2, 8, 512, 512, 64)
    attention = attention_flops(2, 8, 512, 512, 64)
    assert case.flops == attention + 2 * (2 * 512) * 512 * (4 * 512)
    train = Case("m", "m", "module", "train", 2, 8, 512, 512, 64)
    assert train.flops == 3.5 * attention + projection_flops(1024, 512, "fwdbwd")


# ----- grids and selection ------------------------------------------------------------------

def test_cpu_grid_follows_benchmarks_doc():
    grid = {c.name: c for c in cpu_grid()}
    shapes = {(c.group, c.batch, c.heads, c.q_len, c.kv_len, c.head_dim) for c in grid.values()}
    for expected in [("small", 4, 8, 128, 128, 64), ("mid", 2, 8, 512, 512, 64), ("mid-causal", 2, 8, 512, 512, 64),
                     ("long", 1, 8, 1024, 1024, 64), ("longer-causal", 1, 4, 2048, 2048, 64),
                     ("wide", 2, 4, 512, 512, 128), ("cross-pad", 2, 8, 256, 1024, 64), ("decode", 4, 8, 1, 2048, 64)]:
        assert expected in shapes
    assert grid["cross-pad-fwd"].key_padding and grid["mid-causal-fwdbwd"].causal
    assert [c.mode for c in grid.values() if c.family == "decode"] == ["fwd"]
    modules = [c for c in grid.values() if c.level == "module"]
    assert {(c.batch, c.embed_dim, c.heads) for c in modules} == {(2, 512, 8)}
    assert sorted({c.q_len for c in modules}) == [512, 1024, 2048]
    assert {c.mode for c in modules} == {"train", "train-weights", "eval"}
    assert {c.name for c in cpu_grid(quick=True)} < set(grid)


def test_cuda_grid_is_flash_attention_convention():
    core = [c for c in cuda_grid() if c.level == "core"]
    assert {c.batch * c.q_len for c in core} == {16384}
    assert {c.heads * c.head_dim for c in core} == {2048}
    assert {c.head_dim for c in core} == {64, 128}
    assert sorted({c.q_len for c in core}) == [512, 1024, 2048, 4096, 8192, 16384]
    assert {c.mode for c in core} == {"fwd", "bwd", "fwdbwd"} and {c.causal for c in core} == {False, True}


def test_select_cases_by_name_glob_group_family_level():
    grid = cpu_grid()
    names = lambda sel: [c.name for c in select_cases(grid, sel)]  # noqa: E731
    assert names(None) == [c.name for c in grid]
    assert names("decode-fwd") == ["decode-fwd"]
    assert names("mid-causal") == ["mid-causal-fwd", "mid-causal-fwdbwd"]
    assert names("mid") == ["mid-fwd", "mid-fwdbwd", "mid-causal-fwd", "mid-causal-fwdbwd"]
    assert all(n.endswith("-fwdbwd") for n in names("*-fwdbwd"))
    assert all(c.level == "module" for c in select_cases(grid, "module"))
    assert names("decode-fwd, small-fwd") == ["small-fwd", "decode-fwd"]  # grid order, not token order
    with pytest.raises(ValueError, match="'nope' matches no case"):
        select_cases(grid, "small-fwd,nope")


def test_case_rejects_bad_values():
    with pytest.raises(ValueError, match="mode"):
        Case("x", "x", "core", "train", 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="q_len must equal kv_len"):
        Case("x", "x", "module", "eval", 1, 1, 2, 3, 1)


def test_key_padding_lengths_are_ragged_and_nonempty():
    case = Case("c", "c", "core", "fwd", 4, 1, 4, 64, 8, key_padding=True)
    lens = case.valid_kv_lens()
    assert lens[0] == 64 and min(lens) >= 32 and len(set(lens)) == 4


def test_key_padding_inputs_agree_between_conventions():
    case = Case("c", "c", "core", "fwd", 2, 2, 4, 16, 8, key_padding=True)
    inputs = workloads.make_core_inputs(case, "cpu", torch.float32, 0)
    assert inputs.sdpa_mask.dtype == torch.bool and inputs.qkv_bias.shape == (2, 1, 1, 16)
    assert torch.equal(inputs.sdpa_mask, inputs.qkv_bias == 0)
    assert torch.isinf(inputs.qkv_bias[1, 0, 0, -1])


# ----- correctness and timing helpers -------------------------------------------------------

def test_relative_error_and_judge():
    ref = {"out": torch.tensor([1.0, 2.0])}
    assert relative_error({"out": torch.tensor([1.0, 2.2])}, ref) == pytest.approx(0.1)
    assert relative_error({"out": torch.tensor([float("nan"), 2.0])}, ref) == math.inf
    with pytest.raises(ValueError, match="lacks"):
        relative_error({}, ref)
    case = micro()
    assert judge(case, {"qkv": 3e-7, "sdpa": 2e-7}, torch.float32).passed
    bad = judge(case, {"qkv": 1e-2, "sdpa": 2e-7}, torch.float32)
    assert not bad.passed and bad.consistent and "1.0e-02" in bad.message
    broken = judge(case, {"qkv": 1.0, "sdpa": 1.0}, torch.float32)
    assert not broken.passed and not broken.consistent


def test_paired_speedup_is_median_of_round_ratios():
    ref = SideTiming(1, [2.0, 4.0, 9.0])
    new = SideTiming(1, [1.0, 1.0, 3.0])
    assert paired_speedup(ref, new) == 3.0


def test_peak_rss_probe_sees_a_large_allocation():
    probe = PeakRssProbe()
    probe.start()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    peak = probe.peak_above_baseline()
    del block
    assert peak >= 48 << 20


# ----- reports ------------------------------------------------------------------------------

def _fake_run() -> RunResult:
    meta = {"machine": "cpu-test-2threads", "device": "cpu", "dtype": "float32", "threads": 2, "cores_available": 2,
            "cpu_model": "Test CPU", "cpu_capability": "AVX2", "python": "3.11", "torch": torch.__version__,
            "qkv": qkv.__version__, "qkv_revision": None, "matmul_gflops": 100.0, "matmul_gflops_start": 100.0,
            "matmul_gflops_end": 90.0, "matmul_n": 2048, "duration_s": 1.0, "date_utc": "2026-01-01T00:00:00Z",
            "memory_measured": True}
    results = []
    for l in (512, 1024):
        case = Case(f"t{l}-fwd", f"t{l}", "core", "fwd", 1, 8, l, l, 64)
        sides = {}
        for name, t, peak in (("qkv", 0.01, 2 << 20), ("sdpa", 0.012, 3 << 20), ("sdpa_math", 0.03, 40 << 20)):
            sides[name] = SideResult(name, max_error=1e-7, timing=SideTiming(1, [t, t]), gflops=case.flops / t / 1e9,
                                     peak_bytes=peak)
        results.append(CaseResult(case, "ok", sides=sides, speedups={"sdpa": 1.2, "sdpa_math": 3.0},
                                  memory_ratios={"sdpa": 1.5, "sdpa_math": 20.0}, fraction_of_matmul=0.5))
    bad = Case("t-bad-fwd", "t-bad", "core", "fwd", 1, 1, 8, 8, 8)
    results.append(CaseResult(bad, "wrong", "t-bad-fwd: qkv max relative error 1e-1", sides={"qkv": SideResult("qkv", "wrong", max_error=0.1)}))
    results.append(CaseResult(Case("m-eval", "m", "module", "eval", 2, 8, 512, 512, 64), "skipped", "not available"))
    return RunResult(meta, results)


def test_report_files_have_ratio_columns_and_metadata(tmp_path):
    run = _fake_run()
    written = write_all(run, tmp_path / "out")
    for key in ("csv", "json", "markdown", "speedup", "memory"):
        assert written[key].exists() and written[key].stat().st_size > 0
    with open(written["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["t512-fwd", "t1024-fwd", "t-bad-fwd", "m-eval"]
    for column in ("qkv_ms", "sdpa_ms", "speedup_vs_sdpa", "speedup_vs_sdpa_math", "memory_ratio_vs_sdpa",
                   "qkv_peak_mib", "qkv_pct_of_matmul", "qkv_max_error", "status"):
        assert column in rows[0]
    assert float(rows[0]["speedup_vs_sdpa_math"]) == 3.0 and rows[2]["status"] == "wrong"
    data = json.loads(written["json"].read_text())
    assert data["meta"]["torch"] == torch.__version__ and data["samples"]["t512-fwd"]["qkv"]["seconds_per_call"]
    md = written["markdown"].read_text()
    assert md.startswith("# qkv benchmark: cpu-test-2threads")
    assert f"torch {torch.__version__}" in md and "**threads**: 2" in md and "Test CPU" in md
    assert "| t512-fwd |" in md and "1.20x" in md and "FAILED" in md and "Skipped 1 case" in md


# ----- end-to-end runs ----------------------------------------------------------------------

def test_smoke_run_micro_cases_with_memory(tmp_path):
    cases = [micro(), micro("micro-pad-fwd", "fwd", causal=False, key_padding=True, l=4, s=32),
             micro("micro-bwd", "bwd")]
    run = run_cases(cases, RunConfig(threads=1, timing=FAST, matmul_n=64), progress=False)
    assert [r.status for r in run.results] == ["ok"] * 3, [r.message for r in run.results]
    written = write_all(run, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"results.csv", "results.json", "results.md", "speedup.png", "memory.png"}
    rows = list(csv.DictReader(open(written["csv"])))
    for row in rows:
        assert float(row["speedup_vs_sdpa"]) > 0 and float(row["speedup_vs_sdpa_math"]) > 0
        assert row["qkv_peak_mib"] != "" and row["sdpa_math_peak_mib"] != ""
        assert float(row["qkv_max_error"]) < 1e-5
    assert run.meta["threads"] == 1 and run.meta["matmul_gflops"] > 0


def test_wrong_qkv_result_fails_loudly_and_is_not_timed(monkeypatch, capsys):
    real = workloads.make_core_side

    def off_by_one_percent(case, inputs, name):
        side = real(case, inputs, name)
        if name != "qkv":
            return side
        compute = side.compute
        return workloads.Side(name, lambda: {k: v * 1.01 for k, v in compute().items()}, side.context)

    monkeypatch.setattr(workloads, "make_core_side", off_by_one_percent)
    run = run_cases([micro()], RunConfig(threads=1, timing=FAST, memory=False, matmul_n=64), progress=False)
    (result,) = run.results
    assert result.status == "wrong" and run.failed == [result]
    assert result.sides["qkv"].timing is None and not result.speedups
    assert "FAIL" in capsys.readouterr().err


def test_module_cases_skip_with_notice_when_module_missing(monkeypatch, capsys):
    monkeypatch.delattr(qkv, "MultiheadAttention", raising=False)
    case = Case("module-L8-eval", "module-L8", "module", "eval", 2, 2, 8, 8, 8)
    run = run_cases([case], RunConfig(threads=1, timing=FAST, memory=False, matmul_n=64), progress=False)
    assert run.results[0].status == "skipped"
    err = capsys.readouterr().err
    assert "NOTICE" in err and "qkv.MultiheadAttention" in err and "module-L8-eval" in err


def test_module_cases_run_against_the_drop_in_contract(monkeypatch):
    # A stand-in with torch's constructor and forward: exercises the module path until
    # qkv.MultiheadAttention lands (memory off: the measuring child imports the real qkv).
    class StandIn(torch.nn.MultiheadAttention):
        pass

    monkeypatch.setattr(qkv, "MultiheadAttention", StandIn, raising=False)
    cases = [Case(f"module-L8-{m}", "module-L8", "module", m, 2, 2, 8, 8, 8) for m in ("train", "train-weights", "eval")]
    run = run_cases(cases, RunConfig(threads=1, timing=FAST, memory=False, matmul_n=64), progress=False)
    assert [r.status for r in run.results] == ["ok"] * 3, [r.message for r in run.results]
    rows = flat_rows(run)
    assert all(row["speedup_vs_torch_mha"] > 0 for row in rows)
    assert all(row["qkv_max_error"] < 1e-5 for row in rows)


# ----- command line -------------------------------------------------------------------------

def test_cli_list_and_bad_selection(capsys):
    assert cli.main(["--list", "--cases", "decode"]) == 0
    assert capsys.readouterr().out.split()[0] == "decode-fwd"
    assert cli.main(["--cases", "nope", "--list"]) == 2
    assert "matches no case" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_cli_cuda_without_gpu_fails_clearly(capsys):
    assert cli.main(["--device", "cuda", "--cases", "d128-L1024-fwd"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_machine_slug_is_sanitized():
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    slug = machine_slug("cpu", 2)
    assert slug.startswith("cpu-") and slug.endswith("-2threads") and slug == slugify(slug)


def test_backend_that_rejects_the_case_is_left_out_with_a_note(monkeypatch, capsys):
    # The GPU side list on the CPU: the CUDA-only backends raise, are reported and left out,
    # and the remaining sides are still compared.
    from qkv.bench import runner

    monkeypatch.setattr(runner, "side_names", lambda case, device: workloads.CUDA_CORE_SIDES)
    run = run_cases([micro(mode="fwd")], RunConfig(threads=1, timing=FAST, memory=False, matmul_n=64), progress=False)
    (result,) = run.results
    assert result.status == "ok", result.message
    assert result.sides["sdpa_cudnn"].status == "error" and result.sides["sdpa_cudnn"].timing is None
    assert result.sides["sdpa"].timing is not None and "sdpa" in result.speedups
    assert "sdpa_cudnn left out" in capsys.readouterr().err


def test_fraction_of_matmul_pairs_each_round():
    from qkv.bench.timing import paired_fraction_of_matmul

    n = 10
    mm_flops = 2.0 * n**3
    # Round 2 is a slow spell (both sides 2x slower): the paired ratio is unchanged.
    candidate = SideTiming(1, [1.0, 2.0, 1.0])
    matmul = SideTiming(1, [0.5, 1.0, 0.5])
    assert paired_fraction_of_matmul(candidate, mm_flops, matmul, n) == pytest.approx(0.5)


def test_low_precision_run_passes_its_tolerance():
    run = run_cases([micro(l=64, s=64)], RunConfig(dtype=torch.bfloat16, threads=1, timing=FAST, memory=False,
                                                    matmul_n=64), progress=False)
    (result,) = run.results
    assert result.status == "ok", result.message
    assert 0 < result.sides["qkv"].max_error < 3e-2
