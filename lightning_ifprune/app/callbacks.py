"""The app's own callbacks: pruning state in every phase's checkpoints, and a pruning monitor."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch import LightningDataModule
from typing_extensions import override

from lightning_ifprune.callback import InfluencePruningCallback
from lightning_ifprune.checkpoint import save_pruning_state
from lightning_ifprune.measure import evaluate_accuracy


class KeepPruningState(pl.Callback):
    """Write the module's pruning history into checkpoints of phases without the pruner."""

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        save_pruning_state(pl_module, checkpoint)


class PruningMonitor(pl.Callback):
    """Watches the prune callback: when pruning finished, optionally the test metric of the
    just-pruned net (``acc_pruned``: ``metric(module, test loader)``, top-1 accuracy by default,
    before any further training), and optionally a stop at the end of that epoch (when a
    separate fine-tune phase follows)."""

    def __init__(
        self,
        pruner: InfluencePruningCallback,
        dm: LightningDataModule,
        *,
        evaluate: bool,
        stop_when_pruned: bool,
        metric: Callable[[pl.LightningModule, Iterable], float] = evaluate_accuracy,
    ) -> None:
        self.pruner, self.dm, self.metric = pruner, dm, metric
        self.evaluate, self.stop_when_pruned = evaluate, stop_when_pruned
        self.done = False
        self.acc_pruned: float | None = None
        self.epoch: int | None = None

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done or not self.pruner.finished:
            return
        self.done, self.epoch = True, trainer.current_epoch
        if self.evaluate:
            if self.dm.test_set is None:
                self.dm.setup("test")
            self.acc_pruned = self.metric(pl_module, self.dm.test_dataloader())

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pruner.schedule.progressive:
            self._check(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop_when_pruned and self.done:
            trainer.should_stop = True
