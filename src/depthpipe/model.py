"""The fastai DynamicUnet on a torchvision ResNet encoder, and its LightningModule.

The network predicts log depth: ``y_range`` bounds its output to [ln min_depth, ln max_depth]
through a sigmoid, so ``exp`` of it is always a positive depth in metres inside the valid range.
Working in log space matches the losses (SILog, L1 on log depth) and treats a 1 m error at 2 m
and a 100 m error at 200 m alike, as the depth metrics do.

Lightning comes from the ``lightning`` package (``lightning.pytorch``): the same PyTorch Lightning
release as ``pytorch_lightning``, in the namespace DVCLive's logger and LightlyTrain use, so one
Trainer accepts both.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from fastai.vision.models.unet import DynamicUnet
from torch import nn

from depthpipe.encoders import build_resnet
from depthpipe.errors import DepthpipeError
from depthpipe.losses import depth_loss
from depthpipe.metrics import depth_metrics

# LightlyTrain normalises pretraining images with ImageNet statistics; fine-tuning must match.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a fine-tuned network from its weights file (model.json)."""

    arch: str
    height: int  # px, training resolution
    width: int
    min_depth: float  # metres
    max_depth: float

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        if not path.is_file():
            raise DepthpipeError(f"{path}: model description not found")
        try:
            return cls(**json.loads(path.read_text()))
        except (TypeError, ValueError) as error:
            raise DepthpipeError(f"{path}: not a valid model description: {error}") from error


def build_unet(encoder: nn.Module, spec: ModelSpec) -> DynamicUnet:
    """U-Net on the ResNet body (its avgpool and fc dropped), in training mode."""
    body = nn.Sequential(*list(encoder.children())[:-2])
    unet = DynamicUnet(
        body,
        n_out=1,
        img_size=(spec.height, spec.width),
        y_range=(math.log(spec.min_depth), math.log(spec.max_depth)),
    )
    # DynamicUnet runs a dummy forward at img_size to size its decoder and leaves eval mode on.
    return unet.train()


def build_unet_for_inference(spec: ModelSpec) -> DynamicUnet:
    return build_unet(build_resnet(spec.arch), spec).eval()


class DepthNet(nn.Module):
    """Normalise RGB in [0, 1], run the U-Net, return log depth (B, 1, H, W)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.unet((image - self.mean) / self.std)


class DepthModule(pl.LightningModule):
    def __init__(
        self,
        unet: nn.Module,
        *,
        loss: str,
        optimizer: str,
        lr: float,
        weight_decay: float,
        min_depth: float,
        max_depth: float,
    ) -> None:
        super().__init__()
        # The network is not a hyper-parameter: without ignore it would be pickled into hparams.
        self.save_hyperparameters(ignore=["unet"])
        self.net = DepthNet(unet)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    def valid_pixels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        depth = batch["depth"]
        hp = self.hparams
        return batch["mask"] & (depth >= hp.min_depth) & (depth <= hp.max_depth)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        log_pred = self(batch["image"])
        return log_pred, depth_loss(
            self.hparams.loss, log_pred, batch["depth"], self.valid_pixels(batch)
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        log_pred, loss = self._loss(batch)
        skipped = loss is None
        if skipped:
            # No valid pixel in the batch: a zero loss still connected to every parameter, so
            # DDP's gradient all-reduce sees the same graph on every process and nothing hangs.
            loss = log_pred.sum() * 0.0
        size = batch["image"].shape[0]
        self.log(
            "train/skipped_batches",
            float(skipped),
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
            sync_dist=True,
            batch_size=size,
        )
        if not skipped:
            self.log(
                "train/loss",
                loss,
                on_step=False,
                on_epoch=True,
                sync_dist=True,
                batch_size=size,
                prog_bar=True,
            )
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        log_pred, loss = self._loss(batch)
        valid = self.valid_pixels(batch)
        depth = log_pred.exp()
        scores = [
            depth_metrics(
                depth[i, 0],
                batch["depth"][i, 0],
                valid[i, 0],
                self.hparams.min_depth,
                self.hparams.max_depth,
            )
            for i in range(depth.shape[0])
            if bool(valid[i].any())
        ]
        if loss is None or not scores:
            return
        n = len(scores)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=n, prog_bar=True)
        for name in ("abs_rel", "delta1"):
            value = sum(s[name] for s in scores) / n
            self.log(f"val/{name}", value, on_epoch=True, sync_dist=True, batch_size=n)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.optimizer == "adam":
            return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)


def load_finetuned(model_path: Path) -> tuple[DepthNet, ModelSpec]:
    """Load a fine-tuned network from its folder (model.pt + model.json) or its weights file."""
    folder = model_path if model_path.is_dir() else model_path.parent
    weights = folder / "model.pt" if model_path.is_dir() else model_path
    spec = ModelSpec.load(folder / "model.json")
    if not weights.is_file():
        raise DepthpipeError(f"{weights}: model weights not found")
    net = DepthNet(build_unet_for_inference(spec))
    try:
        state: Any = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError) as error:
        raise DepthpipeError(f"{weights}: cannot load into a {spec.arch} U-Net: {error}") from error
    return net.eval(), spec
