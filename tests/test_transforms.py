from __future__ import annotations

import math

import pytest
import torch

from depthpipe.config import DepthConfig, FinetuneAugment, load_params
from depthpipe.losses import depth_loss
from depthpipe.transforms import (
    DepthAugment,
    affine_theta,
    crop_size,
    mirror,
    scale_crop_depth,
    warp,
)
from tests.helpers import REPO

PARAMS = load_params(REPO / "params.yaml")
DEPTH = PARAMS.depth


def _augment(**changes: object) -> FinetuneAugment:
    """The committed augmentation params as the tutorial's resized crop, with ``changes``."""
    return PARAMS.finetune.augment.model_copy(update={"geometry": "resized_crop", **changes})


def _sample(height: int = 30, width: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([2.0, 7.5, 40.0, 180.0])
    depth = levels[torch.randint(0, 4, (1, height, width), generator=g)]
    mask = torch.rand(1, height, width, generator=g) > 0.2
    depth = torch.where(mask, depth, torch.zeros_like(depth))
    return {"image": torch.rand(3, height, width, generator=g), "depth": depth, "mask": mask}


def test_augment__never_invents_depth_values() -> None:
    augment = DepthAugment(
        _augment(scale_depth=False), DEPTH, generator=torch.Generator().manual_seed(1)
    )
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


def _plane(depth: float, height: int = 30, width: int = 40) -> dict[str, torch.Tensor]:
    """A fronto-parallel surface at ``depth`` metres with a checkerboard texture."""
    rows = torch.arange(height)[:, None] // 5
    cols = torch.arange(width)[None, :] // 5
    board = ((rows + cols) % 2).float().expand(3, height, width).clone()
    return {
        "image": board,
        "depth": torch.full((1, height, width), depth),
        "mask": torch.ones(1, height, width, dtype=torch.bool),
    }


def test_augment__crop_depth_scales_with_magnification() -> None:
    """A crop of a quarter of the area (side 0.5) is seen 2x magnified: a camera 2x closer."""
    cfg = _augment(rotation_degrees=0.0, crop_scale_min=0.25, crop_scale_max=0.25, hflip_prob=0.0)
    out = DepthAugment(cfg, DEPTH, generator=torch.Generator().manual_seed(0))(_plane(20.0))
    assert out["mask"].all()
    assert torch.allclose(out["depth"], torch.full_like(out["depth"], 10.0))
    # the texture is magnified 2x: squares of 5 px become 10 px
    row = out["image"][0, 15] > 0.5
    changes = int((row[1:] != row[:-1]).sum())
    assert 2 <= changes <= 4, changes  # 40 px: 3-4 edges of 10 px squares (7 of 5 px before)

    tutorial = DepthAugment(
        cfg.model_copy(update={"scale_depth": False}),
        DEPTH,
        generator=torch.Generator().manual_seed(0),
    )(_plane(20.0))
    assert torch.allclose(tutorial["depth"], torch.full_like(tutorial["depth"], 20.0))


def test_scale_crop_depth__out_of_range_becomes_invalid() -> None:
    sample = _plane(1.0)
    sample["depth"][0, :, :20] = 100.0
    depth_range = DepthConfig(min_depth=0.6, max_depth=350.0)
    out = scale_crop_depth(sample, 0.5, depth_range)
    assert not out["mask"][0, :, 20:].any()  # 1 m -> 0.5 m, below min_depth
    assert torch.all(out["depth"][0, :, 20:] == 0)
    assert out["mask"][0, :, :20].all() and torch.all(out["depth"][0, :, :20] == 50.0)


def test_augment__crop_leaving_no_valid_pixel_gives_empty_mask() -> None:
    """Every pixel scaled below min_depth: the sample stays, with nothing valid to learn from."""
    cfg = _augment(crop_scale_min=0.2, crop_scale_max=0.2)
    out = DepthAugment(cfg, DEPTH, generator=torch.Generator().manual_seed(0))(_plane(0.7))
    assert out["image"].shape == (3, 30, 40)
    assert not out["mask"].any() and torch.all(out["depth"] == 0)


def test_augment__mse_sees_the_scaled_depth() -> None:
    """The tutorial's loss in metres trains on what the crop shows: a 20 m wall at 2x
    magnification is a 10 m wall, so predicting 10 m costs nothing and 20 m costs (10 m)^2."""
    cfg = _augment(rotation_degrees=0.0, crop_scale_min=0.25, crop_scale_max=0.25, hflip_prob=0.0)
    out = DepthAugment(cfg, DEPTH, generator=torch.Generator().manual_seed(0))(_plane(20.0))
    depth, valid = out["depth"][None], out["mask"][None]
    at_ten = depth_loss("mse", torch.full_like(depth, math.log(10.0)), depth, valid)
    at_twenty = depth_loss("mse", torch.full_like(depth, math.log(20.0)), depth, valid)
    assert at_ten is not None and float(at_ten) < 1e-8
    assert at_twenty is not None and float(at_twenty) == pytest.approx(100.0, rel=1e-5)


def _windows(source: torch.Tensor, height: int, width: int) -> list[torch.Tensor]:
    """Every window of ``height`` x ``width`` of a (C, H, W) tensor, and their mirrors."""
    _, full_h, full_w = source.shape
    found = []
    for top in range(full_h - height + 1):
        for left in range(full_w - width + 1):
            window = source[:, top : top + height, left : left + width]
            found += [window, window.flip(-1)]
    return found


def test_crop__a_window_at_scale_one_with_the_sources_own_depths() -> None:
    """BTS's crop: no rotation, each output is exactly one window of the source (or its
    mirror), image, depth and mask from the same place, every depth unchanged."""
    cfg = _augment(geometry="crop", rotation_degrees=0.0, crop_side=0.75, hflip_prob=0.5)
    augment = DepthAugment(cfg, DEPTH, generator=torch.Generator().manual_seed(3))
    source = _sample(height=12, width=16)
    stacked = torch.cat([source["image"], source["depth"], source["mask"].float()])
    windows = _windows(stacked, 9, 12)
    flipped = 0
    for _ in range(20):
        out = augment(source)
        assert out["image"].shape == (3, 9, 12) and out["mask"].shape == (1, 9, 12)
        got = torch.cat([out["image"], out["depth"], out["mask"].float()])
        matches = [i for i, window in enumerate(windows) if torch.equal(window, got)]
        assert matches, "the crop is no window of the source"
        flipped += matches[0] % 2
    assert 0 < flipped < 20  # both mirrored and plain windows drawn


def test_crop__rotation_marks_corners_invalid_and_keeps_the_plane_depth() -> None:
    plane = _sample(height=30, width=40)
    plane["mask"][:] = True
    plane["depth"][:] = 12.0
    cfg = _augment(geometry="crop", rotation_degrees=20.0, crop_side=1.0, hflip_prob=0.0)
    augment = DepthAugment(cfg, DEPTH, generator=torch.Generator().manual_seed(0))
    outs = [augment(plane) for _ in range(10)]
    assert any(not out["mask"].all() for out in outs)  # a rotation leaves invalid corners
    for out in outs:
        assert torch.all(out["depth"][out["mask"]] == 12.0)  # no depth is rescaled


def test_crop_size__keeps_the_aspect_ratio() -> None:
    assert crop_size(48, 64, 0.75) == (36, 48)
    assert crop_size(48, 64, 1.0) == (48, 64)


def test_flip__mirror_or_nothing() -> None:
    source = _sample()
    always = DepthAugment(_augment(geometry="flip", hflip_prob=1.0), DEPTH)
    never = DepthAugment(_augment(geometry="flip", hflip_prob=0.0), DEPTH)
    mirrored, kept = always(source), never(source)
    for key in ("image", "depth", "mask"):
        assert torch.equal(mirrored[key], source[key].flip(-1))
        assert torch.equal(kept[key], source[key])
        assert torch.equal(mirror(mirror(source))[key], source[key])
