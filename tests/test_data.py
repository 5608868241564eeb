"""Data modules: splits, normalisation, augmentation, missing-data errors, synthetic data."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import cifar as tv_cifar

from lightning_ifprune.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    ImageNetDataModule,
    SyntheticDataModule,
)

N_DIGITS = 1797


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(seed=0)
    dm.setup()
    return dm


# --- digits ------------------------------------------------------------------------------


def test_digits_shapes_known_before_setup() -> None:
    dm = DigitsDataModule(image_size=20)
    assert dm.num_classes == 10
    assert dm.input_shape == (1, 20, 20)
    assert dm.train_set is None


def test_digits_split_sizes_add_up_and_are_disjoint(digits: DigitsDataModule) -> None:
    idx = digits.split_indices
    sizes = {name: len(v) for name, v in idx.items()}
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    assert sum(sizes.values()) == N_DIGITS
    assert set(idx["train"]) | set(idx["val"]) | set(idx["test"]) == set(range(N_DIGITS))
    assert len(digits.train_set) == 1257
    assert len(digits.val_set) == len(digits.test_set) == 270


def test_digits_split_is_deterministic_per_seed(digits: DigitsDataModule) -> None:
    same = DigitsDataModule(seed=0)
    same.setup()
    other = DigitsDataModule(seed=1)
    other.setup()
    assert same.split_indices == digits.split_indices
    assert torch.equal(same.test_set.images, digits.test_set.images)
    assert other.split_indices["test"] != digits.split_indices["test"]


def test_digits_images_upsampled_and_normalised(digits: DigitsDataModule) -> None:
    train = digits.train_set.images
    assert train.shape == (1257, 1, 16, 16)
    assert digits.val_set.images.shape == (270, 1, 16, 16)
    assert abs(train.mean().item()) < 1e-4
    assert abs(train.std().item() - 1) < 1e-4
    # Un-normalised values are the [0, 1] scaled pixels, and labels cover the 10 digits.
    raw = train * digits.std + digits.mean
    assert raw.min().item() >= -1e-5 and raw.max().item() <= 1 + 1e-5
    assert set(digits.train_set.labels.tolist()) == set(range(10))


def test_digits_native_size_is_not_resampled() -> None:
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(image_size=8)
    dm.setup()
    i = dm.split_indices["test"][0]
    expected = torch.as_tensor(load_digits().images[i], dtype=torch.float32) / 16.0
    got = dm.test_set.images[0, 0] * dm.std + dm.mean
    assert torch.allclose(got, expected, atol=1e-5)


def _shifts(image: torch.Tensor, s: int, fill: float) -> list[torch.Tensor]:
    height, width = image.shape[-2:]
    padded = F.pad(image, (s, s, s, s), value=fill)
    return [padded[:, dy : dy + height, dx : dx + width] for dy in range(2 * s + 1) for dx in range(2 * s + 1)]


def test_digits_augmentation_is_a_small_shift_on_train_only(digits: DigitsDataModule) -> None:
    torch.manual_seed(0)
    stored = digits.train_set.images[3]
    candidates = _shifts(stored, 1, digits.train_set.fill)
    draws = [digits.train_set[3][0] for _ in range(30)]
    for image in draws:
        assert image.shape == stored.shape
        assert any(torch.equal(image, c) for c in candidates)
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1  # it does vary
    for split in (digits.val_set, digits.test_set):
        assert all(torch.equal(split[5][0], split.images[5]) for _ in range(10))


def test_digits_loaders_batch(digits: DigitsDataModule) -> None:
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (64, 1, 16, 16) and y.shape == (64,) and y.dtype == torch.long
    assert sum(len(b[1]) for b in digits.test_dataloader()) == 270


def test_loaders_before_setup_raise() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


# --- CIFAR -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [CIFAR10DataModule, CIFAR100DataModule])
def test_cifar_missing_data_names_the_path(cls: type, tmp_path: Path) -> None:
    dm = cls(data_dir=str(tmp_path))
    assert dm.input_shape == (3, 32, 32)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as info:
            step()
        assert isinstance(info.value, FileNotFoundError)
        message = str(info.value)
        assert str(tmp_path / dm.dataset_cls.base_folder) in message
        assert "download=true" in message


def test_cifar_download_offline_raises_one_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DatasetNotFoundError, match="download .* failed") as info:
        dm.prepare_data()
    assert str(tmp_path) in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def _write_fake_cifar10(root: Path, per_batch: int) -> None:
    """Tiny files in the CIFAR-10 python pickle format."""
    folder = root / tv_cifar.CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, _ in tv_cifar.CIFAR10.train_list + tv_cifar.CIFAR10.test_list:
        entry = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / tv_cifar.CIFAR10.meta["filename"]).write_bytes(pickle.dumps(meta))


def test_cifar_corrupt_files_raise_not_found(tmp_path: Path) -> None:
    _write_fake_cifar10(tmp_path, per_batch=4)
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    dm.prepare_data()  # the cheap check only looks for the files
    with pytest.raises(DatasetNotFoundError, match="corrupt"):
        dm.setup()


def test_cifar_splits_and_transforms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fake_cifar10(tmp_path, per_batch=20)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=10, batch_size=8)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (90, 10, 20)
    assert set(dm.train_set.indices).isdisjoint(dm.val_set.indices)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    # Validation and test images are deterministic; training images are augmented.
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])
    torch.manual_seed(0)
    assert any(not torch.equal(dm.train_set[0][0], dm.train_set[0][0]) for _ in range(5))

    test_as_val = CIFAR10DataModule(data_dir=str(tmp_path), val_size=0)
    test_as_val.setup()
    assert test_as_val.val_set is test_as_val.test_set
    assert len(test_as_val.train_set) == 100


# --- ImageNet ----------------------------------------------------------------------------


def test_imagenet_missing_data_names_the_path(tmp_path: Path) -> None:
    dm = ImageNetDataModule(data_dir=str(tmp_path / "imagenet"))
    assert (dm.num_classes, dm.input_shape) == (1000, (3, 224, 224))
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError, match="image-net.org") as info:
            step()
        assert str(tmp_path / "imagenet" / "train") in str(info.value)


def test_imagenet_empty_val_folder_is_missing(tmp_path: Path) -> None:
    (tmp_path / "train" / "n01").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "val")):
        ImageNetDataModule(data_dir=str(tmp_path)).prepare_data()


def _write_image_folder(root: Path, classes: int, per_class: int) -> None:
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((40, 50, 3), 40 * c + i, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagenet_folder_pipeline(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, classes=2, per_class=3)
    dm = ImageNetDataModule(data_dir=str(tmp_path), batch_size=4, num_workers=0, num_classes=2, image_size=32)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == 6 and dm.val_set is dm.test_set and len(dm.val_set) == 6
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    assert dm.val_set[0][0].shape == (3, 32, 32)

    with pytest.raises(ValueError, match="2 class folders"):
        ImageNetDataModule(data_dir=str(tmp_path), num_classes=1000).setup()


# --- synthetic ---------------------------------------------------------------------------


def test_synthetic_shapes_and_determinism() -> None:
    dm = SyntheticDataModule(
        input_shape=[2, 12, 10],
        num_classes=4,
        num_samples=40,
        num_eval_samples=8,
        batch_size=16,
        seed=3,
    )
    assert dm.input_shape == (2, 12, 10) and dm.num_classes == 4
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 8, 8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 2, 12, 10) and y.dtype == torch.long
    assert y.min() >= 0 and y.max() < 4
    again = SyntheticDataModule(input_shape=(2, 12, 10), num_classes=4, num_samples=40, num_eval_samples=8, seed=3)
    again.setup()
    assert torch.equal(again.train_set.tensors[0], dm.train_set.tensors[0])
    assert torch.equal(again.test_set.tensors[1], dm.test_set.tensors[1])
    other = SyntheticDataModule(num_samples=40, seed=4)
    other.setup()
    assert not torch.equal(other.train_set.tensors[0][:1], dm.train_set.tensors[0][:1])


def test_synthetic_labels_are_learnable_from_the_images() -> None:
    """Nearest class mean (estimated on train) classifies test far above chance."""
    dm = SyntheticDataModule(num_samples=400, num_eval_samples=200, seed=0)
    dm.setup()
    x, y = dm.train_set.tensors
    means = torch.stack([x[y == c].mean(0) for c in range(10)]).flatten(1)
    tx, ty = dm.test_set.tensors
    predicted = torch.cdist(tx.flatten(1), means).argmin(1)
    assert (predicted == ty).float().mean().item() > 0.9
