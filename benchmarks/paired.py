"""Seed statistics shared by the benchmarks: mean, std and a 95 % t confidence half-width."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, std (ddof 1) and the 95 % t half-width of the mean (nan for fewer than two values)."""
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), math.nan, math.nan
    sd = float(a.std(ddof=1))
    return float(a.mean()), sd, float(stats.t.ppf(0.975, len(a) - 1) * sd / math.sqrt(len(a)))


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of the paired differences ``a - b`` and its 95 % t half-width."""
    mean, _, half = mean_ci(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))
    return mean, half
