"""Fashion-MNIST from its four idx files (plain or gzipped), read with numpy.

The files are looked for under ``data_dir`` (torchvision's ``FashionMNIST/raw`` layout, a bare
``FashionMNIST`` or ``fashion-mnist`` folder) and then in Debian's location
(``apt-get install dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``).
Nothing is downloaded. The validation split is a seeded, class-stratified part of the 60,000
training images (optionally only a ``train_subset`` of them, for quick CPU runs); the official
10,000 ``t10k`` images are the test split.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lightning_ifprune.data.base import DatasetNotFoundError, ImageDataModule
from lightning_ifprune.data.digits import ShiftAugmentedTensorDataset

#: Where Debian's ``dataset-fashion-mnist`` package installs the idx files (searched last).
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
#: Sub-folders of ``data_dir`` searched, in order.
DATA_DIR_LAYOUTS: tuple[str, ...] = ("FashionMNIST/raw", "FashionMNIST", "fashion-mnist")
#: The four files, by role, without the optional ``.gz``.
FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: Mean and standard deviation of the training pixels scaled to [0, 1].
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
NUM_TRAIN, NUM_TEST, SIDE = 60_000, 10_000, 28
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def _open(path: Path) -> io.BufferedIOBase:
    """``path`` opened for binary reading, decompressed on the fly when it ends in ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def idx_shape(path: Path) -> tuple[int, ...]:
    """The dimensions in the header of an idx file (plain or gzipped), without reading the data."""
    with _open(path) as f:
        header = f.read(4)
        if len(header) != 4 or header[:2] != b"\x00\x00" or header[2] != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte idx file (magic {header.hex()})")
        ndim = header[3]
        dims = np.frombuffer(f.read(4 * ndim), dtype=">i4")
    if len(dims) != ndim:
        raise ValueError(f"{path}: truncated idx header")
    return tuple(int(d) for d in dims)


