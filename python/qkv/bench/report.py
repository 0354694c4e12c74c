"""Turn a RunResult into what people read: a terminal table, CSV, JSON and markdown.

Ratios always read "how many times better qkv is": speedup = time(reference) / time(qkv) and
memory ratio = peak(reference) / peak(qkv), so above 1 means qkv wins.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from . import targets
from .runner import CaseResult, RunResult
from .timing import MATMUL
from .workloads import ONE_THREAD_SUFFIX, QKV, is_qkv_side, split_thread_suffix

MIB = float(1 << 20)


def side_order(results: list[CaseResult]) -> list[str]:
    """qkv first, then the references in the order they first appear."""
    names = [QKV]
    for r in results:
        for name in r.sides:
            if name not in names:
                names.append(name)
    return names


def _num(value: float | None, digits: int = 4) -> float | None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return round(value, digits)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def flat_rows(run: RunResult) -> list[dict]:
    """One flat dict per case: the CSV rows, and the "rows" of the JSON."""
    sides = side_order(run.results)
    refs = [s for s in sides if not is_qkv_side(s)]
    scaled = [s for s in (*sides, MATMUL) if any(s in r.thread_scaling for r in run.results)]
    rows = []
    for r in run.results:
        c = r.case
        row = {
            "case": c.name, "group": c.group, "level": c.level, "mode": c.mode,
            "batch": c.batch, "heads": c.heads, "q_len": c.q_len, "kv_len": c.kv_len, "head_dim": c.head_dim,
            "causal": c.causal, "key_padding": c.key_padding, "shape": c.shape,
            "gflop_per_call": _num(c.flops / 1e9, 6), "status": r.status,
        }
        for name in sides:
            s = r.sides.get(name)
            row[f"{name}_ms"] = _num(s.median_s * 1e3, 4) if s and s.median_s else None
            row[f"{name}_gflops"] = _num(s.gflops, 2) if s else None
            row[f"{name}_peak_mib"] = _num(s.peak_bytes / MIB, 2) if s and s.peak_bytes is not None else None
            row[f"{name}_max_error"] = _finite(s.max_error) if s else None
            row[f"{name}_status"] = s.status if s else None
        row["qkv_pct_of_matmul"] = _num(100 * r.fraction_of_matmul, 1) if r.fraction_of_matmul else None
        row["matmul_gflops"] = _num(r.matmul_gflops, 1)
        for name in refs:
            row[f"speedup_vs_{name}"] = _num(r.speedups.get(name), 3)
            row[f"memory_ratio_vs_{name}"] = _num(r.memory_ratios.get(name), 3)
        for name in scaled:
            row[f"thread_scaling_{name}"] = _num(r.thread_scaling.get(name), 3)
        row["message"] = r.message or "; ".join(
            f"{s.name}: {s.message}" for s in r.sides.values() if s.message
        )
        rows.append(row)
    return rows


def write_csv(run: RunResult, path: Path) -> Path:
    rows = flat_rows(run)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(run: RunResult, path: Path) -> Path:
    """Metadata, flat rows, and every raw timing sample (for re-analysis)."""
    samples = {
        r.case.name: {
            s.name: {"inner": s.timing.inner, "seconds_per_call": s.timing.samples}
            for s in r.sides.values() if s.timing is not None
        }
        for r in run.results
    }
    payload = {"meta": run.meta, "rows": flat_rows(run), "samples": samples}
    if run.meta.get(TARGETS_META):
        payload["targets"] = targets.to_json(targets.evaluate(run))
    if run.meta.get(FEATURES_META):
        payload["feature_targets"] = targets.to_json(targets.evaluate(run, targets.FEATURE_TARGETS))
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str, allow_nan=False)
        f.write("\n")
    return path


# ----- tables -----------------------------------------------------------------------------

def _ratio(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MIB:.1f}"


def _left_out(r: CaseResult, name: str) -> str | None:
    """What a summary cell shows for a side that was skipped or failed, or None if it ran."""
    side = r.sides.get(name)
    if side is None or side.status in ("ok", "wrong"):
        return None
    if side.status == "skipped":
        return "skipped"
    return "OOM" if "OutOfMemoryError" in side.message or "out of memory" in side.message else "error"


def _left_out_lines(run: RunResult) -> list[str]:
    """One line per side that a case lost (skipped before running, or failed), with the reason."""
    return [f"{r.case.name}: {s.name} {s.message if s.message.startswith('skipped') else 'left out: ' + s.message}"
            for r in run.results if r.status != "skipped"
            for s in r.sides.values() if s.status in ("skipped", "error") and not (is_qkv_side(s.name) and r.status != "ok")]


def _short(name: str) -> str:
    base, one_thread = split_thread_suffix(name)
    short = {MATMUL: "mm", "sdpa_math": "math", "torch_mha": "torch", "torch_mha_weights": "torch(w)", "sdpa_flash": "flash",
             "sdpa_efficient": "effic", "sdpa_cudnn": "cudnn"}.get(base, base)
    return short + " 1t" if one_thread else short


# run.meta keys: the run was asked for the issue 4 targets (--cases targets) or issue 17's
# (--cases features), so the outputs end with their tables.
TARGETS_META = "issue4_targets"
FEATURES_META = "issue17_targets"


def summary_tables(run: RunResult) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per level: the numbers a user needs to decide."""
    tera = run.meta.get("device") == "cuda"
    unit = "TFLOP/s" if tera else "GFLOP/s"
    tables = []
    for level, feature, title in (
            ("core", False, "Core attention (torch.ops.qkv.attention vs F.scaled_dot_product_attention)"),
            ("core", True, "Features (issue 17: windows, GQA, packed batches, KV cache; sides in docs/benchmarks.md)"),
            ("module", False, "Module (qkv.MultiheadAttention vs torch.nn.MultiheadAttention)")):
        results = [r for r in run.results if r.case.level == level and bool(r.case.feature) == feature
                   and r.status != "skipped" and not r.case.scaling_threads]
        if not results:
            continue
        refs = [s for s in side_order(results) if s != QKV]
        header = ["case", "shape", "qkv ms"] + [f"x {_short(s)}" for s in refs] + [
            f"qkv {unit}", "% mm", "qkv MiB"] + [f"mem x {_short(s)}" for s in refs] + ["qkv err"]
        rows = []
        for r in results:
            qkv = r.sides.get(QKV)
            if r.status != "ok":
                status = "WRONG" if r.status == "wrong" else "ERROR"
                err = f"{qkv.max_error:.1e}" if qkv and qkv.max_error is not None else "-"
                rows.append([r.case.name, r.case.shape, status] + ["-"] * (len(header) - 4) + [err])
                continue
            rate = "-" if qkv.gflops is None else f"{qkv.gflops / (1e3 if tera else 1):.1f}"
            pct = "-" if r.fraction_of_matmul is None else f"{100 * r.fraction_of_matmul:.0f}%"
            rows.append(
                [r.case.name, r.case.shape, _ms(qkv.median_s)]
                + [_left_out(r, s) or _ratio(r.speedups.get(s)) for s in refs]
                + [rate, pct, _mib(qkv.peak_bytes)]
                + [_left_out(r, s) or _ratio(r.memory_ratios.get(s)) for s in refs]
                + ["-" if qkv.max_error is None else f"{qkv.max_error:.0e}"]
            )
        tables.append((title, header, rows))
    scaling = thread_scaling_table(run)
    if scaling:
        tables.append(scaling)
    return tables


