"""Full-scale estimate for the tutorial profile: compute, memory, disk and time per epoch.

    python benchmarks/estimate.py [--utilisation 0.4]

Every number printed is an ESTIMATE of a run nobody has made here; what each rests on:

- FLOPs per image: counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real networks
  built on the meta device (shapes only, no arithmetic): the ResNet-50 U-Net of
  ``depthpipe.model.build_unet`` at the profile's fine-tuning input (768x1024), and DINO's
  ResNet-50 backbone + projection head at LightlyTrain's views (2 global crops at
  ``pretrain.image_size`` and 6 local crops at 96/224 of it, as depthpipe.stages.pretrain sets
  them). The counter counts matrix products and convolutions (2 FLOPs per multiply-add), not
  element-wise work. Training = 3x forward (the backward pass costs about twice the forward;
  the counter's own forward+backward count is printed as a check). DINO per image: the teacher
  runs forward on the 2 global views, the student forward and backward on all 8.
- Activation memory per image: bytes of the tensors autograd saves for the backward pass
  (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded, shared storage counted
  once), per image (batch 2 minus batch 1), measured in float32 on the CPU: the U-Net at 96x128
  and 192x256 (the two must scale with the pixel count) and scaled from 192x256 to 768x1024;
  DINO's views at their real sizes. Under bf16 mixed precision the saved activations are bf16:
  half of that (CPU bf16 is too slow here to measure it).
- Memory per GPU: fp32 weights + gradients + AdamW's two moments (16 bytes per trained
  parameter; the DINO teacher 4) + bf16 activations x the per-GPU batch. Allocator slack,
  cuDNN workspaces and the CUDA context come on top.
- Time per epoch: FLOPs / (dense bf16 tensor peak x ``--utilisation``). H100 SXM: 989.4 TFLOPS
  (NVIDIA H100 datasheet: 1,979 with 2:4 sparsity, dense is half). RTX 4090: 165.2 TFLOPS
  (NVIDIA Ada architecture whitepaper: BF16 with FP32 accumulate, 330.4 with sparsity). 4 GPUs
  = 4x one (DDP, gradient all-reduce and data loading assumed hidden); evaluate runs on one.
- Disk: the figures ``python -m depthpipe.doctor`` checks free space with (depthpipe.doctor).
- Images per epoch: DIODE outdoor train split by scene as preprocess splits it (the DIODE
  manifest's 12 scenes, ``preprocess.val_fraction``, ``data.seed``); 446 test images; 128,228
  MegaDepth photos.

The last line times this CPU on the U-Net (the activation measurement at 192x256) and says how
long evaluate would take on it. About 4 minutes on 2 busy CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from lightly.models.modules.heads import DINOProjectionHead
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from depthpipe import doctor
from depthpipe.config import Params, parse_params
from depthpipe.data import diode
from depthpipe.encoders import build_resnet
from depthpipe.model import DepthNet, ModelSpec, build_unet
from depthpipe.paths import DIODE_TRAIN_SPLIT
from depthpipe.profile import apply_overrides
from depthpipe.stages.preprocess import split_scenes

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
TFLOP = 1e12
TEST_IMAGES = 446  # DIODE outdoor val as released (facts.md); the manifest lists only 392
# LightlyTrain 0.18 DINO defaults (lightly_train/_methods/dino): 6 local views; projection head
# 2048 -> 2048 -> 2048 -> 256 -> output_dim, output_dim "auto" = 16384 for 100k-200k images.
DINO_LOCAL_VIEWS = 6
DINO_GLOBAL_VIEWS = 2
DINO_HIDDEN, DINO_BOTTLENECK, DINO_OUTPUT = 2048, 256, 16384
TRAIN_FACTOR = 3  # forward + backward = 3x forward
BF16_FACTOR = 0.5  # bf16 activations are half of float32
OPTIMISER_BYTES = 16  # per trained parameter: fp32 weight, gradient, AdamW m and v
TEACHER_BYTES = 4  # per DINO teacher parameter: fp32 weight, no gradient
MEASURE_SIZES = ((96, 128), (192, 256))  # U-Net activations measured here, scaled from the last


@dataclass(frozen=True)
class Hardware:
    name: str
    gpus: int
    bf16_flops: float  # dense bf16 tensor peak per GPU, FLOP/s
    memory_gb: float  # per GPU


HARDWARE = (
    Hardware("1x H100 SXM", 1, 989.4 * TFLOP, 80.0),
    Hardware("4x RTX 4090", 4, 165.2 * TFLOP, 24.0),
)


@dataclass(frozen=True)
class Network:
    name: str
    trained_parameters: int
    frozen_parameters: int  # the DINO teacher: forward only, momentum-updated
    forward_flops: float  # per image (all views of it)
    train_flops: float  # per training image: TRAIN_FACTOR x trained forward + frozen forward
    counted_train_ratio: float  # FlopCounterMode's forward+backward / forward (check of 3x)
    activation_bytes: float  # per image, float32, saved for backward


def tutorial_params() -> Params:
    """params.yaml with profiles/tutorial.yaml applied, as ``depthpipe.profile tutorial`` would."""
    document = yaml.safe_load((ROOT / "params.yaml").read_text())
    apply_overrides(document, yaml.safe_load((ROOT / "profiles" / "tutorial.yaml").read_text()))
    return parse_params(document)


def counted_flops(run: Callable[[], Any]) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def saved_bytes(module: nn.Module, inputs: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one training-mode forward, parameters excluded,
    a storage saved by several operations counted once."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    module.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = module(inputs)
    del output
    return sum(saved.values())


def per_image_saved(module: nn.Module, height: int, width: int) -> float:
    """Saved bytes of one more image in the batch: batch 2 minus batch 1 (per-batch constants,
    such as batch-norm statistics, cancel)."""
    one, two = (saved_bytes(module, torch.rand(b, 3, height, width)) for b in (1, 2))
    return float(two - one)


def unet_spec(params: Params, height: int, width: int) -> ModelSpec:
    return ModelSpec(
        arch=params.model.arch,
        height=height,
        width=width,
        min_depth=params.depth.min_depth,
        max_depth=params.depth.max_depth,
    )


def unet(params: Params) -> tuple[Network, dict[tuple[int, int], float], float]:
    """The fine-tuned network at the profile's input; its activations measured at small sizes.
    Also this CPU's speed on it (FLOP/s), from the timed measurement at the largest size."""
    size = (params.preprocess.height, params.preprocess.width)
    with torch.device("meta"):
        net = DepthNet(build_unet(build_resnet(params.model.arch), unet_spec(params, *size)))
    forward = counted_flops(lambda: net(torch.empty(1, 3, *size, device="meta")))
    both = counted_flops(lambda: net(torch.empty(1, 3, *size, device="meta")).sum().backward())
    torch.manual_seed(0)
    # Built at the smallest size: its layers do not depend on it (DynamicUnet resizes inside).
    spec = unet_spec(params, *MEASURE_SIZES[0])
    small = DepthNet(build_unet(build_resnet(params.model.arch), spec))
    if parameter_count(small) != parameter_count(net):
        raise SystemExit("the U-Net built at another size has other layers: scaling is invalid")
    measured = {}
    for hw in MEASURE_SIZES:
        start = time.perf_counter()
        measured[hw] = per_image_saved(small, *hw)
        elapsed = time.perf_counter() - start
    last = MEASURE_SIZES[-1]
    last_flops = counted_flops(lambda: net(torch.empty(1, 3, *last, device="meta")))
    cpu_rate = 3 * last_flops / elapsed  # per_image_saved ran 3 images (batch 1, then 2)
    network = Network(
        name=f"U-Net {params.model.arch} {size[0]}x{size[1]}",
        trained_parameters=parameter_count(net),
        frozen_parameters=0,
        forward_flops=forward,
        train_flops=TRAIN_FACTOR * forward,
        counted_train_ratio=both / forward,
        activation_bytes=measured[last] * size[0] * size[1] / (last[0] * last[1]),
    )
    return network, measured, cpu_rate


