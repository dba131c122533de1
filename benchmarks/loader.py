"""Training-loader throughput: the tutorial's loader against depthpipe's, on one CPU core.

    python benchmarks/loader.py [--samples 12] [--seconds 8]

Renders ``--samples`` DIODE-layout samples at DIODE's full 1024x768 into a temporary folder, then
measures training samples/s of

- tutorial: per sample a PNG decode + ``np.load`` at full size, then torchvision's
  RandomRotation(15) -> RandomResizedCrop(768x768, scale 0.2-0.9) -> RandomHorizontalFlip on the
  concatenated RGB+depth tensor (what the tutorial's DIODEDepthDataset does);
- depthpipe: the packed memory-mapped split written by the preprocess code, through the
  depth-correct DepthAugment, at the training resolution from params.yaml and, for reference, at
  full resolution.

The last line is ``loader speedup vs tutorial: N.Nx`` (depthpipe at the params.yaml resolution).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from depthpipe.config import load_params
from depthpipe.data import diode, synthetic
from depthpipe.data.packed import PackedDepthDataset
from depthpipe.paths import DIODE_TRAIN_SPLIT
from depthpipe.stages.preprocess import pack_split
from depthpipe.transforms import DepthAugment

ROOT = Path(__file__).resolve().parents[1]


class TutorialLoader:
    """The tutorial's per-sample work, re-implemented for measurement."""

    def __init__(self, samples: list[diode.SampleFiles]) -> None:
        self.samples = samples
        self.transform = T.Compose(
            [
                T.RandomRotation(degrees=15),
                T.RandomResizedCrop(size=(768, 768), scale=(0.2, 0.9)),
                T.RandomHorizontalFlip(),
            ]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        files = self.samples[i]
        image = np.array(Image.open(files.image).convert("RGB"))
        depth = np.load(files.depth)
        stacked = torch.cat(
            [
                torch.from_numpy(image).permute(2, 0, 1).float() / 255.0,
                torch.from_numpy(depth).permute(2, 0, 1).float(),
            ]
        )
        out = self.transform(stacked)
        return {"image": out[:3], "depth": out[3:4]}


def samples_per_second(dataset: Callable[[int], object], size: int, seconds: float) -> float:
    dataset(0)  # warm-up: first-touch page faults and lazy opens are not steady state
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        dataset(count % size)
        count += 1
    return count / (time.perf_counter() - start)


def render_samples(root: Path, count: int) -> list[diode.SampleFiles]:
    views = min(count, 216)
    scans = -(-count // views)
    synthetic.write_diode_split(
        root,
        DIODE_TRAIN_SPLIT,
        range(1, 2),
        scans,
        views,
        (1024, 768),
        seed=0,
        domain=diode.OUTDOOR,
    )
    return diode.list_samples(root, DIODE_TRAIN_SPLIT)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core, as one DataLoader worker gets
    params = load_params(ROOT / "params.yaml")
    augment = DepthAugment(params.finetune.augment, params.depth)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        print(f"rendering {args.samples} DIODE-layout samples at 1024x768 ...", flush=True)
        samples = render_samples(raw, args.samples)
        tutorial = TutorialLoader(samples)
        rate_tutorial = samples_per_second(tutorial.__getitem__, len(samples), args.seconds)
        print(f"tutorial loader (PNG + npy, 768x768 crops): {rate_tutorial:8.1f} samples/s")
        rates = {}
        sizes = {
            "params.yaml": (params.preprocess.height, params.preprocess.width),
            "full": (768, 1024),
        }
        for label, size in sizes.items():
            packed_dir = Path(tmp) / f"packed-{size[0]}x{size[1]}"
            pack_split(samples, packed_dir, size, raw, skipped=[])
            ours = PackedDepthDataset(packed_dir, transform=augment)
            rates[label] = samples_per_second(ours.__getitem__, len(ours), args.seconds)
            print(
                f"depthpipe loader ({label}, {size[0]}x{size[1]}): {rates[label]:8.1f} samples/s"
                f"  ({rates[label] / rate_tutorial:.1f}x)"
            )
    print(f"loader speedup vs tutorial: {rates['params.yaml'] / rate_tutorial:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
