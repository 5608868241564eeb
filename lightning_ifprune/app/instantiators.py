"""Config nodes → objects: data module, module, loggers, callbacks, trainers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_ifprune.app.task import task_of
from lightning_ifprune.callback import InfluencePruningCallback
from lightning_ifprune.data import ImageDataModule
from lightning_ifprune.data.shapes import ShapesDetectionDataModule
from lightning_ifprune.detector import DetectionModule
from lightning_ifprune.module import ImageClassifier


def phase_config(cfg: DictConfig, epochs: int) -> DictConfig:
    """A copy of ``cfg`` whose ``trainer.max_epochs`` is ``epochs`` (for interpolations)."""
    out = copy.deepcopy(cfg)
    OmegaConf.set_readonly(out, False)
    with open_dict(out):
        out.trainer.max_epochs = int(epochs)
    return out


def build_loggers(cfg: DictConfig, version: str | None = None) -> list[Logger]:
    """The loggers of ``cfg.logger`` (a mapping of names to logger nodes; may be absent).

    ``version`` (a phase name) becomes each logger's version, i.e. its sub-directory.
    """
    nodes = cfg.get("logger") or {}
    extra = {} if version is None else {"version": version}
    return [instantiate(node, **extra) for node in nodes.values() if node is not None]


def build_pruner(cfg: DictConfig) -> InfluencePruningCallback | None:
    """The prune callback of ``cfg.prune`` (None for ``prune=none``, whose ``_target_`` is null)."""
    node = cfg.get("prune")
    if node is None or not node.get("_target_"):
        return None
    pruner = instantiate(node)
    if not isinstance(pruner, InfluencePruningCallback):
        raise TypeError(f"cfg.prune must build an InfluencePruningCallback, got {type(pruner).__name__}")
    return pruner


def build_module(cfg: DictConfig, dm: ImageDataModule | ShapesDetectionDataModule) -> pl.LightningModule:
    """The net of ``cfg.model`` sized for ``dm``, wrapped with its optimizer and scheduler in the
    module of its task (``cfg.model.task``: an ``ImageClassifier``, or a ``DetectionModule``)."""
    scheduler = cfg.model.scheduler
    if task_of(cfg).name == "detection":
        return DetectionModule(
            net=instantiate(cfg.model.net, num_classes=dm.num_classes),
            num_classes=dm.num_classes,
            optimizer=instantiate(cfg.model.optimizer),
            scheduler=instantiate(scheduler) if scheduler is not None else None,
        )
    net = instantiate(cfg.model.net, num_classes=dm.num_classes, in_channels=dm.input_shape[0])
    return ImageClassifier(
        net=net,
        num_classes=dm.num_classes,
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=instantiate(scheduler) if scheduler is not None else None,
        label_smoothing=cfg.model.label_smoothing,
    )


def make_trainer(cfg: DictConfig, phase: str, epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A ``Trainer`` of ``cfg.trainer`` for one phase, logging under ``<logger>/<phase>``
    (without loggers, its checkpoints go to ``<default_root_dir>/<phase>/checkpoints``)."""
    loggers = build_loggers(cfg, version=phase)
    extra: dict[str, Any] = {}
    if not loggers and cfg.trainer.get("default_root_dir"):
        extra["default_root_dir"] = str(Path(cfg.trainer.default_root_dir) / phase)  # checkpoints per phase
    trainer: pl.Trainer = instantiate(
        cfg.trainer, max_epochs=int(epochs), logger=loggers or False, callbacks=callbacks, **extra
    )
    hparams = OmegaConf.to_container(phase_config(cfg, epochs), resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams({"phase": phase, **hparams})  # type: ignore[dict-item]
    return trainer


def make_test_trainer(cfg: DictConfig) -> pl.Trainer:
    """A ``Trainer`` of ``cfg.trainer`` that only evaluates (no logger, no checkpoints)."""
    return instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
