"""Shared fixtures: a tiny project folder whose params.yaml is the committed one, shrunk."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

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


@pytest.fixture(autouse=True, scope="session")
def _writable_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    caches = tmp_path_factory.mktemp("caches")
    os.environ["MPLCONFIGDIR"] = str(caches / "matplotlib")
    os.environ["LIGHTLY_TRAIN_CACHE_DIR"] = str(caches / "lightly-train")
    os.environ["LIGHTLY_TRAIN_EVENTS_DISABLED"] = "1"


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """An empty project folder with the tiny params."""
    write_params(tmp_path)
    return tmp_path


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


@pytest.fixture(scope="session")
def fetched_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project after fetch + preprocess (shared; tests must not modify it)."""
    from depthpipe.config import load_params
    from depthpipe.paths import project_paths
    from depthpipe.stages import fetch, preprocess

    root = tmp_path_factory.mktemp("fetched")
    write_params(root)
    paths = project_paths(root)
    params = load_params(paths.params)
    fetch.run(params, paths)
    preprocess.run(params, paths)
    return root


def copy_project(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


Helper = Callable[..., Any]
