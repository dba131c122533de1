"""What every stage's ``main`` does first: parse ``--root``, set up the environment, load params."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from depthpipe.config import Params, load_params
from depthpipe.distributed import stage_lock
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


def stage_name() -> str:
    """This stage's name from its command line: ``python -m depthpipe.stages.evaluate`` has
    sys.argv[0] .../evaluate.py (a test's run_main puts the module's name there)."""
    first = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "stage"
    return first.removesuffix(".py").rsplit(".", 1)[-1]


def open_project(root: Path, lock: bool = True) -> tuple[Params, ProjectPaths]:
    """The params and paths of the project at ``root``. ``lock``: hold the project's leader
    lock until the stage's main returns (errors.run_cli lets go), so a single-process stage
    (fetch, preprocess, evaluate, ...) never writes while another job leads the project; a
    stage of the holding job (`hold`) goes on. The training stages pass False: their rank 0
    alone takes it, around the training."""
    paths = project_paths(root)
    configure_environment(paths)
    params = load_params(paths.params)
    if lock:
        stage_lock(paths.leader_lock, stage_name())
    return params, paths
