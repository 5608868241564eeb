"""Embedded synthetic object detection: coloured shapes on textured, noisy backgrounds.

Nothing is downloaded: every image is drawn in code from a seed. A sample is an image with 1
to ``max_objects`` shapes — rectangles, ellipses and triangles (labels 1, 2, 3; 0 is the
background, as torchvision's detectors expect) — of random size, colour and position, on a
background of random smooth colour, stripes and pixel noise. Its target is the tight box of
every shape's visible pixels (``boxes``, ``(k, 4)`` float ``x1, y1, x2, y2``) and its label.
Batches are ``(images, targets)``: a list of ``(3, S, S)`` float tensors in ``[0, 1]`` and a
list of target dicts (:func:`detection_collate`).
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

#: Object classes, label = index + 1 (0 is the background).
SHAPE_CLASSES = ("rectangle", "ellipse", "triangle")

Target = dict[str, torch.Tensor]


def detection_collate(items: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """``[(image, target), ...]`` → ``(images, targets)``, the batch torchvision detectors take."""
    return [image for image, _ in items], [target for _, target in items]


def _shape_mask(kind: int, size: int, gen: torch.Generator, min_side: int, max_side: int) -> torch.Tensor:
    """A boolean ``(size, size)`` mask of one shape of class ``kind`` at a random place."""
    w, h = (int(v) for v in torch.randint(min_side, max_side + 1, (2,), generator=gen))
    x0 = int(torch.randint(0, size - w + 1, (1,), generator=gen))
    y0 = int(torch.randint(0, size - h + 1, (1,), generator=gen))
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    u, v = (xs - x0) / w, (ys - y0) / h  # the shape's box is [0, 1]^2 in (u, v)
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if kind == 0:
        return inside
    if kind == 1:
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    return inside & (v >= 2 * (u - 0.5).abs())  # apex at the top centre, base at the bottom


def _background(size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth colour + oriented stripes + pixel noise, ``(3, size, size)`` in ``[0, 1]``."""
    coarse = torch.rand(3, 4, 4, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse[None], size=(size, size), mode="bilinear")[0]
    angle, freq = float(torch.rand(1, generator=gen)) * math.pi, 0.1 + 0.4 * float(torch.rand(1, generator=gen))
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float), torch.arange(size, dtype=torch.float), indexing="ij")
    stripes = torch.sin(freq * (xs * math.cos(angle) + ys * math.sin(angle)))
    image = 0.25 + 0.5 * smooth + 0.1 * stripes + 0.08 * torch.randn(3, size, size, generator=gen)
    return image.clamp(0, 1)


def draw_sample(seed: int, size: int = 128, max_objects: int = 3) -> tuple[torch.Tensor, Target]:
    """One image and its target, a function of ``seed`` only (boxes of what stays visible)."""
    gen = torch.Generator().manual_seed(seed)
    image = _background(size, gen)
    count = int(torch.randint(1, max_objects + 1, (1,), generator=gen))
    owner = torch.full((size, size), -1)
    kinds = []
    for k in range(count):
        kind = int(torch.randint(len(SHAPE_CLASSES), (1,), generator=gen))
        mask = _shape_mask(kind, size, gen, max(size // 8, 4), max(size // 3, 6))
        colour = torch.rand(3, generator=gen)
        shade = colour[:, None, None] + 0.05 * torch.randn(3, size, size, generator=gen)
        image = torch.where(mask, shade.clamp(0, 1), image)
        owner[mask] = k
        kinds.append(kind)
    boxes, labels = [], []
    for k, kind in enumerate(kinds):
        ys, xs = torch.nonzero(owner == k, as_tuple=True)
        if len(xs) < 16:  # (almost) hidden behind later shapes
            continue
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1])
        labels.append(kind + 1)
    target = {"boxes": torch.tensor(boxes, dtype=torch.float).reshape(-1, 4), "labels": torch.tensor(labels)}
    return image, target


class ShapesDataset(Dataset):
    """``count`` samples drawn from the seeds ``seed * 1_000_003 + i`` (kept in memory as uint8)."""

    def __init__(self, count: int, seed: int, size: int = 128, max_objects: int = 3) -> None:
        samples = [draw_sample(seed * 1_000_003 + i, size, max_objects) for i in range(count)]
        self.images = torch.stack([(img * 255).round().to(torch.uint8) for img, _ in samples])
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        target = {k: v.clone() for k, v in self.targets[index].items()}
        return self.images[index].float() / 255, target


class ShapesDetectionDataModule(LightningDataModule):
    """Train/val/test splits of synthetic shapes (see the module docstring), seeded with ``seed``.

    ``num_classes`` counts the background (torchvision's convention: 4 for three shapes);
    ``input_shape`` is ``(3, image_size, image_size)``. Both are known before any image is drawn.
    """

    def __init__(
        self,
        num_train: int = 320,
        num_eval: int = 64,
        image_size: int = 128,
        max_objects: int = 3,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if min(num_train, num_eval, image_size, max_objects, batch_size) < 1 or image_size < 16:
            raise ValueError("num_train, num_eval, max_objects and batch_size must be ≥ 1, image_size ≥ 16")
        self.num_train, self.num_eval, self.image_size = num_train, num_eval, image_size
        self.max_objects, self.batch_size, self.num_workers, self.seed = max_objects, batch_size, num_workers, seed
        self.num_classes = len(SHAPE_CLASSES) + 1
        self.input_shape = (3, image_size, image_size)
        self.train_set: ShapesDataset | None = None
        self.val_set: ShapesDataset | None = None
        self.test_set: ShapesDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Draw the three splits (once; later calls are no-ops). The splits use disjoint seeds."""
        if self.train_set is not None:
            return
        args = (self.image_size, self.max_objects)
        self.train_set = ShapesDataset(self.num_train, 3 * self.seed, *args)
        self.val_set = ShapesDataset(self.num_eval, 3 * self.seed + 1, *args)
        self.test_set = ShapesDataset(self.num_eval, 3 * self.seed + 2, *args)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for loaders")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=detection_collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self.test_set, shuffle=False)

    def example_input(self) -> list[torch.Tensor]:
        """What a detector is traced with: one image of this data's size (a list of one)."""
        return [torch.zeros(self.input_shape)]
