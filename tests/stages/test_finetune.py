from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint

from depthpipe.config import load_params
from depthpipe.data.packed import PackedDepthDataset
from depthpipe.distributed import DONE_MARKER
from depthpipe.encoders import load_encoder
from depthpipe.errors import DepthpipeError
from depthpipe.model import load_finetuned
from depthpipe.paths import VALIDATION_SPLIT, project_paths
from depthpipe.stages import finetune
from depthpipe.trainer_plugins import RankSeed
from tests.helpers import copy_project, run_main, run_module, write_params


@pytest.fixture
def project(scratch_project: Path, tmp_path: Path) -> Path:
    return copy_project(scratch_project, tmp_path / "p")


def test_make_trainer__installs_rank_seed(project: Path, tmp_path: Path) -> None:
    """The stage's own Trainer carries RankSeed with the params' seed (the DDP probe,
    tests/test_distributed.py, proves what RankSeed does with a Trainer of its own)."""
    params = load_params(project_paths(project).params)
    trainer = finetune.make_trainer(params, tmp_path / "work", {"abs_rel": 1.0}, resume=False)
    seeds = [c for c in trainer.callbacks if isinstance(c, RankSeed)]
    assert len(seeds) == 1 and seeds[0].seed == params.seed


def test_load_encoder__wrong_architecture_names_keys(tmp_path: Path) -> None:
    path = tmp_path / "encoder.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(DepthpipeError, match=r"does not fit torchvision resnet34: missing keys"):
        load_encoder("resnet34", path)
    with pytest.raises(DepthpipeError, match=r"resnet50: .*unexpected keys|resnet50: missing"):
        load_encoder("resnet50", path)
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(DepthpipeError, match=r"unexpected keys extra\.weight"):
        load_encoder("resnet18", path)


def test_finetune__wrong_encoder_file_fails_cleanly(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = project_paths(project)
    encoder = paths.encoder_file("conservative")
    encoder.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), encoder)
    # the stage's main in this process (the command line itself: the DDP test below)
    assert run_main(finetune.main, "conservative", cwd=project) == 2
    assert (
        "encoder.pt: does not fit torchvision resnet18: unexpected keys" in capsys.readouterr().err
    )
    assert not paths.finetune_dir("conservative").exists()


