"""The batched influence estimator (spec §2–§4): options, exact products, scores.

Works on any ``nn.Module`` with a :class:`~lightning_ifprune.structure.ChannelStructure` and a
loss closure ``loss(model, batch)``; nothing here needs Lightning.
"""

from lightning_ifprune.estimator.hessian import (
    BatchHessian,
    apply_inverse,
    estimation_mode,
    mask_params,
    scalar_loss,
)
from lightning_ifprune.estimator.options import INVERSES, PROBES, SCORES, EstimatorOptions
from lightning_ifprune.estimator.scoring import EstimateResult, compute_dtype, estimate

__all__ = [
    "INVERSES",
    "PROBES",
    "SCORES",
    "BatchHessian",
    "EstimateResult",
    "EstimatorOptions",
    "apply_inverse",
    "compute_dtype",
    "estimate",
    "estimation_mode",
    "mask_params",
    "scalar_loss",
]
