"""End to end with the real DVC CLI in temporary git repositories, on the tiny profile.

The session's reproduced project (fixture ``reproduced_pristine``, tests/e2e.py) is copied once
for this module (fixture ``reproduced``) and then: re-run (nothing to do), shared through a real
S3-compatible server (SeaweedFS on loopback) into a fresh clone, and used for experiments. The
tests run in file order and change the copy; the last one checks that the shared project, which
tests/test_kill.py also copies, did not change with it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from depthpipe.paths import stage_io
from tests.e2e import REPRO_PROFILE, WATCHER, cli_env, copy_reproduced, dvc, ran, sh
from tests.helpers import committed_params, top_level_files, write_params
from tests.servers import ACCESS_KEY, BUCKET, SECRET_KEY, S3Server

pytestmark = pytest.mark.slow

ALL_STAGES = (
    WATCHER,
    "fetch",
    "preprocess",
    "pretrain@aggressive",
    "pretrain@conservative",
    "init_scratch",
    "finetune@scratch",
    "finetune@conservative",
    "evaluate",
)
pytest_plugins = ("tests.servers",)

# (inode, size, mode, mtime) of a file: what a write, a chmod or a replacement changes
FileState = tuple[int, int, int, int]


def file_states(root: Path) -> dict[str, FileState]:
    """Every file of a project, git's and DVC's cache included, but not DVC's scratch folder
    (.dvc/tmp). Without the mtime of git's objects: git "freshens" an object it was about to
    write again (sets its mtime to now so that gc keeps it), a harmless change to a shared
    inode."""
    states: dict[str, FileState] = {}
    for folder, dirs, files in os.walk(root):
        if Path(folder) == root / ".dvc" and "tmp" in dirs:
            dirs.remove("tmp")
        for name in files:
            path = Path(folder, name)
            key = path.relative_to(root).as_posix()
            info = os.lstat(path)
            mtime = 0 if key.startswith(".git/objects/") else info.st_mtime_ns
            states[key] = (info.st_ino, info.st_size, info.st_mode, mtime)
    return states


@pytest.fixture(scope="module")
def pristine_files(reproduced_pristine: tuple[Path, str]) -> dict[str, FileState]:
    """The shared project's files before this module works in its copy."""
    return file_states(reproduced_pristine[0])


@pytest.fixture(scope="module")
def reproduced(
    reproduced_pristine: tuple[Path, str],
    pristine_files: dict[str, FileState],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, str]:
    """This module's own copy of the shared reproduced project, and the output of its repro
    (``pristine_files`` recorded first: the shared project before this module works)."""
    pristine, output = reproduced_pristine
    return copy_reproduced(pristine, tmp_path_factory.mktemp("e2e") / "project"), output


def test_repro__runs_every_stage_then_nothing(reproduced: tuple[Path, str]) -> None:
    root, first = reproduced
    assert ran(first) == set(ALL_STAGES)
    # The copy is a repository of its own, a clean checkout of the reproduced commit.
    assert sh("git", "status", "--porcelain", cwd=root) == ""
    assert json.loads(dvc("status", "--json", cwd=root)) == {WATCHER: ["always changed"]}
    again = dvc("repro", cwd=root)
    assert ran(again) == {WATCHER} and "Stage 'fetch' didn't change, skipping" in again
    stage_list = dvc("stage", "list", cwd=root)
    for stage in ALL_STAGES:
        assert stage in stage_list
    metrics = json.loads(dvc("metrics", "show", "--json", cwd=root))
    assert "encoder" in json.dumps(metrics) and "scratch" in json.dumps(metrics)
    html = root / "plots.html"
    dvc("plots", "show", "-o", str(html.with_suffix("")), cwd=root)
    page = (html.with_suffix("") / "index.html").read_text()
    assert "predictions.png" in page and "Self-supervised pretraining loss" in page


