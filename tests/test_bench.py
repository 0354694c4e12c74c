"""Tests of the benchmark runner (python -m qkv.bench): counts, grids, selection, checks, output.

No timing assertions: speed is measured by the benchmark, never asserted by tests.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import pytest
import torch

import qkv
from qkv.bench import __main__ as cli
from qkv.bench import targets as tg
from qkv.bench import workloads
from qkv.bench.cases import Case, cpu_grid, cuda_grid, extra_cases, group_aliases, select_cases, targets_grid
from qkv.bench.correctness import judge, relative_error
from qkv.bench.flops import attention_flops, projection_flops
from qkv.bench.machine import machine_slug, slugify
from qkv.bench.memory import PeakRssProbe
from qkv.bench.report import TARGETS_META, flat_rows, format_terminal, thread_scaling_table, write_all
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
    # Training also times torch with its default need_weights=True against qkv without weights.
    assert rows[0]["speedup_vs_torch_mha_weights"] > 0 and rows[0]["torch_mha_weights_max_error"] < 1e-5
    assert rows[1]["speedup_vs_torch_mha_weights"] is None and rows[2]["speedup_vs_torch_mha_weights"] is None


def test_torch_weights_side_returns_weights_and_shares_the_reference_weights():
    case = Case("module-L8-train", "module-L8", "module", "train", 2, 2, 8, 8, 8)
    inputs = workloads.make_module_inputs(case, "cpu", torch.float32, 0)
    sides = workloads.make_sides(case, inputs, workloads.MODULE_TRAIN_SIDES, "cpu", torch.float32, 0)
    plain, weighted = sides["torch_mha"].compute(), sides["torch_mha_weights"].compute()
    assert "weights" not in plain and weighted["weights"].shape == (2, 8, 8)
    assert torch.allclose(plain["out"], weighted["out"], atol=1e-6)


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


# ----- issue 4 targets (--cases targets) ----------------------------------------------------

def test_targets_grid_has_issue_4_shapes_and_reuses_grid_cases():
    grid = {c.name: c for c in cpu_grid()}
    cases = {c.name: c for c in targets_grid()}
    shape = lambda c: (c.batch, c.heads, c.q_len, c.kv_len, c.head_dim)  # noqa: E731
    assert shape(cases["long2k-fwd"]) == (1, 8, 2048, 2048, 64)
    assert shape(cases["long2k-d128-fwd"]) == (1, 8, 2048, 2048, 128)
    assert shape(cases["mid-fwd"]) == (2, 8, 512, 512, 64) and not cases["mid-fwd"].causal
    assert cases["long2k-causal-fwdbwd"].causal and not cases["long2k-fwdbwd"].causal
    assert shape(cases["decode-fwd"]) == (4, 8, 1, 2048, 64)
    for l in (1024, 2048, 4096):
        c = cases[f"module-E256-L{l}-train"]
        assert (c.batch, c.embed_dim, c.heads, c.q_len, c.mode) == (2, 256, 4, l, "train")
    scaling = [c for c in cases.values() if c.scaling_threads]
    assert {(c.mode, c.scaling_threads, shape(c)) for c in scaling} == {
        ("fwd", 2, (1, 8, 2048, 2048, 64)), ("fwdbwd", 2, (1, 8, 2048, 2048, 64))}
    # A case the grid already has is the grid's own case, so its numbers compare across runs.
    shared = set(cases) & set(grid)
    assert {"small-fwd", "small-fwdbwd", "decode-fwd", "mid-fwd", "module-L1024-train",
            "module-L2048-train-weights"} <= shared
    assert all(cases[n] == grid[n] for n in shared)
    # Every target reads cases of the group.
    for target in tg.TARGETS:
        assert target.case in cases and (target.base_case is None or target.base_case in cases)


def test_targets_are_selected_only_on_request():
    grid = cpu_grid()
    extra, aliases = extra_cases("cpu"), group_aliases("cpu")
    assert select_cases(grid, None, extra, aliases) == grid  # the default run is unchanged
    chosen = [c.name for c in select_cases(grid, "targets", extra, aliases)]
    assert sorted(chosen) == sorted(c.name for c in targets_grid())
    # Levels, rows and globs keep meaning the grid: no 4096-token module case sneaks in.
    assert not any("E256" in c.name for c in select_cases(grid, "module,*-train", extra, aliases))
    assert [c.name for c in select_cases(grid, "long2k-causal", extra, aliases)] == ["long2k-causal-fwdbwd"]
    # With --quick, grid cases the quick grid lacks come from the targets group.
    quick = cpu_grid(quick=True)
    chosen_quick = select_cases(quick, "targets", extra_cases("cpu", quick=True), aliases)
    assert sorted(c.name for c in chosen_quick) == sorted(chosen)
    assert extra_cases("cuda") == [] and group_aliases("cuda") == {}
    assert cli.wants_targets("small-fwd, targets") and not cli.wants_targets("small-fwd") and not cli.wants_targets(None)


def test_side_names_for_module_training_and_thread_scaling():
    train = Case("m", "m", "module", "train", 1, 2, 8, 8, 4)
    assert workloads.side_names(train, "cpu") == ("qkv", "torch_mha", "torch_mha_weights")
    assert workloads.side_names(replace(train, mode="eval"), "cpu") == ("qkv", "torch_mha")
    scaling = Case("s", "s", "core", "fwd", 1, 1, 8, 8, 8, sides=("qkv", "sdpa"), scaling_threads=2)
    assert workloads.side_names(scaling, "cpu") == ("qkv", "sdpa", "qkv_1t", "sdpa_1t")
    assert Case.from_dict(json.loads(json.dumps(scaling.to_dict()))) == scaling
    with pytest.raises(ValueError, match="start with 'qkv'"):
        Case("x", "x", "core", "fwd", 1, 1, 1, 1, 1, sides=("sdpa", "qkv"))
    with pytest.raises(ValueError, match="scaling_threads"):
        Case("x", "x", "core", "fwd", 1, 1, 1, 1, 1, scaling_threads=1)


def test_judge_holds_qkv_at_one_thread_to_the_same_tolerance():
    case = micro()
    assert judge(case, {"qkv": 3e-7, "qkv_1t": 3e-7, "sdpa": 2e-7, "sdpa_1t": 2e-7}, torch.float32).passed
    # A wrong single-thread qkv fails the case, and is never taken as a torch reference.
    bad = judge(case, {"qkv": 3e-7, "qkv_1t": 5e-2, "sdpa": 2e-7}, torch.float32)
    assert not bad.passed and bad.consistent and "5.0e-02" in bad.message
    # The allowance comes from torch's error alone (qkv_1t's small error does not tighten it).
    assert judge(case, {"qkv": 5e-4, "qkv_1t": 1e-7, "sdpa": 3e-4}, torch.float32).allowed == pytest.approx(6e-4)


def _targets_run(**overrides) -> RunResult:
    """A fake run holding every case the targets read, with chosen ratios (no timing)."""
    results = {}
    for case in targets_grid():
        qkv_side = SideResult("qkv", timing=SideTiming(1, [0.01]), gflops=50.0, peak_bytes=10 << 20)
        sides = {"qkv": qkv_side, "sdpa": SideResult("sdpa", peak_bytes=20 << 20),
                 "torch_mha": SideResult("torch_mha", peak_bytes=30 << 20),
                 "torch_mha_weights": SideResult("torch_mha_weights", peak_bytes=90 << 20)}
        results[case.name] = CaseResult(
            case, "ok", sides=sides, speedups={"sdpa": 1.6, "torch_mha": 2.5, "torch_mha_weights": 3.5},
            memory_ratios={"torch_mha": 3.0, "torch_mha_weights": 9.0}, fraction_of_matmul=0.4,
            thread_scaling={"qkv": 1.9, "sdpa": 1.7, "matmul": 1.6} if case.scaling_threads else {},
            matmul_gflops=120.0)
    results["module-E256-L4096-train"].sides["qkv"].peak_bytes = 40 << 20
    for name, change in overrides.items():
        change(results[name])
    meta = _fake_run().meta | {TARGETS_META: True}
    return RunResult(meta, list(results.values()))


def test_targets_evaluate_reads_each_metric_and_judges_it():
    def slow(result):
        result.speedups["sdpa"] = 0.95

    def unscalable(result):
        result.thread_scaling["qkv"] = 1.2

    def wrong(result):
        result.status = "wrong"

    run = _targets_run(**{"long2k-fwd": slow, "threads-long2k-fwdbwd": unscalable, "small-fwd": wrong})
    rows = {(r.target.case, r.target.metric, r.target.side): r for r in tg.evaluate(run)}
    slow_row = rows[("long2k-fwd", "speedup", "sdpa")]
    assert (slow_row.measured, slow_row.met, slow_row.verdict) == (0.95, False, "NO")
    assert "50.0 GFLOP/s" in slow_row.note and "40% of mm" in slow_row.note
    assert rows[("mid-fwd", "speedup", "sdpa")].verdict == "yes"
    assert rows[("module-L1024-train", "speedup", "torch_mha_weights")].measured == 3.5
    mem = rows[("module-E256-L2048-train", "memory", "torch_mha_weights")]
    assert mem.measured == 9.0 and mem.met and "qkv 10 MiB" in mem.note
    growth = rows[("module-E256-L4096-train", "growth", "qkv")]
    assert growth.measured == pytest.approx(4.0) and growth.met is None and growth.verdict == "info"
    assert "10 MiB at L1024 -> 40 MiB at L4096" in growth.note
    assert rows[("threads-long2k-fwdbwd", "scaling", "qkv")].verdict == "NO"
    assert rows[("threads-long2k-fwd", "scaling", "qkv")].verdict == "yes"
    assert rows[("threads-long2k-fwd", "scaling", "sdpa")].verdict == "info"
    mm_scaling = rows[("threads-long2k-fwd", "scaling", "matmul")]
    assert (mm_scaling.measured, mm_scaling.verdict) == (1.6, "info")
    share = rows[("long2k-fwd", "matmul share", "qkv")]
    assert (share.measured, share.verdict) == (0.4, "NO") and "torch.mm 120.0 GFLOP/s" in share.note
    assert (tg.format_required(share.target), tg.format_measured(share)) == (">= 60%", "40%")
    assert rows[("long2k-d128-fwd", "matmul share", "qkv")].verdict == "info"
    failed = rows[("small-fwd", "speedup", "sdpa")]
    assert failed.measured is None and failed.verdict == "not measured" and failed.note == "case wrong"
    judged = [r for r in rows.values() if r.met is not None]
    assert tg.summary_line(list(rows.values())) == (
        f"{len(judged) - 3} of {len(judged)} targets met; 1 not measured")


def test_targets_missing_cases_and_requirement_edges():
    run = RunResult({}, [])
    rows = tg.evaluate(run)
    assert len(rows) == len(tg.TARGETS) and all(r.verdict == "not measured" for r in rows)
    assert rows[0].note == "case not in this run"
    at_least = tg.Target(1, "t", "c", tg.SPEEDUP, "sdpa", 1.0)
    assert tg.is_met(at_least, 1.0) is True and tg.is_met(at_least, 0.999) is False
    assert tg.is_met(at_least, None) is None
    at_most = tg.Target(4, "g", "c", tg.GROWTH, "qkv", 4.4, base_case="b", at_most=True)
    assert tg.is_met(at_most, 4.4) is True and tg.is_met(at_most, 4.5) is False
    assert tg.format_required(at_least) == ">= 1.00x" and tg.format_required(at_most) == "<= 4.40x"
    assert tg.format_measured(tg.TargetRow(at_least, 0.998, False)) == "0.998x"
    assert tg.format_measured(tg.TargetRow(at_least, 1.234, True)) == "1.23x"
    assert tg.format_measured(tg.TargetRow(at_least, None, None)) == "-"
    with pytest.raises(ValueError, match="metric"):
        tg.Target(1, "t", "c", "latency", "sdpa", 1.0)
    with pytest.raises(ValueError, match="base_case"):
        tg.Target(1, "t", "c", tg.GROWTH, "qkv", None)
    with pytest.raises(ValueError, match="required"):
        tg.Target(1, "t", "c", tg.SPEEDUP, "sdpa", 0.0)


def test_targets_table_in_terminal_markdown_and_json(tmp_path):
    run = _targets_run()
    header, body = tg.target_table(tg.evaluate(run))
    assert header[:6] == ["#", "target", "case", "required", "measured", "met"]
    first = body[0]
    assert first[1:6] == ["core fwd B1 H8 L2048 D64 vs SDPA", "long2k-fwd", ">= 1.20x", "1.60x", "yes"]
    text = format_terminal(run)
    assert "Issue 4 targets" in text and text.rstrip().endswith(body[-1][-1] or body[-1][-2])
    written = write_all(run, tmp_path, plots=False)
    md = written["markdown"].read_text()
    assert "## Issue 4 targets" in md and "| 1 | core fwd B1 H8 L2048 D64 vs SDPA | long2k-fwd |" in md
    data = json.loads(written["json"].read_text())
    assert len(data["targets"]) == len(tg.TARGETS)
    assert data["targets"][0]["measured"] == 1.6 and data["targets"][0]["met"] is True
    # Without --cases targets there is no targets table anywhere.
    run.meta.pop(TARGETS_META)
    plain = write_all(run, tmp_path / "plain", plots=False)
    assert "targets" not in json.loads(plain["json"].read_text())
    assert "Issue 4" not in plain["markdown"].read_text() and "Issue 4" not in format_terminal(run)


def test_thread_scaling_case_interleaves_one_and_two_threads():
    case = Case("threads-micro-fwdbwd", "threads-micro", "core", "fwdbwd", 2, 2, 16, 16, 8,
                sides=("qkv", "sdpa"), scaling_threads=2)
    run = run_cases([case], RunConfig(threads=1, timing=FAST, matmul_n=64), progress=False)
    (result,) = run.results
    assert result.status == "ok", result.message
    assert set(result.sides) == {"qkv", "sdpa", "qkv_1t", "sdpa_1t"}
    assert all(s.max_error < 1e-5 and s.timing is not None for s in result.sides.values())
    # torch.mm's scaling is timed in the same rounds: the machine's own 1 -> 2 thread gain.
    assert set(result.thread_scaling) == {"qkv", "sdpa", "matmul"} and all(v > 0 for v in result.thread_scaling.values())
    assert set(result.speedups) == {"sdpa", "sdpa_1t"}  # each paired with qkv at its own thread count
    assert all(s.peak_bytes is None for s in result.sides.values())  # time only
    assert torch.get_num_threads() == 1  # the run's count is restored after every block
    title, header, rows = thread_scaling_table(run)
    assert "qkv 1t/nt" in header and "mm 1t/nt" in header and rows[0][2] == "1 -> 2"
    flat = flat_rows(run)[0]
    assert flat["thread_scaling_qkv"] > 0 and flat["thread_scaling_matmul"] > 0 and "speedup_vs_qkv_1t" not in flat


# ----- one side failing costs that side only (issue 14, defect 5) ---------------------------

def _failing_after_first_call(side, exc):
    """``side`` whose first call (the correctness check) works and whose timed calls raise."""
    calls = []

    def compute():
        calls.append(1)
        if len(calls) > 1:
            raise exc
        return side.compute()
    return workloads.Side(side.name, compute, side.context, side.keep)


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB"),
                                 RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")])
def test_a_reference_failing_while_timed_costs_only_that_reference(monkeypatch, tmp_path, exc):
    from qkv.bench import runner

    real = runner.make_sides

    def make_sides(*args, **kwargs):
        sides = real(*args, **kwargs)
        sides["sdpa_math"] = _failing_after_first_call(sides["sdpa_math"], exc)
        return sides
    monkeypatch.setattr(runner, "make_sides", make_sides)
    run = run_cases([micro(mode="fwd")], RunConfig(threads=1, timing=FAST, memory=False, matmul_n=64), progress=False)
    (result,) = run.results
    assert result.status == "ok", result.message
    assert result.sides["qkv"].timing is not None and "sdpa" in result.speedups
    math_side = result.sides["sdpa_math"]
    assert math_side.status == "error" and type(exc).__name__ in math_side.message and "sdpa_math" not in result.speedups
    table = format_terminal(run)
    expected_cell = "OOM" if isinstance(exc, torch.OutOfMemoryError) else "error"
    assert expected_cell in table.split("x <ref>:")[0]
    assert f"micro-fwdbwd: sdpa_math left out: timing failed: {type(exc).__name__}" in table
    paths = write_all(run, tmp_path, plots=False)
    (row,) = json.loads(paths["json"].read_text())["rows"]
    assert row["sdpa_math_status"] == "error" and type(exc).__name__ in row["message"]
    assert row["speedup_vs_sdpa"] is not None


def test_qkv_failing_while_timed_is_an_error_but_keeps_the_references(monkeypatch):
    from qkv.bench import runner

    real = runner.make_sides

    def make_sides(*args, **kwargs):
        sides = real(*args, **kwargs)
        sides["qkv"] = _failing_after_first_call(sides["qkv"], torch.OutOfMemoryError("out of memory"))
        return sides
    monkeypatch.setattr(runner, "make_sides", make_sides)
    run = run_cases([micro(mode="fwd")], RunConfig(threads=1, timing=FAST, memory=False, matmul_n=64), progress=False)
    (result,) = run.results
    assert result.status == "error" and "qkv timing failed: OutOfMemoryError" in result.message
    assert result.sides["sdpa"].timing is not None and run.failed == [result]


def test_a_side_estimated_beyond_the_free_memory_is_skipped_before_running(monkeypatch, tmp_path):
    from qkv.bench import memory_budget, runner

    case = micro(mode="fwdbwd", l=64, s=64)
    qkv_need = memory_budget.estimate_bytes(case, "qkv", torch.float32, "cpu")
    math_need = memory_budget.estimate_bytes(case, "sdpa_math", torch.float32, "cpu")
    assert math_need > 2 * qkv_need  # the dense side needs the (B, H, L, S) buffers
    monkeypatch.setattr(runner, "available_bytes", lambda device: (qkv_need + math_need) // 2)
    built = []
    real = runner.make_sides
    monkeypatch.setattr(runner, "make_sides", lambda c, i, names, *a: built.append(names) or real(c, i, names, *a))
    run = run_cases([case], RunConfig(threads=1, timing=FAST, memory=False, matmul_n=64), progress=False)
    (result,) = run.results
    assert result.status == "ok", result.message
    assert "sdpa_math" not in built[0], "a skipped side must not run"
    math_side = result.sides["sdpa_math"]
    assert math_side.status == "skipped" and "GiB (estimate)" in math_side.message
    assert result.sides["qkv"].timing is not None
    table = format_terminal(run)
    assert "skipped" in table.split("x <ref>:")[0] and "micro-fwdbwd: sdpa_math skipped: needs about" in table
    (row,) = json.loads(write_all(run, tmp_path, plots=False)["json"].read_text())["rows"]
    assert row["sdpa_math_status"] == "skipped"


def test_a_case_whose_qkv_side_cannot_fit_is_skipped_with_the_reason(monkeypatch):
    from qkv.bench import runner

    monkeypatch.setattr(runner, "available_bytes", lambda device: 1)
    run = run_cases([micro(mode="fwd")], RunConfig(threads=1, timing=FAST, memory=False, matmul_n=64), progress=False)
    (result,) = run.results
    assert result.status == "skipped" and "qkv skipped: needs about" in result.message
    assert "Skipped 1 case(s) (qkv skipped: needs about" in format_terminal(run)


def test_memory_estimates_grow_with_the_score_matrix_only_for_dense_sides():
    from qkv.bench.memory_budget import GIB, estimate_bytes

    # The case that ran out of memory on the H100: B1 H16 L16384 D128 bf16 causal fwd+bwd.
    case = Case("d128-L16384-causal-fwdbwd", "d128-L16384", "core", "fwdbwd", 1, 16, 16384, 16384, 128, causal=True)
    assert estimate_bytes(case, "qkv", torch.bfloat16, "cuda") < GIB
    assert estimate_bytes(case, "sdpa_flash", torch.bfloat16, "cuda") < GIB
    assert estimate_bytes(case, "sdpa_math", torch.bfloat16, "cuda") > 79 * GIB  # beyond an H100's 79 GiB
