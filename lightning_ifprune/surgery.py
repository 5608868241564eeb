"""Physical channel removal: validated, atomic, recorded as plain data, replayable.

A *plan* maps group names to the channel indices to remove, e.g.
``{"layer1.0.conv1": [3, 7]}``. :func:`prune_channels` checks the whole plan before it
touches anything, removes the channels through Torch-Pruning's layer surgery (a fresh
group per entry, never ``group.prune(idxs=...)``), and restores the model exactly if any
step fails. It returns what it did (:class:`SurgeryResult`): the applied plan, which entries
of each parameter went (to slice optimizer state alike, :mod:`lightning_ifprune.optim`), the
replaced parameters, and the history step. The applied plans form the *history*: lists of
names and ints that survive ``torch.load(weights_only=True)`` and rebuild the pruned
architecture on a fresh model. Every applied plan is recorded on the model it pruned
(:func:`pruning_state`), whoever applied it — the callback, :func:`prune_channels` or
:func:`~lightning_ifprune.prune_to_target` — and :func:`recorded_history` gathers the steps
recorded on a module and its submodules in the order they were applied.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_ifprune.batch import map_tensors
from lightning_ifprune.structure import (
    CONV_TYPES,
    PER_CHANNEL_TYPES,
    WEIGHTED_TYPES,
    ChannelStructure,
    Example,
    call_model,
    single_sample,
)
from lightning_ifprune.structure.attention import head_slices, remove_heads
from lightning_ifprune.structure.ops import is_depthwise

#: One applied plan: ``[{"group": name, "indices": [...]}, ...]``.
HistoryStep = list[dict[str, object]]
#: The applied plans of a model, oldest first.
History = list[HistoryStep]
#: Which entries of a parameter a plan removes: ``{dim: indices}``.
ParamSlices = dict[int, list[int]]

_ATTR = "_ifprune_state"
_clock = [0]


class PruningPlanError(ValueError):
    """A pruning plan that cannot be applied; nothing was changed."""


def pruning_state(module: nn.Module) -> dict[str, Any]:
    """The steps recorded on ``module`` itself: ``{"history": [...], "example_input": Example | None}``.

    Its submodules may hold steps of their own (when they were pruned directly); see
    :func:`recorded_history` for all of them.
    """
    state = module.__dict__.get(_ATTR)
    if state is None:
        state = {"history": [], "example_input": None, "order": []}
        module.__dict__[_ATTR] = state
    return state


def _next_order() -> int:
    """A strictly increasing stamp, comparable across the modules of one process."""
    _clock[0] = max(time.time_ns(), _clock[0] + 1)
    return _clock[0]


def record_pruning(module: nn.Module, step: HistoryStep, example_input: Example) -> None:
    """Append one applied plan to the module's history.

    :func:`prune_channels` records every plan it applies; recording the same step object
    (``result.history_step``) again is a no-op.
    """
    for sub in module.modules():
        state = sub.__dict__.get(_ATTR)
        if state is not None and any(s is step for s in state["history"]):
            return
    state = pruning_state(module)
    order = state.setdefault("order", [])
    order.extend([0] * (len(state["history"]) - len(order)))
    state["history"].append(step)
    order.append(_next_order())
    state["example_input"] = map_tensors(example_input, lambda t: t.detach().cpu())


def recorded_history(module: nn.Module) -> tuple[History, Example | None]:
    """Every step recorded on ``module`` and its submodules, oldest first, names relative to
    ``module``; and the example input to replay them with (``module``'s own, else the latest
    submodule's)."""
    steps: list[tuple[int, int, HistoryStep]] = []
    own, latest = None, (-1, None)
    for prefix, sub in module.named_modules():
        state = sub.__dict__.get(_ATTR)
        if not state or not state["history"]:
            continue
        order = list(state.get("order") or [])
        order += [0] * (len(state["history"]) - len(order))
        for stamp, step in zip(order[: len(state["history"])], state["history"], strict=True):
            entries = [{**e, "group": f"{prefix}.{e['group']}" if prefix else e["group"]} for e in step]
            steps.append((stamp, len(steps), entries))
        if sub is module:
            own = state["example_input"]
        elif max(order) > latest[0]:
            latest = (max(order), state["example_input"])
    example = own if own is not None else latest[1]
    return [step for _, _, step in sorted(steps, key=lambda t: t[:2])], example


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
def atomic(model: nn.Module) -> Iterator[None]:
    """Undo every change surgery makes to ``model``'s modules if the block raises.

    Torch-Pruning replaces parameters and buffers by new tensors and rewrites size
    attributes (head pruning also changes an attention layer's class), so keeping references,
    plain attributes and classes is enough to roll back; the
    recorded pruning histories roll back too. Blocks may span several :func:`prune_channels`.
    """
    saved = []
    for module in model.modules():
        attrs = {
            k: v
            for k, v in vars(module).items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, tuple, str))
        }
        state = module.__dict__.get(_ATTR)
        copied = None if state is None else {k: list(v) if isinstance(v, list) else v for k, v in state.items()}
        saved.append((module, type(module), dict(module._parameters), dict(module._buffers), attrs, copied))
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        yield
    except BaseException:
        for module, cls, params, buffers, attrs, copied in saved:
            module.__class__ = cls  # pruned attention layers change class
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
            for k, v in attrs.items():
                setattr(module, k, v)
            if copied is None:
                module.__dict__.pop(_ATTR, None)
            else:
                module.__dict__.setdefault(_ATTR, {}).clear()
                module.__dict__[_ATTR].update(copied)
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "_step", plan_to_history_step(self.plan))

    @property
    def history_step(self) -> HistoryStep:
        """The plan as one history entry (plain names and ints); the object recorded on the model."""
        return self._step  # type: ignore[attr-defined]

    @property
    def removed(self) -> dict[str, int]:
        """Channels removed per group."""
        return {n: len(v) for n, v in self.plan.items()}


