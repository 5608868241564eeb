"""Torch-Pruning 1.6.1's own importance criteria as comparison rows (benchmarks only).

Each of our groups is mapped to Torch-Pruning's dependency group of its first producer and
scored by Torch-Pruning's importance object (its defaults: L2, mean over the group's layers,
each group's scores divided by their mean). Our selection and cost normalisation then prune to
the same FLOPs target as every other row, so only the scores differ. ``GroupTaylorImportance``
reads the weight gradients of the loss summed over the scoring batches; the model's gradients
and buffers (BatchNorm statistics) are restored afterwards.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch_pruning as tp

import lightning_ifprune as lip


class TorchPruningImportance(lip.Criterion):
    """Base: scores every group with ``make()``, a Torch-Pruning importance object."""

    name: ClassVar[str] = "tp"

    @staticmethod
    def make() -> tp.importance.Importance:
        raise NotImplementedError

    def __call__(self, structure, batches, loss) -> dict[str, torch.Tensor]:
        model = structure.model
        grads = {p: p.grad for p in model.parameters()}
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        try:
            if self.needs_data:
                model.zero_grad(set_to_none=True)
                for batch in batches:
                    loss(model, batch).backward()
            importance = self.make()
            scores = {}
            for name, group in structure.groups.items():
                module = model.get_submodule(group.producers[0])
                prune = structure.graph.get_pruner_of_module(module).prune_out_channels
                tp_group = structure.graph.get_pruning_group(module, prune, list(range(group.size)))
                value = importance(tp_group)
                if value is None or value.numel() != group.size:
                    raise RuntimeError(f"Torch-Pruning's {type(importance).__name__} gave no scores for {name}")
                scores[name] = value.detach().double().cpu()
        finally:
            for p, g in grads.items():
                p.grad = g
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(buffers[k])
        return scores


class TPGroupMagnitude(TorchPruningImportance):
    """``tp.importance.GroupMagnitudeImportance()`` (weights only)."""

    name = "tp_group_magnitude"
    needs_data = False

    @staticmethod
    def make() -> tp.importance.Importance:
        return tp.importance.GroupMagnitudeImportance()


class TPGroupTaylor(TorchPruningImportance):
    """``tp.importance.GroupTaylorImportance()`` (first order, from weight gradients)."""

    name = "tp_group_taylor"
    needs_data = True

    @staticmethod
    def make() -> tp.importance.Importance:
        return tp.importance.GroupTaylorImportance()
