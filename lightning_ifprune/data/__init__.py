"""Lightning data modules: the embedded digits default, Fashion-MNIST, CIFAR, ImageNet and synthetic data.

Every module exposes ``num_classes`` and ``input_shape`` (C, H, W) from construction on,
before any data is read, so models and example inputs can be built first.
"""

from lightning_ifprune.data.base import DatasetNotFoundError, ImageDataModule, TransformSubset
from lightning_ifprune.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_ifprune.data.digits import DigitsDataModule, ShiftAugmentedTensorDataset
from lightning_ifprune.data.fashion_mnist import FashionMNISTDataModule
from lightning_ifprune.data.imagenet import ImageNetDataModule
from lightning_ifprune.data.synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageNetDataModule",
    "ShiftAugmentedTensorDataset",
    "SyntheticDataModule",
    "TransformSubset",
]