def thread_scaling_table(run: RunResult) -> tuple[str, list[str], list[list[str]]] | None:
    """Thread-scaling cases: each side's time(1 thread) / time(n threads), and qkv's speedup over
    SDPA at either count, all from the same interleaved rounds."""
    results = [r for r in run.results if r.case.scaling_threads and r.status != "skipped"]
    if not results:
        return None
    refs = [s for s in side_order(results) if not is_qkv_side(s)]
    bases = [s for s in side_order(results) if not split_thread_suffix(s)[1]]
    bases += [MATMUL] if any(MATMUL in r.thread_scaling for r in results) else []
    header = (["case", "shape", "threads", "qkv ms", "qkv 1t ms"] + [f"{_short(s)} 1t/nt" for s in bases]
              + [f"x {_short(s)}" for s in refs])
    rows = []
    for r in results:
        n = r.case.scaling_threads
        if r.status != "ok":
            rows.append([r.case.name, r.case.shape, f"1 -> {n}", r.status.upper()] + ["-"] * (len(header) - 4))
            continue
        one = r.sides.get(QKV + ONE_THREAD_SUFFIX)
        rows.append(
            [r.case.name, r.case.shape, f"1 -> {n}", _ms(r.sides[QKV].median_s), _ms(one.median_s if one else None)]
            + [_ratio(r.thread_scaling.get(s)) for s in bases]
            + [_ratio(r.speedups.get(s)) for s in refs]
        )
    return ("Thread scaling (time at 1 thread / time at n threads, interleaved in one run)", header, rows)


