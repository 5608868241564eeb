"""Shared plumbing for the image-classification data modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where its data module expects it, and could not be fetched."""


class ImageDataModule(LightningDataModule):
    """Base for the image data modules: batching and loaders over three splits.

    Subclasses set :attr:`num_classes` and :attr:`input_shape` in ``__init__`` (so models and
    example inputs can be built before any data is read) and fill ``train_set``, ``val_set``
    and ``test_set`` in :meth:`setup`.
    """

    num_classes: int
    input_shape: tuple[int, int, int]

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for loaders")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order, no augmentation."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order, no augmentation."""
        return self._loader(self.test_set, shuffle=False)


class TransformSubset(Dataset):
    """The items ``indices`` of ``dataset`` with ``transform`` applied to their images.

    Lets one decoded dataset serve two splits with different transforms (augmented train,
    plain validation) without loading it twice.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int],
        transform: Callable[[Any], torch.Tensor],
    ) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[self.indices[index]]
        return self.transform(image), label


def seeded_split(n: int, first: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random partition of ``range(n)`` into ``first`` indices and the rest."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[:first], perm[first:]
