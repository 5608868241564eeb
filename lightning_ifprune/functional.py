"""The functional API: score, select and remove in one call, without Lightning.

``scores = score_channels(model, batches, loss_fn=F.cross_entropy)`` then
``prune_to_target(model, scores, flops=0.5)`` (or ``latency=0.5``: a measured latency
target, see README "Latency"); see README "Functional API".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_ifprune.calibration import measured_latency_kept
from lightning_ifprune.latency import LatencyModel
from lightning_ifprune.selection import Baseline, RoundTo, check_round_to, parse_target, select_channels
from lightning_ifprune.structure import ChannelStructure, validate_example_inputs
from lightning_ifprune.surgery import prune_channels


@dataclass
class PruneReport:
    """What one call of :func:`prune_to_target` did."""

    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    channels_before: dict[str, int]
    channels_after: dict[str, int]
    plan: dict[str, list[int]]
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    #: With ``latency_checks``: the pruned net's measured latency as a fraction of the model's before.
    latency_measured_kept: float | None = None


def prune_to_target(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    flops: float | None = None,
    params: float | None = None,
    channels: float | None = None,
    normalize: str = "sqrt",
    *,
    example_inputs: torch.Tensor | None = None,
    ignored_layers: Iterable[str | nn.Module] = (),
    min_channels: int | float = 1,
    baseline: Baseline | None = None,
    latency: float | None = None,
    latency_batch_size: int = 64,
    latency_model: LatencyModel | None = None,
    latency_cache_dir: str | Path | None = None,
    round_to: RoundTo = "auto",
    latency_checks: int = 0,
) -> PruneReport:
    """Prune ``model`` in place to at most the given fraction of its FLOPs, params, channels
    or measured latency.

    ``scores`` maps group names to per-channel scores (lower = prune first), e.g. from
    :func:`lightning_ifprune.score_channels`, whose result also carries the example inputs.
    Fractions refer to ``baseline`` (default: the model as it is now). ``latency=`` uses
    ``latency_model``, or builds one (:meth:`LatencyModel.build`: batches of
    ``latency_batch_size`` on the model's device, cached in ``latency_cache_dir``); the
    report then carries the predicted latency before and after. ``round_to`` leaves every
    pruned group at a multiple of it; ``"auto"`` (default) is the device's channel block for a
    latency target (16 on an AVX-512 CPU, 8 with AVX2 or on CUDA) and no rounding otherwise.
    With ``latency_checks`` > 0 (a latency target, ``baseline`` unset), the plan is tried on a copy
    and the copy's latency measured against the model's (alternately, medians of three): while
    it measures above the target, the model is refitted with that measurement (and the target
    tightened by the shortfall if the refit keeps the same plan) and the plan chosen again, up
    to ``latency_checks`` times; the report carries the last measurement and the predictions of
    the last model.
    Nothing changes if the target is unreachable or the scores are malformed.
    """
    resource, fraction = parse_target(flops, params, channels, latency)
    check_round_to(round_to)
    if example_inputs is None:
        example_inputs = getattr(scores, "example_inputs", None)
    if example_inputs is None:
        raise ValueError("prune_to_target needs example_inputs= (or scores from score_channels)")
    structure = ChannelStructure.build(
        model,
        validate_example_inputs(example_inputs),
        ignored_layers=ignored_layers,
        min_channels=min_channels,
    )
    if resource == "latency" and latency_model is None:
        latency_model = LatencyModel.build(structure, latency_batch_size, cache_dir=latency_cache_dir)
    if isinstance(latency_checks, bool) or not isinstance(latency_checks, int) or latency_checks < 0:
        raise ValueError(f"latency_checks must be a non-negative int, got {latency_checks!r}")
    if latency_checks and (resource != "latency" or baseline is not None):
        raise ValueError("latency_checks needs a latency= target relative to the model as it is (no baseline=)")
    plan = select_channels(
        structure, scores, resource, fraction, normalize, baseline, latency=latency_model, round_to=round_to
    )
    measured, goal = None, fraction
    for _ in range(latency_checks):
        measured = measured_latency_kept(structure, plan, latency_model.batch_size)
        if measured <= fraction:
            break
        point = ({n: len(v) for n, v in plan.items()}, measured * latency_model.measured_ms)
        latency_model = latency_model.calibrated(structure, [point])
        try:
            again = select_channels(
                structure, scores, resource, goal, normalize, latency=latency_model, round_to=round_to
            )
            if again == plan:  # the refit still accepts this plan (noise): ask for the shortfall too
                goal *= fraction / measured
                again = select_channels(
                    structure, scores, resource, goal, normalize, latency=latency_model, round_to=round_to
                )
        except ValueError:  # the tighter goal is out of reach: keep the last plan
            break
        plan, measured = again, None
    if latency_checks and measured is None:
        measured = measured_latency_kept(structure, plan, latency_model.batch_size)
    flops_before, params_before = structure.cost()
    before = structure.widths()
    result = prune_channels(structure, plan)
    flops_after, params_after = structure.cost(result.removed)
    after = {n: w - result.removed.get(n, 0) for n, w in before.items()}
    ms = (None, None)
    if latency_model is not None:
        ms = (latency_model.predict(structure), latency_model.predict(structure, result.removed))
    return PruneReport(
        flops_before, flops_after, params_before, params_after, before, after, result.plan, *ms, measured
    )
