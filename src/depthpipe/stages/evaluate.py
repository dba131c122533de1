"""evaluate: score finetune@<aug> and finetune@scratch on the test split (DIODE val).

Predictions come from the raw test PNGs through ``depthpipe.model.predict_depth``, the function
``python -m depthpipe.predict`` runs on users' photos, so the reported metrics describe what users
get: a 4:3 test image reaches the network at the training resolution (resized as preprocess
resized the training images) and its log depth is upsampled to the ground truth's own resolution
(the ground truth is never resized). ``evaluate.batch_size`` test images go through the network
per forward pass (images of different sizes in different batches). Valid pixels are the mask file
AND depth within [min_depth, max_depth]; metrics are computed per image and averaged over images
(DIODE devkit). Images are scored as their batch comes out and dropped, except those shown in
the picture grid, so memory holds one batch, not the split.

The networks run where fine-tuning ran them (``depthpipe.hardware.trainer_forward_mode`` of
``finetune.trainer``): on one CUDA GPU when ``accelerator`` is auto, gpu or cuda and a GPU is here,
channels_last, under autocast at ``precision`` resolved as fine-tuning resolves it (auto: bf16 on
a GPU with bf16 tensor cores); otherwise on the CPU in fp32, layouts as they are. Predictions come
back as float32 either way.

Beside the two networks, ``prior.*`` scores the floor to beat: the training split's per-pixel mean
log depth, resized to each test image, a guess that looks at no pixel of it (depthpipe.prior).

metrics/evaluate.json has keys that do not depend on ``aug`` (``encoder.*``, ``scratch.*``,
``prior.*``, ``improvement.*`` and ``over_prior.*`` with scan-level bootstrap intervals), so
``dvc exp show`` lines experiments up column by column. Pictures go to
dvclive/evaluate/plots/images/; the per-image scores to metrics/evaluate_per_image.csv.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from depthpipe.atomic import atomic_outputs
from depthpipe.cli import open_project, stage_arguments
from depthpipe.config import DepthConfig, Params
from depthpipe.data.diode import BadSample, Sample, SampleFiles
from depthpipe.data.diode import read_sample as read_raw_sample
from depthpipe.data.packed import read_index
from depthpipe.errors import DepthpipeError, run_cli
from depthpipe.hardware import ForwardMode, trainer_forward_mode
from depthpipe.metrics import (
    ALIGNED_METRIC_NAMES,
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    average_metrics,
    depth_and_aligned_metrics,
)
from depthpipe.model import DepthNet, ModelSpec, load_finetuned, predict_depth
from depthpipe.paths import (
    DIODE_VAL_SPLIT,
    DVCLIVE_SUMMARY,
    SCRATCH,
    TEST_SPLIT,
    TRAIN_SPLIT,
    ProjectPaths,
)
from depthpipe.plots import comparison_chart, prediction_grid  # also selects the Agg backend
from depthpipe.prior import packed_prior, prior_depth
from depthpipe.stats import paired_cluster_bootstrap, relative_gain

# Fixed, not params.seed: the interval is a function of the per-image scores alone, and
# evaluate does not depend on the training seed.
BOOTSTRAP_SEED = 0
IMPROVEMENT_METRICS = ("abs_rel", "delta1")  # the encoder-vs-scratch gains reported
MODELS = ("encoder", "scratch", "prior")  # "prior" is no network: see depthpipe.prior

Model = tuple[DepthNet, ModelSpec]
TestFile = tuple[str, SampleFiles]  # (sample name, its raw DIODE files)
T = TypeVar("T")


@dataclass
class TestImage:
    name: str
    scan: str  # views of one scan overlap: the unit the bootstrap resamples
    image: np.ndarray  # (H, W, 3) uint8, full resolution
    depth: np.ndarray  # (H, W) float32 metres
    valid: np.ndarray  # (H, W) bool
    predictions: dict[str, np.ndarray]  # model -> (H, W) metres


def raw_files(raw_root: Path, entry: dict[str, str]) -> SampleFiles:
    image = raw_root / entry["image"]
    return SampleFiles(
        split=DIODE_VAL_SPLIT,
        scene=entry["scene"],
        scan=image.parent.name,
        stem=image.stem,
        folder=image.parent,
    )


def split_files(paths: ProjectPaths) -> list[TestFile]:
    """The test split as preprocess validated it (its index), pointing at the raw files."""
    index = read_index(paths.packed_split(TEST_SPLIT))
    return [(entry["name"], raw_files(paths.raw_diode, entry)) for entry in index["samples"]]


def header_size(path: Path) -> tuple[int, int]:
    """(height, width) read from the image file's header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, SyntaxError, ValueError) as error:
        raise DepthpipeError(f"{path}: unreadable test image: {error}") from error


