"""Paired RGB/depth/mask augmentation for fine-tuning, made depth-correct.

``finetune.augment.geometry`` picks one of three geometries, measured against each other in
docs/experiments.md: ``resized_crop`` (the tutorial's, below), ``crop`` (BTS and AdaBins: a
fixed-size window at the image's own scale, so no depth is ever rescaled) and ``flip`` (Depth
Anything V2's metric fine-tuning: a left-right mirror only). All three keep the camera's
magnification or change it with a consistent depth; a mirror and a crop at scale one never
change a depth.

The tutorial's augmentation (rotation within 15 degrees, random resized crop with area 0.2-0.9,
horizontal flip) applied to a concatenated RGB+depth tensor with bilinear sampling and a square
output. Here the same geometry is one affine warp per sample, with three differences that keep
the depth honest:

- depth and mask are sampled nearest-neighbour, so every output depth is a value that exists in
  the source (bilinear would invent depths across object edges and blend in invalid zeros);
- pixels that fall outside the source (the rotated-in corners) are marked invalid;
- the crop keeps the output's aspect ratio, so the scene is never squashed;
- the crop's depth is scaled with its magnification (``scale_depth``): a crop of side fraction s
  shown at full size magnifies the view 1/s times, which is what a camera 1/s times closer would
  see, so its depth is multiplied by s. Without it (the tutorial) the same surface would appear
  at several sizes with one depth label, and the network is taught two answers for one picture.
  Pixels the scaling pushes outside [min_depth, max_depth] become invalid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from depthpipe.config import DepthConfig, FinetuneAugment
from depthpipe.data.packed import Batch


def affine_theta(
    height: int, width: int, angle: float, scale: float, centre: tuple[float, float], flip: bool
) -> torch.Tensor:
    """The (2, 3) ``affine_grid`` matrix mapping output to source normalised coordinates.

    Built in pixel units (so a rotation stays a rotation on a non-square image), then converted
    to the [-1, 1] coordinates ``grid_sample`` uses.

    Args:
        angle: rotation in radians.
        scale: side of the crop as a fraction of the image side (sqrt of the area fraction).
        centre: crop centre in source pixels relative to the image centre, (x, y).
        flip: mirror left-right.
    """
    half = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64)
    cos, sin = math.cos(angle), math.sin(angle)
    mirror = -1.0 if flip else 1.0
    # output pixel offset (from centre) -> source pixel offset: scale, flip, rotate, shift
    linear = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64) @ torch.diag(
        torch.tensor([mirror * scale, scale], dtype=torch.float64)
    )
    # normalised -> pixels is diag(half); back again is diag(1 / half)
    theta_linear = torch.diag(1.0 / half) @ linear @ torch.diag(half)
    theta_shift = torch.tensor(centre, dtype=torch.float64) / half
    return torch.cat([theta_linear, theta_shift[:, None]], dim=1).float()


def warp(sample: Batch, theta: torch.Tensor) -> Batch:
    """Apply one affine warp to image (bilinear) and depth/mask (nearest); outside = invalid.

    Depth values are copied, not scaled: see ``scale_crop_depth``.
    """
    image, depth, mask = sample["image"], sample["depth"], sample["mask"]
    _, height, width = image.shape
    grid = F.affine_grid(theta[None], [1, 1, height, width], align_corners=False)
    out_image = F.grid_sample(
        image[None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )[0]
    # Depth and mask travel together so each output pixel copies one source pixel.
    depth_mask = torch.cat([depth, mask.to(depth.dtype)], dim=0)[None]
    sampled = F.grid_sample(
        depth_mask, grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[0]
    out_mask = sampled[1:2] > 0.5  # zero padding: rotated-in corners are invalid
    out_depth = torch.where(out_mask, sampled[0:1], torch.zeros_like(sampled[0:1]))
    return {"image": out_image, "depth": out_depth, "mask": out_mask}


def scale_crop_depth(sample: Batch, side_fraction: float, depth_range: DepthConfig) -> Batch:
    """Depth of a crop of ``side_fraction`` of the image side, magnified to full size.

    Multiplied by the side fraction (magnification 1/s = a camera 1/s times closer); pixels that
    leave the valid range become invalid (depth 0, mask False).
    """
    depth = sample["depth"] * side_fraction
    mask = sample["mask"] & (depth >= depth_range.min_depth) & (depth <= depth_range.max_depth)
    return {**sample, "depth": torch.where(mask, depth, torch.zeros_like(depth)), "mask": mask}


def crop_window(sample: Batch, top: int, left: int, height: int, width: int) -> Batch:
    """The same window of image, depth and mask, no resampling (depths stay true)."""
    rows, cols = slice(top, top + height), slice(left, left + width)
    return {key: value[:, rows, cols] for key, value in sample.items()}


def mirror(sample: Batch) -> Batch:
    """Left-right mirror of image, depth and mask (exact: no resampling)."""
    return {key: value.flip(-1) for key, value in sample.items()}


def crop_size(height: int, width: int, side: float) -> tuple[int, int]:
    """(height, width) of a ``side``-fraction crop, at least one pixel each."""
    return max(1, round(height * side)), max(1, round(width * side))


class DepthAugment:
    """Per-sample geometric augmentation of ``cfg.geometry`` (see the module docstring).

    Draws from its own ``torch.Generator`` when given one (reproducible in a single process);
    in DataLoader workers the global torch RNG is seeded per worker by Lightning.
    """

    def __init__(
        self,
        cfg: FinetuneAugment,
        depth_range: DepthConfig,
        generator: torch.Generator | None = None,
    ) -> None:
        self.cfg = cfg
        self.depth_range = depth_range
        self.generator = generator

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.generator))

    def __call__(self, sample: Batch) -> Batch:
        if self.cfg.geometry == "flip":
            return self._flip(sample)
        if self.cfg.geometry == "crop":
            return self._crop(sample)
        return self._resized_crop(sample)

    def _flip(self, sample: Batch) -> Batch:
        return mirror(sample) if self._uniform(0.0, 1.0) < self.cfg.hflip_prob else sample

    def _crop(self, sample: Batch) -> Batch:
        """Rotation about the centre (corners invalid), then a window at scale one, then a
        mirror: the crop's pixels keep their rays' depths, as a camera with a shifted
        principal point would see them."""
        _, height, width = sample["image"].shape
        angle = math.radians(self._uniform(-self.cfg.rotation_degrees, self.cfg.rotation_degrees))
        if angle != 0.0:
            sample = warp(sample, affine_theta(height, width, angle, 1.0, (0.0, 0.0), False))
        crop_h, crop_w = crop_size(height, width, self.cfg.crop_side)
        top = min(height - crop_h, int(self._uniform(0.0, height - crop_h + 1)))
        left = min(width - crop_w, int(self._uniform(0.0, width - crop_w + 1)))
        return self._flip(crop_window(sample, top, left, crop_h, crop_w))

    def _resized_crop(self, sample: Batch) -> Batch:
        _, height, width = sample["image"].shape
        angle = math.radians(self._uniform(-self.cfg.rotation_degrees, self.cfg.rotation_degrees))
        scale = math.sqrt(self._uniform(self.cfg.crop_scale_min, self.cfg.crop_scale_max))
        # Keep the crop inside the image: its centre may move by the slack on each side.
        slack_x, slack_y = (1 - scale) * width / 2, (1 - scale) * height / 2
        centre = (self._uniform(-slack_x, slack_x), self._uniform(-slack_y, slack_y))
        flip = self._uniform(0.0, 1.0) < self.cfg.hflip_prob
        warped = warp(sample, affine_theta(height, width, angle, scale, centre, flip))
        if self.cfg.scale_depth:
            return scale_crop_depth(warped, scale, self.depth_range)
        return warped