def targets_sections(run: RunResult) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, summary) of each targets table the run was asked for."""
    sections = []
    for key, title, wanted in ((TARGETS_META, "Issue 4 targets", targets.TARGETS),
                               (FEATURES_META, "Issue 17 targets (features)", targets.FEATURE_TARGETS)):
        if run.meta.get(key):
            rows = targets.evaluate(run, wanted)
            header, body = targets.target_table(rows)
            sections.append((title, header, body, targets.summary_line(rows)))
    return sections


def detail_tables(run: RunResult) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per side: median ms, throughput, peak MiB and max error (markdown only)."""
    tables = []
    for level in ("core", "module"):
        results = [r for r in run.results if r.case.level == level and r.status == "ok"]
        if not results:
            continue
        header = ["case", "side", "median ms", "spread", "GFLOP/s", "peak MiB", "max rel. error", "note"]
        rows = []
        for r in results:
            for s in r.sides.values():
                rows.append([
                    r.case.name, s.name, _ms(s.median_s),
                    "-" if s.timing is None else f"{100 * s.timing.spread:.0f}%",
                    "-" if s.gflops is None else f"{s.gflops:.1f}", _mib(s.peak_bytes),
                    "-" if s.max_error is None else f"{s.max_error:.1e}",
                    s.message if s.status != "ok" else "",
                ])
        tables.append((f"Details ({level})", header, rows))
    return tables


def format_text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 or header[i] in _TEXT_COLUMNS else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


_TEXT_COLUMNS = {"case", "shape", "side", "note", "target", "met", "#"}


