from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from depthpipe.config import load_params
from depthpipe.errors import ConfigError
from depthpipe.profile import apply_profile
from tests.helpers import REPO


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    return tmp_path


def test_profile__tutorial_then_demo_round_trips(project: Path) -> None:
    original = (project / "params.yaml").read_text()
    apply_profile(project / "params.yaml", project / "profiles" / "tutorial.yaml")
    tutorial = load_params(project / "params.yaml")
    assert tutorial.model.arch == "resnet50"
    assert (tutorial.pretrain.epochs, tutorial.finetune.epochs) == (500, 50)
    assert tutorial.finetune.trainer.accelerator == "gpu"
    assert tutorial.finetune.trainer.devices == 4
    # the tutorial's scale, with the depth-consistent crop (not the tutorial's crop)
    assert tutorial.finetune.augment.scale_depth is True
    text = (project / "params.yaml").read_text()
    assert "# The pretraining preset this experiment studies" in text  # comments survive
    apply_profile(project / "params.yaml", project / "profiles" / "demo.yaml")
    restored = (project / "params.yaml").read_text()
    assert yaml.safe_load(restored) == yaml.safe_load(original)
    assert _comments(restored) == _comments(original)


def _comments(text: str) -> list[str]:
    return [line.split("#", 1)[1].strip() for line in text.splitlines() if "#" in line]


def test_profile__demo_is_the_committed_params() -> None:
    """Applying demo to the committed file changes nothing: the two agree."""
    before = (REPO / "params.yaml").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        copy.write_text(before)
        apply_profile(copy, REPO / "profiles" / "demo.yaml")
        assert copy.read_text() == before


def test_profile__unknown_key_rejected(project: Path) -> None:
    (project / "profiles" / "bad.yaml").write_text("finetune:\n  epoch: 3\n")
    before = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"profile key finetune\.epoch: not in params\.yaml"):
        apply_profile(project / "params.yaml", project / "profiles" / "bad.yaml")
    assert (project / "params.yaml").read_text() == before


def test_profile__study_is_sized_for_the_seed_grid(project: Path) -> None:
    """The study profile's promises: >= 20 test scans for a scan-level interval, >= 4 validation
    scenes, pretraining long enough to move the weights, and back to the demo afterwards."""
    original = (project / "params.yaml").read_text()
    apply_profile(project / "params.yaml", project / "profiles" / "study.yaml")
    study = load_params(project / "params.yaml")
    synthetic = study.data.synthetic
    assert synthetic.val_scenes * synthetic.scans_per_scene >= 20
    assert round(study.preprocess.val_fraction * synthetic.train_scenes) >= 4
    photos = synthetic.megadepth_scenes * synthetic.megadepth_images_per_scene
    assert study.pretrain.epochs * (photos // study.pretrain.batch_size) >= 90  # optimiser steps
    assert study.pretrain.method == "simclr"
    apply_profile(project / "params.yaml", project / "profiles" / "demo.yaml")
    restored = (project / "params.yaml").read_text()
    assert yaml.safe_load(restored) == yaml.safe_load(original)  # method and lr come back too


def test_profile__demo_shows_many_scenes_with_few_views() -> None:
    """The committed demo's data design (docs/experiments.md): over 100 training scenes of at
    most 4 views (a network shown 12 places memorised them), a test split of at least 20 scans
    for a scan-level interval, and a pretraining that moves the weights (SimCLR, >= 90 steps)."""
    demo = load_params(REPO / "params.yaml")
    synthetic = demo.data.synthetic
    held_out = round(demo.preprocess.val_fraction * synthetic.train_scenes)
    assert synthetic.train_scenes - held_out >= 100
    assert synthetic.views_per_scan * synthetic.scans_per_scene <= 4
    assert synthetic.val_scenes * synthetic.scans_per_scene >= 20
    photos = synthetic.megadepth_scenes * synthetic.megadepth_images_per_scene
    assert demo.pretrain.method == "simclr"
    assert demo.pretrain.epochs * (photos // demo.pretrain.batch_size) >= 90
