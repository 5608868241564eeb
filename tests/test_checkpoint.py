"""Checkpoints of pruned modules: corruption, foreign histories, functional pruning, lazy nets."""

from __future__ import annotations

import re
import shutil
import struct
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _lit import classifier, cpu_trainer, loader, widths

import lightning_ifprune as lip
from lightning_ifprune.checkpoint import pruning_state, restore_architecture
from lightning_ifprune.export import export_pruned, load_exported
from lightning_ifprune.models import build_model
from lightning_ifprune.module import ImageClassifier
from lightning_ifprune.structure import ChannelStructure

EXAMPLE = torch.zeros(1, 1, 8, 8)
WIDTHS = (16, 32, 32)


def _pruner() -> lip.InfluencePruningCallback:
    return lip.InfluencePruningCallback(target_flops=0.6, criterion="magnitude", example_input=EXAMPLE, verbose=False)


def _fit_pruned(root: Path) -> tuple[ImageClassifier, L.Trainer]:
    """One epoch on digits with one magnitude pruning round at its start."""
    L.seed_everything(0)
    module = classifier(widths=WIDTHS)
    trainer = cpu_trainer(root, 1, [_pruner()])
    trainer.fit(module, loader(128))
    assert len(pruning_state(module)["history"]) == 1  # recorded once, not once per recorder
    return module, trainer


def _load(path: Path) -> ImageClassifier:
    return lip.load_pruned_checkpoint(ImageClassifier, path, net=build_model("small_cnn", 10, 1, widths=WIDTHS))


def _resume(path: Path, root: Path, module: ImageClassifier | None = None) -> ImageClassifier:
    """``trainer.fit(ckpt_path=path)`` of a fresh classifier (or ``module``) with the pruner."""
    module = module if module is not None else classifier(widths=WIDTHS)
    cpu_trainer(root, 2, [_pruner()]).fit(module, loader(128), ckpt_path=path)
    return module


