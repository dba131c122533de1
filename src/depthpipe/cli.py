"""What every stage's ``main`` does first: parse ``--root``, set up the environment, load params."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from depthpipe.config import Params, load_params
from depthpipe.paths import ProjectPaths, project_paths


def stage_arguments(
    doc: str | None, item: str | None = None, item_help: str = ""
) -> argparse.Namespace:
    """``[item] [--root DIR]``; ``item`` is the foreach value of a stage (a preset name)."""
    parser = argparse.ArgumentParser(description=doc)
    if item:
        parser.add_argument(item, help=item_help)
    parser.add_argument("--root", type=Path, default=Path("."), help="project folder")
    return parser.parse_args()


def configure_environment(paths: ProjectPaths) -> None:
    """Telemetry off; LightlyTrain's and matplotlib's caches inside the project (writable,
    never $HOME) unless the caller chose other folders."""
    os.environ["LIGHTLY_TRAIN_EVENTS_DISABLED"] = "1"
    cache = paths.root / ".depthpipe"
    os.environ.setdefault("LIGHTLY_TRAIN_CACHE_DIR", str(cache / "lightly-train"))
    os.environ.setdefault("MPLCONFIGDIR", str(cache / "matplotlib"))


def open_project(root: Path) -> tuple[Params, ProjectPaths]:
    paths = project_paths(root)
    configure_environment(paths)
    return load_params(paths.params), paths
