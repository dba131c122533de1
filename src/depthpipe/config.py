"""Typed, frozen view of params.yaml: one loader, every key checked before any work starts.

Each section of params.yaml is a frozen dataclass below. Field metadata carries the allowed range
(``lo``/``hi``, inclusive) or choices; ``load_params`` rejects unknown keys, wrong types and
out-of-range values with a message naming the dotted key (``finetune.lr``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from depthpipe.errors import ConfigError

# Preset names become stage names (pretrain@<name>) and folder names, and "scratch" is taken by the
# randomly initialised baseline.
PRESET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
RESERVED_PRESET_NAMES = frozenset({"scratch"})

# The torchvision ResNets the U-Net and LightlyTrain both understand.
ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# Methods of LightlyTrain 0.18 that need no download; "distillation" (its default) fetches a
# DINOv3 teacher from the internet and so is refused.
OFFLINE_METHODS = ("dino", "simclr")
DOWNLOADING_METHODS = ("distillation", "distillationv1", "distillationv2", "dinov2")


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"lo": lo, "hi": hi}


@dataclass(frozen=True)
class SyntheticConfig:
    """Size of the embedded procedural data set (fetch, source: synthetic)."""

    width: int = field(default=256, metadata=_range(32, 4096))  # px, DIODE is 1024
    height: int = field(default=192, metadata=_range(24, 3072))  # px, DIODE is 768
    train_scenes: int = field(default=4, metadata=_range(2, 400))
    val_scenes: int = field(default=1, metadata=_range(1, 400))
    scans_per_scene: int = field(default=2, metadata=_range(1, 99))  # scan ids are scene*100+i
    views_per_scan: int = field(default=4, metadata=_range(1, 216))  # 36 yaws x 6 tilts
    megadepth_scenes: int = field(default=3, metadata=_range(1, 1000))
    megadepth_images_per_scene: int = field(default=8, metadata=_range(1, 100000))
    megadepth_long_side: int = field(default=320, metadata=_range(32, 4096))  # px, largest scene


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "local", "official"] = "synthetic"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.source != "synthetic":
            raise ConfigError(
                f"data.source: '{self.source}' is not available yet; only 'synthetic' is built"
            )


@dataclass(frozen=True)
class DepthConfig:
    """Valid metric depth range (metres): outside it a pixel is invalid for training and scoring."""

    min_depth: float = field(default=0.6, metadata=_range(1e-3, 1e4))
    max_depth: float = field(default=350.0, metadata=_range(1e-2, 1e5))

    def __post_init__(self) -> None:
        if self.min_depth >= self.max_depth:
            raise ConfigError("depth.min_depth must be below depth.max_depth")


@dataclass(frozen=True)
class PreprocessConfig:
    val_fraction: float = field(default=0.25, metadata=_range(0.01, 0.9))
    height: int = field(default=96, metadata=_range(16, 4096))  # px, training resolution
    width: int = field(default=128, metadata=_range(16, 4096))  # px
    megadepth_short_side: int = field(default=96, metadata=_range(16, 4096))  # px after resize


@dataclass(frozen=True)
class ModelConfig:
    arch: str = field(default="resnet18", metadata={"choices": ARCHITECTURES})


@dataclass(frozen=True)
class RandomFlip:
    horizontal_prob: float = field(default=0.5, metadata=_range(0.0, 1.0))
    vertical_prob: float = field(default=0.0, metadata=_range(0.0, 1.0))


@dataclass(frozen=True)
class RandomRotation:
    prob: float = field(default=1.0, metadata=_range(0.0, 1.0))
    degrees: float = field(default=15.0, metadata=_range(0.0, 180.0))


@dataclass(frozen=True)
class AugPreset:
    """One pretraining augmentation preset, passed to LightlyTrain as ``transform_args``."""

    random_flip: RandomFlip = field(default_factory=RandomFlip)
    random_rotation: RandomRotation = field(default_factory=RandomRotation)

    def transform_args(self, image_size: int) -> dict[str, Any]:
        return {
            "image_size": (image_size, image_size),
            "random_flip": dataclasses.asdict(self.random_flip),
            "random_rotation": dataclasses.asdict(self.random_rotation),
        }


@dataclass(frozen=True)
class TrainerConfig:
    """Where and how Lightning runs; the same knobs for pretraining and fine-tuning."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int = field(default=1, metadata=_range(1, 4096))  # per node
    num_nodes: int = field(default=1, metadata=_range(1, 4096))
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp"] = (
        "auto"
    )
    # auto: bf16-mixed on a GPU that supports it, else 32-true.
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "auto"
    num_workers: int = field(default=0, metadata=_range(0, 256))  # loader processes per device


