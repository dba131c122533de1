from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from depthpipe.config import load_params
from depthpipe.data import diode
from depthpipe.data.packed import PackedDepthDataset, resize_sample
from depthpipe.errors import DepthpipeError
from depthpipe.paths import project_paths
from depthpipe.stages import fetch, preprocess
from tests.helpers import copy_project, run_module


def test_preprocess__splits_by_scene_disjoint_and_deterministic(fetched_project: Path) -> None:
    paths = project_paths(fetched_project)
    report = json.loads(paths.preprocess_report.read_text())
    train, val = report["diode"]["train_scenes"], report["diode"]["validation_scenes"]
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == ["scene_00001", "scene_00002", "scene_00003"]
    scenes = {}
    for split in ("train", "validation", "test"):
        index = json.loads((paths.processed_diode / split / "index.json").read_text())
        scenes[split] = {s["scene"] for s in index["samples"]}
    assert scenes["train"] == set(train) and scenes["validation"] == set(val)
    assert scenes["test"] == {"scene_00500"}
    # same seed, same split; the split does not depend on listing order
    assert preprocess.split_scenes(list(reversed(train + val)), 0.34, 0) == (train, val)
    assert report["diode"]["counts"] == {"train": 6, "validation": 3, "test": 3}


def test_packed_dataset__tensors_shapes_dtypes(fetched_project: Path) -> None:
    dataset = PackedDepthDataset(project_paths(fetched_project).processed_diode / "train")
    sample = dataset[0]
    assert sample["image"].shape == (3, 48, 64) and sample["image"].dtype == torch.float32
    assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0
    assert sample["depth"].shape == (1, 48, 64) and sample["depth"].dtype == torch.float32
    assert sample["mask"].shape == (1, 48, 64) and sample["mask"].dtype == torch.bool
    assert torch.all(sample["depth"][~sample["mask"]] == 0)
    assert torch.all(sample["depth"][sample["mask"]] > 0)


def test_resize_sample__depth_never_averaged() -> None:
    rng = np.random.default_rng(0)
    depth = rng.choice([3.0, 50.0, 200.0], size=(40, 60)).astype(np.float32)
    mask = rng.random((40, 60)) > 0.3
    image = rng.integers(0, 255, size=(40, 60, 3), dtype=np.uint8)
    _, small, small_mask = resize_sample(image, depth, mask, (17, 23))
    assert small.shape == (17, 23) and small_mask.shape == (17, 23)
    assert set(np.unique(small)) <= {3.0, 50.0, 200.0}


def _break_samples(raw: Path) -> dict[str, str]:
    """Damage four train samples in four ways; return {image file: expected reason}."""
    samples = diode.list_samples(raw, "train")
    # spread over the three scenes so every split keeps at least one sample
    corrupt, wrong_shape, nan_depth, no_mask = (samples[i] for i in (0, 3, 6, 1))
    corrupt.image.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    np.save(wrong_shape.depth, np.ones((10, 10, 1), dtype=np.float32))
    depth = np.load(nan_depth.depth)
    depth[5, 5, 0] = np.nan
    np.save(nan_depth.depth, depth)
    no_mask.mask.unlink()
    return {
        corrupt.image.relative_to(raw).as_posix(): "unreadable image",
        wrong_shape.image.relative_to(raw).as_posix(): "depth shape (10, 10) does not match",
        nan_depth.image.relative_to(raw).as_posix(): "depth has 1 non-finite values",
        no_mask.image.relative_to(raw).as_posix(): "missing mask file",
    }


