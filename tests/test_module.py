"""ImageClassifier: loss, logged metrics, per-epoch scheduling, checkpoint round trip."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_ifprune.data import SyntheticDataModule
from lightning_ifprune.models import SmallCNN
from lightning_ifprune.module import ImageClassifier


def tiny_module(num_classes: int = 10, **kwargs: object) -> ImageClassifier:
    net = SmallCNN(num_classes=num_classes, in_channels=3, widths=(4, 8))
    kwargs.setdefault("optimizer", functools.partial(torch.optim.SGD, lr=0.1))
    return ImageClassifier(net=net, num_classes=num_classes, **kwargs)


def tiny_data(num_classes: int = 10) -> SyntheticDataModule:
    return SyntheticDataModule(
        input_shape=(3, 8, 8),
        num_classes=num_classes,
        num_samples=64,
        num_eval_samples=32,
        batch_size=16,
    )


def tiny_trainer(tmp_path: Path, epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=CSVLogger(tmp_path),
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_step_returns_smoothed_cross_entropy() -> None:
    module = tiny_module(label_smoothing=0.1)
    x, y = torch.randn(5, 3, 8, 8), torch.randint(10, (5,))
    loss = module.training_step((x, y), 0)
    expected = nn.functional.cross_entropy(module(x), y, label_smoothing=0.1)
    assert loss.requires_grad
    assert torch.allclose(loss, expected)


def test_fit_and_test_log_the_documented_metrics(tmp_path: Path) -> None:
    module, dm = tiny_module(), tiny_data()
    trainer = tiny_trainer(tmp_path)
    trainer.fit(module, datamodule=dm)
    logged = set(trainer.callback_metrics)
    assert {"train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/acc_top5"} <= logged
    results = trainer.test(module, datamodule=dm)[0]
    assert set(results) == {"test/loss", "test/acc", "test/acc_top5"}
    assert 0 <= results["test/acc"] <= results["test/acc_top5"] <= 1
    csv = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "val/acc" in csv and "train/loss_step" in csv


def test_top5_only_with_at_least_five_classes(tmp_path: Path) -> None:
    module, dm = tiny_module(num_classes=4), tiny_data(num_classes=4)
    assert module.val_acc_top5 is None and module.test_acc_top5 is None
    trainer = tiny_trainer(tmp_path)
    trainer.fit(module, datamodule=dm)
    results = trainer.test(module, datamodule=dm)[0]
    assert set(results) == {"test/loss", "test/acc"}


def test_accuracy_is_plain_top1_fraction() -> None:
    module = tiny_module(num_classes=10)
    logits = torch.zeros(4, 10)
    logits[torch.arange(4), torch.tensor([1, 2, 3, 4])] = 1.0
    module.test_acc(logits, torch.tensor([1, 2, 0, 0]))
    assert module.test_acc.compute().item() == pytest.approx(0.5)


def test_scheduler_steps_once_per_epoch(tmp_path: Path) -> None:
    module = tiny_module(scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    trainer = tiny_trainer(tmp_path, epochs=3)
    trainer.fit(module, datamodule=tiny_data())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_training_without_optimizer_is_a_clear_error() -> None:
    module = ImageClassifier(net=nn.Linear(3, 2), num_classes=2)
    with pytest.raises(ValueError, match="optimizer"):
        module.configure_optimizers()


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    module, dm = tiny_module(label_smoothing=0.05), tiny_data()
    trainer = tiny_trainer(tmp_path)
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    fresh_net = SmallCNN(num_classes=10, in_channels=3, widths=(4, 8))
    restored = ImageClassifier.load_from_checkpoint(path, net=fresh_net, weights_only=True)
    assert restored.num_classes == 10 and restored.label_smoothing == 0.05
    for key, value in module.net.state_dict().items():
        assert torch.equal(restored.net.state_dict()[key], value), key
    x = torch.randn(2, 3, 8, 8)
    module.eval()
    restored.eval()
    assert torch.equal(module(x), restored(x))
