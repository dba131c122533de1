"""Typed, frozen view of params.yaml: one loader, every key checked before any work starts.

params.yaml is the only source of values: the schema below has bounds and choices but no
defaults, so a key missing from the file is an error, never a silently different value. Each
section is a pydantic model with ``extra="forbid"`` (a typo fails loudly) and strict types
(``true`` is not a number, ``"8"`` is not an integer). ``load_params`` turns pydantic's errors
into one line naming the dotted key and the allowed range (``finetune.lr: 20.0 is above the
maximum 10.0``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from depthpipe.data.synthetic_camera import SCANNER_RANGE, nearest_ground_depth
from depthpipe.errors import ConfigError
from depthpipe.paths import SCRATCH

# Preset names become stage names (pretrain@<name>) and folder names, and SCRATCH ("scratch") is
# taken by the randomly initialised baseline.
PRESET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
RESERVED_PRESET_NAMES = frozenset({SCRATCH})

# The torchvision ResNets the U-Net and LightlyTrain both understand.
Architecture = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]

# Methods of LightlyTrain 0.18 that need no download; "distillation" (its default) fetches a
# DINOv3 teacher from the internet and so is refused.
OFFLINE_METHODS = ("dino", "simclr")
DOWNLOADING_METHODS = ("distillation", "distillationv1", "distillationv2", "dinov2")

# DIODE's two domains, spelled as its folders are ("indoors" has an s, "outdoor" has none).
DiodeDomain = Literal["outdoor", "indoors"]
MD5 = re.compile(r"^[0-9a-fA-F]{32}$")


def _between(lo: float, hi: float) -> Any:
    """Inclusive bounds; the error message quotes them."""
    return Field(ge=lo, le=hi)


Probability = Annotated[float, _between(0.0, 1.0)]


class Section(BaseModel):
    """Every params section: frozen, unknown keys refused, no type coercion, no NaN or inf."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class SyntheticConfig(Section):
    """Size of the embedded procedural data set (fetch, source: synthetic)."""

    width: Annotated[int, _between(32, 4096)]  # px, DIODE is 1024
    height: Annotated[int, _between(24, 3072)]  # px, DIODE is 768
    train_scenes: Annotated[int, _between(2, 400)]
    val_scenes: Annotated[int, _between(1, 400)]
    scans_per_scene: Annotated[int, _between(1, 99)]  # scan ids are scene*100+i
    views_per_scan: Annotated[int, _between(1, 216)]  # 36 yaws x 6 tilts
    megadepth_scenes: Annotated[int, _between(1, 1000)]
    megadepth_images_per_scene: Annotated[int, _between(1, 100000)]
    megadepth_long_side: Annotated[int, _between(32, 4096)]  # px, largest scene


class ArchiveConfig(Section):
    """One official archive: where it is served and the MD5 it must have (null: not published;
    fetch prints the MD5 it computed so a team can pin it here)."""

    url: str
    md5: str | None

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return url

    @field_validator("md5")
    @classmethod
    def _hex(cls, md5: str | None) -> str | None:
        if md5 is not None and not MD5.match(md5):
            raise ValueError(f"{md5!r} is not an MD5 (32 hexadecimal digits) or null")
        return None if md5 is None else md5.lower()


class OfficialConfig(Section):
    """source: official, the published archives."""

    diode_train: ArchiveConfig
    diode_val: ArchiveConfig
    megadepth: ArchiveConfig
    keep_archives: bool  # false: an archive is deleted once verified and extracted
    stream: bool  # true: extract while downloading (no archive on disk, no resume)


class LocalConfig(Section):
    """source: local, extracted copies already on this machine (absolute, or relative to the
    project folder)."""

    diode: str | None  # holds train/ and val/
    megadepth: str | None  # holds MegaDepth_v1/ or its scene folders