# Each comparison chart and the series it must hold (file paths relative to dvclive/).
COMPARISONS = {
    "validation_abs_rel": {
        "conservative/plots/metrics/val/abs_rel.tsv",
        "scratch/plots/metrics/val/abs_rel.tsv",
        "scratch/plots/metrics/val/prior_abs_rel.tsv",
    },
    "validation_delta1": {
        "conservative/plots/metrics/val/delta1.tsv",
        "scratch/plots/metrics/val/delta1.tsv",
        "scratch/plots/metrics/val/prior_delta1.tsv",
    },
    "training_loss": {
        "conservative/plots/metrics/train/loss.tsv",
        "scratch/plots/metrics/train/loss.tsv",
    },
    "validation_loss": {
        "conservative/plots/metrics/val/loss.tsv",
        "scratch/plots/metrics/val/loss.tsv",
    },
    "pretraining_loss": {
        "aggressive/plots/metrics/train/loss.tsv",
        "conservative/plots/metrics/train/loss.tsv",
    },
}


def chart_series(plots_json: dict) -> dict[str, dict[str, int]]:
    """Per chart drawn by `dvc plots show --json`: each series (source file) and its points."""
    charts: dict[str, dict[str, int]] = {}
    for name, renders in plots_json["data"].items():
        for render in renders:
            if render["type"] != "vega":
                continue
            for row in render["content"]["data"]["values"]:
                source = row.get("filename") or row.get("filename::field") or name
                series = source.split("::")[0]
                charts.setdefault(name, {}).setdefault(series, 0)
                charts[name][series] += 1
    return charts


def test_plots__comparison_charts_hold_both_models_and_the_prior(
    reproduced: tuple[Path, str],
) -> None:
    root, _ = reproduced
    charts = chart_series(json.loads(dvc("plots", "show", "--json", cwd=root)))
    # only the comparison charts and the per-image scatter are drawn: no per-file chart of an
    # epoch counter or a constant
    scatter = "metrics/evaluate_per_image.csv"
    assert set(charts) == {*COMPARISONS, scatter}, sorted(charts)
    assert sum(charts[scatter].values()) == 3  # TINY: one point per test image
    for name, expected in COMPARISONS.items():
        assert set(charts[name]) == expected, (name, charts[name])
        assert all(points >= 1 for points in charts[name].values()), (name, charts[name])
    fine_tuning_epochs = 2  # TINY: finetune.epochs
    assert charts["validation_abs_rel"]["scratch/plots/metrics/val/abs_rel.tsv"] == (
        fine_tuning_epochs
    )


OUTPUT_FOLDERS = ("data", "models", "metrics", "dvclive")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


def _files_made_by_repro(root: Path) -> set[str]:
    """Files under OUTPUT_FOLDERS that the project's first commit did not have."""
    first = sh("git", "rev-list", "--max-parents=0", "HEAD", cwd=root).split()[0]
    committed = set(sh("git", "ls-tree", "-r", "--name-only", first, cwd=root).splitlines())
    return {
        path.relative_to(root).as_posix()
        for top in OUTPUT_FOLDERS
        if (root / top).is_dir()
        for path in (root / top).rglob("*")
        if path.is_file() and path.relative_to(root).as_posix() not in committed
    }


def _is_dvc_gitignore(path: str, root: Path, cached: list[str]) -> bool:
    """A .gitignore DVC writes beside cached outputs: only /<name> lines, each a cached out."""
    if Path(path).name != ".gitignore":
        return False
    folder = Path(path).parent.as_posix()
    lines = [line for line in (root / path).read_text().splitlines() if line.strip()]
    return bool(lines) and all(
        line.startswith("/") and f"{folder}{line}" in cached for line in lines
    )


