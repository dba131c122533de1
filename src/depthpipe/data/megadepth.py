"""MegaDepth v1's layout (``MegaDepth_v1/<scene>/dense<k>/imgs/*.jpg``) and image checks.

Only the RGB photos are used (for self-supervised pretraining); the depth .h5 files are ignored.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image


class BadImage(Exception):
    """An image PIL cannot fully decode; the message is the reason for the report."""


def list_images(root: Path) -> list[Path]:
    """Every photo under a MegaDepth root, in a stable order."""
    return sorted(root.glob("**/dense*/imgs/*.jpg")) + sorted(root.glob("**/dense*/imgs/*.JPG"))


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
        raise BadImage(f"unreadable image: {error}") from error


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """Shrink so the short side is ``short_side`` px (never enlarge), keeping the aspect ratio."""
    width, height = image.size
    scale = short_side / min(width, height)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
