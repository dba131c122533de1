from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from depthpipe.config import load_params
from depthpipe.data.packed import PackedDepthDataset
from depthpipe.encoders import load_encoder
from depthpipe.errors import DepthpipeError
from depthpipe.model import load_finetuned
from depthpipe.paths import project_paths
from depthpipe.stages import finetune
from tests.helpers import copy_project, run_module, write_params


@pytest.fixture
def project(scratch_project: Path, tmp_path: Path) -> Path:
    return copy_project(scratch_project, tmp_path / "p")


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


def test_finetune__wrong_encoder_file_fails_cleanly(project: Path) -> None:
    paths = project_paths(project)
    encoder = paths.encoder_file("conservative")
    encoder.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), encoder)
    result = run_module("depthpipe.stages.finetune", "conservative", cwd=project)
    assert result.returncode == 2
    assert "encoder.pt: does not fit torchvision resnet18: unexpected keys" in result.stderr
    assert not paths.finetune_dir("conservative").exists()


def test_finetune__name_must_be_scratch_or_preset(project: Path) -> None:
    result = run_module("depthpipe.stages.finetune", "wild", cwd=project)
    assert result.returncode == 2
    assert "'wild' is neither 'scratch' nor a preset" in result.stderr


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
def test_finetune__short_run_lowers_validation_loss_and_is_deterministic(
    project: Path, tmp_path: Path
) -> None:
    write_params(project, {"finetune": {"epochs": 4, "lr": 0.001}})
    twin = copy_project(project, tmp_path / "twin")
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

    # Same params and inputs: the same numbers (DVC's run cache relies on it).
    twin_paths = project_paths(twin)
    finetune.run(load_params(twin_paths.params), twin_paths, "scratch")
    assert (
        json.loads((twin_paths.finetune_live("scratch") / "metrics.json").read_text())["val"]
        == metrics["val"]
    )


@pytest.mark.slow
def test_finetune__two_processes_ddp_on_cpu(project: Path) -> None:
    write_params(project, {"finetune": {"epochs": 1, "trainer": {"devices": 2, "strategy": "ddp"}}})
    result = run_module("depthpipe.stages.finetune", "scratch", cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    paths = project_paths(project)
    load_finetuned(paths.finetune_dir("scratch"))
    assert json.loads((paths.finetune_live("scratch") / "metrics.json").read_text())["val"]
    leftovers = [p for p in paths.finetune_dir("scratch").parent.iterdir() if p.name[0] == "."]
    assert leftovers == []
