from __future__ import annotations

import numpy as np
import torch

from depthpipe.losses import depth_loss


def test_masked_losses__ignore_invalid_pixels() -> None:
    torch.manual_seed(0)
    log_pred = torch.randn(2, 1, 8, 8)
    depth = torch.rand(2, 1, 8, 8) * 20 + 1
    valid = torch.rand(2, 1, 8, 8) > 0.5
    garbage = depth.clone()
    garbage[~valid] = torch.tensor([0.0, -3.0, float("nan"), 1e9]).repeat(64)[: int((~valid).sum())]
    for name in ("silog", "l1_log"):
        clean = depth_loss(name, log_pred, depth, valid)
        dirty = depth_loss(name, log_pred, garbage, valid)
        assert torch.isfinite(dirty) and torch.equal(clean, dirty), name


def test_masked_losses__no_valid_pixel_gives_none_not_nan() -> None:
    valid = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    assert depth_loss("silog", torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), valid) is None
    # the tutorial's MSE has no mask: it trains invalid pixels towards 0 m
    mse = depth_loss("mse", torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), valid)
    assert mse is not None and float(mse) == 1.0  # exp(0) = 1 m against 0 m


def test_silog__zero_for_perfect_prediction() -> None:
    depth = torch.from_numpy(np.array([[[[1.0, 5.0], [20.0, 300.0]]]], dtype=np.float32))
    valid = torch.ones_like(depth, dtype=torch.bool)
    # sqrt is clamped at 1e-8 (a finite gradient at zero error): 10 * 1e-4 at most
    assert float(depth_loss("silog", depth.log(), depth, valid)) <= 1e-3 + 1e-7