class DataConfig(Section):
    # The data's randomness only: synthetic scenes, the MegaDepth subset, the train/validation
    # scene split.
    seed: Annotated[int, _between(0, 2**31 - 1)]
    source: Literal["synthetic", "official", "local"]
    diode_domains: list[DiodeDomain]
    megadepth_max_images: Annotated[int, _between(0, 10_000_000)]  # 0 = all
    official: OfficialConfig
    local: LocalConfig
    synthetic: SyntheticConfig

    @field_validator("diode_domains")
    @classmethod
    def _domains(cls, domains: list[str]) -> list[str]:
        if not domains:
            raise ValueError("name at least one of outdoor, indoors")
        if len(set(domains)) != len(domains):
            raise ValueError(f"{domains}: a domain is listed twice")
        # One canonical order: the same domains give the same fetch outputs and report whatever
        # order params.yaml lists them in.
        return sorted(domains)

    @model_validator(mode="after")
    def _local_folders(self) -> DataConfig:
        if self.source != "local":
            return self
        for name in ("diode", "megadepth"):
            folder = getattr(self.local, name)
            if folder is None or not folder.strip():
                raise ValueError(
                    f"data.local.{name}: a folder is required when data.source is local"
                )
        return self


class DepthConfig(Section):
    """Valid metric depth range (metres): outside it a pixel is invalid for training and scoring."""

    min_depth: Annotated[float, _between(1e-3, 1e4)]
    max_depth: Annotated[float, _between(1e-2, 1e5)]

    @model_validator(mode="after")
    def _ordered(self) -> DepthConfig:
        if self.min_depth >= self.max_depth:
            raise ValueError("depth.min_depth must be below depth.max_depth")
        return self


class PreprocessConfig(Section):
    val_fraction: Annotated[float, _between(0.01, 0.9)]  # of DIODE train scenes
    height: Annotated[int, _between(16, 4096)]  # px, training resolution
    width: Annotated[int, _between(16, 4096)]  # px
    megadepth_short_side: Annotated[int, _between(16, 4096)]  # px after resize
    # Processes that decode and resize samples; 0 = one per CPU core this process may use. The
    # packed files do not depend on it (tested byte for byte), so no stage lists it as a param.
    workers: Annotated[int, _between(0, 1024)]


class ModelConfig(Section):
    arch: Architecture


class RandomFlip(Section):
    horizontal_prob: Probability
    vertical_prob: Probability


class RandomRotation(Section):
    prob: Probability
    degrees: Annotated[float, _between(0.0, 180.0)]


class AugPreset(Section):
    """One pretraining augmentation preset, passed to LightlyTrain as ``transform_args``."""

    random_flip: RandomFlip
    random_rotation: RandomRotation

    def transform_args(self, image_size: int) -> dict[str, Any]:
        return {
            "image_size": (image_size, image_size),
            "random_flip": self.random_flip.model_dump(),
            "random_rotation": self.random_rotation.model_dump(),
        }