def test_finetune__name_must_be_scratch_or_preset(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(finetune.main, "wild", cwd=project) == 2
    assert "'wild' is neither 'scratch' nor a preset" in capsys.readouterr().err


def test_training_step__all_invalid_batch_is_skipped_without_nan(project: Path) -> None:
    paths = project_paths(project)
    module, _ = finetune.build_module(load_params(paths.params), paths, "scratch")
    batch = torch.utils.data.default_collate(
        [PackedDepthDataset(paths.processed_diode / "train")[i] for i in range(2)]
    )
    batch["mask"][:] = False
    loss = module.training_step(batch, 0)
    assert float(loss) == 0.0 and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_training_step__sample_left_without_valid_pixel_weighs_zero_and_is_counted(
    project: Path,
) -> None:
    """A crop can leave a sample with no valid depth: it trains with zero weight and the step
    reports it in train/empty_samples."""
    paths = project_paths(project)
    module, _ = finetune.build_module(load_params(paths.params), paths, "scratch")
    module.eval()  # batch-norm statistics of the pair must not depend on the batch's make-up
    dataset = PackedDepthDataset(paths.processed_diode / "train")
    pair = torch.utils.data.default_collate([dataset[0], dataset[1]])
    pair["mask"][0] = False
    logged: dict[str, float] = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    loss = module.training_step(pair, 0)
    alone = module.training_step(torch.utils.data.default_collate([dataset[1]]), 0)
    assert float(loss) == pytest.approx(float(alone), rel=1e-5)
    assert logged["train/empty_samples"] == 0.0  # the last call: sample 1 alone
    module.training_step(pair, 0)
    assert logged["train/empty_samples"] == 1.0


def _val_loss(net: torch.nn.Module, paths, params) -> float:
    module, _ = finetune.build_module(params, paths, "scratch")
    module.net.load_state_dict(net.state_dict())
    module.eval()
    dataset = PackedDepthDataset(paths.processed_diode / "validation")
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return float(module._loss(batch)[1])


@pytest.mark.slow
def test_finetune__short_run_lowers_validation_loss(project: Path) -> None:
    """(That the same params and inputs give the same numbers, which DVC's run cache relies
    on: the killed-and-resumed run below ends bit-identical to an uninterrupted one.)"""
    write_params(project, {"finetune": {"epochs": 4, "lr": 0.001}})
    paths = project_paths(project)
    params = load_params(paths.params)
    torch.manual_seed(params.seed)
    initial, _ = finetune.build_module(params, paths, "scratch")
    summary = finetune.run(params, paths, "scratch")
    model_dir = paths.finetune_dir("scratch")
    assert {p.name for p in model_dir.iterdir()} >= {"model.pt", "model.json", "best.ckpt"}
    trained, spec = load_finetuned(model_dir)
    assert (spec.height, spec.width) == (48, 64)
    assert _val_loss(trained, paths, params) < _val_loss(initial.net, paths, params)

    live = paths.finetune_live("scratch")
    metrics = json.loads((live / "metrics.json").read_text())
    assert set(metrics["val"]) == {"loss", "abs_rel", "delta1", "prior_abs_rel", "prior_delta1"}
    assert metrics["val"]["prior_abs_rel"] > 0 and set(metrics["train"]) == {
        "loss",
        "empty_samples",
    }
    assert 0.0 <= metrics["perf"]["data_wait_fraction"] < 1.0
    assert summary["best_val_abs_rel"] == pytest.approx(
        min(
            float(r.split("\t")[1])
            for r in (live / "plots/metrics/val/abs_rel.tsv").read_text().splitlines()[1:]
        )
    )
    hparams = torch.load(model_dir / "best.ckpt", weights_only=False)["hyper_parameters"]
    assert "unet" not in hparams and hparams["loss"] == "silog"


@pytest.mark.slow
def test_finetune__two_processes_ddp_on_cpu(project: Path, tmp_path: Path) -> None:
    """2-process DDP over gloo, and the same params in one process: finetune.batch_size is
    global, so both take the same optimiser steps (6 train samples, batch 4: 2 per epoch)."""
    one = copy_project(project, tmp_path / "one")
    write_params(one, {"finetune": {"epochs": 1}})
    write_params(project, {"finetune": {"epochs": 1, "trainer": {"devices": 2, "strategy": "ddp"}}})
    result = run_module("depthpipe.stages.finetune", "scratch", cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    paths = project_paths(project)
    load_finetuned(paths.finetune_dir("scratch"))
    assert json.loads((paths.finetune_live("scratch") / "metrics.json").read_text())["val"]
    leftovers = [p for p in paths.finetune_dir("scratch").parent.iterdir() if p.name[0] == "."]
    assert leftovers == []
    two = _summary(project)
    one_paths = project_paths(one)
    single = finetune.run(load_params(one_paths.params), one_paths, "scratch")
    assert (two["world_size"], single["world_size"]) == (2, 1)
    assert two["batch_size"] == single["batch_size"] == 4
    assert two["optimizer_steps"] == single["optimizer_steps"] == 2
    train_steps = [
        _steps(_curves(project_paths(r).finetune_live("scratch"))[TRAIN_CURVE])
        for r in (project, one)
    ]
    assert train_steps[0] == train_steps[1]  # the logged step of each epoch's point, too


# -- a run killed part-way ---------------------------------------------------------------------

# Killed at the end of epoch 1 of 3, when it has logged epoch 1 but its resume point is still the
# start of epoch 1: the resumed run must redo epoch 1 without logging it twice, then go on.
RESUME_EPOCHS = 3
VAL_CURVE = Path("plots", "metrics", "val", "abs_rel.tsv")
TRAIN_CURVE = "plots/metrics/train/loss.tsv"


@dataclass(frozen=True)
class Interrupted:
    project: Path  # finetune@scratch SIGKILLed in its last epoch, after logging its validation
    reference: Path  # the same project fine-tuned without interruption


def _workdirs(root: Path) -> list[Path]:
    return sorted((root / ".depthpipe" / "finetune").glob("scratch-*"))


def _rows(tsv: Path) -> int:
    with suppress(OSError):
        return len(tsv.read_text().splitlines())
    return 0


def _logged_past_resume_point(root: Path) -> bool:
    """The run has a resume point and has logged a validation after it: resuming must neither
    log that epoch twice nor lose it."""
    for workdir in _workdirs(root):
        resume = workdir / "resume"
        if (resume / "last.ckpt").is_file():
            return _rows(workdir / "live" / VAL_CURVE) > _rows(resume / "live" / VAL_CURVE)
    return False


def _kill_after_logging_past_resume_point(project: Path, log: Path) -> None:
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "depthpipe.stages.finetune", "scratch"],
            cwd=project,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            if _logged_past_resume_point(project):
                process.send_signal(signal.SIGKILL)  # a lost node: no chance to clean up
                process.wait(timeout=60)
                return
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    raise AssertionError(
        f"finetune was not caught past its resume point:\n{log.read_text()[-3000:]}"
    )


@pytest.fixture(scope="module")
def interrupted(scratch_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    """Shared, tests copy it: a killed fine-tuning and an uninterrupted one, same params."""
    base = tmp_path_factory.mktemp("interrupted")
    project = copy_project(scratch_project, base / "killed")
    write_params(project, {"finetune": {"epochs": RESUME_EPOCHS}})
    reference = copy_project(project, base / "reference")
    _kill_after_logging_past_resume_point(project, base / "killed.log")
    [workdir] = _workdirs(project)
    resume = workdir / "resume"
    assert finetune.checkpoint_epoch(resume / "last.ckpt") == 1
    assert _rows(workdir / "live" / VAL_CURVE) > _rows(resume / "live" / VAL_CURVE)
    paths = project_paths(reference)
    finetune.run(load_params(paths.params), paths, "scratch")
    return Interrupted(project, reference)


def _curves(live: Path) -> dict[str, str]:
    return {str(t.relative_to(live)): t.read_text() for t in sorted(live.rglob("*.tsv"))}


def _steps(tsv_text: str) -> list[int]:
    return [int(row.split("\t")[0]) for row in tsv_text.splitlines()[1:]]


def assert_trained_as(root: Path, reference: Path) -> None:
    """The same curves, steps and numbers as the reference run, and the same network."""
    live, reference_live = (project_paths(r).finetune_live("scratch") for r in (root, reference))
    curves, expected = _curves(live), _curves(reference_live)
    assert curves.keys() == expected.keys()
    for name, text in curves.items():
        assert _steps(text) == _steps(expected[name]), name
        if "/perf/" not in name:  # perf/: wall-clock shares, never equal
            assert text == expected[name], name
    for name in ("train/loss.tsv", "val/abs_rel.tsv"):  # one point per epoch, each step once
        steps = _steps(curves[f"plots/metrics/{name}"])
        assert len(steps) == RESUME_EPOCHS == len(set(steps)), (name, steps)
    nets = [load_finetuned(project_paths(r).finetune_dir("scratch"))[0] for r in (root, reference)]
    weights, expected_weights = (n.state_dict() for n in nets)
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights)


def _summary(root: Path) -> dict:
    return json.loads((project_paths(root).finetune_dir("scratch") / "finetune.json").read_text())


@pytest.mark.slow
def test_finetune__killed_run_resumes_and_ends_as_the_uninterrupted_run(
    interrupted: Interrupted,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Run as DVC runs it: DVC records the outputs as it exits, so the folder goes at once.
    monkeypatch.setenv("DVC_STAGE", "finetune@scratch")
    # Another path than the killed run's: Lightning's checkpoint holds absolute paths.
    project = copy_project(interrupted.project, tmp_path / "p")
    [workdir] = _workdirs(project)
    paths = project_paths(project)
    assert not paths.finetune_dir("scratch").exists()  # nothing half-exported

    summary = finetune.run(load_params(paths.params), paths, "scratch")
    assert f"finetune@scratch: resumed from epoch 1 of 3 ({workdir})\n" in capsys.readouterr().out
    assert summary["resumed"] is True and summary["resumed_at_epoch"] == 1
    assert summary["epochs"] == RESUME_EPOCHS
    assert summary["run_key"] == workdir.name.removeprefix("scratch-")
    assert _summary(project) == summary
    assert_trained_as(project, interrupted.reference)
    assert _workdirs(project) == []


@pytest.mark.slow
def test_finetune__changed_params_start_clean(
    interrupted: Interrupted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Also: outside DVC (a launcher) the finished folder stays, marked done, until `python -m
    depthpipe.distributed prune` after `dvc commit`; a re-run before that exports it again."""
    project = copy_project(interrupted.project, tmp_path / "p")
    [stale] = _workdirs(project)
    # A shorter run keeps the test short; test_run_key shows lr alone changes the key.
    write_params(project, {"finetune": {"epochs": 1, "lr": 0.003}})
    paths = project_paths(project)
    summary = finetune.run(load_params(paths.params), paths, "scratch")
    assert "finetune@scratch: resumed" not in capsys.readouterr().out
    assert summary["resumed"] is False and summary["run_key"] != stale.name[len("scratch-") :]
    assert summary["epochs"] == 1
    [done] = _workdirs(project)  # the stale folder is gone; the finished one waits for dvc
    assert done != stale and not stale.exists()
    assert json.loads((done / DONE_MARKER).read_text()) == summary
    model = paths.finetune_dir("scratch") / "model.pt"
    first_bytes = model.read_bytes()
    model.unlink()  # a kill between the export and dvc commit: the outputs are not recorded
    again = finetune.run(load_params(paths.params), paths, "scratch")
    assert again == summary and model.read_bytes() == first_bytes  # exported, not retrained


@pytest.mark.slow
def test_finetune__sigterm_exits_non_zero_leaving_no_output_to_record(
    scratch_project: Path, tmp_path: Path
) -> None:
    """SIGTERM (a job's time limit, scancel) after the first resume point: Lightning alone would
    exit 0. The stage exits 143, and neither its outputs nor the stale ones of earlier params are
    there for `dvc commit --force` to record; the resume point stays for the next run."""
    project = copy_project(scratch_project, tmp_path / "p")
    write_params(project, {"finetune": {"epochs": 3}})
    paths = project_paths(project)
    stale = paths.finetune_dir("scratch") / "model.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"weights of other params")
    (paths.finetune_live("scratch")).mkdir(parents=True)
    log = tmp_path / "finetune.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "depthpipe.stages.finetune", "scratch"],
            cwd=project,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            if any((w / "resume" / "last.ckpt").is_file() for w in _workdirs(project)):
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
    assert not paths.finetune_dir("scratch").exists()
    assert not paths.finetune_live("scratch").exists()
    [workdir] = _workdirs(project)
    assert (workdir / "resume" / "last.ckpt").is_file()
    assert not (workdir / DONE_MARKER).exists()


def test_run_key__follows_params_encoder_and_data(project: Path) -> None:
    paths = project_paths(project)
    params = load_params(paths.params)
    key = finetune.run_key(params, paths, "scratch")
    assert finetune.run_key(params, paths, "scratch") == key  # nothing changed
    write_params(project, {"finetune": {"lr": 0.003}})
    assert finetune.run_key(load_params(paths.params), paths, "scratch") != key
    write_params(project, {"finetune": {"trainer": {"num_workers": 1}}})
    assert finetune.run_key(load_params(paths.params), paths, "scratch") != key
    write_params(project)
    assert finetune.run_key(load_params(paths.params), paths, "scratch") == key
    encoder = paths.encoder_file("scratch")
    state = torch.load(encoder, weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 1.0
    torch.save(state, encoder)
    changed_encoder = finetune.run_key(params, paths, "scratch")
    assert changed_encoder != key
    index = paths.packed_split("validation") / "index.json"
    index.write_text(index.read_text() + "\n")
    assert finetune.run_key(params, paths, "scratch") not in (key, changed_encoder)


def _checkpoint(folder: Path) -> Path:
    """A placeholder where a checkpoint would be (prepare_workdir only looks for the file)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "last.ckpt").write_bytes(b"checkpoint")
    return folder / "last.ckpt"


def test_prepare_workdir__resumes_a_complete_point_only_and_drops_other_keys(
    tmp_path: Path,
) -> None:
    paths = project_paths(tmp_path)
    key = "0123456789ab"
    keep = [paths.finetune_workdir(n, key) for n in ("conservative", "scratch-2")]
    stale = paths.finetune_workdir("scratch", "ba9876543210")
    for folder in (*keep, stale):
        _checkpoint(folder / "resume")
    workdir = paths.finetune_workdir("scratch", key)
    # Killed in its first epoch, while staging its first resume point: curves, a best
    # checkpoint and a hidden staging folder, but no complete resume point.
    (workdir / "live").mkdir(parents=True)
    (workdir / "checkpoints").mkdir()
    (workdir / "checkpoints" / "best.ckpt").write_bytes(b"checkpoint")
    _checkpoint(workdir / ".resume.tmp-k1ll3d_0")
    assert finetune.prepare_workdir(paths, "scratch", key) == (workdir, False)
    assert workdir.is_dir() and list(workdir.iterdir()) == []  # starts clean
    assert not stale.exists() and all(k.is_dir() for k in keep)
    # A complete resume point under the same key is resumed, and kept as it is.
    last = _checkpoint(workdir / "resume")
    assert finetune.prepare_workdir(paths, "scratch", key) == (workdir, True)
    assert last.read_bytes() == b"checkpoint"


def test_best_checkpoint__keeps_the_best_score_when_the_project_moved(tmp_path: Path) -> None:
    """Lightning drops the best score when a checkpoint names another folder; a resumed run
    in a moved project would then keep the best of its own epochs only."""
    before = ModelCheckpoint(dirpath=tmp_path / "old" / "checkpoints", monitor="val/abs_rel")
    best = str(Path(str(before.dirpath)) / "best.ckpt")
    before.best_model_path = before.kth_best_model_path = best
    before.best_model_score = before.kth_value = torch.tensor(0.25)
    before.best_k_models = {best: torch.tensor(0.25)}
    state = before.state_dict()
    moved = tmp_path / "new" / "checkpoints"
    plain = ModelCheckpoint(dirpath=moved, monitor="val/abs_rel")
    with pytest.warns(UserWarning, match="dirpath has changed"):
        plain.load_state_dict(state)
    assert plain.best_model_score is None  # what BestCheckpoint is for
    after = finetune.BestCheckpoint(dirpath=moved, monitor="val/abs_rel")
    after.load_state_dict(state)
    assert after.best_model_score == pytest.approx(0.25)
    assert after.best_model_path == after.kth_best_model_path == str(moved / "best.ckpt")
    assert list(after.best_k_models) == [str(moved / "best.ckpt")]


def test_checkpoint_epoch__damaged_resume_point_names_the_folder_to_delete(tmp_path: Path) -> None:
    checkpoint = tmp_path / "scratch-0123456789ab" / "resume" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"PK\x03\x04 cut short by a full disk")
    damaged = r"unreadable resume checkpoint.*delete .*scratch-0123"
    with pytest.raises(DepthpipeError, match=damaged):
        finetune.checkpoint_epoch(checkpoint)


def test_prior_scores__validation_without_a_valid_pixel_is_named(project: Path) -> None:
    """A validation split whose masks are all empty: the prior cannot be scored, and the error
    names the split rather than logging a NaN baseline."""
    paths = project_paths(project)
    mask_file = paths.packed_split(VALIDATION_SPLIT) / "mask.npy"
    mask = np.load(mask_file)
    np.save(mask_file, np.zeros_like(mask))  # a copy of the shared project: ours to change
    with pytest.raises(DepthpipeError, match=r"validation: no validation image has a valid pixel"):
        finetune.prior_scores(load_params(paths.params), paths)


@pytest.mark.parametrize("frozen", [True, False])
def test_build_module__freeze_encoder_param_reaches_the_network(
    project: Path, frozen: bool
) -> None:
    """finetune.freeze_encoder from params.yaml to the module the stage trains: with it, the
    encoder's weights take no gradient and its batch-norm stays in eval mode; the decoder trains
    either way. (scratch here; a preset's encoder goes through the same function.)"""
    paths = project_paths(project)
    write_params(project, {"finetune": {"freeze_encoder": frozen}})
    module, _ = finetune.build_module(load_params(paths.params), paths, "scratch")
    module.train()
    encoder = module.encoder()
    assert all(p.requires_grad is not frozen for p in encoder.parameters())
    assert encoder.training is not frozen
    encoder_ids = {id(p) for p in encoder.parameters()}
    decoder = [p for p in module.parameters() if id(p) not in encoder_ids]
    assert decoder and all(p.requires_grad for p in decoder)
