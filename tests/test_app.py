"""The app's phases in process: pre-train → prune → fine-tune, init_from, the pre-train cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_ifprune.app import train
from lightning_ifprune.export import load_exported
from lightning_ifprune.models import build_model

TINY = [
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=2",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "model.net.widths=[8,16,32]",
    "report.latency_iters=2",
    "report.latency_batch_size=8",
]


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


@pytest.fixture
def make_cfg(compose_cfg):
    """The train config with the tiny limits, for an output directory and overrides."""
    return lambda out, *overrides: compose_cfg(out, *TINY, *overrides)


@pytest.fixture(scope="module")
def three_phase(tmp_path_factory: pytest.TempPathFactory, compose_cfg) -> tuple[Path, dict]:
    """Pre-train 1 epoch, prune in one round at the start of phase 2, fine-tune 1 epoch apart."""
    out = tmp_path_factory.mktemp("three_phase")
    threads = torch.get_num_threads()
    cfg = compose_cfg(
        out,
        *TINY,
        "prune=magnitude",
        "pretrain.epochs=1",
        "trainer.max_epochs=3",
        "prune.start_epoch=0",
        "prune.end_epoch=0",
        "prune.rounds=1",
        "prune.target_flops=0.4",
        "finetune.epochs=1",
    )
    summary = train(cfg)
    torch.set_num_threads(threads)
    return out, summary


def test_three_phases(three_phase: tuple[Path, dict]) -> None:
    out, summary = three_phase
    assert json.loads((out / "summary.json").read_text()) == summary
    # Phase 2 stops with the epoch in which pruning finished; phase 3 fine-tunes apart.
    assert (summary["epochs_pretrain"], summary["epochs_prune"], summary["epochs_finetune"]) == (
        1,
        1,
        1,
    )
    assert summary["pruning_finished_epoch"] == 0 and summary["prune_rounds"] == 1
    assert summary["target_met"] is True
    assert summary["flops_after"] <= 0.4 * summary["flops_before"]
    assert summary["flops_before"] == summary["dense_flops"]
    for key in ("test_acc_before", "test_acc_pruned", "test_acc_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["channels_before"] == {"features.0": 8, "features.4": 16, "features.8": 32}
    assert sum(summary["channels_after"].values()) < 56
    assert summary["wall_pretrain_s"] > 0 and summary["wall_finetune_s"] > 0 and summary["wall_prune_s"] >= 0
    assert summary["latency_before_ms"] > 0 and summary["latency_after_ms"] > 0
    assert summary["latency_device"] == "cpu" and summary["latency_batch_size"] == 8
    for phase in ("pretrain", "prune", "finetune"):
        assert (out / "csv" / phase / "metrics.csv").is_file()
    assert (out / "pretrained.ckpt").is_file() and (out / "channels.png").is_file()
    assert set(summary["files"]) == {
        "pretrained_ckpt",
        "channels_plot",
        "export_state",
        "export_torchscript",
    }


def test_exports_match_each_other(three_phase: tuple[Path, dict]) -> None:
    out, summary = three_phase
    rebuilt = load_exported(out / "pruned_state.pt")
    scripted = load_exported(out / "model.pt")
    x = torch.randn(5, 1, 16, 16)
    torch.testing.assert_close(scripted(x), rebuilt(x))
    assert sum(p.numel() for p in rebuilt.parameters()) == summary["params_after"]


@pytest.mark.parametrize("source", ["lightning", "exported"])
def test_init_from_a_pruned_checkpoint(three_phase: tuple[Path, dict], tmp_path: Path, source: str, make_cfg) -> None:
    """A pruned checkpoint initialises the module; with no training the test accuracy and the
    cost are those of the run that wrote it."""
    out, first = three_phase
    path = (
        next((out / "csv" / "finetune" / "checkpoints").glob("*.ckpt"))
        if source == "lightning"
        else out / "pruned_state.pt"
    )
    cfg = make_cfg(tmp_path, "prune=none", f"init_from='{path}'", "pretrain.epochs=0", "trainer.max_epochs=0")
    summary = train(cfg)
    assert summary["flops_before"] == summary["flops_after"] == first["flops_after"]
    assert summary["channels_before"] == first["channels_after"]
    assert summary["test_acc_before"] == pytest.approx(first["test_acc_after"])
    assert summary["test_acc_after"] == pytest.approx(first["test_acc_after"])
    assert summary["epochs"] == 0 and summary["target"] is None
    # Its export still holds the whole history (from the unpruned build).
    torch.testing.assert_close(
        load_exported(tmp_path / "pruned_state.pt")(torch.ones(1, 1, 16, 16)),
        load_exported(out / "pruned_state.pt")(torch.ones(1, 1, 16, 16)),
    )


def test_init_from_pruned_with_a_pruner_is_refused(three_phase: tuple[Path, dict], tmp_path: Path, make_cfg) -> None:
    out, _ = three_phase
    cfg = make_cfg(tmp_path, "prune=magnitude", f"init_from={out / 'pruned_state.pt'}", "pretrain.epochs=0")
    with pytest.raises(ValueError, match="already pruned"):
        train(cfg)


def test_init_from_a_plain_state_dict(tmp_path: Path, make_cfg) -> None:
    torch.manual_seed(3)
    net = build_model("small_cnn", num_classes=10, in_channels=1, widths=[8, 16, 32])
    torch.save(net.state_dict(), tmp_path / "net.pt")
    cfg = make_cfg(
        tmp_path,
        "prune=none",
        f"init_from={tmp_path / 'net.pt'}",
        "pretrain.epochs=0",
        "trainer.max_epochs=0",
        "export.torchscript=false",
        "report.plot=false",
    )
    summary = train(cfg)
    assert summary["flops_before"] == summary["dense_flops"]
    loaded = load_exported(tmp_path / "pruned_state.pt")
    for key, value in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    torch.save({"weights": [1, 2]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        train(make_cfg(tmp_path, f"init_from={tmp_path / 'bad.pt'}"))


def test_pretrain_cache_gives_the_same_run(tmp_path: Path, make_cfg) -> None:
    args = [
        "prune=fisher",
        "pretrain.epochs=1",
        "trainer.max_epochs=1",
        "prune.start_epoch=0",
        "prune.end_epoch=0",
        "prune.rounds=1",
        f"pretrain.cache_dir={tmp_path / 'cache'}",
        "export.enabled=false",
        "report.plot=false",
        "~logger",
    ]
    first = train(make_cfg(tmp_path / "a", *args))
    assert not first["pretrain_cached"] and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert list((tmp_path / "a" / "pretrain" / "checkpoints").glob("*.ckpt"))  # no logger: per-phase dirs
    second = train(make_cfg(tmp_path / "b", *args))
    assert second["pretrain_cached"]
    assert second["wall_pretrain_s"] == first["wall_pretrain_s"]
    for key in ("test_acc_before", "test_acc_after", "flops_after", "channels_after"):
        assert second[key] == first[key], key
    # Another pre-train setting is another cache entry.
    train(
        make_cfg(
            tmp_path / "c",
            *args,
            "pretrain.optimizer={_target_:torch.optim.SGD,_partial_:true,lr:0.02}",
        )
    )
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_progressive_schedule_and_dense_control(tmp_path: Path, make_cfg) -> None:
    """influence_paper (progressive, paper score, 1/λ) reaches its target within the phase;
    prune=none with finetune.epochs skips phase 2."""
    cfg = make_cfg(
        tmp_path / "p",
        "prune=influence_paper",
        "pretrain.epochs=0",
        "trainer.max_epochs=3",
        "prune.every_n_steps=1",
        "prune.channels_per_step=4",
        "export.torchscript=false",
        "~logger",
    )
    summary = train(cfg)
    assert summary["criterion"] == "influence" and summary["target_met"] is True
    assert summary["prune_rounds"] >= 2 and summary["test_acc_pruned"] is not None

    dense = train(
        make_cfg(
            tmp_path / "d",
            "pretrain.epochs=0",
            "finetune.epochs=1",
            "~logger",
            "export.enabled=false",
        )
    )
    assert (dense["epochs_prune"], dense["epochs_finetune"]) == (0, 1)
    assert dense["flops_after"] == dense["flops_before"] and dense["test_acc_pruned"] is None