def prune_channels(structure: ChannelStructure, plan: Mapping[str, Sequence[int]]) -> SurgeryResult:
    """Physically remove the planned channels from ``structure.model``, all or nothing.

    Frozen parameters stay frozen and every module keeps its train/eval mode. The applied
    plan is recorded on ``structure.model`` (:func:`record_pruning`), so checkpoints of it (or
    of a module containing it) rebuild the pruned architecture. ``structure`` describes the
    model before pruning and is stale afterwards: build a new one for further work.
    """
    steps = validate_plan(structure, plan)
    if not steps:
        return SurgeryResult()
    model, graph = structure.model, structure.graph
    slices = _parameter_slices(structure, steps)
    old = dict(model.named_parameters())
    frozen = {name for name, p in old.items() if not p.requires_grad}
    modes = [(m, m.training) for m in model.modules()]
    with atomic(model):
        for name, idxs in steps.items():
            if name in structure.heads:
                remove_heads(model, structure.heads[name], idxs)
                continue
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
    result = SurgeryResult(steps, slices, replaced)
    record_pruning(model, result.history_step, single_sample(structure.example_inputs))
    return result


def _check_forward(model: nn.Module, example_inputs: Example) -> None:
    """Run the pruned model once so a broken surgery fails here, inside the rollback."""
    was = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for m, training in was:
            m.training = training


def plan_to_history_step(plan: Mapping[str, Sequence[int]]) -> HistoryStep:
    """One history entry: plain names and ints (safe for ``weights_only`` loading)."""
    return [{"group": name, "indices": [int(i) for i in idxs]} for name, idxs in plan.items()]


def replay_history(
    model: nn.Module,
    history: Iterable[Sequence[Mapping[str, object]]],
    example_inputs: Example,
) -> nn.Module:
    """Apply a recorded history to a freshly built model (in place, all steps or none); returns
    the model. The steps are recorded on it."""
    history = list(history)
    with atomic(model):
        for k, step in enumerate(history, 1):
            plan = {str(e["group"]): list(e["indices"]) for e in step}  # type: ignore[call-overload]
            try:
                prune_channels(ChannelStructure.build(model, example_inputs), plan)
            except PruningPlanError as err:
                raise PruningPlanError(f"history step {k} of {len(history)}: {err}") from err
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

    params = dict(model.named_parameters())
    for name, idxs in steps.items():
        if name in structure.heads:
            out.update({p: dims for p, dims in head_slices(structure.heads[name], idxs).items() if p in params})
            continue
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
