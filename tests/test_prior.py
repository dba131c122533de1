from __future__ import annotations

import math

import numpy as np
import pytest

from depthpipe.prior import mean_log_depth, prior_depth


def test_mean_log_depth__geometric_mean_of_valid_pixels_per_position() -> None:
    depth = np.zeros((3, 2, 2), dtype=np.float32)
    mask = np.zeros((3, 2, 2), dtype=bool)
    depth[0, 0, 0], depth[1, 0, 0] = 2.0, 8.0  # geometric mean 4 m
    mask[0, 0, 0] = mask[1, 0, 0] = True
    depth[2, 0, 0], mask[2, 0, 0] = 1000.0, True  # beyond max_depth: not a valid pixel
    depth[0, 0, 1], mask[0, 0, 1] = 50.0, False  # no sensor return: ignored
    depth[:, 1, 1], mask[:, 1, 1] = 16.0, True
    prior = mean_log_depth(depth, mask, min_depth=0.6, max_depth=350.0)
    assert prior.dtype == np.float32 and prior.shape == (2, 2)
    assert math.exp(prior[0, 0]) == pytest.approx(4.0)
    assert math.exp(prior[1, 1]) == pytest.approx(16.0)
    # positions never valid fall back to the mean over all valid pixels: 2, 8 and 3 x 16 m
    overall = math.exp((math.log(2) + math.log(8) + 3 * math.log(16)) / 5)
    assert math.exp(prior[0, 1]) == pytest.approx(overall)
    assert math.exp(prior[1, 0]) == pytest.approx(overall)


def test_mean_log_depth__chunked_equals_whole() -> None:
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 400, size=(150, 4, 5)).astype(np.float32)  # more than one chunk
    mask = rng.random((150, 4, 5)) > 0.3
    valid = mask & (depth >= 0.6) & (depth <= 350)
    expected = np.log(np.where(valid, depth, 1.0)).sum(axis=0) / valid.sum(axis=0)
    np.testing.assert_allclose(mean_log_depth(depth, mask, 0.6, 350), expected, rtol=1e-5)


def test_mean_log_depth__no_valid_pixel_is_an_error() -> None:
    with pytest.raises(ValueError, match="no valid depth pixel"):
        mean_log_depth(np.zeros((2, 3, 3)), np.zeros((2, 3, 3), dtype=bool), 0.6, 350)


def test_prior_depth__resized_in_log_space() -> None:
    log_prior = np.log(np.array([[2.0, 2.0], [32.0, 32.0]], dtype=np.float32))
    depth = prior_depth(log_prior, (4, 6))
    assert depth.shape == (4, 6) and depth.dtype == np.float32
    assert depth[0, 0] == pytest.approx(2.0) and depth[-1, -1] == pytest.approx(32.0)
    # between the rows the log is interpolated: geometric, not arithmetic, mean
    middle = prior_depth(log_prior, (2, 2))
    np.testing.assert_allclose(middle, [[2, 2], [32, 32]], rtol=1e-6)
    assert prior_depth(log_prior, (3, 2))[1, 0] == pytest.approx(8.0, rel=1e-5)
