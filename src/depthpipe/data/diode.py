"""DIODE's on-disk layout, its manifest, and a validating reader for one sample.

Layout (official devkit): ``<root>/{train,val}/{outdoor,indoors}/scene_XXXXX/scan_YYYYY/`` holding
``XXXXX_YYYYY_<domain>_AAA_BBB.png`` (RGB), ``..._depth.npy`` (float32, (H, W, 1), metres) and
``..._depth_mask.npy`` ((H, W), 0/1, 1 = valid return).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from depthpipe.errors import DepthpipeError, reason

# The tutorial fine-tunes on outdoor scenes; DIODE spells the other domain "indoors".
OUTDOOR, INDOORS = "outdoor", "indoors"
DOMAINS = (OUTDOOR, INDOORS)
# The three files of one sample: <stem>.png, <stem>_depth.npy, <stem>_depth_mask.npy.
IMAGE_SUFFIX, DEPTH_SUFFIX, MASK_SUFFIX = ".png", "_depth.npy", "_depth_mask.npy"
SAMPLE_SUFFIXES = (IMAGE_SUFFIX, DEPTH_SUFFIX, MASK_SUFFIX)

# The devkit's manifest (diode_meta.json, MIT licence): split -> domain -> scene -> scan -> stems.
# It lists train completely but val only in part, so it checks train and never enumerates val.
MANIFEST = Path(__file__).with_name("diode_meta.json")
# Another manifest for a mirror or a test archive that holds other files. An environment variable
# and no param: the manifest only decides whether fetch accepts what it got, never what it writes.
MANIFEST_ENV = "DEPTHPIPE_DIODE_MANIFEST"


class BadSample(Exception):
    """One sample failed validation; the message is the reason written to the report."""


@dataclass(frozen=True)
class SampleFiles:
    split: str
    scene: str  # "scene_00007"
    scan: str  # "scan_00082"
    stem: str  # "00007_00082_outdoor_000_010"
    folder: Path  # <root>/<split>/<domain>/<scene>/<scan>

    @property
    def domain(self) -> str:
        return self.folder.parent.parent.name

    @property
    def image(self) -> Path:
        return self.folder / f"{self.stem}{IMAGE_SUFFIX}"

    @property
    def depth(self) -> Path:
        return self.folder / f"{self.stem}{DEPTH_SUFFIX}"

    @property
    def mask(self) -> Path:
        return self.folder / f"{self.stem}{MASK_SUFFIX}"


def sample_stem(scene_id: int, scan_id: int, a: int, b: int, domain: str) -> str:
    return f"{scene_id:05d}_{scan_id:05d}_{domain}_{a:03d}_{b:03d}"


def sample_files(
    root: Path, split: str, domain: str, scene_id: int, scan_id: int, a: int, b: int
) -> SampleFiles:
    scene, scan = f"scene_{scene_id:05d}", f"scan_{scan_id:05d}"
    return SampleFiles(
        split=split,
        scene=scene,
        scan=scan,
        stem=sample_stem(scene_id, scan_id, a, b, domain),
        folder=root / split / domain / scene / scan,
    )


def list_samples(root: Path, split: str, domains: Sequence[str] = DOMAINS) -> list[SampleFiles]:
    """Every sample of a split in ``domains``, found by its RGB file, in a stable order (domain
    by domain, as listed; sorted within a domain)."""
    found = []
    for domain in domains:
        for image in sorted((root / split / domain).glob(f"scene_*/scan_*/*{IMAGE_SUFFIX}")):
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


def sample_file_path(parts: Sequence[str], domains: Iterable[str]) -> str | None:
    """``domain/scene_*/scan_*/<file>`` for the parts of a path below a split folder, if it is
    one of a sample's three files in ``domains``; None for anything else."""
    if len(parts) != 4:
        return None
    domain, scene, scan, name = parts
    if domain not in domains or not scene.startswith("scene_") or not scan.startswith("scan_"):
        return None
    return "/".join(parts) if name.endswith(SAMPLE_SUFFIXES) else None


def manifest_path() -> Path:
    return Path(os.environ.get(MANIFEST_ENV) or MANIFEST)


def manifest_files(manifest: Path, split: str, domains: Iterable[str]) -> set[str]:
    """Every file (``domain/scene/scan/<file>``) the manifest lists for ``split`` in ``domains``."""
    try:
        listing = json.loads(manifest.read_text())[split]
    except (OSError, ValueError, KeyError) as error:
        raise DepthpipeError(f"{manifest}: not a DIODE manifest with a {split!r} split") from error
    files: set[str] = set()
    for domain in domains:
        if domain not in listing:
            raise DepthpipeError(f"{manifest}: lists no {split}/{domain}")
        for scene, scans in listing[domain].items():
            for scan, stems in scans.items():
                folder = f"{domain}/{scene}/{scan}"
                files.update(
                    f"{folder}/{stem}{suffix}" for stem in stems for suffix in SAMPLE_SUFFIXES
                )
    return files


def check_manifest(present: Iterable[str], split: str, domains: Iterable[str], what: str) -> int:
    """Raise naming the files the manifest lists for ``split`` and ``domains`` but ``present``
    (paths ``domain/scene/scan/<file>``) lacks; return how many files it lists."""
    manifest = manifest_path()
    expected = manifest_files(manifest, split, domains)
    missing = sorted(expected - set(present))
    if missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise DepthpipeError(
            f"{what}: {len(missing)} of the {len(expected)} files the DIODE manifest "
            f"({manifest}) lists for {split} are missing: {shown}"
        )
    return len(expected)


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
        raise BadSample(f"unreadable image {path.name}: {reason(error, path)}") from error


def _read_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise BadSample(f"missing {what} file {path.name}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise BadSample(f"unreadable {what} file {path.name}: {reason(error, path)}") from error
