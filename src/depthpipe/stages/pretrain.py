"""pretrain@<preset>: self-supervised pretraining of a ResNet encoder with LightlyTrain.

LightlyTrain works in a folder outside the stage outputs (.depthpipe/pretrain/<preset>-<key>),
keyed by a hash of everything the run depends on. A run killed part-way leaves its checkpoint
there, and the next run with the same key resumes from it; a run whose params or data changed
gets a new key and starts clean. Only at the end is the encoder exported into the outputs:
models/pretrain/<preset>/{encoder.pt, train.log, pretrain.json} and dvclive/pretrain/<preset>.
The folder is removed once those are recorded (depthpipe.distributed.remove_when_recorded).
DVC's run cache stays on because nothing is ``persist: true``.

Checkpoints are renamed into place (temp_files_beside), and a resume point
that is unreadable all the same (a full disk, a file from before that) is reported and the run
starts clean. Rank 0 alone lists the images and decides where to work and whether to resume;
the other ranks of the same launch read its decision from a hand-off file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from depthpipe.atomic import atomic_outputs, write_text_atomic
from depthpipe.cli import open_project, stage_arguments
from depthpipe.config import Params
from depthpipe.distributed import (
    DONE_MARKER,
    alone,
    check_rank,
    discard_outputs,
    handoff_file,
    project_lock,
    remove_when_recorded,
    sigterm_ends_training,
    stop_on_sigterm,
    torchrun_manages,
)
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

# Set by the leader when no launcher names the launch: Lightning's own DDP processes inherit it.
LAUNCH_ID = "DEPTHPIPE_LAUNCH_ID"
HANDOFF_WAIT_S = 1800.0  # the leader lists every image first: minutes for 128k on a slow share


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
    checkpoint = workdir / LIGHTLY_LAST_CHECKPOINT
    if checkpoint.is_file():
        try:
            checkpoint_epoch(checkpoint)
            return workdir, True
        except DepthpipeError as error:
            # Every rank would fail to load it on every resubmission: report it, start clean.
            print(f"pretrain@{preset}: {error}; starting from the beginning", file=sys.stderr)
    # Killed before its first checkpoint, or its checkpoint is unreadable: start clean.
    shutil.rmtree(workdir, ignore_errors=True)
    return workdir, False


def checkpoint_epoch(checkpoint: Path) -> int:
    """The epochs a Lightning checkpoint has completed, i.e. the 0-based epoch it resumes at.

    Not the checkpoint's ``epoch`` field: LightlyTrain saves at the end of an epoch, before
    Lightning counts it, so ``epoch`` is the index of the epoch just finished (0 after the
    first). The fit loop's processed-epoch counter is what Lightning itself resumes from.
    Raises DepthpipeError when the file cannot be read (truncated, not a checkpoint).
    """
    import torch

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
        return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except Exception as error:  # a damaged file: torch and the lookups raise several kinds
        raise DepthpipeError(
            f"{checkpoint}: unreadable resume checkpoint ({type(error).__name__}: {error})"
        ) from error


def launcher_id(env: Mapping[str, str]) -> str | None:
    """What a launcher calls this launch on every rank: a SLURM step or a torchrun run id.

    A requeued SLURM job keeps its job id and numbers its steps from 0 again: its restart count
    (SLURM_RESTART_COUNT, unset before the first requeue) and start time tell its steps from
    the earlier run's, whose hand-off may still lie there (a run killed mid-way).
    """
    if "SLURM_STEP_ID" in env and "SLURM_JOB_ID" in env:
        restart = env.get("SLURM_RESTART_COUNT", "0")
        started = f".t{env['SLURM_JOB_START_TIME']}" if env.get("SLURM_JOB_START_TIME") else ""
        return f"slurm-{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}.r{restart}{started}"
    run = env.get("TORCHELASTIC_RUN_ID", "none")
    return f"torchrun-{run}" if torchrun_manages(env) and run != "none" else None


def hand_off(paths: ProjectPaths, preset: str, decision: dict[str, Any]) -> None:
    """The leader's decision, for the other ranks of this launch (written whole)."""
    launch = launcher_id(os.environ)
    if launch is None:
        # A new id for every run: Lightning starts the other processes with this environment.
        launch = os.environ[LAUNCH_ID] = uuid.uuid4().hex
    write_text_atomic(
        handoff_file(paths.root, preset), json.dumps({**decision, "launch": launch}) + "\n"
    )


def take_over(paths: ProjectPaths, preset: str) -> dict[str, Any] | None:
    """The leader's decision for this launch, waited for; None when no launch id says which
    decision is this launch's (the rank then decides for itself)."""
    launch = launcher_id(os.environ) or os.environ.get(LAUNCH_ID)
    if launch is None:
        return None
    handoff = handoff_file(paths.root, preset)
    deadline = time.monotonic() + HANDOFF_WAIT_S
    while time.monotonic() < deadline:
        try:
            decision: dict[str, Any] = json.loads(handoff.read_text())
            if decision.get("launch") == launch:
                print(
                    f"pretrain@{preset}: this rank takes rank 0's decision ({handoff.name}): "
                    f"{decision['workdir']}, resume {decision['resume']}",
                    file=sys.stderr,
                    flush=True,
                )
                return decision
        except (OSError, ValueError):
            pass  # not written yet
        time.sleep(0.5)
    raise DepthpipeError(f"{handoff}: rank 0 wrote no decision for launch {launch}")