class DinoBranch(nn.Module):
    """One DINO branch as LightlyTrain runs it: ResNet body, global average pool, head."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        resnet = build_resnet(arch)
        fc = resnet.fc
        assert isinstance(fc, nn.Linear)  # torchvision ResNets end in one
        self.body = nn.Sequential(*list(resnet.children())[:-1], nn.Flatten(1))  # fc unused
        self.head = DINOProjectionHead(fc.in_features, DINO_HIDDEN, DINO_BOTTLENECK, DINO_OUTPUT)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(image))


def dino_views(params: Params) -> list[int]:
    """Side of each view of one image: the global crops, then the local ones (pretrain.py)."""
    size = params.pretrain.image_size
    local = max(16, round(size * 96 / 224))
    return [size] * DINO_GLOBAL_VIEWS + [local] * DINO_LOCAL_VIEWS


def view_flops(branch: nn.Module, side: int, *, backward: bool) -> float:
    """FLOPs of one square view through ``branch`` (on the meta device), with its backward."""

    def step() -> None:
        out = branch(torch.empty(1, 3, side, side, device="meta"))
        if backward:
            out.sum().backward()

    return counted_flops(step)


def dino(params: Params) -> tuple[Network, dict[int, float]]:
    """DINO's cost per image, and the forward FLOPs of one view per view side."""
    views = dino_views(params)
    with torch.device("meta"):
        branch = DinoBranch(params.model.arch)
    forward = {side: view_flops(branch, side, backward=False) for side in set(views)}
    both = {side: view_flops(branch, side, backward=True) for side in set(views)}
    student_forward = sum(forward[side] for side in views)
    teacher_forward = sum(forward[side] for side in views[:DINO_GLOBAL_VIEWS])
    torch.manual_seed(0)
    real = DinoBranch(params.model.arch)
    activation = {side: per_image_saved(real, side, side) for side in set(views)}
    network = Network(
        name=f"DINO student {params.model.arch} + head, {DINO_GLOBAL_VIEWS}x{views[0]}px + "
        f"{DINO_LOCAL_VIEWS}x{views[-1]}px views",
        trained_parameters=parameter_count(branch),
        frozen_parameters=parameter_count(branch),
        forward_flops=student_forward + teacher_forward,
        train_flops=TRAIN_FACTOR * student_forward + teacher_forward,
        counted_train_ratio=sum(both[s] for s in views) / student_forward,
        activation_bytes=sum(activation[side] for side in views),
    )
    return network, forward


