"""Channel scoring criteria as configured objects (spec §5), behind :func:`score_channels`.

A criterion is configured (and fully validated) in ``__init__`` and called on a
:class:`~lightning_ifprune.structure.ChannelStructure` with training batches and a loss
closure; it returns, per prunable group, a 1-D tensor of per-channel scores where lower
means "prune first". :class:`Influence` is the second-order estimator; the others are the
baselines it is measured against. Names (``"influence"``, ``"taylor"``, …) map to default
objects; any callable ``fn(structure, batches, loss) -> {group: scores}`` works too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_ifprune.batch import Batch, to_compute
from lightning_ifprune.estimator import (
    EstimatorOptions,
    compute_dtype,
    estimate,
    estimation_mode,
    mask_params,
    scalar_loss,
)
from lightning_ifprune.loss import LossClosure, OutputsTargetsLoss, inputs_and_targets, resolve_loss
from lightning_ifprune.structure import (
    NORM_TYPES,
    ChannelStructure,
    Example,
    MaskSpace,
    channel_masks,
    single_sample,
    validate_example_inputs,
)

Scores = dict[str, torch.Tensor]
CriterionFn = Callable[[ChannelStructure, Iterable[Batch], LossClosure | None], Mapping[str, torch.Tensor]]


class ChannelScores(dict):
    """Scores per group, remembering the example inputs they were computed with."""

    example_inputs: Example | None = None


class Criterion:
    """Base of the built-in criteria: ``criterion(structure, batches, loss) -> scores``.

    ``needs_data``: whether the criterion reads batches and the loss (else only weights).
    """

    name: ClassVar[str] = "criterion"
    needs_data: ClassVar[bool] = False

    def __call__(self, structure: ChannelStructure, batches: Iterable[Batch], loss: LossClosure | None) -> Scores:
        raise NotImplementedError

    def for_optimizer(self, weight_decay: float) -> Criterion:
        """This criterion with what it takes from the training optimizer filled in."""
        return self

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), repr(self)))


class Magnitude(Criterion):
    """Lp norm (``p`` = 1 or 2) of each channel's producer rows, summed over the group's producers.

    ``per_group=True`` divides each group's scores by their mean, so that layers of different
    weight scale compete fairly in the global ranking (Torch-Pruning's mean normaliser).
    """

    name = "magnitude"

    def __init__(self, p: int = 1, per_group: bool = False) -> None:
        if isinstance(p, bool) or p not in (1, 2):
            raise ValueError(f"Magnitude: p must be 1 or 2, got {p!r}")
        if not isinstance(per_group, bool):
            raise ValueError(f"Magnitude: per_group must be True or False, got {per_group!r}")
        self.p, self.per_group = p, per_group

    def __call__(self, structure, batches, loss) -> Scores:
        out = {}
        for name, group in structure.groups.items():
            total = 0
            for prod in group.producers:
                w = structure.model.get_submodule(prod).weight.detach()
                total = total + w.flatten(1).abs().pow(self.p).sum(1)
            total = total if self.p == 1 else total.sqrt()
            out[name] = total / total.mean().clamp_min(torch.finfo(total.dtype).tiny) if self.per_group else total
        return out


class BNScale(Criterion):
    """|γ| of the group's BatchNorm layers at the group's channels (summed when several)."""

    name = "bn_scale"

    def __call__(self, structure, batches, loss) -> Scores:
        out = {}
        for name, group in structure.groups.items():
            total = None
            for slot in group.norms:
                norm = structure.model.get_submodule(slot.module)
                gamma = getattr(norm, "weight", None) if isinstance(norm, NORM_TYPES) else None
                if gamma is not None:
                    part = gamma.detach()[slot.positions.to(gamma.device)].abs()
                    zero = torch.zeros(group.size, dtype=gamma.dtype, device=gamma.device)
                    total = (zero if total is None else total).index_add(0, slot.channels.to(gamma.device), part)
            if total is None:
                raise ValueError(f"bn_scale criterion: group '{name}' has no affine BatchNorm layer")
            out[name] = total
        return out


class Random(Criterion):
    """Uniform random scores; ``seed=None`` follows the run's seed (``torch.initial_seed()``,
    which ``seed_everything`` sets), without drawing from the global generator."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"Random: seed must be an integer or None, got {seed!r}")
        self.seed = seed

    def __call__(self, structure, batches, loss) -> Scores:
        seed = torch.initial_seed() if self.seed is None else self.seed
        gen = torch.Generator().manual_seed(seed % (2**63))
        return {name: torch.rand(g.size, generator=gen) for name, g in structure.groups.items()}