def _both_loaders_refuse(path: Path, match: str, root: Path, state_snapshot) -> ImageClassifier:
    """``load_pruned_checkpoint`` and ``fit(ckpt_path=)`` raise ``match``; the resumed module
    is left exactly as it was (returned for further checks)."""
    with pytest.raises(ValueError, match=match):
        _load(path)
    fresh = classifier(widths=WIDTHS)
    snap = state_snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        _resume(path, root, fresh)
    snap.assert_unchanged()
    return fresh


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Lightning checkpoint of a pruned classifier (copy it before changing it)."""
    root = tmp_path_factory.mktemp("pruned")
    _, trainer = _fit_pruned(root)
    path = root / "pruned.ckpt"
    trainer.save_checkpoint(path)
    return path


def flip_tensor_bytes(path: Path) -> str:
    """XOR a few bytes in the middle of the largest tensor stored in the zip at ``path``."""
    with zipfile.ZipFile(path) as archive:
        infos = [i for i in archive.infolist() if "/data/" in i.filename and i.compress_type == zipfile.ZIP_STORED]
        info = max(infos, key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    offset = info.header_offset
    assert raw[offset : offset + 4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack("<HH", raw[offset + 26 : offset + 30])
    middle = offset + 30 + name_len + extra_len + info.file_size // 2
    for k in range(4):
        raw[middle + k] ^= 0x7F
    path.write_bytes(bytes(raw))
    return info.filename


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


# ---------------------------------------------------------------------- item 6: corruption
def test_flipped_tensor_bytes_are_detected_by_every_loader(pruned_ckpt: Path, tmp_path: Path, state_snapshot) -> None:
    path = _copy(pruned_ckpt, tmp_path / "flipped.ckpt")
    entry = flip_tensor_bytes(path)
    try:  # torch itself does not check: the values silently change
        tampered = torch.load(path, weights_only=True)
    except Exception:
        tampered = None
    if tampered is not None:
        clean = torch.load(pruned_ckpt, weights_only=True)
        assert not all(torch.equal(v, tampered["state_dict"][k]) for k, v in clean["state_dict"].items())
    named = re.escape(str(path)) + r".*corrupted.*" + re.escape(entry.split("/", 1)[1])
    _both_loaders_refuse(path, named, tmp_path / "resume", state_snapshot)
    with pytest.raises(lip.checkpoint.CheckpointError, match=named):
        lip.checkpoint.read_checkpoint(path)
    _load(pruned_ckpt)  # the intact original still loads


@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")
@pytest.mark.parametrize("which", ["state", "torchscript"])
def test_flipped_bytes_in_exported_files_are_detected(tmp_path: Path, which: str) -> None:
    torch.manual_seed(0)
    net = build_model("small_cnn", num_classes=10, in_channels=1, widths=[8, 16, 32]).eval()
    paths = export_pruned(
        net,
        tmp_path,
        example_input=torch.randn(1, 1, 16, 16),
        model="small_cnn",
        num_classes=10,
        in_channels=1,
        model_kwargs={"widths": [8, 16, 32]},
    )
    flip_tensor_bytes(paths[which])
    with pytest.raises(ValueError, match=re.escape(str(paths[which])) + ".*corrupted"):
        load_exported(paths[which])


def _write_unreadable(kind: str, good: Path, path: Path) -> Path:
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("epoch: 3\nthis is a text file, not a checkpoint\n")
    return path


@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_unreadable_files_give_one_clear_error(pruned_ckpt: Path, tmp_path: Path, kind: str) -> None:
    path = _write_unreadable(kind, pruned_ckpt, tmp_path / f"{kind}.ckpt")
    message = re.escape(str(path)) + ": not a readable checkpoint"
    with pytest.raises(ValueError, match=message):
        _load(path)
    with pytest.raises(ValueError, match=message):
        load_exported(path)
    with pytest.raises(ValueError, match=message):
        _resume(path, tmp_path / "resume")
    with pytest.raises(lip.checkpoint.CheckpointError, match=message):
        lip.checkpoint.read_checkpoint(path)


# ---------------------------------------------------------------------- item 7: atomic restore
def _with_history(src: Path, dst: Path, history: list) -> Path:
    checkpoint = torch.load(src, weights_only=True)
    checkpoint["ifprune"] = {**checkpoint["ifprune"], "history": history}
    torch.save(checkpoint, dst)
    return dst


FOREIGN = [[{"group": "net.features.0", "indices": [0, 1, 2]}]]  # replays fine, fits other weights


def test_a_history_that_does_not_fit_the_weights_is_refused_and_changes_nothing(
    pruned_ckpt: Path, tmp_path: Path, state_snapshot
) -> None:
    path = _with_history(pruned_ckpt, tmp_path / "foreign.ckpt", FOREIGN)
    mismatch = r"'net\.features\.\d+\.weight'.*shape"
    fresh = _both_loaders_refuse(path, mismatch, tmp_path / "resume", state_snapshot)
    assert pruning_state(fresh)["history"] == []


def test_a_replay_failing_half_way_rolls_back_every_step(pruned_ckpt: Path, tmp_path: Path, state_snapshot) -> None:
    checkpoint = torch.load(pruned_ckpt, weights_only=True)
    history = [*checkpoint["ifprune"]["history"], [{"group": "net.features.0", "indices": [999]}]]
    path = _with_history(pruned_ckpt, tmp_path / "bad_step.ckpt", history)
    fresh = classifier(widths=WIDTHS)
    snap = state_snapshot(fresh)
    with pytest.raises(ValueError, match=r"step 2 of 2.*net\.features\.0.*out of range"):
        restore_architecture(fresh, torch.load(path, weights_only=True))
    snap.assert_unchanged()
    assert pruning_state(fresh)["history"] == []
    with pytest.raises(ValueError, match=r"step 2 of 2"):
        _resume(path, tmp_path / "resume", fresh)
    snap.assert_unchanged()


# ---------------------------------------------------------------------- item 8: functional pruning
def _random_scores(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    structure = ChannelStructure.build(model, EXAMPLE)
    return {name: torch.rand(group.size, generator=gen) for name, group in structure.groups.items()}


@pytest.mark.parametrize("how", ["prune_to_target(net)", "prune_to_target(module)", "prune_channels(net)"])
def test_functional_pruning_after_the_callback_survives_the_checkpoint(tmp_path: Path, how: str) -> None:
    module, trainer = _fit_pruned(tmp_path)
    after_callback = widths(module)
    target = module if "(module)" in how else module.net
    if how.startswith("prune_to_target"):
        lip.prune_to_target(target, _random_scores(target), flops=0.8, example_inputs=EXAMPLE)
    else:
        lip.prune_channels(ChannelStructure.build(target, EXAMPLE), {"features.4": [0, 5, 9]})
    assert widths(module) != after_callback
    path = tmp_path / "functional.ckpt"
    trainer.save_checkpoint(path)
    loaded = _load(path)
    assert widths(loaded) == widths(module)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), module.eval()(x))


# ---------------------------------------------------------------------- item 9b: configure_model
class LazyClassifier(L.LightningModule):
    """Builds its net in ``configure_model``, as Lightning recommends for large models."""

    def __init__(self, widths: list[int] = list(WIDTHS)) -> None:  # noqa: B006 - hparams default
        super().__init__()
        self.save_hyperparameters()
        self.net: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            torch.manual_seed(0)
            self.net = build_model("small_cnn", 10, 1, widths=list(self.hparams.widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_load_pruned_checkpoint_of_a_module_that_builds_its_net_in_configure_model(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = LazyClassifier()
    trainer = cpu_trainer(tmp_path, 1, [_pruner()])
    trainer.fit(module, loader(128))
    assert pruning_state(module)["history"]
    path = tmp_path / "lazy.ckpt"
    trainer.save_checkpoint(path)
    loaded = lip.load_pruned_checkpoint(LazyClassifier, path)
    assert widths(loaded) == widths(module)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), module.eval()(x))


def test_export_of_a_functionally_pruned_net_keeps_its_architecture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_model("small_cnn", num_classes=10, in_channels=1, widths=list(WIDTHS)).eval()
    lip.prune_to_target(net, _random_scores(net), flops=0.6, example_inputs=EXAMPLE)
    paths = export_pruned(
        net,
        tmp_path,
        example_input=EXAMPLE,
        model="small_cnn",
        num_classes=10,
        in_channels=1,
        model_kwargs={"widths": list(WIDTHS)},
        torchscript=False,
    )
    loaded = load_exported(paths["state"])
    assert widths(loaded) == widths(net)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), net(x))
