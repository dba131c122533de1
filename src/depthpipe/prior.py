"""The floor every depth network must beat: a prior that looks at no pixel of the image.

For each pixel position, the mean log depth over the training split's valid pixels there (where
the ground, the buildings and the sky usually are at that height in the frame). It is what a
network would learn if it ignored its input. Positions never valid in training fall back to the
split's overall mean log depth. Predictions for other sizes are the log map resized bilinearly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from depthpipe.config import DepthConfig
from depthpipe.data.packed import PackedDepthDataset
from depthpipe.errors import DepthpipeError

# Samples averaged at once: bounds memory at full scale (a 768x1024 float64 sum is 6 MB per image).
CHUNK = 64


def mean_log_depth(
    depth: np.ndarray, mask: np.ndarray, min_depth: float, max_depth: float
) -> np.ndarray:
    """(H, W) float32 mean log depth per pixel position over valid training pixels.

    Args:
        depth: (N, H, W) metres, 0 where invalid (a memory map is read in chunks).
        mask: (N, H, W) bool, True = valid sensor return.
    """
    total = np.zeros(depth.shape[1:], dtype=np.float64)
    count = np.zeros(depth.shape[1:], dtype=np.int64)
    for start in range(0, depth.shape[0], CHUNK):
        d = np.asarray(depth[start : start + CHUNK], dtype=np.float64)
        valid = np.asarray(mask[start : start + CHUNK]) & (d >= min_depth) & (d <= max_depth)
        total += np.where(valid, np.log(np.where(valid, d, 1.0)), 0.0).sum(axis=0)
        count += valid.sum(axis=0)
    if not count.any():
        raise ValueError("the training split has no valid depth pixel")
    overall = total.sum() / count.sum()
    per_pixel = np.where(count > 0, total / np.maximum(count, 1), overall)
    return per_pixel.astype(np.float32)


def packed_prior(train_split: Path, depth: DepthConfig) -> np.ndarray:
    """``mean_log_depth`` of a packed training split (memory-mapped, read in chunks)."""
    train = PackedDepthDataset(train_split).arrays()
    try:
        return mean_log_depth(train["depth"], train["mask"], depth.min_depth, depth.max_depth)
    except ValueError as error:
        raise DepthpipeError(f"{train_split}: {error}") from error


def prior_depth(log_prior: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(height, width) float32 metres: the log prior resized bilinearly, then exp."""
    log_map = torch.from_numpy(log_prior)[None, None]  # (1, 1, H, W)
    if tuple(log_prior.shape) != size:
        log_map = F.interpolate(log_map, size=size, mode="bilinear", align_corners=False)
    return log_map[0, 0].exp().numpy()
