"""End to end: ``python train.py`` as a subprocess with tiny limits writes a summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"model", "data", "prune", "test_acc", "flops", "params", "wall_s"}


def run_train(*overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_default_app_writes_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) >= REQUIRED
    assert (summary["model"], summary["data"], summary["prune"]) == ("small_cnn", "digits", "none")
    assert 0.0 <= summary["test_acc"] <= 1.0
    # SmallCNN (16, 32, 64) on 1x16x16 digits: 24,058 parameters; no pruning, so unchanged.
    assert summary["params"] == summary["dense_params"] == 24_058
    assert summary["flops"] == summary["dense_flops"] > 0
    assert summary["wall_s"] > 0
    assert (run_dir / "csv" / "version_0" / "metrics.csv").is_file()
    assert "test_acc" in proc.stdout  # the printed summary


@pytest.mark.slow
def test_unknown_model_lists_options(tmp_path: Path) -> None:
    proc = run_train("model=bogus", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "Available options in 'model'" in proc.stderr
    assert "resnet32" in proc.stderr
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_app_train_in_process(tmp_path: Path) -> None:
    """``app.train`` on another data/model/logger combination, returning what it writes."""
    from hydra import compose, initialize_config_dir

    from lightning_ifprune.app import train

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"output_dir={tmp_path}",
                "data=synthetic",
                "data.num_samples=64",
                "data.num_eval_samples=32",
                "model=resnet20",
                "logger=tensorboard",
                "trainer.max_epochs=1",
                "+trainer.limit_train_batches=2",
                "+trainer.enable_progress_bar=false",
            ],
        )
    summary = train(cfg)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (summary["model"], summary["data"], summary["prune"]) == (
        "resnet20",
        "synthetic",
        "none",
    )
    assert 0.0 <= summary["test_acc"] <= summary["test_acc_top5"] <= 1.0
    assert summary["params"] == 272_474  # ResNet-20, 10 classes (see test_models)
    assert summary["flops"] > 40_000_000  # about 41M MACs per 32x32 image
    assert list((tmp_path / "tensorboard").glob("version_0/events.out.tfevents.*"))
