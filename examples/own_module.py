"""Your own LightningModule, unchanged: dict batches, the loss only in ``training_step``.

``InfluencePruningCallback(target_flops=0.5)`` needs nothing else: it traces the model with a
sample of the first training batch and scores channels with the loss ``training_step``
returns (its ``self.log`` calls are silenced while scoring).

Run: ``python examples/own_module.py``
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_ifprune import InfluencePruningCallback
from lightning_ifprune.measure import count_macs


class Digits(Dataset):
    """scikit-learn's 8×8 digits as ``{"image", "label"}`` dicts."""

    def __init__(self) -> None:
        data = load_digits()
        self.x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        self.y = torch.tensor(data.target)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["image"]), batch["label"], label_smoothing=0.1)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def main() -> None:
    L.seed_everything(0)
    model = Classifier()
    dense = count_macs(model, torch.zeros(1, 1, 8, 8))
    pruner = InfluencePruningCallback(target_flops=0.5, start_epoch=2, end_epoch=4, rounds=3)
    trainer = L.Trainer(max_epochs=8, accelerator="cpu", callbacks=[pruner], logger=False, enable_checkpointing=False)
    trainer.fit(model, DataLoader(Digits(), batch_size=64, shuffle=True))
    print(f"FLOPs kept: {count_macs(model, torch.zeros(1, 1, 8, 8)) / dense:.3f}")


if __name__ == "__main__":
    main()