class TrainerConfig(Section):
    """Where and how Lightning runs; the same knobs for pretraining and fine-tuning."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"]
    devices: Annotated[int, _between(1, 4096)]  # per node
    num_nodes: Annotated[int, _between(1, 4096)]
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp"]
    # auto: bf16-mixed on a GPU that supports it, else 32-true.
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"]
    num_workers: Annotated[int, _between(0, 256)]  # loader processes per device


def split_batch(section: Any, name: str) -> Any:
    """A global batch_size must split evenly over the processes (devices x num_nodes): each
    loads an equal share, so a world size never changes the steps or what one step sees."""
    t = section.trainer
    processes = t.devices * t.num_nodes
    if section.batch_size % processes:
        raise ValueError(
            f"{name}.batch_size {section.batch_size} is global and must be a multiple of "
            f"{name}.trainer devices {t.devices} x num_nodes {t.num_nodes} = {processes}"
        )
    return section


class PretrainConfig(Section):
    method: str
    epochs: Annotated[int, _between(1, 100000)]
    batch_size: Annotated[int, _between(2, 1 << 20)]  # global, all devices
    image_size: Annotated[int, _between(16, 2048)]  # px, global crops
    # The learning rate the optimiser really uses (after warm-up). LightlyTrain would otherwise
    # scale its ImageNet value by batch_size/256, which at a CPU batch of 16 leaves DINO at
    # 3e-5: the weights barely move in a few hundred steps.
    lr: Annotated[float, _between(1e-8, 10.0)]
    trainer: TrainerConfig
    presets: dict[str, AugPreset]

    @model_validator(mode="after")
    def _batch_splits(self) -> PretrainConfig:
        return split_batch(self, "pretrain")

    @field_validator("method")
    @classmethod
    def _offline(cls, method: str) -> str:
        if method in DOWNLOADING_METHODS:
            raise ValueError(
                f"'{method}' downloads teacher weights at run time; "
                f"use one of {', '.join(OFFLINE_METHODS)}"
            )
        if method not in OFFLINE_METHODS:
            raise ValueError(f"'{method}' is unknown; use one of {', '.join(OFFLINE_METHODS)}")
        return method

    @field_validator("presets")
    @classmethod
    def _preset_names(cls, presets: dict[str, AugPreset]) -> dict[str, AugPreset]:
        if not presets:
            raise ValueError("at least one preset is needed")
        for name in presets:
            if not PRESET_NAME.match(name) or name in RESERVED_PRESET_NAMES:
                raise ValueError(
                    f"{name}: a preset name must be lower-case letters, digits and '_', start "
                    f"with a letter, at most 40 characters, and not '{SCRATCH}'"
                )
        return presets


# The geometric augmentation of fine-tuning (depthpipe.transforms):
# resized_crop: rotation + random resized crop, the tutorial's (depth scaled with scale_depth);
# crop: rotation + a fixed-size crop shown at its own scale (BTS, AdaBins: no resize, so the
#       depth of every pixel stays true); flip: left-right mirror only (Depth Anything V2 metric).
AugmentGeometry = Literal["resized_crop", "crop", "flip"]


class FinetuneAugment(Section):
    """Training-only augmentation, the same for every encoder: the tutorial's, depth-correct."""

    geometry: AugmentGeometry
    rotation_degrees: Annotated[float, _between(0.0, 45.0)]  # resized_crop and crop
    crop_scale_min: Annotated[float, _between(0.01, 1.0)]  # resized_crop: area fraction
    crop_scale_max: Annotated[float, _between(0.01, 1.0)]
    # crop: side of the crop as a fraction of the training image's side (both sides, so the
    # aspect ratio stays); the network trains on crops and predicts on whole images.
    crop_side: Annotated[float, _between(0.25, 1.0)]
    # resized_crop: true: a crop magnified k times has its depth divided by k (the view from a
    # camera k times closer); false: the tutorial's crop, which keeps the depth and so
    # contradicts the image.
    scale_depth: bool
    hflip_prob: Probability

    @model_validator(mode="after")
    def _ordered(self) -> FinetuneAugment:
        if self.crop_scale_min > self.crop_scale_max:
            raise ValueError("finetune.augment.crop_scale_min must not exceed crop_scale_max")
        return self


class FinetuneConfig(Section):
    epochs: Annotated[int, _between(1, 100000)]
    batch_size: Annotated[int, _between(1, 1 << 16)]  # global, all devices (as pretrain's)
    loss: Literal["silog", "l1_log", "mse"]
    optimizer: Literal["adamw", "adam", "sgd"]
    lr: Annotated[float, _between(1e-8, 10.0)]  # peak learning rate under one_cycle
    schedule: Literal["one_cycle", "constant"]
    weight_decay: Annotated[float, _between(0.0, 1.0)]
    # true: the encoder (pretrained or random) is fixed and only the decoder trains, which
    # measures what the representation carries instead of letting fine-tuning wash it out.
    freeze_encoder: bool
    augment: FinetuneAugment
    trainer: TrainerConfig

    @model_validator(mode="after")
    def _batch_splits(self) -> FinetuneConfig:
        return split_batch(self, "finetune")


class EvaluateConfig(Section):
    grid_images: Annotated[int, _between(1, 64)]  # test images in the picture grid
    batch_size: Annotated[int, _between(1, 4096)]  # test images per forward pass


