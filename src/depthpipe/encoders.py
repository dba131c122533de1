"""Encoders: torchvision ResNets built without downloading, and strict loading of state dicts."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from depthpipe.errors import DepthpipeError


def build_resnet(arch: str) -> nn.Module:
    """A randomly initialised torchvision ResNet (``weights=None``: never downloads)."""
    return getattr(torchvision.models, arch)(weights=None)


def load_encoder(arch: str, path: Path) -> nn.Module:
    """Build ``arch`` and load ``path`` into it with ``strict=True``.

    Raises DepthpipeError naming the file and the first missing/unexpected keys when the state
    dict was saved from another architecture.
    """
    if not path.is_file():
        raise DepthpipeError(f"{path}: encoder file not found (run its pretrain stage)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a bad file
        raise DepthpipeError(f"{path}: not a readable torch state dict: {error}") from error
    if not isinstance(state, dict):
        raise DepthpipeError(f"{path}: holds a {type(state).__name__}, not a state dict")
    model = build_resnet(arch)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if problems:
        raise DepthpipeError(f"{path}: does not fit torchvision {arch}: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # same keys, other shapes (e.g. resnet18 vs resnet34 stem)
        first = str(error).splitlines()[1:3]
        raise DepthpipeError(
            f"{path}: does not fit torchvision {arch}: {' '.join(first)}"
        ) from error
    return model


def _first(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