def read_idx(path: Path) -> np.ndarray:
    """The uint8 array stored in an idx file (plain or gzipped)."""
    shape = idx_shape(path)
    with _open(path) as f:
        raw = f.read()
    offset = 4 + 4 * len(shape)
    count = int(np.prod(shape))
    if len(raw) - offset != count:
        raise ValueError(f"{path}: header says {shape} ({count} bytes) but holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(len(labels))`` that takes the classes in turn.

    Within each class the order is random; the result lists every class's first pick, then
    every class's second, and so on, so any prefix (or block) is balanced to within a few items.
    """
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).numpy()
    shuffled = labels[perm]
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(shuffled == c)
        rank[where] = np.arange(len(where))
    return perm[np.lexsort((np.arange(len(labels)), rank))]


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST: 28x28 grey images of 10 kinds of clothing, read from local idx files.

    Pixels are scaled to [0, 1], optionally bilinearly resized to ``image_size`` and normalised
    with the dataset's mean and std (0.2860, 0.3530). ``train_subset`` (None: all 60,000) picks
    that many training-file images, seeded and class-stratified; ``val_fraction`` of them form
    the validation split, the rest the training split. Only the training split is augmented, by
    a random translation of up to ``max_shift`` pixels (0: none). ``seed`` fixes the subset and
    split; the batch order follows the run's global seed, as for the other modules.

    ``system_dirs`` (None: :data:`SYSTEM_DIRS`) are searched after the ``data_dir`` layouts.
    Construction reads nothing; :meth:`prepare_data` and :meth:`setup` raise
    :class:`DatasetNotFoundError` when the files are absent. After :meth:`setup`,
    ``split_indices`` maps ``train`` and ``val`` to their indices into the training file.
    """

    num_classes = 10
    classes = CLASSES

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        train_subset: int | None = None,
        val_fraction: float = 0.1,
        image_size: int = SIDE,
        max_shift: int = 0,
        system_dirs: Sequence[str | Path] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if train_subset is not None and not 0 < train_subset <= NUM_TRAIN:
            raise ValueError(f"train_subset must be null or in 1..{NUM_TRAIN}, got {train_subset}")
        self.data_dir = Path(data_dir).absolute()
        self.seed = seed
        self.train_subset = train_subset
        self.val_fraction = val_fraction
        self.image_size = image_size
        self.max_shift = max_shift
        self.system_dirs = tuple(Path(d) for d in (SYSTEM_DIRS if system_dirs is None else system_dirs))
        self.input_shape = (1, image_size, image_size)
        self.mean, self.std = FMNIST_MEAN, FMNIST_STD
        self.split_indices: dict[str, list[int]] = {}

    @property
    def search_dirs(self) -> list[Path]:
        """The folders searched for the idx files, in order."""
        return [self.data_dir / layout for layout in DATA_DIR_LAYOUTS] + list(self.system_dirs)

    def _not_found(self, reason: str) -> DatasetNotFoundError:
        looked = ", ".join(str(d) for d in self.search_dirs)
        names = ", ".join(f"{name}[.gz]" for name in FILES.values())
        return DatasetNotFoundError(
            f"Fashion-MNIST not found: {reason}. Looked for {names} in: {looked}. Install Debian's "
            "package (apt-get install dataset-fashion-mnist, or make fmnist), which puts them in "
            "/usr/share/datasets/fashion-mnist; or, on a machine with internet access, run "
            f"torchvision.datasets.FashionMNIST('{self.data_dir}', download=True) (giving "
            f"{self.data_dir / 'FashionMNIST' / 'raw'}), and set data.data_dir (or IFPRUNE_DATA) to that root."
        )

    def locate(self) -> dict[str, Path]:
        """The four files, by role, from the first searched folder that holds all of them."""
        for folder in self.search_dirs:
            found: dict[str, Path] = {}
            for role, name in FILES.items():
                path = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
                if path is None:
                    break
                found[role] = path
            else:
                return found
        raise self._not_found("no folder holds all four idx files")

    def prepare_data(self) -> None:
        """Check that the files are there (nothing to download)."""
        self.locate()

    def _read(self, paths: dict[str, Path], role: str, shape: tuple[int, ...]) -> np.ndarray:
        try:
            array = read_idx(paths[role])
        except (OSError, EOFError, ValueError) as err:  # bad gzip stream, truncated file, bad header
            raise self._not_found(f"{paths[role]} is unreadable or corrupt ({err})") from None
        if array.shape != shape:
            raise self._not_found(f"{paths[role]} holds shape {array.shape}, expected {shape}")
        return array

    def _images(self, raw: np.ndarray) -> torch.Tensor:
        """uint8 (N, 28, 28) → normalised float (N, 1, image_size, image_size)."""
        images = torch.from_numpy(raw.copy()).unsqueeze(1).float().div_(255.0)
        if self.image_size != SIDE:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return images.sub_(self.mean).div_(self.std)

    def setup(self, stage: str | None = None) -> None:
        """Read the files, pick the subset, split and normalise (once; later calls are no-ops)."""
        if self.train_set is not None:
            return
        paths = self.locate()
        train_images = self._read(paths, "train_images", (NUM_TRAIN, SIDE, SIDE))
        train_labels = self._read(paths, "train_labels", (NUM_TRAIN,))
        test_images = self._read(paths, "test_images", (NUM_TEST, SIDE, SIDE))
        test_labels = self._read(paths, "test_labels", (NUM_TEST,))

        pool = self.train_subset or NUM_TRAIN
        n_val = round(pool * self.val_fraction)
        order = stratified_order(train_labels, self.seed)[:pool]
        val_idx, train_idx = order[:n_val].tolist(), order[n_val:].tolist()
        self.split_indices = {"train": train_idx, "val": val_idx}
        background = (0.0 - self.mean) / self.std

        def labels(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array.astype(np.int64))

        self.train_set = ShiftAugmentedTensorDataset(
            self._images(train_images[train_idx]),
            labels(train_labels[train_idx]),
            max_shift=self.max_shift,
            fill=background,
        )
        self.test_set = ShiftAugmentedTensorDataset(self._images(test_images), labels(test_labels))
        self.val_set = (
            ShiftAugmentedTensorDataset(self._images(train_images[val_idx]), labels(train_labels[val_idx]))
            if n_val > 0
            else self.test_set
        )
