"""Physical channel removal: validated, atomic, recorded as plain data, replayable.

A *plan* maps group names to the channel indices to remove, e.g.
``{"layer1.0.conv1": [3, 7]}``. :func:`prune_channels` checks the whole plan before it
touches anything, removes the channels through Torch-Pruning's layer surgery (a fresh
group per entry, never ``group.prune(idxs=...)``), and restores the model exactly if any
step fails. It returns what it did (:class:`SurgeryResult`): the applied plan, which entries
of each parameter went (to slice optimizer state alike, :mod:`lightning_ifprune.optim`), the
replaced parameters, and the history step. The applied plans form the *history*: lists of
names and ints that survive ``torch.load(weights_only=True)`` and rebuild the pruned
architecture on a fresh model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_ifprune.structure import (
    CONV_TYPES,
    PER_CHANNEL_TYPES,
    WEIGHTED_TYPES,
    ChannelStructure,
)
from lightning_ifprune.structure.ops import is_depthwise

#: One applied plan: ``[{"group": name, "indices": [...]}, ...]``.
HistoryStep = list[dict[str, object]]
#: The applied plans of a model, oldest first.
History = list[HistoryStep]
#: Which entries of a parameter a plan removes: ``{dim: indices}``.
ParamSlices = dict[int, list[int]]


class PruningPlanError(ValueError):
    """A pruning plan that cannot be applied; nothing was changed."""


def validate_plan(structure: ChannelStructure, plan: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Check ``plan`` against ``structure``; return it with sorted plain-int indices.

    Empty entries are dropped. Raises :class:`PruningPlanError` naming the first problem.
    """
    if not isinstance(plan, Mapping):
        raise PruningPlanError(f"a plan maps group names to channel indices, got {type(plan).__name__}")
    out: dict[str, list[int]] = {}
    for name, idxs in plan.items():
        if name not in structure.groups:
            why = structure.skipped.get(name)
            raise PruningPlanError(
                f"group '{name}' is not prunable ({why})"
                if why
                else f"unknown group '{name}'; prunable groups: {sorted(structure.groups)[:8]}..."
            )
        if isinstance(idxs, torch.Tensor):
            idxs = idxs.flatten().tolist()
        values = list(idxs)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in values):
            raise PruningPlanError(f"group '{name}': channel indices must be integers, got {values[:5]}")
        group = structure.groups[name]
        bad = [i for i in values if not 0 <= i < group.size]
        if bad:
            raise PruningPlanError(f"group '{name}': indices {bad[:5]} out of range [0, {group.size})")
        if len(set(values)) != len(values):
            dup = sorted({i for i in values if values.count(i) > 1})
            raise PruningPlanError(f"group '{name}': duplicate indices {dup[:5]}")
        if group.size - len(values) < group.min_keep:
            raise PruningPlanError(
                f"group '{name}': removing {len(values)} of {group.size} channels would keep fewer "
                f"than the minimum of {group.min_keep}"
            )
        if values:
            out[name] = sorted(values)
    return out


@contextmanager
def _atomic(model: nn.Module) -> Iterator[None]:
    """Undo every change to ``model``'s modules if the block raises.

    Torch-Pruning replaces parameters and buffers by new tensors and rewrites size
    attributes, so keeping references and plain attributes is enough to roll back.
    """
    saved = []
    for module in model.modules():
        attrs = {
            k: v
            for k, v in vars(module).items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, tuple, str))
        }
        saved.append((module, dict(module._parameters), dict(module._buffers), attrs))
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        yield
    except BaseException:
        for module, params, buffers, attrs in saved:
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
            for k, v in attrs.items():
                setattr(module, k, v)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise


@dataclass(frozen=True)
class SurgeryResult:
    """What :func:`prune_channels` did.

    ``plan``: the applied plan (sorted indices); ``slices``: per parameter name, the entries
    removed along each dim; ``replaced``: per parameter name, ``(old, new)`` parameter objects.
    """

    plan: dict[str, list[int]] = field(default_factory=dict)
    slices: dict[str, ParamSlices] = field(default_factory=dict)
    replaced: dict[str, tuple[nn.Parameter, nn.Parameter]] = field(default_factory=dict)

    @property
    def history_step(self) -> HistoryStep:
        """The plan as one history entry (plain names and ints)."""
        return plan_to_history_step(self.plan)

    @property
    def removed(self) -> dict[str, int]:
        """Channels removed per group."""
        return {n: len(v) for n, v in self.plan.items()}


