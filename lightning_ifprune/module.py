"""``ImageClassifier``: a LightningModule that trains and evaluates any classification net."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics.classification import MulticlassAccuracy

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]

Batch = tuple[torch.Tensor, torch.Tensor]


class ImageClassifier(LightningModule):
    """Cross-entropy training of ``net`` with top-1 (and top-5) accuracy.

    Args:
        net: the classifier, ``(N, C, H, W) -> (N, num_classes)`` logits; pruning edits it
            in place, so it is kept as the attribute ``net``.
        num_classes: number of classes (sizes the accuracy metrics).
        optimizer: ``optimizer(params) -> Optimizer``, e.g. a Hydra ``_partial_`` of
            ``torch.optim.SGD``; needed only to train.
        scheduler: optional ``scheduler(optimizer) -> LRScheduler``, stepped once per epoch.
        label_smoothing: label smoothing of the training and evaluation loss.

    Logs ``train/loss``, ``train/acc``, ``{val,test}/loss``, ``{val,test}/acc`` and, with at
    least 5 classes, ``{val,test}/acc_top5``. Only ``num_classes`` and ``label_smoothing`` are
    saved as hyperparameters: the factories are code, not data (a checkpoint holding them
    would not load with ``weights_only=True``), and the net's architecture can change when
    it is pruned. Restore with ``ImageClassifier.load_from_checkpoint(path, net=net)`` where
    ``net`` has the checkpoint's architecture; pass ``optimizer=`` (and ``scheduler=``) too
    to train on.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_top5: MulticlassAccuracy | None = None
        self.test_acc_top5: MulticlassAccuracy | None = None
        if num_classes >= 5:
            self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")
            self.test_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``net``."""
        return self.net(x)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Cross-entropy of one batch; logs it and the running top-1 accuracy."""
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _evaluate(
        self,
        batch: Batch,
        stage: str,
        top1: MulticlassAccuracy,
        top5: MulticlassAccuracy | None,
    ) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", self._loss(logits, y), sync_dist=True)
        top1(logits, y)
        self.log(f"{stage}/acc", top1, prog_bar=True)
        if top5 is not None:
            top5(logits, y)
            self.log(f"{stage}/acc_top5", top5)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Logs ``val/loss``, ``val/acc`` (and ``val/acc_top5``) for the epoch."""
        self._evaluate(batch, "val", self.val_acc, self.val_acc_top5)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Logs ``test/loss``, ``test/acc`` (and ``test/acc_top5``) for the epoch."""
        self._evaluate(batch, "test", self.test_acc, self.test_acc_top5)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """The optimizer over all parameters, plus the per-epoch scheduler if one was given."""
        if self.optimizer_factory is None:
            raise ValueError(
                "ImageClassifier was built without an optimizer factory; pass optimizer= "
                "(e.g. functools.partial(torch.optim.SGD, lr=0.1)) to train it"
            )
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
