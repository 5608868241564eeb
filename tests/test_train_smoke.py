"""End to end: ``python train.py`` as a subprocess with tiny limits, a multirun and its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {
    "model", "data", "prune", "criterion", "target", "seed",
    "test_acc_before", "test_acc_after", "flops_before", "flops_after",
    "params_before", "params_after", "channels_before", "channels_after",
    "wall_pretrain_s", "wall_prune_s", "wall_finetune_s", "wall_s",
    "latency_before_ms", "latency_after_ms", "latency_batch_size", "latency_device",
}  # fmt: skip
TINY = [
    "pretrain.epochs=1",
    "trainer.max_epochs=2",
    "prune.end_epoch=1",
    "prune.rounds=2",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=2",
    "+trainer.enable_progress_bar=false",
    "report.latency_iters=3",
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")
def test_prune_influence_writes_a_complete_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run(
        "train.py",
        "prune=influence",
        *TINY,
        "+prune.criterion.num_probes=2",
        "prune.target_flops=0.6",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) >= REQUIRED
    assert (summary["model"], summary["data"], summary["prune"], summary["criterion"]) == (
        "small_cnn", "digits", "influence", "influence"
    )  # fmt: skip
    assert summary["target"] == 0.6 and summary["target_resource"] == "flops"
    # SmallCNN (16, 32, 64) on 1x16x16 digits: 24,058 parameters before pruning.
    assert summary["params_before"] == summary["dense_params"] == 24_058
    assert summary["flops_after"] <= 0.6 * summary["flops_before"] and summary["target_met"]
    assert summary["params_after"] < summary["params_before"]
    assert summary["channels_before"] == {"features.0": 16, "features.4": 32, "features.8": 64}
    assert sum(summary["channels_after"].values()) < 112
    for key in ("test_acc_before", "test_acc_after", "test_acc_pruned"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["prune_rounds"] == 2 and summary["epochs"] == 3
    assert summary["wall_s"] > 0 and summary["latency_before_ms"] > 0
    for name in ("channels.png", "pruned_state.pt", "model.pt", "pretrained.ckpt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "csv" / "prune" / "metrics.csv").is_file()
    assert "test accuracy" in proc.stdout and "MACs per sample" in proc.stdout  # the printed table

    # The TorchScript export computes what the pruned module computes (rebuilt from the
    # Lightning checkpoint of the prune phase: the history travels in it).
    from lightning_ifprune import load_pruned_checkpoint
    from lightning_ifprune.models import build_model
    from lightning_ifprune.module import ImageClassifier

    ckpt = next((run_dir / "csv" / "prune" / "checkpoints").glob("*.ckpt"))
    module = load_pruned_checkpoint(ImageClassifier, ckpt, net=build_model("small_cnn", 10, 1)).eval()
    scripted = torch.jit.load(str(run_dir / "model.pt"))
    x = torch.randn(7, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), module(x))


@pytest.mark.slow
def test_unknown_prune_option_lists_options(tmp_path: Path) -> None:
    proc = run("train.py", "prune=bogus", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "Could not find 'prune/bogus'" in proc.stderr
    assert "Available options in 'prune'" in proc.stderr
    for name in ("influence", "influence_paper", "fisher", "magnitude", "none"):
        assert name in proc.stderr
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_multirun_and_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run(
        "train.py",
        "-m",
        "prune=magnitude,fisher",
        *TINY,
        "export.torchscript=false",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(2)]
    assert [s["prune"] for s in summaries] == ["magnitude", "fisher"]
    assert all(s["target_met"] for s in summaries)

    report = run("-m", "lightning_ifprune.report", str(sweep))
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| method | target |" in report.stdout
    assert "| magnitude | 0.5 | 1 |" in report.stdout and "| fisher | 0.5 | 1 |" in report.stdout
    assert (sweep / "tradeoff.png").stat().st_size > 1000
    assert (sweep / "report.md").read_text().count("\n| ") == 3  # header + 2 rows (+ separator)
