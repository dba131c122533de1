"""Paired, cluster-level bootstrap intervals for comparing two models on one test split.

Views of one scan overlap heavily, so they are not independent samples: resampling single images
would claim far more certainty than the data hold. The bootstrap below resamples whole clusters
(scans) with replacement, the same resample for both models (paired), and recomputes the relative
difference of their mean metric each time (Efron and Tibshirani 1993, ch. 13; the cluster form
as in Field and Welsh 2007).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float  # on the data as they are
    low: float  # CONFIDENCE percentile interval over the resamples
    high: float


def relative_gain(
    candidate: np.ndarray, baseline: np.ndarray, higher_is_better: bool
) -> np.ndarray:
    """(baseline - candidate) / baseline for errors, (candidate - baseline) / baseline for
    accuracies: positive = the candidate is better, whatever the metric's direction."""
    gain = candidate - baseline if higher_is_better else baseline - candidate
    return gain / np.maximum(np.abs(baseline), 1e-12)


def paired_cluster_bootstrap(
    candidate: Sequence[float],
    baseline: Sequence[float],
    clusters: Sequence[str],
    *,
    higher_is_better: bool,
    seed: int,
    resamples: int = RESAMPLES,
) -> Interval:
    """Interval of the relative gain of ``candidate`` over ``baseline`` (per-image values).

    Each resample draws as many clusters as there are, with replacement; an image counts once
    per draw of its cluster, so the means weigh images as the unresampled mean does.
    """
    cand, base = np.asarray(candidate, float), np.asarray(baseline, float)
    if not (len(cand) == len(base) == len(clusters)) or len(cand) == 0:
        raise ValueError("candidate, baseline and clusters need one value per image, and images")
    names, index = np.unique(np.asarray(clusters), return_inverse=True)
    sums = np.stack([np.bincount(index, weights=v, minlength=len(names)) for v in (cand, base)])
    counts = np.bincount(index, minlength=len(names)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(names), np.full(len(names), 1.0 / len(names)), size=resamples)
    images = draws @ counts  # (resamples,)
    means = (draws @ sums.T) / images[:, None]  # (resamples, 2): candidate, baseline
    gains = relative_gain(means[:, 0], means[:, 1], higher_is_better)
    tail = (1.0 - CONFIDENCE) / 2.0 * 100.0
    low, high = np.percentile(gains, [tail, 100.0 - tail])
    estimate = relative_gain(np.array(cand.mean()), np.array(base.mean()), higher_is_better)
    return Interval(float(estimate), float(low), float(high))