def test_repro__writes_exactly_the_declared_outputs(reproduced: tuple[Path, str]) -> None:
    """What the stages really write (observed after `dvc repro`) is what dvc.yaml declares:
    no undeclared file, no declared output missing, and the DVCLive files dvc.yaml names
    (summaries, curves the plots draw) exist."""
    root, _ = reproduced
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(ALL_STAGES)
    aug = yaml.safe_load((root / "params.yaml").read_text())["aug"]
    declared: list[str] = []
    cached: list[str] = []
    for name, entry in lock.items():
        base, _, item = name.partition("@")
        io = stage_io(base, item or None, aug=aug if base == "evaluate" else None)
        outs = sorted(out["path"] for out in entry.get("outs", []))
        assert outs == sorted(io.written), name  # what DVC recorded is what paths.py says
        declared += outs
        cached += list(io.outs)
        for path in outs:  # every declared output was written (a folder: not empty)
            target = root / path
            assert target.is_file() or any(p.is_file() for p in target.rglob("*")), path
        for path in io.metrics:  # a DVCLive summary or metrics file: a non-empty JSON object
            values = json.loads((root / path).read_text())
            assert isinstance(values, dict) and values, path
        for path in io.curves:  # the metric names the code logs: a header and rows
            assert len((root / path).read_text().splitlines()) >= 2, path

    made = _files_made_by_repro(root)
    undeclared = sorted(
        path
        for path in made
        if not any(_within(path, out) for out in declared)
        and not _is_dvc_gitignore(path, root, cached)
    )
    assert undeclared == [], f"written by the stages but declared by no stage: {undeclared}"

    from dvc.dvcfile import load_file
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        top_level = top_level_files(load_file(repo, str(root / "dvc.yaml")).plots)
    missing = sorted(path for path in top_level if not (root / path).exists())
    assert missing == [], f"dvc.yaml's top-level plots name files the run did not write: {missing}"


@pytest.fixture
def s3_endpoint(seaweedfs: S3Server) -> str:
    """The shared SeaweedFS server (tests/servers.py) as the team's S3 remote."""
    return seaweedfs.endpoint


def _add_s3_remote(root: Path, endpoint: str) -> None:
    """The README's recipe: the URL in .dvc/config, credentials only in .dvc/config.local."""
    dvc("remote", "add", "-f", "-d", "team", f"s3://{BUCKET}/store", cwd=root)
    dvc("remote", "modify", "team", "endpointurl", endpoint, cwd=root)
    dvc("remote", "modify", "--local", "team", "access_key_id", ACCESS_KEY, cwd=root)
    dvc("remote", "modify", "--local", "team", "secret_access_key", SECRET_KEY, cwd=root)


def _tracked_files_with_secret(root: Path) -> list[str]:
    tracked = sh("git", "ls-files", cwd=root).splitlines()
    return [
        f
        for f in tracked
        if (root / f).is_file() and SECRET_KEY in (root / f).read_text(errors="ignore")
    ]


def test_share__s3_push_then_teammate_pulls_encoder_and_reproduces(
    reproduced: tuple[Path, str], s3_endpoint: str, tmp_path: Path
) -> None:
    root, _ = reproduced
    _add_s3_remote(root, s3_endpoint)
    sh("git", "add", ".dvc/config", cwd=root)
    sh("git", "commit", "-q", "-m", "team remote", cwd=root)
    dvc("push", "--run-cache", cwd=root)
    assert _tracked_files_with_secret(root) == []
    assert "config.local" in (root / ".dvc" / ".gitignore").read_text()

    clone = tmp_path / "teammate"
    sh("git", "clone", "-q", str(root), str(clone), cwd=tmp_path)
    assert not (clone / "models").joinpath("pretrain", "conservative").exists()
    _add_s3_remote(clone, s3_endpoint)  # the teammate's own credentials, also local-only
    dvc("pull", "pretrain@conservative", cwd=clone)
    encoder = "models/pretrain/conservative/encoder.pt"
    assert (clone / encoder).read_bytes() == (root / encoder).read_bytes()
    assert not (clone / "models" / "finetune" / "scratch").exists()  # only what was asked for

    # Nothing changed: everything comes from the remote (outputs and run cache), nothing runs.
    output = dvc("repro", "--pull", cwd=clone)
    assert ran(output) == {WATCHER}, output[-3000:]
    assert dvc("status", cwd=clone).split() == [f"{WATCHER}:", "always", "changed"]
    # The teammate changes an evaluation knob: evaluate re-runs on the pulled networks, nothing
    # upstream does (a changed fine-tuning knob: test_exp_run below, aug).
    grid = committed_params()["evaluate"]["grid_images"] - 1  # any value but the committed one
    write_params(clone, REPRO_PROFILE, {"evaluate": {"grid_images": grid}})
    output = dvc("repro", "--pull", cwd=clone)
    assert ran(output) == {WATCHER, "evaluate"}, output[-3000:]
    assert _tracked_files_with_secret(clone) == []


