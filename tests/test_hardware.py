"""Precision and rank helpers: what ``auto`` becomes, which process is the leader."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from depthpipe.config import TrainerConfig, parse_params
from depthpipe.hardware import is_global_zero, resolve_precision, trainer_kwargs
from tests.helpers import committed_params, deep_merge

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, available: bool, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


def _trainer(section: str = "finetune", **trainer: Any) -> TrainerConfig:
    """The committed params' trainer section with ``trainer`` overrides, validated."""
    raw = deep_merge(committed_params(), {section: {"trainer": trainer}})
    return getattr(parse_params(raw), section).trainer


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "64-true"])
@pytest.mark.parametrize("accelerator", ["cpu", "gpu", "auto"])
@pytest.mark.parametrize("bf16_gpu", [False, True])
def test_resolve_precision__explicit_value_passes_through(
    monkeypatch: pytest.MonkeyPatch, precision: str, accelerator: str, bf16_gpu: bool
) -> None:
    _fake_cuda(monkeypatch, available=bf16_gpu, bf16=bf16_gpu)
    assert resolve_precision(precision, accelerator) == precision


@pytest.mark.parametrize("bf16_gpu", [False, True])
def test_resolve_precision__auto_on_cpu_is_fp32(
    monkeypatch: pytest.MonkeyPatch, bf16_gpu: bool
) -> None:
    # accelerator cpu: fp32 even when a bf16 GPU is there (it is not used)
    _fake_cuda(monkeypatch, available=bf16_gpu, bf16=bf16_gpu)
    assert resolve_precision("auto", "cpu") == "32-true"


@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_resolve_precision__auto_without_cuda_is_fp32(
    monkeypatch: pytest.MonkeyPatch, accelerator: str
) -> None:
    _fake_cuda(monkeypatch, available=False, bf16=False)
    assert resolve_precision("auto", accelerator) == "32-true"


@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_resolve_precision__auto_on_bf16_gpu_is_bf16_mixed(
    monkeypatch: pytest.MonkeyPatch, accelerator: str
) -> None:
    _fake_cuda(monkeypatch, available=True, bf16=True)
    assert resolve_precision("auto", accelerator) == "bf16-mixed"


def test_resolve_precision__auto_on_gpu_without_bf16_is_fp32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # e.g. a V100 or T4: no bf16 tensor cores, and fp16 would need loss scaling
    _fake_cuda(monkeypatch, available=True, bf16=False)
    assert resolve_precision("auto", "gpu") == "32-true"


def test_resolve_precision__auto_on_mps_is_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, available=True, bf16=True)
    assert resolve_precision("auto", "mps") == "32-true"


@needs_cuda
def test_resolve_precision__auto_on_this_gpu() -> None:
    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    assert resolve_precision("auto", "gpu") == expected


def test_trainer_kwargs__committed_trainer_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, available=True, bf16=True)  # accelerator cpu wins
    for section in ("pretrain", "finetune"):
        assert trainer_kwargs(_trainer(section)) == {
            "accelerator": "cpu",
            "devices": 1,
            "num_nodes": 1,
            "strategy": "auto",
            "precision": "32-true",
        }


def test_trainer_kwargs__maps_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, available=True, bf16=True)
    cfg = _trainer(accelerator="gpu", devices=4, num_nodes=2, strategy="ddp", num_workers=6)
    assert trainer_kwargs(cfg) == {
        "accelerator": "gpu",
        "devices": 4,
        "num_nodes": 2,
        "strategy": "ddp",
        "precision": "bf16-mixed",  # auto on a bf16 GPU
    }  # num_workers is the data loaders', not the Trainer's


def test_trainer_kwargs__explicit_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, available=True, bf16=True)
    cfg = _trainer(accelerator="gpu", precision="16-mixed")
    assert trainer_kwargs(cfg)["precision"] == "16-mixed"


def test_is_global_zero__no_rank_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert is_global_zero()


def test_is_global_zero__every_rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RANK_VARIABLES:
        monkeypatch.setenv(name, "0")
    assert is_global_zero()


@pytest.mark.parametrize("variable", RANK_VARIABLES)
@pytest.mark.parametrize("value", ["1", "3"])
def test_is_global_zero__any_nonzero_rank_is_a_worker(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    for name in RANK_VARIABLES:
        monkeypatch.setenv(name, "0")
    monkeypatch.setenv(variable, value)
    assert not is_global_zero()


def test_is_global_zero__second_node_leader_is_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    # local rank 0 of node 1 (torchrun): it owns nothing of the run
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("RANK", "4")
    assert not is_global_zero()
