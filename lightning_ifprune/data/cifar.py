"""CIFAR-10 and CIFAR-100 from torchvision's python-pickle release.

The validation split is carved from the 50,000 training images (``val_size`` of them, a
seeded permutation, without augmentation); the official 10,000 test images are the test
split. ``val_size=0`` uses the test split for validation too, as much CIFAR work does.
"""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets, transforms

from lightning_ifprune.data.base import (
    DatasetNotFoundError,
    ImageDataModule,
    TransformSubset,
    seeded_split,
)


class _CIFARDataModule(ImageDataModule):
    """Shared CIFAR logic; subclasses name the torchvision dataset and its statistics."""

    dataset_cls: type[datasets.CIFAR10]
    display_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_shape = (3, 32, 32)

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        download: bool = False,
        val_size: int = 5000,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.data_dir = Path(data_dir).absolute()
        self.download = download
        self.val_size = val_size
        self.seed = seed

    @property
    def dataset_dir(self) -> Path:
        """Where torchvision keeps the extracted files under ``data_dir``."""
        return self.data_dir / self.dataset_cls.base_folder

    def _expected_files(self) -> list[Path]:
        names = [name for name, _ in self.dataset_cls.train_list + self.dataset_cls.test_list]
        names.append(self.dataset_cls.meta["filename"])
        return [self.dataset_dir / name for name in names]

    def _not_found(self, reason: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"{self.display_name} not found: {reason}. Download the {self.display_name} python "
            f"version ({self.dataset_cls.url}) and extract it into {self.data_dir} (giving "
            f"{self.dataset_dir}), set data.data_dir (or IFPRUNE_DATA) to where it is, or pass "
            "data.download=true on a machine with internet access."
        )

    def _check_present(self) -> None:
        """Raise :class:`DatasetNotFoundError` unless every expected file exists (no hashing)."""
        missing = [path for path in self._expected_files() if not path.is_file()]
        if missing:
            raise self._not_found(f"missing {missing[0]}")

    def prepare_data(self) -> None:
        """Download (when ``download`` is set) and check that the files are there."""
        if self.download:
            try:
                for train in (True, False):
                    self.dataset_cls(str(self.data_dir), train=train, download=True)
            except (OSError, RuntimeError) as err:  # URLError is an OSError; bad md5 a RuntimeError
                raise self._not_found(f"download into {self.data_dir} failed ({err})") from None
        self._check_present()

    def setup(self, stage: str | None = None) -> None:
        """Build the three splits (once; later calls are no-ops)."""
        if self.train_set is not None:
            return
        self._check_present()
        normalize = transforms.Normalize(self.mean, self.std)
        plain = transforms.Compose([transforms.ToTensor(), normalize])
        augmented = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        )
        root = str(self.data_dir)
        try:
            full_train = self.dataset_cls(root, train=True)
            self.test_set = self.dataset_cls(root, train=False, transform=plain)
        except RuntimeError as err:  # torchvision's checksum test failed
            raise self._not_found(f"files under {self.dataset_dir} are corrupt ({err})") from None
        val_idx, train_idx = seeded_split(len(full_train), self.val_size, self.seed)
        self.train_set = TransformSubset(full_train, train_idx, augmented)
        self.val_set = TransformSubset(full_train, val_idx, plain) if self.val_size > 0 else self.test_set


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 32x32 RGB, 10 classes; random crop (pad 4) and horizontal flip on train."""

    dataset_cls = datasets.CIFAR10
    display_name = "CIFAR-10"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 32x32 RGB, 100 classes; random crop (pad 4) and horizontal flip on train."""

    dataset_cls = datasets.CIFAR100
    display_name = "CIFAR-100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
