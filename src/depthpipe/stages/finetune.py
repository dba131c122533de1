"""finetune@<name>: fine-tune the fastai U-Net for metric depth on the packed DIODE train split.

``name`` is ``scratch`` (randomly initialised encoder) or a pretraining preset; the encoder is
read from models/pretrain/<name>/encoder.pt with strict loading either way. Outputs:
models/finetune/<name>/ (model.pt: plain weights of the best epoch by validation abs_rel;
model.json: how to rebuild it; best.ckpt: the Lightning checkpoint) and the DVCLive folder
dvclive/finetune/<name>/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from depthpipe.atomic import staged_outputs
from depthpipe.cli import open_project, stage_arguments
from depthpipe.config import Params
from depthpipe.data.packed import Batch, PackedDepthDataset
from depthpipe.encoders import load_encoder
from depthpipe.errors import DepthpipeError, run_cli
from depthpipe.hardware import is_global_zero, trainer_kwargs
from depthpipe.metrics import average_metrics, depth_metrics
from depthpipe.model import DepthModule, ModelSpec, build_unet, save_finetuned
from depthpipe.paths import (
    BEST_CHECKPOINT,
    FINETUNE_SUMMARY,
    SCRATCH,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    ProjectPaths,
)
from depthpipe.prior import packed_prior, prior_depth
from depthpipe.transforms import DepthAugment

MONITOR = "val/abs_rel"


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


def loaders(
    params: Params, train: PackedDepthDataset, val: PackedDepthDataset
) -> tuple[DataLoader[Batch], DataLoader[Batch]]:
    cfg = params.finetune
    workers = cfg.trainer.num_workers
    common: dict[str, Any] = {
        "batch_size": cfg.batch_size,
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


def dvclive_logger(live_dir: Path) -> Any:
    """DVCLive's Lightning logger without its params.yaml copy of the hyper-parameters: they are
    params.yaml's own keys, which DVC already records per experiment."""
    from dvclive.lightning import DVCLiveLogger

    class CurvesOnly(DVCLiveLogger):
        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

    return CurvesOnly(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False)


def make_trainer(
    params: Params, live_dir: Path, model_dir: Path, prior: dict[str, float]
) -> pl.Trainer:
    hardware = trainer_kwargs(params.finetune.trainer)
    on_cpu = hardware["accelerator"] == "cpu" or not torch.cuda.is_available()
    checkpoint = ModelCheckpoint(
        dirpath=model_dir,
        filename=BEST_CHECKPOINT.removesuffix(ModelCheckpoint.FILE_EXTENSION),
        monitor=MONITOR,
        mode="min",
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    return pl.Trainer(
        max_epochs=params.finetune.epochs,
        logger=dvclive_logger(live_dir),
        callbacks=[checkpoint, DataWaitMonitor(), PriorReference(prior)],
        # Bit-exact re-runs on CPU (DVC's run cache assumes a stage is a function of its
        # inputs); some CUDA kernels have no deterministic version, so only warn there.
        deterministic=True if on_cpu else "warn",
        log_every_n_steps=1,
        enable_model_summary=False,
        **hardware,
    )


def export_best(checkpoint: Path, module: DepthModule, spec: ModelSpec, model_dir: Path) -> None:
    """Plain weights of the best epoch (what evaluate and predict load) + model.json."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])
    save_finetuned(module.net, spec, model_dir)


def run(params: Params, paths: ProjectPaths, name: str) -> dict[str, Any]:
    check_name(params, name)
    pl.seed_everything(params.seed, workers=True, verbose=False)
    train_set, val_set = datasets(params, paths)
    train_loader, val_loader = loaders(params, train_set, val_set)
    module, spec = build_module(params, paths, name)
    leader = is_global_zero()
    outs = (paths.finetune_dir(name), paths.finetune_live(name))
    with staged_outputs(*outs, publish=leader) as (model_dir, live_dir):
        prior = prior_scores(params, paths)
        trainer = make_trainer(params, live_dir, model_dir, prior)
        trainer.fit(module, train_loader, val_loader)
        if not trainer.is_global_zero:
            return {}
        checkpoint = trainer.checkpoint_callback
        assert isinstance(checkpoint, ModelCheckpoint)  # make_trainer installs exactly one
        if checkpoint.best_model_score is None or not Path(checkpoint.best_model_path).is_file():
            raise DepthpipeError(f"finetune@{name}: no checkpoint was saved (no validation score)")
        export_best(Path(checkpoint.best_model_path), module, spec, model_dir)
        summary = {
            "name": name,
            "best_val_abs_rel": float(checkpoint.best_model_score),
            "prior_val_abs_rel": prior["abs_rel"],
            "epochs": params.finetune.epochs,
            "train_samples": len(train_set),
            "validation_samples": len(val_set),
        }
        (model_dir / FINETUNE_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    args = stage_arguments(__doc__, "name", f"'{SCRATCH}' or a key of pretrain.presets")
    params, paths = open_project(args.root)
    summary = run(params, paths, args.name)
    if summary:
        print(f"finetune@{args.name}: {json.dumps(summary)}")


if __name__ == "__main__":
    run_cli(main)
