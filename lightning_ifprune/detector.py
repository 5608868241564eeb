"""``DetectionModule``: a LightningModule that trains and evaluates a torchvision detector."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from lightning_ifprune.module import OptimizerFactory, SchedulerFactory

Targets = list[dict[str, torch.Tensor]]
Batch = tuple[list[torch.Tensor], Targets]


class DetectionModule(LightningModule):
    """Train ``net`` on the sum of its loss dict; evaluate its mAP.

    Args:
        net: a torchvision detector (Faster R-CNN, RetinaNet, FCOS, ...): ``net(images,
            targets)`` returns its loss dict in training mode, ``net(images)`` its detections
            in eval mode. Kept as the attribute ``net`` (pruning edits it in place).
        num_classes: classes of the detector, background included.
        optimizer, scheduler: factories as for :class:`~lightning_ifprune.module.ImageClassifier`.

    Batches are ``(images, targets)``: a list of ``(3, H, W)`` tensors and a list of dicts with
    ``boxes`` and ``labels``. Logs ``train/loss`` and each ``train/<loss name>``;
    ``{val,test}/map`` (mAP@[.5:.95], torchmetrics' ``MeanAveragePrecision``) and
    ``{val,test}/map_50``. The pruning callback traces it with ``[images[0]]`` of the first
    training batch (:func:`~lightning_ifprune.fit_loop.trace_example`) and scores with the
    loss ``training_step`` returns.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        self.test_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")

    def forward(self, images: list[torch.Tensor], targets: Targets | None = None) -> Any:
        """The detector's loss dict (training mode, with targets) or detections (eval mode)."""
        return self.net(images, targets)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """The sum of the detector's losses; logs it and every term."""
        images, targets = batch
        losses = self(images, targets)
        loss = torch.stack(list(losses.values())).sum()
        size = len(images)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def _evaluate(self, batch: Batch, metric: MeanAveragePrecision) -> None:
        images, targets = batch
        metric.update(self(images), targets)

    def _log_map(self, stage: str, metric: MeanAveragePrecision) -> None:
        result = metric.compute()
        self.log(f"{stage}/map", result["map"], prog_bar=True, sync_dist=True)
        self.log(f"{stage}/map_50", result["map_50"], sync_dist=True)
        metric.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Accumulates the batch's detections for ``val/map``."""
        self._evaluate(batch, self.val_map)

    def on_validation_epoch_end(self) -> None:
        """Logs ``val/map`` and ``val/map_50``."""
        self._log_map("val", self.val_map)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Accumulates the batch's detections for ``test/map``."""
        self._evaluate(batch, self.test_map)

    def on_test_epoch_end(self) -> None:
        """Logs ``test/map`` and ``test/map_50``."""
        self._log_map("test", self.test_map)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """The optimizer over all parameters, plus the per-epoch scheduler if one was given."""
        if self.optimizer_factory is None:
            raise ValueError("DetectionModule was built without an optimizer factory; pass optimizer=")
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"},
        }
