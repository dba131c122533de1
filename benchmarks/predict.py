"""Peak memory and time of ``python -m depthpipe.predict`` on big photos.

    python benchmarks/predict.py

Writes a 12 MP (4000x3000) and a 108 MP (12000x9000) JPEG, and a 0.3 MP (640x480) one for the
fixed start-up cost, into a temporary folder (a synthetic scene rendered at 400x300 and enlarged,
quality 90), and an untrained but real ResNet-18 U-Net at params.yaml's training size (weights do
not change the cost). Runs predict on each photo in its own process and prints that process's
peak resident memory (``ru_maxrss`` from ``wait4``) and wall time, interpreter start-up and
imports included. The last line says whether the 108 MP photo stayed under the 3 GB budget; the
exit status is 1 if not. About 1.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from depthpipe.config import load_params
from depthpipe.data import synthetic
from depthpipe.model import DepthNet, ModelSpec, build_unet_for_inference, save_finetuned

ROOT = Path(__file__).resolve().parents[1]
# (width, height); the 0.3 MP photo shows the fixed cost: interpreter, torch, Lightning, fastai
PHOTOS = {"0.3 MP": (640, 480), "12 MP": (4000, 3000), "108 MP": (12000, 9000)}
BUDGET_BYTES = 3 * 1024**3  # the 108 MP photo must stay under this peak RSS


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_bytes: int


def write_photo(path: Path, size: tuple[int, int]) -> None:
    """A rendered outdoor scene enlarged to ``size``: real structure for the network to see."""
    scene = synthetic.make_scene(0, 7000)
    camera, _, _ = synthetic.view_camera(0, 7000, 0, 0, 400, 300)
    image, _, _ = synthetic.render(scene, camera)
    Image.fromarray(image).resize(size, Image.Resampling.BICUBIC).save(path, quality=90)


def write_model(folder: Path) -> None:
    params = load_params(ROOT / "params.yaml")
    spec = ModelSpec(
        arch="resnet18",
        height=params.preprocess.height,
        width=params.preprocess.width,
        min_depth=params.depth.min_depth,
        max_depth=params.depth.max_depth,
    )
    torch.manual_seed(0)
    save_finetuned(DepthNet(build_unet_for_inference(spec)), spec, folder)


def run_predict(photo: Path, model: Path, out: Path, env: dict[str, str]) -> Run:
    """One predict process; its own peak RSS from wait4 (Linux reports ru_maxrss in KiB)."""
    command = [sys.executable, "-m", "depthpipe.predict", str(photo), "--model", str(model)]
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with log.open("w") as stderr:
        child = subprocess.Popen(
            [*command, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=stderr, env=env
        )
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if child.returncode != 0:
        sys.exit(f"predict failed on {photo.name} (exit {child.returncode}):\n{log.read_text()}")
    return Run(seconds=seconds, peak_bytes=usage.ru_maxrss * 1024)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="depthpipe-predict-bench-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, "MPLCONFIGDIR": str(folder / "matplotlib")}
        write_model(folder / "model")
        runs = {}
        for label, size in PHOTOS.items():
            photo = folder / f"photo_{size[0]}x{size[1]}.jpg"
            write_photo(photo, size)
            runs[label] = run_predict(photo, folder / "model", folder / f"out_{size[0]}", env)
            run = runs[label]
            print(
                f"predict {label} ({size[0]}x{size[1]} JPEG): {run.seconds:.1f} s, "
                f"peak RSS {run.peak_bytes / 1024**3:.2f} GB"
            )
            photo.unlink()
    within = runs["108 MP"].peak_bytes < BUDGET_BYTES
    print(f"108 MP peak RSS under {BUDGET_BYTES / 1024**3:.0f} GB: {'yes' if within else 'NO'}")
    if not within:
        sys.exit(1)


if __name__ == "__main__":
    main()
