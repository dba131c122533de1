"""Peak memory of the evaluate stage for 8, 16 and 64 full-size test images: it must not grow.

    python benchmarks/evaluate.py [--images 8 16 64] [--cache DIR]

For each count N, a temporary project whose synthetic data have a test split of exactly N images
at DIODE's 1024x768 (N val scenes of one view each; 2 train scenes of one view, split into
train and validation), made by the real fetch and preprocess stages (packed at 96x128, so the
networks are cheap; the test images stay full size, as evaluate scores them), and two untrained
but real ResNet-18 U-Nets in models/finetune/<aug> and models/finetune/scratch (weights do not
change the cost). Then ``python -m depthpipe.stages.evaluate --root`` runs in its own process;
its peak resident memory (``ru_maxrss``, read through a small launcher process: see
``measured``) and wall time are printed, and the growth per extra image between consecutive
counts. A run of ``import depthpipe.stages.evaluate`` alone gives the fixed cost of the
interpreter and the libraries.

How to read it: 8 images are one forward batch (``evaluate.batch_size`` 8). From the second
batch on, the ``grid_images`` kept for the picture (image, depth, mask and three full-size
predictions: about 16 MB each at 1024x768) stay in memory while later batches are scored, so
the peak steps up once between 8 and 16; from 16 to 64 it must stay flat.

The prior (depthpipe.prior) is measured on its own, at the scale where it costs something: the
tutorial profile packs the training split at 768x1024 and evaluate averages all of it. The
rendered test images are packed at 768x1024 as 64- and 128-sample training splits and
``packed_prior`` runs on each in its own process (peak RSS, which counts the memory-mapped file
pages it touched, and tracemalloc's peak of numpy's own allocations); ``prior_depth`` per test
image is timed in this process.

Rendering is the slow part (about 8 s per 1024x768 view on one core, 94 views for the three
counts): the raw and packed data are kept in ``--cache`` and reused by the next run. About 30
minutes on 2 busy CPU cores the first time, 15 minutes after.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from depthpipe.cli import configure_environment
from depthpipe.config import Params, load_params
from depthpipe.data import diode
from depthpipe.data.packed import read_index
from depthpipe.encoders import build_resnet
from depthpipe.model import DepthNet, ModelSpec, build_unet, save_finetuned
from depthpipe.paths import DIODE_VAL_SPLIT, SCRATCH, TEST_SPLIT, ProjectPaths, project_paths
from depthpipe.prior import packed_prior, prior_depth
from depthpipe.stages import fetch, preprocess

ROOT = Path(__file__).resolve().parents[1]
MB = 1024**2
FULL_SIZE = (768, 1024)  # (height, width): DIODE's images, and the tutorial's packed size
NETWORK_SIZE = (96, 128)  # (height, width) packed and fed to the networks: cheap forwards
PRIOR_SPLITS = (64, 128)  # training samples packed at FULL_SIZE for the prior's cost

# Runs ``argv[2:]`` and writes its peak RSS (KiB) to ``argv[1]``; exits with its status.
LAUNCHER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""
# Runs in a child process: the prior over one packed split, its time and numpy's peak bytes.
PRIOR_PROGRAM = """
import json, sys, time, tracemalloc
from pathlib import Path
from depthpipe.config import load_params
from depthpipe.prior import packed_prior
depth = load_params(Path(sys.argv[2])).depth
tracemalloc.start()
start = time.perf_counter()
packed_prior(Path(sys.argv[1]), depth)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "numpy_peak": tracemalloc.get_traced_memory()[1]}))
"""


def size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_bytes: int
    stdout: str


def bench_params(test_images: int) -> dict[str, Any]:
    """The committed params with data that give exactly ``test_images`` full-size test images."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = "synthetic"
    params["data"]["diode_domains"] = [diode.OUTDOOR]
    params["data"]["synthetic"].update(
        width=FULL_SIZE[1],
        height=FULL_SIZE[0],
        train_scenes=2,  # one for train, one for validation: preprocess splits by scene
        val_scenes=test_images,  # one view per scene: N test images, N scans
        scans_per_scene=1,
        views_per_scan=1,
        megadepth_scenes=1,  # fetch needs MegaDepth photos; evaluate never reads them
        megadepth_images_per_scene=1,
        megadepth_long_side=64,
    )
    params["preprocess"].update(
        height=NETWORK_SIZE[0], width=NETWORK_SIZE[1], val_fraction=0.5, workers=0
    )
    params["model"]["arch"] = "resnet18"
    return params