def test_exp_run__other_aug_reruns_only_its_finetune_and_evaluate(
    reproduced: tuple[Path, str], s3_endpoint: str, tmp_path: Path
) -> None:
    root, _ = reproduced
    output = dvc("exp", "run", "-n", "try-aggressive", "-S", "aug=aggressive", cwd=root)
    assert ran(output) == {WATCHER, "finetune@aggressive", "evaluate"}, output[-3000:]

    rows = json.loads(dvc("exp", "show", "--json", cwd=root))
    experiments = {}
    for row in rows:
        for exp in [row, *[e for group in row.get("experiments") or [] for e in group["revs"]]]:
            data = exp.get("data") or {}
            params = data.get("params", {}).get("params.yaml", {}).get("data", {})
            metrics = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data", {})
            if params and metrics:
                experiments[data.get("name") or exp.get("name") or exp["rev"]] = (params, metrics)
    augs = sorted(params["aug"] for params, _ in experiments.values())
    assert "aggressive" in augs and "conservative" in augs, experiments.keys()
    for _, metrics in experiments.values():
        assert set(metrics) >= {"encoder", "scratch", "improvement"}
        assert metrics["encoder"]["abs_rel"] > 0.0 and 0.0 <= metrics["scratch"]["delta1"] <= 1

    # dvc exp push to a git remote, dvc exp pull on the other side.
    origin = tmp_path / "origin.git"
    sh("git", "init", "-q", "--bare", str(origin), cwd=tmp_path)
    sh("git", "remote", "add", "origin", str(origin), cwd=root)
    sh("git", "push", "-q", "origin", "main", cwd=root)
    dvc("exp", "push", "origin", "try-aggressive", cwd=root)
    other = tmp_path / "other"
    sh("git", "clone", "-q", "-b", "main", str(origin), str(other), cwd=tmp_path)
    # exp push also sent the experiment's outputs to the team remote; pulling them back needs
    # the teammate's own (local-only) credentials.
    _add_s3_remote(other, s3_endpoint)
    dvc("exp", "pull", "origin", "try-aggressive", cwd=other)
    dvc("exp", "apply", "try-aggressive", cwd=other)
    assert "aug: aggressive" in (other / "params.yaml").read_text()
    # the experiment's model came through the S3 remote, not from a run
    assert (other / "models" / "finetune" / "aggressive" / "model.pt").is_file()
    assert "try-aggressive" in dvc("exp", "list", cwd=other)


def _exp_metrics(root: Path) -> dict[tuple[str, int], float]:
    """(aug, seed) -> encoder abs_rel of every run, read through the CLI's JSON (not the API)."""
    found: dict[tuple[str, int], float] = {}
    for row in json.loads(dvc("exp", "show", "--json", cwd=root)):
        for exp in [row, *[e for group in row.get("experiments") or [] for e in group["revs"]]]:
            data = exp.get("data") or {}
            if data.get("rev") == "workspace" or exp.get("rev") == "workspace":
                continue
            params = data.get("params", {}).get("params.yaml", {}).get("data", {})
            metrics = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data", {})
            if params and metrics:
                found[(params["aug"], params["seed"])] = metrics["encoder"]["abs_rel"]
    return found


