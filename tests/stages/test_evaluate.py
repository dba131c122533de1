from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from depthpipe import predict
from depthpipe.config import load_params
from depthpipe.data.packed import PackedDepthDataset
from depthpipe.errors import DepthpipeError
from depthpipe.metrics import depth_metrics
from depthpipe.model import load_finetuned, network_input
from depthpipe.paths import ProjectPaths, project_paths
from depthpipe.stages import evaluate
from tests.helpers import REPO, run_main, run_module, write_params


def test_evaluate__writes_fixed_keys_and_pictures(
    scored_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_main(evaluate.main, cwd=scored_project)  # the stage's command, --root "."
    printed = capsys.readouterr()
    assert status == 0, printed.err[-2000:]
    paths = project_paths(scored_project)
    report = json.loads(paths.evaluate_metrics.read_text())
    assert printed.out == paths.evaluate_metrics.read_text()  # the summary is the file written
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
        "abs_rel_aligned",
        "delta1_aligned",
    }
    assert set(report["encoder"]) == set(report["scratch"]) == set(report["prior"]) == names
    assert set(report["improvement"]) == {
        "abs_rel",
        "delta1",
        "abs_rel_low",
        "abs_rel_high",
        "delta1_low",
        "delta1_high",
    }
    assert set(report["over_prior"]) == {
        f"{model}_{metric}{bound}"
        for model in ("encoder", "scratch")
        for metric in ("abs_rel", "delta1")
        for bound in ("", "_low", "_high")
    }
    prior_abs_rel = report["prior"]["abs_rel"]
    assert report["over_prior"]["scratch_abs_rel"] == pytest.approx(
        (prior_abs_rel - report["scratch"]["abs_rel"]) / prior_abs_rel
    )
    assert report["test_images"] == 3 and report["test_scans"] == 1
    # one scan: no interval can be had, and none is claimed
    assert report["improvement"]["abs_rel_low"] is None
    rows = paths.evaluate_per_image.read_text().splitlines()
    header = rows[0].split(",")
    assert header[:2] == ["image", "scan"] and len(rows) == 1 + 3
    for model in ("encoder", "scratch", "prior"):
        for metric in ("abs_rel", "delta1", "abs_rel_aligned", "delta1_aligned"):
            column = header.index(f"{model}_{metric}")
            per_image = [float(row.split(",")[column]) for row in rows[1:]]
            assert sum(per_image) / 3 == pytest.approx(report[model][metric], rel=1e-4, abs=1e-6)
    enc, base = report["encoder"]["abs_rel"], report["scratch"]["abs_rel"]
    assert report["improvement"]["abs_rel"] == pytest.approx((base - enc) / base)
    images = paths.evaluate_live / "plots" / "images"
    for name in ("predictions.png", "metrics.png"):
        with Image.open(images / name) as picture:
            assert picture.size[0] > 300 and picture.size[1] > 150


def scratch_twice(paths: ProjectPaths) -> dict[str, evaluate.Model]:
    """The scratch network as both models: evaluate's machinery without a second network."""
    model = load_finetuned(paths.finetune_dir("scratch"))
    return {"encoder": model, "scratch": model}


def test_evaluate__predictions_at_ground_truth_resolution(scored_project: Path) -> None:
    paths = project_paths(scored_project)
    params = load_params(paths.params)
    nets = scratch_twice(paths)
    images = list(evaluate.predict_test_images(paths, nets, batch_size=4, depth=params.depth))
    test = PackedDepthDataset(paths.processed_diode / "test")
    with Image.open(paths.raw_diode / test.index["samples"][0]["image"]) as raw_png:
        seen = network_input([raw_png.convert("RGB")], nets["scratch"][1])
    # the network sees the training resolution, resized exactly as preprocess packed the split
    torch.testing.assert_close(seen[0], test[0]["image"], rtol=0, atol=0)
    assert seen.shape == (1, 3, 24, 32)
    first = images[0]
    assert first.predictions["scratch"].shape == first.depth.shape == (48, 64)  # scored at raw
    raw_depth = np.load(paths.raw_diode / test.index["samples"][0]["depth"])[..., 0]
    np.testing.assert_array_equal(first.depth, raw_depth)  # the ground truth is never resized
    results, _ = evaluate.score_images(images, params)
    expected = np.mean(
        [depth_metrics(im.predictions["scratch"], im.depth, im.valid)["abs_rel"] for im in images]
    )
    assert results["scratch"]["abs_rel"] == pytest.approx(expected)


