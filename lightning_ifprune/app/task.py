"""What differs between a classification run and a detection run of the app.

``cfg.model.task`` (``classification`` when absent, or ``detection``) picks the module the
net is wrapped in (:class:`~lightning_ifprune.module.ImageClassifier` or
:class:`~lightning_ifprune.detector.DetectionModule`), what the net is called with to measure
it, the batch latency is timed on, and the headline test metric of ``summary.json``
(``test/acc``, or ``test/map``: mAP@[.5:.95]).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from lightning_ifprune.measure import evaluate_accuracy, evaluate_map
from lightning_ifprune.structure import Example


@dataclass(frozen=True)
class Task:
    """One kind of run: its name and headline metric, and how its nets are called."""

    name: str
    metric: str  # the test metric (``test/<metric>``) reported before and after pruning
    evaluate: Callable[[nn.Module, Iterable], float]  # that metric of a module on a loader, mid-fit

    def example(self, input_shape: tuple[int, ...]) -> Example:
        """What the net is measured and traced with: one zero sample."""
        if self.name == "detection":
            return [torch.zeros(input_shape)]
        return torch.zeros(1, *input_shape)

    def latency_batch(self, input_shape: tuple[int, ...], size: int) -> Example:
        """A batch of ``size`` random inputs to time the net on."""
        if self.name == "detection":
            return [torch.rand(input_shape) for _ in range(size)]
        return torch.randn(size, *input_shape)


TASKS = {
    "classification": Task("classification", "acc", evaluate_accuracy),
    "detection": Task("detection", "map", evaluate_map),
}


def task_of(cfg: DictConfig) -> Task:
    """The task of ``cfg.model.task`` (classification when absent)."""
    name = cfg.model.get("task") or "classification"
    if name not in TASKS:
        raise ValueError(f"model.task={name!r} is not one of {sorted(TASKS)}")
    return TASKS[name]
