"""Safe, single-pass, all-or-nothing extraction of (gzipped) tar archives.

Stricter than Python's tarfile ``data`` filter: every member is checked and the whole extraction
is refused for absolute paths, ``..``, links of any kind and device files; only regular files
are written (with default permissions, never the archive's modes or owners), and directories
are only ever made by us, so no path can lead outside the target. Files land in a hidden
sibling folder renamed to the target only when the archive was read completely.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from depthpipe.errors import DepthpipeError

CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_LINKS_AND_DEVICES = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a fifo",
}


class UnsafeArchiveError(DepthpipeError):
    """An archive member that could write outside the target or create a link or device."""


@dataclass(frozen=True)
class Extracted:
    """Regular files written, their total bytes, and regular files ``select`` skipped."""

    files: int
    bytes: int
    skipped: int


def find_component(name: str, component: str) -> list[str] | None:
    """The path parts after the first part equal to ``component``, or None if there is none.

    ``find_component("phoenix/S6/zl548/MegaDepth_v1/0001/dense0/imgs/a.jpg", "MegaDepth_v1")``
    is ``["0001", "dense0", "imgs", "a.jpg"]``, whatever the prefix before it.
    """
    parts = PurePosixPath(name).parts
    if component not in parts:
        return None
    return list(parts[parts.index(component) + 1 :])


def _path_problem(name: str) -> str | None:
    """Why ``name`` could escape the folder it is written into, or None."""
    if not name.strip("/."):
        return "is empty"
    if name.startswith("/"):
        return "is an absolute path"
    if ".." in name.split("/"):
        return "has a '..' component"
    if "\0" in name:
        return "contains a NUL byte"
    return None


def _member_problem(member: tarfile.TarInfo) -> str | None:
    kind = _LINKS_AND_DEVICES.get(member.type)
    if kind is not None:
        target = f" to {member.linkname!r}" if member.issym() or member.islnk() else ""
        return f"is {kind}{target}"
    if not (member.isreg() or member.isdir()):
        return f"has an unsupported type {member.type!r}"
    if member.isdir() and member.name.strip("/.") == "":
        return None  # "./": the archive's own root folder
    return _path_problem(member.name)


class _TarStream:
    """The plain tar bytes of ``raw`` (gunzipped when it starts with gzip's magic) for tarfile.

    Adds the checks tarfile's stream mode lacks: a gzip stream cut short raises EOFError (tarfile
    would stop quietly at a member boundary), and the last blocks read are kept so the caller can
    check that the archive ends with tar's end-of-archive block.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._pending = raw.read(2)
        self._inflater = zlib.decompressobj(wbits=31) if self._pending == _GZIP_MAGIC else None
        self._buffer = b""
        self._position = 0
        self._recent: deque[tuple[int, bytes]] = deque(maxlen=4)

    def _raw_chunk(self) -> bytes:
        data, self._pending = self._pending, b""
        return data or self._raw.read(CHUNK)

    def _inflate(self) -> bytes:
        """The next plain bytes from the gzip stream; b"" at its proper end."""
        assert self._inflater is not None
        while True:
            if self._inflater.eof:
                rest = self._inflater.unused_data + self._raw_chunk()
                if not rest.startswith(_GZIP_MAGIC):
                    return b""  # bytes after the last gzip member are ignored, as gzip does
                self._inflater = zlib.decompressobj(wbits=31)  # a concatenated member
                self._pending = rest
            data = self._inflater.unconsumed_tail or self._raw_chunk()
            if not data:
                raise EOFError("the gzip stream ends before its end marker (truncated)")
            # max_length bounds memory whatever the compression ratio.
            out = self._inflater.decompress(data, CHUNK)
            if out:
                return out

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            more = self._inflate() if self._inflater else self._raw_chunk()
            if not more:
                break
            self._buffer += more
        cut = len(self._buffer) if size < 0 else size
        data, self._buffer = self._buffer[:cut], self._buffer[cut:]
        self._recent.append((self._position, data))
        self._position += len(data)
        return data

    def recent_block(self, offset: int, length: int) -> bytes:
        """Bytes ``offset`` to ``offset + length`` if among the last ones read (else fewer)."""
        if not self._recent or offset < self._recent[0][0]:
            return b""
        joined = b"".join(data for _, data in self._recent)
        start = offset - self._recent[0][0]
        return joined[start : start + length]

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def tell(self) -> int:
        return self._position

    def write(self, data: bytes) -> int:
        raise OSError("read-only stream")

    def seek(self, position: int) -> int:
        raise OSError("not seekable")

    def close(self) -> None:
        """The caller owns ``raw``."""


