"""Bootstrap confidence intervals.

Resampling units are the independent units of each task: windows for perplexity and KLD
(tokens inside a window are correlated), items for multiple choice, prompts for generation.
Every interval is a seeded percentile bootstrap, so the same inputs give the same interval.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 1234


def bootstrap_ci(
    values: np.ndarray,
    stat: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    weights: np.ndarray | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    alpha: float = 0.05,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """Percentile CI of ``stat`` over units (rows of ``values``).

    ``stat`` maps an index matrix's gathered values ``(n_resamples, n)`` to ``(n_resamples,)``;
    default is the mean.  With ``weights`` the statistic is the weighted mean
    ``Σ v·w / Σ w`` (ratio estimator, e.g. mean token NLL over windows of different lengths).
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    if n == 1:
        v = float(values[0] if weights is None else values[0] / weights[0])
        return v, v
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        stats = values[idx].sum(1) / w[idx].sum(1)
    elif stat is None:
        stats = values[idx].mean(1)
    else:
        stats = stat(values[idx])
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def mean_ci(values, **kw) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high)."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(values, **kw)
    return float(values.mean()) if values.size else float("nan"), lo, hi
