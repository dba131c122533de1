"""MegaDepth v1's layout (``MegaDepth_v1/<scene>/dense<k>/imgs/*.jpg``) and image checks.

Only the RGB photos are used (for self-supervised pretraining); the depth .h5 files are ignored.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image

from depthpipe.errors import reason

# The folder that holds the scene folders, in the archive (under a long prefix) and in
# data/raw/megadepth.
ROOT_DIR = "MegaDepth_v1"
PHOTO_SUFFIXES = (".jpg", ".JPG")


class BadImage(Exception):
    """An image PIL cannot fully decode; the message is the reason for the report."""


def list_images(root: Path) -> list[Path]:
    """Every photo under a MegaDepth root, in a stable order."""
    return sorted(root.glob("**/dense*/imgs/*.jpg")) + sorted(root.glob("**/dense*/imgs/*.JPG"))


def photo_path(parts: Sequence[str]) -> str | None:
    """``<scene>/dense<k>/imgs/<name>.jpg`` for the parts of a path below MegaDepth_v1/ if it is a
    photo; None for anything else (the depth maps in dense<k>/depths/*.h5 above all)."""
    if len(parts) != 4:
        return None
    _, dense, imgs, name = parts
    if dense.startswith("dense") and imgs == "imgs" and name.endswith(PHOTO_SUFFIXES):
        return "/".join(parts)
    return None


def _hash(seed: int, text: str) -> bytes:
    return hashlib.sha256(f"{seed}:{text}".encode()).digest()


def select_subset(photos: Iterable[str], max_images: int, seed: int) -> list[str]:
    """At most ``max_images`` of ``photos`` (``<scene>/...`` paths; 0 = all), spread evenly over
    scenes: each scene's photos are ranked by a seeded hash of their path, and the subset takes
    every scene's first-ranked photo, then every scene's second, and so on, scenes in a seeded
    hash order within a round. So the scene counts differ by at most one, except that a scene
    with fewer photos gives all it has; the result depends on the names and the seed only
    (never on listing order or file system), and is sorted."""
    photos = sorted(set(photos))
    if max_images == 0 or max_images >= len(photos):
        return photos
    by_scene: dict[str, list[str]] = defaultdict(list)
    for photo in photos:
        by_scene[photo.split("/", 1)[0]].append(photo)
    ranked = [
        (rank, _hash(seed, scene), photo)
        for scene, members in by_scene.items()
        for rank, photo in enumerate(sorted(members, key=lambda m: _hash(seed, m)))
    ]
    return sorted(photo for _, _, photo in sorted(ranked)[:max_images])


def prune_to_subset(root: Path, max_images: int, seed: int) -> int:
    """Delete the photos under ``root`` (a MegaDepth_v1 folder) that ``select_subset`` leaves
    out, and folders left empty; return the photos kept."""
    photos = {p.relative_to(root).as_posix(): p for p in list_images(root)}
    keep = set(select_subset(photos, max_images, seed))
    for name, path in photos.items():
        if name not in keep:
            path.unlink()
    for folder in sorted((d for d in root.rglob("*") if d.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    return len(keep)


def scene_of(image: Path) -> str:
    # .../<scene>/dense<k>/imgs/<name>.jpg
    return image.parent.parent.parent.name


def load_rgb(path: Path) -> Image.Image:
    """Decode the whole file (``load``), so truncated or non-image files fail here, not mid-run."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImage(f"unreadable image: {reason(error, path)}") from error


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """Shrink so the short side is ``short_side`` px (never enlarge), keeping the aspect ratio."""
    width, height = image.size
    scale = short_side / min(width, height)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
