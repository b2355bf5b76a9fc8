"""Paired statistics of two candidates scored on the same cases: the Wilcoxon signed-rank test, Holm's
correction over several tests, and a bootstrap confidence interval of the mean difference.

Used by the comparison of runs (:mod:`segpipe.evaluation.compare`) and by the choice of
post-processing (:mod:`segpipe.evaluation.postprocessing`). Pure NumPy and SciPy: no files, no models.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from segpipe.errors import Received, expected

__all__ = ["bootstrap_mean_ci", "holm", "paired_test"]


def paired_test(reference: Sequence[float], other: Sequence[float], *, lower_is_better: bool = False) -> dict[str, Any]:
    """Wilcoxon signed-rank test of ``other`` against ``reference`` (paired, two-sided).

    Returns ``n`` (pairs), ``wins`` / ``losses`` / ``ties`` (cases where ``other`` is better /
    worse / equal), ``statistic`` and ``p`` (1.0 when every difference is zero).

    >>> paired_test([0.5] * 6, [0.6, 0.7, 0.8, 0.9, 1.0, 1.1])["p"]
    0.03125
    """
    from scipy import stats

    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(expected(f"paired samples: a shape equal to reference's {a.shape}", key="other",
                                  received=Received(str(b.shape))))
    diff = b - a
    better = diff < 0 if lower_is_better else diff > 0
    worse = diff > 0 if lower_is_better else diff < 0
    result = {"n": int(a.size), "wins": int(better.sum()), "losses": int(worse.sum()), "ties": int((diff == 0).sum())}
    if not np.any(diff != 0):
        return {**result, "statistic": 0.0, "p": 1.0}
    test = stats.wilcoxon(b, a, zero_method="wilcox", alternative="two-sided")
    return {**result, "statistic": float(test.statistic), "p": float(test.pvalue)}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order.

    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return [round(float(v), 12) for v in out]


def bootstrap_mean_ci(differences: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 9999,
                      seed: int = 0) -> dict[str, Any]:
    """Bootstrap confidence interval of the mean of paired differences (``scipy.stats.bootstrap``).

    BCa (scipy's default) with a fixed seed, so the report is reproducible; the percentile method
    where BCa is undefined (few distinct values). All differences equal: the interval is that value.

    Parameters
    ----------
    differences : sequence of float
        Per-case differences.
    confidence : float, optional
        Confidence level in (0, 1). Defaults to 0.95.
    n_resamples : int, optional
        Bootstrap resamples. Defaults to 9999.
    seed : int, optional
        Seed of the resampling. Defaults to 0.

    Returns
    -------
    dict
        ``low``, ``high``, ``confidence``, ``method`` (``"BCa"``, ``"percentile"``, ``"constant"``
        or ``"none"`` with fewer than 2 cases, then NaN bounds), ``n_resamples``, ``seed``.

    Examples
    --------
    >>> bootstrap_mean_ci([0.1, 0.1, 0.1])["low"]
    0.1
    """
    import warnings

    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    out = {"confidence": float(confidence), "n_resamples": int(n_resamples), "seed": int(seed)}
    if d.size < 2:
        return {"low": math.nan, "high": math.nan, "method": "none", **out}
    if np.all(d == d[0]):
        return {"low": float(d[0]), "high": float(d[0]), "method": "constant", **out}
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa's degenerate-distribution warning: we fall back instead
            ci = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                                 method=method, rng=np.random.default_rng(seed)).confidence_interval
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            return {"low": float(ci.low), "high": float(ci.high), "method": method, **out}
    return {"low": math.nan, "high": math.nan, "method": "none", **out}
