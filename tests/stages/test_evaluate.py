from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from depthpipe.config import load_params
from depthpipe.data.packed import PackedDepthDataset
from depthpipe.encoders import build_resnet
from depthpipe.metrics import depth_metrics
from depthpipe.model import DepthNet, ModelSpec, build_unet, load_finetuned
from depthpipe.paths import project_paths
from depthpipe.stages import evaluate, fetch, preprocess
from tests.conftest import run_module, write_params

LOW_RES = {"preprocess": {"height": 24, "width": 32}}  # model input at half the raw 48x64


def save_untrained_model(folder: Path, spec: ModelSpec, seed: int) -> None:
    """A real network folder (model.pt + model.json) as finetune writes it, without training."""
    torch.manual_seed(seed)
    net = DepthNet(build_unet(build_resnet(spec.arch), spec))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    spec.save(folder / "model.json")


@pytest.fixture(scope="module")
def scored_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    write_params(root, LOW_RES)
    paths = project_paths(root)
    params = load_params(paths.params)
    fetch.run(params, paths)
    preprocess.run(params, paths)
    spec = ModelSpec("resnet18", 24, 32, params.depth.min_depth, params.depth.max_depth)
    save_untrained_model(paths.finetune_dir("scratch"), spec, seed=1)
    save_untrained_model(paths.finetune_dir(params.aug), spec, seed=2)
    return root


def test_evaluate__writes_fixed_keys_and_pictures(scored_project: Path) -> None:
    result = run_module("depthpipe.stages.evaluate", cwd=scored_project)
    assert result.returncode == 0, result.stderr[-2000:]
    paths = project_paths(scored_project)
    report = json.loads(paths.evaluate_metrics.read_text())
    names = {
        "abs_rel",
        "sq_rel",
        "rmse",
        "rmse_log",
        "log10",
        "silog",
        "delta1",
        "delta2",
        "delta3",
    }
    assert set(report["encoder"]) == names and set(report["scratch"]) == names
    assert set(report["improvement"]) == {"abs_rel", "delta1"}
    assert report["test_images"] == 3
    enc, base = report["encoder"]["abs_rel"], report["scratch"]["abs_rel"]
    assert report["improvement"]["abs_rel"] == pytest.approx((base - enc) / base)
    images = paths.evaluate_live / "plots" / "images"
    for name in ("predictions.png", "metrics.png"):
        with Image.open(images / name) as picture:
            assert picture.size[0] > 300 and picture.size[1] > 150


def test_evaluate__predictions_at_ground_truth_resolution(scored_project: Path) -> None:
    paths = project_paths(scored_project)
    params = load_params(paths.params)
    net, _ = load_finetuned(paths.finetune_dir("scratch"))
    nets = {"encoder": net, "scratch": net}
    images = evaluate.collect(params, paths, nets)
    test = PackedDepthDataset(paths.processed_diode / "test")
    assert test[0]["image"].shape == (3, 24, 32)  # the network sees the training resolution
    first = images[0]
    assert first.predictions["scratch"].shape == first.depth.shape == (48, 64)  # scored at raw
    raw_depth = np.load(paths.raw_diode / test.index["samples"][0]["depth"])[..., 0]
    np.testing.assert_array_equal(first.depth, raw_depth)  # the ground truth is never resized
    results, _ = evaluate.score(images, params)
    expected = np.mean(
        [depth_metrics(im.predictions["scratch"], im.depth, im.valid)["abs_rel"] for im in images]
    )
    assert results["scratch"]["abs_rel"] == pytest.approx(expected)


def test_evaluate__missing_model_named(scored_project: Path, tmp_path: Path) -> None:
    write_params(tmp_path)
    result = run_module("depthpipe.stages.evaluate", cwd=tmp_path)
    assert result.returncode == 2 and "model.json: model description not found" in result.stderr


def test_predict__odd_sized_rgba_and_exif(scored_project: Path, tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 255, size=(37, 53, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "odd.png")
    rotated = Image.new("RGB", (40, 30), (120, 130, 140))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rotated.save(tmp_path / "phone.jpg", exif=exif)
    Image.new("L", (33, 21), 90).save(tmp_path / "grey.png")
    out = tmp_path / "out"
    model = project_paths(scored_project).finetune_dir("scratch")
    result = run_module(
        "depthpipe.predict",
        str(tmp_path / "odd.png"),
        str(tmp_path / "phone.jpg"),
        str(tmp_path / "grey.png"),
        "--model",
        str(model),
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for stem, shape in (("odd", (37, 53)), ("phone", (40, 30)), ("grey", (21, 33))):
        depth = np.load(out / f"{stem}_depth.npy")
        assert depth.dtype == np.float32 and depth.shape == shape
        assert np.isfinite(depth).all() and depth.min() >= 0.6 and depth.max() <= 350
        with Image.open(out / f"{stem}_depth.png") as picture:
            assert picture.size == (shape[1], shape[0]) and picture.mode == "RGB"


def test_predict__folder_with_corrupt_file(scored_project: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 80, 120)).save(folder / f"ok{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    model = project_paths(scored_project).finetune_dir("scratch") / "model.pt"
    result = run_module(
        "depthpipe.predict", str(folder), "--model", str(model), "--out", str(out), cwd=tmp_path
    )
    assert result.returncode == 1
    assert "broken.jpg" in result.stderr
    assert sorted(p.name for p in out.glob("*.npy")) == [f"ok{i}_depth.npy" for i in range(3)]
    assert not list(out.glob("broken*")) and not list(out.glob(".*"))


def test_predict__missing_model_is_clear(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    args = [str(tmp_path / "a.png"), "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]
    result = run_module("depthpipe.predict", *args, cwd=tmp_path)
    assert result.returncode == 2 and "model description not found" in result.stderr