def format_markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")
    align = ["---" if h in _TEXT_COLUMNS else "---:" for h in header]
    lines = ["| " + " | ".join(map(esc, header)) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


LEGEND = (
    "x <ref>: time(ref) / time(qkv), median of per-round ratios (above 1: qkv is faster); OOM, error or "
    "skipped: that reference ran out of memory, failed, or was skipped as too large (see 'Sides left out'). "
    "mem x <ref>: peak(ref) / peak(qkv) (above 1: qkv uses less memory; '-' when both peaks are "
    "under 1 MiB). % mm: qkv's throughput as a share of a large torch.mm timed in the same rounds. "
    "qkv err: max error relative to a float64 reference. x torch(w) (training): torch's module with its "
    "default need_weights=True against qkv with need_weights=False. <side> 1t/nt: that side's time at 1 "
    "thread / its time at n threads, interleaved (above 1: the extra threads help); mm 1t/nt: the same for "
    "the torch.mm probe, what this machine's cores give a dense matmul."
)


def _skipped_line(run: RunResult) -> str | None:
    skipped = [r for r in run.results if r.status == "skipped"]
    if not skipped:
        return None
    reasons = sorted({r.message for r in skipped})
    return f"Skipped {len(skipped)} case(s) ({'; '.join(reasons)}): " + ", ".join(r.case.name for r in skipped)


def _meta_items(meta: dict) -> list[tuple[str, str]]:
    """What the numbers depend on, as (label, value) pairs for the terminal and the markdown."""
    items = [
        ("machine", meta["machine"]),
        ("CPU", f"{meta['cpu_model']}, {meta['cores_available']} cores available, "
                f"CPU capability {meta.get('cpu_capability')}"),
    ]
    if meta.get("gpu"):
        items.append(("GPU", f"{meta['gpu']} ({meta['gpu_memory_gib']} GiB, sm {meta['compute_capability']}), "
                             f"CUDA {meta['cuda']}, cuDNN {meta['cudnn']}"))
    items += [
        ("threads", f"{meta['threads']} (torch.set_num_threads, every side)"),
        ("versions", f"torch {meta['torch']}, qkv {meta['qkv']} ({meta.get('qkv_revision') or 'no git revision'}), "
                     f"python {meta['python']}"),
        ("dtype", f"{meta['dtype']} on {meta['device']}"),
        ("matmul ceiling", f"{meta['matmul_gflops']:.1f} GFLOP/s ({meta['dtype']} torch.mm, n={meta['matmul_n']}, best "
                           f"of 5 at the start ({meta['matmul_gflops_start']:.1f}) and the end "
                           f"({meta['matmul_gflops_end']:.1f}); '% mm' pairs each case with the same mm per round)"),
        ("run", f"{meta['date_utc']}, took {meta['duration_s']:.0f} s"),
    ]
    return items


def format_terminal(run: RunResult) -> str:
    parts = ["\n".join(f"{label:15s} {value}" for label, value in _meta_items(run.meta))]
    for title, header, rows in summary_tables(run):
        parts.append(f"{title}\n{format_text_table(header, rows)}")
    parts.append(LEGEND)
    skipped = _skipped_line(run)
    if skipped:
        parts.append(skipped)
    left_out = _left_out_lines(run)
    if left_out:
        parts.append("Sides left out:\n" + "\n".join("  " + line for line in left_out))
    for r in run.failed:
        parts.append(("FAILED: " if r.status == "wrong" else "ERROR: ") + r.message)
    for title, header, rows, summary in targets_sections(run):
        parts.append(f"{title} ({summary}; noisy shared machines: a ratio near its requirement may flip)\n"
                     + format_text_table(header, rows))
    return "\n\n".join(parts)


def write_markdown(run: RunResult, path: Path, plots: list[Path] | None = None) -> Path:
    meta = run.meta
    parts = [f"# qkv benchmark: {meta['machine']}",
             "\n".join(f"- **{label}**: {value}" for label, value in _meta_items(meta))]
    for title, header, rows in summary_tables(run):
        parts.append(f"## {title}\n\n{format_markdown_table(header, rows)}")
    parts.append(LEGEND)
    skipped = _skipped_line(run)
    if skipped:
        parts.append(skipped)
    left_out = _left_out_lines(run)
    if left_out:
        parts.append("**Sides left out**:\n\n" + "\n".join("- " + line for line in left_out))
    for r in run.failed:
        parts.append(("**FAILED**: " if r.status == "wrong" else "**ERROR**: ") + r.message)
    for title, header, rows, summary in targets_sections(run):
        parts.append(f"## {title}\n\n{summary}. Each ratio is from this run's interleaved rounds (speed, "
                     f"thread scaling) or per-side child processes (memory); requirements are in "
                     f"qkv/bench/targets.py.\n\n{format_markdown_table(header, rows)}")
    for plot in plots or []:
        parts.append(f"![{plot.stem}]({plot.name})")
    for title, header, rows in detail_tables(run):
        parts.append(f"## {title}\n\n{format_markdown_table(header, rows)}")
    with open(path, "w") as f:
        f.write("\n\n".join(parts) + "\n")
    return path


def write_all(run: RunResult, out_dir: Path, plots: bool = True) -> dict[str, Path]:
    """Write results.csv, results.json, results.md and the PNG plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {
        "csv": write_csv(run, out_dir / "results.csv"),
        "json": write_json(run, out_dir / "results.json"),
    }
    images: list[Path] = []
    if plots:
        try:
            from .plots import write_plots
        except ImportError:
            write_plots = None
            print("note: no plots written (pip install matplotlib, or qkv[bench])", file=sys.stderr)
        if write_plots is not None:
            images = write_plots(run, out_dir)
            written.update({p.stem: p for p in images})
    written["markdown"] = write_markdown(run, out_dir / "results.md", images)
    return written
