"""ImageNet (ILSVRC-2012) from a torchvision ``ImageFolder`` layout.

Expects ``data_dir/train/<class>/*.JPEG`` and ``data_dir/val/<class>/*.JPEG`` (the validation
images sorted into class folders); the validation folder serves as both val and test split,
as is usual since the ImageNet test labels are not public.
"""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets, transforms

from lightning_ifprune.data.base import DatasetNotFoundError, ImageDataModule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetDataModule(ImageDataModule):
    """ImageNet with the standard pipeline: RandomResizedCrop + flip for training,
    Resize(256 * image_size / 224) + CenterCrop(image_size) for evaluation."""

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        num_classes: int = 1000,
        image_size: int = 224,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.data_dir = Path(data_dir).absolute()
        self.num_classes = num_classes
        self.image_size = image_size
        self.input_shape = (3, image_size, image_size)

    def _check_present(self) -> None:
        """Raise :class:`DatasetNotFoundError` unless train/ and val/ each hold a class folder.

        Cheap on purpose: it stops at the first class folder instead of scanning all images.
        """
        for split in ("train", "val"):
            folder = self.data_dir / split
            if not (folder.is_dir() and any(p.is_dir() for p in folder.iterdir())):
                raise DatasetNotFoundError(
                    f"ImageNet not found: expected class folders under {folder} (ImageFolder "
                    f"layout {self.data_dir}/{{train,val}}/<wnid>/*.JPEG). ImageNet cannot be "
                    "downloaded automatically: get ILSVRC-2012 from https://image-net.org "
                    "(registration required), sort val/ into class folders, and set "
                    "data.data_dir (or IFPRUNE_DATA) accordingly."
                )

    def prepare_data(self) -> None:
        """Check that the folders are there (nothing to download)."""
        self._check_present()

    def setup(self, stage: str | None = None) -> None:
        """Index both folders (once; later calls are no-ops)."""
        if self.train_set is not None:
            return
        self._check_present()
        normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(self.image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        )
        eval_tf = transforms.Compose(
            [
                transforms.Resize(round(self.image_size * 256 / 224)),
                transforms.CenterCrop(self.image_size),
                transforms.ToTensor(),
                normalize,
            ]
        )
        train_set = datasets.ImageFolder(str(self.data_dir / "train"), transform=train_tf)
        if len(train_set.classes) != self.num_classes:
            raise ValueError(
                f"{self.data_dir / 'train'} has {len(train_set.classes)} class folders but "
                f"num_classes={self.num_classes}"
            )
        self.train_set = train_set
        self.val_set = datasets.ImageFolder(str(self.data_dir / "val"), transform=eval_tf)
        self.test_set = self.val_set
