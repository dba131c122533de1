"""Training the depth network: its LightningModule, optimiser and learning-rate schedule.

Lightning comes from the ``lightning`` package (``lightning.pytorch``): the same PyTorch Lightning
release as ``pytorch_lightning``, in the namespace DVCLive's logger and LightlyTrain use, so one
Trainer accepts both. The network itself (depthpipe.model) does not need Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from depthpipe.hardware import memory_format_for
from depthpipe.losses import depth_loss
from depthpipe.metrics import depth_metrics
from depthpipe.model import DepthNet

ONE_CYCLE_WARMUP = 0.25  # fraction of the steps spent raising the learning rate


@dataclass(frozen=True)
class DepthHParams:
    """DepthModule's hyper-parameters, typed (``self.hparams`` is an untyped mapping)."""

    loss: str  # a name depth_loss knows
    optimizer: str  # adamw, adam or sgd
    lr: float
    schedule: str  # constant or one_cycle
    weight_decay: float
    min_depth: float  # metres
    max_depth: float
    freeze_encoder: bool  # only the decoder trains


class DepthModule(pl.LightningModule):
    def __init__(
        self,
        unet: nn.Module,
        *,
        loss: str,
        optimizer: str,
        lr: float,
        schedule: str,
        weight_decay: float,
        min_depth: float,
        max_depth: float,
        freeze_encoder: bool = False,
    ) -> None:
        super().__init__()
        # The network is not a hyper-parameter: without ignore it would be pickled into hparams.
        # The checkpoint keeps them there; the code reads the typed copy, self.hp.
        self.save_hyperparameters(ignore=["unet"])
        self.hp = DepthHParams(
            loss=loss,
            optimizer=optimizer,
            lr=lr,
            schedule=schedule,
            weight_decay=weight_decay,
            min_depth=min_depth,
            max_depth=max_depth,
            freeze_encoder=freeze_encoder,
        )
        self.net = DepthNet(unet)
        if freeze_encoder:
            self.encoder().requires_grad_(False)
        self.memory_format = torch.preserve_format  # of the weights and image batches

    def encoder(self) -> nn.Module:
        """The ResNet body inside the U-Net (DynamicUnet's first layer)."""
        layers = self.net.unet.layers
        assert isinstance(layers, nn.ModuleList)  # DynamicUnet keeps its layers in a list
        return layers[0]

    def train(self, mode: bool = True) -> DepthModule:
        """As nn.Module.train, but a frozen encoder stays in eval mode: its batch-norm
        statistics are part of what is being probed and must not adapt either."""
        super().train(mode)
        if self.hp.freeze_encoder:
            self.encoder().eval()
        return self

    def use_memory_format(self, memory_format: torch.memory_format) -> None:
        """Weights, and from now on every image batch, in ``memory_format``."""
        self.net.to(memory_format=memory_format)
        self.memory_format = memory_format

    def setup(self, stage: str) -> None:
        """channels_last on CUDA (hardware.memory_format_for). Lightning calls this before it
        moves the module to its device and wraps it in DDP, whose gradient buckets take the
        parameters' strides at that moment: the layout must be set first."""
        self.use_memory_format(memory_format_for(self.trainer.strategy.root_device.type))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The image batch, on the device now, in the weights' layout (no copy when it is)."""
        batch["image"] = batch["image"].to(memory_format=self.memory_format)
        return batch

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    def valid_pixels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        depth = batch["depth"]
        hp = self.hp
        return batch["mask"] & (depth >= hp.min_depth) & (depth <= hp.max_depth)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        log_pred = self(batch["image"])
        return log_pred, depth_loss(
            self.hp.loss, log_pred, batch["depth"], self.valid_pixels(batch)
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        log_pred, loss = self._loss(batch)
        size = batch["image"].shape[0]
        # Samples an augmentation left without a valid pixel still go through the network (with
        # zero weight in a masked loss); count them so a bad crop setting shows in the metrics.
        empty = (~self.valid_pixels(batch).flatten(1).any(dim=1)).sum()
        self.log(
            "train/empty_samples",
            empty.float(),
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
            sync_dist=True,
            batch_size=size,
        )
        if loss is None:
            # No valid pixel in the batch: a zero loss still connected to every parameter, so
            # DDP's gradient all-reduce sees the same graph on every process and nothing hangs.
            return log_pred.sum() * 0.0
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
                self.hp.min_depth,
                self.hp.max_depth,
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

    def configure_optimizers(self) -> Any:
        hp = self.hp
        trainable = (p for p in self.parameters() if p.requires_grad)
        optimizer = make_optimizer(hp.optimizer, trainable, hp.lr, hp.weight_decay)
        if hp.schedule == "constant":
            return optimizer
        scheduler = one_cycle(optimizer, hp.lr, int(self.trainer.estimated_stepping_batches))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def one_cycle(
    optimizer: torch.optim.Optimizer, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.OneCycleLR:
    """fastai's fit_one_cycle: a quarter of the steps warming up from lr/25, then cosine
    annealing to almost zero; stepped per batch. The warm-up matters here: full-rate Adam steps
    on a fresh U-Net push its sigmoid depth head into saturation within a few steps, where the
    gradient is zero and training stops for good (seen at lr 1e-3 without it)."""
    # torch divides by zero when the warm-up is exactly one step (4 steps in all); a run of
    # under 8 steps simply ends before its schedule does.
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(8, total_steps), pct_start=ONE_CYCLE_WARMUP
    )


def make_optimizer(
    name: str, params: Iterator[nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """adamw (decoupled weight decay), adam or sgd with momentum 0.9 (L2 weight decay)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