def _break_megadepth(raw: Path) -> dict[str, str]:
    images = sorted(raw.rglob("*.jpg"))
    truncated, not_image = images[0], images[1]
    truncated.write_bytes(truncated.read_bytes()[: len(truncated.read_bytes()) // 2])
    not_image.write_text("this is a text file with a .jpg name")
    return {p.relative_to(raw).as_posix(): "unreadable image" for p in (truncated, not_image)}


def test_preprocess__bad_samples_skipped_and_reported(
    fetched_project: Path, tmp_path: Path
) -> None:
    root = copy_project(fetched_project, tmp_path / "p")
    paths = project_paths(root)
    expected = _break_samples(paths.raw_diode)
    expected_md = _break_megadepth(paths.raw_megadepth)
    result = run_module("depthpipe.stages.preprocess", cwd=root)
    assert result.returncode == 0, result.stderr
    report = json.loads(paths.preprocess_report.read_text())
    reasons = {item["file"]: item["reason"] for item in report["skipped"]}
    assert set(reasons) == set(expected) | set(expected_md)
    for file, reason in {**expected, **expected_md}.items():
        assert reason in reasons[file], (file, reasons[file])
        assert file in result.stdout
    counts = report["diode"]["counts"]
    assert counts["train"] + counts["validation"] == 9 - 4
    assert report["megadepth"]["images"] == 8 - 2
    for split, n in counts.items():
        assert len(PackedDepthDataset(paths.processed_diode / split)) == n
        assert np.load(paths.processed_diode / split / "depth.npy").shape[0] == n


def test_preprocess__failure_half_way_keeps_previous_outputs(
    fetched_project: Path, tmp_path: Path
) -> None:
    root = copy_project(fetched_project, tmp_path / "p")
    paths = project_paths(root)
    before = {p: p.read_bytes() for p in paths.processed_diode.rglob("*") if p.is_file()}
    # Every test sample unreadable: train and validation pack fine, then test has nothing left.
    for files in diode.list_samples(paths.raw_diode, "val"):
        files.depth.write_bytes(b"garbage")
    result = run_module("depthpipe.stages.preprocess", cwd=root)
    assert result.returncode == 2
    assert "test: no valid sample left" in result.stderr
    after = {p: p.read_bytes() for p in paths.processed_diode.rglob("*") if p.is_file()}
    assert after == before
    leftovers = [p.name for p in (root / "data" / "processed").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_preprocess__missing_raw_data_named(tiny_project: Path) -> None:
    paths = project_paths(tiny_project)
    with pytest.raises(DepthpipeError, match="data/raw/diode: raw data not found"):
        preprocess.run(load_params(paths.params), paths)


def test_preprocess__empty_megadepth_named(fetched_project: Path, tmp_path: Path) -> None:
    root = copy_project(fetched_project, tmp_path / "p")
    paths = project_paths(root)
    shutil.rmtree(paths.raw_megadepth)
    paths.raw_megadepth.mkdir()
    with pytest.raises(DepthpipeError, match="no MegaDepth images"):
        preprocess.run(load_params(paths.params), paths)


def test_fetch__interrupted_leaves_no_output(
    tiny_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C during the MegaDepth part: the finished DIODE part is not published either."""
    paths = project_paths(tiny_project)

    def interrupt(*args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch.synthetic, "write_megadepth", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fetch.run(load_params(paths.params), paths)
    assert not paths.raw_diode.exists() and not paths.raw_megadepth.exists()
    assert list((tiny_project / "data" / "raw").iterdir()) == []


def test_megadepth_preprocessed_images_resized(fetched_project: Path) -> None:
    folder = project_paths(fetched_project).processed_megadepth
    images = sorted(folder.glob("*.jpg"))
    assert len(images) == 8
    for path in images:
        with Image.open(path) as img:
            assert min(img.size) <= 48


# A pool of 2 workers that each print their pid and then sleep: preprocess's parallel_map.
_SLEEPING_POOL = """
import os, time
from depthpipe.stages.preprocess import parallel_map

def work(item):
    os.write(1, f"worker {os.getpid()}\\n".encode())  # one write: lines never interleave
    time.sleep(300)
    return item

for _ in parallel_map(work, [1, 2], 2, "sleeping"):
    pass
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG): Linux")
def test_parallel_map__workers_die_with_a_sigkilled_stage() -> None:
    """SIGKILL of the stage's process (an out-of-memory kill) ends its decoding workers too:
    nothing keeps running beside the re-run."""
    stage = subprocess.Popen(
        [sys.executable, "-c", _SLEEPING_POOL], stdout=subprocess.PIPE, text=True
    )
    workers: list[int] = []
    try:
        assert stage.stdout is not None
        while len(workers) < 2:  # other lines may come through the pipe: skip them
            words = stage.stdout.readline().split()
            if words[:1] == ["worker"]:
                workers.append(int(words[1]))
            assert words or stage.poll() is None, "the pool's process ended"
        assert all(psutil.Process(pid).ppid() == stage.pid for pid in workers)
        stage.send_signal(signal.SIGKILL)
        stage.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in workers if not _gone(pid)] == []
    finally:
        stage.kill()
        for pid in workers:
            if not _gone(pid):
                psutil.Process(pid).kill()
