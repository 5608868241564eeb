"""Influence-function second-order channel pruning (IFSO) for PyTorch Lightning.

The package reads like the paper: channel structure → estimator/criteria → selection →
surgery → callback → app. Everything before the callback works on any ``nn.Module``.
"""

from lightning_ifprune.callback import InfluencePruningCallback
from lightning_ifprune.checkpoint import (
    CHECKPOINT_KEY,
    CheckpointError,
    PrunableMixin,
    load_pruned_checkpoint,
    read_checkpoint,
)
from lightning_ifprune.criteria import (
    CRITERIA,
    BNScale,
    ChannelScores,
    Criterion,
    Fisher,
    Influence,
    LossDrop,
    Magnitude,
    Random,
    Taylor,
    score_channels,
)
from lightning_ifprune.estimator import EstimatorOptions, estimate
from lightning_ifprune.functional import PruneReport, prune_to_target
from lightning_ifprune.latency import LatencyModel
from lightning_ifprune.latency_env import fix_glibc_malloc
from lightning_ifprune.loss import LossClosure, supervised
from lightning_ifprune.optim import repoint_optimizer
from lightning_ifprune.selection import Baseline
from lightning_ifprune.structure import ChannelStructure, UnsupportedModelError, channel_masks
from lightning_ifprune.surgery import (
    PruningPlanError,
    SurgeryResult,
    prune_channels,
    replay_history,
)

__version__ = "0.1.0"

__all__ = [
    "CHECKPOINT_KEY",
    "CRITERIA",
    "BNScale",
    "Baseline",
    "ChannelScores",
    "ChannelStructure",
    "CheckpointError",
    "Criterion",
    "EstimatorOptions",
    "Fisher",
    "Influence",
    "InfluencePruningCallback",
    "LatencyModel",
    "LossClosure",
    "LossDrop",
    "Magnitude",
    "PrunableMixin",
    "PruneReport",
    "PruningPlanError",
    "Random",
    "SurgeryResult",
    "Taylor",
    "UnsupportedModelError",
    "channel_masks",
    "estimate",
    "fix_glibc_malloc",
    "load_pruned_checkpoint",
    "prune_channels",
    "prune_to_target",
    "read_checkpoint",
    "repoint_optimizer",
    "replay_history",
    "score_channels",
    "supervised",
]
