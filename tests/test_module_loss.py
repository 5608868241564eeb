"""The callback's default loss is the one the LightningModule trains with (its training_step)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _lit import DictDigits, cpu_trainer, digits_tensors, widths
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

import lightning_ifprune as lip
from lightning_ifprune.fit_loop import TrainingStepLoss


class AuxNet(L.LightningModule):
    """Dict batches, no example_input_array, a loss only in training_step: label-smoothed
    cross-entropy of the main head plus 0.4 × that of an auxiliary head; logs and a metric."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())  # fmt: skip
        self.head = nn.Linear(16 * 8 * 8, 10)
        self.aux = nn.Linear(8 * 8 * 8, 10)
        self.acc = MulticlassAccuracy(num_classes=10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        early = self.body[:3](x)
        return self.head(self.body[3:](early).flatten(1)), self.aux(early.flatten(1))

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        main, aux = self(batch["image"])
        loss = explicit_loss(main, aux, batch["label"])
        self.acc(main, batch["label"])
        self.log("train/loss", loss)
        self.log_dict({"train/acc": self.acc})
        return {"loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def explicit_loss(main: torch.Tensor, aux: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(main, y, label_smoothing=0.1) + 0.4 * F.cross_entropy(aux, y)


def explicit(model: nn.Module, batch: dict) -> torch.Tensor:
    return explicit_loss(*model(batch["image"]), batch["label"])


def test_training_step_loss_is_the_module_s_loss_without_side_effects() -> None:
    torch.manual_seed(0)
    module = AuxNet()
    batch = next(iter(DataLoader(DictDigits(), batch_size=32)))
    module.acc(torch.randn(4, 10), torch.arange(4))  # some metric state to keep
    state = {k: v.clone() for k, v in module.acc.metric_state.items()}
    got = TrainingStepLoss()(module, batch)
    torch.testing.assert_close(got, explicit(module, batch))
    assert all(torch.equal(module.acc.metric_state[k], v) for k, v in state.items())
    assert "log" not in vars(module)  # the silencing is undone


def test_the_default_loss_scores_with_the_training_step(tmp_path: Path) -> None:
    """With no loss argument, the scores equal Taylor scores of the explicit training loss on
    the same batches; the module prunes inside fit and trains on."""
    torch.manual_seed(0)
    seen: dict = {}

    def capture(structure, batches, loss):
        batches = list(batches)
        seen["ours"] = lip.Taylor()(structure, batches, loss)
        seen["explicit"] = lip.Taylor()(structure, batches, explicit)
        seen["loss"] = loss
        return seen["ours"]

    module = AuxNet()
    before = widths(module)
    pruner = lip.InfluencePruningCallback(target_flops=0.5, criterion=capture, verbose=False)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[pruner])  # fmt: skip
    trainer.fit(module, DataLoader(DictDigits(), batch_size=32, shuffle=True))
    assert isinstance(seen["loss"], TrainingStepLoss)
    for name, value in seen["explicit"].items():
        torch.testing.assert_close(seen["ours"][name], value)
    assert pruner.finished and widths(module) != before


def test_pruning_loss_overrides_and_manual_optimization_needs_it() -> None:
    module = AuxNet()
    batch = next(iter(DataLoader(DictDigits(), batch_size=8)))
    module.pruning_loss = lambda b: module(b["image"])[0].square().mean()
    torch.testing.assert_close(TrainingStepLoss()(module, batch), module(batch["image"])[0].square().mean())
    manual = AuxNet()
    manual.automatic_optimization = False
    with pytest.raises(ValueError, match="pruning_loss"):
        TrainingStepLoss()(manual, batch)
    bad = AuxNet()
    bad.training_step = lambda b, i: None
    with pytest.raises(TypeError, match="training_step returned None"):
        TrainingStepLoss()(bad, batch)


def test_the_image_classifier_default_is_its_label_smoothed_loss() -> None:
    from lightning_ifprune.models import build_model
    from lightning_ifprune.module import ImageClassifier

    net = build_model("small_cnn", 10, 1, widths=(4, 8, 8))
    module = ImageClassifier(net, 10, optimizer=partial(torch.optim.SGD, lr=0.1), label_smoothing=0.2)
    x, y = digits_tensors(16)
    got = TrainingStepLoss()(module, (x, y))
    torch.testing.assert_close(got, F.cross_entropy(module(x), y, label_smoothing=0.2))


class _LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_a_plain_module_prunes_with_no_arguments_trains_on_and_resumes(tmp_path: Path) -> None:
    """Dict batches, no example_input_array, the loss only in training_step:
    ``InfluencePruningCallback(target_flops=0.5)`` prunes to half the FLOPs in 3 rounds, the
    loss keeps falling, and a mid-schedule checkpoint resumes to the same architecture."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_ifprune.measure import count_macs

    def run(root: Path, epochs: int, ckpt: Path | None = None) -> tuple[AuxNet, _LossLog]:
        L.seed_everything(0)
        module, log = AuxNet(), _LossLog()
        pruner = lip.InfluencePruningCallback(target_flops=0.5, rounds=3, end_epoch=2, verbose=False)
        saver = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        trainer = cpu_trainer(root, epochs, [pruner, log, saver])
        trainer.fit(module, DataLoader(DictDigits(256), batch_size=32), ckpt_path=ckpt)
        return module, log

    dense = count_macs(AuxNet(), torch.zeros(1, 1, 8, 8))
    full, log = run(tmp_path / "full", 6)
    assert count_macs(full, torch.zeros(1, 1, 8, 8)) <= 0.5 * dense
    per_epoch = [sum(log.losses[i : i + 8]) / 8 for i in range(0, len(log.losses), 8)]
    assert per_epoch[-1] < per_epoch[3]  # trains on after the last round (epoch 2)
    # Unshuffled, so the resumed run sees the batches the uninterrupted one saw.
    resumed, _ = run(tmp_path / "resumed", 6, ckpt=tmp_path / "full" / "epoch=1.ckpt")
    assert widths(resumed) == widths(full)
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)
