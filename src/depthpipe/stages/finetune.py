"""finetune@<name>: fine-tune the fastai U-Net for metric depth on the packed DIODE train split.

``name`` is ``scratch`` (randomly initialised encoder) or a pretraining preset; the encoder is
read from models/pretrain/<name>/encoder.pt with strict loading either way. Outputs:
models/finetune/<name>/ (model.pt: plain weights of the best epoch by validation abs_rel;
model.json: how to rebuild it; best.ckpt: the Lightning checkpoint; finetune.json: the run's
summary) and the DVCLive folder dvclive/finetune/<name>/.

Training works in a folder outside the outputs, .depthpipe/finetune/<name>-<key>, keyed by a hash
of everything the run depends on (params, encoder, packed splits, code, library versions). At the
start of every epoch after the first it keeps a resume point there: a Lightning checkpoint with
the random states, the curves so far and the best checkpoint so far. A run killed part-way
(SIGKILL, a lost node) continues from that point when the stage runs again with the same key;
other keys start clean. Only at the end are the outputs exported; the folder is removed once
they are recorded (depthpipe.distributed.remove_when_recorded). DVC's run cache stays on
because nothing is ``persist: true``.

``finetune.batch_size`` is global, like ``pretrain.batch_size``: each of the devices x
num_nodes processes loads its share, so the optimiser takes the same steps at any world size.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

import depthpipe
from depthpipe.atomic import atomic_dir, atomic_outputs, write_text_atomic
from depthpipe.cli import open_project, stage_arguments
from depthpipe.config import Params
from depthpipe.data.packed import INDEX_FILE, Batch, PackedDepthDataset
from depthpipe.distributed import (
    DONE_MARKER,
    alone,
    check_rank,
    discard_outputs,
    project_lock,
    remove_when_recorded,
    sigterm_ends_training,
    stop_on_sigterm,
)
from depthpipe.encoders import load_encoder
from depthpipe.errors import DepthpipeError, run_cli
from depthpipe.hardware import is_global_zero, trainer_kwargs
from depthpipe.metrics import average_metrics, depth_metrics
from depthpipe.model import ModelSpec, build_unet, save_finetuned
from depthpipe.paths import (
    BEST_CHECKPOINT,
    FINETUNE_SUMMARY,
    SCRATCH,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    ProjectPaths,
)
from depthpipe.prior import packed_prior, prior_depth
from depthpipe.trainer_plugins import RankSeed, SameFolderCheckpointIO
from depthpipe.training import DepthModule
from depthpipe.transforms import DepthAugment

MONITOR = "val/abs_rel"
# Inside the working folder (ProjectPaths.finetune_workdir):
WORK_CHECKPOINTS = "checkpoints"  # the best checkpoint so far (BEST_CHECKPOINT)
WORK_LIVE = "live"  # DVCLive's folder while training, copied into the output at the end
RESUME = "resume"  # the resume point: replaced as a whole at the start of every epoch
RESUME_CHECKPOINT = "last.ckpt"  # inside RESUME, written last: a complete point has it


class DataWaitMonitor(Callback):
    """Logs the fraction of training step time spent waiting for the next batch.

    The wait is the time from the end of one step to the start of the next, which is when
    the loader produces the batch; above ~10% the accelerator is starved and num_workers
    (or the data format) should change.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_start = self.last_end = time.perf_counter()
        self.waiting = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.waiting += time.perf_counter() - self.last_end

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.last_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = max(self.last_end - self.epoch_start, 1e-9)
        pl_module.log("perf/data_wait_fraction", self.waiting / total, sync_dist=True)


class PriorReference(Callback):
    """Logs the no-pixel prior's validation scores beside the network's at every validation.

    The scores are computed once (the prior does not train); logging them each epoch draws them
    as a flat reference line on the same axes as val/abs_rel and val/delta1.
    """

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, value in self.scores.items():
            pl_module.log(f"val/prior_{name}", value, sync_dist=False, rank_zero_only=True)


def prior_scores(params: Params, paths: ProjectPaths) -> dict[str, float]:
    """abs_rel and delta1 of the training-mean log-depth prior on the validation split."""
    lo, hi = params.depth.min_depth, params.depth.max_depth
    log_prior = packed_prior(paths.packed_split(TRAIN_SPLIT), params.depth)
    val = PackedDepthDataset(paths.packed_split(VALIDATION_SPLIT)).arrays()
    per_image = []
    for depth, mask in zip(val["depth"], val["mask"], strict=True):
        valid = mask & (depth >= lo) & (depth <= hi)
        if valid.any():
            guess = prior_depth(log_prior, depth.shape)
            per_image.append(depth_metrics(guess, depth, valid, lo, hi))
    if not per_image:
        raise DepthpipeError(
            f"{paths.packed_split(VALIDATION_SPLIT)}: no validation image has a valid pixel"
        )
    averaged = average_metrics(per_image)
    return {"abs_rel": averaged["abs_rel"], "delta1": averaged["delta1"]}


