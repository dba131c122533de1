"""The fastai DynamicUnet on a torchvision ResNet encoder, saving and loading it, and inference.

The network predicts log depth: ``y_range`` bounds its output to [ln min_depth, ln max_depth]
through a sigmoid, so ``exp`` of it is always a positive depth in metres inside the valid range.
Working in log space matches the losses (SILog, L1 on log depth) and treats a 1 m error at 2 m
and a 100 m error at 200 m alike, as the depth metrics do.

Training (the LightningModule) lives in depthpipe.training: importing Lightning costs seconds
that evaluate, predict and init_scratch, which never train, do not pay.

``predict_depth`` is the one inference path from full-resolution photos to metres: the evaluate
stage scores it and ``depthpipe.predict`` runs it on users' photos.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastai.vision.models.unet import DynamicUnet
from PIL import Image
from torch import nn

from depthpipe.encoders import build_resnet
from depthpipe.errors import DepthpipeError
from depthpipe.hardware import FULL_PRECISION, ForwardMode, forward_mode
from depthpipe.paths import MODEL_SPEC, MODEL_WEIGHTS

# LightlyTrain normalises pretraining images with ImageNet statistics; fine-tuning must match.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a fine-tuned network from its weights file (model.json)."""

    arch: str
    height: int  # px, training resolution
    width: int
    min_depth: float  # metres
    max_depth: float

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        if not path.is_file():
            raise DepthpipeError(f"{path}: model description not found")
        try:
            return cls(**json.loads(path.read_text()))
        except (TypeError, ValueError) as error:
            raise DepthpipeError(f"{path}: not a valid model description: {error}") from error


def build_unet(encoder: nn.Module, spec: ModelSpec) -> DynamicUnet:
    """U-Net on the ResNet body (its avgpool and fc dropped), in training mode."""
    body = nn.Sequential(*list(encoder.children())[:-2])
    unet = DynamicUnet(
        body,
        n_out=1,
        img_size=(spec.height, spec.width),
        y_range=(math.log(spec.min_depth), math.log(spec.max_depth)),
    )
    # DynamicUnet runs a dummy forward at img_size to size its decoder and leaves eval mode on.
    return unet.train()


def build_unet_for_inference(spec: ModelSpec) -> DynamicUnet:
    return build_unet(build_resnet(spec.arch), spec).eval()


class DepthNet(nn.Module):
    """Normalise RGB in [0, 1], run the U-Net, return log depth (B, 1, H, W), float32."""

    # Buffers (set by register_buffer): declared so that they type as tensors, not as
    # nn.Module.__getattr__'s ``Tensor | Module``.
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # Under bf16 autocast the U-Net's last layers give bf16; the losses and metrics get
        # float32 (a no-op, the same tensor, without autocast).
        return self.unet((image - self.mean) / self.std).float()


def load_finetuned(model_path: Path) -> tuple[DepthNet, ModelSpec]:
    """Load a fine-tuned network from its folder (model.pt + model.json) or its weights file."""
    folder = model_path if model_path.is_dir() else model_path.parent
    weights = folder / MODEL_WEIGHTS if model_path.is_dir() else model_path
    spec = ModelSpec.load(folder / MODEL_SPEC)
    if not weights.is_file():
        raise DepthpipeError(f"{weights}: model weights not found")
    net = DepthNet(build_unet_for_inference(spec))
    try:
        state: Any = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError) as error:
        raise DepthpipeError(f"{weights}: cannot load into a {spec.arch} U-Net: {error}") from error
    return net.eval(), spec


def save_finetuned(net: DepthNet, spec: ModelSpec, folder: Path) -> None:
    """Write a model folder ``load_finetuned`` reads: plain weights (model.pt) + model.json."""
    folder.mkdir(parents=True, exist_ok=True)
    state = net.state_dict()
    for key in list(state):
        # NCHW whatever layout training used (channels_last on CUDA): the file does not depend
        # on it. A tensor already contiguous is itself, so CPU runs write the same bytes.
        state[key] = state[key].contiguous()
    torch.save(state, folder / MODEL_WEIGHTS)
    spec.save(folder / MODEL_SPEC)


# Inference: the one path from full-resolution photos to depth in metres, shared by evaluate (which
# reports the metrics) and predict (what users run), so the reported numbers describe the outputs.

INPUT_MULTIPLE = 8  # px: network input sides off the training aspect ratio are rounded to this
MIN_INPUT_SIDE = 32  # px, smallest network input side: the ResNet body downsamples 32x


def network_size(height: int, width: int, spec: ModelSpec) -> tuple[int, int]:
    """Network input (h, w) for a (height, width) image.

    At the training aspect ratio (DIODE's 4:3 test images) it is exactly the training size, the
    input the network was fitted to. Otherwise the training pixel count at the image's own aspect
    ratio (never squashed: a squashed scene has other depth cues), sides rounded to multiples of 8.
    """
    if height * spec.width == width * spec.height:
        return spec.height, spec.width
    scale = math.sqrt(spec.height * spec.width / (height * width))
    return (
        max(MIN_INPUT_SIDE, round(height * scale / INPUT_MULTIPLE) * INPUT_MULTIPLE),
        max(MIN_INPUT_SIDE, round(width * scale / INPUT_MULTIPLE) * INPUT_MULTIPLE),
    )