@contextlib.contextmanager
def _binary(source: Path | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(source, Path):
        try:
            f = source.open("rb")
        except OSError as error:
            raise DepthpipeError(f"cannot open archive {source}: {error}") from error
        with f:
            yield f
    else:
        yield source


def _output_path(staging: Path, relative: str, member: str) -> Path:
    problem = _path_problem(relative)
    if problem is not None:
        raise UnsafeArchiveError(
            f"select() mapped member {member!r} to {relative!r}, which {problem}"
        )
    return staging.joinpath(*(part for part in relative.split("/") if part not in ("", ".")))


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, out: Path) -> int:
    """Stream one regular member to ``out``; returns its size."""
    data = tar.extractfile(member)
    assert data is not None  # a regular file always has data
    written = 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        f = out.open("wb")
    except OSError as error:
        raise DepthpipeError(
            f"cannot write member {member.name!r} to {out}: {error}; nothing of this extraction "
            "is kept"
        ) from error
    with f:
        while chunk := data.read(CHUNK):  # a read error is the archive's, not the disk's
            try:
                f.write(chunk)
            except OSError as error:
                # Mostly a full disk: the staging folder is removed by extract_tar, so say so.
                raise DepthpipeError(
                    f"cannot write {out}: {error}; nothing of this extraction is kept: free "
                    "space and run again"
                ) from error
            written += len(chunk)
    return written


def _check_end(tar: tarfile.TarFile, stream: _TarStream, label: str) -> None:
    # tarfile's iteration also ends quietly at end of data or at a garbled header: only an
    # all-zero block after the last member proves the archive was read to its end.
    block = stream.recent_block(tar.offset, tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or any(block):
        raise DepthpipeError(
            f"{label}: no end-of-archive block after byte {tar.offset} of the tar data: the "
            "archive is truncated or corrupt; nothing was extracted"
        )


def _extract_into(
    raw: BinaryIO, staging: Path, select: Callable[[str], str | None], label: str
) -> Extracted:
    files = size = skipped = 0
    stream = _TarStream(raw)
    with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
        for member in tar:
            problem = _member_problem(member)
            if problem is not None:
                raise UnsafeArchiveError(
                    f"refusing to extract {label}: member {member.name!r} {problem}; "
                    "nothing was extracted"
                )
            if member.isdir():
                continue  # folders are made for the files selected, and only those
            relative = select(member.name)
            if relative is None:
                skipped += 1
                continue
            size += _write_member(tar, member, _output_path(staging, relative, member.name))
            files += 1
        _check_end(tar, stream, label)
    stream.drain()  # reads a gzip stream to its end marker, which checks its CRC
    return Extracted(files, size, skipped)


def _remove_stale_staging(target: Path) -> None:
    """Staging folders a killed run left beside the target."""
    prefix = f".{target.name}.partial-"
    for sibling in target.parent.iterdir():
        if sibling.name.startswith(prefix) and sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling)


def _new_staging(target: Path) -> Path:
    staging = target.parent / f".{target.name}.partial-{secrets.token_hex(6)}"
    staging.mkdir()  # default permissions (mkdtemp's 0700 would end up on the target)
    return staging


def extract_tar(
    source: Path | BinaryIO,
    target: Path,
    select: Callable[[str], str | None],
    *,
    label: str | None = None,
) -> Extracted:
    """Extract the selected regular files of a tar or tar.gz into the new folder ``target``.

    One streaming pass over ``source`` (a path or a readable binary stream, e.g. a download).
    ``select(member_name)`` returns where the member goes (a relative posix path) or None to
    skip it. Every member is checked first: an absolute path, ``..``, a link or a device refuses
    the whole archive (UnsafeArchiveError). Nothing exists at ``target`` unless everything
    succeeded; ``target`` must not exist beforehand.
    """
    label = label or (str(source) if isinstance(source, Path) else "the archive")
    if target.exists() or target.is_symlink():
        raise DepthpipeError(f"{target} already exists: extraction only writes a new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = _new_staging(target)
    try:
        with _binary(source) as raw:
            extracted = _extract_into(raw, staging, select, label)
        os.rename(staging, target)
    except (tarfile.TarError, zlib.error, EOFError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DepthpipeError(
            f"{label}: not a complete tar archive ({error}); nothing was extracted"
        ) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return extracted
