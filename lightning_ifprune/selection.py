"""Global channel selection: the cheapest channels by score ÷ cost until a target is met.

Scores from any criterion (lower = less important) are normalised by each channel's cost in
the targeted resource — none, the cost, or its square root (the reference's choice) — and
ranked across all groups at once. The number of channels taken is the least that brings
the exact cost model to the target, so the result is at most the target and within one
channel's cost of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lightning_ifprune.structure import ChannelStructure

NORMALIZATIONS = ("none", "cost", "sqrt")
RESOURCES = ("flops", "params", "channels")


@dataclass(frozen=True)
class Baseline:
    """The model size that target fractions refer to (usually the unpruned model)."""

    flops: int
    params: int
    channels: int


def baseline_of(structure: ChannelStructure) -> Baseline:
    """The structure's current size as a :class:`Baseline`."""
    flops, params = structure.cost()
    return Baseline(flops, params, sum(structure.widths().values()))


def parse_target(flops: float | None, params: float | None, channels: float | None) -> tuple[str, float]:
    """Exactly one target fraction in (0, 1]: returns (resource, fraction)."""
    given = [(name, v) for name, v in zip(RESOURCES, (flops, params, channels), strict=True) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of flops=, params=, channels= (got {[n for n, _ in given] or 'none'})")
    name, value = given[0]
    if isinstance(value, bool) or not 0 < float(value) <= 1:
        raise ValueError(f"target {name}={value!r} must be a fraction in (0, 1]")
    return name, float(value)


def resource_size(structure: ChannelStructure, resource: str, removed: Mapping[str, int]) -> int:
    """MACs, parameters or channels of the model after removing ``removed[g]`` channels per group."""
    if resource == "channels":
        return sum(structure.widths().values()) - sum(removed.values())
    flops, params = structure.cost(removed)
    return flops if resource == "flops" else params


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


def kept_fraction(structure: ChannelStructure, resource: str, baseline: Baseline) -> float:
    """How much of ``baseline``'s ``resource`` the structure's model has now."""
    return resource_size(structure, resource, {}) / getattr(baseline, resource)


def check_reachable(
    structure: ChannelStructure, resource: str, fraction: float, baseline: Baseline, hint: str = ""
) -> None:
    """Raise ``ValueError`` unless removing every removable channel (each group down to its
    ``min_keep``) brings ``resource`` to ``fraction`` of ``baseline``; ``hint`` says why not."""
    removable = {n: g.size - g.min_keep for n, g in structure.groups.items()}
    smallest = resource_size(structure, resource, removable) / getattr(baseline, resource)
    if smallest > fraction:
        raise ValueError(
            f"target {resource}={fraction:g} is unreachable: removing every removable channel "
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
) -> dict[str, list[int]]:
    """The plan that brings ``resource`` to at most ``fraction`` of ``baseline``.

    With ``max_channels``, at most that many of the lowest-ranked channels are taken (one
    progressive step toward the target). Raises ``ValueError`` if the target cannot be
    reached within the groups' minimums.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {RESOURCES}, got {resource!r}")
    checked = _check_scores(structure, scores)
    baseline = baseline or baseline_of(structure)
    limit = fraction * getattr(baseline, resource)

    def size(removed: Mapping[str, int]) -> int:
        return resource_size(structure, resource, removed)

    if size({}) <= limit:
        return {}
    check_reachable(structure, resource, fraction, baseline)
    unit = structure.channel_costs()
    power = {"none": 0.0, "cost": 1.0, "sqrt": 0.5}[normalize]
    keys, values = [], []
    for gi, (name, s) in enumerate(checked.items()):
        cost = 1.0 if resource == "channels" else float(unit[name][0 if resource == "flops" else 1])
        norm = s / max(cost, 1e-12) ** power
        for idx in range(s.numel()):
            keys.append((gi, idx, name))
        values.append(norm)
    order = torch.argsort(torch.cat(values), stable=True).tolist()
    room = {n: g.size - g.min_keep for n, g in structure.groups.items()}
    admissible: list[tuple[str, int]] = []
    for k in order:
        _, idx, name = keys[k]
        if room[name] > 0:
            room[name] -= 1
            admissible.append((name, idx))

    def counts(n: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, _ in admissible[:n]:
            out[name] = out.get(name, 0) + 1
        return out

    lo, hi = 0, len(admissible)  # size(counts(hi)) <= limit < size(counts(lo))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(counts(mid)) <= limit:
            hi = mid
        else:
            lo = mid
    if max_channels is not None:
        hi = min(hi, max_channels)
    plan: dict[str, list[int]] = {}
    for name, idx in admissible[:hi]:
        plan.setdefault(name, []).append(idx)
    return {n: sorted(v) for n, v in plan.items()}
