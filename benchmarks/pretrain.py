"""Pretraining throughput: LightlyTrain on preprocessed images against raw full-size JPEGs.

    python benchmarks/pretrain.py [--images 32] [--epochs 2]

Writes ``--images`` photos at MegaDepth's typical size (1600x1200 JPEG, quality 90) into a
temporary folder, shrinks a copy with the preprocess stage's resize (short side from
params.yaml), then runs the same LightlyTrain pretraining (params.yaml's method, architecture,
batch size, crop size and the conservative preset; CPU) on each folder and prints images/s.
The last line is ``pretraining speedup from preprocessing: N.Nx``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from depthpipe.config import load_params
from depthpipe.data import megadepth, synthetic
from depthpipe.stages.pretrain import lightly_arguments

ROOT = Path(__file__).resolve().parents[1]
RAW_SIZE = (1600, 1200)  # px: MegaDepth's long side reaches about 1600


def write_raw_photos(folder: Path, count: int) -> None:
    """Rendered scenes, enlarged to full photo size: decoding cost is what is measured."""
    folder.mkdir(parents=True)
    scene = synthetic.make_scene(0, 7000)
    for i in range(count):
        camera, _, _ = synthetic.view_camera(0, 7000, 0, i, 400, 300)
        image, _, _ = synthetic.render(scene, camera)
        photo = Image.fromarray(image).resize(RAW_SIZE, Image.Resampling.BICUBIC)
        photo.save(folder / f"{i:04d}.jpg", quality=90)


def shrink(source: Path, target: Path, short_side: int) -> None:
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.jpg")):
        small = megadepth.resize_short_side(megadepth.load_rgb(path), short_side)
        small.save(target / path.name, quality=95)


def images_per_second(data: Path, out: Path, arguments: dict, count: int) -> float:
    import lightly_train

    start = time.perf_counter()
    lightly_train.pretrain(out=str(out), data=str(data), overwrite=True, **arguments)
    return count * arguments["epochs"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    arguments = {**lightly_arguments(params, "conservative"), "epochs": args.epochs}
    arguments.update(accelerator="cpu", devices=1, num_nodes=1, strategy="auto")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("LIGHTLY_TRAIN_CACHE_DIR", str(Path(tmp) / "cache"))
        raw, small = Path(tmp) / "raw", Path(tmp) / "small"
        write_raw_photos(raw, args.images)
        shrink(raw, small, params.preprocess.megadepth_short_side)
        rates = {}
        for label, folder in (("raw 1600x1200 JPEGs", raw), ("preprocessed", small)):
            rates[label] = images_per_second(folder, Path(tmp) / label, arguments, args.images)
        for label, rate in rates.items():
            print(f"pretraining on {label}: {rate:.2f} images/s")
    speedup = rates["preprocessed"] / rates["raw 1600x1200 JPEGs"]
    print(f"pretraining speedup from preprocessing: {speedup:.1f}x")


if __name__ == "__main__":
    main()
