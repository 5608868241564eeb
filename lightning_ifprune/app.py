"""The Hydra training application behind ``train.py``.

``train(cfg)`` wires a composed config into objects and runs them: data module, net,
``ImageClassifier``, loggers, the optional prune callback and the ``Trainer``; it fits,
tests, and writes ``summary.json`` into ``cfg.output_dir`` (by default Hydra's run
directory).

Config contract (see ``conf/``): ``cfg.data`` and ``cfg.prune`` are instantiable nodes with
an extra descriptive ``name`` key, which is dropped before instantiation; ``cfg.prune``
without ``_target_`` (``prune=none``) means no pruning. ``cfg.model`` holds ``name``,
``net`` (instantiated with ``num_classes`` and ``in_channels`` from the data module),
``optimizer`` and optional ``scheduler`` (``_partial_`` factories) and ``label_smoothing``.
``cfg.logger`` maps logger names to instantiable nodes; ``cfg.trainer`` is a ``Trainer``.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from lightning_ifprune.data import ImageDataModule
from lightning_ifprune.measure import count_macs, count_params
from lightning_ifprune.module import ImageClassifier


def instantiate_named(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate a config node after dropping its descriptive ``name`` key."""
    container = OmegaConf.to_container(node, resolve=True)
    if not isinstance(container, dict):
        raise TypeError(f"expected a mapping config node, got {type(container).__name__}")
    container.pop("name", None)
    return instantiate(container, **kwargs)


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """The loggers of ``cfg.logger`` (a mapping of names to logger nodes; may be absent)."""
    nodes = cfg.get("logger") or {}
    return [instantiate(node) for node in nodes.values() if node is not None]


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The prune callback, when ``cfg.prune`` names one with ``_target_``."""
    prune = cfg.get("prune")
    if prune is None or "_target_" not in prune:
        return []
    return [instantiate_named(prune)]


def build_module(cfg: DictConfig, dm: ImageDataModule) -> ImageClassifier:
    """The net of ``cfg.model`` sized for ``dm``, wrapped with its optimizer and scheduler."""
    net = instantiate(cfg.model.net, num_classes=dm.num_classes, in_channels=dm.input_shape[0])
    scheduler = cfg.model.get("scheduler")
    return ImageClassifier(
        net=net,
        num_classes=dm.num_classes,
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=instantiate(scheduler) if scheduler is not None else None,
        label_smoothing=cfg.model.get("label_smoothing", 0.0),
    )


def measure_cost(net: torch.nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs per sample, parameters) of ``net``, measured on CPU; ``net`` stays on CPU."""
    net.cpu()
    return count_macs(net, torch.zeros(1, *input_shape)), count_params(net)


def _format_value(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(summary: dict[str, Any]) -> None:
    """A two-column table of the summary."""
    table = Table(title="lightning_ifprune run summary")
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, _format_value(value))
    Console().print(table)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test as configured; returns the summary it writes to ``summary.json``.

    Summary keys: ``model``, ``data``, ``prune`` (config names), ``seed``, ``test_acc``
    (fraction), ``test_loss``, ``test_acc_top5`` (with >= 5 classes), ``flops`` (MACs per
    sample of the final, possibly pruned, net), ``params``, ``dense_flops`` and
    ``dense_params`` (the same before training), ``epochs`` and ``wall_s``.
    """
    start = time.perf_counter()
    # The in-memory data modules use no loader workers on purpose.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    pl.seed_everything(cfg.seed, workers=True)

    dm: ImageDataModule = instantiate_named(cfg.data)
    module = build_module(cfg, dm)
    dense_flops, dense_params = measure_cost(module.net, dm.input_shape)

    trainer: pl.Trainer = instantiate(
        cfg.trainer, logger=build_loggers(cfg) or False, callbacks=build_callbacks(cfg)
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=dm)
    test_metrics = trainer.test(module, datamodule=dm)[0]

    flops, params = measure_cost(module.net, dm.input_shape)
    summary: dict[str, Any] = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "prune": cfg.prune.name,
        "seed": cfg.seed,
        "test_acc": float(test_metrics["test/acc"]),
        "test_loss": float(test_metrics["test/loss"]),
    }
    if "test/acc_top5" in test_metrics:
        summary["test_acc_top5"] = float(test_metrics["test/acc_top5"])
    summary.update(
        flops=flops,
        params=params,
        dense_flops=dense_flops,
        dense_params=dense_params,
        epochs=trainer.current_epoch,
        wall_s=round(time.perf_counter() - start, 2),
    )
    if trainer.is_global_zero:
        out_dir = Path(cfg.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary)
    return summary
