"""``source: local``: DIODE and MegaDepth copies already on this machine.

The folders are validated first (the error names the first thing missing), then each file comes
into data/raw as a reflink (copy-on-write: XFS, Btrfs), else a hard link (same filesystem), else a
copy, and the fetch report counts which. A fingerprint of the files taken (relative names, sizes,
modification times) is what makes fetch re-run when a folder changes: the ``fingerprint`` stage
writes it on every ``dvc repro`` and fetch depends on that file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from depthpipe.config import DataConfig
from depthpipe.data import diode, megadepth
from depthpipe.errors import DepthpipeError
from depthpipe.paths import DIODE_TRAIN_SPLIT, DIODE_VAL_SPLIT

DIODE_SPLITS = (DIODE_TRAIN_SPLIT, DIODE_VAL_SPLIT)
# Output path (relative to the raw folder) -> the local file it comes from.
FileMap = dict[str, Path]
LINK_MODES = ("reflink", "hardlink", "copy")  # tried in this order, as DVC's cache.type
FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int): clone a whole file (reflink)


def folder_of(setting: str | None, key: str, root: Path) -> Path:
    """The folder a ``data.local.*`` value names (relative to the project folder ``root``)."""
    if setting is None:  # the config refuses it for source local; a guard for other callers
        raise DepthpipeError(f"{key}: no folder given")
    folder = Path(setting).expanduser()
    folder = folder if folder.is_absolute() else root / folder
    if not folder.is_dir():
        raise DepthpipeError(f"{key}: {folder} is not a folder")
    return folder


def _require_dir(folder: Path, key: str, why: str) -> None:
    if not folder.is_dir():
        raise DepthpipeError(f"{key}: {folder} not found ({why})")


def diode_files(folder: Path, domains: Sequence[str], key: str) -> FileMap:
    """Every sample file of ``domains`` in a DIODE folder, keyed ``<split>/<domain>/...``;
    raises naming the first split or domain folder missing or empty."""
    files: FileMap = {}
    for split in DIODE_SPLITS:
        _require_dir(folder / split, key, "a DIODE folder holds train/ and val/")
        for domain in domains:
            base = folder / split / domain
            _require_dir(base, key, f"data.diode_domains lists {domain}")
            found = {
                f"{split}/{relative}": path
                for path in base.glob("scene_*/scan_*/*")
                if (
                    relative := diode.sample_file_path(
                        path.relative_to(folder / split).parts, (domain,)
                    )
                )
                and path.is_file()
            }
            if not found:
                raise DepthpipeError(
                    f"{key}: {base} holds no DIODE sample (scene_*/scan_*/<name>.png, "
                    f"<name>_depth.npy, <name>_depth_mask.npy)"
                )
            files.update(found)
    return files


def megadepth_files(folder: Path, key: str) -> FileMap:
    """Every photo under a MegaDepth folder (holding MegaDepth_v1/ or the scene folders
    directly), keyed ``<scene>/dense<k>/imgs/<name>.jpg`` (below MegaDepth_v1/)."""
    base = folder / megadepth.ROOT_DIR if (folder / megadepth.ROOT_DIR).is_dir() else folder
    files = {
        relative: path
        for path in base.glob("*/dense*/imgs/*")
        if (relative := megadepth.photo_path(path.relative_to(base).parts)) and path.is_file()
    }
    if not files:
        raise DepthpipeError(
            f"{key}: {folder} holds neither {megadepth.ROOT_DIR}/ nor scene folders with "
            "<scene>/dense*/imgs/*.jpg photos"
        )
    return files


@dataclass(frozen=True)
class LocalData:
    """What fetch takes from data.local: files per data set, and the folders they are in."""

    folders: dict[str, Path]  # "diode", "megadepth"
    files: dict[str, FileMap]

    @classmethod
    def find(cls, data: DataConfig, root: Path) -> LocalData:
        diode_dir = folder_of(data.local.diode, "data.local.diode", root)
        megadepth_dir = folder_of(data.local.megadepth, "data.local.megadepth", root)
        return cls(
            folders={"diode": diode_dir, "megadepth": megadepth_dir},
            files={
                "diode": diode_files(diode_dir, data.diode_domains, "data.local.diode"),
                "megadepth": megadepth_files(megadepth_dir, "data.local.megadepth"),
            },
        )

    def fingerprint(self) -> dict[str, Any]:
        """Per data set: its folder, file count, bytes and a SHA-256 over every file's relative
        name, size and modification time (content is not read: 280 GB would take an hour)."""
        return {
            name: {"folder": str(self.folders[name]), **fingerprint(files)}
            for name, files in self.files.items()
        }


def fingerprint(files: Mapping[str, Path]) -> dict[str, Any]:
    digest = hashlib.sha256()
    total = 0
    for name in sorted(files):
        stat = files[name].stat()
        digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        total += stat.st_size
    return {"files": len(files), "bytes": total, "sha256": digest.hexdigest()}


def _reflink(source: Path, target: Path) -> None:
    if sys.platform != "linux":
        raise OSError(errno.EOPNOTSUPP, "reflinks are made through Linux's FICLONE here")
    import fcntl

    with source.open("rb") as src, target.open("wb") as dst:
        fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())


def _place(mode: str, source: Path, target: Path) -> None:
    if mode == "reflink":
        _reflink(source, target)
    elif mode == "hardlink":
        os.link(source, target)
    else:
        shutil.copyfile(source, target)


@dataclass
class Linker:
    """Brings files in by the first mode that works. A mode that failed once is not tried again
    for sources on the same filesystem (device): whether a link works depends on the
    filesystems, which do not change during one fetch, but DIODE and MegaDepth may sit on
    different ones, so an EXDEV from one must not turn the other's links into copies."""

    failed: set[tuple[int, str]] = field(default_factory=set)  # (source device, mode)
    counts: dict[str, int] = field(default_factory=dict)

    def bring(self, source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        device = source.stat().st_dev
        for mode in LINK_MODES:
            if (device, mode) in self.failed:
                continue
            try:
                _place(mode, source, target)
            except OSError as error:
                target.unlink(missing_ok=True)
                if mode == "copy":
                    raise DepthpipeError(f"cannot copy {source} to {target}: {error}") from error
                self.failed.add((device, mode))
                continue
            self.counts[mode] = self.counts.get(mode, 0) + 1
            return


def bring_in(files: Mapping[str, Path], target: Path, linker: Linker) -> int:
    """Place every file at ``target / <its key>``; return how many."""
    for name in sorted(files):
        linker.bring(files[name], target / name)
    return len(files)