def test_evaluate__batch_size_does_not_change_predictions(scored_project: Path) -> None:
    paths = project_paths(scored_project)
    depth = load_params(paths.params).depth
    nets = scratch_twice(paths)
    one, three = (
        list(evaluate.predict_test_images(paths, nets, batch_size=size, depth=depth))
        for size in (1, 3)
    )
    assert [im.name for im in one] == [im.name for im in three] and len(one) == 3
    for single, batched in zip(one, three, strict=True):
        # float32 rounding only: a batched convolution may sum in another order
        np.testing.assert_allclose(
            single.predictions["scratch"], batched.predictions["scratch"], rtol=1e-5
        )


def test_evaluate__streams_the_test_images_one_batch_at_a_time(scored_project: Path) -> None:
    """Memory that does not grow with the test set: while the stage scores image k, the images
    before it are gone (no list of them kept), except the grid's (keep_first)."""
    paths = project_paths(scored_project)
    params = load_params(paths.params)
    seen: list[weakref.ref[evaluate.TestImage]] = []
    alive_before: list[int] = []

    def watched(images: Iterable[evaluate.TestImage]) -> Iterator[evaluate.TestImage]:
        for image in images:
            gc.collect()
            alive_before.append(sum(ref() is not None for ref in seen))
            seen.append(weakref.ref(image))
            yield image

    for grid in (0, 1):
        seen.clear()
        alive_before.clear()
        images = evaluate.predict_test_images(
            paths, scratch_twice(paths), batch_size=1, depth=params.depth
        )
        shown: list[evaluate.TestImage] = []
        _, scored = evaluate.score_images(evaluate.keep_first(watched(images), shown, grid), params)
        assert len(scored) == len(seen) == 3
        # the one before (still bound to the loops' variables when the next is asked for) and
        # the grid's; a list of them all would make it [0, 1, 2]
        assert alive_before == [0, 1, 1 + grid], (grid, alive_before)
        gc.collect()
        assert [ref() for ref in seen if ref() is not None] == shown and len(shown) == grid


def test_evaluate__batch_size_is_images_per_forward_pass(scored_project: Path) -> None:
    """evaluate.batch_size is real: 3 test images at batch size 2 are two forward passes per
    network, of 2 and 1 images."""
    paths = project_paths(scored_project)
    depth = load_params(paths.params).depth
    net, spec = scratch_twice(paths)["scratch"]
    batches: list[int] = []
    hook = net.register_forward_pre_hook(lambda _, inputs: batches.append(len(inputs[0])))
    try:
        list(
            evaluate.predict_test_images(paths, {"scratch": (net, spec)}, batch_size=2, depth=depth)
        )
    finally:
        hook.remove()
    assert batches == [2, 1]