def check_name(params: Params, name: str) -> None:
    if name not in params.encoder_names():
        raise DepthpipeError(
            f"finetune: '{name}' is neither '{SCRATCH}' nor a preset in pretrain.presets "
            f"(have: {', '.join(params.encoder_names())})"
        )


def datasets(params: Params, paths: ProjectPaths) -> tuple[PackedDepthDataset, PackedDepthDataset]:
    """The training split (augmented) and the validation split."""
    train = PackedDepthDataset(
        paths.packed_split(TRAIN_SPLIT),
        transform=DepthAugment(params.finetune.augment, params.depth),
    )
    return train, PackedDepthDataset(paths.packed_split(VALIDATION_SPLIT))


def per_device_batch(params: Params) -> int:
    """Each process's share of the global ``finetune.batch_size`` (the config checks that the
    processes divide it): the same optimiser steps and learning-rate schedule at any world size."""
    trainer = params.finetune.trainer
    return params.finetune.batch_size // (trainer.devices * trainer.num_nodes)


def loaders(
    params: Params, train: PackedDepthDataset, val: PackedDepthDataset
) -> tuple[DataLoader[Batch], DataLoader[Batch]]:
    cfg = params.finetune
    workers = cfg.trainer.num_workers
    common: dict[str, Any] = {
        "batch_size": per_device_batch(params),
        "num_workers": workers,
        # Workers live across epochs (no re-fork and re-open of the memory maps each epoch).
        "persistent_workers": workers > 0,
        # Page-locked host memory only pays off when batches go to a GPU.
        "pin_memory": torch.cuda.is_available() and cfg.trainer.accelerator != "cpu",
    }
    return (
        DataLoader(train, shuffle=True, **common),
        DataLoader(val, shuffle=False, **common),
    )


def build_module(params: Params, paths: ProjectPaths, name: str) -> tuple[DepthModule, ModelSpec]:
    spec = ModelSpec(
        arch=params.model.arch,
        height=params.preprocess.height,
        width=params.preprocess.width,
        min_depth=params.depth.min_depth,
        max_depth=params.depth.max_depth,
    )
    encoder = load_encoder(params.model.arch, paths.encoder_file(name))
    cfg = params.finetune
    module = DepthModule(
        build_unet(encoder, spec),
        loss=cfg.loss,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        schedule=cfg.schedule,
        weight_decay=cfg.weight_decay,
        min_depth=spec.min_depth,
        max_depth=spec.max_depth,
        freeze_encoder=cfg.freeze_encoder,
    )
    return module, spec


# -- the working folder and its key ---------------------------------------------------------------


def run_settings(params: Params) -> dict[str, Any]:
    """Every param this stage reads (dvc.yaml lists the same keys for finetune)."""
    return {
        "seed": params.seed,
        "model.arch": params.model.arch,
        "depth": params.depth.model_dump(mode="json"),
        "preprocess.height": params.preprocess.height,
        "preprocess.width": params.preprocess.width,
        "finetune": params.finetune.model_dump(mode="json"),
    }


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_identity(folder: Path) -> str:
    """A packed split's index (which samples, in which order) and the sizes of its files:
    cheap even at full scale, and any re-packing changes one of them."""
    sizes = [f"{f.name}:{f.stat().st_size}" for f in sorted(folder.iterdir()) if f.is_file()]
    return file_digest(folder / INDEX_FILE) + "|" + ",".join(sizes)