def diode_split_counts(params: Params) -> tuple[int, int]:
    """(train, validation) images of DIODE train, split by scene per domain as preprocess does
    (the manifest lists DIODE train completely)."""
    manifest = json.loads(diode.MANIFEST.read_text())[DIODE_TRAIN_SPLIT]
    train = validation = 0
    for domain in params.data.diode_domains:
        per_scene = {
            scene: sum(len(stems) for stems in scans.values())
            for scene, scans in manifest[domain].items()
        }
        kept, held_out = split_scenes(
            list(per_scene), params.preprocess.val_fraction, params.data.seed
        )
        train += sum(per_scene[s] for s in kept)
        validation += sum(per_scene[s] for s in held_out)
    return train, validation


@dataclass(frozen=True)
class Stage:
    name: str
    network: Network
    flops_per_epoch: float
    arithmetic: str  # how flops_per_epoch came about, in words and numbers
    epochs: int
    runs: int  # times `dvc repro` runs it: one pretrain per preset, finetune scratch + aug
    batch_per_gpu: dict[str, int]  # hardware name -> images per GPU per step (training)
    photos_per_epoch: int  # images the data loader must deliver per epoch
    one_gpu: bool = False  # runs on one GPU whatever the machine has (evaluate)


def stages(params: Params, dino_net: Network, unet_net: Network) -> list[Stage]:
    train, validation = diode_split_counts(params)
    photos = doctor.megadepth_photos(params.data)
    trainer = params.pretrain.trainer
    pretrain_gpus = trainer.devices * trainer.num_nodes
    finetune_gpus = params.finetune.trainer.devices * params.finetune.trainer.num_nodes
    f = unet_net.forward_flops
    return [
        Stage(
            name="pretrain (per preset)",
            network=dino_net,
            flops_per_epoch=photos * dino_net.train_flops,
            arithmetic=f"{photos:,} photos x {dino_net.train_flops / 1e9:.1f} GFLOP",
            epochs=params.pretrain.epochs,
            runs=len(params.pretrain.presets),
            # pretrain.batch_size is global: split over the profile's GPUs, whole on one
            batch_per_gpu={
                hw.name: params.pretrain.batch_size // (pretrain_gpus if hw.gpus > 1 else 1)
                for hw in HARDWARE
            },
            photos_per_epoch=photos,
        ),
        Stage(
            name="finetune (per encoder)",
            network=unet_net,
            flops_per_epoch=(train * TRAIN_FACTOR + validation) * f,
            arithmetic=(
                f"({train:,} train x {TRAIN_FACTOR} + {validation:,} validation x 1)"
                f" x {f / TFLOP:.2f} TFLOP"
            ),
            epochs=params.finetune.epochs,
            runs=2,  # finetune@scratch and finetune@<aug>
            # finetune.batch_size is global too; each row shows the profile's per-GPU share, the
            # batch that decides whether a GPU's memory holds it
            batch_per_gpu={hw.name: params.finetune.batch_size // finetune_gpus for hw in HARDWARE},
            photos_per_epoch=train + validation,
        ),
        Stage(
            name="evaluate",
            network=unet_net,
            flops_per_epoch=TEST_IMAGES * 2 * f,
            arithmetic=f"{TEST_IMAGES} test images x 2 networks x {f / TFLOP:.2f} TFLOP",
            epochs=1,
            runs=1,
            batch_per_gpu={hw.name: 0 for hw in HARDWARE},  # inference: nothing kept for backward
            photos_per_epoch=TEST_IMAGES,
            one_gpu=True,  # hardware.trainer_forward_mode: one CUDA GPU
        ),
    ]


def gpus(stage: Stage, hw: Hardware) -> int:
    return 1 if stage.one_gpu else hw.gpus


def seconds(stage: Stage, hw: Hardware, utilisation: float) -> float:
    return stage.flops_per_epoch / (gpus(stage, hw) * hw.bf16_flops * utilisation)


def duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def training_memory_gb(net: Network, batch: int) -> float:
    states = net.trained_parameters * OPTIMISER_BYTES + net.frozen_parameters * TEACHER_BYTES
    return (states + net.activation_bytes * BF16_FACTOR * batch) / GB


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Columns as wide as their widest cell; the first left-aligned, the others right."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        rest = zip(row[1:], widths[1:], strict=True)
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in rest]
        print("  ".join(cells))


