from __future__ import annotations

import numpy as np
import pytest

from depthpipe.stats import paired_cluster_bootstrap


def _scans(n_scans: int, per_scan: int) -> list[str]:
    return [f"scan_{s:03d}" for s in range(n_scans) for _ in range(per_scan)]


def test_bootstrap__recovers_a_known_difference() -> None:
    """The candidate's error is the baseline's minus 20% on average: scan-level spread on both,
    and per-image noise of the candidate's own (so the resamples differ)."""
    rng = np.random.default_rng(1)
    scan_level = np.repeat(rng.uniform(0.3, 0.9, size=20), 5)  # 20 scans, 5 views each
    baseline = scan_level + rng.normal(0, 0.02, size=100)
    candidate = 0.8 * baseline * (1 + rng.normal(0, 0.1, size=100))
    interval = paired_cluster_bootstrap(
        candidate, baseline, _scans(20, 5), higher_is_better=False, seed=0
    )
    assert interval.estimate == pytest.approx(0.2, abs=0.03)
    assert interval.low <= 0.2 <= interval.high
    assert 0.0 < interval.low < interval.high < 0.3  # separated from 0, and not a point
    assert interval.high - interval.low > 0.01


def test_bootstrap__zero_difference_covers_zero() -> None:
    rng = np.random.default_rng(2)
    baseline = np.repeat(rng.uniform(0.2, 0.4, size=12), 4)
    candidate = baseline + rng.normal(0, 0.05, size=48)  # noise, no effect
    interval = paired_cluster_bootstrap(
        candidate, baseline, _scans(12, 4), higher_is_better=True, seed=0
    )
    assert interval.low < 0 < interval.high


def test_bootstrap__deterministic_for_a_seed_and_varies_with_it() -> None:
    rng = np.random.default_rng(3)
    baseline = rng.uniform(0.1, 1.0, size=30)
    candidate = baseline * rng.uniform(0.7, 1.2, size=30)
    args = (candidate, baseline, _scans(10, 3))
    first = paired_cluster_bootstrap(*args, higher_is_better=False, seed=7)
    assert paired_cluster_bootstrap(*args, higher_is_better=False, seed=7) == first
    assert paired_cluster_bootstrap(*args, higher_is_better=False, seed=8) != first


def test_bootstrap__scans_not_images_set_the_width() -> None:
    """Copying every image ten times within its scan adds no information: same interval. An
    image-level bootstrap would shrink it by about sqrt(10)."""
    rng = np.random.default_rng(4)
    baseline = rng.uniform(0.2, 0.8, size=8)
    candidate = baseline * rng.uniform(0.6, 1.3, size=8)
    once = paired_cluster_bootstrap(
        candidate, baseline, _scans(8, 1), higher_is_better=False, seed=0
    )
    tenfold = paired_cluster_bootstrap(
        np.repeat(candidate, 10),
        np.repeat(baseline, 10),
        _scans(8, 10),
        higher_is_better=False,
        seed=0,
    )
    assert tenfold.low == pytest.approx(once.low) and tenfold.high == pytest.approx(once.high)


def test_bootstrap__mismatched_lengths_refused() -> None:
    with pytest.raises(ValueError, match="one value per image"):
        paired_cluster_bootstrap([0.1, 0.2], [0.1], ["a", "b"], higher_is_better=False, seed=0)