def _require_batches(name: str, batches: Iterable[Batch]) -> Iterator[Batch]:
    count = 0
    for batch in batches:
        count += 1
        yield batch
    if not count:
        raise ValueError(f"the {name} criterion needs at least one batch")


def mask_gradients(structure: ChannelStructure, batches: Iterable[Batch], loss: LossClosure) -> Iterator[Scores]:
    """``∂L/∂m`` at m = 1 for each batch (one forward and backward each)."""
    model = structure.model
    dtype = compute_dtype(structure)
    with estimation_mode(model), mask_params(structure) as (params, _):
        space = MaskSpace(structure, params)  # frozen consumers included: they read the masks
        ref = next(iter(params.values()))
        for batch in batches:
            value = scalar_loss(loss, model, to_compute(batch, ref.device, dtype))
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
            t = {
                k: (p.detach() * g).unsqueeze(0)
                for (k, p), g in zip(params.items(), grads, strict=True)
                if g is not None
            }
            yield {n: v[0] for n, v in space.reduce(t, dtype=ref.dtype).items()}


def _accumulate(per_batch: Iterable[Scores], fn: Callable[[torch.Tensor], torch.Tensor]) -> Scores:
    total: Scores = {}
    for scores in per_batch:
        for n, s in scores.items():
            total[n] = total[n] + fn(s) if n in total else fn(s)
    return total


class Taylor(Criterion):
    """First order: |Σ m ∂L/∂m| per batch, accumulated over batches."""

    name = "taylor"
    needs_data = True

    def __call__(self, structure, batches, loss) -> Scores:
        return _accumulate(mask_gradients(structure, _require_batches(self.name, batches), loss), torch.abs)


class Fisher(Criterion):
    """Group Fisher: Σ over batches of (∂L/∂m_k)²."""

    name = "fisher"
    needs_data = True

    def __call__(self, structure, batches, loss) -> Scores:
        return _accumulate(mask_gradients(structure, _require_batches(self.name, batches), loss), torch.square)


class LossDrop(Criterion):
    """Measured loss increase when each channel alone is masked (no retraining)."""

    name = "loss_drop"
    needs_data = True

    @torch.no_grad()
    def __call__(self, structure, batches, loss) -> Scores:
        model = structure.model
        ref = next(model.parameters())
        dtype = compute_dtype(structure)
        out = {n: torch.zeros(g.size, dtype=torch.float64) for n, g in structure.groups.items()}
        count = 0
        with estimation_mode(model), channel_masks(structure) as masks:
            for batch in _require_batches(self.name, batches):
                batch = to_compute(batch, ref.device, dtype)
                base = float(scalar_loss(loss, model, batch))
                for name, group in structure.groups.items():
                    for k in range(group.size):
                        masks[name][k] = 0
                        out[name][k] += float(scalar_loss(loss, model, batch)) - base
                        masks[name][k] = 1
                count += 1
        return {n: v / count for n, v in out.items()}


class Influence(Criterion):
    """The influence estimator (:func:`~lightning_ifprune.estimator.estimate`).

    ``Influence(EstimatorOptions(...))``, ``Influence(cg_iters=5)`` or both (fields override
    the options). Every field is validated here; an unknown one is a ``TypeError``.
    """

    name = "influence"
    needs_data = True

    def __init__(self, options: EstimatorOptions | Mapping[str, Any] | None = None, **fields: Any) -> None:
        if options is None:
            options = {}
        if isinstance(options, EstimatorOptions):
            options = {f: getattr(options, f) for f in EstimatorOptions.__dataclass_fields__}
        if not isinstance(options, Mapping):
            raise TypeError(f"Influence: options must be EstimatorOptions or a mapping, got {type(options).__name__}")
        self.options = EstimatorOptions.from_mapping({**options, **fields})

    def for_optimizer(self, weight_decay: float) -> Influence:
        if self.options.weight_decay is None and self.options.needs_decay and weight_decay <= 0:
            raise ValueError(
                "influence with score='retrained' and inverse='identity' needs the optimizer's weight_decay > 0 "
                "(or Influence(weight_decay=...))"
            )
        return Influence(self.options.with_weight_decay(weight_decay))

    def __call__(self, structure, batches, loss) -> Scores:
        return estimate(structure, batches, loss, self.options).scores


