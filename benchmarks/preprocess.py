"""DIODE packing throughput of the preprocess stage with 1 and 2 worker processes.

    python benchmarks/preprocess.py [--samples 64] [--rendered 4] [--size 48x64]

Renders ``--rendered`` DIODE-layout samples at DIODE's own 1024x768 with the synthetic writer (as
benchmarks/loader.py does; about 10 s each on one core, not timed) and copies them under other
scan folders up to ``--samples``, then packs them as the preprocess stage does (decode the PNG and
both .npy files, check, resize to ``--size``, write the memory-mapped split) with
``preprocess.workers`` = 1 and 2, and prints samples/s for each. The packed files of both runs are
compared byte for byte. The last line is ``speedup with 2 workers: N.NNx``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from loader import render_samples  # benchmarks/loader.py: same 1024x768 samples

from depthpipe.data import diode
from depthpipe.stages.preprocess import pack_split


def digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            sha.update(path.name.encode() + path.read_bytes())
    return sha.hexdigest()


def copies(rendered: list[diode.SampleFiles], count: int) -> list[diode.SampleFiles]:
    """``count`` samples: the rendered ones, then byte copies of them in new scan folders."""
    samples = list(rendered)
    while len(samples) < count:
        source = rendered[len(samples) % len(rendered)]
        scan = f"scan_{90000 + len(samples):05d}"
        copy = diode.SampleFiles(
            source.split, source.scene, scan, source.stem, source.folder.parent / scan
        )
        copy.folder.mkdir(parents=True, exist_ok=True)
        for old, new in zip(
            (source.image, source.depth, source.mask),
            (copy.image, copy.depth, copy.mask),
            strict=True,
        ):
            shutil.copyfile(old, new)
        samples.append(copy)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rendered", type=int, default=4)
    parser.add_argument("--size", default="48x64", help="packed HxW (params.yaml's demo: 48x64)")
    args = parser.parse_args()
    height, width = (int(side) for side in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        print(f"rendering {args.rendered} DIODE-layout samples at 1024x768 ...", flush=True)
        samples = copies(render_samples(raw, args.rendered), args.samples)
        rates, digests = {}, {}
        for workers in (1, 2):
            out = Path(tmp) / f"packed-{workers}"
            start = time.perf_counter()
            pack_split(samples, out, (height, width), raw, skipped=[], workers=workers)
            rates[workers] = len(samples) / (time.perf_counter() - start)
            digests[workers] = digest(out)
            label = f"preprocess, {workers} worker(s), {height}x{width}"
            print(f"{label}: {rates[workers]:6.2f} samples/s")
    same = "identical" if digests[1] == digests[2] else "DIFFERENT"
    print(f"packed files of 1 and 2 workers: {same}")
    print(f"speedup with 2 workers: {rates[2] / rates[1]:.2f}x")
    return 0 if same == "identical" else 1


if __name__ == "__main__":
    sys.exit(main())
