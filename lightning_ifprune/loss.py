"""The loss closure every criterion scores with: ``loss(model, batch) -> scalar tensor``.

A closure sees the whole batch, whatever its structure, and calls the model itself, so any
task fits (classification, detection loss dicts, auxiliary heads). The classic
classification form ``loss_fn(outputs, targets)`` is adapted by :func:`supervised`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ifprune.batch import Batch

#: ``loss(model, batch) -> scalar tensor``: what every criterion evaluates.
LossClosure = Callable[[nn.Module, Batch], torch.Tensor]
#: ``loss_fn(outputs, targets) -> scalar tensor``: the classification form.
OutputsTargetsLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class supervised:  # noqa: N801 - used like a function: supervised(F.cross_entropy)
    """Adapt ``loss_fn(outputs, targets)`` to a closure over ``(inputs, targets)`` batches.

    Dict batches are read from their ``"input"``/``"target"`` keys (or their first two values).
    """

    def __init__(self, loss_fn: OutputsTargetsLoss = F.cross_entropy) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = inputs_and_targets(batch)
        return self.loss_fn(model(x), y)

    def __repr__(self) -> str:
        return f"supervised({getattr(self.loss_fn, '__name__', self.loss_fn)!r})"


def inputs_and_targets(batch: Batch) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a supervised batch: a pair, or a dict with input/target keys."""
    if isinstance(batch, Mapping):
        if "input" in batch and "target" in batch:
            return batch["input"], batch["target"]
        values = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        raise TypeError(f"a supervised batch is (inputs, targets), got a {type(batch).__name__}")
    if len(values) < 2:
        raise TypeError(f"a supervised batch is (inputs, targets), got {len(values)} item(s)")
    return values[0], values[1]


def resolve_loss(loss: LossClosure | None, loss_fn: OutputsTargetsLoss | None) -> LossClosure | None:
    """One closure from either form (at most one may be given)."""
    if loss is not None and loss_fn is not None:
        raise ValueError("give loss= (a closure loss(model, batch)) or loss_fn= (loss_fn(outputs, targets)), not both")
    if loss_fn is not None:
        return supervised(loss_fn)
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be a callable loss(model, batch), got {type(loss).__name__}")
    if isinstance(loss, nn.modules.loss._Loss) or getattr(loss, "__module__", None) == "torch.nn.functional":
        raise TypeError(
            f"loss={getattr(loss, '__name__', type(loss).__name__)} takes (outputs, targets); "
            "pass it as loss_fn= (or loss=supervised(...)): loss= is a closure loss(model, batch)"
        )
    return loss
