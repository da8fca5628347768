"""Intervals and frontiers for comparisons: paired bootstrap over items, and Pareto extraction.

Every model in a comparison is scored on the same items (the same ID problems, the same probe prompts), so a
difference between two models is estimated item by item: resampling *items* (the same resampled indices for
both models) keeps the between-item variance, which is shared, out of the interval. ``scipy.stats.bootstrap``
with ``paired=True`` does exactly that; the percentile interval is used because it is defined for degenerate
data too (two identical models give the zero-width interval [0, 0], where BCa is undefined).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95


def _interval(data: tuple[np.ndarray, ...], statistic, seed: int, n_resamples: int,
              confidence: float) -> tuple[float, float]:
    from scipy.stats import bootstrap

    if len(data[0]) < 2:
        est = float(statistic(*data, axis=-1))
        return est, est
    if all(np.all(d == d[0]) for d in data):  # constant data: every resample gives the estimate itself
        est = float(statistic(*data, axis=-1))
        return est, est
    import inspect

    gen = np.random.default_rng(seed)  # scipy >= 1.15 names the generator `rng`, older ones `random_state`
    seeded = {"rng": gen} if "rng" in inspect.signature(bootstrap).parameters else {"random_state": gen}
    res = bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                    confidence_level=confidence, method="percentile", **seeded)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_delta(a: Sequence[float], b: Sequence[float], weights: Sequence[float] | None = None, seed: int = 0,
                 n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> dict:
    """Mean(a) − mean(b) over the same items, with its paired bootstrap interval.

    ``weights`` (e.g. answer tokens per probe prompt) make both means weighted: Σ w·a / Σ w − Σ w·b / Σ w, the
    per-token average the probe reports; items are still what is resampled. Returns
    ``{"delta", "lo", "hi", "n"}``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_delta needs two 1-D arrays over the same items, got shapes {a.shape}, {b.shape}")
    if a.size == 0:
        raise ValueError("paired_delta: no items")
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != a.shape:
        raise ValueError(f"weights shape {w.shape} != items {a.shape}")

    def stat(d, ww, axis=-1):
        return (d * ww).sum(axis=axis) / ww.sum(axis=axis)

    d = a - b
    est = float(stat(d, w))
    lo, hi = _interval((d, w), stat, seed, n_resamples, confidence)
    return {"delta": est, "lo": lo, "hi": hi, "n": int(a.size)}


def mean_interval(a: Sequence[float], weights: Sequence[float] | None = None, seed: int = 0,
                  n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> dict:
    """(Weighted) mean of one per-item quantity with its bootstrap interval: ``{"delta", "lo", "hi", "n"}``
    (named like :func:`paired_delta`: a quantity that is already a difference against the base, e.g. KL)."""
    a = np.asarray(a, dtype=np.float64)
    return paired_delta(a, np.zeros_like(a), weights, seed, n_resamples, confidence)


def normal_interval(p: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wald interval p ± z·√(p(1−p)/n) of a Bernoulli mean (the large-sample reference)."""
    from scipy.stats import norm

    z = norm.ppf(0.5 + confidence / 2)
    h = z * (p * (1 - p) / n) ** 0.5
    return p - h, p + h


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-optimal points when x is to be maximised (ID gain) and y minimised (forgetting).

    A point is dominated when another has x' ≥ x and y' ≤ y with at least one strict; duplicates of an optimal
    point are all optimal. Returned in order of increasing x."""
    pts = [(float(x), float(y)) for x, y in points]
    keep = []
    for i, (x, y) in enumerate(pts):
        if any(np.isnan(v) for v in (x, y)):
            continue
        dominated = any((x2 >= x and y2 <= y) and (x2 > x or y2 < y)
                        for j, (x2, y2) in enumerate(pts) if j != i and not np.isnan(x2) and not np.isnan(y2))
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (pts[i][0], pts[i][1]))