@dataclass(frozen=True)
class PretrainConfig:
    method: str = "dino"
    epochs: int = field(default=2, metadata=_range(1, 100000))
    batch_size: int = field(default=16, metadata=_range(2, 1 << 20))  # global, all devices
    image_size: int = field(default=64, metadata=_range(16, 2048))  # px, global crops
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    presets: dict[str, AugPreset] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method in DOWNLOADING_METHODS:
            raise ConfigError(
                f"pretrain.method: '{self.method}' downloads teacher weights at run time; "
                f"use one of {', '.join(OFFLINE_METHODS)}"
            )
        if self.method not in OFFLINE_METHODS:
            raise ConfigError(
                f"pretrain.method: '{self.method}' is unknown; "
                f"use one of {', '.join(OFFLINE_METHODS)}"
            )
        if not self.presets:
            raise ConfigError("pretrain.presets: at least one preset is needed")
        for name in self.presets:
            if not PRESET_NAME.match(name) or name in RESERVED_PRESET_NAMES:
                raise ConfigError(
                    f"pretrain.presets.{name}: a preset name must be lower-case letters, digits "
                    "and '_', start with a letter, at most 40 characters, and not 'scratch'"
                )


@dataclass(frozen=True)
class FinetuneAugment:
    """Training-only augmentation, the same for every encoder: the tutorial's, depth-correct."""

    rotation_degrees: float = field(default=15.0, metadata=_range(0.0, 45.0))
    crop_scale_min: float = field(default=0.2, metadata=_range(0.01, 1.0))  # area fraction
    crop_scale_max: float = field(default=0.9, metadata=_range(0.01, 1.0))
    hflip_prob: float = field(default=0.5, metadata=_range(0.0, 1.0))

    def __post_init__(self) -> None:
        if self.crop_scale_min > self.crop_scale_max:
            raise ConfigError("finetune.augment.crop_scale_min must not exceed crop_scale_max")


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = field(default=3, metadata=_range(1, 100000))
    batch_size: int = field(default=8, metadata=_range(1, 1 << 16))  # per device
    loss: Literal["silog", "l1_log", "mse"] = "silog"
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = field(default=1e-3, metadata=_range(1e-8, 10.0))
    weight_decay: float = field(default=1e-4, metadata=_range(0.0, 1.0))
    augment: FinetuneAugment = field(default_factory=FinetuneAugment)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass(frozen=True)
class EvaluateConfig:
    grid_images: int = field(default=4, metadata=_range(1, 64))  # test images in the picture grid
    batch_size: int = field(default=8, metadata=_range(1, 4096))


@dataclass(frozen=True)
class Params:
    aug: str
    seed: int = field(default=0, metadata=_range(0, 2**31 - 1))
    data: DataConfig = field(default_factory=DataConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self) -> None:
        if self.aug not in self.pretrain.presets:
            raise ConfigError(
                f"aug: '{self.aug}' names no preset in pretrain.presets "
                f"(have: {', '.join(sorted(self.pretrain.presets))})"
            )

    def encoder_names(self) -> tuple[str, ...]:
        """Every name finetune accepts: the baseline and each pretraining preset."""
        return ("scratch", *sorted(self.pretrain.presets))


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ConfigError naming the first bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    return parse_params(raw)


def parse_params(raw: Any) -> Params:
    return _build(Params, raw, "")


def _build(cls: type, raw: Any, key: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'params'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key (known here: {', '.join(sorted(fields))})"
        )
    values = {}
    for name, value in raw.items():
        dotted = f"{key}.{name}" if key else name
        values[name] = _convert(hints[name], value, dotted, fields[name].metadata)
    missing = [n for n, f in fields.items() if n not in values and _has_no_default(f)]
    if missing:
        raise ConfigError(f"{key + '.' if key else ''}{missing[0]}: required key is missing")
    return cls(**values)


def _has_no_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(hint: Any, value: Any, key: str, meta: Any) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is dict:
        _, item_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(item_type, v, f"{key}.{k}", {}) for k, v in value.items()}
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union type for {key}")
    return _scalar(hint, value, key, meta)


def _scalar(hint: type, value: Any, key: str, meta: Any) -> Any:
    # bool is an int in Python: refuse it where a number is meant, and numbers where a bool is.
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif hint is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: {value} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value} is above the maximum {hi}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}")
    return value
