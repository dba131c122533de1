"""Turn the shared trainer params into concrete Lightning/LightlyTrain arguments."""

from __future__ import annotations

import os
from typing import Any

import torch

from depthpipe.config import TrainerConfig


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 mixed precision on a GPU that supports it, full fp32 everywhere else.

    bf16 keeps fp32's exponent range, so no loss scaling is needed; a 768x768 ResNet-50 U-Net
    is about 2.8 TMAC per image, which is only practical on tensor cores.
    """
    if precision != "auto":
        return precision
    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def trainer_kwargs(cfg: TrainerConfig) -> dict[str, Any]:
    """accelerator, devices, num_nodes, strategy, precision for Lightning or LightlyTrain."""
    # "auto" is passed through: with several processes Lightning picks DDP (gloo on CPU, NCCL on
    # GPUs) and LightlyTrain picks DDP with find_unused_parameters, which its methods need.
    return {
        "accelerator": cfg.accelerator,
        "devices": cfg.devices,
        "num_nodes": cfg.num_nodes,
        "strategy": cfg.strategy,
        "precision": resolve_precision(cfg.precision, cfg.accelerator),
    }


def is_global_zero() -> bool:
    """True in the process that owns the run, not in a DDP worker started by Lightning,
    torchrun or SLURM: only it prepares working folders and publishes outputs."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(os.environ.get(name, "0") == "0" for name in ranks)
