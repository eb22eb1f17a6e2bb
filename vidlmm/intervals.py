"""95 % bootstrap intervals for accuracies on a question set, and for the difference between two models.

Questions about the same video are not independent (the held-out set asks two per clip, benchmarks ask up to a
dozen), so the bootstrap resamples *videos* with their questions (a cluster bootstrap), not single questions: the
interval is as wide as the number of videos warrants. Percentile intervals; the resampling is seeded, so the same
records always give the same interval.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 4000
LEVEL = 0.95


def _cluster_sums(values, clusters) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums of each value column and the questions in each cluster: ([C, K], [C])."""
    values = np.asarray(values, dtype=np.float64)
    values = values[:, None] if values.ndim == 1 else values
    if clusters is None:
        return values, np.ones(len(values))
    _, index = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    sums = np.zeros((index.max() + 1, values.shape[1]))
    np.add.at(sums, index, values)
    return sums, np.bincount(index).astype(np.float64)


def _resampled_means(sums: np.ndarray, counts: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """[resamples, K]: the mean of each column over a resample of the clusters (with replacement)."""
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, sums.shape[1]))
    step = max(1, 2_000_000 // max(len(counts), 1))  # bounded memory: ~16 MB of indices at a time
    for start in range(0, resamples, step):
        pick = rng.integers(0, len(counts), size=(min(step, resamples - start), len(counts)))
        out[start:start + len(pick)] = sums[pick].sum(1) / counts[pick].sum(1)[:, None]
    return out


def bootstrap_interval(correct, clusters=None, *, resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile bootstrap interval of the mean of ``correct`` (0/1 or any numbers), resampling
    the ``clusters`` (one label per value, e.g. its video) with their values; None: each value is its own."""
    if len(correct) == 0:
        return float("nan"), float("nan")
    sums, counts = _cluster_sums(correct, clusters)
    means = _resampled_means(sums, counts, resamples, seed)[:, 0]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference(a, b, clusters=None, *, resamples: int = RESAMPLES, level: float = LEVEL,
                      seed: int = 0) -> dict:
    """mean(a) - mean(b) for two models scored on the same questions (``a[i]``, ``b[i]``: question i), with the
    bootstrap interval of the difference (the same resampled videos for both) and the share of resamples in which
    the difference is at or below zero (``p_not_above``: small when a is reliably better)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("paired_difference needs both models scored on the same questions")
    if len(a) == 0:
        return {"difference": float("nan"), "interval": [float("nan")] * 2, "p_not_above": float("nan"), "n": 0}
    sums, counts = _cluster_sums(np.stack([a, b], 1), clusters)
    means = _resampled_means(sums, counts, resamples, seed)
    diffs = means[:, 0] - means[:, 1]
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return {"difference": float(a.mean() - b.mean()), "interval": [float(lo), float(hi)],
            "p_not_above": float(np.mean(diffs <= 0)), "n": int(len(a))}


def ratio_interval(num, den, clusters=None, *, resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = 0) -> tuple[float, float]:
    """The bootstrap interval of mean(num) / mean(den) on the same questions (e.g. accuracy with zeroed tokens
    relative to the full model's), both means taken over the same resampled videos."""
    if len(num) == 0:
        return float("nan"), float("nan")
    sums, counts = _cluster_sums(np.stack([np.asarray(num, float), np.asarray(den, float)], 1), clusters)
    means = _resampled_means(sums, counts, resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = means[:, 0] / means[:, 1]
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def format_interval(value: float, interval, digits: int = 1) -> str:
    """``"53.5 [49.1, 57.9]"`` in percent."""
    lo, hi = interval
    return f"{100 * value:.{digits}f} [{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]"


def format_accuracy(stats: dict | None, digits: int = 1) -> str:
    """A table cell for ``{"accuracy": a, "interval": [lo, hi] or None}``: the interval when there is one, else the
    percentage alone; ``"-"`` for no stats (a category a run did not ask)."""
    if stats is None:
        return "-"
    if stats.get("interval"):
        return format_interval(stats["accuracy"], stats["interval"], digits)
    return f"{100 * stats['accuracy']:.{digits}f}"


__all__ = ["bootstrap_interval", "format_accuracy", "format_interval", "paired_difference", "ratio_interval"]
