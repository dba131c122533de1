"""How fast does fine-tuning learn, against the prior? One fine-tuning, measured.

    python benchmarks/learning.py                       # the committed params.yaml, scratch
    python benchmarks/learning.py --override '{"finetune": {"loss": "l1_log", "lr": 0.001}}'
    python benchmarks/learning.py --override '{"finetune": {"augment": {"geometry": "flip"}}}'
    python benchmarks/learning.py --encoder conservative  # pretrain@conservative first
    python benchmarks/learning.py --encoder conservative --pretrain-only  # its loss alone

Renders and packs the data of the (overridden) params in a temporary project, runs the real
``init_scratch`` (or ``pretrain@<preset>``, with its loss by epoch beside the method's chance
level) and ``finetune@<name>`` stages, then prints the validation curves beside the prior that
sees no pixel, and the packed test split's abs_rel, delta1 and their scale-aligned twins at the
training resolution for the network and the prior. This is how the settings table of
docs/experiments.md was made (each row one run; about 3-8 minutes on 2 CPU cores). Data are
reused across runs with the same data params (``--cache``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from depthpipe.cli import configure_environment  # noqa: E402
from depthpipe.config import Params, load_params  # noqa: E402
from depthpipe.data.packed import PackedDepthDataset  # noqa: E402
from depthpipe.metrics import average_metrics, depth_and_aligned_metrics  # noqa: E402
from depthpipe.model import load_finetuned  # noqa: E402
from depthpipe.paths import (  # noqa: E402
    SCRATCH,
    TEST_SPLIT,
    TRAIN_SPLIT,
    ProjectPaths,
    project_paths,
)
from depthpipe.prior import packed_prior, prior_depth  # noqa: E402
from depthpipe.stages import fetch, finetune, init_scratch, preprocess, pretrain  # noqa: E402
from tests.helpers import committed_params, deep_merge  # noqa: E402

DATA_SECTIONS = ("data", "preprocess", "seed")  # what fetch, preprocess and init_scratch read


def prepared_data(params: dict[str, Any], cache: Path) -> Path:
    """A project folder with raw and packed data for ``params`` (made once per data params)."""
    data_params = {key: params[key] for key in DATA_SECTIONS}
    key = hashlib.sha256(json.dumps(data_params, sort_keys=True).encode()).hexdigest()[:12]
    root = cache / key
    if not (root / "data" / "processed" / "report.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        paths = project_paths(root)
        loaded = load_params(paths.params)
        start = time.perf_counter()
        fetch.run(loaded, paths)
        preprocess.run(loaded, paths)
        print(f"data: rendered and packed in {time.perf_counter() - start:.0f} s", flush=True)
    return root


def curve(live: Path, name: str) -> list[float]:
    rows = (live / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [round(float(row.split("\t")[1]), 3) for row in rows]


SCORED = ("abs_rel", "delta1", "abs_rel_aligned", "delta1_aligned")


def packed_test_scores(root: Path, name: str) -> dict[str, tuple[float, ...]]:
    """abs_rel, delta1 and their scale-aligned twins on the packed test split at the training
    resolution."""
    paths = project_paths(root)
    params = load_params(paths.params)
    lo, hi = params.depth.min_depth, params.depth.max_depth
    log_prior = packed_prior(paths.packed_split(TRAIN_SPLIT), params.depth)
    net, _ = load_finetuned(paths.finetune_dir(name))
    test = PackedDepthDataset(paths.packed_split(TEST_SPLIT))
    scores: dict[str, list[dict[str, float]]] = {"network": [], "prior": []}
    with torch.no_grad():
        for i in range(len(test)):
            sample = test[i]
            depth = sample["depth"][0].numpy()
            valid = sample["mask"][0].numpy() & (depth >= lo) & (depth <= hi)
            if not valid.any():
                continue
            predicted = net(sample["image"][None])[0, 0].exp().numpy()
            scores["network"].append(depth_and_aligned_metrics(predicted, depth, valid, lo, hi))
            guess = prior_depth(log_prior, depth.shape)
            scores["prior"].append(depth_and_aligned_metrics(guess, depth, valid, lo, hi))
    return {
        name: tuple(round(avg[key], 3) for key in SCORED)
        for name, avg in ((n, average_metrics(s)) for n, s in scores.items())
    }


def chance_level(params: Params) -> float | None:
    """The pretraining loss of an encoder that tells no image from another, where known: for
    SimCLR's NT-Xent every one of the 2B - 1 other views of a batch as close as the positive
    one, ln(2B - 1) (B: the batch on one device)."""
    if params.pretrain.method != "simclr":
        return None
    per_device = params.pretrain.batch_size // (
        params.pretrain.trainer.devices * params.pretrain.trainer.num_nodes
    )
    return round(math.log(2 * per_device - 1), 3)


def prepare_encoder(params: Params, paths: ProjectPaths, encoder: str) -> dict[str, Any]:
    """The encoder fine-tuning starts from; for a preset, pretraining's time and loss curve."""
    if encoder == SCRATCH:
        init_scratch.run(params, paths)
        return {}
    start = time.perf_counter()
    pretrain.run(params, paths, encoder)
    return {
        "pretrain_seconds": round(time.perf_counter() - start),
        "pretrain_loss": curve(paths.pretrain_live(encoder), "train/loss"),
        "pretrain_chance_loss": chance_level(params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--override", default="{}", help="JSON merged into params.yaml")
    parser.add_argument(
        "--encoder", default=SCRATCH, help="scratch, or a pretrain preset to pretrain first"
    )
    parser.add_argument(
        "--pretrain-only",
        action="store_true",
        help="with --encoder <preset>: report the pretraining alone (time, loss, chance level)",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "depthpipe-learning"
    )
    args = parser.parse_args()
    if args.pretrain_only and args.encoder == SCRATCH:
        parser.error("--pretrain-only needs --encoder <preset>: scratch is not pretrained")
    params = deep_merge(committed_params(), json.loads(args.override))
    data_root = prepared_data(params, args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        configure_environment(project_paths(root))
        os.symlink(data_root / "data", root / "data")
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        paths = project_paths(root)
        loaded = load_params(paths.params)
        pretraining = prepare_encoder(loaded, paths, args.encoder)
        if args.pretrain_only:
            print(json.dumps({"override": json.loads(args.override), **pretraining}, indent=1))
            return
        start = time.perf_counter()
        summary = finetune.run(loaded, paths, args.encoder)
        seconds = time.perf_counter() - start
        live = paths.finetune_live(args.encoder)
        report = {
            "override": json.loads(args.override),
            "encoder": args.encoder,
            **pretraining,
            "train_views": summary["train_samples"],
            "validation_views": summary["validation_samples"],
            "finetune_seconds": round(seconds),
            "val_abs_rel": curve(live, "val/abs_rel"),
            "val_delta1": curve(live, "val/delta1"),
            "val_prior_abs_rel_delta1": [
                curve(live, "val/prior_abs_rel")[0],
                curve(live, "val/prior_delta1")[0],
            ],
            "train_loss": curve(live, "train/loss"),
            "test_abs_rel_delta1_aligned": packed_test_scores(root, args.encoder),
        }
        shutil.rmtree(root / "models", ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
