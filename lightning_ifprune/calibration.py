"""Measured latency of a pruned copy: the check that calibrates the latency model (spec §11).

The layer-sum model (:class:`~lightning_ifprune.latency.LatencyModel`) is exact for the model
it was built on; how the time no layer explains shrinks with the widths depends on the
network and on which layers lose channels. A plan is therefore checked by real surgery on a
deep copy, timed alternately with the original (medians, so that a busy machine's drift
cancels in the ratio), and the measurement refits the model
(:meth:`~lightning_ifprune.latency.LatencyModel.calibrated`) where the plan lies.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping

import torch

from lightning_ifprune import latency as _latency
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
