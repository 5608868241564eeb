"""Deterministic Lightning fixtures for the callback tests (no shuffling, no augmentation)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_ifprune.models import build_model
from lightning_ifprune.module import ImageClassifier


def digits_tensors(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded digits at 8×8, as float tensors (first ``n`` images)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return (x - 0.3) / 0.4, torch.tensor(data.target[:n])


def loader(n: int = 512, batch_size: int = 64) -> DataLoader:
    x, y = digits_tensors(n)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def classifier(seed: int = 0, widths: tuple[int, ...] = (16, 32, 32)) -> ImageClassifier:
    torch.manual_seed(seed)
    net = build_model("small_cnn", num_classes=10, in_channels=1, widths=widths)
    opt = partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    return ImageClassifier(net, num_classes=10, optimizer=opt)


def widths(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape: the architecture, comparable across runs and ranks."""
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


def cpu_trainer(root: Path, epochs: int, callbacks: list[Callback], **kwargs) -> L.Trainer:
    """A quiet, deterministic single-process CPU trainer (checkpoints only with a ModelCheckpoint)."""
    saving = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=saving, default_root_dir=root, deterministic=True)  # fmt: skip
    return L.Trainer(max_epochs=epochs, callbacks=callbacks, **{**options, **kwargs})


class DictDigits(Dataset):
    """The digits as ``{"image": x, "label": y, "id": str}`` samples (no input/target keys)."""

    def __init__(self, n: int = 192) -> None:
        self.x, self.y = digits_tensors(n)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "id": f"sample-{i}"}