class Params(Section):
    aug: str
    seed: Annotated[int, _between(0, 2**31 - 1)]
    data: DataConfig
    depth: DepthConfig
    preprocess: PreprocessConfig
    model: ModelConfig
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig

    @model_validator(mode="after")
    def _aug_is_a_preset(self) -> Params:
        if self.aug not in self.pretrain.presets:
            raise ValueError(
                f"aug: '{self.aug}' names no preset in pretrain.presets "
                f"(have: {', '.join(sorted(self.pretrain.presets))})"
            )
        return self

    @model_validator(mode="after")
    def _validation_split_possible(self) -> Params:
        # preprocess holds out round(val_fraction * scenes) whole scenes of each domain; both
        # sides need one. Only the synthetic scene count is known before fetch: with real data
        # preprocess keeps at least one scene on each side, and fails naming the domain when
        # it has fewer than two.
        if self.data.source != "synthetic":
            return self
        scenes = self.data.synthetic.train_scenes
        held_out = round(self.preprocess.val_fraction * scenes)
        if not 1 <= held_out <= scenes - 1:
            raise ValueError(
                f"preprocess.val_fraction {self.preprocess.val_fraction} of "
                f"data.synthetic.train_scenes {scenes} holds out {held_out} scene(s): the "
                "train and validation splits each need at least one scene"
            )
        return self

    @model_validator(mode="after")
    def _synthetic_depths_in_range(self) -> Params:
        # Said here, before fetch renders anything. No data.synthetic value can empty a split
        # by itself (scene and view counts are at least 1, the held-out count is checked above,
        # and every view shows ground below its horizon); the valid depth range can: the
        # renderer returns depths from the nearest ground any view shows up to its scanner's
        # range. (A range inside that band but too narrow for some split is caught later:
        # preprocess drops samples without a valid pixel and fine-tuning names an empty split.)
        if self.data.source != "synthetic":
            return self
        nearest, farthest = nearest_ground_depth(), SCANNER_RANGE
        if self.depth.min_depth >= farthest or self.depth.max_depth < nearest:
            raise ValueError(
                f"depth.min_depth {self.depth.min_depth} .. depth.max_depth "
                f"{self.depth.max_depth} misses the synthetic data's depths ({nearest:.2f} to "
                f"{farthest:g} m) with data.source synthetic: the validation and test splits "
                "would have no valid pixel"
            )
        return self

    def encoder_names(self) -> tuple[str, ...]:
        """Every name finetune accepts: the baseline and each pretraining preset."""
        return (SCRATCH, *sorted(self.pretrain.presets))


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
    if not isinstance(raw, dict):
        raise ConfigError(f"params: expected a mapping, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe(error.errors()[0], raw)) from None


def describe(error: Any, raw: dict[str, Any]) -> str:
    """One pydantic error as ``dotted.key: what is wrong`` in the words of params.yaml."""
    key = ".".join(str(part) for part in error["loc"])
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"{key}: unknown key (known here: {_known_keys(error['loc'][:-1])})"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "value_error":
        # Cross-field checks name their own keys; field checks get the key prefixed.
        message = str(ctx.get("error", error["msg"]))
        return message if not key or message.startswith(key) else f"{key}: {message}"
    if kind in ("greater_than_equal", "greater_than"):
        return f"{key}: {value} is below the minimum {ctx.get('ge', ctx.get('gt'))}"
    if kind in ("less_than_equal", "less_than"):
        return f"{key}: {value} is above the maximum {ctx.get('le', ctx.get('lt'))}"
    if kind == "literal_error":
        return f"{key}: {value!r} is not one of {ctx.get('expected', '')}"
    if kind == "finite_number":
        return f"{key}: expected a finite number, got {value!r}"
    expected = _EXPECTED.get(kind)
    if expected:
        return f"{key}: expected {expected}, got {value!r}"
    return f"{key or 'params'}: {error['msg']}"


_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "list_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _known_keys(loc: tuple[Any, ...]) -> str:
    """The keys the schema allows at ``loc`` (a section, or a preset inside presets)."""
    model: Any = Params
    for part in loc:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:  # a preset name: the dict's value type
            model = AugPreset
            continue
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) else AugPreset
    return ", ".join(sorted(model.model_fields)) if hasattr(model, "model_fields") else ""
