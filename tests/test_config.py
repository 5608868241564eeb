"""Hydra config: every option of every group composes and instantiates (without training)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig

from lightning_ifprune.app import build_callbacks, build_loggers, build_module, instantiate_named
from lightning_ifprune.data import ImageDataModule
from lightning_ifprune.module import ImageClassifier

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(autouse=True)
def hydra_conf() -> Iterator[None]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def make_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    # output_dir defaults to Hydra's run dir, which exists only inside a Hydra run.
    return compose("train", overrides=[f"output_dir={tmp_path}", *overrides])


def test_groups_have_the_expected_options() -> None:
    assert set(options("data")) >= {"digits", "cifar10", "cifar100", "imagenet", "synthetic"}
    assert set(options("model")) >= {
        "small_cnn", "resnet20", "resnet32", "resnet56", "vgg16_bn_cifar",
        "resnet18", "resnet50", "vgg16_bn", "mobilenet_v2",
    }  # fmt: skip
    assert set(options("trainer")) >= {"cpu", "gpu", "ddp", "ddp_cpu"}
    assert set(options("logger")) >= {"csv", "tensorboard"}
    assert "none" in options("prune")
    assert options("experiment")


def test_default_config(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    assert (cfg.data.name, cfg.model.name, cfg.prune.name) == ("digits", "small_cnn", "none")
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.seed == 0 and cfg.data.seed == 0
    assert "_target_" not in cfg.prune
    assert build_callbacks(cfg) == []


@pytest.mark.parametrize("name", options("data"))
def test_data_options_instantiate(name: str, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, f"data={name}", f"data_dir={tmp_path}")
    assert cfg.data.name == name
    dm = instantiate_named(cfg.data)
    assert isinstance(dm, ImageDataModule)
    assert dm.num_classes >= 2 and len(dm.input_shape) == 3
    if hasattr(dm, "data_dir"):  # on-disk datasets live under cfg.data_dir
        assert str(dm.data_dir).startswith(str(tmp_path))


@pytest.mark.parametrize("name", options("model"))
def test_model_options_instantiate(name: str, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, f"model={name}", "data=synthetic")
    dm = instantiate_named(cfg.data)
    module = build_module(cfg, dm)
    assert isinstance(module, ImageClassifier)
    assert cfg.model.net.name == name
    optimizers = module.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups[0]["lr"] == cfg.model.optimizer.lr
    if cfg.model.get("scheduler") is not None:
        assert optimizers["lr_scheduler"]["interval"] == "epoch"
    if name in {"small_cnn", "resnet20"}:  # small enough to run here
        channels = dm.input_shape[0]
        out = module(torch.randn(2, channels, 32, 32))
        assert out.shape == (2, dm.num_classes)


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_compose(name: str, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, f"trainer={name}")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.trainer.max_epochs >= 1
    if name == "ddp_cpu":
        assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy) == (
            "cpu", 2, "ddp"
        )  # fmt: skip
    if name in {"cpu", "ddp_cpu"} or torch.cuda.is_available():
        trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
        assert isinstance(trainer, pl.Trainer)
        assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_instantiate(name: str, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, f"logger={name}")
    loggers = build_loggers(cfg)
    expected = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}[name]
    assert len(loggers) == 1 and isinstance(loggers[0], expected)
    assert Path(loggers[0].save_dir) == tmp_path


def test_no_logger(tmp_path: Path) -> None:
    assert build_loggers(make_cfg(tmp_path, "~logger")) == []


@pytest.mark.parametrize("name", options("prune"))
def test_prune_options(name: str, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, f"prune={name}")
    assert cfg.prune.name == name
    callbacks = build_callbacks(cfg)
    assert len(callbacks) == ("_target_" in cfg.prune)
    assert all(isinstance(c, pl.Callback) for c in callbacks)


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_compose(name: str, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, f"experiment={name}")
    assert cfg.task_name == name
    assert cfg.data.name and cfg.model.name


def test_digits_experiment_overrides_widths(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "experiment=digits_small")
    assert list(cfg.model.net.widths) == [8, 16, 32]


def test_unknown_option_lists_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(MissingConfigException) as info:
        make_cfg(tmp_path, "model=bogus")
    message = str(info.value)
    assert "bogus" in message and "Available options" in message
    for name in ("small_cnn", "resnet32", "vgg16_bn_cifar"):
        assert name in message


def test_prune_node_with_target_becomes_a_callback(tmp_path: Path) -> None:
    """The app's contract for prune configs: ``name`` is dropped, the rest instantiated."""
    cfg = make_cfg(
        tmp_path,
        "+prune._target_=lightning.pytorch.callbacks.Timer",
        "+prune.duration=00:00:01:00",
    )
    (callback,) = build_callbacks(cfg)
    assert isinstance(callback, pl.callbacks.Timer)
    assert callback._duration == 60
