"""Peak memory and time of the prior over a training split packed at 768x1024: it must stay flat.

    python benchmarks/prior.py [--samples 16 64] [--chunk-pixels 6291456] [--cache DIR]

For each count N, ``N`` synthetic samples at the tutorial's packed size (768x1024) are written
with the project's own packing code (``PackedWriter`` + ``write_slot``, as preprocess does):
depth growing towards the top of the frame with log-normal noise, about a fifth of the pixels
invalid, black images (the prior never reads them). Then, each in a fresh process:

- ``packed_prior``: the split read ``--chunk-pixels`` at a time, a memory map per chunk;
- ``held map``: ``mean_log_depth`` on ``PackedDepthDataset(...).arrays()``, one memory map held
  over the whole pass (how the prior read the split before): each page read stays resident,
  about 3.9 MB per sample (float32 depth + bool mask), 51 GB for the 12,927 tutorial samples.

Peak resident memory is the child's own ``VmHWM`` (from /proc/self/status, Linux only), read
right after its imports and again after the prior; not ``ru_maxrss`` of a child, which Linux
starts at the parent's peak. The difference is the prior's own cost: for ``packed_prior`` it
must not grow with N. The split was just written, so its pages are in the page cache: the
seconds are those of a warm cache (a cold read of the tutorial's 50 GB is bounded by the disk).
About 1 minute, 0.5 GB of disk for the default counts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from depthpipe.data.packed import PackedWriter, write_slot
from depthpipe.prior import CHUNK_PIXELS

ROOT = Path(__file__).resolve().parents[1]
MB = 1024**2
FULL_SIZE = (768, 1024)  # (height, width): the tutorial's packed size
MODES = ("packed_prior", "held map")

# Runs in a fresh process: the prior over one split, its seconds and peak RSS (VmHWM, KiB).
CHILD = """
import json, sys, time
from pathlib import Path

def peak_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    sys.exit("no VmHWM in /proc/self/status: this benchmark needs Linux")

from depthpipe.config import load_params
from depthpipe.data.packed import PackedDepthDataset
from depthpipe.prior import mean_log_depth, packed_prior

split, mode, chunk_pixels = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
depth = load_params(Path(sys.argv[4])).depth
imported = peak_kib()
start = time.perf_counter()
if mode == "packed_prior":
    packed_prior(split, depth, chunk_pixels=chunk_pixels)
else:
    arrays = PackedDepthDataset(split).arrays()
    mean_log_depth(arrays["depth"], arrays["mask"], depth.min_depth, depth.max_depth)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "imported_kib": imported, "peak_kib": peak_kib()}))
"""


def synthetic_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image, (H, W) float32 metres, (H, W) bool mask at FULL_SIZE."""
    height, width = FULL_SIZE
    rows = np.linspace(80.0, 3.0, height, dtype=np.float32)[:, None]  # far at the top, metres
    depth = (rows * rng.lognormal(0.0, 0.3, size=FULL_SIZE)).astype(np.float32)
    mask = rng.random(FULL_SIZE) > 0.2
    return np.zeros((height, width, 3), np.uint8), depth, mask


def packed_split(folder: Path, samples: int) -> Path:
    """A training split of ``samples`` synthetic samples (written once per ``--cache``)."""
    if (folder / "index.json").is_file():
        return folder
    writer = PackedWriter(folder, capacity=samples, size=FULL_SIZE)
    rng = np.random.default_rng(samples)
    for slot in range(samples):
        write_slot(folder, slot, *synthetic_sample(rng))
    writer.close([(slot, {"name": f"synthetic_{slot:05d}"}) for slot in range(samples)])
    return folder


def measure(split: Path, mode: str, chunk_pixels: int) -> dict[str, float]:
    params = ROOT / "params.yaml"  # the committed depth range
    command = [sys.executable, "-c", CHILD, str(split), mode, str(chunk_pixels), str(params)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{mode} on {split} failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)


def print_table(runs: dict[tuple[int, str], dict[str, float]], chunk_pixels: int) -> None:
    per_sample = FULL_SIZE[0] * FULL_SIZE[1]
    print(
        f"prior over a training split packed at {FULL_SIZE[0]}x{FULL_SIZE[1]}, chunk_pixels "
        f"{chunk_pixels} ({max(1, chunk_pixels // per_sample)} samples per chunk)"
    )
    print(f"{'samples':>7} {'mode':>12} {'peak RSS MB':>12} {'prior MB':>9} {'seconds':>8}")
    for (samples, mode), run in runs.items():
        own = (run["peak_kib"] - run["imported_kib"]) / 1024
        print(
            f"{samples:7d} {mode:>12} {run['peak_kib'] / 1024:12.0f} {own:9.0f} "
            f"{run['seconds']:8.2f}"
        )
    counts = sorted({samples for samples, _ in runs})
    for mode in MODES:
        for small, large in itertools.pairwise(counts):
            grown = (runs[large, mode]["peak_kib"] - runs[small, mode]["peak_kib"]) / 1024
            print(
                f"{mode}: peak RSS N={large} minus N={small}: {grown:+.0f} MB "
                f"({grown / (large - small):+.2f} MB per extra sample)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--chunk-pixels", type=int, default=CHUNK_PIXELS)
    parser.add_argument("--cache", type=Path, help="keep the packed splits here for the next run")
    args = parser.parse_args()
    if len(args.samples) < 2 or min(args.samples) < 1:
        parser.error("--samples needs at least two positive counts to compare")
    with tempfile.TemporaryDirectory() as tmp:
        cache = (args.cache or Path(tmp)).resolve()
        runs = {}
        for samples in sorted(set(args.samples)):
            split = packed_split(cache / f"synthetic-train-{samples}", samples)
            for mode in MODES:
                runs[samples, mode] = measure(split, mode, args.chunk_pixels)
        print_table(runs, args.chunk_pixels)


if __name__ == "__main__":
    main()