def code_digest() -> str:
    """The depthpipe sources: a checkpoint made by other code is no state to continue from
    (DVC re-runs the stage when its code changed, and the result must be the new code's)."""
    package = Path(depthpipe.__file__).parent
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(f"{source.relative_to(package)}\n".encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


# Libraries whose version decides whether a checkpoint loads and continues the same training.
CHECKPOINT_LIBRARIES = ("torch", "lightning", "fastai", "dvclive")


def run_key(params: Params, paths: ProjectPaths, name: str) -> str:
    """Hash of the params, the encoder's content, the train and validation splits, the code and
    the versions of CHECKPOINT_LIBRARIES (an upgrade between the kill and the re-run starts
    clean instead of failing to load the checkpoint)."""
    digest = hashlib.sha256(json.dumps(run_settings(params), sort_keys=True).encode())
    digest.update(file_digest(paths.encoder_file(name)).encode())
    for split in (TRAIN_SPLIT, VALIDATION_SPLIT):
        digest.update(split_identity(paths.packed_split(split)).encode())
    digest.update(code_digest().encode())
    digest.update(" ".join(metadata.version(lib) for lib in CHECKPOINT_LIBRARIES).encode())
    return digest.hexdigest()[:12]


def resume_checkpoint(workdir: Path) -> Path:
    return workdir / RESUME / RESUME_CHECKPOINT


def prepare_workdir(paths: ProjectPaths, name: str, key: str) -> tuple[Path, bool]:
    """Return the working folder and whether to resume in it.

    Folders of this name under other keys are stale (other params, data or code): removed. A
    folder without a complete resume point was killed during its first epoch: started clean.
    """
    workdir = paths.finetune_workdir(name, key)
    same_name = re.compile(rf"{re.escape(name)}-[0-9a-f]{{{len(key)}}}")
    if workdir.parent.is_dir():
        for other in workdir.parent.iterdir():
            if other != workdir and same_name.fullmatch(other.name):
                shutil.rmtree(other, ignore_errors=True)
    if (workdir / DONE_MARKER).is_file():
        return workdir, False  # exported, not yet recorded: run() exports it again
    if resume_checkpoint(workdir).is_file():
        return workdir, True
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return workdir, False


def checkpoint_epoch(checkpoint: Path) -> int:
    """The epochs a Lightning checkpoint has completed, i.e. the 0-based epoch it resumes at
    (ResumePoint saves at an epoch's start, where ``epoch`` counts the finished ones)."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
        return int(state["epoch"])
    except Exception as error:  # a damaged file: torch raises several kinds
        raise DepthpipeError(
            f"{checkpoint}: unreadable resume checkpoint ({error}); delete "
            f"{checkpoint.parent.parent} to start this fine-tuning from the beginning"
        ) from error


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (free, whatever the checkpoint's size), or a copy where links fail."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def restore_resume_point(workdir: Path) -> None:
    """Put the curves and the best checkpoint back as they were at the resume point: what the
    killed run did after it is done again, so nothing is logged twice or chosen from a lost
    epoch."""
    resume = workdir / RESUME
    for folder in (WORK_LIVE, WORK_CHECKPOINTS):
        shutil.rmtree(workdir / folder, ignore_errors=True)
    if (resume / WORK_LIVE).is_dir():
        shutil.copytree(resume / WORK_LIVE, workdir / WORK_LIVE)
    (workdir / WORK_CHECKPOINTS).mkdir()
    if (resume / BEST_CHECKPOINT).is_file():
        link_or_copy(resume / BEST_CHECKPOINT, workdir / WORK_CHECKPOINTS / BEST_CHECKPOINT)


# -- resuming inside Lightning --------------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    """The global random states: torch's draws the data order and the augmentation; numpy's
    and Python's are kept for any library that draws from them."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumePoint(Callback):
    """Keeps the resume point (workdir/resume) at the start of every epoch after the first.

    At the start of an epoch rather than at the end (as ``ModelCheckpoint(save_last=True)``
    would): the epoch's training metrics reach the logger only after every ``on_train_epoch_end``
    hook, so a run killed between that checkpoint and that logging would resume with a hole in
    its curves. The global random states go into the checkpoint and are put back on loading:
    nothing draws from them between loading and the resumed epoch's first batch, so data order
    and augmentation continue as if the run had never stopped (with ``num_workers: 0``; loader
    workers are seeded anew when they start).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.resuming = False

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_states(state_dict["rng"])
        self.resuming = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.resuming:
            # The point the checkpoint was saved at: this epoch runs as in an uninterrupted run.
            # Left "restarting", Lightning (2.6) would take the saved batch counters (the previous
            # epoch's end) for this epoch's and skip its batches, or skip one step in the logged
            # steps once those are reset.
            epoch_loop = trainer.fit_loop.epoch_loop
            epoch_loop.restarting = False  # also the validation loop inside it
            epoch_loop.reset_restart_stage()
            epoch_loop.val_loop.reset_restart_stage()
            self.resuming = False
        elif trainer.current_epoch > 0:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            # Every process takes part in a save; only global zero writes the file.
            trainer.save_checkpoint(resume_checkpoint(self.workdir))
            return
        with atomic_dir(self.workdir / RESUME) as staged:
            if (self.workdir / WORK_LIVE).is_dir():
                shutil.copytree(self.workdir / WORK_LIVE, staged / WORK_LIVE)
            best = self.workdir / WORK_CHECKPOINTS / BEST_CHECKPOINT
            if best.is_file():
                link_or_copy(best, staged / BEST_CHECKPOINT)
            trainer.save_checkpoint(staged / RESUME_CHECKPOINT)


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose restored state follows the working folder when the project sits
    at another path on the re-run (moved, or mounted elsewhere on another node). Lightning
    stores absolute paths and, finding another folder, would drop the best score so far: the
    resumed run would then keep the best of its own epochs only."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, now = state_dict.get("dirpath"), self.dirpath
        if saved and now and saved != now:
            state_dict = rebased_paths(state_dict, Path(saved), Path(now))
        super().load_state_dict(state_dict)


def rebased_paths(state: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
    """ModelCheckpoint's state with the paths under ``old`` moved under ``new``."""

    def move(path: str) -> str:
        return str(new / Path(path).relative_to(old)) if Path(path).is_relative_to(old) else path

    moved = dict(state, dirpath=str(new))
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if state.get(key):
            moved[key] = move(state[key])
    moved["best_k_models"] = {move(p): v for p, v in state.get("best_k_models", {}).items()}
    return moved


# -- training and export ---------------------------------------------------------------------------


def dvclive_logger(live_dir: Path, resume: bool) -> Any:
    """DVCLive's Lightning logger without its params.yaml copy of the hyper-parameters: they are
    params.yaml's own keys, which DVC already records per experiment. ``resume``: append to the
    curves restored from the resume point instead of emptying the folder."""
    from dvclive.lightning import DVCLiveLogger

    class CurvesOnly(DVCLiveLogger):
        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

    return CurvesOnly(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=resume)


def make_trainer(
    params: Params, workdir: Path, prior: dict[str, float], resume: bool
) -> pl.Trainer:
    hardware = trainer_kwargs(params.finetune.trainer)
    on_cpu = hardware["accelerator"] == "cpu" or not torch.cuda.is_available()
    checkpoint = BestCheckpoint(
        dirpath=workdir / WORK_CHECKPOINTS,
        filename=BEST_CHECKPOINT.removesuffix(ModelCheckpoint.FILE_EXTENSION),
        monitor=MONITOR,
        mode="min",
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    return pl.Trainer(
        max_epochs=params.finetune.epochs,
        logger=dvclive_logger(workdir / WORK_LIVE, resume),
        callbacks=[
            checkpoint,
            ResumePoint(workdir),
            DataWaitMonitor(),
            PriorReference(prior),
            RankSeed(params.seed),
        ],
        plugins=[SameFolderCheckpointIO()],
        # Bit-exact re-runs on CPU (DVC's run cache assumes a stage is a function of its
        # inputs); some CUDA kernels have no deterministic version, so only warn there.
        deterministic=True if on_cpu else "warn",
        log_every_n_steps=1,
        enable_model_summary=False,
        **hardware,
    )


def fit(
    trainer: pl.Trainer, module: DepthModule, loaders: tuple[Any, Any], workdir: Path, resume: bool
) -> None:
    with warnings.catch_warnings(), sigterm_ends_training():
        # A resumed run finds its best checkpoint there on purpose (restore_resume_point).
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* is not empty")
        trainer.fit(
            module,
            *loaders,
            ckpt_path=resume_checkpoint(workdir) if resume else None,
            weights_only=False,  # our own file: it holds the random states, not only tensors
        )


def export_best(checkpoint: Path, module: DepthModule, spec: ModelSpec, model_dir: Path) -> None:
    """Plain weights of the best epoch (what evaluate and predict load) + model.json."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])
    save_finetuned(module.net, spec, model_dir)


def best_checkpoint(trainer: pl.Trainer, name: str) -> tuple[Path, float]:
    checkpoint = trainer.checkpoint_callback
    assert isinstance(checkpoint, ModelCheckpoint)  # make_trainer installs exactly one
    if checkpoint.best_model_score is None or not Path(checkpoint.best_model_path).is_file():
        raise DepthpipeError(f"finetune@{name}: no checkpoint was saved (no validation score)")
    return Path(checkpoint.best_model_path), float(checkpoint.best_model_score)


def export(
    paths: ProjectPaths,
    name: str,
    workdir: Path,
    best: Path,
    model: tuple[DepthModule, ModelSpec],
    summary: dict[str, Any],
) -> None:
    outs = (paths.finetune_dir(name), paths.finetune_live(name))
    with atomic_outputs(*outs) as (model_dir, live_dir):
        export_best(best, *model, model_dir)
        link_or_copy(best, model_dir / BEST_CHECKPOINT)
        shutil.copytree(workdir / WORK_LIVE, live_dir, dirs_exist_ok=True)
        (model_dir / FINETUNE_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


def run(params: Params, paths: ProjectPaths, name: str) -> dict[str, Any]:
    """Fine-tune ``name``; the leader's summary, {} in every other process."""
    check_name(params, name)
    check_rank("finetune", params.finetune.trainer)
    if not is_global_zero():
        return train(params, paths, name, leader=False)
    with project_lock(paths.leader_lock, f"finetune@{name}", alone(params.finetune.trainer)):
        discard_outputs(paths.finetune_dir(name), paths.finetune_live(name))
        return train(params, paths, name, leader=True)


def train(params: Params, paths: ProjectPaths, name: str, leader: bool) -> dict[str, Any]:
    pl.seed_everything(params.seed, workers=True, verbose=False)
    train_set, val_set = datasets(params, paths)
    train_loader, val_loader = loaders(params, train_set, val_set)
    module, spec = build_module(params, paths, name)
    key = run_key(params, paths, name)
    if leader:
        workdir, resume = prepare_workdir(paths, name, key)
    else:
        # A DDP worker decides as the leader did (it only reads): every process must resume
        # from the same checkpoint, or their weights and epoch counters would disagree.
        workdir = paths.finetune_workdir(name, key)
        resume = resume_checkpoint(workdir).is_file() and not (workdir / DONE_MARKER).is_file()
    if (workdir / DONE_MARKER).is_file():
        # Exported by an earlier run whose outputs were never recorded (killed before `dvc
        # commit`): export again, train nothing.
        return export_done(paths, name, workdir, (module, spec)) if leader else {}
    start_epoch = checkpoint_epoch(resume_checkpoint(workdir)) if resume else 0
    epochs = params.finetune.epochs
    if leader and resume:
        restore_resume_point(workdir)
        print(
            f"finetune@{name}: resumed from epoch {start_epoch} of {epochs} ({workdir})", flush=True
        )
    # The prior's scores are logged by rank 0 alone (PriorReference): only it reads the split.
    prior = prior_scores(params, paths) if leader else {}
    trainer = make_trainer(params, workdir, prior, resume)
    fit(trainer, module, (train_loader, val_loader), workdir, resume)
    if not leader:
        return {}
    best, best_score = best_checkpoint(trainer, name)
    summary = {
        "name": name,
        "best_val_abs_rel": best_score,
        "prior_val_abs_rel": prior["abs_rel"],
        "epochs": trainer.current_epoch,
        "optimizer_steps": trainer.global_step,
        "world_size": trainer.world_size,
        "batch_size": params.finetune.batch_size,
        "train_samples": len(train_set),
        "validation_samples": len(val_set),
        "run_key": key,
        "resumed": resume,
        "resumed_at_epoch": start_epoch,
    }
    if Path(best) != workdir / WORK_CHECKPOINTS / BEST_CHECKPOINT:
        raise DepthpipeError(f"finetune@{name}: best checkpoint {best} is outside {workdir}")
    # Marked done before the export: a kill from here on exports again instead of training.
    write_text_atomic(workdir / DONE_MARKER, json.dumps(summary) + "\n")
    return export_done(paths, name, workdir, (module, spec))


def export_done(
    paths: ProjectPaths, name: str, workdir: Path, model: tuple[DepthModule, ModelSpec]
) -> dict[str, Any]:
    """Export a finished working folder (its DONE_MARKER holds the summary); it is removed once
    the outputs are recorded."""
    summary: dict[str, Any] = json.loads((workdir / DONE_MARKER).read_text())
    best = workdir / WORK_CHECKPOINTS / BEST_CHECKPOINT
    export(paths, name, workdir, best, model, summary)
    remove_when_recorded(f"finetune@{name}", workdir)
    return summary


def main() -> None:
    args = stage_arguments(__doc__, "name", f"'{SCRATCH}' or a key of pretrain.presets")
    stop_on_sigterm()
    params, paths = open_project(args.root, lock=False)  # rank 0 locks in run()
    summary = run(params, paths, args.name)
    if summary:
        print(f"finetune@{args.name}: {json.dumps(summary)}")


if __name__ == "__main__":
    run_cli(main)
