"""Channel scoring criteria behind one function, :func:`score_channels` (spec §5).

Every criterion returns, per prunable group, a 1-D tensor of per-channel scores where
lower means "prune first". ``influence`` is the second-order estimator of
:mod:`lightning_ifprune.estimator`; the rest are the baselines it is measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields

import torch
from torch import nn

from lightning_ifprune.estimator import (
    Batch,
    EstimatorOptions,
    LossFn,
    MaskSpace,
    estimate,
    estimation_mode,
)
from lightning_ifprune.structure import ChannelStructure, channel_masks, validate_example_inputs

Scores = dict[str, torch.Tensor]
CriterionFn = Callable[..., Mapping[str, torch.Tensor]]


class ChannelScores(dict):
    """Scores per group, remembering the example inputs they were computed with."""

    example_inputs: torch.Tensor | None = None


def _magnitude(structure: ChannelStructure, batches, loss_fn, p: int = 1) -> Scores:
    """Lp norm of each channel's producer rows, summed over the group's producers."""
    if p not in (1, 2):
        raise ValueError(f"magnitude criterion: p must be 1 or 2, got {p!r}")
    out = {}
    for name, group in structure.groups.items():
        total = 0
        for prod in group.producers:
            w = structure.model.get_submodule(prod).weight.detach()
            total = total + w.flatten(1).abs().pow(p).sum(1)
        out[name] = total if p == 1 else total.sqrt()
    return out


def _bn_scale(structure: ChannelStructure, batches, loss_fn) -> Scores:
    """|γ| of the group's BatchNorm layers (summed when several share the group)."""
    out = {}
    for name, group in structure.groups.items():
        gammas = [structure.model.get_submodule(n).weight for n in group.norms]
        gammas = [g for g in gammas if g is not None]
        if not gammas:
            raise ValueError(f"bn_scale criterion: group '{name}' has no affine BatchNorm layer")
        out[name] = sum(g.detach().abs() for g in gammas)
    return out


def _random(structure: ChannelStructure, batches, loss_fn, seed: int = 0) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(g.size, generator=gen) for name, g in structure.groups.items()}


def mask_gradients(structure: ChannelStructure, batches: Iterable[Batch], loss_fn: LossFn) -> Iterable[Scores]:
    """``∂L/∂m`` at m = 1 for each batch (one forward and backward each)."""
    model = structure.model
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    space = MaskSpace(structure, params)
    ref = next(iter(params.values()))
    with estimation_mode(model):
        for x, y in batches:
            x = x.to(ref.device, ref.dtype if x.is_floating_point() else x.dtype)
            loss = loss_fn(model(x), y.to(ref.device))
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            t = {k: (p.detach() * g).unsqueeze(0) for (k, p), g in zip(params.items(), grads, strict=True)
                 if g is not None}
            yield {n: v[0] for n, v in space.reduce(t, dtype=ref.dtype).items()}


def _taylor(structure: ChannelStructure, batches, loss_fn) -> Scores:
    """First order: |Σ m ∂L/∂m| per batch, accumulated over batches."""
    return _accumulate(mask_gradients(structure, batches, loss_fn), torch.abs)


def _fisher(structure: ChannelStructure, batches, loss_fn) -> Scores:
    """Group Fisher: Σ over batches of (∂L/∂m_k)²."""
    return _accumulate(mask_gradients(structure, batches, loss_fn), torch.square)


def _accumulate(per_batch: Iterable[Scores], fn: Callable[[torch.Tensor], torch.Tensor]) -> Scores:
    total: Scores = {}
    for scores in per_batch:
        for n, s in scores.items():
            total[n] = total[n] + fn(s) if n in total else fn(s)
    if not total:
        raise ValueError("this criterion needs at least one batch")
    return total