def print_networks(nets: list[Network], measured: dict[tuple[int, int], float]) -> None:
    print("\nNetworks, per image (activations: float32, saved for backward)")
    print_table(
        ["network", "params M", "fwd GFLOP", "train GFLOP", "counted fwd+bwd/fwd", "act GB"],
        [
            [
                n.name,
                f"{n.trained_parameters / 1e6:.1f}",
                f"{n.forward_flops / 1e9:,.1f}",
                f"{n.train_flops / 1e9:,.1f}",
                f"{n.counted_train_ratio:.2f}",
                f"{n.activation_bytes / GB:.2f}",
            ]
            for n in nets
        ],
    )
    (small, large) = MEASURE_SIZES
    ratio = measured[large] / measured[small]
    pixels = large[0] * large[1] / (small[0] * small[1])
    print(
        f"U-Net activations measured: {small[0]}x{small[1]} {measured[small] / 1e6:.0f} MB, "
        f"{large[0]}x{large[1]} {measured[large] / 1e6:.0f} MB per image "
        f"(x{ratio:.2f} for x{pixels:.0f} pixels); the table scales the latter by pixel count"
    )


def print_time(all_stages: list[Stage], utilisation: float) -> None:
    print(f"\nTime (dense bf16 peak x {utilisation:.0%} utilisation; training = 3x forward)")
    rows = []
    for st in all_stages:
        for hw in HARDWARE:
            per_epoch = seconds(st, hw, utilisation)
            rows.append(
                [
                    st.name,
                    f"{st.flops_per_epoch / 1e15:,.1f}",
                    hw.name,
                    duration(per_epoch),
                    f"{st.epochs} x {st.runs}",
                    duration(per_epoch * st.epochs * st.runs),
                ]
            )
    for hw in HARDWARE:
        total = sum(seconds(st, hw, utilisation) * st.epochs * st.runs for st in all_stages)
        rows.append(["all stages (dvc repro)", "", hw.name, "", "", duration(total)])
    print_table(["stage", "PFLOP/epoch", "hardware", "per epoch", "epochs x runs", "total"], rows)


def print_worked(all_stages: list[Stage], utilisation: float) -> None:
    print("\nWorked lines")
    for st in all_stages:
        print(f"{st.name}: {st.arithmetic} = {st.flops_per_epoch:.3g} FLOP per epoch")
        for hw in HARDWARE:
            s = seconds(st, hw, utilisation)
            peak = f"{gpus(st, hw)} x {hw.bf16_flops / TFLOP:.1f} TFLOPS x {utilisation:.2f}"
            readable = "" if duration(s).endswith(" s") else f" ({duration(s)})"
            print(f"  {hw.name}: / ({peak}) = {s:,.0f} s{readable} per epoch", end="")
            print(f"; {st.photos_per_epoch / s:,.0f} images/s to load")


