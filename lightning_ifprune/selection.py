"""Global channel selection: the cheapest channels by score ÷ cost until a target is met.

Scores from any criterion (lower = less important) are normalised by each channel's cost in
the targeted resource — none, the cost, or its square root (the reference's choice) — and
ranked across all groups at once. The number of channels taken is the least that brings
the cost model to the target (exact for FLOPs, params and channels; the measured
:class:`~lightning_ifprune.latency.LatencyModel` for latency), so the result is at most the
target and within one channel's cost of it. With ``round_to``, every group that loses
channels keeps a multiple of ``round_to`` (rounded down, never below its minimum), and the
target still holds after rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lightning_ifprune.latency import LatencyModel
from lightning_ifprune.structure import ChannelStructure

NORMALIZATIONS = ("none", "cost", "sqrt")
RESOURCES = ("flops", "params", "channels", "latency")


@dataclass(frozen=True)
class Baseline:
    """The model size that target fractions refer to (usually the unpruned model);
    ``latency`` (predicted ms per batch) only when latency is targeted."""

    flops: int
    params: int
    channels: int
    latency: float | None = None


def baseline_of(structure: ChannelStructure, latency: LatencyModel | None = None) -> Baseline:
    """The structure's current size as a :class:`Baseline` (with its predicted latency if given a model)."""
    flops, params = structure.cost()
    ms = None if latency is None else latency.predict(structure)
    return Baseline(flops, params, sum(structure.widths().values()), ms)


def parse_target(
    flops: float | None, params: float | None, channels: float | None, latency: float | None = None
) -> tuple[str, float]:
    """Exactly one target fraction in (0, 1]: returns (resource, fraction)."""
    values = (flops, params, channels, latency)
    given = [(name, v) for name, v in zip(RESOURCES, values, strict=True) if v is not None]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of flops=, params=, channels=, latency= (got {[n for n, _ in given] or 'none'})"
        )
    name, value = given[0]
    if isinstance(value, bool) or not 0 < float(value) <= 1:
        raise ValueError(f"target {name}={value!r} must be a fraction in (0, 1]")
    return name, float(value)


#: ``round_to``: a multiple, None (no rounding) or "auto" (the latency model's channel block
#: for latency targets, no rounding for the others).
RoundTo = int | str | None


def check_round_to(round_to: RoundTo) -> RoundTo:
    """``round_to`` must be None, "auto" or a positive int."""
    if round_to == "auto" or round_to is None:
        return round_to
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be None, 'auto' or a positive int (e.g. 8), got {round_to!r}")
    return round_to


def resolve_round_to(
    round_to: RoundTo,
    resource: str,
    latency: LatencyModel | None,
    structure: ChannelStructure | None = None,
    fraction: float | None = None,
    baseline: Baseline | None = None,
) -> int | None:
    """The multiple widths are rounded to: ``"auto"`` is the latency model's channel block (16
    on an AVX-512 CPU, 8 with AVX2 or on CUDA) for a latency target, and no rounding otherwise.

    Given the ``structure`` and target ``fraction``, ``"auto"`` halves the block until the
    target is reachable: a group one block wide (ResNet-56's 16-channel stage at a block of 16)
    cannot shrink at all when rounded to the block."""
    check_round_to(round_to)
    if round_to != "auto":
        return round_to
    block = latency.block if resource == "latency" and latency is not None else 1
    if structure is not None and fraction is not None:
        baseline = baseline or baseline_of(structure, latency)
        while block > 1 and _smallest_fraction(structure, resource, baseline, latency, block) > fraction:
            block //= 2
    return block if block > 1 else None


def _smallest_fraction(
    structure: ChannelStructure, resource: str, baseline: Baseline, latency: LatencyModel | None, round_to: int | None
) -> float:
    """``resource`` after removing every removable channel (widths rounded), as a fraction of ``baseline``."""
    removable = rounded(structure, {n: g.size - g.min_keep for n, g in structure.groups.items()}, round_to)
    return resource_size(structure, resource, removable, latency) / _reference(baseline, resource)


def resource_size(
    structure: ChannelStructure,
    resource: str,
    removed: Mapping[str, int],
    latency: LatencyModel | None = None,
) -> float:
    """MACs, parameters, channels or predicted latency (ms) after removing ``removed[g]`` channels per group."""
    if resource == "channels":
        return sum(structure.widths().values()) - sum(removed.values())
    if resource == "latency":
        return _need_latency(latency).predict(structure, removed)
    flops, params = structure.cost(removed)
    return flops if resource == "flops" else params


def _need_latency(latency: LatencyModel | None) -> LatencyModel:
    if latency is None:
        raise ValueError("a latency target needs a LatencyModel (lightning_ifprune.latency.LatencyModel.build)")
    return latency