def prune_channels(structure: ChannelStructure, plan: Mapping[str, Sequence[int]]) -> SurgeryResult:
    """Physically remove the planned channels from ``structure.model``, all or nothing.

    Frozen parameters stay frozen and every module keeps its train/eval mode. ``structure``
    describes the model before pruning and is stale afterwards: build a new one for further
    work.
    """
    steps = validate_plan(structure, plan)
    if not steps:
        return SurgeryResult()
    model, graph = structure.model, structure.graph
    slices = _parameter_slices(structure, steps)
    old = dict(model.named_parameters())
    frozen = {name for name, p in old.items() if not p.requires_grad}
    modes = [(m, m.training) for m in model.modules()]
    with _atomic(model):
        for name, idxs in steps.items():
            root = model.get_submodule(name)
            pruner = graph.get_pruner_of_module(root)
            group = graph.get_pruning_group(root, pruner.prune_out_channels, idxs)
            group.prune(record_history=False)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        for m, training in modes:
            m.training = training
        _check_forward(model, structure.example_inputs)
    new = dict(model.named_parameters())
    replaced = {n: (p, new[n]) for n, p in old.items() if n in new and new[n] is not p}
    return SurgeryResult(steps, slices, replaced)


def _check_forward(model: nn.Module, example_inputs: torch.Tensor) -> None:
    """Run the pruned model once so a broken surgery fails here, inside the rollback."""
    was = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example_inputs)
    finally:
        for m, training in was:
            m.training = training


def plan_to_history_step(plan: Mapping[str, Sequence[int]]) -> HistoryStep:
    """One history entry: plain names and ints (safe for ``weights_only`` loading)."""
    return [{"group": name, "indices": [int(i) for i in idxs]} for name, idxs in plan.items()]


def replay_history(
    model: nn.Module,
    history: Iterable[Sequence[Mapping[str, object]]],
    example_inputs: torch.Tensor,
) -> nn.Module:
    """Apply a recorded history to a freshly built model (in place); returns the model."""
    for step in history:
        plan = {str(e["group"]): list(e["indices"]) for e in step}  # type: ignore[call-overload]
        prune_channels(ChannelStructure.build(model, example_inputs), plan)
    return model


def _parameter_slices(structure: ChannelStructure, steps: Mapping[str, Sequence[int]]) -> dict[str, ParamSlices]:
    """Which entries of each parameter a validated plan removes: ``{param name: {dim: indices}}``.

    Computed from the same dependency groups the surgery uses, before anything changes.
    """
    model, graph = structure.model, structure.graph
    names = {m: n for n, m in model.named_modules()}
    out: dict[str, ParamSlices] = {}

    def add(module: nn.Module, attr: str, dim: int, idxs: Sequence[int]) -> None:
        if not isinstance(getattr(module, attr, None), nn.Parameter):
            return
        prefix = names[module]
        key = f"{prefix}.{attr}" if prefix else attr
        out.setdefault(key, {}).setdefault(dim, [])
        out[key][dim] = sorted(set(out[key][dim]) | {int(i) for i in idxs})

    for name, idxs in steps.items():
        root = model.get_submodule(name)
        group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs)
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            if not isinstance(module, nn.Module) or module not in names:
                continue
            if isinstance(module, WEIGHTED_TYPES) and not is_depthwise(module):
                if graph.is_out_channel_pruning_fn(handler):
                    add(module, "weight", 0, item.idxs)
                    add(module, "bias", 0, item.idxs)
                else:
                    add(module, "weight", 1, item.idxs)
            elif isinstance(module, (*CONV_TYPES, *PER_CHANNEL_TYPES)):
                add(module, "weight", 0, item.idxs)
                add(module, "bias", 0, item.idxs)
    return out
