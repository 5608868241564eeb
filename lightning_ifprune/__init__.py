"""Influence-function second-order channel pruning (IFSO) for PyTorch Lightning.

The package reads like the paper: channel structure → estimator → selection → surgery →
callback → app. The first four work on any ``nn.Module``.
"""

from lightning_ifprune.callback import InfluencePruningCallback
from lightning_ifprune.checkpoint import PrunableMixin, load_pruned_checkpoint
from lightning_ifprune.criteria import CRITERIA, ChannelScores, score_channels
from lightning_ifprune.estimator import EstimatorOptions, estimate
from lightning_ifprune.selection import Baseline, PruneReport, prune_to_target
from lightning_ifprune.structure import ChannelStructure, UnsupportedModelError, channel_masks
from lightning_ifprune.surgery import PruningPlanError, prune_channels, replay_history

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "Baseline",
    "ChannelScores",
    "ChannelStructure",
    "EstimatorOptions",
    "InfluencePruningCallback",
    "PrunableMixin",
    "PruneReport",
    "PruningPlanError",
    "UnsupportedModelError",
    "channel_masks",
    "estimate",
    "load_pruned_checkpoint",
    "prune_channels",
    "prune_to_target",
    "replay_history",
    "score_channels",
]
