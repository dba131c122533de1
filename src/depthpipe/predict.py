"""Depth maps for your own photos with a fine-tuned model.

    python -m depthpipe.predict PATH... --model models/finetune/conservative --out predictions/

--model is a fine-tuned network's folder (model.pt + model.json): models/finetune/<name>, or the
folder ``dvc artifacts get <repo> depth-<name>`` downloads from the model registry.

PATH may be image files or folders (searched recursively). Any size up to MAX_PIXELS (200 MP);
RGB, RGBA, greyscale (8 or 16 bit) or palette; the EXIF orientation is applied first, as a photo
viewer would. For each image, writes ``<stem>_depth.npy`` (float32 metres, the input's height and
width) and ``<stem>_depth.png`` (coloured, near = bright). The depth comes from
``depthpipe.model.predict_depth``, the function the evaluate stage scores. An unreadable or too
large file is reported and skipped; the exit status is 1 at the end if any file failed. An output
folder that cannot be written is an error before any work (exit status 2).

Memory stays bounded for huge photos: the network input is resized from the 8-bit image, and the
full-resolution depth is made, written and coloured in horizontal strips of STRIP_PIXELS.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from depthpipe.atomic import atomic_file
from depthpipe.errors import DepthpipeError, run_cli
from depthpipe.model import DepthNet, DepthPrediction, ModelSpec, load_finetuned, predict_depth
from depthpipe.paths import ENCODER_FILE, MODEL_WEIGHTS, is_image
from depthpipe.plots import DEPTH_CMAP  # one colour map for depth everywhere

# Larger inputs are skipped: 200 MP decode to 0.8 GB of RGB and give 0.8 GB of float32 depth.
# It replaces PIL's decompression-bomb limit in main() (PIL's default refuses 179 MP).
MAX_PIXELS = 200_000_000
STRIP_PIXELS = 4_000_000  # full-resolution pixels upsampled, written and coloured at a time
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # "I": 16-bit PNGs in older Pillow
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class SkippedPhoto(Exception):
    """A photo that cannot be used; the message is the reason shown to the user."""


def find_images(inputs: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if is_image(p)))
        elif path.exists():
            found.append(path)
        else:
            raise DepthpipeError(f"{path}: no such file or folder")
    return found


def check_pixel_count(photo: Image.Image) -> None:
    """Refuse a photo over MAX_PIXELS from its header, before decoding (a crafted PNG header can
    claim 10 gigapixels in a few bytes)."""
    pixels = photo.width * photo.height
    if pixels > MAX_PIXELS:
        raise SkippedPhoto(
            f"too large: {photo.width}x{photo.height} = {pixels:,} pixels, "
            f"more than the limit of {MAX_PIXELS:,} (MAX_PIXELS)"
        )


def sixteen_to_eight_bit(photo: Image.Image) -> Image.Image:
    """16-bit greyscale to 8 bits, 0..65535 onto 0..255 (``convert`` would clip at 255)."""
    values = np.asarray(photo).astype(np.uint32, copy=False)
    return Image.fromarray(((np.minimum(values, 65535) + 128) // 257).astype(np.uint8), mode="L")


def on_white(photo: Image.Image) -> Image.Image:
    """Composite transparency on white rather than on whatever colour sits under alpha 0."""
    rgba = photo.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba)


def to_rgb(photo: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL opens, without copying a photo that already is RGB."""
    if photo.mode in SIXTEEN_BIT_MODES:
        photo = sixteen_to_eight_bit(photo)
    if photo.mode in ALPHA_MODES or "transparency" in photo.info:
        photo = on_white(photo)
    return photo if photo.mode == "RGB" else photo.convert("RGB")


def load_photo(path: Path) -> Image.Image:
    """The photo as 8-bit RGB after EXIF orientation; SkippedPhoto if unreadable or too large."""
    try:
        with Image.open(path) as photo:
            check_pixel_count(photo)
            photo.load()
            ImageOps.exif_transpose(photo, in_place=True)
            return to_rgb(photo)
    except Image.DecompressionBombError as error:  # PIL's limit, if lower than MAX_PIXELS
        raise SkippedPhoto(f"too large: {error}") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise SkippedPhoto(f"unreadable image: {error}") from error


@cache
def colour_table() -> np.ndarray:
    """(256, 3) uint8 colours of DEPTH_CMAP, so a strip is coloured by one table look-up."""
    import matplotlib

    rgba = matplotlib.colormaps[DEPTH_CMAP](np.linspace(0.0, 1.0, 256))
    return (rgba[:, :3] * 255).round().astype(np.uint8)