def prepared_project(test_images: int, cache: Path) -> ProjectPaths:
    """A project with raw and packed data for ``test_images`` (rendered once per cache)."""
    paths = project_paths(cache / f"test-{test_images}")
    if not paths.preprocess_report.is_file():
        paths.root.mkdir(parents=True, exist_ok=True)
        params_text = yaml.safe_dump(bench_params(test_images), sort_keys=False)
        paths.params.write_text(params_text)
        params = load_params(paths.params)
        start = time.perf_counter()
        fetch.run(params, paths)
        preprocess.run(params, paths)
        seconds = time.perf_counter() - start
        print(f"N={test_images}: data rendered and packed in {seconds:.0f} s", flush=True)
    return paths


def write_untrained_models(params: Params, paths: ProjectPaths) -> None:
    """The two model folders evaluate reads, as finetune writes them, without training."""
    spec = ModelSpec(
        arch=params.model.arch,
        height=params.preprocess.height,
        width=params.preprocess.width,
        min_depth=params.depth.min_depth,
        max_depth=params.depth.max_depth,
    )
    for seed, name in enumerate((params.aug, SCRATCH)):
        torch.manual_seed(seed)
        net = DepthNet(build_unet(build_resnet(spec.arch), spec))
        save_finetuned(net, spec, paths.finetune_dir(name))


def measured(command: list[str], env: dict[str, str]) -> Run:
    """Run ``command``; its peak RSS as a small launcher process sees it.

    Not ``wait4`` on a child of this process: Linux starts a child's ``ru_maxrss`` at its
    parent's peak RSS (exec records the old memory's high-water mark), and this process has
    held rendered images and networks, so every child would read at least that. The launcher
    is a bare interpreter (about 10 MB); its child's figure is the command's own.
    """
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "maxrss"
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        start = time.perf_counter()
        with out.open("wb") as stdout, err.open("wb") as stderr:
            code = subprocess.call(
                [sys.executable, "-c", LAUNCHER, str(peak_file), *command],
                stdout=stdout,
                stderr=stderr,
                env=env,
            )
        seconds = time.perf_counter() - start
        if code != 0:
            sys.exit(f"{' '.join(command)} failed (exit {code}):\n{err.read_text()}")
        peak_kib = int(peak_file.read_text())  # Linux reports ru_maxrss in KiB
        return Run(seconds, peak_kib * 1024, out.read_text())


def run_evaluate(paths: ProjectPaths, env: dict[str, str]) -> Run:
    command = [sys.executable, "-m", "depthpipe.stages.evaluate", "--root", str(paths.root)]
    run = measured(command, env)
    report = json.loads(paths.evaluate_metrics.read_text())
    expected = len(read_index(paths.packed_split(TEST_SPLIT))["samples"])
    if report["test_images"] != expected:
        sys.exit(f"evaluate scored {report['test_images']} test images, expected {expected}")
    return run


def evaluate_table(counts: list[int], cache: Path, env: dict[str, str]) -> dict[int, Run]:
    runs = {}
    for count in counts:
        paths = prepared_project(count, cache)
        write_untrained_models(load_params(paths.params), paths)
        runs[count] = run_evaluate(paths, env)
    return runs


