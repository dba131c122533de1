from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from depthpipe.config import load_params, parse_params
from depthpipe.errors import ConfigError
from tests.helpers import REPO, committed_params, deep_merge, run_module, write_params


def _preset(name: str) -> dict:
    conservative = committed_params()["pretrain"]["presets"]["conservative"]
    return {"pretrain": {"presets": {name: conservative}}}


def _with(override: dict) -> dict:
    return deep_merge(committed_params(), override)


def test_load_params__committed_file_is_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.aug == "conservative"
    assert set(params.pretrain.presets) == {"aggressive", "conservative"}
    aggressive = params.pretrain.presets["aggressive"]
    assert aggressive.random_rotation.degrees == 90
    assert aggressive.random_flip.vertical_prob == 0.5
    assert params.pretrain.presets["conservative"].random_flip.vertical_prob == 0.0
    with pytest.raises(ValidationError, match="frozen"):
        params.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"finetune": {"lrr": 0.1}}, "finetune.lrr: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"finetune": {"lr": "fast"}}, "finetune.lr: expected a number"),
        ({"finetune": {"epochs": 2.5}}, "finetune.epochs: expected an integer"),
        ({"finetune": {"epochs": True}}, "finetune.epochs: expected an integer"),
        ({"finetune": {"epochs": 0}}, "finetune.epochs: 0 is below the minimum 1"),
        ({"preprocess": {"val_fraction": 1.5}}, "preprocess.val_fraction: 1.5 is above"),
        ({"finetune": {"loss": "huber"}}, "finetune.loss: 'huber' is not one of"),
        ({"model": {"arch": "vgg16"}}, "model.arch: 'vgg16' is not one of"),
        ({"aug": "wild"}, "aug: 'wild' names no preset"),
        ({"pretrain": {"method": "distillation"}}, "downloads teacher weights"),
        ({"pretrain": {"method": "byol2"}}, "pretrain.method: 'byol2' is unknown"),
        ({"pretrain": {"method": "distillation"}}, "pretrain.method: 'distillation' downloads"),
        ({"data": {"source": "ftp"}}, "data.source: 'ftp' is not one of"),
        (
            {"data": {"source": "local"}},
            "data.local.diode: a folder is required when data.source is local",
        ),
        (
            {"data": {"source": "local", "local": {"diode": "/d"}}},
            "data.local.megadepth: a folder is required when data.source is local",
        ),
        ({"data": {"diode_domains": []}}, "data.diode_domains: name at least one of"),
        ({"data": {"diode_domains": ["indoor"]}}, "data.diode_domains.0: 'indoor' is not one of"),
        (
            {"data": {"diode_domains": ["outdoor", "outdoor"]}},
            "a domain is listed twice",
        ),
        ({"data": {"diode_domains": "outdoor"}}, "data.diode_domains: expected a list"),
        ({"data": {"megadepth_max_images": -1}}, "data.megadepth_max_images: -1 is below"),
        (
            {"data": {"official": {"megadepth": {"md5": "abc"}}}},
            "data.official.megadepth.md5: 'abc' is not an MD5",
        ),
        (
            {"data": {"official": {"diode_val": {"url": "ftp://x/val.tar.gz"}}}},
            "data.official.diode_val.url: 'ftp://x/val.tar.gz' is not an http",
        ),
        ({"data": {"official": {"diode_train": {"sha": "x"}}}}, "diode_train.sha: unknown key"),
        ({"data": {"official": {"stream": "yes"}}}, "data.official.stream: expected true or"),
        ({"preprocess": {"workers": -1}}, "preprocess.workers: -1 is below the minimum 0"),
        ({"finetune": {"lr": float("nan")}}, "finetune.lr: expected a finite number"),
        ({"finetune": {"epochs": "8"}}, "finetune.epochs: expected an integer, got '8'"),
        ({"finetune": {"augment": {"scale_depth": 1}}}, "scale_depth: expected true or false"),
        ({"finetune": {"schedule": "cosine"}}, "finetune.schedule: 'cosine' is not one of"),
        ({"seed": -1}, "seed: -1 is below the minimum 0"),
        (
            {"preprocess": {"val_fraction": 0.01}, "data": {"synthetic": {"train_scenes": 16}}},
            "preprocess.val_fraction 0.01 of data.synthetic.train_scenes 16 holds out 0 scene",
        ),
        (
            {"preprocess": {"val_fraction": 0.9}, "data": {"synthetic": {"train_scenes": 3}}},
            "preprocess.val_fraction 0.9 of data.synthetic.train_scenes 3 holds out 3 scene",
        ),
        ({"data": {"synthetic": {"val_scenes": 0}}}, "data.synthetic.val_scenes: 0 is below"),
        (
            {"depth": {"min_depth": 400.0, "max_depth": 1000.0}},
            "depth.min_depth 400.0 .. depth.max_depth 1000.0 misses the synthetic data's depths",
        ),
        (
            {"depth": {"min_depth": 0.01, "max_depth": 0.5}},
            "depth.min_depth 0.01 .. depth.max_depth 0.5 misses the synthetic data's depths",
        ),
        ({"finetune": {"augment": {"geometry": "zoom"}}}, "finetune.augment.geometry: 'zoom'"),
        ({"finetune": {"augment": {"crop_side": 0.1}}}, "finetune.augment.crop_side: 0.1 is"),
        ({"finetune": {"trainer": {"devices": 0}}}, "finetune.trainer.devices: 0 is below"),
        ({"depth": {"min_depth": 10.0, "max_depth": 5.0}}, "depth.min_depth must be below"),
        (
            {"pretrain": {"presets": {"aggressive": {"random_rotation": {"degree": 5}}}}},
            "pretrain.presets.aggressive.random_rotation.degree: unknown key",
        ),
        (
            {"pretrain": {"presets": {"aggressive": {"colour_jitter": {}}}}},
            "pretrain.presets.aggressive.colour_jitter: unknown key",
        ),
        (
            {"pretrain": {"presets": {"aggressive": {"random_flip": {"vertical_prob": 2}}}}},
            "pretrain.presets.aggressive.random_flip.vertical_prob: 2 is above the maximum 1.0",
        ),
        (_preset("Bad Name"), "pretrain.presets: Bad Name: a preset name"),
        (_preset("scratch"), "pretrain.presets: scratch: a preset name"),
        (
            {"finetune": {"augment": {"crop_scale_min": 0.9, "crop_scale_max": 0.5}}},
            "crop_scale_min must not exceed",
        ),
    ],
)
def test_parse_params__rejects_bad_value_naming_key(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_params(_with(override))


def test_parse_params__real_data_sources_accepted() -> None:
    official = parse_params(_with({"data": {"source": "official"}}))
    assert official.data.official.diode_train.md5 == "3a94632398fe1d002d89f11743f748b1"
    assert official.data.official.megadepth.md5 is None
    local = parse_params(
        _with(
            {
                "data": {
                    "source": "local",
                    "diode_domains": ["indoors", "outdoor"],
                    "local": {"diode": "/data/diode", "megadepth": "../megadepth"},
                }
            }
        )
    )
    assert local.data.diode_domains == ["indoors", "outdoor"]
    assert local.data.local.megadepth == "../megadepth"
    pinned = parse_params(_with({"data": {"official": {"megadepth": {"md5": "AB" * 16}}}}))
    assert pinned.data.official.megadepth.md5 == "ab" * 16  # compared in lower case


def test_parse_params__missing_aug_named() -> None:
    raw = committed_params()
    del raw["aug"]
    with pytest.raises(ConfigError, match="aug: required key is missing"):
        parse_params(raw)


def test_load_params__not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("aug: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


def test_parse_params__every_section_key_is_required() -> None:
    """params.yaml is the only source of values: the schema has no defaults to fall back on."""
    raw = committed_params()
    del raw["finetune"]["lr"]
    with pytest.raises(ConfigError, match=r"finetune\.lr: required key is missing"):
        parse_params(raw)


def test_parse_params__unknown_key_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"known here: .*random_flip, random_rotation"):
        parse_params(_with({"pretrain": {"presets": {"aggressive": {"blur": {}}}}}))


def test_third_preset_is_accepted() -> None:
    mild = {
        "random_rotation": {"prob": 1.0, "degrees": 5},
        "random_flip": {"horizontal_prob": 0.5, "vertical_prob": 0.0},
    }
    raw = _with({"pretrain": {"presets": {"mild": mild}}})
    params = parse_params(raw)
    assert params.encoder_names() == ("scratch", "aggressive", "conservative", "mild")
    args = params.pretrain.presets["mild"].transform_args(64)
    assert args["random_rotation"] == {"prob": 1.0, "degrees": 5.0}
    assert args["image_size"] == (64, 64)


def test_stage_cli__bad_param_exits_nonzero_naming_key(tmp_path: Path) -> None:
    write_params(tmp_path, {"data": {"synthetic": {"width": "wide"}}})
    result = run_module("depthpipe.stages.fetch", cwd=tmp_path)
    assert result.returncode == 2
    assert "data.synthetic.width: expected an integer" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # rejected before any work


def test_params_yaml__every_knob_is_commented() -> None:
    lines = (REPO / "params.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):  # section
            continue
        commented = "#" in line or lines[i - 1].strip().startswith("#")
        assert commented, f"params.yaml line {i + 1} has no comment: {line!r}"