def colour_range(prediction: DepthPrediction) -> tuple[float, float]:
    """1st and 99th percentile of log depth, from the network-resolution prediction: the
    full-resolution map only interpolates between its values, and every strip needs one range."""
    lo, hi = np.percentile(np.log(prediction.coarse()), [1, 99])
    return float(lo), float(max(hi, lo + 1e-6))


def colourise(depth: np.ndarray, log_range: tuple[float, float]) -> np.ndarray:
    """(H, W, 3) uint8 for (H, W) metres: log depth across ``log_range``, near = bright."""
    lo, hi = log_range
    scaled = np.clip((np.log(depth) - lo) / (hi - lo), 0.0, 1.0)
    return np.take(colour_table(), (scaled * 255 + 0.5).astype(np.uint8), axis=0)


def write_npy_header(handle: BinaryIO, shape: tuple[int, int]) -> None:
    """The header np.save writes for a C-ordered little-endian float32 array of ``shape``;
    the rows follow as raw bytes, strip by strip."""
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(handle, header)


def write_outputs(prediction: DepthPrediction, out: Path, stem: str) -> None:
    """``<stem>_depth.npy`` and ``<stem>_depth.png``, built strip by strip, published together."""
    shape = (prediction.height, prediction.width)
    log_range = colour_range(prediction)
    picture = Image.new("RGB", (prediction.width, prediction.height))
    with (
        atomic_file(out / f"{stem}_depth.npy") as staged_npy,
        atomic_file(out / f"{stem}_depth.png") as staged_png,
    ):
        with staged_npy.open("wb") as handle:
            write_npy_header(handle, shape)
            for top, strip in prediction.strips(STRIP_PIXELS):
                handle.write(strip.astype("<f4", copy=False).tobytes())
                picture.paste(Image.fromarray(colourise(strip, log_range)), (0, top))
        # zlib level 1: half the time of the default 6 on a 108 MP map, 1.5x the bytes; the
        # picture is a preview, the data is the .npy.
        picture.save(staged_png, format="PNG", compress_level=1)


def unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:  # two inputs with one name (from different folders)
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def prepare_output(out: Path) -> None:
    """Create ``out`` and make sure files can be created in it, before any work: otherwise each
    photo would be predicted and then fail the same way."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise DepthpipeError(f"{out}: cannot write the output folder: {reason}") from error


def predict_photo(net: DepthNet, spec: ModelSpec, path: Path) -> DepthPrediction:
    """The photo's prediction; the decoded photo is freed on return, before outputs are made."""
    return predict_depth(net, spec, [load_photo(path)])[0]


def check_not_encoder(model: Path) -> None:
    """Refuse an encoder (a file, or a folder holding one) with what to use instead: encoders
    and fine-tuned networks are both models in the registry (encoder-*, depth-*), and without
    this the error would only say that model.json is missing."""
    if model.name == ENCODER_FILE or (model / ENCODER_FILE).is_file():
        raise DepthpipeError(
            f"{model}: an encoder, not a fine-tuned depth network; --model takes a "
            "models/finetune/<name> folder or one downloaded with "
            "`dvc artifacts get <repo> depth-<name>`"
        )


def predict_files(images: list[Path], model: Path, out: Path) -> list[tuple[Path, str]]:
    """Process every image; return the (file, reason) of those that were skipped."""
    check_not_encoder(model)
    prepare_output(out)
    net, spec = load_finetuned(model)
    failures: list[tuple[Path, str]] = []
    used: set[str] = set()
    progress = tqdm(images, unit="image", disable=len(images) < 2, file=sys.stderr)
    for path in progress:
        try:
            prediction = predict_photo(net, spec, path)
        except SkippedPhoto as error:
            failures.append((path, str(error)))
            tqdm.write(f"skipped {path}: {error}", file=sys.stderr)
            continue
        stem = unique_stem(path, used)
        try:
            write_outputs(prediction, out, stem)
        except OSError as error:  # a full disk fails every later file too: stop here
            raise DepthpipeError(f"{out / stem}_depth.*: cannot write: {error}") from error
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help=f"a models/finetune/<name> folder (or one downloaded with `dvc artifacts get <repo> "
        f"depth-<name>`) or its {MODEL_WEIGHTS}",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    # check_pixel_count enforces MAX_PIXELS at the moment PIL's own bomb check would (header
    # read, nothing decoded), with a clearer message; PIL's would warn from 89 MP and refuse 179.
    Image.MAX_IMAGE_PIXELS = None
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
