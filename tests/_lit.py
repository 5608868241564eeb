"""Deterministic Lightning fixtures for the callback tests (no shuffling, no augmentation)."""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.data import DataLoader, TensorDataset

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
