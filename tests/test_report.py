"""Sweep reports from summary.json files, and the per-run channel plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_ifprune.report import aggregate, load_summaries, main, markdown_table, plot_channels


def fake_summary(prune: str, target: float | None, seed: int, acc_after: float, kept: float) -> dict:
    return {
        "model": "small_cnn",
        "data": "digits",
        "prune": prune,
        "criterion": None if prune == "none" else prune,
        "target": target,
        "target_resource": None if target is None else "flops",
        "seed": seed,
        "test_acc_before": 0.99,
        "test_acc_pruned": None if prune == "none" else acc_after - 0.2,
        "test_acc_after": acc_after,
        "flops_before": 1000,
        "flops_after": int(1000 * kept),
        "params_before": 100,
        "params_after": 60,
        "wall_prune_s": 1.5,
        "wall_s": 10.0,
    }


def write_sweep(root: Path) -> None:
    runs = [("none", None, 1.0, [0.99, 0.985, 0.995])]
    runs += [
        (m, t, t - 0.01, [a - (1 - t) * 0.05 + d for d in (0.0, 0.01, -0.01)])
        for m, a in (("influence", 0.99), ("magnitude", 0.97))
        for t in (0.5, 0.3)
    ]
    num = 0
    for prune, target, kept, accs in runs:
        for seed, acc in enumerate(accs):
            d = root / str(num)
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps(fake_summary(prune, target, seed, acc, kept)))
            num += 1
    (root / "broken").mkdir()
    (root / "broken" / "summary.json").write_text("{not json")


def test_aggregate_groups_seeds(tmp_path: Path) -> None:
    write_sweep(tmp_path)
    summaries = load_summaries(tmp_path)
    assert len(summaries) == 15  # the broken file is skipped
    rows = aggregate(summaries)
    assert [(r.method, r.target) for r in rows] == [
        ("none", 1.0),
        ("influence", 0.5),
        ("magnitude", 0.5),
        ("influence", 0.3),
        ("magnitude", 0.3),
    ]
    inf = rows[1]
    assert len(inf.seeds) == 3 and inf.acc_after.n == 3
    assert inf.acc_after.mean == pytest.approx(0.99 - 0.025)
    assert inf.acc_after.std == pytest.approx(0.01)
    assert inf.flops_kept.mean == pytest.approx(0.49)
    assert inf.delta.mean == pytest.approx(-0.025)
    assert rows[0].acc_pruned.n == 0  # none has no "after pruning" accuracy

    table = markdown_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| method | target | runs | FLOPs kept")
    assert "acc pruned, no FT %" in lines[0]
    assert len(lines) == 2 + len(rows)
    assert (
        "| influence | 0.5 | 3 | 0.490 ± 0.000 | 0.600 ± 0.000 | 99.00 ± 0.00 | 76.50 ± 1.00 | 96.50 ± 1.00 "
        "| -2.50 ± 1.00 | 1.5 ± 0.0 |"
    ) in table


def test_report_command_writes_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_sweep(tmp_path)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert "| method | target |" in out and "| method | target |" in report
    assert "mean ± sample std" in report and "seeds 0, 1, 2" in report
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000

    other = tmp_path / "elsewhere"
    assert main([str(tmp_path / "0"), "--out", str(other)]) == 0
    assert (other / "report.md").is_file() and (other / "tradeoff.png").is_file()


def test_report_command_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 1
    assert "no summary.json" in capsys.readouterr().err


def test_several_setups_get_a_setup_column(tmp_path: Path) -> None:
    a = fake_summary("influence", 0.5, 0, 0.98, 0.49)
    b = {**a, "model": "resnet20", "data": "synthetic"}
    table = markdown_table(aggregate([a, b]))
    assert table.splitlines()[0].startswith("| data / model | method |")
    assert "| synthetic / resnet20 |" in table


def test_plot_channels(tmp_path: Path) -> None:
    before = {f"layer{i}": 64 for i in range(20)}
    after = {f"layer{i}": 64 - 2 * i for i in range(20)}
    path = plot_channels(before, after, tmp_path / "sub" / "channels.png")
    assert path.is_file() and path.stat().st_size > 1000