def size_batches(
    items: Iterable[T], batch_size: int, size_of: Callable[[T], tuple[int, int]]
) -> Iterator[list[T]]:
    """Batches of at most ``batch_size`` items of one size (a forward pass needs one size).

    Sorted by size, stably: a split of one size (DIODE's) keeps its order.
    """
    keyed = sorted(((size_of(item), item) for item in items), key=lambda pair: pair[0])
    for _, group in itertools.groupby(keyed, key=lambda pair: pair[0]):
        same_size = [item for _, item in group]
        for start in range(0, len(same_size), batch_size):
            yield same_size[start : start + batch_size]


def read_test_sample(files: SampleFiles) -> Sample:
    try:
        return read_raw_sample(files)
    except BadSample as error:
        raise DepthpipeError(f"{files.image}: {error}") from error


def valid_pixels(sample: Sample, depth: DepthConfig) -> np.ndarray:
    """Scored pixels: a sensor return (mask file) with depth inside the valid range."""
    return sample.mask & (sample.depth >= depth.min_depth) & (sample.depth <= depth.max_depth)


def predict_batch(
    batch: list[TestFile],
    nets: dict[str, Model],
    depth: DepthConfig,
    log_prior: np.ndarray,
    forward: ForwardMode | None = None,
) -> Iterator[TestImage]:
    """One forward pass per network for the batch; full-resolution depth made image by image,
    with the prior's guess for the image's size beside them."""
    samples = [read_test_sample(files) for _, files in batch]
    photos = [Image.fromarray(sample.image) for sample in samples]
    predictions = {
        model: predict_depth(net, spec, photos, forward) for model, (net, spec) in nets.items()
    }
    for i, ((name, _), sample) in enumerate(zip(batch, samples, strict=True)):
        yield TestImage(
            name=name,
            scan=batch[i][1].scan,
            image=sample.image,
            depth=sample.depth,
            valid=valid_pixels(sample, depth),
            predictions={
                **{model: predictions[model][i].full() for model in nets},
                "prior": prior_depth(log_prior, sample.depth.shape),
            },
        )


def predict_test_images(
    paths: ProjectPaths,
    nets: dict[str, Model],
    *,
    batch_size: int,
    depth: DepthConfig,
    forward: ForwardMode | None = None,
) -> Iterator[TestImage]:
    """Every test image with each model's prediction, ``batch_size`` images per forward pass;
    ``forward`` as in ``predict_depth`` (by default the nets' device, fp32)."""
    log_prior = packed_prior(paths.packed_split(TRAIN_SPLIT), depth)
    batches = size_batches(split_files(paths), batch_size, lambda item: header_size(item[1].image))
    for batch in batches:
        yield from predict_batch(batch, nets, depth, log_prior, forward)


def keep_first(images: Iterable[T], kept: list[T], count: int) -> Iterator[T]:
    """Pass ``images`` through, appending the first ``count`` to ``kept`` (for the grid)."""
    for image in images:
        if len(kept) < count:
            kept.append(image)
        yield image


@dataclass(frozen=True)
class ImageScores:
    """One scored test image: its scan and each model's metrics."""

    name: str
    scan: str
    metrics: dict[str, dict[str, float]]  # model -> metric -> value


def score_images(
    images: Iterable[TestImage], params: Params
) -> tuple[dict[str, dict[str, float]], list[ImageScores]]:
    """Per-model averages and per-image scores, over the images with a valid pixel.

    An image counts for every model or for none (the comparison stays paired): which pixels
    count comes from the ground truth alone, the same for every model, and depth_metrics turns a
    model's NaN or infinite output into a depth at the range's edge (sanitise_prediction), so a
    broken model is scored as badly wrong, never left out. Consumes ``images`` one at a time:
    each is scored, then free to go.
    """
    lo, hi = params.depth.min_depth, params.depth.max_depth
    per_image: list[ImageScores] = []
    for im in images:
        if not im.valid.any():
            continue
        metrics = {
            m: depth_and_aligned_metrics(im.predictions[m], im.depth, im.valid, lo, hi)
            for m in MODELS
        }
        per_image.append(ImageScores(im.name, im.scan, metrics))
    if not per_image:
        raise DepthpipeError("evaluate: no test image has a valid pixel")
    averages = {m: average_metrics([s.metrics[m] for s in per_image]) for m in MODELS}
    return averages, per_image


def gain_intervals(
    per_image: list[ImageScores], candidate: str, baseline: str, seed: int
) -> dict[str, float | None]:
    """95% scan-level paired bootstrap intervals of ``candidate``'s relative gain over
    ``baseline`` per metric (``<metric>_low``, ``<metric>_high``), with the sign of
    ``improvement.*``: positive = the candidate is better.

    With a single scan every resample is the same and the interval would collapse to a point,
    claiming a certainty the data cannot give: the bounds are then null (DVC shows "-").
    """
    scans = [s.scan for s in per_image]
    bounds: dict[str, float | None] = {}
    for metric in IMPROVEMENT_METRICS:
        if len(set(scans)) < 2:
            bounds[f"{metric}_low"] = bounds[f"{metric}_high"] = None
            continue
        interval = paired_cluster_bootstrap(
            [s.metrics[candidate][metric] for s in per_image],
            [s.metrics[baseline][metric] for s in per_image],
            scans,
            higher_is_better=HIGHER_IS_BETTER[metric],
            seed=seed,
        )
        bounds[f"{metric}_low"], bounds[f"{metric}_high"] = interval.low, interval.high
    return bounds