def rounded(structure: ChannelStructure, removed: Mapping[str, int], round_to: int | None) -> dict[str, int]:
    """``removed`` with every group that loses channels left at a multiple of ``round_to``:
    kept widths rounded down, but up to the smallest multiple at or above ``min_keep``
    (no removal if that is the whole group)."""
    if not round_to:
        return {n: k for n, k in removed.items() if k}
    out = {}
    for name, k in removed.items():
        group = structure.groups[name]
        if not k:
            continue
        kept = (group.size - k) // round_to * round_to
        kept = max(kept, -(-group.min_keep // round_to) * round_to)
        if kept < group.size:
            out[name] = group.size - kept
    return out


def _check_scores(structure: ChannelStructure, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = sorted(set(structure.groups) - set(scores))
    extra = sorted(set(scores) - set(structure.groups))
    if missing or extra:
        raise ValueError(f"scores do not match the model's prunable groups: missing {missing[:5]}, unknown {extra[:5]}")
    out = {}
    for name, group in structure.groups.items():
        s = torch.as_tensor(scores[name]).detach().flatten().double().cpu()
        if s.numel() != group.size:
            raise ValueError(f"scores['{name}'] has {s.numel()} entries, the group has {group.size} channels")
        if not torch.isfinite(s).all():
            raise ValueError(f"scores['{name}'] contains NaN or inf")
        out[name] = s
    return out


def kept_fraction(
    structure: ChannelStructure, resource: str, baseline: Baseline, latency: LatencyModel | None = None
) -> float:
    """How much of ``baseline``'s ``resource`` the structure's model has now."""
    return resource_size(structure, resource, {}, latency) / _reference(baseline, resource)


def _reference(baseline: Baseline, resource: str) -> float:
    value = getattr(baseline, resource)
    if value is None:
        raise ValueError(f"the baseline has no {resource} (it was recorded without a latency model)")
    return value


def check_reachable(
    structure: ChannelStructure,
    resource: str,
    fraction: float,
    baseline: Baseline,
    hint: str = "",
    *,
    latency: LatencyModel | None = None,
    round_to: RoundTo = None,
) -> None:
    """Raise ``ValueError`` unless removing every removable channel (each group down to its
    ``min_keep``, then to a multiple of ``round_to``) brings ``resource`` to ``fraction`` of
    ``baseline``; ``hint`` says why not."""
    round_to = resolve_round_to(round_to, resource, latency, structure, fraction, baseline)
    smallest = _smallest_fraction(structure, resource, baseline, latency, round_to)
    if smallest > fraction:
        rounding = f" with widths rounded to multiples of {round_to}" if round_to else ""
        raise ValueError(
            f"target {resource}={fraction:g} is unreachable: removing every removable channel{rounding} "
            f"leaves {smallest:.3f} of the baseline{hint}"
        )


def select_channels(
    structure: ChannelStructure,
    scores: Mapping[str, torch.Tensor],
    resource: str,
    fraction: float,
    normalize: str = "sqrt",
    baseline: Baseline | None = None,
    max_channels: int | None = None,
    *,
    latency: LatencyModel | None = None,
    round_to: RoundTo = None,
) -> dict[str, list[int]]:
    """The plan that brings ``resource`` to at most ``fraction`` of ``baseline``.

    With ``max_channels``, at most that many of the lowest-ranked channels are taken (one
    progressive step toward the target; ``round_to`` may then add a group's next-ranked
    channels to reach a multiple). A latency target needs ``latency``: each channel's
    latency saving (:meth:`LatencyModel.channel_savings`) takes the place of its FLOPs.
    Raises ``ValueError`` if the target cannot be reached within the groups' minimums.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {RESOURCES}, got {resource!r}")
    if resource == "latency":
        _need_latency(latency)
    checked = _check_scores(structure, scores)
    baseline = baseline or baseline_of(structure, latency)
    round_to = resolve_round_to(round_to, resource, latency, structure, fraction, baseline)
    limit = fraction * _reference(baseline, resource)

    def size(removed: Mapping[str, int]) -> float:
        return resource_size(structure, resource, removed, latency)

    if size({}) <= limit:
        return {}
    check_reachable(structure, resource, fraction, baseline, latency=latency, round_to=round_to)
    unit = _unit_costs(structure, resource, latency)
    power = {"none": 0.0, "cost": 1.0, "sqrt": 0.5}[normalize]
    keys, values = [], []
    for name, s in checked.items():
        keys.extend((name, idx) for idx in range(s.numel()))
        values.append(s / max(unit[name], 1e-12) ** power)
    order = torch.argsort(torch.cat(values), stable=True).tolist()
    room = {n: g.size - g.min_keep for n, g in structure.groups.items()}
    admissible: list[str] = []  # group of each admissible channel, in rank order
    ranked: dict[str, list[int]] = {n: [] for n in structure.groups}  # per group, its channels in rank order
    for k in order:
        name, idx = keys[k]
        ranked[name].append(idx)
        if room[name] > 0:
            room[name] -= 1
            admissible.append(name)

    def counts(n: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in admissible[:n]:
            out[name] = out.get(name, 0) + 1
        return rounded(structure, out, round_to)

    lo, hi = 0, len(admissible)  # size(counts(hi)) <= limit < size(counts(lo))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(counts(mid)) <= limit:
            hi = mid
        else:
            lo = mid
    if max_channels is not None:
        hi = min(hi, max_channels)
    return {name: sorted(ranked[name][:k]) for name, k in counts(hi).items()}


def _unit_costs(structure: ChannelStructure, resource: str, latency: LatencyModel | None) -> dict[str, float]:
    """What removing one channel of each group saves in ``resource``."""
    if resource == "channels":
        return dict.fromkeys(structure.groups, 1.0)
    if resource == "latency":
        return _need_latency(latency).channel_savings(structure)
    col = 0 if resource == "flops" else 1
    return {n: float(c[col]) for n, c in structure.channel_costs().items()}
