"""Reports: a run's channel plot, and the accuracy/FLOPs trade-off of a sweep.

``python -m lightning_ifprune.report <sweep dir> [--out DIR]`` reads every ``summary.json``
below the directory (what ``python train.py -m ...`` leaves in ``multirun/...``), groups the
runs by data, model, prune config and target, and writes

- ``report.md``: a markdown table — FLOPs and parameters kept, test accuracy before pruning,
  right after the last pruning round (no fine-tune; when measured) and after fine-tuning,
  the change, and the pruning time — as mean ± std over the runs of a group (the seeds);
- ``tradeoff.png``: test accuracy against the FLOPs kept, one line per prune config, the
  unpruned accuracy as a dashed line;

and prints the table. Plots use matplotlib's Agg canvas (no display, no pyplot state).
:func:`print_summary` prints one run's results; :func:`plot_channels` draws its channels.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
TRADEOFF_FILE = "tradeoff.png"
CHANNELS_FILE = "channels.png"
# Methods listed first in tables and legends; the rest follow alphabetically.
METHOD_ORDER = ("none", "influence", "influence_paper")


# ---------------------------------------------------------------------------- one run
def _save(fig: Figure, path: str | PathLike) -> Path:
    FigureCanvasAgg(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_channels(before: Mapping[str, int], after: Mapping[str, int], path: str | PathLike, title: str = "") -> Path:
    """A bar chart of the channels of every group before and after pruning."""
    names = list(before) or list(after)
    width = max(6.0, 0.35 * len(names) + 2)
    fig = Figure(figsize=(width, 4.2))
    ax = fig.add_subplot()
    xs = range(len(names))
    ax.bar(
        [x - 0.2 for x in xs],
        [before.get(n, 0) for n in names],
        0.4,
        label="before",
        color="#b0c4de",
    )
    ax.bar([x + 0.2 for x in xs], [after.get(n, 0) for n in names], 0.4, label="after", color="#1f4e79")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(
        names,
        rotation=60 if len(names) > 6 else 0,
        ha="right" if len(names) > 6 else "center",
        fontsize=8,
    )
    ax.set_ylabel("channels")
    ax.set_xlabel("channel group (its first layer)")
    total_b, total_a = sum(before.values()), sum(after.values())
    ax.set_title(title or f"channels per group: {total_b} → {total_a}")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(summary: Mapping[str, Any]) -> None:
    """The run's results: a before/after table, then the wall times."""
    title = f"{summary['model']} on {summary['data']}, prune={summary['prune']}"
    if summary.get("target") is not None:
        title += f" (target {summary['target_resource']} {summary['target']:g})"
    table = Table(title=title)
    table.add_column("")
    table.add_column("before pruning", justify="right")
    table.add_column("after", justify="right")
    table.add_column("after / before", justify="right")

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.2f} %"

    def row(label: str, before: Any, after: Any) -> None:
        ratio = f"{after / before:.3f}" if before else ""
        table.add_row(label, _format_value(before), _format_value(after), ratio)

    metric = summary.get("metric", "acc")
    acc_b = summary.get("test_before", summary.get("test_acc_before"))
    acc_a = summary.get("test_after", summary.get("test_acc_after"))
    pruned = summary.get("test_pruned", summary.get("test_acc_pruned"))
    table.add_row(
        "test accuracy" if metric == "acc" else f"test {metric}",
        pct(acc_b),
        pct(acc_a),
        "" if acc_b is None or acc_a is None else f"{100 * (acc_a - acc_b):+.2f} pts",
    )
    if pruned is not None:
        table.add_row("  right after pruning, no fine-tune", "", pct(pruned), "")
    row("MACs per sample", summary["flops_before"], summary["flops_after"])
    row("parameters", summary["params_before"], summary["params_after"])
    row(
        "channels (prunable groups)",
        sum(summary["channels_before"].values()),
        sum(summary["channels_after"].values()),
    )
    if summary.get("latency_before_ms") is not None:
        row(
            f"latency ms (batch {summary['latency_batch_size']}, {summary['latency_device']})",
            round(summary["latency_before_ms"], 3),
            round(summary["latency_after_ms"], 3),
        )
    table.add_section()
    for key, label in (
        ("wall_pretrain_s", "pre-train time s"),
        ("wall_prune_s", "pruning rounds time s"),
        ("wall_finetune_s", "fine-tune time s"),
        ("wall_s", "total wall time s"),
    ):
        table.add_row(label, "", f"{summary[key]:.2f}", "")
    Console().print(table)


# ---------------------------------------------------------------------------- sweeps
def load_summaries(root: str | PathLike) -> list[dict[str, Any]]:
    """Every readable ``summary.json`` below ``root`` (sorted by path), with its ``_dir``."""
    out = []
    for path in sorted(Path(root).rglob(SUMMARY_FILE)):
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(summary, dict):
            summary["_dir"] = str(path.parent)
            out.append(summary)
    return out