def test_evaluate__scores_what_predict_writes_for_the_same_file(
    scored_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = project_paths(scored_project)
    params = load_params(paths.params)
    nets = scratch_twice(paths)
    images = evaluate.predict_test_images(
        paths, nets, batch_size=params.evaluate.batch_size, depth=params.depth
    )
    scored = next(images).predictions["scratch"]
    png = evaluate.split_files(paths)[0][1].image  # the raw DIODE test PNG evaluate read
    out = tmp_path / "out"
    model = str(paths.finetune_dir("scratch"))
    status = run_main(predict.main, str(png), "--model", model, "--out", str(out), cwd=tmp_path)
    assert status == 0, capsys.readouterr().err[-2000:]
    written = np.load(out / f"{png.stem}_depth.npy")
    assert written.dtype == scored.dtype == np.float32
    # evaluate ran a batch of 3, predict a batch of 1: equal up to float32 summation order
    np.testing.assert_allclose(written, scored, rtol=1e-5)


def test_evaluate__missing_model_named(tmp_path: Path) -> None:
    """The one test of the stage's real command line (``python -m``, exit status and stderr of
    the process); the others call its main in-process (run_main) or its functions."""
    write_params(tmp_path)
    result = run_module("depthpipe.stages.evaluate", cwd=tmp_path)
    assert result.returncode == 2 and "model.json: model description not found" in result.stderr


def test_improvement_intervals__paired_by_scan_and_signed_like_the_improvement() -> None:
    """Four scans: the encoder's abs_rel is 20% under scratch's on every image."""
    per_image = [
        evaluate.ImageScores(
            f"img{i}",
            f"scan_{i % 4}",
            {
                "encoder": {"abs_rel": 0.8 * (0.3 + 0.1 * i), "delta1": 0.5},
                "scratch": {"abs_rel": 0.3 + 0.1 * i, "delta1": 0.4 + 0.01 * i},
                "prior": {"abs_rel": 1.0, "delta1": 0.1},
            },
        )
        for i in range(12)
    ]
    bounds = evaluate.improvement_intervals(per_image, seed=0)
    assert bounds["abs_rel_low"] == pytest.approx(0.2) == bounds["abs_rel_high"]
    assert bounds["delta1_low"] is not None and bounds["delta1_high"] is not None
    assert 0 < bounds["delta1_low"] <= bounds["delta1_high"]  # 0.5 beats 0.40-0.51 on average


def test_over_prior__each_network_against_the_floor() -> None:
    """Scratch halves the prior's abs_rel on every image of three scans: gain 0.5, and the
    interval excludes zero; the encoder equals the prior: gain 0, interval [0, 0]."""
    per_image = [
        evaluate.ImageScores(
            f"img{i}",
            f"scan_{i % 3}",
            {
                "encoder": {"abs_rel": 0.2 + 0.05 * i, "delta1": 0.3},
                "scratch": {"abs_rel": 0.5 * (0.2 + 0.05 * i), "delta1": 0.6},
                "prior": {"abs_rel": 0.2 + 0.05 * i, "delta1": 0.3},
            },
        )
        for i in range(9)
    ]
    results = {
        model: {
            metric: sum(s.metrics[model][metric] for s in per_image) / 9
            for metric in ("abs_rel", "delta1")
        }
        for model in ("encoder", "scratch", "prior")
    }
    gains = evaluate.over_prior(results, per_image, seed=0)
    assert gains["scratch_abs_rel"] == pytest.approx(0.5)
    assert gains["scratch_abs_rel_low"] == pytest.approx(0.5)  # the same ratio in every scan
    assert gains["scratch_delta1"] == pytest.approx(1.0) and gains["scratch_delta1_low"] > 0
    assert gains["encoder_abs_rel"] == pytest.approx(0.0)
    assert gains["encoder_abs_rel_low"] == pytest.approx(0.0) == gains["encoder_abs_rel_high"]


def _test_image(name: str, scan: str, valid: bool, encoder_error: float) -> evaluate.TestImage:
    depth = np.full((4, 6), 10.0, dtype=np.float32)
    return evaluate.TestImage(
        name=name,
        scan=scan,
        image=np.zeros((4, 6, 3), dtype=np.uint8),
        depth=depth,
        valid=np.full((4, 6), valid),
        predictions={
            "encoder": depth * (1 + encoder_error),
            "scratch": depth * 2.0,
            "prior": depth * 0.5,
        },
    )


def test_score_images__an_image_without_valid_pixel_is_left_out_of_every_model() -> None:
    """An image no model can be scored on drops out of all three (the comparison stays paired):
    every model averages over the same two images, and the per-image rows name only those."""
    params = load_params(REPO / "params.yaml")
    images = [
        _test_image("a", "scan_1", True, 0.1),
        _test_image("empty", "scan_1", False, 5.0),  # would dominate encoder's mean if scored
        _test_image("b", "scan_2", True, 0.3),
    ]
    averages, per_image = evaluate.score_images(iter(images), params)
    assert [s.name for s in per_image] == ["a", "b"]
    assert all(set(s.metrics) == set(evaluate.MODELS) for s in per_image)
    assert averages["encoder"]["abs_rel"] == pytest.approx(0.2, rel=1e-6)  # (0.1 + 0.3) / 2
    assert averages["scratch"]["abs_rel"] == pytest.approx(1.0, rel=1e-6)
    assert averages["prior"]["abs_rel"] == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(DepthpipeError, match="no test image has a valid pixel"):
        evaluate.score_images(iter([_test_image("empty", "s", False, 0.0)]), params)


def test_header_size__unreadable_test_image_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "00019_00183_outdoor_000_000.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then nothing valid
    with pytest.raises(DepthpipeError, match=rf"{broken.name}: unreadable test image"):
        evaluate.header_size(broken)
