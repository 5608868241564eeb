"""Whole-model latency of pruned copies, and a latency model calibrated to it (spec §11).

The layer-sum model (:class:`~lightning_ifprune.latency.LatencyModel`) is exact for the model
it was built on, but how the time no layer explains shrinks with the widths differs per
network: on CPU, pruned ResNet-56s measured up to 27 % slower than predicted and pruned
MobileNetV2s up to 26 % faster. Measuring a pruned copy (real surgery on a deep copy, timed
alternately with the original so that a busy machine's drift cancels) and fitting the model to
it puts the prediction on a measurement near where the target lies.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping, Sequence

import torch

from lightning_ifprune import latency as _latency
from lightning_ifprune.latency import LatencyModel
from lightning_ifprune.selection import rounded
from lightning_ifprune.structure import ChannelStructure
from lightning_ifprune.structure.tracing import restore_modes
from lightning_ifprune.surgery import prune_channels


def measured_latency_kept(structure: ChannelStructure, plan: Mapping[str, list[int]], batch_size: int) -> float:
    """Measured latency of ``structure``'s model with ``plan`` removed (on a copy), as a fraction of
    the model's: eval mode, a random batch of ``batch_size``, dense and pruned timed alternately
    three times (:func:`~lightning_ifprune.latency.timer_measure`), medians."""
    model, like = structure.model, structure.example_inputs
    pruned = copy.deepcopy(model)
    prune_channels(ChannelStructure.build(pruned, like), plan)
    x = torch.randn(batch_size, *like.shape[1:], device=like.device, dtype=like.dtype)
    with restore_modes(model):
        model.eval()
        pruned.eval()
        pairs = [(_latency.timer_measure(model, x), _latency.timer_measure(pruned, x)) for _ in range(3)]
    dense, thin = (statistics.median(p) for p in zip(*pairs, strict=True))
    return thin / dense


def uniform_plan(structure: ChannelStructure, latency: LatencyModel, fraction: float) -> dict[str, list[int]]:
    """Every group thinned by the same share of its removable channels (kept widths at multiples
    of the model's channel block), the share chosen so that the predicted latency is about
    ``fraction`` of the model's (as close as the widths allow). Which channels go does not
    change the latency: each group loses its last ones."""
    if isinstance(fraction, bool) or not 0 < float(fraction) < 1:
        raise ValueError(f"a calibration fraction must lie in (0, 1), got {fraction!r}")
    block = latency.block if latency.block > 1 else None
    full = latency.predict(structure)

    def removed(share: float) -> dict[str, int]:
        wanted = {n: int(share * (g.size - g.min_keep)) for n, g in structure.groups.items()}
        return rounded(structure, wanted, block)

    lo, hi = 0.0, 1.0  # predicted(removed(lo)) > fraction·full >= predicted(removed(hi)), if reachable
    for _ in range(30):
        mid = (lo + hi) / 2
        if latency.predict(structure, removed(mid)) > fraction * full:
            lo = mid
        else:
            hi = mid
    return {n: list(range(structure.groups[n].size - k, structure.groups[n].size)) for n, k in removed(hi).items()}


def calibrate(structure: ChannelStructure, latency: LatencyModel, fractions: Sequence[float] = (0.5,)) -> LatencyModel:
    """``latency`` fitted to measured copies of ``structure``'s model thinned uniformly to each of
    ``fractions`` of its predicted latency (:func:`uniform_plan`, :func:`measured_latency_kept`,
    :meth:`LatencyModel.calibrated`); the model itself is not changed. Fractions no uniform
    thinning reaches (a plan that removes nothing) are skipped."""
    points = []
    for fraction in fractions:
        plan = uniform_plan(structure, latency, fraction)
        if plan:
            kept = measured_latency_kept(structure, plan, latency.batch_size)
            points.append(({n: len(v) for n, v in plan.items()}, kept * latency.measured_ms))
    return latency.calibrated(structure, points)
