from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from depthpipe.metrics import (
    aligned_metrics,
    average_metrics,
    depth_and_aligned_metrics,
    depth_metrics,
)


def test_depth_metrics__hand_computed_with_masked_pixel() -> None:
    gt = np.array([[1.0, 2.0], [4.0, 100.0]])
    pred = np.array([[2.0, 2.0], [2.0, -5.0]])  # the last pixel is masked out: never counted
    valid = np.array([[True, True], [True, False]])
    m = depth_metrics(pred, gt, valid, min_depth=0.5, max_depth=10.0)
    # pixels: (p, d) = (2, 1), (2, 2), (2, 4)
    assert m["abs_rel"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["sq_rel"] == pytest.approx((1 / 1 + 0 + 4 / 4) / 3)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 0 + 4) / 3))
    g = [math.log(2), 0.0, -math.log(2)]
    assert m["rmse_log"] == pytest.approx(math.sqrt(sum(x * x for x in g) / 3))
    assert m["log10"] == pytest.approx((math.log10(2) + 0 + math.log10(2)) / 3)
    mean_g = sum(g) / 3
    assert m["silog"] == pytest.approx(100 * math.sqrt(sum(x * x for x in g) / 3 - mean_g**2))
    # ratios max(p/d, d/p) = 2, 1, 2: only the middle one is below 1.25 and 1.5625; all < 1.953
    assert m["delta1"] == pytest.approx(1 / 3)
    assert m["delta2"] == pytest.approx(1 / 3)
    assert m["delta3"] == pytest.approx(1 / 3)  # 2 > 1.25**3 = 1.953


def test_depth_metrics__clips_and_survives_nan_inf() -> None:
    gt = torch.tensor([1.0, 1.0, 1.0, 1.0])
    pred = torch.tensor([float("nan"), float("inf"), 0.0, 1.0])
    valid = torch.ones(4, dtype=torch.bool)
    m = depth_metrics(pred, gt, valid, min_depth=0.5, max_depth=2.0)
    # nan -> 0.5, inf -> 2.0, 0 -> 0.5 (clipped), 1 -> 1
    assert m["abs_rel"] == pytest.approx((0.5 + 1.0 + 0.5 + 0.0) / 4)
    assert all(math.isfinite(v) for v in m.values())


def test_depth_metrics__no_valid_pixel_raises() -> None:
    with pytest.raises(ValueError, match="no valid pixel"):
        depth_metrics(np.ones((2, 2)), np.ones((2, 2)), np.zeros((2, 2), dtype=bool))


def test_average_metrics__per_image_not_per_pixel() -> None:
    small = depth_metrics(np.array([2.0]), np.array([1.0]), np.array([True]))  # abs_rel 1
    big = depth_metrics(np.ones(100), np.ones(100), np.ones(100, dtype=bool))  # abs_rel 0
    assert average_metrics([small, big])["abs_rel"] == pytest.approx(0.5)  # not 1/101


def test_aligned_metrics__a_pure_scale_error_vanishes() -> None:
    gt = np.linspace(2.0, 80.0, 200).reshape(10, 20)
    valid = np.ones_like(gt, dtype=bool)
    twice = 2.0 * gt
    assert depth_metrics(twice, gt, valid)["abs_rel"] == pytest.approx(1.0)
    aligned = aligned_metrics(twice, gt, valid)
    assert aligned["abs_rel_aligned"] == pytest.approx(0.0, abs=1e-12)
    assert aligned["delta1_aligned"] == pytest.approx(1.0)


def test_aligned_metrics__a_structure_error_stays() -> None:
    """A flat prediction (one depth everywhere) at the median scale still misses the layout."""
    gt = np.array([[1.0, 2.0, 4.0, 8.0, 16.0]])
    valid = np.ones_like(gt, dtype=bool)
    aligned = aligned_metrics(np.full_like(gt, 100.0), gt, valid)
    # scaled to the median 4 m: |4 - d| / d = 3, 1, 0, 0.5, 0.75
    assert aligned["abs_rel_aligned"] == pytest.approx((3 + 1 + 0 + 0.5 + 0.75) / 5)
    assert aligned["delta1_aligned"] == pytest.approx(1 / 5)


def test_aligned_metrics__only_valid_pixels_set_the_scale() -> None:
    gt = np.array([[10.0, 10.0, 0.0]])
    pred = np.array([[5.0, 5.0, 1000.0]])
    valid = np.array([[True, True, False]])
    aligned = aligned_metrics(pred, gt, valid)
    assert aligned["abs_rel_aligned"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no valid pixel"):
        aligned_metrics(pred, gt, np.zeros_like(valid))


def test_aligned_metrics__broken_predictions_score_badly_never_nan() -> None:
    """NaN and inf are sanitised to the range's edges before the scale is taken, as for the
    metric figures: the scores are finite."""
    gt = np.full((4, 4), 10.0)
    pred = np.full((4, 4), 10.0)
    pred[0, :2] = np.nan
    pred[1, :2] = np.inf
    aligned = aligned_metrics(pred, gt, np.ones_like(gt, dtype=bool))
    assert all(math.isfinite(v) for v in aligned.values())
    assert aligned["delta1_aligned"] == pytest.approx(12 / 16)  # the 4 broken pixels miss


def test_average_metrics__refuses_images_with_different_metrics() -> None:
    with pytest.raises(ValueError, match="different metrics"):
        average_metrics([{"abs_rel": 0.1}, {"abs_rel": 0.2, "abs_rel_aligned": 0.1}])


def test_depth_and_aligned_metrics__both_sets_from_one_pass() -> None:
    gt = np.linspace(2.0, 80.0, 200).reshape(10, 20)
    pred = 1.7 * gt + np.sin(gt)
    valid = gt < 60.0
    both = depth_and_aligned_metrics(pred, gt, valid)
    assert both == {**depth_metrics(pred, gt, valid), **aligned_metrics(pred, gt, valid)}
