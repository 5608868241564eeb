"""``EstimatorOptions``: how the influence estimator approximates the retrained loss change."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SCORES = ("paper", "retrained")
INVERSES = ("identity", "cg", "neumann")
PROBES = ("ones", "rademacher", "exact")

_CHOICES = {"score": SCORES, "inverse": INVERSES, "probes": PROBES}
_POSITIVE_INTS = ("num_probes", "probe_batch", "cg_iters", "neumann_terms", "micro_batches")
_NON_NEGATIVE = ("damping", "neumann_scale")


@dataclass(frozen=True)
class EstimatorOptions:
    """How the influence estimator approximates the retrained loss change.

    ``score``: ``paper`` (|H_mw H_ww⁻¹ H_wm p| accumulated over batches) or ``retrained``
    (−g_k + ½ (H_mm − H_mw H_ww⁻¹ H_wm)_kk). ``probes``: ``ones`` (the paper's direction, all
    channels at once), ``rademacher`` (``num_probes`` Hutchinson probes for diagonals) or
    ``exact`` (one probe per channel; small models), evaluated ``probe_batch`` at a time
    (directions batched with vmap; 1 is the fastest and leanest on CPU, where vmap loops the
    convolutions anyway). ``inverse``: ``identity`` (1/λ), ``cg`` (``cg_iters`` steps on
    H_ww + δI) or ``neumann`` (``neumann_terms`` terms). ``weight_decay`` is λ; ``None``
    means "the optimizer's" inside the callback and 0 elsewhere.
    ``micro_batches``: each batch is split into this many parts, of two samples at least.
    With 1 (the default) one double-backward graph serves every product (fastest, about 3.3×
    a training step's peak memory); with 2 each product re-runs the halves, for about 2.1× a
    training step's memory and 1.4× the time. Norm layers then see half-batch statistics.

    Defaults are the paper's estimator (paper score, all-ones direction, identity inverse,
    whole batches): chosen by ``benchmarks/compare.py`` as the cheapest influence
    configuration and the one least often significantly behind the best criterion on digits
    and Fashion-MNIST (once in four settings; README "Results"), although its single-channel
    and set fidelity are the lowest of the influence configurations. With the identity
    inverse the paper score is |H_mw H_wm 1| / λ, so its ranking does not depend on λ: when λ
    is unset or the optimizer has none, 1/λ is taken as 1.
    The ``retrained`` score does depend on λ and needs it.

    Every field is checked here, its type included; errors name the field.
    """

    score: str = "paper"
    inverse: str = "identity"
    probes: str = "ones"
    num_probes: int = 16
    probe_batch: int = 1
    weight_decay: float | None = None
    damping: float = 1e-2
    cg_iters: int = 10
    neumann_terms: int = 20
    neumann_scale: float = 0.05
    micro_batches: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"EstimatorOptions.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in (*_POSITIVE_INTS, "seed"):
            value = getattr(self, key)
            low = 0 if key == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"EstimatorOptions.{key} must be an integer ≥ {low}, got {value!r}")
        for key in (*_NON_NEGATIVE, "weight_decay"):
            value = getattr(self, key)
            if value is None and key == "weight_decay":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"EstimatorOptions.{key} must be a number ≥ 0, got {value!r}")
            object.__setattr__(self, key, float(value))
        if self.score == "retrained" and self.probes == "ones":
            raise ValueError(
                "EstimatorOptions: score='retrained' needs per-channel diagonals: use probes='rademacher' or 'exact'"
            )
        if self.needs_decay and self.weight_decay is not None and self.weight_decay <= 0:
            raise ValueError(
                "EstimatorOptions: score='retrained' with inverse='identity' uses 1/weight_decay: give weight_decay > 0"
            )

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> EstimatorOptions:
        """Options from a mapping; an unknown key is an error naming it and the valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown influence options {unknown}; valid: {sorted(known)}")
        return cls(**options)

    def with_weight_decay(self, weight_decay: float) -> EstimatorOptions:
        """These options with λ filled in when it was left to the optimizer (``None``)."""
        if self.weight_decay is not None:
            return self
        return dataclasses.replace(self, weight_decay=float(weight_decay))

    @property
    def decay(self) -> float:
        """λ as a number (0 when unset)."""
        return self.weight_decay or 0.0

    @property
    def needs_decay(self) -> bool:
        """Whether these options cannot score without λ > 0 (the identity inverse of the retrained score)."""
        return self.inverse == "identity" and self.score == "retrained"

    @property
    def identity_scale(self) -> float:
        """The identity inverse's 1/λ; 1 when λ is unset (the paper score's ranking is λ-free)."""
        return 1.0 / self.decay if self.decay > 0 else 1.0
