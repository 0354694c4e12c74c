"""PNG plots: qkv's speedup and each side's peak memory against sequence length.

Only self-attention cases without padding make up the lines (cross-attention and decode are
single points of a different regime; they are in the tables; thread-scaling and feature cases
have their own tables). One panel per level and mode; within a panel one line per reference (speedup) or
side (memory), per causal flag and per model shape (head dim; embed dim and heads for modules),
so the targets' E=256 module cases draw their own memory-vs-L lines beside the E=512 ones.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from .runner import CaseResult, RunResult
from .workloads import QKV, side_label

MODE_TITLES = {
    ("core", "fwd"): "core forward",
    ("core", "bwd"): "core backward",
    ("core", "fwdbwd"): "core forward+backward",
    ("module", "train"): "MHA training, need_weights=False (and torch with True)",
    ("module", "train-weights"): "MHA training, need_weights=True",
    ("module", "eval"): "MHA eval, no_grad",
}


def _panels(run: RunResult) -> dict[tuple[str, str], list[CaseResult]]:
    panels: dict[tuple[str, str], list[CaseResult]] = defaultdict(list)
    for r in run.results:
        c = r.case
        if (r.status == "ok" and c.q_len == c.kv_len and not c.key_padding and not c.scaling_threads
                and not c.feature):  # feature cases compare other sides: tables only
            panels[(c.level, c.mode)].append(r)
    return {k: v for k, v in panels.items() if v}


# Tick candidates for the log y axes, fine and coarse: matplotlib's default log ticks leave a
# narrow range (1.0x-1.4x) without a single label and crowd a wide one.
SPEEDUP_TICKS = ([0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2],
                 [0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128])
MEMORY_TICKS = ([m * 10.0**e for e in range(-2, 7) for m in (1, 2, 5)],
                [10.0**e for e in range(-2, 7)])


def _nice_log_ticks(ax, values: list[float], candidates: tuple[list[float], list[float]]) -> None:
    """Label a log axis spanning ``values``: fine ticks over a narrow range, coarse otherwise."""
    low, high = min(values) / 1.05, max(values) * 1.05
    fine, coarse = candidates
    ticks = fine if high / low < 3 else coarse
    if len([t for t in ticks if low <= t <= high]) < 2:  # very narrow: label the data's ends too
        ticks = sorted(set(ticks) | {float(f"{min(values):.3g}"), float(f"{max(values):.3g}")})
    ax.set_ylim(low, high)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


_SIDE_COLORS = {
    QKV: "tab:blue", "sdpa": "tab:orange", "sdpa_math": "tab:red", "sdpa_flash": "tab:green",
    "sdpa_efficient": "tab:purple", "sdpa_cudnn": "tab:brown", "torch_mha": "tab:orange",
    "torch_mha_weights": "tab:red",
}


def _color(name: str) -> str:
    return _SIDE_COLORS.get(name, "tab:gray")


def _rank(name: str) -> int:
    return list(_SIDE_COLORS).index(name) if name in _SIDE_COLORS else len(_SIDE_COLORS)


def _variant(r: CaseResult) -> tuple[tuple[str, int], ...]:
    """The model shape a line follows along L: head dim for core cases (the grid's rows change
    B and H with L to keep the work in range), embed dim and heads for modules."""
    c = r.case
    return (("E", c.embed_dim), ("H", c.heads)) if c.level == "module" else (("D", c.head_dim),)


def _series_label(name: str, causal: bool, variant: tuple, variants: set[tuple]) -> str:
    """Side and causal flag, plus the parts of the shape that differ between this panel's lines."""
    label = side_label(name) + (", causal" if causal else "")
    for i, (key, value) in enumerate(variant):
        if len({v[i] for v in variants}) > 1:
            label += f", {key}={value}"
    return label


_MARKERS = ("o", "s", "^", "D", "v")


def _plot(run: RunResult, path: Path, value, ylabel: str, title: str, names_for, reference_line: float | None,
          ticks: tuple[list[float], list[float]]) -> Path | None:
    panels = _panels(run)
    if not panels:
        return None
    # The object API (no pyplot): no global backend switch, nothing left open in the caller.
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(5.2 * cols, 4.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, ((level, mode), results) in zip(axes, sorted(panels.items())):
        variants = {_variant(r) for r in results}
        marker = {v: _MARKERS[i % len(_MARKERS)] for i, v in enumerate(sorted(variants))}
        series: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
        for r in results:
            for name in names_for(r):
                y = value(r, name)
                if y is not None and y > 0:
                    series[(name, r.case.causal, _variant(r))].append((r.case.q_len, y))
        for (name, causal, variant), points in sorted(series.items(), key=lambda kv: (_rank(kv[0][0]), kv[0][1:])):
            points.sort()
            xs, ys = zip(*points)
            # Colour = side, dashes = causal, marker = model shape: the same encoding in every panel.
            ax.plot(xs, ys, color=_color(name), marker=marker[variant],
                    linestyle="--" if causal else "-", label=_series_label(name, causal, variant, variants))
        if reference_line is not None:
            ax.axhline(reference_line, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        values = [y for points in series.values() for _, y in points]
        if reference_line is not None:
            values.append(reference_line)
        if values:
            _nice_log_ticks(ax, values, ticks)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(ylabel)
        ax.set_title(MODE_TITLES.get((level, mode), f"{level} {mode}"), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=7 if len(series) <= 4 else 6)
    meta = run.meta
    fig.suptitle(f"{title} - {meta['machine']}, {meta['dtype']}, {meta['threads']} threads, torch {meta['torch']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_plots(run: RunResult, out_dir: Path) -> list[Path]:
    speed = _plot(
        run, out_dir / "speedup.png",
        value=lambda r, name: r.speedups.get(name),
        ylabel="speedup of qkv (time ref / time qkv)", title="qkv speedup",
        names_for=lambda r: [n for n in r.sides if n != QKV], reference_line=1.0, ticks=SPEEDUP_TICKS,
    )
    if not run.meta.get("memory_measured", True):
        return [p for p in (speed,) if p is not None]
    memory = _plot(
        run, out_dir / "memory.png",
        value=lambda r, name: None if r.sides[name].peak_bytes is None else r.sides[name].peak_bytes / 2**20,
        ylabel="peak memory above baseline (MiB)", title="peak memory",
        names_for=lambda r: list(r.sides), reference_line=None, ticks=MEMORY_TICKS,
    )
    return [p for p in (speed, memory) if p is not None]
