"""Test helpers shared by every test module: the committed params shrunk, and subprocess runs.

Fixtures live in conftest.py; plain functions live here so tests import them explicitly.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

from depthpipe.encoders import build_resnet
from depthpipe.errors import run_cli
from depthpipe.model import DepthNet, ModelSpec, build_unet, save_finetuned

REPO = Path(__file__).resolve().parents[1]

# The committed demo params, shrunk so a stage runs in seconds on one CPU core. Tests take the
# real file and override sizes, never write params from scratch: a renamed key breaks them.
TINY: dict[str, Any] = {
    "data": {
        "synthetic": {
            "width": 64,
            "height": 48,
            "train_scenes": 3,
            "val_scenes": 1,
            "scans_per_scene": 1,
            "views_per_scan": 3,
            "megadepth_scenes": 2,
            "megadepth_images_per_scene": 4,
            "megadepth_long_side": 80,
        }
    },
    "preprocess": {"height": 48, "width": 64, "megadepth_short_side": 48, "val_fraction": 0.34},
    "pretrain": {"epochs": 1, "batch_size": 4, "image_size": 32},
    "finetune": {"epochs": 2, "batch_size": 4},
    "evaluate": {"grid_images": 2, "batch_size": 4},
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def committed_params() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def write_params(root: Path, *overrides: dict[str, Any]) -> Path:
    """params.yaml in ``root``: the committed file shrunk to TINY, then ``overrides``."""
    params = deep_merge(committed_params(), TINY)
    for override in overrides:
        params = deep_merge(params, override)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_module(
    module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )


def exit_status(code: object) -> int:
    """The status a process exits with after ``sys.exit(code)``: None is 0, a message is 1."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def run_main(main: Callable[[], None], *args: str, cwd: Path) -> int:
    """``python -m <module> *args`` run in this process: the module's ``main`` through the same
    ``run_cli``, with sys.argv and the working folder set for the call; returns the exit status
    (output: capsys). A subprocess would import torch, Lightning and fastai again, 20 s and more
    per test on the shared CI cores; one ``run_module`` test per command keeps the real command
    line covered.
    """
    # What a main sets for its whole process, put back so later tests see the defaults (the
    # training stages' mains also take over SIGTERM: depthpipe.distributed.stop_on_sigterm).
    grad_enabled, max_pixels, argv = torch.is_grad_enabled(), Image.MAX_IMAGE_PIXELS, sys.argv
    sigterm = signal.getsignal(signal.SIGTERM)
    sys.argv = [main.__module__, *args]
    try:
        with contextlib.chdir(cwd):
            run_cli(main)
    except SystemExit as stop:
        return exit_status(stop.code)
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, sigterm)
        torch.set_grad_enabled(grad_enabled)
        Image.MAX_IMAGE_PIXELS = max_pixels
    return 0


def copy_project(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


LOW_RES = {"preprocess": {"height": 24, "width": 32}}  # model input at half the raw 48x64


def save_untrained_model(folder: Path, spec: ModelSpec, seed: int) -> None:
    """A real network folder (model.pt + model.json) as finetune writes it, without training."""
    torch.manual_seed(seed)
    save_finetuned(DepthNet(build_unet(build_resnet(spec.arch), spec)), spec, folder)


def top_level_files(entries: list[Any]) -> list[str]:
    """Paths named by dvc.yaml's top-level ``plots:``/``metrics:`` (after DVC's interpolation).

    A plot is a path, ``{path: {x: ..., y: ...}}`` or ``{id: {x: {file: field}, y: {file:
    field}}}``; in the last form the files are the keys of ``x``/``y`` and the id is no path.
    """
    files: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            files.append(entry)
            continue
        for key, config in entry.items():
            config = config or {}
            named = [
                file
                for axis in ("x", "y")
                if isinstance(config.get(axis), dict)
                for file in config[axis]
            ]
            files.extend(named or [key])
    return files