def print_evaluate(runs: dict[int, Run], imports: Run, params: Params) -> None:
    print(
        f"\nevaluate at {size_text(FULL_SIZE)} (networks at {size_text(NETWORK_SIZE)}, "
        f"evaluate.batch_size {params.evaluate.batch_size}, "
        f"grid_images {params.evaluate.grid_images})"
    )
    print(f"{'test images':>12} {'peak RSS MB':>12} {'seconds':>8} {'images/s':>9}")
    print(f"{'imports only':>12} {imports.peak_bytes / MB:12.0f} {imports.seconds:8.1f} {'':>9}")
    for count, run in runs.items():
        print(
            f"{count:12d} {run.peak_bytes / MB:12.0f} {run.seconds:8.1f} {count / run.seconds:9.2f}"
        )
    counts = sorted(runs)
    for small, large in itertools.pairwise(counts):
        grown = (runs[large].peak_bytes - runs[small].peak_bytes) / MB
        print(
            f"peak RSS N={large} minus N={small}: {grown:+.1f} MB "
            f"({grown / (large - small):+.2f} MB per extra image)"
        )
    small, large = counts[0], counts[-1]
    rate = (large - small) / (runs[large].seconds - runs[small].seconds)
    print(f"marginal speed (start-up excluded): {rate:.2f} images/s")


def full_size_samples(paths: ProjectPaths) -> list[diode.SampleFiles]:
    return diode.list_samples(paths.raw_diode, DIODE_VAL_SPLIT)


def prior_splits(samples: list[diode.SampleFiles], raw: Path, cache: Path) -> dict[int, Path]:
    """Training splits of PRIOR_SPLITS samples at FULL_SIZE (the rendered views, repeated)."""
    splits = {}
    for count in PRIOR_SPLITS:
        folder = cache / f"prior-train-{count}"
        if not (folder / "index.json").is_file():
            repeated = [samples[i % len(samples)] for i in range(count)]
            workers = preprocess.worker_count(0)
            preprocess.pack_split(repeated, folder, FULL_SIZE, raw, skipped=[], workers=workers)
        splits[count] = folder
    return splits


def print_prior(paths: ProjectPaths, cache: Path, env: dict[str, str]) -> None:
    params = load_params(paths.params)
    splits = prior_splits(full_size_samples(paths), paths.raw_diode, cache)
    imports = measured([sys.executable, "-c", "import depthpipe.prior, depthpipe.config"], env)
    print(f"\nprior over a training split packed at {size_text(FULL_SIZE)} (packed_prior)")
    header = ("train samples", "peak RSS MB", "numpy peak MB", "seconds", "s/sample")
    print(
        " ".join(f"{name:>{width}}" for name, width in zip(header, (13, 12, 14, 8, 9), strict=True))
    )
    print(f"{'imports only':>13} {imports.peak_bytes / MB:12.0f}")
    for count, folder in splits.items():
        command = [sys.executable, "-c", PRIOR_PROGRAM, str(folder), str(paths.params)]
        run = measured(command, env)
        child = json.loads(run.stdout)
        print(
            f"{count:13d} {run.peak_bytes / MB:12.0f} {child['numpy_peak'] / MB:14.0f} "
            f"{child['seconds']:8.2f} {child['seconds'] / count:9.4f}"
        )
    log_prior = packed_prior(splits[PRIOR_SPLITS[0]], params.depth)
    step = FULL_SIZE[0] // NETWORK_SIZE[0]  # 8: a prior at the networks' size, as in this run
    small = np.ascontiguousarray(log_prior[::step, ::step])
    for label, prior in (("768x1024 (tutorial)", log_prior), ("96x128 (this run)", small)):
        repeats = 20
        start = time.perf_counter()
        for _ in range(repeats):
            prior_depth(prior, FULL_SIZE)
        per_image = (time.perf_counter() - start) / repeats
        print(f"prior_depth per test image from a {label} prior: {per_image * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "depthpipe-evaluate-bench"
    )
    args = parser.parse_args()
    if len(args.images) < 2:
        parser.error("--images needs at least two counts to compare")
    cache = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    configure_environment(project_paths(cache))  # telemetry off, matplotlib cache in --cache
    env = dict(os.environ)
    runs = evaluate_table(sorted(set(args.images)), cache, env)
    imports = measured([sys.executable, "-c", "import depthpipe.stages.evaluate"], env)
    largest = project_paths(cache / f"test-{max(runs)}")
    print_evaluate(runs, imports, load_params(largest.params))
    print_prior(largest, cache, env)


if __name__ == "__main__":
    main()