def improvement_intervals(per_image: list[ImageScores], seed: int) -> dict[str, float | None]:
    """The encoder over scratch: the intervals of ``improvement.*``."""
    return gain_intervals(per_image, "encoder", "scratch", seed)


def over_prior(
    results: dict[str, dict[str, float]], per_image: list[ImageScores], seed: int
) -> dict[str, float | None]:
    """Each network's relative gain over the prior, with its interval: above zero (low > 0)
    the network has learned more than where things usually are in the frame."""
    gains: dict[str, float | None] = {}
    for model in ("encoder", "scratch"):
        for metric in IMPROVEMENT_METRICS:
            gain = relative_gain(
                np.array(results[model][metric]),
                np.array(results["prior"][metric]),
                HIGHER_IS_BETTER[metric],
            )
            gains[f"{model}_{metric}"] = float(gain)
        for key, bound in gain_intervals(per_image, model, "prior", seed).items():
            gains[f"{model}_{key}"] = bound
    return gains


# The per-image table's scores: the compared metrics, then their scale-aligned twins.
PER_IMAGE_METRICS = (*IMPROVEMENT_METRICS, *ALIGNED_METRIC_NAMES)


def per_image_table(per_image: list[ImageScores]) -> str:
    """CSV, one row per scored test image: what the scatter plot and later studies read."""
    columns = [f"{m}_{metric}" for m in MODELS for metric in PER_IMAGE_METRICS]
    lines = [",".join(["image", "scan", *columns])]
    for s in per_image:
        values = [f"{s.metrics[m][metric]:.6g}" for m in MODELS for metric in PER_IMAGE_METRICS]
        lines.append(",".join([s.name, s.scan, *values]))
    return "\n".join(lines) + "\n"


def relative_improvement(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Encoder over scratch, as a fraction: positive = the pretrained encoder is better."""
    enc, base = results["encoder"], results["scratch"]
    return {
        "abs_rel": (base["abs_rel"] - enc["abs_rel"]) / base["abs_rel"],
        "delta1": (enc["delta1"] - base["delta1"]) / max(base["delta1"], 1e-12),
    }


def log_pictures(live_dir: Path, grid: Figure, chart: Figure) -> None:
    """Through DVCLive: dvclive/evaluate/plots/images/{predictions,metrics}.png."""
    from dvclive import Live

    with Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        live.log_image("predictions.png", grid)
        live.log_image("metrics.png", chart)
    # DVCLive always writes a summary; evaluate logs no metric through it (they are in
    # metrics/evaluate.json), so the empty one would only be an undeclared output.
    (live_dir / DVCLIVE_SUMMARY).unlink(missing_ok=True)
    plt.close(grid)
    plt.close(chart)


def load_model(folder: Path, forward: ForwardMode) -> Model:
    """A fine-tuned network on ``forward``'s device, in its layout."""
    net, spec = load_finetuned(folder)
    return forward.place_module(net), spec


def run(params: Params, paths: ProjectPaths) -> dict[str, object]:
    forward = trainer_forward_mode(params.finetune.trainer)
    nets = {
        "encoder": load_model(paths.finetune_dir(params.aug), forward),
        "scratch": load_model(paths.finetune_dir(SCRATCH), forward),
    }
    images = predict_test_images(
        paths, nets, batch_size=params.evaluate.batch_size, depth=params.depth, forward=forward
    )
    shown: list[TestImage] = []
    results, per_image = score_images(
        keep_first(images, shown, params.evaluate.grid_images), params
    )
    report = {
        **{
            model: {k: results[model][k] for k in (*METRIC_NAMES, *ALIGNED_METRIC_NAMES)}
            for model in MODELS
        },
        "improvement": {
            **relative_improvement(results),
            **improvement_intervals(per_image, BOOTSTRAP_SEED),
        },
        "over_prior": over_prior(results, per_image, BOOTSTRAP_SEED),
        "test_images": len(per_image),
        "test_scans": len({s.scan for s in per_image}),
    }
    labels = {
        "encoder": f"{params.aug} encoder",
        "scratch": "scratch",
        "prior": "prior (sees no pixel)",
    }
    outs = (paths.evaluate_metrics, paths.evaluate_per_image, paths.evaluate_live)
    with atomic_outputs(*outs) as (metrics_file, table_file, live_dir):
        metrics_file.write_text(json.dumps(report, indent=2) + "\n")
        table_file.write_text(per_image_table(per_image))
        log_pictures(
            live_dir,
            prediction_grid(shown, labels, params.depth),
            comparison_chart(results, labels),
        )
    return report


def main() -> None:
    args = stage_arguments(__doc__)
    params, paths = open_project(args.root)
    torch.set_grad_enabled(False)
    report = run(params, paths)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_cli(main)
