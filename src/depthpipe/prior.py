"""The floor every depth network must beat: a prior that looks at no pixel of the image.

For each pixel position, the mean log depth over the training split's valid pixels there (where
the ground, the buildings and the sky usually are at that height in the frame). It is what a
network would learn if it ignored its input. Positions never valid in training fall back to the
split's overall mean log depth. Predictions for other sizes are the log map resized bilinearly.

Memory: a packed split at the tutorial's size (12,927 samples at 768x1024) is about 50 GB of
depth and mask, so ``packed_prior`` reads it ``CHUNK_PIXELS`` at a time through memory maps
opened for one chunk only, and sums one sample at a time: the resident memory stays at a chunk
plus a few images whatever the split's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from depthpipe.config import DepthConfig
from depthpipe.data.packed import read_index
from depthpipe.errors import DepthpipeError

# Pixels read at once from a packed split: 8 samples at 768x1024 (about 31 MB of float32 depth
# and bool mask). At least one sample is read, whatever the image size.
CHUNK_PIXELS = 8 * 768 * 1024

Chunk = tuple[np.ndarray, np.ndarray]  # depth (n, H, W) metres, mask (n, H, W) bool
NAMES = ("depth", "mask")  # the packed arrays the prior reads (see depthpipe.data.packed)


def mean_log_depth(
    depth: np.ndarray, mask: np.ndarray, min_depth: float, max_depth: float
) -> np.ndarray:
    """(H, W) float32 mean log depth per pixel position over valid training pixels.

    Args:
        depth: (N, H, W) metres, 0 where invalid.
        mask: (N, H, W) bool, True = valid sensor return.

    A memory map is read one sample at a time, but the pages read stay resident for as long as
    the caller holds the map: for a packed split, ``packed_prior`` opens a map per chunk.
    """
    return chunks_mean_log_depth([(depth, mask)], depth.shape[1:], min_depth, max_depth)


def chunks_mean_log_depth(
    chunks: Iterable[Chunk], image_shape: tuple[int, ...], min_depth: float, max_depth: float
) -> np.ndarray:
    """``mean_log_depth`` of the samples of ``chunks`` (each an (n, H, W) depth and mask pair).

    The float64 sums take one sample at a time, in sample order: the same bits however the
    samples are chunked, and the same as numpy's sum over the sample axis of the whole split.
    """
    total = np.zeros(image_shape, dtype=np.float64)  # sum of ln(metres) over valid pixels
    count = np.zeros(image_shape, dtype=np.int64)
    for depth_rows, mask_rows in chunks:
        for depth_row, mask_row in zip(depth_rows, mask_rows, strict=True):
            _add_sample(total, count, depth_row, mask_row, min_depth, max_depth)
    if not count.any():
        raise ValueError("the training split has no valid depth pixel")
    overall = total.sum() / count.sum()
    per_pixel = np.where(count > 0, total / np.maximum(count, 1), overall)
    return per_pixel.astype(np.float32)


def _add_sample(
    total: np.ndarray,
    count: np.ndarray,
    depth: np.ndarray,
    mask: np.ndarray,
    min_depth: float,
    max_depth: float,
) -> None:
    """Add one sample's (H, W) valid log depths to ``total`` and its valid pixels to ``count``."""
    # float64 bounds make the comparison run in float64 (on the exact float64 value of float32
    # depth): a float32 bound could round past a depth and flip it in or out of the range.
    valid = mask & (depth >= np.float64(min_depth)) & (depth <= np.float64(max_depth))
    # ln 1 = 0, so invalid pixels add exactly nothing; the log is taken in float64, like the sum.
    total += np.log(np.where(valid, depth, 1.0), dtype=np.float64)
    count += valid


def _packed_shape(train_split: Path) -> tuple[int, ...]:
    """(N, H, W) of a packed split's depth and mask (read from the .npy headers)."""
    read_index(train_split)  # a missing split says "run the preprocess stage"
    depth_shape, mask_shape = (_array_shape(train_split / f"{name}.npy") for name in NAMES)
    if depth_shape != mask_shape or len(depth_shape) != 3:
        raise DepthpipeError(
            f"{train_split}: depth.npy {depth_shape} and mask.npy {mask_shape} "
            "must both be (N, H, W)"
        )
    return depth_shape


def packed_chunks(train_split: Path, *, chunk_pixels: int = CHUNK_PIXELS) -> Iterator[Chunk]:
    """A packed split's depth and mask, at most ``chunk_pixels`` pixels (at least one sample) at
    a time, each chunk copied out of memory maps opened for it alone.

    Why a map per chunk: the pages a memory map has read count in the process's resident memory
    for as long as the map is open, so one map held over a whole 768x1024 training split grew to
    about 51 GB. Once unmapped they stay only in the page cache, which the kernel reclaims.
    """
    samples, *image_shape = _packed_shape(train_split)
    step = max(1, chunk_pixels // math.prod(image_shape))
    depth_file, mask_file = (train_split / f"{name}.npy" for name in NAMES)
    for start in range(0, samples, step):
        yield (
            _read_rows(depth_file, start, start + step),
            _read_rows(mask_file, start, start + step),
        )


def packed_prior(
    train_split: Path, depth: DepthConfig, *, chunk_pixels: int = CHUNK_PIXELS
) -> np.ndarray:
    """``mean_log_depth`` of a packed training split, read ``chunk_pixels`` at a time."""
    _, *image_shape = _packed_shape(train_split)
    chunks = packed_chunks(train_split, chunk_pixels=chunk_pixels)
    try:
        return chunks_mean_log_depth(chunks, tuple(image_shape), depth.min_depth, depth.max_depth)
    except ValueError as error:
        raise DepthpipeError(f"{train_split}: {error}") from error


def _array_shape(path: Path) -> tuple[int, ...]:
    try:
        return tuple(np.load(path, mmap_mode="r").shape)  # the map is closed as it is dropped
    except (OSError, ValueError) as error:
        raise DepthpipeError(f"{path}: not a readable .npy array ({error})") from error


def _read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a .npy array, copied; the map they were read through is closed
    on return (nothing else refers to it), so its pages leave the resident set."""
    return np.array(np.load(path, mmap_mode="r")[start:stop])


def prior_depth(log_prior: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(height, width) float32 metres: the log prior resized bilinearly, then exp."""
    log_map = torch.from_numpy(log_prior)[None, None]  # (1, 1, H, W)
    if tuple(log_prior.shape) != size:
        log_map = F.interpolate(log_map, size=size, mode="bilinear", align_corners=False)
    return log_map[0, 0].exp().numpy()
