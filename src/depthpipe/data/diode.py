"""DIODE's on-disk layout and a validating reader for one sample.

Layout (official devkit): ``<root>/{train,val}/outdoor/scene_XXXXX/scan_YYYYY/`` holding
``XXXXX_YYYYY_outdoor_AAA_BBB.png`` (RGB), ``..._depth.npy`` (float32, (H, W, 1), metres) and
``..._depth_mask.npy`` ((H, W), 0/1, 1 = valid return).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DOMAIN = "outdoor"  # the tutorial fine-tunes on outdoor scenes only (note: "indoors" has an s)


class BadSample(Exception):
    """One sample failed validation; the message is the reason written to the report."""


@dataclass(frozen=True)
class SampleFiles:
    split: str
    scene: str  # "scene_00007"
    scan: str  # "scan_00082"
    stem: str  # "00007_00082_outdoor_000_010"
    folder: Path

    @property
    def image(self) -> Path:
        return self.folder / f"{self.stem}.png"

    @property
    def depth(self) -> Path:
        return self.folder / f"{self.stem}_depth.npy"

    @property
    def mask(self) -> Path:
        return self.folder / f"{self.stem}_depth_mask.npy"


def sample_stem(scene_id: int, scan_id: int, a: int, b: int) -> str:
    return f"{scene_id:05d}_{scan_id:05d}_{DOMAIN}_{a:03d}_{b:03d}"


def sample_files(
    root: Path, split: str, scene_id: int, scan_id: int, a: int, b: int
) -> SampleFiles:
    scene, scan = f"scene_{scene_id:05d}", f"scan_{scan_id:05d}"
    return SampleFiles(
        split=split,
        scene=scene,
        scan=scan,
        stem=sample_stem(scene_id, scan_id, a, b),
        folder=root / split / DOMAIN / scene / scan,
    )


def list_samples(root: Path, split: str) -> list[SampleFiles]:
    """Every outdoor sample of a split, found by its RGB file, in a stable (sorted) order."""
    base = root / split / DOMAIN
    found = []
    for image in sorted(base.glob("scene_*/scan_*/*.png")):
        scan_dir = image.parent
        found.append(
            SampleFiles(
                split=split,
                scene=scan_dir.parent.name,
                scan=scan_dir.name,
                stem=image.stem,
                folder=scan_dir,
            )
        )
    return found


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32, metres
    mask: np.ndarray  # (H, W) bool, True = valid return


def read_sample(files: SampleFiles) -> Sample:
    """Load and check one sample; raise BadSample with a one-line reason."""
    image = _read_rgb(files.image)
    depth = _read_npy(files.depth, "depth")
    mask = _read_npy(files.mask, "mask")
    height, width = image.shape[:2]
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[:, :, 0]
    if depth.shape != (height, width):
        raise BadSample(f"depth shape {depth.shape} does not match image {height}x{width}")
    if mask.shape != (height, width):
        raise BadSample(f"mask shape {mask.shape} does not match image {height}x{width}")
    if not np.isfinite(depth).all():
        raise BadSample(f"depth has {int((~np.isfinite(depth)).sum())} non-finite values")
    if (depth < 0).any():
        raise BadSample("depth has negative values")
    if not np.isin(mask, (0, 1)).all():
        raise BadSample("mask is not binary (values other than 0 and 1)")
    return Sample(image=image, depth=depth.astype(np.float32), mask=mask.astype(bool))


def _read_rgb(path: Path) -> np.ndarray:
    if not path.is_file():
        raise BadSample(f"missing image {path.name}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise BadSample(f"unreadable image {path.name}: {error}") from error


def _read_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise BadSample(f"missing {what} file {path.name}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise BadSample(f"unreadable {what} file {path.name}: {error}") from error
