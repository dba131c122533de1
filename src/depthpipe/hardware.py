"""Turn the shared trainer params into concrete Lightning/LightlyTrain arguments, and say how a
forward pass runs on a device: memory layout and autocast (``ForwardMode``)."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from depthpipe.config import TrainerConfig

# Lightning precision -> the dtype autocast computes in. "bf16-true" (bf16 weights) is run as
# bf16 autocast on fp32 weights: the weights files hold fp32. "16-mixed" on a CPU is bf16, as
# Lightning itself does (CPUs have no fp16 autocast worth using).
AUTOCAST_DTYPES = {
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
}
FULL_PRECISION = "32-true"

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def uses_cuda(accelerator: str) -> bool:
    """Whether a run with this accelerator setting goes to a CUDA GPU here: it asks for or allows
    one (``auto``, as Lightning's auto picks CUDA first) and one is present."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 mixed precision on a GPU with bf16 tensor cores, full fp32 everywhere else.

    bf16 keeps fp32's exponent range, so no loss scaling is needed; a 768x768 ResNet-50 U-Net
    is about 2.8 TMAC per image, which is only practical on tensor cores. A GPU that only
    emulates bf16 (compute capability < 8, e.g. V100, T4) would run it slower than fp32, so
    emulation does not count.
    """
    if precision != "auto":
        return precision
    if uses_cuda(accelerator) and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16-mixed"
    return FULL_PRECISION


def memory_format_for(device_type: str) -> torch.memory_format:
    """channels_last (NHWC) on CUDA, where cuDNN's tensor-core convolutions want it; elsewhere
    every tensor keeps the layout it has. Not "contiguous" on the CPU: ``network_input`` gives
    NHWC-strided images, oneDNN then runs every convolution channels_last already, and forcing
    NCHW would change the CPU results evaluate has committed (seen: 1.6e-5 in log depth)."""
    return torch.channels_last if device_type == "cuda" else torch.preserve_format


@dataclass(frozen=True)
class ForwardMode:
    """How a forward pass runs: where, in which memory layout, under which autocast."""

    device: torch.device
    memory_format: torch.memory_format  # torch.preserve_format: layouts left as they are
    autocast_dtype: torch.dtype | None  # None: no autocast, the weights' own fp32

    def autocast(self) -> AbstractContextManager[Any]:
        """The context a forward pass runs in: autocast to ``autocast_dtype``, or nothing."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def place_module(self, module: ModuleT) -> ModuleT:
        """``module`` on the device in the memory layout (in place, as ``nn.Module.to``)."""
        # Two calls: nn.Module.to's typed overloads take a device or a memory format, not both.
        return module.to(self.device).to(memory_format=self.memory_format)

    def place_input(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, memory_format=self.memory_format)


def forward_mode(device: torch.device | str, precision: str) -> ForwardMode:
    """The layout and autocast for ``device`` at a resolved Lightning ``precision``.

    ``("cuda", "bf16-mixed")``: channels_last + bf16 autocast; ``("cpu", "32-true")``: as is,
    no autocast; ``("cpu", "bf16-mixed")``: CPU bf16 autocast, layouts as they are.
    """
    device = torch.device(device)
    if precision == FULL_PRECISION:
        dtype = None
    elif precision in AUTOCAST_DTYPES:
        fp16_on_cpu = device.type == "cpu" and precision == "16-mixed"
        dtype = torch.bfloat16 if fp16_on_cpu else AUTOCAST_DTYPES[precision]
    else:
        known = ", ".join([FULL_PRECISION, *AUTOCAST_DTYPES])
        raise ValueError(f"precision '{precision}' is not resolved; use one of {known}")
    return ForwardMode(device, memory_format_for(device.type), dtype)


def trainer_forward_mode(trainer: TrainerConfig) -> ForwardMode:
    """The forward mode of these trainer settings; evaluate runs the fine-tuned networks with
    fine-tuning's, so they run where and at the precision they were trained.

    One CUDA GPU when the settings would use one and one is here (``uses_cuda``), otherwise the
    CPU; precision resolved as Lightning gets it (``auto``: bf16 on a GPU with bf16 tensor
    cores, fp32 on the CPU). The committed CPU settings give CPU, fp32, layouts as they are.
    """
    device = torch.device("cuda" if uses_cuda(trainer.accelerator) else "cpu")
    return forward_mode(device, resolve_precision(trainer.precision, trainer.accelerator))


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
