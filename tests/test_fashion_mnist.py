"""Fashion-MNIST: idx reading, search order, subsets, splits, normalisation, errors, a tiny fit.

The tests on real data skip when the idx files are absent (``apt-get install dataset-fashion-mnist``
or ``make fmnist`` installs them), unless the environment variable ``CI`` is set: in CI the data
must be there, and its absence fails them.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_ifprune.data.fashion_mnist as fm
from lightning_ifprune.app import train
from lightning_ifprune.data import DatasetNotFoundError, FashionMNISTDataModule
from lightning_ifprune.data.fashion_mnist import idx_shape, read_idx, stratified_order

SUBSET = 512
TINY = [
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "++trainer.log_every_n_steps=1",
    "model.net.widths=[8,16,32]",
    "report.latency_iters=1",
    "report.latency_batch_size=4",
    "report.plot=false",
    "export.enabled=false",
    "pretrain.save_checkpoint=false",
]


def in_ci() -> bool:
    """Whether the ``CI`` environment variable is set (to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


@pytest.fixture(scope="module")
def data_dir() -> str:
    """The ``data_dir`` the app would use, once the idx files are known to be findable from it."""
    root = os.environ.get("IFPRUNE_DATA", "data")
    try:
        FashionMNISTDataModule(data_dir=root).locate()
    except DatasetNotFoundError as err:
        if in_ci():
            pytest.fail(f"CI is set, so Fashion-MNIST must be installed: {err}")
        pytest.skip("Fashion-MNIST idx files absent (apt-get install dataset-fashion-mnist, or make fmnist)")
    return root


@pytest.fixture(scope="module")
def subset(data_dir: str) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(data_dir=data_dir, train_subset=SUBSET, seed=0)
    dm.setup()
    return dm


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` (uint8) as an idx file, gzipped when ``path`` ends in ``.gz``."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


# --- no data needed -----------------------------------------------------------------------


def test_construction_reads_nothing(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "absent"), system_dirs=())
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28)
    assert dm.train_set is None and dm.split_indices == {}
    assert FashionMNISTDataModule(image_size=32).input_shape == (1, 32, 32)


@pytest.mark.parametrize("kwargs", [{"val_fraction": 1.0}, {"val_fraction": -0.1}, {"train_subset": 0}])
def test_bad_options_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FashionMNISTDataModule(**kwargs)


@pytest.mark.parametrize("how", ["parameter", "module_constant"])
def test_missing_data_names_the_paths_and_the_fix(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = tmp_path / "no-debian-package"
    if how == "parameter":
        dm = FashionMNISTDataModule(data_dir=str(tmp_path), system_dirs=[debian])
    else:
        monkeypatch.setattr(fm, "SYSTEM_DIRS", (debian,))
        dm = FashionMNISTDataModule(data_dir=str(tmp_path))
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as info:
            step()
        assert isinstance(info.value, FileNotFoundError)
        message = str(info.value)
        for folder in (tmp_path / "FashionMNIST" / "raw", tmp_path / "FashionMNIST", tmp_path / "fashion-mnist"):
            assert str(folder) in message
        assert str(debian) in message
        assert "apt-get install dataset-fashion-mnist" in message and "make fmnist" in message
        assert "FashionMNIST(" in message and "download=True" in message
        assert "train-images-idx3-ubyte" in message


def test_default_search_ends_with_debian_location() -> None:
    dm = FashionMNISTDataModule(data_dir="somewhere")
    assert dm.search_dirs[-1] == Path("/usr/share/datasets/fashion-mnist")
    assert dm.search_dirs[0] == Path("somewhere").absolute() / "FashionMNIST" / "raw"


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_plain_and_gzipped(suffix: str, tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / f"x-idx3-ubyte{suffix}"
    write_idx(path, array)
    assert idx_shape(path) == (2, 3, 4)
    np.testing.assert_array_equal(read_idx(path), array)


def test_corrupt_files_raise_not_found(tmp_path: Path) -> None:
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name in fm.FILES.values():
        (folder / f"{name}.gz").write_bytes(b"not gzip")
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), system_dirs=())
    assert dm.locate()["train_images"] == folder / "train-images-idx3-ubyte.gz"
    with pytest.raises(DatasetNotFoundError, match="corrupt"):
        dm.setup()


def test_stratified_order_is_balanced_and_seeded() -> None:
    labels = np.repeat(np.arange(10), 100)
    order = stratified_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(1000))
    assert np.bincount(labels[order[:50]], minlength=10).tolist() == [5] * 10
    assert np.array_equal(order, stratified_order(labels, seed=0))
    assert not np.array_equal(order, stratified_order(labels, seed=1))


# --- real data ----------------------------------------------------------------------------


def test_subset_shapes_dtypes_and_labels(subset: FashionMNISTDataModule) -> None:
    n_val = round(SUBSET * 0.1)
    assert (len(subset.train_set), len(subset.val_set)) == (SUBSET - n_val, n_val)
    image, label = subset.train_set[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    images, labels = next(iter(subset.train_dataloader()))
    assert images.shape == (subset.batch_size, 1, 28, 28)
    for split in (subset.train_set, subset.val_set, subset.test_set):
        assert int(split.labels.min()) >= 0 and int(split.labels.max()) <= 9


def test_subset_classes_are_balanced(subset: FashionMNISTDataModule) -> None:
    counts = torch.bincount(subset.train_set.labels, minlength=10)
    assert counts.min() > 0 and counts.max() - counts.min() <= 2, counts.tolist()
    val_counts = torch.bincount(subset.val_set.labels, minlength=10)
    assert val_counts.max() - val_counts.min() <= 1, val_counts.tolist()


def test_normalised_with_the_dataset_statistics(subset: FashionMNISTDataModule) -> None:
    for images in (subset.train_set.images, subset.test_set.images):
        assert abs(images.mean().item()) < 0.05
        assert abs(images.std().item() - 1.0) < 0.05
    assert subset.train_set.images.min().item() == pytest.approx(-0.2860 / 0.3530, abs=1e-5)


def test_splits_are_disjoint_and_seeded(subset: FashionMNISTDataModule, data_dir: str) -> None:
    idx = subset.split_indices
    assert not set(idx["train"]) & set(idx["val"])
    assert len(set(idx["train"]) | set(idx["val"])) == SUBSET
    same = FashionMNISTDataModule(data_dir=data_dir, train_subset=SUBSET, seed=0)
    same.setup()
    other = FashionMNISTDataModule(data_dir=data_dir, train_subset=SUBSET, seed=1)
    other.setup()
    assert same.split_indices == idx
    torch.testing.assert_close(same.train_set.images, subset.train_set.images)
    assert set(other.split_indices["train"]) != set(idx["train"])


def test_test_split_is_the_t10k_set(subset: FashionMNISTDataModule) -> None:
    paths = subset.locate()
    assert idx_shape(paths["test_images"]) == (10_000, 28, 28)
    assert idx_shape(paths["test_labels"]) == (10_000,)
    assert idx_shape(paths["train_images"]) == (60_000, 28, 28)
    assert len(subset.test_set) == 10_000
    expected = torch.from_numpy(read_idx(paths["test_labels"]).astype(np.int64))
    assert torch.equal(subset.test_set.labels, expected)


def test_data_dir_layout_is_searched_first(data_dir: str, tmp_path: Path) -> None:
    found = FashionMNISTDataModule(data_dir=data_dir).locate()
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in found.values():
        (raw / path.name).symlink_to(path)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), train_subset=20, image_size=32, val_fraction=0.0)
    assert set(dm.locate().values()) == {raw / path.name for path in found.values()}
    dm.setup()
    assert dm.train_set[0][0].shape == (1, 32, 32) and len(dm.train_set) == 20
    assert dm.val_set is dm.test_set


@pytest.mark.usefixtures("keep_torch_threads")
def test_tiny_fit_through_the_hydra_config(data_dir: str, tmp_path: Path, compose_cfg) -> None:
    cfg = compose_cfg(
        tmp_path,
        "data=fashion_mnist",
        f"data_dir={data_dir}",
        f"data.train_subset={256}",
        "data.batch_size=32",
        "model=small_cnn",
        "pretrain.epochs=1",
        "trainer.max_epochs=0",
        *TINY,
    )
    assert cfg.choices.data == "fashion_mnist" and cfg.data.train_subset == 256
    summary = train(cfg)
    assert summary["data"] == "fashion_mnist" and summary["epochs_pretrain"] == 1
    assert 0.0 <= summary["test_acc_before"] <= 1.0
    assert summary["channels_before"] == {"features.0": 8, "features.4": 16, "features.8": 32}