def print_memory(all_stages: list[Stage]) -> None:
    print(
        "\nMemory per GPU while training: fp32 weights+grads+AdamW 16 B/param (teacher 4 B/param)"
        " + bf16 activations (fp32/2) x batch; allocator and workspace slack not included"
    )
    rows = []
    for st in all_stages:
        net = st.network
        for hw in HARDWARE:
            batch = st.batch_per_gpu[hw.name]
            if batch == 0:
                continue  # inference keeps nothing for backward
            need = training_memory_gb(net, batch)
            states = training_memory_gb(net, 0)
            largest = (hw.memory_gb - states) / (net.activation_bytes * BF16_FACTOR / GB)
            rows.append(
                [
                    st.name,
                    hw.name,
                    f"{states:.1f}",
                    f"{net.activation_bytes * BF16_FACTOR / GB:.2f}",
                    str(batch),
                    f"{need:.1f}",
                    f"{hw.memory_gb:.0f}",
                    "yes" if need < hw.memory_gb else "NO",
                    str(math.floor(largest)),
                ]
            )
    headers = ["stage", "hardware", "states GB", "act GB/img", "batch/GPU", "need GB", "has GB"]
    print_table([*headers, "fits", "largest batch"], rows)


def print_disk(params: Params) -> None:
    data, pre = params.data, params.preprocess
    archives = doctor.ARCHIVE_BYTES
    raw = doctor.raw_bytes(data)
    largest = max(archives.values())
    processed = doctor.processed_bytes(params)
    train, validation = diode_split_counts(params)
    packed = (train + validation + TEST_IMAGES) * pre.height * pre.width
    packed *= doctor.PACKED_BYTES_PER_PIXEL
    domains = "+".join(data.diode_domains)
    rows = [[f"archive {name}", f"{size / GB:.1f}"] for name, size in archives.items()]
    rows += [
        ["download, all archives", f"{sum(archives.values()) / GB:.0f}"],
        [f"data/raw (DIODE {domains}, MegaDepth photos)", f"{raw / GB:.0f}"],
        ["fetch peak: data/raw + the largest archive", f"{(raw + largest) / GB:.0f}"],
        [
            f"packed DIODE ({train + validation + TEST_IMAGES:,} x {pre.height}x{pre.width})",
            f"{packed / GB:.0f}",
        ],
        [
            f"MegaDepth photos at short side {pre.megadepth_short_side} px",
            f"{(processed - packed) / GB:.0f}",
        ],
        ["data/raw + data/processed", f"{(raw + processed) / GB:.0f}"],
    ]
    print("\nDisk (depthpipe.doctor's figures; the DVC cache doubles them unless it links)")
    print_table(["what", "GB"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--utilisation", type=float, default=0.4, help="fraction of the bf16 peak reached"
    )
    args = parser.parse_args()
    params = tutorial_params()
    print("ESTIMATES for profiles/tutorial.yaml (nothing here was run at full scale)")
    unet_net, measured, cpu_rate = unet(params)
    dino_net, view_flops = dino(params)
    print_networks([dino_net, unet_net], measured)
    views = dino_views(params)
    global_side, local_side = views[0], views[-1]
    print(
        f"DINO per view (ResNet body + head, forward): {global_side} px "
        f"{view_flops[global_side] / 1e9:.2f} GFLOP, {local_side} px "
        f"{view_flops[local_side] / 1e9:.2f} GFLOP; per image the teacher runs "
        f"{DINO_GLOBAL_VIEWS} x {global_side} px forward, the student "
        f"{DINO_GLOBAL_VIEWS} x {global_side} px + {DINO_LOCAL_VIEWS} x {local_side} px "
        f"forward and backward"
    )
    all_stages = stages(params, dino_net, unet_net)
    print_time(all_stages, args.utilisation)
    print_worked(all_stages, args.utilisation)
    print_memory(all_stages)
    print_disk(params)
    evaluate = all_stages[-1]
    print(
        f"\nThis CPU ran the U-Net forward at {cpu_rate / 1e9:.0f} GFLOP/s (fp32): evaluate on it "
        f"would take {duration(evaluate.flops_per_epoch / cpu_rate)}"
    )


if __name__ == "__main__":
    main()
