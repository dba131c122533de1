"""Shared fixtures: writable caches for every test, tiny project folders (see tests/helpers.py);
how pytest-xdist shares the tests between its workers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import E2E_MODULES
from tests.helpers import LOW_RES, copy_project, save_untrained_model, write_params


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


@pytest.fixture(scope="session")
def scratch_project(fetched_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project with the scratch encoder written (shared; tests must not modify it)."""
    from depthpipe.config import load_params
    from depthpipe.paths import project_paths
    from depthpipe.stages import init_scratch

    root = copy_project(fetched_project, tmp_path_factory.mktemp("scratch") / "p")
    paths = project_paths(root)
    init_scratch.run(load_params(paths.params), paths)
    return root


@pytest.fixture(scope="session")
def scored_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny project at half resolution with two untrained (but real) networks saved."""
    from depthpipe.config import load_params
    from depthpipe.model import ModelSpec
    from depthpipe.paths import project_paths
    from depthpipe.stages import fetch, preprocess

    root = tmp_path_factory.mktemp("evaluate")
    write_params(root, LOW_RES)
    paths = project_paths(root)
    params = load_params(paths.params)
    fetch.run(params, paths)
    preprocess.run(params, paths)
    spec = ModelSpec("resnet18", 24, 32, params.depth.min_depth, params.depth.max_depth)
    save_untrained_model(paths.finetune_dir("scratch"), spec, seed=1)
    save_untrained_model(paths.finetune_dir(params.aug), spec, seed=2)
    return root


@pytest.fixture(scope="session")
def reproduced_pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny project after `dvc repro`, committed: (root, the repro's output). Built once per
    session for tests/test_dvc_e2e.py and tests/test_kill.py (minutes of CPU); nobody changes
    it: tests work in a tests.e2e.copy_reproduced of it."""
    from tests.e2e import reproduce_pristine

    return reproduce_pristine(tmp_path_factory.mktemp("pristine") / "project")


# The two tests that start a pair of DDP processes: one pair at a time on the cores.
DDP_TESTS = (
    "tests/stages/test_pretrain.py::test_pretrain__two_processes_ddp_on_cpu",
    "tests/stages/test_finetune.py::test_finetune__two_processes_ddp_on_cpu",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's scope scheduling with our own scopes: every test of E2E_MODULES in one
    worker (they share the session's `dvc repro`, minutes of CPU: split, each worker would run
    it), the DDP tests in one, every other test on its own. Scopes with the most tests go first,
    so the end-to-end chain, the longest, starts at once beside everything else. (xdist's own
    --dist loadgroup marks the tests through a node id that pytest 9 no longer lets it change.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ChainScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if module in E2E_MODULES:
                return "e2e"
            return "ddp" if nodeid in DDP_TESTS else nodeid

    return ChainScheduling(config, log)