def test_study__reads_real_experiments(reproduced: tuple[Path, str], tmp_path: Path) -> None:
    """The study over what real `dvc exp run` made: the baseline (conservative) and
    try-aggressive, both seed 0, and here conservative with seed 1. Conservative has 2 seeds
    (mean ± sd, intervals against scratch and the prior), aggressive 1, so the two pair on seed
    0 only (no interval, saying why). More seeds: tests/test_study.py, on synthetic rows; each
    seed here costs CI a pipeline run."""
    root, _ = reproduced
    output = dvc("exp", "run", "-S", "aug=conservative", "-S", "seed=1", cwd=root)
    # The training seed re-runs training only: the data (data.seed) stay as they are.
    assert ran(output) == set(ALL_STAGES) - {"fetch", "preprocess"}, output[-3000:]
    runs = _exp_metrics(root)
    assert set(runs) == {("aggressive", 0), ("conservative", 0), ("conservative", 1)}, runs
    out = tmp_path / "study"
    study = subprocess.run(
        [sys.executable, "-m", "depthpipe.study", "--out", str(out)],
        cwd=root,
        env=cli_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert study.returncode == 0, study.stderr[-3000:]
    result = study.stdout
    assert f"| aggressive | 1 | {runs[('aggressive', 0)]:.4f} |" in result, result
    conservative = (runs[("conservative", 0)] + runs[("conservative", 1)]) / 2
    assert f"| conservative | 2 | {conservative:.4f} ± " in result, result
    difference = runs[("aggressive", 0)] - runs[("conservative", 0)]  # seed 0 pairs, seed 1 not
    assert (
        f"| aggressive - conservative | abs_rel | 1 | {difference:+.4f} | - | no interval: one"
        " seed per group" in result
    ), result
    # two seeds: a 95% interval
    assert re.search(r"\| conservative - scratch \| abs_rel \| 2 \| [-+]\S+ \| \[", result), result
    assert re.search(r"\| scratch - prior \| abs_rel \| 2 \| [-+]\S+ \| \[", result), result
    assert (out / "study.md").read_text() == result
    assert (out / "study.png").stat().st_size > 10_000
    missing = subprocess.run(
        [sys.executable, "-m", "depthpipe.study", "--by", "finetune.lrr"],
        cwd=root,
        env=cli_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2 and "--by finetune.lrr: no such param" in missing.stderr


def test_copy__work_in_it_left_the_shared_project_untouched(
    reproduced: tuple[Path, str],
    reproduced_pristine: tuple[Path, str],
    pristine_files: dict[str, FileState],
) -> None:
    """The tests above committed, pushed and ran experiments in this module's copy of the
    session's reproduced project (read-only files shared by hard links); the shared project,
    which tests/test_kill.py copies too, is as it was: same files (same inodes, sizes, modes,
    times), DVC's cache still read-only, a clean git and DVC status, no experiment."""
    root, _ = reproduced
    pristine, _ = reproduced_pristine
    # The module's earlier tests did change the copy (else nothing below was tested).
    pristine_head = sh("git", "rev-parse", "HEAD", cwd=pristine).strip()
    assert sh("git", "rev-parse", "HEAD", cwd=root).strip() != pristine_head
    sh("git", "merge-base", "--is-ancestor", pristine_head, "HEAD", cwd=root)
    assert sh("git", "for-each-ref", "refs/exps", cwd=root).strip()

    now = file_states(pristine)
    changed = sorted(
        path for path in now.keys() | pristine_files if now.get(path) != pristine_files.get(path)
    )
    assert changed == [], f"changed in the shared project: {changed[:20]}"
    cached = [path for path in now if path.startswith(".dvc/cache/files/")]
    assert cached and not any(now[path][2] & stat.S_IWUSR for path in cached)
    assert sh("git", "status", "--porcelain", cwd=pristine) == ""
    assert sh("git", "for-each-ref", "refs/exps", cwd=pristine) == ""
    assert json.loads(dvc("status", "--json", cwd=pristine)) == {WATCHER: ["always changed"]}
