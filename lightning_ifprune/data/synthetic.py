"""Random but learnable images, for benchmarks and tests that need no real data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lightning_ifprune.data.base import ImageDataModule


class SyntheticDataModule(ImageDataModule):
    """Gaussian noise around one smooth random template per class.

    Each class has a fixed low-frequency pattern (random values on a quarter-resolution grid,
    bilinearly upsampled, scaled to unit standard deviation); a sample is its class's template
    plus ``noise`` times standard Gaussian noise. Labels are uniform. Everything is drawn from
    one generator seeded with ``seed``, so the data is identical for the same arguments, and
    a CNN can learn it (the lower ``noise``, the easier).
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        num_samples: int = 512,
        num_eval_samples: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        noise: float = 1.0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        channels, height, width = (int(v) for v in input_shape)
        self.input_shape = (channels, height, width)
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.num_eval_samples = num_eval_samples
        self.seed = seed
        self.noise = noise

    def setup(self, stage: str | None = None) -> None:
        """Draw the templates and the three splits (once; later calls are no-ops)."""
        if self.train_set is not None:
            return
        gen = torch.Generator().manual_seed(self.seed)
        channels, height, width = self.input_shape
        coarse = torch.randn(self.num_classes, channels, max(height // 4, 1), max(width // 4, 1), generator=gen)
        templates = F.interpolate(coarse, size=(height, width), mode="bilinear")
        templates = templates / templates.flatten(1).std(dim=1).clamp_min(1e-6)[:, None, None, None]

        def draw(n: int) -> TensorDataset:
            labels = torch.randint(self.num_classes, (n,), generator=gen)
            images = templates[labels] + self.noise * torch.randn(n, *self.input_shape, generator=gen)
            return TensorDataset(images, labels)

        self.train_set = draw(self.num_samples)
        self.val_set = draw(self.num_eval_samples)
        self.test_set = draw(self.num_eval_samples)
