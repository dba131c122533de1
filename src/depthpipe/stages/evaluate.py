"""evaluate: score finetune@<aug> and finetune@scratch on the test split (DIODE val).

Each prediction is made at the training resolution, then upsampled to the ground truth's own
resolution (the ground truth is never resized); valid pixels are the mask file AND depth within
[min_depth, max_depth]; metrics are computed per image and averaged over images (DIODE devkit).

metrics/evaluate.json has keys that do not depend on ``aug`` (``encoder.*``, ``scratch.*``,
``improvement.*``), so ``dvc exp show`` lines experiments up column by column. Pictures go to
dvclive/evaluate/plots/images/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from depthpipe.atomic import atomic_outputs
from depthpipe.cli import open_project, stage_arguments
from depthpipe.config import Params
from depthpipe.data.diode import BadSample, SampleFiles
from depthpipe.data.diode import read_sample as read_raw_sample
from depthpipe.data.packed import PackedDepthDataset
from depthpipe.errors import DepthpipeError, run_cli
from depthpipe.metrics import METRIC_NAMES, average_metrics, depth_metrics
from depthpipe.model import DepthNet, load_finetuned
from depthpipe.paths import ProjectPaths
from depthpipe.plots import comparison_chart, prediction_grid  # also selects the Agg backend

MODELS = ("encoder", "scratch")


@dataclass
class TestImage:
    name: str
    image: np.ndarray  # (H, W, 3) uint8, full resolution
    depth: np.ndarray  # (H, W) float32 metres
    valid: np.ndarray  # (H, W) bool
    predictions: dict[str, np.ndarray]  # model -> (H, W) metres


def predict_full_resolution(
    net: DepthNet, model_input: torch.Tensor, size: tuple[int, int], max_depth: float
) -> np.ndarray:
    """Predict at the training resolution, upsample the log depth to ``size`` (H, W)."""
    with torch.no_grad():
        log_depth = net(model_input[None])  # (1, 1, h, w)
        log_depth = F.interpolate(log_depth, size=size, mode="bilinear", align_corners=False)
    return log_depth[0, 0].exp().clamp(max=max_depth).numpy()


def raw_files(raw_root: Path, entry: dict[str, str]) -> SampleFiles:
    image = raw_root / entry["image"]
    return SampleFiles(
        split="val",
        scene=entry["scene"],
        scan=image.parent.name,
        stem=image.stem,
        folder=image.parent,
    )


def collect(params: Params, paths: ProjectPaths, nets: dict[str, DepthNet]) -> list[TestImage]:
    test = PackedDepthDataset(paths.processed_diode / "test")
    lo, hi = params.depth.min_depth, params.depth.max_depth
    images = []
    for i, entry in enumerate(test.index["samples"]):
        try:
            raw = read_raw_sample(raw_files(paths.raw_diode, entry))
        except BadSample as error:
            raise DepthpipeError(f"{paths.raw_diode / entry['image']}: {error}") from error
        size = raw.depth.shape
        model_input = test[i]["image"]
        images.append(
            TestImage(
                name=entry["name"],
                image=raw.image,
                depth=raw.depth,
                valid=raw.mask & (raw.depth >= lo) & (raw.depth <= hi),
                predictions={
                    m: predict_full_resolution(net, model_input, size, hi)
                    for m, net in nets.items()
                },
            )
        )
    return images


def score(images: list[TestImage], params: Params) -> tuple[dict[str, dict[str, float]], int]:
    """Average metrics per model over the images that have at least one valid pixel."""
    lo, hi = params.depth.min_depth, params.depth.max_depth
    scored = [im for im in images if im.valid.any()]
    if not scored:
        raise DepthpipeError("evaluate: no test image has a valid pixel")
    results = {
        model: average_metrics(
            [depth_metrics(im.predictions[model], im.depth, im.valid, lo, hi) for im in scored]
        )
        for model in MODELS
    }
    return results, len(scored)


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
    plt.close(grid)
    plt.close(chart)


def run(params: Params, paths: ProjectPaths) -> dict[str, object]:
    nets = {
        "encoder": load_finetuned(paths.finetune_dir(params.aug))[0],
        "scratch": load_finetuned(paths.finetune_dir("scratch"))[0],
    }
    images = collect(params, paths, nets)
    results, count = score(images, params)
    report = {
        **{model: {k: results[model][k] for k in METRIC_NAMES} for model in MODELS},
        "improvement": relative_improvement(results),
        "test_images": count,
    }
    labels = {"encoder": f"{params.aug} encoder", "scratch": "scratch"}
    shown = images[: params.evaluate.grid_images]
    with atomic_outputs(paths.evaluate_metrics, paths.evaluate_live) as (metrics_file, live_dir):
        metrics_file.write_text(json.dumps(report, indent=2) + "\n")
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
