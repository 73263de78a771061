"""Intervals for the experiments' rates and means: Wilson score intervals and a cluster bootstrap.

numpy only (the normal quantile comes from the standard library).
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Callable

import numpy as np


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion p̂ = successes / n.

    With z the two-sided normal quantile of ``confidence``:
    centre = (p̂ + z²/2n) / (1 + z²/n), half-width = z / (1 + z²/n) · √(p̂(1 − p̂)/n + z²/4n²).
    Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at 0/n or n/n.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    shrink = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z / shrink * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def clustered_bootstrap(
    values, clusters, statistic: Callable[[np.ndarray], float] = np.mean, n_resamples: int = 2000,
    confidence: float = 0.95, seed: int = 0,
) -> tuple[float, float, float]:
    """(statistic(values), low, high): a percentile bootstrap that resamples whole clusters.

    Values in one cluster (one feature, one passage) are not independent, so each resample draws
    C clusters with replacement from the C distinct labels and pools all their values. Labels are
    taken in sorted order (``np.unique``) and every resample draws
    ``rng.integers(0, C, size=(n_resamples, C))`` from ``np.random.default_rng(seed)``: with one
    value per cluster, labelled in the values' order, this is exactly the ordinary bootstrap.
    """
    values = np.asarray(values, dtype=float)
    labels = np.asarray(clusters)
    if values.ndim != 1 or labels.shape != values.shape or len(values) == 0:
        raise ValueError(f"need non-empty 1-d values and clusters of one length, got {values.shape} and {labels.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    _, which = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(which == c) for c in range(which.max() + 1)]
    draws = np.random.default_rng(seed).integers(0, len(members), size=(n_resamples, len(members)))
    stats = np.array([statistic(values[np.concatenate([members[c] for c in draw])]) for draw in draws])
    low, high = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(statistic(values)), float(low), float(high)
