"""Precision, forward-mode and rank helpers: what ``auto`` becomes, how a forward pass runs on a
device (layout, autocast), which process is the leader."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest
import torch

from depthpipe.config import TrainerConfig, parse_params
from depthpipe.hardware import (
    ForwardMode,
    forward_mode,
    is_global_zero,
    resolve_precision,
    trainer_forward_mode,
    trainer_kwargs,
)
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


def test_resolve_precision__auto_on_gpu_emulating_bf16_is_fp32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A V100: torch's default is_bf16_supported() says yes (bf16 runs, emulated, slower than
    fp32); only native bf16 (including_emulation=False) counts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation
    )
    assert resolve_precision("auto", "gpu") == "32-true"


def test_resolve_precision__auto_on_mps_is_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, available=True, bf16=True)
    assert resolve_precision("auto", "mps") == "32-true"


@needs_cuda
def test_resolve_precision__auto_on_this_gpu() -> None:
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    expected = "bf16-mixed" if native else "32-true"
    assert resolve_precision("auto", "gpu") == expected


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
def test_forward_mode__cuda_bf16_is_channels_last_under_bf16_autocast() -> None:
    mode = forward_mode("cuda", "bf16-mixed")
    assert mode.device == torch.device("cuda")
    assert mode.memory_format == torch.channels_last
    assert mode.autocast_dtype == torch.bfloat16
    context = mode.autocast()  # made, not entered: there may be no GPU here
    assert isinstance(context, torch.autocast)
    assert (context.device, context.fast_dtype) == ("cuda", torch.bfloat16)


def test_forward_mode__cpu_fp32_changes_nothing() -> None:
    mode = forward_mode("cpu", "32-true")
    assert mode.memory_format == torch.preserve_format and mode.autocast_dtype is None
    assert isinstance(mode.autocast(), nullcontext)
    # The input goes through as the very same tensor: CPU inference stays bit-identical.
    nhwc = torch.rand(2, 4, 5, 3).permute(0, 3, 1, 2)  # as network_input makes it
    assert mode.place_input(nhwc) is nhwc
    conv = torch.nn.Conv2d(3, 4, 3)
    weight = conv.weight
    assert mode.place_module(conv) is conv and conv.weight is weight
    assert weight.is_contiguous()


def test_forward_mode__cpu_bf16_autocasts_on_the_cpu() -> None:
    mode = forward_mode("cpu", "bf16-mixed")
    assert mode.memory_format == torch.preserve_format  # channels_last is for CUDA
    a, b = torch.rand(4, 4), torch.rand(4, 4)
    with mode.autocast():
        inside = torch.mm(a, b)
    assert inside.dtype == torch.bfloat16  # the context really autocasts
    assert torch.mm(a, b).dtype == torch.float32  # and only inside


def test_forward_mode__channels_last_placement_on_cpu_tensors() -> None:
    """What place_input and place_module do on CUDA, checked on CPU tensors (the device part is
    plain .to)."""
    on_cuda = forward_mode("cuda", "32-true")
    cpu_channels_last = ForwardMode(torch.device("cpu"), on_cuda.memory_format, None)
    image = cpu_channels_last.place_input(torch.rand(2, 3, 8, 8))
    conv = cpu_channels_last.place_module(torch.nn.Conv2d(3, 4, 3))
    assert image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("device", "precision", "dtype"),
    [
        ("cuda", "32-true", None),
        ("cuda", "16-mixed", torch.float16),
        ("cuda", "bf16-true", torch.bfloat16),  # run as bf16 autocast on the fp32 weights
        ("cpu", "16-mixed", torch.bfloat16),  # as Lightning: no fp16 autocast on CPUs
        ("cpu", "bf16-mixed", torch.bfloat16),
    ],
)
def test_forward_mode__autocast_dtype_per_precision(
    device: str, precision: str, dtype: torch.dtype | None
) -> None:
    assert forward_mode(device, precision).autocast_dtype == dtype


@pytest.mark.parametrize("precision", ["auto", "64-true", "bf16"])
def test_forward_mode__unresolved_precision_is_refused(precision: str) -> None:
    with pytest.raises(ValueError, match=f"precision '{precision}' is not resolved"):
        forward_mode("cpu", precision)


def test_trainer_forward_mode__committed_cpu_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, available=True, bf16=True)  # accelerator cpu: the GPU is not used
    mode = trainer_forward_mode(_trainer())
    assert mode == forward_mode("cpu", "32-true")
    assert mode.device == torch.device("cpu") and mode.memory_format == torch.preserve_format


@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_trainer_forward_mode__bf16_gpu(monkeypatch: pytest.MonkeyPatch, accelerator: str) -> None:
    _fake_cuda(monkeypatch, available=True, bf16=True)
    mode = trainer_forward_mode(_trainer(accelerator=accelerator))
    assert mode == forward_mode("cuda", "bf16-mixed")


def test_trainer_forward_mode__gpu_asked_but_absent_runs_on_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_cuda(monkeypatch, available=False, bf16=False)
    assert trainer_forward_mode(_trainer(accelerator="gpu")) == forward_mode("cpu", "32-true")
    # an explicit bf16 precision is kept: the CPU autocasts, as Lightning's CPU run would
    explicit = _trainer(accelerator="gpu", precision="bf16-mixed")
    assert trainer_forward_mode(explicit) == forward_mode("cpu", "bf16-mixed")


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
