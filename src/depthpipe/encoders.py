"""Encoders: torchvision ResNets built without downloading, and strict loading of state dicts."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torchvision
from torch import nn

from depthpipe.errors import DepthpipeError

# torch.save has written zip archives since torch 1.6; the older format is a bare pickle stream.
TORCH_ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"


def build_resnet(arch: str) -> nn.Module:
    """A randomly initialised torchvision ResNet (``weights=None``: never downloads)."""
    return getattr(torchvision.models, arch)(weights=None)


def load_encoder(arch: str, source: Path | BinaryIO) -> nn.Module:
    """Build ``arch`` and load the state dict in ``source`` into it with ``strict=True``.

    ``source`` is a file (``models/pretrain/<name>/encoder.pt``, or one downloaded with ``dvc
    artifacts get``) or an open binary file (``dvc.api.open(..., mode="rb")``). Raises
    DepthpipeError naming it when it is missing, is no torch file or a damaged one, holds no
    state dict, or was saved from another architecture (the first missing/unexpected keys named).
    """
    name = _source_name(source)
    state = _read_state_dict(source, name)
    model = build_resnet(arch)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if problems:
        raise DepthpipeError(
            f"{name}: does not fit torchvision {arch}: " + "; ".join(problems) + _hint(state)
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # same keys, other shapes (e.g. resnet18 vs resnet34 stem)
        first = str(error).splitlines()[1:3]
        raise DepthpipeError(
            f"{name}: does not fit torchvision {arch}: {' '.join(first)}"
        ) from error
    return model


def _source_name(source: Path | BinaryIO) -> str:
    """How errors name the source: the path, or the open file's name when it has one."""
    if isinstance(source, Path):
        return str(source)
    return str(getattr(source, "name", "") or "the encoder stream")


def _read_state_dict(source: Path | BinaryIO, name: str) -> dict[str, Any]:
    if isinstance(source, Path):
        if not source.is_file():
            raise DepthpipeError(
                f"{name}: encoder file not found (run its pretrain stage, or download it: "
                "dvc artifacts get <repo> encoder-<name>)"
            )
        with source.open("rb") as handle:
            return _read_stream(handle, name)
    # torch.load needs to seek (a zip archive's index is at its end)
    return _read_stream(source if source.seekable() else io.BytesIO(source.read()), name)


def _read_stream(handle: BinaryIO, name: str) -> dict[str, Any]:
    start = handle.tell()
    head = handle.read(len(TORCH_ZIP_MAGIC))
    size = handle.seek(0, io.SEEK_END) - start
    handle.seek(start)
    try:
        state = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a bad file
        raise DepthpipeError(f"{name}: {_diagnose(head, size, error)}") from error
    if not isinstance(state, dict):
        raise DepthpipeError(f"{name}: holds a {type(state).__name__}, not a state dict")
    return state


def _diagnose(head: bytes, size: int, error: Exception) -> str:
    """Why torch could not read a file, in the terms of what usually went wrong: torch's own
    messages are long and, for a text file, advise unpickling it without the safety check."""
    if size == 0:
        return "an empty file, not an encoder (an interrupted download or copy?)"
    is_torch = head.startswith(TORCH_ZIP_MAGIC) or head.startswith(PICKLE_MAGIC)
    if not is_torch:
        return (
            f"not a torch file ({size:,} bytes starting {head!r}: a text or HTML page, or a "
            "pointer file instead of the weights?)"
        )
    if isinstance(error, pickle.UnpicklingError):
        return (
            "holds Python objects besides tensors (a pickled model or a training checkpoint, "
            "not a state dict); not loaded, since unpickling them could run code"
        )
    reason = str(error).split(". ")[0]
    return f"a damaged torch file ({size:,} bytes; truncated download?): {reason}"


def _hint(state: dict[str, Any]) -> str:
    """What a state dict of the wrong kind is, for the two files most often confused with an
    encoder: a fine-tuned network's model.pt and a checkpoint holding a state dict."""
    if state and all(key.startswith("unet.") for key in state):
        return " (this is a fine-tuned depth network's model.pt: run it with depthpipe.predict)"
    if "state_dict" in state:
        return " (this is a training checkpoint: the weights are in its 'state_dict')"
    return ""


def _first(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
