"""Helpers for the tests that run the real DVC CLI on the whole pipeline (tests/test_dvc_e2e.py,
tests/test_kill.py): the project in a temporary git repository, the commands, and the one
reproduced project a session shares (fixture ``reproduced_pristine`` in tests/conftest.py).

`dvc repro` of the tiny project takes minutes on the shared CI cores, so it runs once per
session; each module works in a cheap copy of it (``copy_reproduced``) and never in it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import REPO, write_params

# The test modules that work on the session's reproduced project: one pytest-xdist worker runs
# them all, after one `dvc repro` (tests/conftest.py, pytest_xdist_make_scheduler).
E2E_MODULES = ("tests/test_dvc_e2e.py", "tests/test_kill.py")

# always_changed (dvc.yaml): it runs on every repro, in milliseconds, and fetch re-runs only
# when the file it writes changes.
WATCHER = "fingerprint"

# The profile of the shared reproduced project: the tests' TINY params, plus
REPRO_PROFILE: dict[str, Any] = {
    # one process: tests/test_kill.py kills the stage's process, and forked workers carry the
    # same command line (preprocess.workers changes no byte and is no DVC param; that workers
    # die with a killed stage is tests/stages/test_preprocess.py's)
    "preprocess": {"workers": 1},
    # a checkpoint after the first epoch leaves the second for tests/test_kill.py to resume
    # (TINY has 1 epoch)
    "pretrain": {"epochs": 2},
}


def cli_env() -> dict[str, str]:
    """The environment of every git, dvc and stage command these tests run."""
    env = dict(os.environ)
    # The stages' `python` must be this interpreter (the project's virtual environment).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        {
            "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "test",
            "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.com",
        }
    )
    return env


def sh(*args: str, cwd: Path, check: bool = True) -> str:
    """Run a command, return stdout+stderr; fail the test with the output on error."""
    result = subprocess.run(
        args, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=1800, check=False
    )
    output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{output[-4000:]}")
    return output


def dvc(*args: str, cwd: Path) -> str:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd)


def ran(output: str) -> set[str]:
    """The stages a dvc command ran, from its output."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def _project_files() -> list[str]:
    """What a clone of this project holds (plus files not committed yet, during development)."""
    listing = sh("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=REPO)
    return [f for f in listing.splitlines() if f and (REPO / f).is_file() and f != "dvc.lock"]


def make_repo(root: Path, *overrides: dict[str, Any]) -> Path:
    """This project in a new git repository at ``root``, params TINY then ``overrides``,
    committed (no dvc.lock: nothing reproduced yet)."""
    for name in _project_files():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    write_params(root, *overrides)
    sh("git", "init", "-q", "-b", "main", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-q", "-m", "tiny project", cwd=root)
    return root


def reproduce_pristine(root: Path) -> tuple[Path, str]:
    """The project with REPRO_PROFILE, `dvc repro` run and everything committed: (root, the
    repro's output). Shared by a whole session: work in a ``copy_reproduced`` of it."""
    make_repo(root, REPRO_PROFILE)
    output = dvc("repro", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-q", "-m", "reproduced", cwd=root)
    return root, output


def share_or_copy(source: str, target: str) -> str:
    """Hard-link a read-only file, copy the rest. Read-only are the files DVC protects (in its
    cache, and linked from there into the workspace: cache.type in .dvc/config) and git's
    objects; neither DVC nor git ever writes such a file in place (they write a new file and
    rename or link it), so sharing these inodes cannot change the source, and the copy of the
    checkpoints and data costs nothing."""
    if not os.stat(source).st_mode & stat.S_IWUSR:
        os.link(source, target)
        return target
    return str(shutil.copy2(source, target))


def copy_reproduced(source: Path, target: Path) -> Path:
    """An independent git + DVC repository at ``target`` with ``source``'s commits, workspace
    and cache (read-only files shared, see ``share_or_copy``), without DVC's locks and state
    (.dvc/tmp: they describe ``source``'s inodes and processes)."""

    def skipped(folder: str, names: list[str]) -> set[str]:
        return {"tmp"} if Path(folder) == source / ".dvc" else set()

    shutil.copytree(source, target, symlinks=True, ignore=skipped, copy_function=share_or_copy)
    return target
