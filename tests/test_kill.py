"""Kill tests (issue 12): SIGKILL a long stage part-way through `dvc repro`, then `dvc repro` again.

The reference is the session's reproduced project (fixture ``reproduced_pristine``: tiny params,
real DVC in a temporary git repo, shared with tests/test_dvc_e2e.py; profile tests.e2e
REPRO_PROFILE). Each test works in its own cheap copy of it: it forces one stage with
`dvc repro -f -s <stage>`, SIGKILLs that stage's python process (found among dvc's children by
its command line, never dvc itself) once the stage has visibly started writing, and runs the same
command again. The re-run must exit 0, leave every declared output of the stage complete (for the
deterministic stages, byte for byte the reference's), resume training where a checkpoint allows,
leave no hidden staging folder behind and a clean `dvc status`.

Why the same forced command and not a plain `dvc repro`: dvc.lock still describes the outputs of
the last completed run, so a plain `dvc repro` does not run a killed stage whose inputs did not
change; it checks those outputs out of DVC's cache ("Stage 'preprocess' is cached - skipping run,
checking out outputs", dvc/stage/cache.py), and the stage's recovery would go untested. (Its
staging leftovers then stay until the stage next runs.) The lock test below starts from a params
edit, where plain `dvc repro` does run the stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import yaml

from depthpipe.paths import LIGHTLY_LAST_CHECKPOINT, MODEL_WEIGHTS, SCRATCH, stage_io
from depthpipe.stages import finetune
from tests.e2e import REPRO_PROFILE, WATCHER, cli_env, copy_reproduced, dvc, ran
from tests.helpers import write_params

pytestmark = pytest.mark.slow

T = TypeVar("T")

# The reference's REPRO_PROFILE runs preprocess in one process (the stage's process is then the
# only one with its command line) and pretrains 2 epochs (a checkpoint after the first leaves
# the second to resume). TINY's finetune.epochs (2): likewise, one epoch left to resume.
OUTPUT_FOLDERS = ("data", "models", "metrics", "dvclive")
# What depthpipe.atomic stages an output in: .<name>.tmp-<random> and .<name>.old-<pid>.
STAGING_NAME = re.compile(r"^\..+\.(tmp|old)-[^/]+$")
KILL_TIMEOUT = 600.0  # s, for a stage to reach its kill point (CPU shared with other jobs)


# --- the projects ---------------------------------------------------------------------------


@pytest.fixture
def reference(reproduced_pristine: tuple[Path, str]) -> Path:
    """The tiny project reproduced once per session, committed (read only: tests work in
    copies)."""
    return reproduced_pristine[0]


@pytest.fixture
def workspace(reference: Path, tmp_path: Path) -> Iterator[Path]:
    """A cheap copy of the reference project (tests.e2e.copy_reproduced): DVC's cache and
    outputs shared by hard links, without DVC's locks and state (.dvc/tmp). Removed after the
    test: each re-run writes about 1 GB of new outputs, and pytest keeps its temporary folders
    until three sessions later."""
    root = copy_reproduced(reference, tmp_path / "project")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _params(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / "params.yaml").read_text())


def _lock_outs(root: Path, stage: str) -> dict[str, str]:
    """Out path -> md5 that dvc.lock records for ``stage``."""
    entry = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]
    return {out["path"]: out["md5"] for out in entry["outs"]}


def _declared(root: Path, stage: str) -> list[str]:
    base, _, item = stage.partition("@")
    aug = _params(root)["aug"] if base == "evaluate" else None
    return list(stage_io(base, item or None, aug=aug).written)


def _curves(root: Path, stage: str) -> list[str]:
    base, _, item = stage.partition("@")
    return list(stage_io(base, item or None).curves)


# --- processes ------------------------------------------------------------------------------


@contextlib.contextmanager
def background_dvc(root: Path, *args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`dvc <args>` running in its own process group, output in ``log``; on leaving, the group
    (dvc, its shell, the stage and anything they started) is killed if still there."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dvc", *args],
            cwd=root,
            env=cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no output)"


def wait_until(
    condition: Callable[[], T | None],
    *,
    what: str,
    running: subprocess.Popen[bytes],
    log: Path,
    timeout: float = KILL_TIMEOUT,
    interval: float = 0.05,
) -> T:
    """Poll ``condition`` until it returns something; fail if ``running`` ends first or after
    ``timeout`` seconds, with dvc's output."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found is not None:
            return found
        if running.poll() is not None:
            raise AssertionError(f"dvc exited ({running.returncode}) before {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(interval)


def stage_process(dvc_process: subprocess.Popen[bytes], module: str) -> psutil.Process | None:
    """The python process running ``python -m <module>`` under dvc (not dvc, not a shell around
    it, whose command line holds the module name only inside its ``-c`` string)."""
    try:
        children = psutil.Process(dvc_process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            argv = child.cmdline()
            if module in argv and Path(argv[0]).name.startswith("python"):
                return child
    return None


def staging_leftovers(root: Path, folders: tuple[str, ...] = OUTPUT_FOLDERS) -> list[str]:
    """Hidden staging siblings (depthpipe.atomic's .<name>.tmp-* / .<name>.old-*) anywhere
    under ``folders``."""
    return sorted(
        path.relative_to(root).as_posix()
        for folder in folders
        if (root / folder).is_dir()
        for path in (root / folder).rglob(".*")
        if STAGING_NAME.match(path.name)
    )


def staged_in(root: Path, *folders: str) -> list[str] | None:
    """The staging siblings directly in ``folders`` (cheap enough to poll), None if none."""
    found = [
        f"{folder}/{entry.name}"
        for folder in folders
        if (root / folder).is_dir()
        for entry in os.scandir(root / folder)
        if STAGING_NAME.match(entry.name)
    ]
    return sorted(found) or None


def forced(stage: str) -> tuple[str, ...]:
    """The dvc arguments that run ``stage`` alone, whatever DVC knows about it."""
    return ("repro", "-f", "-s", stage)


def kill_stage_part_way(
    root: Path,
    stage: str,
    kill_point: Callable[[], T | None],
    *,
    what: str,
    log: Path,
    interval: float,
) -> T:
    """`dvc repro -f -s <stage>`; SIGKILL the stage's process once ``kill_point`` returns
    something (returned), as an out-of-memory kill or a lost node would: no clean-up runs.
    ``interval``: seconds between polls of ``kill_point``."""
    base, _, item = stage.partition("@")
    module = f"depthpipe.stages.{base}"
    with background_dvc(root, *forced(stage), log=log) as repro:
        victim = wait_until(
            lambda: stage_process(repro, module),
            what=f"{module} process",
            running=repro,
            log=log,
        )
        if item:
            assert item in victim.cmdline(), victim.cmdline()
        found = wait_until(kill_point, what=what, running=repro, log=log, interval=interval)
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            raise AssertionError(
                f"{stage} ended between its {what} and the kill:\n{_tail(log)}"
            ) from None
        repro.wait(timeout=120)
    output = log.read_text(errors="replace")
    assert repro.returncode != 0, f"dvc repro survived its stage's SIGKILL:\n{output[-3000:]}"
    assert f"failed to reproduce '{stage}'" in output, output[-3000:]
    return found


# --- what a recovered workspace looks like ---------------------------------------------------


def assert_complete(root: Path, stage: str) -> None:
    """Every output dvc.yaml declares for ``stage`` exists and is not empty."""
    for path in _declared(root, stage):
        target = root / path
        if target.is_dir():
            files = [f for f in target.rglob("*") if f.is_file()]
            assert files, f"{path}: empty folder"
            assert all(f.stat().st_size > 0 for f in files), f"{path}: empty file inside"
        else:
            assert target.is_file() and target.stat().st_size > 0, f"{path}: missing or empty"


def assert_clean(root: Path, **stale: Any) -> None:
    """No staging leftovers, and `dvc status` has nothing to report but the fingerprint stage
    (and the ``stale`` stages, with their expected status): fingerprint is ``always_changed``
    (dvc.yaml), so `dvc status --json` lists it in every workspace, the reference's included,
    as {"fingerprint": ["always changed"]}."""
    assert staging_leftovers(root) == []
    expected = {WATCHER: ["always changed"], **stale}
    assert json.loads(dvc("status", "--json", cwd=root)) == expected


def curve_steps(root: Path, curve: str) -> list[int]:
    """The step column of a DVCLive curve (TSV with a header)."""
    rows = (root / curve).read_text().splitlines()
    step = rows[0].split("\t").index("step")
    return [int(row.split("\t")[step]) for row in rows[1:]]


def assert_curves_whole(root: Path, reference: Path, stage: str) -> None:
    """One point per step, and the same steps as the uninterrupted reference run (same params):
    nothing lost to the kill, nothing logged twice by the resumed run."""
    for curve in _curves(root, stage):
        steps = curve_steps(root, curve)
        assert len(steps) == len(set(steps)), f"{curve}: a step logged twice: {steps}"
        assert steps == curve_steps(reference, curve), curve


def printed_json(output: str, stage: str) -> dict[str, Any]:
    """The JSON summary a stage printed on its last line, ``<stage>: {...}``."""
    match = re.search(rf"^{re.escape(stage)}: (\{{.*\}})$", output, re.MULTILINE)
    assert match, f"no '{stage}: {{...}}' line in:\n{output[-3000:]}"
    return json.loads(match.group(1))


# --- the tests ------------------------------------------------------------------------------


def test_kill__preprocess_rerun_is_complete_and_identical(
    reference: Path, workspace: Path, tmp_path: Path
) -> None:
    assert staging_leftovers(workspace) == []
    kill_stage_part_way(
        workspace,
        "preprocess",
        lambda: staged_in(workspace, "data/processed"),
        what="staging folder in data/processed",
        log=tmp_path / "killed.log",
        # the packing takes a fraction of a second once its folders are staged
        interval=0.001,
    )
    assert staged_in(workspace, "data/processed"), "the kill left nothing to clean"

    output = dvc(*forced("preprocess"), cwd=workspace)
    assert ran(output) == {"preprocess"}, output[-3000:]
    assert_complete(workspace, "preprocess")
    assert _lock_outs(workspace, "preprocess") == _lock_outs(reference, "preprocess")
    assert_clean(workspace)


def _rendering(root: Path) -> list[str] | None:
    """The fetch staging folders once the render has written a first view into one."""
    staged = staged_in(root, "data/raw")
    if staged and any(next((root / s).rglob("*.png"), None) for s in staged):
        return staged
    return None


def test_kill__fetch_synthetic_render_rerun_is_byte_identical(
    workspace: Path, tmp_path: Path
) -> None:
    """SIGKILL while fetch renders the embedded data: the re-run renders it again from
    scratch, byte for byte what an uninterrupted render wrote (its md5s in dvc.lock), and
    sweeps the leftovers. TINY renders in a third of a second; 60 scenes take seconds, so the
    kill lands inside the render."""
    write_params(workspace, REPRO_PROFILE, {"data": {"synthetic": {"train_scenes": 60}}})
    dvc(*forced("fetch"), cwd=workspace)
    uninterrupted = _lock_outs(workspace, "fetch")
    staged = kill_stage_part_way(
        workspace,
        "fetch",
        lambda: _rendering(workspace),
        what="a rendered view in a staging folder of data/raw",
        log=tmp_path / "killed.log",
        interval=0.001,
    )
    assert staged_in(workspace, "data/raw"), f"the kill left nothing to clean: {staged}"

    output = dvc(*forced("fetch"), cwd=workspace)
    assert ran(output) == {"fetch"}, output[-3000:]
    assert_complete(workspace, "fetch")
    assert _lock_outs(workspace, "fetch") == uninterrupted
    assert staging_leftovers(workspace) == []
    assert "fetch" not in json.loads(dvc("status", "--json", "fetch", cwd=workspace))


def _finished_checkpoint(workdirs: Path, pattern: str) -> Path | None:
    """A checkpoint matching ``pattern`` under ``workdirs`` that is complete: torch.save's zip
    ends with its central directory, the last bytes written."""
    for checkpoint in sorted(workdirs.glob(pattern)):
        with contextlib.suppress(OSError):
            if zipfile.is_zipfile(checkpoint):
                return checkpoint
    return None


def finished_epochs(checkpoint: Path) -> int:
    """How many epochs a Lightning checkpoint had finished: its fit loop's processed epochs,
    what Lightning itself counts when it resumes (lightning's fit_loop.done). Its ``epoch``
    field says less: a checkpoint saved at the end of epoch 0 holds ``epoch: 0``."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])


def assert_resumed(
    output: str, checkpoint: Path, done: int, stats: list[dict[str, Any]], epochs: int
) -> None:
    """Lightning restored the killed run's checkpoint (``done`` epochs finished), and the stage's
    summaries (printed and saved) say so, with the epoch it went on from and the configured
    epoch count."""
    assert 0 < done < epochs, f"killed after {done} of {epochs} epochs: not part-way"
    assert f"Restored all states from the checkpoint at {checkpoint}" in output, output[-3000:]
    for summary in stats:
        assert summary["resumed"] is True and summary["resumed_at_epoch"] == done, summary
        assert summary["epochs"] == epochs and summary["run_key"] in checkpoint.parent.parent.name


def test_kill__pretrain_rerun_resumes_from_its_checkpoint(
    reference: Path, workspace: Path, tmp_path: Path
) -> None:
    stage, preset = "pretrain@aggressive", "aggressive"  # nothing depends on it (aug: conservative)
    workdirs = workspace / ".depthpipe" / "pretrain"
    checkpoint = kill_stage_part_way(
        workspace,
        stage,
        lambda: _finished_checkpoint(workdirs, f"{preset}-*/{LIGHTLY_LAST_CHECKPOINT.as_posix()}"),
        what="pretraining checkpoint",
        log=tmp_path / "killed.log",
        interval=0.05,
    )
    done = finished_epochs(checkpoint)  # read now: the re-run removes it once exported
    assert not (workspace / "models" / "pretrain" / preset).exists()  # nothing half-exported

    output = dvc(*forced(stage), cwd=workspace)
    assert ran(output) == {stage}, output[-3000:]
    summary = json.loads((workspace / "models/pretrain" / preset / "pretrain.json").read_text())
    epochs = _params(workspace)["pretrain"]["epochs"]
    assert_resumed(output, checkpoint, done, [printed_json(output, stage), summary], epochs)
    assert f"{stage}: resumed from epoch {done} of {epochs}" in output, output[-3000:]
    assert_complete(workspace, stage)
    assert_curves_whole(workspace, reference, stage)
    assert not checkpoint.parent.parent.exists()  # exported: the working folder is gone
    assert_clean(workspace)


def test_kill__evaluate_rerun_is_complete_and_identical(
    reference: Path, workspace: Path, tmp_path: Path
) -> None:
    # metrics/.evaluate.json.tmp-*, metrics/.evaluate_per_image.csv.tmp-*, dvclive/.evaluate.tmp-*
    folders = ("metrics", "dvclive")
    kill_stage_part_way(
        workspace,
        "evaluate",
        lambda: staged_in(workspace, *folders),
        what="staged evaluate output",
        log=tmp_path / "killed.log",
        # staged after scoring, then written and drawn within about a second
        interval=0.001,
    )
    assert staged_in(workspace, *folders), "the kill left nothing to clean"

    output = dvc(*forced("evaluate"), cwd=workspace)
    assert ran(output) == {"evaluate"}, output[-3000:]
    assert_complete(workspace, "evaluate")
    assert _lock_outs(workspace, "evaluate") == _lock_outs(reference, "evaluate")
    assert_clean(workspace)


def _rwlock_writes(root: Path) -> dict[str, Any] | None:
    """The outputs some `dvc repro` holds the write lock on (.dvc/tmp/rwlock), if any."""
    try:
        lock = json.loads((root / ".dvc" / "tmp" / "rwlock").read_text())
    except (OSError, json.JSONDecodeError):  # not there yet, or being rewritten
        return None
    return lock.get("write") or None


def test_lock__second_repro_refused_while_the_first_runs_and_completes(
    reference: Path, workspace: Path, tmp_path: Path
) -> None:
    """Two plain `dvc repro` in one workspace after a params edit that re-runs only evaluate.

    DVC releases its repository lock (.dvc/tmp/lock, "Unable to acquire lock") while a stage's
    command runs (dvc.stage.decorators.unlocked_repo) and keeps only the read/write lock on
    that stage's dependencies and outputs (.dvc/tmp/rwlock). A second repro started then gets
    as far as the first stage it would take the write lock of (even to see that it did not
    change; here preprocess, whose outputs evaluate reads) and stops with DVC's rwlock error:
    "failed to reproduce '<stage>': '<path>' is busy, it is being blocked by: (PID <first
    dvc>): ..." (dvc/rwlock.py)."""
    stage = "evaluate"
    grid = _params(reference)["evaluate"]["grid_images"] - 1  # only the picture changes
    write_params(workspace, REPRO_PROFILE, {"evaluate": {"grid_images": grid}})
    first_log = tmp_path / "first.log"
    with background_dvc(workspace, "repro", log=first_log) as first:
        wait_until(
            lambda: stage_process(first, f"depthpipe.stages.{stage}"),
            what=f"{stage} process",
            running=first,
            log=first_log,
        )
        held = wait_until(
            lambda: _rwlock_writes(workspace),
            what="rwlock write entry",
            running=first,
            log=first_log,
        )
        assert any(path.endswith("metrics/evaluate.json") for path in held), held
        second = subprocess.run(
            [sys.executable, "-m", "dvc", "repro"],
            cwd=workspace,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        refused = second.stdout + second.stderr
        assert first.poll() is None, (
            "the first repro ended before the second reached the lock: nothing was tested\n"
            f"{_tail(first_log)}"
        )
        assert second.returncode != 0, refused[-3000:]
        assert re.search(
            rf"ERROR: failed to reproduce '[^']+': '[^']+' is busy, it is being blocked by:\n"
            rf"  \(PID {first.pid}\): \S+ repro\n",  # the first dvc
            refused,
        ), refused[-3000:]
        assert stage not in ran(refused)
        first.wait(timeout=KILL_TIMEOUT)
    first_output = first_log.read_text(errors="replace")
    assert first.returncode == 0, first_output[-3000:]
    assert ran(first_output) == {WATCHER, stage}, first_output[-3000:]
    assert_complete(workspace, stage)
    # The same scores as the reference's; only the picture grid changed.
    metrics = ("metrics/evaluate.json", "metrics/evaluate_per_image.csv")
    for path in metrics:
        assert (workspace / path).read_bytes() == (reference / path).read_bytes(), path
    assert_clean(workspace)


def test_kill__finetune_rerun_resumes_from_its_last_epoch(
    reference: Path, workspace: Path, tmp_path: Path
) -> None:
    stage = f"finetune@{SCRATCH}"
    # finetune keeps its resume point in <workdir>/resume, renamed into place once complete
    resume_point = f"{SCRATCH}-*/{finetune.RESUME}/{finetune.RESUME_CHECKPOINT}"
    checkpoint = kill_stage_part_way(
        workspace,
        stage,
        lambda: _finished_checkpoint(workspace / ".depthpipe" / "finetune", resume_point),
        what="fine-tuning resume point",
        log=tmp_path / "killed.log",
        interval=0.05,
    )
    workdir = checkpoint.parent.parent
    done = finished_epochs(checkpoint)  # read now: the re-run removes it once exported
    assert not (workspace / "models" / "finetune" / SCRATCH).exists()  # nothing half-exported

    output = dvc(*forced(stage), cwd=workspace)
    assert ran(output) == {stage}, output[-3000:]
    summary = json.loads((workspace / "models/finetune" / SCRATCH / "finetune.json").read_text())
    epochs = _params(workspace)["finetune"]["epochs"]
    assert_resumed(output, checkpoint, done, [printed_json(output, stage), summary], epochs)
    assert f"{stage}: resumed from epoch {done} of {epochs}" in output, output[-3000:]
    assert_complete(workspace, stage)
    assert_curves_whole(workspace, reference, stage)
    # On CPU the resumed run is the uninterrupted one, bit for bit (finetune restores the
    # random states): the same weights and the same curves as the reference.
    network = Path("models/finetune", SCRATCH, MODEL_WEIGHTS)
    assert (workspace / network).read_bytes() == (reference / network).read_bytes()
    for curve in _curves(workspace, stage):
        assert (workspace / curve).read_text() == (reference / curve).read_text(), curve
    assert not workdir.exists()  # exported: the working folder is gone
    # Clean, evaluate included: it depends on the two files it loads (model.pt, model.json),
    # identical to the reference's, not on best.ckpt or finetune.json, which record the resume.
    assert_clean(workspace)