@torch.no_grad()
def _loss_drop(structure: ChannelStructure, batches, loss_fn) -> Scores:
    """Measured loss increase when each channel alone is masked (no retraining)."""
    model = structure.model
    ref = next(model.parameters())
    out = {n: torch.zeros(g.size, dtype=torch.float64) for n, g in structure.groups.items()}
    count = 0
    with estimation_mode(model), channel_masks(structure) as masks:
        for x, y in batches:
            x = x.to(ref.device, ref.dtype if x.is_floating_point() else x.dtype)
            y = y.to(ref.device)
            base = float(loss_fn(model(x), y))
            for name, group in structure.groups.items():
                for k in range(group.size):
                    masks[name][k] = 0
                    out[name][k] += float(loss_fn(model(x), y)) - base
                    masks[name][k] = 1
            count += 1
    if not count:
        raise ValueError("loss_drop needs at least one batch")
    return {n: v / count for n, v in out.items()}


def _influence(structure: ChannelStructure, batches, loss_fn, **options) -> Scores:
    known = {f.name for f in fields(EstimatorOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown influence options {unknown}; valid: {sorted(known)}")
    return estimate(structure, batches, loss_fn, EstimatorOptions(**options)).scores


CRITERIA: dict[str, CriterionFn] = {
    "influence": _influence,
    "magnitude": _magnitude,
    "bn_scale": _bn_scale,
    "taylor": _taylor,
    "fisher": _fisher,
    "random": _random,
    "loss_drop": _loss_drop,
}
#: Criteria that read data (the others only look at weights).
DATA_CRITERIA = frozenset({"influence", "taylor", "fisher", "loss_drop"})


def score_structure(
    structure: ChannelStructure,
    batches: Iterable[Batch],
    loss_fn: LossFn | None,
    criterion: str | CriterionFn = "influence",
    **options,
) -> ChannelScores:
    """Score the channels of an already built structure (see :func:`score_channels`)."""
    if callable(criterion):
        fn, name = criterion, getattr(criterion, "__name__", "callable")
    elif criterion in CRITERIA:
        fn, name = CRITERIA[criterion], criterion
    else:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)} or pass a callable")
    if name in DATA_CRITERIA and loss_fn is None:
        raise ValueError(f"criterion {name!r} needs loss_fn")
    raw = fn(structure, batches, loss_fn, **options)
    scores = ChannelScores()
    for gname, group in structure.groups.items():
        if gname not in raw:
            raise ValueError(f"criterion {name!r} returned no scores for group '{gname}'")
        s = torch.as_tensor(raw[gname]).detach().flatten()
        if s.numel() != group.size:
            raise ValueError(f"criterion {name!r}: group '{gname}' has {group.size} channels, got {s.numel()} scores")
        scores[gname] = s
    scores.example_inputs = structure.example_inputs
    return scores


def score_channels(
    model: nn.Module,
    batches: Iterable[Batch] = (),
    loss_fn: LossFn | None = None,
    criterion: str | CriterionFn = "influence",
    example_inputs: torch.Tensor | None = None,
    *,
    ignored_layers: Iterable[str | nn.Module] = (),
    min_channels: int | float = 1,
    **options,
) -> ChannelScores:
    """Per-channel scores of every prunable group of ``model`` (lower = prune first).

    ``batches`` yields ``(inputs, targets)``; ``loss_fn(outputs, targets)`` returns a scalar.
    ``criterion`` is one of :data:`CRITERIA` or a callable
    ``fn(structure, batches, loss_fn, **options) -> {group: scores}``. ``options`` go to the
    criterion (for ``influence``: the fields of :class:`EstimatorOptions`). The model is left
    exactly as it was. Group names are the qualified names of their first producer layers.
    """
    batches = list(batches)
    if example_inputs is None:
        if not batches:
            raise ValueError("give example_inputs= or at least one batch to trace the model with")
        example_inputs = batches[0][0][:1]
    ref = next(model.parameters())
    example = validate_example_inputs(example_inputs).to(ref.device)
    if example.is_floating_point():
        example = example.to(ref.dtype)
    structure = ChannelStructure.build(model, example, ignored_layers=ignored_layers, min_channels=min_channels)
    if not structure.groups:
        raise ValueError("the model has no prunable channel group")
    return score_structure(structure, batches, loss_fn, criterion, **options)