@contextlib.contextmanager
def temp_files_beside(workdir: Path) -> Iterator[Path]:
    """Python's temp folder on the working folder's filesystem while the block runs.

    Lightning saves a checkpoint through fsspec, which writes it to a temp file and
    ``shutil.move``s it over the last one: a rename on one filesystem, but a copy from a
    node-local /tmp to a shared project, and a kill mid-copy truncates the only resume point.
    LightlyTrain builds its own Trainer (a CheckpointIO plugin does not pass its config check),
    so the temp folder is moved instead. A killed run's leftovers are removed the next time.
    """
    staging = workdir.parent / f".{workdir.name.rsplit('-', 1)[0]}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    before = tempfile.tempdir
    tempfile.tempdir = str(staging)
    try:
        yield staging
    finally:
        tempfile.tempdir = before
        shutil.rmtree(staging, ignore_errors=True)


def pretrain(
    arguments: dict[str, Any], data: Path, workdir: Path, resume: bool, leader: bool = True
) -> float:
    """Run LightlyTrain; return the wall time in seconds. Only the leader saves checkpoints, so
    only its temp folder moves (the others' would race for the one beside the folder)."""
    import lightly_train  # heavy import, only when training

    start = time.perf_counter()
    # A fresh run starts in a folder prepare_workdir has just emptied, so ``overwrite`` deletes
    # nothing; it is needed because a run killed with SIGKILL leaves LightlyTrain's file-list
    # memory map behind in its cache, which a plain fresh start mistakes for a concurrent run
    # (the run key includes the image list, so that map still describes the same data).
    beside = temp_files_beside(workdir) if leader else contextlib.nullcontext(workdir)
    with sigterm_ends_training(), beside:
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
    cfg = params.pretrain.trainer
    check_rank("pretrain", cfg)
    if not is_global_zero():
        return train(params, paths, preset, leader=False)
    with project_lock(paths.leader_lock, f"pretrain@{preset}", alone(cfg)):
        # An earlier launch's decision (a run killed before it ended) goes before this one's
        # is written: no rank of this launch can take it for its own.
        handoff_file(paths.root, preset).unlink(missing_ok=True)
        discard_outputs(paths.encoder_dir(preset), paths.pretrain_live(preset))
        return train(params, paths, preset, leader=True)


def decide(params: Params, paths: ProjectPaths, preset: str, leader: bool) -> dict[str, Any]:
    """Where to work, whether to resume (and at which epoch), how many images: the leader lists
    the images and decides; the other ranks take its decision, or decide alike without one."""
    if not leader:
        decision = take_over(paths, preset)
        if decision is not None:
            return decision
    images = list_pretrain_images(paths.processed_megadepth)
    arguments = lightly_arguments(params, preset)
    key = run_key(arguments, images, paths.processed_megadepth)
    if leader:
        workdir, resume = prepare_workdir(paths, preset, key)
    else:
        # Deciding alone, as the leader does (it only reads): every process must pass the same
        # resume flag, or their epoch counters and weights would disagree. An unreadable
        # checkpoint is one the leader removes.
        workdir = paths.pretrain_workdir(preset, key)
        resume = (workdir / LIGHTLY_LAST_CHECKPOINT).is_file()
    start_epoch = 0
    if resume:
        try:
            start_epoch = checkpoint_epoch(workdir / LIGHTLY_LAST_CHECKPOINT)
        except DepthpipeError:
            resume = False
    decision = {
        "key": key,
        "workdir": str(workdir),
        "resume": resume,
        "start_epoch": start_epoch,
        "images": len(images),
    }
    if leader:
        hand_off(paths, preset, decision)
    return decision


def train(params: Params, paths: ProjectPaths, preset: str, leader: bool) -> dict[str, Any]:
    decision = decide(params, paths, preset, leader)
    workdir, resume = Path(decision["workdir"]), bool(decision["resume"])
    start_epoch, images = int(decision["start_epoch"]), int(decision["images"])
    if leader and resume:
        print(
            f"pretrain@{preset}: resumed from epoch {start_epoch} of {params.pretrain.epochs}"
            f" ({workdir})",
            flush=True,
        )
    seconds = 0.0
    if not (workdir / DONE_MARKER).is_file():
        arguments = lightly_arguments(params, preset)
        seconds = pretrain(arguments, paths.processed_megadepth, workdir, resume, leader)
        if leader:
            # Every rank read it before it joined the process group, which training needs:
            # nobody reads it again. (Without training, prune removes it after dvc commit.)
            handoff_file(paths.root, preset).unlink(missing_ok=True)
    stats = {
        "preset": preset,
        "run_key": decision["key"],
        "resumed": resume,
        "resumed_at_epoch": start_epoch,
        "images": images,
        "epochs": params.pretrain.epochs,
        "seconds": round(seconds, 2),
        "images_per_second": round(images * (params.pretrain.epochs - start_epoch) / seconds, 2)
        if seconds
        else None,
    }
    if leader:
        if (workdir / DONE_MARKER).is_file():  # exported before, never recorded: the same stats
            stats = json.loads((workdir / DONE_MARKER).read_text())
        else:
            write_text_atomic(workdir / DONE_MARKER, json.dumps(stats) + "\n")
        export(params, preset, workdir, paths, stats)
        remove_when_recorded(f"pretrain@{preset}", workdir)
    return stats


def main() -> None:
    args = stage_arguments(__doc__, "preset", "a key of pretrain.presets in params.yaml")
    stop_on_sigterm()
    params, paths = open_project(args.root, lock=False)  # rank 0 locks in run()
    stats = run(params, paths, args.preset)
    if is_global_zero():
        print(f"pretrain@{args.preset}: {json.dumps(stats)}")


if __name__ == "__main__":
    run_cli(main)
