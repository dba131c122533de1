from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

from depthpipe.config import load_params
from depthpipe.distributed import DONE_MARKER, handoff_file
from depthpipe.encoders import load_encoder
from depthpipe.errors import DepthpipeError
from depthpipe.paths import project_paths
from depthpipe.stages import pretrain
from tests.helpers import copy_project, run_module, write_params


@pytest.fixture
def project(fetched_project: Path, tmp_path: Path) -> Path:
    return copy_project(fetched_project, tmp_path / "p")


def _workdirs(root: Path, preset: str) -> list[Path]:
    return sorted((root / ".depthpipe" / "pretrain").glob(f"{preset}-*"))


@pytest.mark.slow
def test_pretrain__exports_strict_encoder_and_dvclive(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = project_paths(project)
    stale = paths.encoder_dir("aggressive") / "from-other-params.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    handoff = handoff_file(project, "aggressive")  # a killed launch's decision
    handoff.parent.mkdir(parents=True)
    handoff.write_text('{"launch": "slurm-7.0.r0", "workdir": "elsewhere", "resume": true}\n')
    stats = pretrain.run(load_params(paths.params), paths, "aggressive")
    assert not stale.exists()  # outputs are discarded first, as dvc repro does
    assert not handoff.exists()  # read by every rank before training: removed after it
    assert stats["resumed"] is False and stats["images"] == 8
    encoder = load_encoder("resnet18", paths.encoder_file("aggressive"))
    assert sum(p.numel() for p in encoder.parameters()) > 11_000_000
    assert (paths.encoder_dir("aggressive") / "train.log").stat().st_size > 0
    summary = json.loads((paths.encoder_dir("aggressive") / "pretrain.json").read_text())
    assert summary["final_train_loss"] > 0
    live = paths.pretrain_live("aggressive")
    rows = (live / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tloss" and len(rows) >= 2
    assert json.loads((live / "metrics.json").read_text())["train"]["loss"] > 0
    # Not run by DVC: nothing records the outputs as it exits, so the folder stays, marked done
    # (a kill before `dvc commit` must not cost the training) ...
    [workdir] = _workdirs(project, "aggressive")
    assert json.loads((workdir / DONE_MARKER).read_text()) == stats
    # ... and the next run exports it again without training; run by DVC, it then goes.
    monkeypatch.setenv("DVC_STAGE", "pretrain@aggressive")
    again = pretrain.run(load_params(paths.params), paths, "aggressive")
    assert again == stats and again["seconds"] > 0  # the first run's own figures
    load_encoder("resnet18", paths.encoder_file("aggressive"))
    assert _workdirs(project, "aggressive") == []


@pytest.mark.slow
def test_pretrain__truncated_resume_point_is_reported_and_training_restarts(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resume point cut short (a copy killed mid-way, a full disk): reported, the folder
    emptied, a clean run from epoch 0 that exports a loadable encoder."""
    paths = project_paths(project)
    params = load_params(paths.params)
    arguments = pretrain.lightly_arguments(params, "conservative")
    images = pretrain.list_pretrain_images(paths.processed_megadepth)
    key = pretrain.run_key(arguments, images, paths.processed_megadepth)
    checkpoint = paths.pretrain_workdir("conservative", key) / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"PK\x03\x04" + bytes(4000))  # a zip's first bytes, no end
    stats = pretrain.run(params, paths, "conservative")
    err = capsys.readouterr().err
    assert f"{checkpoint}: unreadable resume checkpoint" in err
    assert "starting from the beginning" in err
    assert stats["resumed"] is False and stats["resumed_at_epoch"] == 0
    assert stats["run_key"] == key
    load_encoder("resnet18", paths.encoder_file("conservative"))


def test_temp_files_beside__lightning_saves_by_renaming_in_the_folder(tmp_path: Path) -> None:
    """Lightning's atomic save stages the checkpoint in Python's temp folder and moves it: inside
    temp_files_beside that folder is beside the working folder (one filesystem: a rename), and
    it is gone afterwards."""
    from lightning.fabric.utilities.cloud_io import _atomic_save

    workdir = tmp_path / "pretrain" / "conservative-0123456789ab"
    target = workdir / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True)
    with pretrain.temp_files_beside(workdir) as staging:
        assert Path(tempfile.gettempdir()) == staging
        assert staging.parent == workdir.parent
        assert staging.stat().st_dev == target.parent.stat().st_dev
        _atomic_save({"epoch": 3}, target)
        assert list(staging.iterdir()) == []  # moved out, nothing left behind
    assert tempfile.gettempdir() != str(staging) and not staging.exists()
    assert torch.load(target, weights_only=True) == {"epoch": 3}


def test_pretrain__transform_args_follow_preset(project: Path) -> None:
    params = load_params(project_paths(project).params)
    args = pretrain.lightly_arguments(params, "aggressive")
    assert args["method"] == params.pretrain.method and args["model"] == "torchvision/resnet18"
    assert args["transform_args"]["random_rotation"] == {"prob": 1.0, "degrees": 90.0}
    assert args["transform_args"]["random_flip"] == {"horizontal_prob": 0.5, "vertical_prob": 0.5}
    assert args["transform_args"]["image_size"] == (32, 32)
    conservative = pretrain.lightly_arguments(params, "conservative")["transform_args"]
    assert conservative["random_rotation"]["degrees"] == 15.0
    assert conservative["random_flip"]["vertical_prob"] == 0.0
    # pretrain.lr is passed as the rate itself: LightlyTrain's batch/reference scaling becomes 1
    assert args["optim_args"] == {"lr": params.pretrain.lr}
    assert args["method_args"] == {"reference_batch_size": params.pretrain.batch_size}


@pytest.mark.slow
def test_pretrain__optimiser_runs_at_pretrain_lr_whatever_the_batch(
    project: Path, tmp_path: Path
) -> None:
    """LightlyTrain would scale the rate by batch/256 (0.004 x 8/256 = 1.25e-4 here); the rate it
    logs must be pretrain.lr itself, up to the cosine decay (6 steps, logged at steps 2 and 5)."""
    write_params(project, {"pretrain": {"lr": 0.004, "batch_size": 8, "epochs": 2}})
    params = load_params(project_paths(project).params)
    arguments = pretrain.lightly_arguments(params, "conservative")
    pretrain.pretrain(arguments, project_paths(project).processed_megadepth, tmp_path / "lt", False)
    rows = [json.loads(line) for line in (tmp_path / "lt" / "metrics.jsonl").open()]
    rates = [
        v for row in rows for k, v in row.items() if k.startswith("lr-") and k.endswith("/params")
    ]
    assert rates, "LightlyTrain logged no learning rate"
    assert 0.5 * 0.004 <= max(rates) <= 0.004 * (1 + 1e-6)


def test_pretrain__unknown_preset_and_empty_folder(project: Path) -> None:
    paths = project_paths(project)
    params = load_params(paths.params)
    with pytest.raises(DepthpipeError, match=r"preset 'wild' is not in pretrain\.presets"):
        pretrain.run(params, paths, "wild")
    for image in paths.processed_megadepth.iterdir():
        image.unlink()
    with pytest.raises(DepthpipeError, match=r"megadepth: no images to pretrain on"):
        pretrain.run(params, paths, "aggressive")
    paths.processed_megadepth.rmdir()
    result = run_module("depthpipe.stages.pretrain", "aggressive", cwd=project)
    assert result.returncode == 2 and "image folder not found" in result.stderr


def test_pretrain__requeued_job_ignores_the_last_runs_hand_off(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requeued SLURM job keeps its job id and numbers its steps from 0 again: the hand-off
    its killed run left (same job, same step) is not this launch's, so a rank waits for rank 0's
    new decision instead of resuming where the old one said."""
    paths = project_paths(project)
    params = load_params(paths.params)
    first = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"}
    requeued = {**first, "SLURM_RESTART_COUNT": "1"}
    assert pretrain.launcher_id(first) == "slurm-7.0.r0"
    assert pretrain.launcher_id(requeued) == "slurm-7.0.r1"
    started = {**requeued, "SLURM_JOB_START_TIME": "1765000000"}
    assert pretrain.launcher_id(started) == "slurm-7.0.r1.t1765000000"
    old = paths.pretrain_workdir("aggressive", "0" * 12)
    handoff = handoff_file(project, "aggressive")
    handoff.parent.mkdir(parents=True)
    stale = {"key": "0" * 12, "workdir": str(old), "resume": True, "start_epoch": 3, "images": 8}
    handoff.write_text(json.dumps({**stale, "launch": pretrain.launcher_id(first)}) + "\n")
    for name, value in requeued.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(pretrain, "HANDOFF_WAIT_S", 1.5)  # the wait itself is not the point
    with pytest.raises(DepthpipeError, match=r"rank 0 wrote no decision for launch slurm-7\.0\.r1"):
        pretrain.take_over(paths, "aggressive")
    # Rank 0 of the requeued job decides afresh; the other ranks then take that decision.
    decision = pretrain.decide(params, paths, "aggressive", leader=True)
    assert decision["workdir"] != str(old) and decision["resume"] is False
    assert pretrain.take_over(paths, "aggressive") == {**decision, "launch": "slurm-7.0.r1"}


def _start(project: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "depthpipe.stages.pretrain", "conservative"],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _complete_zip(checkpoint: Path) -> bool:
    """A checkpoint Lightning has finished writing: torch.save's zip ends with its central
    directory, the last bytes written (Lightning writes the file in place)."""
    try:
        return zipfile.is_zipfile(checkpoint)
    except OSError:
        return False


def _kill_after_first_checkpoint(project: Path) -> Path:
    process = _start(project)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and process.poll() is None:
            found = [
                w
                for w in _workdirs(project, "conservative")
                if _complete_zip(w / "checkpoints" / "last.ckpt")
            ]
            if found:
                process.send_signal(signal.SIGKILL)  # a lost node: no chance to clean up
                process.wait(timeout=60)
                return found[0]
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
    raise AssertionError(f"no checkpoint before the run ended: {process.stderr.read()}")


@pytest.mark.slow
def test_pretrain__killed_run_then_changed_params_starts_clean(project: Path) -> None:
    """A run killed after its first checkpoint, then other params: a clean start under a new
    key, the killed run's folder removed. (The same params resume from the checkpoint:
    tests/test_kill.py, through `dvc repro`.)"""
    write_params(project, {"pretrain": {"epochs": 4}})  # killed after epoch 1 of 4
    paths = project_paths(project)
    workdir = _kill_after_first_checkpoint(project)
    assert not paths.encoder_dir("conservative").exists()  # nothing half-exported
    assert 1 <= pretrain.checkpoint_epoch(workdir / "checkpoints" / "last.ckpt") <= 3

    write_params(project, {"pretrain": {"epochs": 2}})
    result = run_module("depthpipe.stages.pretrain", "conservative", cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from epoch" not in result.stdout
    stats = json.loads((paths.encoder_dir("conservative") / "pretrain.json").read_text())
    assert stats["resumed"] is False and stats["run_key"] != workdir.name.split("-", 1)[1]
    assert stats["epochs"] == 2
    assert not workdir.exists()


@pytest.mark.slow
def test_pretrain__two_processes_ddp_on_cpu(project: Path) -> None:
    # strategy auto: LightlyTrain chooses DDP (find_unused_parameters) over gloo on CPU
    write_params(project, {"pretrain": {"trainer": {"devices": 2, "strategy": "auto"}}})
    result = run_module("depthpipe.stages.pretrain", "aggressive", cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "MEMBER: 2/2" in log or "world_size=2" in log.replace(" ", ""), log[-2000:]
    load_encoder("resnet18", project_paths(project).encoder_file("aggressive"))
    # Rank 0 alone listed the images and decided; the other rank took its decision.
    taken = re.findall(r"pretrain@aggressive: this rank takes rank 0's decision .*", log)
    assert len(taken) == 1, log[-2000:]
    assert "resume False" in taken[0]


@pytest.mark.slow
def test_pretrain__sigterm_exits_non_zero_leaving_no_output_to_record(
    project: Path, tmp_path: Path
) -> None:
    """SIGTERM (a job's time limit, scancel) once LightlyTrain trains (its first checkpoint is
    written): the stage exits 143, and neither its outputs nor stale ones of earlier params are
    there for `dvc commit --force` to record; the working folder stays, not marked done."""
    write_params(project, {"pretrain": {"epochs": 20}})  # far from its end when signalled
    paths = project_paths(project)
    stale = paths.encoder_file("conservative")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"weights of other params")
    paths.pretrain_live("conservative").mkdir(parents=True)
    log = tmp_path / "pretrain.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "depthpipe.stages.pretrain", "conservative"],
            cwd=project,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            if any(
                _complete_zip(w / "checkpoints" / "last.ckpt")
                for w in _workdirs(project, "conservative")
            ):
                process.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        status = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert status == 143, text[-3000:]
    assert "terminated: SIGTERM" in text
    assert not paths.encoder_dir("conservative").exists()
    assert not paths.pretrain_live("conservative").exists()
    [workdir] = _workdirs(project, "conservative")
    assert not (workdir / DONE_MARKER).exists()
    assert pretrain.checkpoint_epoch(workdir / "checkpoints" / "last.ckpt") < 20
