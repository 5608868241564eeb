"""User errors from ``python train.py``: one ``error: ...`` line and a non-zero exit, no traceback
(``HYDRA_FULL_ERROR=1`` keeps it); plus the unit behaviour of :mod:`lightning_ifprune.app.errors`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import InstantiationException

from lightning_ifprune.app.errors import user_error_message
from lightning_ifprune.structure import UnsupportedModelError

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["pretrain.epochs=0", "trainer.max_epochs=0", "report.latency_iters=0", "+trainer.enable_progress_bar=false"]


def train(*args: str, full_error: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1" if full_error else "0"}
    cmd = [sys.executable, "train.py", *args, *QUICK]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_missing_cifar_data_is_one_error_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    proc = train("data=cifar10", f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "CIFAR-10 not found" in lines[0] and str(data_dir) in lines[0]
    assert "download" in lines[0]  # how to get the data


@pytest.mark.slow
def test_missing_init_from_fails_early_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ckpt"
    run_dir = tmp_path / "run"
    proc = train(f"init_from={missing}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "init_from" in lines[0] and str(missing) in lines[0], proc.stderr[-3000:]
    assert not (run_dir / "csv").exists()  # checked before any trainer ran


@pytest.mark.slow
def test_full_error_keeps_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ckpt"
    proc = train(f"init_from={missing}", f"hydra.run.dir={tmp_path / 'run'}", full_error=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr
    assert str(missing) in proc.stderr


@pytest.mark.slow
def test_multirun_reports_each_failed_job(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ckpt"
    proc = train("-m", f"init_from={missing}", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = error_lines(proc)
    for job in ("seed=0", "seed=1"):
        assert any(job in line and str(missing) in line and "init_from" in line for line in lines), proc.stderr


def test_user_error_message_unwraps_instantiation() -> None:
    root = TypeError("CIFAR10DataModule.__init__() got an unexpected keyword argument 'foo'")
    try:
        try:
            raise root
        except TypeError as err:
            raise InstantiationException("Error in call to target 'x':\nTypeError(...)") from err
    except InstantiationException as wrapped:
        assert user_error_message(wrapped) == str(root)
    assert user_error_message(UnsupportedModelError("cannot prune this")) == "cannot prune this"
    assert user_error_message(FileNotFoundError(2, "No such file", "/x")) == "[Errno 2] No such file: '/x'"
    assert user_error_message(RuntimeError("a bug")) is None  # genuine bugs keep their traceback
    assert user_error_message(InstantiationException("Error locating target 'nope'")) is None
