from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from depthpipe.config import load_params
from depthpipe.data.packed import PackedWriter, write_slot
from depthpipe.errors import DepthpipeError
from depthpipe.paths import TRAIN_SPLIT, project_paths
from depthpipe.prior import mean_log_depth, packed_chunks, packed_prior, prior_depth
from tests.helpers import REPO


def test_mean_log_depth__geometric_mean_of_valid_pixels_per_position() -> None:
    depth = np.zeros((3, 2, 2), dtype=np.float32)
    mask = np.zeros((3, 2, 2), dtype=bool)
    depth[0, 0, 0], depth[1, 0, 0] = 2.0, 8.0  # geometric mean 4 m
    mask[0, 0, 0] = mask[1, 0, 0] = True
    depth[2, 0, 0], mask[2, 0, 0] = 1000.0, True  # beyond max_depth: not a valid pixel
    depth[0, 0, 1], mask[0, 0, 1] = 50.0, False  # no sensor return: ignored
    depth[:, 1, 1], mask[:, 1, 1] = 16.0, True
    prior = mean_log_depth(depth, mask, min_depth=0.6, max_depth=350.0)
    assert prior.dtype == np.float32 and prior.shape == (2, 2)
    assert math.exp(prior[0, 0]) == pytest.approx(4.0)
    assert math.exp(prior[1, 1]) == pytest.approx(16.0)
    # positions never valid fall back to the mean over all valid pixels: 2, 8 and 3 x 16 m
    overall = math.exp((math.log(2) + math.log(8) + 3 * math.log(16)) / 5)
    assert math.exp(prior[0, 1]) == pytest.approx(overall)
    assert math.exp(prior[1, 0]) == pytest.approx(overall)


def test_mean_log_depth__equals_the_formula_over_many_samples() -> None:
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 400, size=(150, 4, 5)).astype(np.float32)
    mask = rng.random((150, 4, 5)) > 0.3
    valid = mask & (depth >= 0.6) & (depth <= 350)
    expected = np.log(np.where(valid, depth, 1.0)).sum(axis=0) / valid.sum(axis=0)
    np.testing.assert_allclose(mean_log_depth(depth, mask, 0.6, 350), expected, rtol=1e-5)


def test_mean_log_depth__no_valid_pixel_is_an_error() -> None:
    with pytest.raises(ValueError, match="no valid depth pixel"):
        mean_log_depth(np.zeros((2, 3, 3)), np.zeros((2, 3, 3), dtype=bool), 0.6, 350)


def test_packed_prior__same_bits_for_any_chunk_size(fetched_project: Path) -> None:
    paths = project_paths(fetched_project)
    split, depth = paths.packed_split(TRAIN_SPLIT), load_params(paths.params).depth
    in_memory = mean_log_depth(
        np.load(split / "depth.npy"), np.load(split / "mask.npy"), depth.min_depth, depth.max_depth
    )
    assert in_memory.shape == (48, 64) and np.ptp(in_memory) > 0  # a real map, not a constant
    one_sample_chunks = packed_prior(split, depth, chunk_pixels=1)
    one_chunk = packed_prior(split, depth, chunk_pixels=10**9)
    np.testing.assert_array_equal(one_sample_chunks, in_memory)
    np.testing.assert_array_equal(one_chunk, in_memory)


def test_packed_chunks__never_above_the_pixel_budget(fetched_project: Path) -> None:
    split = project_paths(fetched_project).packed_split(TRAIN_SPLIT)
    depth, mask = np.load(split / "depth.npy"), np.load(split / "mask.npy")  # (6, 48, 64)
    budget = 4 * 48 * 64 + 100  # room for 4 samples and a bit, not 5
    chunks = list(packed_chunks(split, chunk_pixels=budget))
    assert [len(d) for d, _ in chunks] == [4, 2]
    assert all(d.size <= budget and m.shape == d.shape for d, m in chunks)
    np.testing.assert_array_equal(np.concatenate([d for d, _ in chunks]), depth)
    np.testing.assert_array_equal(np.concatenate([m for _, m in chunks]), mask)
    # a budget below one image still reads one sample at a time
    assert [len(d) for d, _ in packed_chunks(split, chunk_pixels=100)] == [1] * len(depth)


def test_packed_chunks__keep_no_memory_map_open(fetched_project: Path) -> None:
    """A map left open keeps every page it read resident (51 GB at the tutorial's size)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs Linux's /proc/self/maps")
    split = project_paths(fetched_project).packed_split(TRAIN_SPLIT)

    def mapped() -> int:  # mappings of the split's arrays (another test may hold its own)
        return sum(str(split) in line for line in maps.read_text().splitlines())

    before = mapped()
    chunks = list(packed_chunks(split, chunk_pixels=1))  # every chunk held at once
    assert len(chunks) == 6 and mapped() == before


def test_packed_prior__bad_split_is_an_error(tmp_path: Path) -> None:
    depth = load_params(REPO / "params.yaml").depth
    with pytest.raises(DepthpipeError, match="run the preprocess stage"):
        packed_prior(tmp_path / "missing", depth)
    split = tmp_path / "train"
    writer = PackedWriter(split, capacity=2, size=(4, 5))
    for slot in range(2):  # no sensor return anywhere: nothing to average
        write_slot(
            split, slot, np.zeros((4, 5, 3), np.uint8), np.full((4, 5), 9.0), np.zeros((4, 5), bool)
        )
    writer.close([(0, {"name": "a"}), (1, {"name": "b"})])
    with pytest.raises(
        DepthpipeError, match=re.escape(f"{split}: the training split has no valid depth")
    ):
        packed_prior(split, depth)
    (split / "mask.npy").unlink()
    with pytest.raises(DepthpipeError, match=r"mask\.npy: not a readable \.npy array"):
        packed_prior(split, depth)
    np.save(split / "mask.npy", np.ones((2, 4, 6), bool))
    with pytest.raises(DepthpipeError, match=r"depth.npy \(2, 4, 5\) and mask.npy \(2, 4, 6\)"):
        packed_prior(split, depth)


def test_prior_depth__resized_in_log_space() -> None:
    log_prior = np.log(np.array([[2.0, 2.0], [32.0, 32.0]], dtype=np.float32))
    depth = prior_depth(log_prior, (4, 6))
    assert depth.shape == (4, 6) and depth.dtype == np.float32
    assert depth[0, 0] == pytest.approx(2.0) and depth[-1, -1] == pytest.approx(32.0)
    # between the rows the log is interpolated: geometric, not arithmetic, mean
    middle = prior_depth(log_prior, (2, 2))
    np.testing.assert_allclose(middle, [[2, 2], [32, 32]], rtol=1e-6)
    assert prior_depth(log_prior, (3, 2))[1, 0] == pytest.approx(8.0, rel=1e-5)
