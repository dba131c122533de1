"""The packed training format and its torch Dataset.

One folder per split holding three ``.npy`` arrays read through memory maps, so a sample costs a
slice of the page cache instead of a PNG decode and two ``np.load`` calls:

    images.npy  (N, H, W, 3) uint8 RGB
    depth.npy   (N, H, W)    float32 metres (0 where invalid)
    mask.npy    (N, H, W)    bool, True = valid sensor return
    index.json  {"height", "width", "samples": [{"name", "scene", "image", "depth", "mask"}]}

The file paths in ``index.json`` point at the raw sample (relative to the raw DIODE folder), so
evaluation can score against the full-resolution ground truth.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from depthpipe.errors import DepthpipeError

ARRAYS = ("images", "depth", "mask")
INDEX_FILE = "index.json"

Batch = dict[str, torch.Tensor]


def nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index of each target pixel centre: nearest-neighbour sampling along one axis."""
    return np.minimum(((np.arange(target) + 0.5) * source / target).astype(np.int64), source - 1)


def resize_sample(
    image: np.ndarray, depth: np.ndarray, mask: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resize to (height, width): area-filtered RGB, nearest-neighbour depth and mask.

    Depth is never averaged: blending a 5 m pole with the 200 m wall behind it invents a 100 m
    surface that does not exist, and blending with invalid zeros drags depth towards 0.
    """
    height, width = size
    if image.shape[:2] == (height, width):
        return image, depth, mask
    rows = nearest_indices(depth.shape[0], height)
    cols = nearest_indices(depth.shape[1], width)
    rgb = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BOX))
    return rgb, depth[np.ix_(rows, cols)], mask[np.ix_(rows, cols)]


@dataclass
class PackedWriter:
    """A split's arrays made for ``capacity`` samples. Any process fills slot ``i`` with
    ``write_slot`` (so preprocess's workers write straight to disk instead of sending 6 MB per
    full-size sample back through a pipe); ``close`` keeps the filled slots in order."""

    folder: Path
    capacity: int
    size: tuple[int, int]  # (height, width)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        h, w = self.size
        shapes = {"images": (h, w, 3), "depth": (h, w), "mask": (h, w)}
        dtypes = {"images": np.uint8, "depth": np.float32, "mask": np.bool_}
        for name in ARRAYS:
            array = np.lib.format.open_memmap(
                self.folder / f"{name}.npy",
                mode="w+",
                dtype=dtypes[name],
                shape=(self.capacity, *shapes[name]),
            )
            array.flush()
            del array

    def close(self, filled: list[tuple[int, dict[str, str]]]) -> int:
        """Keep the slots of ``filled`` ((slot, index entry), slots ascending) in that order,
        drop the others, write the index; return the sample count."""
        slots = [slot for slot, _ in filled]
        if slots != list(range(self.capacity)):
            for name in ARRAYS:
                _keep_slots(self.folder / f"{name}.npy", slots)
        entries = [entry for _, entry in filled]
        index = {"height": self.size[0], "width": self.size[1], "samples": entries}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        return len(entries)


def write_slot(
    folder: Path, slot: int, image: np.ndarray, depth: np.ndarray, mask: np.ndarray
) -> None:
    """Write one sample, already at the split's size, into slot ``slot`` of a PackedWriter's
    arrays (from any process: each slot is its own byte range of the files)."""
    values = {"images": image, "depth": np.where(mask, depth, 0.0), "mask": mask}
    for name in ARRAYS:
        array = np.load(folder / f"{name}.npy", mmap_mode="r+")
        array[slot] = values[name]
        array.flush()
        del array


def _keep_slots(path: Path, slots: list[int]) -> None:
    """Rewrite a .npy array with only ``slots``, copied one at a time (a split at full size is
    larger than memory). A new file: truncating a mapped one would pull pages from under it."""
    source = np.load(path, mmap_mode="r")
    trimmed = path.with_name(f"{path.stem}.trimmed.npy")
    target = np.lib.format.open_memmap(
        trimmed, mode="w+", dtype=source.dtype, shape=(len(slots), *source.shape[1:])
    )
    for row, slot in enumerate(slots):
        target[row] = source[slot]
    target.flush()
    del target, source
    os.replace(trimmed, path)


def read_index(folder: Path) -> dict:
    path = folder / INDEX_FILE
    if not path.is_file():
        raise DepthpipeError(f"{path}: packed split not found (run the preprocess stage)")
    return json.loads(path.read_text())


class PackedDepthDataset(Dataset[Batch]):
    """A packed split as ``{"image": (3, H, W) float in [0, 1], "depth": (1, H, W) float32 metres,
    "mask": (1, H, W) bool}``, optionally passed through a paired transform.

    The memory maps are opened lazily in each process (a DataLoader worker opens its own) because
    pickling a memmap would copy the whole array into every worker.
    """

    def __init__(self, folder: Path, transform: Callable[[Batch], Batch] | None = None) -> None:
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.transform = transform
        self._arrays: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.index["samples"])

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {
                name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS
            }
        return self._arrays

    def arrays(self) -> dict[str, np.ndarray]:
        """The split's memory-mapped arrays: ``images`` (N, H, W, 3), ``depth`` and ``mask``."""
        return self._open()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def __getitem__(self, i: int) -> Batch:
        arrays = self._open()
        sample = {
            "image": torch.from_numpy(np.array(arrays["images"][i])).permute(2, 0, 1).float()
            / 255.0,
            "depth": torch.from_numpy(np.array(arrays["depth"][i]))[None],
            "mask": torch.from_numpy(np.array(arrays["mask"][i]))[None],
        }
        return self.transform(sample) if self.transform else sample
