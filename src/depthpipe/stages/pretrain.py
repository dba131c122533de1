"""pretrain@<preset>: self-supervised pretraining of a ResNet encoder with LightlyTrain.

LightlyTrain works in a folder outside the stage outputs (.depthpipe/pretrain/<preset>-<key>),
keyed by a hash of everything the run depends on. A run killed part-way leaves its checkpoint
there, and the next run with the same key resumes from it; a run whose params or data changed
gets a new key and starts clean. Only at the end is the encoder exported into the outputs:
models/pretrain/<preset>/{encoder.pt, train.log, pretrain.json} and dvclive/pretrain/<preset>.
DVC's run cache stays on because nothing is ``persist: true``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from depthpipe.atomic import atomic_outputs
from depthpipe.cli import open_project, stage_arguments
from depthpipe.config import Params
from depthpipe.encoders import load_encoder
from depthpipe.errors import DepthpipeError, run_cli
from depthpipe.hardware import is_global_zero, trainer_kwargs
from depthpipe.paths import (
    ENCODER_FILE,
    LIGHTLY_EXPORT,
    LIGHTLY_LAST_CHECKPOINT,
    LIGHTLY_LOG,
    LIGHTLY_METRICS,
    PRETRAIN_LOG,
    PRETRAIN_SUMMARY,
    ProjectPaths,
    is_image,
)

DONE_MARKER = "depthpipe-complete.json"


def list_pretrain_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DepthpipeError(f"{folder}: image folder not found (run the preprocess stage)")
    images = sorted(p for p in folder.rglob("*") if is_image(p))
    if not images:
        raise DepthpipeError(f"{folder}: no images to pretrain on")
    return images


def lightly_arguments(params: Params, preset: str) -> dict[str, Any]:
    """Everything passed to ``lightly_train.pretrain`` except the folders."""
    cfg = params.pretrain
    # DINO's local crops default to 96 px for 224 px global crops; keep that ratio.
    local = max(16, round(cfg.image_size * 96 / 224))
    transform_args = cfg.presets[preset].transform_args(cfg.image_size)
    if cfg.method == "dino":
        transform_args["local_view"] = {"view_size": (local, local)}
    return {
        "model": f"torchvision/{params.model.arch}",
        "method": cfg.method,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "num_workers": cfg.trainer.num_workers,
        "seed": params.seed,
        "transform_args": transform_args,
        # reference_batch_size = the batch itself: LightlyTrain's lr scaling becomes 1, so
        # pretrain.lr is the rate used, whatever the batch size.
        "optim_args": {"lr": cfg.lr},
        "method_args": {"reference_batch_size": cfg.batch_size},
        **trainer_kwargs(cfg.trainer),
    }


def run_key(arguments: dict[str, Any], images: list[Path], folder: Path) -> str:
    """Hash of the arguments and the image set (names and sizes: cheap even for 128k files)."""
    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True, default=str).encode())
    for image in images:
        digest.update(f"{image.relative_to(folder)}:{image.stat().st_size}\n".encode())
    return digest.hexdigest()[:12]


def prepare_workdir(paths: ProjectPaths, preset: str, key: str) -> tuple[Path, bool]:
    """Return the working folder and whether to resume in it.

    Folders of this preset under other keys are stale (other params): removed to free disk.
    """
    workdir = paths.pretrain_workdir(preset, key)
    for stale in workdir.parent.glob(f"{preset}-*"):
        if stale != workdir:
            shutil.rmtree(stale, ignore_errors=True)
    if (workdir / DONE_MARKER).is_file():
        return workdir, False
    if (workdir / LIGHTLY_LAST_CHECKPOINT).is_file():
        return workdir, True
    # Killed before its first checkpoint: nothing to resume, start clean.
    shutil.rmtree(workdir, ignore_errors=True)
    return workdir, False


def checkpoint_epoch(checkpoint: Path) -> int:
    """The epochs a Lightning checkpoint has completed, i.e. the 0-based epoch it resumes at.

    Not the checkpoint's ``epoch`` field: LightlyTrain saves at the end of an epoch, before
    Lightning counts it, so ``epoch`` is the index of the epoch just finished (0 after the
    first). The fit loop's processed-epoch counter is what Lightning itself resumes from.
    """
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])


def pretrain(arguments: dict[str, Any], data: Path, workdir: Path, resume: bool) -> float:
    """Run LightlyTrain; return the wall time in seconds."""
    import lightly_train  # heavy import, only when training

    start = time.perf_counter()
    # A fresh run starts in a folder prepare_workdir has just emptied, so ``overwrite`` deletes
    # nothing; it is needed because a run killed with SIGKILL leaves LightlyTrain's file-list
    # memory map behind in its cache, which a plain fresh start mistakes for a concurrent run
    # (the run key includes the image list, so that map still describes the same data).
    lightly_train.pretrain(
        out=str(workdir),
        data=str(data),
        resume_interrupted=resume,
        overwrite=not resume,
        **arguments,
    )
    elapsed = time.perf_counter() - start
    return elapsed


def read_losses(metrics_jsonl: Path) -> list[tuple[int, int, float]]:
    """(step, epoch, train_loss) from LightlyTrain's metrics.jsonl; a resumed run appends to the
    file, so a step seen twice keeps its last value."""
    by_step: dict[int, tuple[int, float]] = {}
    for line in metrics_jsonl.read_text().splitlines():
        row = json.loads(line)
        if "train_loss" in row:
            by_step[int(row["step"])] = (int(row.get("epoch", -1)), float(row["train_loss"]))
    return [(step, epoch, loss) for step, (epoch, loss) in sorted(by_step.items())]


def write_dvclive(losses: list[tuple[int, int, float]], live_dir: Path) -> None:
    """Record the loss curve with DVCLive (plots declared in dvc.yaml, hence dvcyaml=False)."""
    from dvclive import Live

    with Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        for step, epoch, loss in losses:
            live.step = step
            live.log_metric("train/loss", loss)
            live.log_metric("epoch", epoch, plot=False)
            live.make_summary()


def export(
    params: Params, preset: str, workdir: Path, paths: ProjectPaths, stats: dict[str, Any]
) -> None:
    exported = workdir / LIGHTLY_EXPORT
    load_encoder(params.model.arch, exported)  # strict: refuse to publish a misfit encoder
    losses = read_losses(workdir / LIGHTLY_METRICS)
    outs = (paths.encoder_dir(preset), paths.pretrain_live(preset))
    with atomic_outputs(*outs) as (model_dir, live_dir):
        shutil.copy2(exported, model_dir / ENCODER_FILE)
        if (workdir / LIGHTLY_LOG).is_file():
            shutil.copy2(workdir / LIGHTLY_LOG, model_dir / PRETRAIN_LOG)
        summary = {**stats, "final_train_loss": losses[-1][2] if losses else None}
        (model_dir / PRETRAIN_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        write_dvclive(losses, live_dir)


def run(params: Params, paths: ProjectPaths, preset: str) -> dict[str, Any]:
    if preset not in params.pretrain.presets:
        raise DepthpipeError(
            f"pretrain: preset '{preset}' is not in pretrain.presets "
            f"(have: {', '.join(sorted(params.pretrain.presets))})"
        )
    images = list_pretrain_images(paths.processed_megadepth)
    arguments = lightly_arguments(params, preset)
    key = run_key(arguments, images, paths.processed_megadepth)
    leader = is_global_zero()
    if leader:
        workdir, resume = prepare_workdir(paths, preset, key)
    else:
        # A DDP worker decides as the leader did (it only reads): every process must pass the
        # same resume flag, or their epoch counters and weights would disagree.
        workdir = paths.pretrain_workdir(preset, key)
        resume = (workdir / LIGHTLY_LAST_CHECKPOINT).is_file()
    seconds = 0.0
    start_epoch = checkpoint_epoch(workdir / LIGHTLY_LAST_CHECKPOINT) if resume else 0
    if leader and resume:
        print(
            f"pretrain@{preset}: resumed from epoch {start_epoch} of {params.pretrain.epochs}"
            f" ({workdir})",
            flush=True,
        )
    if not (workdir / DONE_MARKER).is_file():
        seconds = pretrain(arguments, paths.processed_megadepth, workdir, resume)
    stats = {
        "preset": preset,
        "run_key": key,
        "resumed": resume,
        "resumed_at_epoch": start_epoch,
        "images": len(images),
        "epochs": params.pretrain.epochs,
        "seconds": round(seconds, 2),
        "images_per_second": round(
            len(images) * (params.pretrain.epochs - start_epoch) / seconds, 2
        )
        if seconds
        else None,
    }
    if leader:
        (workdir / DONE_MARKER).write_text(json.dumps(stats) + "\n")
        export(params, preset, workdir, paths, stats)
        shutil.rmtree(workdir)  # exported and cached by DVC: the checkpoints are not needed
    return stats


def main() -> None:
    args = stage_arguments(__doc__, "preset", "a key of pretrain.presets in params.yaml")
    params, paths = open_project(args.root)
    stats = run(params, paths, args.preset)
    if is_global_zero():
        print(f"pretrain@{args.preset}: {json.dumps(stats)}")


if __name__ == "__main__":
    run_cli(main)
