"""The benchmark's issue 17 group (--cases features): its cases, sides, checked slices and targets.
No timing assertions; the sides' runs need the feature kernels and are smoke-tested on tiny cases."""
from __future__ import annotations

import json

import pytest
import torch

from qkv.bench import __main__ as cli
from qkv.bench import targets as tg
from qkv.bench.cases import Case, cpu_grid, extra_cases, features_grid, group_aliases, select_cases
from qkv.bench.feature_workloads import extra_query_bytes, feature_flops, varlen_lengths
from qkv.bench.flops import attention_flops
from qkv.bench.report import FEATURES_META, format_terminal, write_all
from qkv.bench.runner import CaseResult, RunConfig, RunResult, SideResult, run_cases
from qkv.bench.timing import SideTiming, TimingConfig

FAST = TimingConfig(block_s=0.0005, min_repeats=2, max_repeats=2, case_budget_s=0.0)


def test_features_grid_holds_issue_17_shapes():
    cases = {c.name: c for c in features_grid()}
    window = cases["swa8k-fwdbwd"]
    assert (window.q_len, window.kv_len, window.window, window.causal) == (8192, 8192, 256, True)
    assert window.sides == ("qkv", "qkv_full")
    gqa = cases["gqa8to1-fwd"]
    assert (gqa.heads, gqa.kv_heads) == (32, 4) and "sdpa_gqa" in gqa.sides and "qkv_mha_kv" in gqa.sides
    decode = cases["kvcache-decode-fwd"]
    assert (decode.batch, decode.heads, decode.kv_heads, decode.q_len, decode.kv_len) == (8, 32, 8, 1, 4096)
    for target in tg.FEATURE_TARGETS:
        assert target.case in cases


def test_features_are_selected_only_on_request():
    grid = cpu_grid()
    extra, aliases = extra_cases("cpu"), group_aliases("cpu")
    assert select_cases(grid, None, extra, aliases) == grid
    chosen = [c.name for c in select_cases(grid, "features", extra, aliases)]
    assert sorted(chosen) == sorted(c.name for c in features_grid())
    assert cli.wants_targets("features", "features") and not cli.wants_targets("features")


def test_feature_case_validation():
    with pytest.raises(ValueError, match="feature must be one of"):
        Case("x", "x", "core", "fwd", 1, 4, 8, 8, 8, feature="paged")
    with pytest.raises(ValueError, match="kv_heads must divide heads"):
        Case("x", "x", "core", "fwd", 1, 4, 8, 8, 8, feature="gqa", kv_heads=3)
    with pytest.raises(ValueError, match="window > 0 exactly"):
        Case("x", "x", "core", "fwd", 1, 4, 8, 8, 8, feature="window")
    case = features_grid()[2]
    assert Case.from_dict(json.loads(json.dumps(case.to_dict()))) == case
    tiny = case.tiny()
    assert (tiny.heads, tiny.kv_heads, tiny.feature) == (case.heads, case.kv_heads, case.feature)


def test_varlen_lengths_are_ragged_and_half_the_padded_tokens():
    case = next(c for c in features_grid() if c.feature == "varlen")
    lengths = varlen_lengths(case)
    assert len(lengths) == case.batch and max(lengths) == case.q_len and min(lengths) >= 1
    assert sum(lengths) == case.batch * case.q_len // 2


def test_feature_flops_count_the_work_done():
    cases = {c.name: c for c in features_grid()}
    full = attention_flops(1, 8, 8192, 8192, 64, True, "fwd")
    window = feature_flops(cases["swa8k-fwd"])
    assert window == pytest.approx(4.0 * 8 * 64 * (8192 * 256 - 256 * 255 / 2))
    assert full / window > 15
    gqa = cases["gqa8to1-fwdbwd"]
    assert feature_flops(gqa) == pytest.approx(attention_flops(1, 32, 2048, 2048, 64, True, "fwdbwd"), rel=1e-3)
    assert extra_query_bytes(gqa, 4) == 2 * 28 * 2048 * (64 * 4 + 4)


def _features_run(**overrides) -> RunResult:
    results = {}
    for case in features_grid():
        sides = {name: SideResult(name, timing=SideTiming(1, [0.01]), peak_bytes=(64 << 20) if name != "qkv_mha_kv"
                                  else 10 << 20) for name in case.sides}
        results[case.name] = CaseResult(case, "ok", sides=sides, speedups={n: 12.0 for n in case.sides[1:]},
                                        memory_ratios={n: 2.0 for n in case.sides[1:]})
    for name, change in overrides.items():
        change(results[name])
    from test_bench import _fake_run  # noqa: PLC0415 - the shared fake metadata
    return RunResult(_fake_run().meta | {FEATURES_META: True}, list(results.values()))


def test_feature_targets_evaluate_and_report(tmp_path):
    def gqa_memory(result):
        result.sides["qkv"].peak_bytes = 200 << 20  # more than MHA-4 plus the queries

    run = _features_run(**{"gqa8to1-fwdbwd": gqa_memory})
    rows = {(r.target.case, r.target.metric, r.target.side): r for r in tg.evaluate(run, tg.FEATURE_TARGETS)}
    assert rows[("swa8k-fwd", "speedup", "qkv_full")].verdict == "yes"
    plus = rows[("gqa8to1-fwd", "memory plus queries", "qkv_mha_kv")]
    extra = extra_query_bytes(features_grid()[2], 4)
    assert plus.measured == pytest.approx(((10 << 20) + extra) / (64 << 20)) and "queries" in plus.note
    assert rows[("gqa8to1-fwdbwd", "memory plus queries", "qkv_mha_kv")].verdict == "NO"
    assert rows[("gqa8to1-fwd", "memory", "sdpa_gqa")].verdict == "info"
    text = format_terminal(run)
    assert "Issue 17 targets" in text and "Issue 4 targets" not in text
    written = write_all(run, tmp_path, plots=False)
    assert "## Issue 17 targets" in written["markdown"].read_text()
    assert len(json.loads(written["json"].read_text())["feature_targets"]) == len(tg.FEATURE_TARGETS)


SIDES = {
    "window": dict(window=4, sides=("qkv", "qkv_full"), causal=True),
    "gqa": dict(kv_heads=2, sides=("qkv", "sdpa_gqa", "qkv_mha_kv"), causal=True),
    "varlen": dict(sides=("qkv", "qkv_padded", "sdpa_padded"), causal=True),
    "kvcache": dict(kv_heads=2, sides=("qkv", "sdpa_gqa"), causal=True),
}


# The KV-cache call is inference only: forward only.
@pytest.mark.parametrize("feature,mode", [(f, m) for f in SIDES for m in ("fwd", "fwdbwd") if (f, m) != ("kvcache", "fwdbwd")])
def test_feature_sides_run_and_pass_their_check(feature, mode):
    q_len = 1 if feature == "kvcache" else 40
    case = Case(f"tiny-{feature}-{mode}", f"tiny-{feature}", "core", mode, 4, 4, q_len, 40, 8, feature=feature,
                **SIDES[feature])
    run = run_cases([case], RunConfig(threads=1, memory=False, timing=FAST), progress=False)
    result = run.results[0]
    assert result.status == "ok", result.message
    assert all(s.status == "ok" for s in result.sides.values())
    # Every side that computes the same result is checked (not the yardsticks: full causal, MHA-4).
    checked = {s.name for s in result.sides.values() if s.max_error is not None}
    assert checked == set(SIDES[feature]["sides"]) - {"qkv_full", "qkv_mha_kv"}
    assert all(result.sides[name].max_error < 1e-4 for name in checked)
