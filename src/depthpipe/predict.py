"""Depth maps for your own photos with a fine-tuned model.

    python -m depthpipe.predict PATH... --model models/finetune/conservative --out predictions/

PATH may be image files or folders (searched recursively). Any size, RGB, RGBA or greyscale; the
EXIF orientation is applied first, as a photo viewer would. For each image, writes
``<stem>_depth.npy`` (float32 metres, the input's height and width) and ``<stem>_depth.png``
(coloured, near = bright). An unreadable file is reported and skipped; the exit status is 1 at
the end if any file failed.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from depthpipe.atomic import atomic_file
from depthpipe.errors import DepthpipeError, run_cli
from depthpipe.model import DepthNet, ModelSpec, load_finetuned

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
MULTIPLE = 8  # network input sides are rounded to this (keeps decoder skips aligned)


def find_images(inputs: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.exists():
            found.append(path)
        else:
            raise DepthpipeError(f"{path}: no such file or folder")
    return found


def load_photo(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 after EXIF orientation; RGBA and greyscale become RGB."""
    with Image.open(path) as img:
        img.load()
        upright = ImageOps.exif_transpose(img)
        if upright.mode in ("RGBA", "LA", "P"):
            # Composite transparency on white rather than on arbitrary colour under alpha 0.
            rgba = upright.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            upright = Image.alpha_composite(background, rgba)
        return np.asarray(upright.convert("RGB"))


def network_size(height: int, width: int, spec: ModelSpec) -> tuple[int, int]:
    """Same pixel count as training, the photo's own aspect ratio (never squashed)."""
    scale = math.sqrt(spec.height * spec.width / (height * width))
    return (
        max(MULTIPLE * 4, round(height * scale / MULTIPLE) * MULTIPLE),
        max(MULTIPLE * 4, round(width * scale / MULTIPLE) * MULTIPLE),
    )


def predict_depth(net: DepthNet, spec: ModelSpec, rgb: np.ndarray) -> np.ndarray:
    """(H, W) float32 metres at the photo's own resolution."""
    height, width = rgb.shape[:2]
    image = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255.0  # (1, 3, H, W)
    size = network_size(height, width, spec)
    with torch.no_grad():
        small = F.interpolate(
            image, size=size, mode="bilinear", antialias=True, align_corners=False
        )
        log_depth = net(small)  # (1, 1, h, w)
        log_depth = F.interpolate(
            log_depth, size=(height, width), mode="bilinear", align_corners=False
        )
    depth = log_depth[0, 0].exp().clamp(spec.min_depth, spec.max_depth)
    return depth.numpy().astype(np.float32)


def colourise(depth: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: log depth between its 1st and 99th percentile, near = bright."""
    import matplotlib

    log = np.log(depth)
    lo, hi = np.percentile(log, [1, 99])
    scaled = np.clip((log - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    rgba = matplotlib.colormaps["magma_r"](scaled)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def write_outputs(depth: np.ndarray, out: Path, stem: str) -> None:
    with atomic_file(out / f"{stem}_depth.npy") as staged, staged.open("wb") as handle:
        np.save(handle, depth)
    with atomic_file(out / f"{stem}_depth.png") as staged:
        Image.fromarray(colourise(depth)).save(staged, format="PNG")


def unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:  # two inputs with one name (from different folders)
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def predict_files(images: list[Path], model: Path, out: Path) -> list[tuple[Path, str]]:
    """Process every image; return the (file, reason) of those that failed."""
    net, spec = load_finetuned(model)
    out.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[Path, str]] = []
    used: set[str] = set()
    progress = tqdm(images, unit="image", disable=len(images) < 2, file=sys.stderr)
    for path in progress:
        try:
            rgb = load_photo(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            failures.append((path, str(error)))
            tqdm.write(f"skipped {path}: unreadable image: {error}", file=sys.stderr)
            continue
        write_outputs(predict_depth(net, spec, rgb), out, unique_stem(path, used))
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    parser.add_argument(
        "--model", type=Path, required=True, help="a models/finetune/<name> folder or its model.pt"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    images = find_images(args.paths)
    if not images:
        raise DepthpipeError("no image found in " + ", ".join(map(str, args.paths)))
    failures = predict_files(images, args.model, args.out)
    done = len(images) - len(failures)
    print(f"predict: {done} depth map(s) written to {args.out}, {len(failures)} failed")
    if failures:
        for path, reason in failures:
            print(f"  failed {path}: {reason}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