def resize_photo(photo: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``photo`` at (h, w), resized on its 8-bit pixels (no full-resolution float copy).

    Shrinking averages areas (BOX), the filter preprocess used for the training images, so a test
    image reaches the network exactly as the packed test split holds it. Enlarging (photos smaller
    than the network input) is bilinear, where BOX would give nearest-neighbour blocks.
    """
    height, width = size
    shrinking = height <= photo.height and width <= photo.width
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return photo.resize((width, height), resample)


def network_input(photos: Sequence[Image.Image], spec: ModelSpec) -> torch.Tensor:
    """(B, 3, h, w) float32 RGB in [0, 1] at ``network_size``; the photos share one size."""
    sizes = {photo.size for photo in photos}
    modes = {photo.mode for photo in photos}
    if len(sizes) != 1 or modes != {"RGB"}:
        raise ValueError(f"a batch needs RGB photos of one size, got {sizes} in modes {modes}")
    width, height = sizes.pop()
    size = network_size(height, width, spec)
    pixels = np.stack([np.asarray(resize_photo(photo, size)) for photo in photos])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)


def bilinear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per target pixel along one axis: its two source pixels and the second one's weight.

    Pixel centres aligned and edges clamped, as torch's ``interpolate(..., align_corners=False)``.
    Written out so any band of output rows can be made alone, bit-identical to the whole image.
    """
    position = np.maximum((np.arange(target) + 0.5) * (source / target) - 0.5, 0.0)
    first = np.minimum(position.astype(np.int64), source - 1)
    second = np.minimum(first + 1, source - 1)
    return first, second, (position - first).astype(np.float32)


def _lerp(low: np.ndarray, high: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Element-wise, so a value never depends on which other rows are computed with it."""
    return low + (high - low) * weight


@dataclass(frozen=True)
class DepthPrediction:
    """One image's prediction: log depth at network resolution and the full size it stands for.

    Full-resolution metres are made on demand, whole or as horizontal strips, by the same
    arithmetic either way: a 108 MP photo never needs its whole depth map in memory at once.
    """

    log_depth: np.ndarray  # (h, w) float32, network resolution
    height: int  # px, full resolution
    width: int
    min_depth: float  # metres
    max_depth: float

    def rows(self, top: int, bottom: int) -> np.ndarray:
        """(bottom - top, width) float32 metres: log depth upsampled bilinearly, exp, clamped."""
        low_res = self.log_depth
        row_a, row_b, row_w = (t[top:bottom] for t in bilinear_taps(len(low_res), self.height))
        col_a, col_b, col_w = bilinear_taps(low_res.shape[1], self.width)
        first, last = int(row_a[0]), int(row_b[-1])  # the source rows this band reads
        band = low_res[first : last + 1]
        wide = _lerp(band[:, col_a], band[:, col_b], col_w)  # (last - first + 1, width)
        log_depth = _lerp(wide[row_a - first], wide[row_b - first], row_w[:, None])
        return np.clip(np.exp(log_depth), self.min_depth, self.max_depth, dtype=np.float32)

    def full(self) -> np.ndarray:
        """(height, width) float32 metres."""
        return self.rows(0, self.height)

    def strips(self, max_pixels: int) -> Iterator[tuple[int, np.ndarray]]:
        """(top row, strip) pairs covering the image, each at most ``max_pixels`` (whole rows)."""
        step = max(1, max_pixels // self.width)
        for top in range(0, self.height, step):
            yield top, self.rows(top, min(top + step, self.height))

    def coarse(self) -> np.ndarray:
        """(h, w) float32 metres at network resolution: the range of the full-resolution map,
        since bilinear upsampling only interpolates between these values."""
        return np.clip(np.exp(self.log_depth), self.min_depth, self.max_depth)


def predict_depth(
    net: DepthNet,
    spec: ModelSpec,
    photos: Sequence[Image.Image],
    forward: ForwardMode | None = None,
) -> list[DepthPrediction]:
    """Depth for a batch of full-resolution RGB photos of one size, one forward pass.

    The only inference path: evaluate scores it on the raw test images and predict writes it for
    users' photos. Input resized on 8-bit pixels to ``network_size``; log depth upsampled
    bilinearly to the photo's size, exp, clamped to [min_depth, max_depth], float32 throughout.
    ``forward`` (device, input layout, autocast) is one the net was placed with
    (``forward.place_module``); by default the net's own device in fp32.
    """
    if forward is None:
        forward = forward_mode(next(net.parameters()).device, FULL_PRECISION)
    image = forward.place_input(network_input(photos, spec))  # (B, 3, h, w)
    with torch.no_grad(), forward.autocast():
        log_depth = net(image)[:, 0].float().cpu().numpy()
    width, height = photos[0].size
    return [
        DepthPrediction(np.ascontiguousarray(one), height, width, spec.min_depth, spec.max_depth)
        for one in log_depth
    ]
