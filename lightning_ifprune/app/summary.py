"""``RunSummary``: what a run writes to ``summary.json`` (and prints)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_ifprune.app.task import Task
from lightning_ifprune.measure import channel_widths, measure_cost, measure_latency


@dataclass
class Snapshot:
    """The network measured at one point of the run (before pruning, or at the end)."""

    test: dict[str, float]
    flops: int
    params: int
    channels: dict[str, int]
    latency_ms: float | None

    @classmethod
    def take(
        cls,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        dm: pl.LightningDataModule,
        task: Task,
        *,
        latency_batch_size: int,
        latency_iters: int,
    ) -> Snapshot:
        """Test metrics, MACs, parameters, channels and (on rank 0) latency of ``module.net``."""
        test = {k: float(v) for k, v in trainer.test(module, datamodule=dm, verbose=False)[0].items()}
        shape = tuple(dm.input_shape)
        example = task.example(shape)
        flops, params = measure_cost(module.net, example)
        channels = channel_widths(module.net, example)
        latency = None
        if trainer.is_global_zero and latency_iters > 0:
            batch = task.latency_batch(shape, latency_batch_size)
            latency = measure_latency(module.net, batch, trainer.strategy.root_device, latency_iters)
        return cls(test, flops, params, channels, latency)


@dataclass
class RunSummary:
    """One run's results. Accuracies and mAPs are fractions; FLOPs are MACs per sample.

    ``metric`` names the task's headline test metric (``acc``: top-1 accuracy; ``map``: a
    detector's mAP@[.5:.95]); ``test_before`` is it for the network phase 2 starts pruning,
    ``test_pruned`` right after the last round (before further training), ``test_after`` for
    the final one; ``test_metrics_before``/``_after`` hold every test metric (``test/map_50``
    too). Classification runs also keep them as ``test_acc_*`` (None for other tasks).
    ``dense_*`` describe the freshly built net; ``latency_*`` the median eval forward time of
    a ``latency_batch_size`` batch on ``latency_device`` (``latency_threads`` CPU threads);
    with a latency target, ``latency_predicted_*`` are the pruner's latency model's predictions
    for the same nets (at the pruner's ``latency_batch_size``), to set beside the measurements.
    Wall times: ``wall_prune_s`` the pruning rounds, ``wall_finetune_s`` training after and
    between rounds, ``wall_s`` the whole run.
    """

    model: str
    data: str
    prune: str
    criterion: str | None
    target: float | None
    target_resource: str | None
    seed: int
    metric: str
    test_before: float
    test_pruned: float | None
    test_after: float
    test_metrics_before: dict[str, float]
    test_metrics_after: dict[str, float]
    test_acc_before: float | None
    test_acc_pruned: float | None
    test_acc_after: float | None
    test_loss: float | None
    test_acc_top5: float | None
    flops_before: int
    flops_after: int
    flops_kept: float
    params_before: int
    params_after: int
    params_kept: float
    dense_flops: int
    dense_params: int
    target_met: bool | None
    channels_before: dict[str, int]
    channels_after: dict[str, int]
    latency_device: str
    latency_batch_size: int
    latency_threads: int | None
    latency_before_ms: float | None
    latency_after_ms: float | None
    latency_predicted_before_ms: float | None
    latency_predicted_after_ms: float | None
    prune_rounds: int
    pruning_finished_epoch: int | None
    epochs_pretrain: int
    epochs_prune: int
    epochs_finetune: int
    epochs: int
    pretrain_cached: bool
    wall_pretrain_s: float
    wall_prune_s: float
    wall_finetune_s: float
    files: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain data (what ``summary.json`` holds)."""
        return asdict(self)

    def write(self, path: Path) -> None:
        """Write ``summary.json``."""
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