@dataclass
class Stat:
    """Mean and sample standard deviation of the values that were present."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        if not self.values:
            return "–"
        if self.n == 1:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


@dataclass
class Row:
    """One group of runs: the same data, model, prune config and target, several seeds."""

    data: str
    model: str
    method: str
    target: float
    seeds: list[Any] = field(default_factory=list)
    flops_kept: Stat = field(default_factory=Stat)
    params_kept: Stat = field(default_factory=Stat)
    acc_before: Stat = field(default_factory=Stat)
    acc_pruned: Stat = field(default_factory=Stat)
    acc_after: Stat = field(default_factory=Stat)
    delta: Stat = field(default_factory=Stat)
    prune_s: Stat = field(default_factory=Stat)
    wall_s: Stat = field(default_factory=Stat)

    @property
    def setup(self) -> str:
        return f"{self.data} / {self.model}"


def _method(summary: Mapping[str, Any]) -> str:
    return str(summary.get("prune") or summary.get("criterion") or "none")


def _target(summary: Mapping[str, Any]) -> float:
    target = summary.get("target")
    return 1.0 if target is None else float(target)


def _ratio(summary: Mapping[str, Any], key: str) -> float | None:
    before = summary.get(f"{key}_before", summary.get(f"dense_{key}"))
    after = summary.get(f"{key}_after", summary.get(key))
    if not before or after is None:
        return None
    return float(after) / float(before)


def _add(stat: Stat, value: Any) -> None:
    if value is not None and not (isinstance(value, float) and math.isnan(value)):
        stat.values.append(float(value))


def method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def aggregate(summaries: Iterable[Mapping[str, Any]]) -> list[Row]:
    """Group runs by (data, model, prune config, target); sorted for reading."""
    rows: dict[tuple[str, str, str, float], Row] = {}
    for s in summaries:
        key = (str(s.get("data")), str(s.get("model")), _method(s), _target(s))
        row = rows.setdefault(key, Row(*key))
        row.seeds.append(s.get("seed"))
        _add(row.flops_kept, _ratio(s, "flops"))
        _add(row.params_kept, _ratio(s, "params"))
        before = s.get("test_acc_before")
        after = s.get("test_acc_after")
        _add(row.acc_before, before)
        _add(row.acc_pruned, s.get("test_acc_pruned"))
        _add(row.acc_after, after)
        if before is not None and after is not None:
            _add(row.delta, float(after) - float(before))
        _add(row.prune_s, s.get("wall_prune_s"))
        _add(row.wall_s, s.get("wall_s"))
    return sorted(rows.values(), key=lambda r: (r.data, r.model, -r.target, method_key(r.method)))


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table; accuracies in %, mean ± std over the seeds."""
    setups = {r.setup for r in rows}
    pruned = any(r.acc_pruned.n for r in rows)
    head = ["method", "target", "runs", "FLOPs kept", "params kept", "acc before %"]
    if pruned:
        head.append("acc pruned, no FT %")
    head += ["acc after FT %", "Δ acc (pts)", "prune time s"]
    if len(setups) > 1:
        head.insert(0, "data / model")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [
            r.method,
            f"{r.target:g}",
            str(len(r.seeds)),
            r.flops_kept.fmt(digits=3),
            r.params_kept.fmt(digits=3),
            r.acc_before.fmt(100),
        ]
        if pruned:
            cells.append(r.acc_pruned.fmt(100))
        cells += [r.acc_after.fmt(100), r.delta.fmt(100), r.prune_s.fmt(digits=1)]
        if len(setups) > 1:
            cells.insert(0, r.setup)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_tradeoff(rows: Sequence[Row], path: str | PathLike) -> Path:
    """Test accuracy vs FLOPs kept per prune config (one panel per setup and stage)."""
    setups = sorted({r.setup for r in rows})
    stages = [("acc_after", "after fine-tune")]
    if any(r.acc_pruned.n for r in rows):
        stages.insert(0, ("acc_pruned", "right after pruning (no fine-tune)"))
    fig = Figure(figsize=(6.0 * len(stages), 4.5 * len(setups)))
    axes = fig.subplots(len(setups), len(stages), squeeze=False)
    methods = sorted({r.method for r in rows}, key=method_key)
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for i, setup in enumerate(setups):
        mine = [r for r in rows if r.setup == setup]
        dense = Stat([v for r in mine for v in r.acc_before.values])
        for j, (attr, label) in enumerate(stages):
            ax = axes[i][j]
            for method in methods:
                pts = sorted(
                    (r for r in mine if r.method == method and getattr(r, attr).n and r.flops_kept.n),
                    key=lambda r: r.flops_kept.mean,
                )
                if not pts:
                    continue
                xs = [r.flops_kept.mean for r in pts]
                ys = [getattr(r, attr).mean * 100 for r in pts]
                es = [getattr(r, attr).std * 100 for r in pts]
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method, color=colors[method])
            if dense.n:
                ax.axhline(dense.mean * 100, color="grey", ls="--", lw=1, label="unpruned")
            ax.set_xlabel("FLOPs kept (fraction of the unpruned net)")
            ax.set_ylabel("test accuracy %")
            ax.set_title(f"{setup}: {label}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def write_report(root: str | PathLike, out: str | PathLike | None = None) -> tuple[str, dict[str, Path]]:
    """Aggregate the summaries below ``root``; write report.md and tradeoff.png into ``out``."""
    summaries = load_summaries(root)
    if not summaries:
        raise FileNotFoundError(f"no {SUMMARY_FILE} below {root}")
    rows = aggregate(summaries)
    out_dir = Path(out) if out is not None else Path(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    seeds = sorted({str(s.get("seed")) for s in summaries})
    text = (
        f"# Pruning sweep: {root}\n\n{len(summaries)} runs; seeds {', '.join(seeds)}. "
        "Accuracies are test-set top-1 in %, mean ± sample std over the runs of a row; "
        "FLOPs and parameters kept are fractions of the unpruned net.\n\n"
        f"{table}\n"
    )
    paths = {"report": out_dir / REPORT_FILE, "tradeoff": out_dir / TRADEOFF_FILE}
    paths["report"].write_text(text)
    plot_tradeoff(rows, paths["tradeoff"])
    return table, paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_ifprune.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a directory with summary.json files below it (a multirun sweep)")
    parser.add_argument("--out", default=None, help="where report.md and tradeoff.png go (default: sweep_dir)")
    args = parser.parse_args(argv)
    try:
        table, paths = write_report(args.sweep_dir, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(table)
    print(f"\nwrote {paths['report']} and {paths['tradeoff']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