#: Criterion names and the classes their default objects are built from.
CRITERIA: dict[str, type[Criterion]] = {
    cls.name: cls for cls in (Influence, Magnitude, BNScale, Taylor, Fisher, Random, LossDrop)
}


def resolve_criterion(criterion: str | Criterion | CriterionFn, **options: Any) -> Criterion | CriterionFn:
    """A criterion object from a name (with its options), an object, or a callable."""
    if isinstance(criterion, str):
        if criterion not in CRITERIA:
            raise ValueError(
                f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}, a Criterion object or a callable"
            )
        cls = CRITERIA[criterion]
        if cls is not Influence:
            accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
            unknown = sorted(set(options) - set(accepted))
            if unknown:
                raise TypeError(f"criterion {criterion!r} takes no option {unknown}; its options: {accepted}")
        return cls(**options)
    if options:
        raise TypeError(f"options {sorted(options)} go with a criterion name; configure the object instead")
    if not callable(criterion):
        raise ValueError(
            f"criterion must be a name in {sorted(CRITERIA)}, a Criterion or a callable, got {criterion!r}"
        )
    return criterion


def criterion_name(criterion: Criterion | CriterionFn) -> str:
    """A criterion's name (a callable's ``__name__``)."""
    return criterion.name if isinstance(criterion, Criterion) else getattr(criterion, "__name__", "callable")


def for_optimizer(criterion: Criterion | CriterionFn, weight_decay: float) -> Criterion | CriterionFn:
    """The criterion completed with the optimizer's weight decay (callables as they are)."""
    return criterion.for_optimizer(weight_decay) if isinstance(criterion, Criterion) else criterion


def needs_data(criterion: Criterion | CriterionFn) -> bool:
    """Whether the criterion reads batches (callables are assumed to, unless they say otherwise)."""
    return bool(getattr(criterion, "needs_data", True))


def score_structure(
    structure: ChannelStructure,
    batches: Iterable[Batch],
    loss: LossClosure | None,
    criterion: Criterion | CriterionFn,
) -> ChannelScores:
    """Score the channels of an already built structure (see :func:`score_channels`)."""
    name = criterion_name(criterion)
    if isinstance(criterion, Criterion) and criterion.needs_data and loss is None:
        raise ValueError(f"criterion {name!r} needs a loss (loss= or loss_fn=)")
    raw = criterion(structure, batches, loss)
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
    loss: LossClosure | None = None,
    criterion: str | Criterion | CriterionFn = "influence",
    example_inputs: Example | None = None,
    *,
    loss_fn: OutputsTargetsLoss | None = None,
    ignored_layers: Iterable[str | nn.Module] = (),
    min_channels: int | float = 1,
    **options: Any,
) -> ChannelScores:
    """Per-channel scores of every prunable group of ``model`` (lower = prune first).

    ``loss(model, batch)`` returns the scalar loss of a batch of any structure; or give
    ``loss_fn(outputs, targets)`` for ``(inputs, targets)`` batches. ``criterion`` is a name
    of :data:`CRITERIA` (``options`` configure it), a :class:`Criterion` object or a
    callable ``fn(structure, batches, loss) -> {group: scores}``. The model is traced with
    ``example_inputs`` (what the model is called with, see :mod:`lightning_ifprune.structure.example`;
    default: the first sample of the first batch's inputs, e.g. one image of a detection
    batch's image list) and left
    exactly as it was. Group names are the qualified names of their first producer layers.
    """
    chosen = resolve_criterion(criterion, **options)
    closure = resolve_loss(loss, loss_fn)
    batches = list(batches)
    if example_inputs is None:
        if not batches:
            raise ValueError("give example_inputs= or at least one batch to trace the model with")
        example_inputs = single_sample(inputs_and_targets(batches[0])[0])
    ref = next(model.parameters())
    example = to_compute(validate_example_inputs(example_inputs), ref.device, ref.dtype)
    structure = ChannelStructure.build(model, example, ignored_layers=ignored_layers, min_channels=min_channels)
    if not structure.groups:
        raise ValueError("the model has no prunable channel group")
    return score_structure(structure, batches, closure, chosen)
