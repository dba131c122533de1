from __future__ import annotations

import math

import numpy as np
import torch

from depthpipe.config import FinetuneAugment
from depthpipe.losses import depth_loss
from depthpipe.transforms import DepthAugment, affine_theta, warp


def _sample(height: int = 30, width: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([2.0, 7.5, 40.0, 180.0])
    depth = levels[torch.randint(0, 4, (1, height, width), generator=g)]
    mask = torch.rand(1, height, width, generator=g) > 0.2
    depth = torch.where(mask, depth, torch.zeros_like(depth))
    return {"image": torch.rand(3, height, width, generator=g), "depth": depth, "mask": mask}


def test_augment__never_invents_depth_values() -> None:
    augment = DepthAugment(FinetuneAugment(), generator=torch.Generator().manual_seed(1))
    source = _sample()
    allowed = set(source["depth"][source["mask"]].tolist())
    for _ in range(30):
        out = augment(source)
        assert out["image"].shape == (3, 30, 40) and out["depth"].shape == (1, 30, 40)
        assert set(out["depth"][out["mask"]].tolist()) <= allowed
        assert torch.all(out["depth"][~out["mask"]] == 0)


def test_warp__rotated_in_corners_are_invalid() -> None:
    sample = _sample()
    sample["mask"][:] = True
    sample["depth"][:] = 5.0
    out = warp(sample, affine_theta(30, 40, math.radians(15), 1.0, (0.0, 0.0), flip=False))
    assert not out["mask"][0, 0, 0] and not out["mask"][0, -1, -1]
    assert out["mask"][0, 15, 20]


def test_warp__identity_and_flip_keep_aspect() -> None:
    sample = _sample()
    same = warp(sample, affine_theta(30, 40, 0.0, 1.0, (0.0, 0.0), flip=False))
    assert torch.equal(same["depth"], sample["depth"])
    assert torch.allclose(same["image"], sample["image"], atol=1e-5)
    flipped = warp(sample, affine_theta(30, 40, 0.0, 1.0, (0.0, 0.0), flip=True))
    assert torch.equal(flipped["depth"], sample["depth"].flip(-1))


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
