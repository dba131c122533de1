"""extract_tar on archives built here with tarfile: selection, refusals, all-or-nothing."""

from __future__ import annotations

import io
import random
import re
import tarfile
from pathlib import Path

import pytest

from depthpipe.data.archive import Extracted, UnsafeArchiveError, extract_tar, find_component
from depthpipe.errors import DepthpipeError


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, b""


def _folder(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info, b""


def make_tar(members: list[tuple[tarfile.TarInfo, bytes]], gz: bool = True) -> bytes:
    """A tar (gzipped by default) holding exactly these members, in this order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def every_path(folder: Path) -> set[str]:
    """Everything under folder (files, folders, links), relative, as posix strings."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


BIG = random.Random(0).randbytes(3 * 1024 * 1024 + 17)  # more than one 1 MiB chunk
DIODE_LIKE = [
    _folder("train"),
    _folder("train/outdoor"),
    _file("train/outdoor/scene_00001/scan_00002/00001_00002_outdoor_000_000.png", b"png" * 50),
    _file("train/outdoor/scene_00001/scan_00002/00001_00002_outdoor_000_000_depth.npy", BIG),
    _file("train/indoors/scene_00003/scan_00004/00003_00004_indoors_000_000.png", b"indoor"),
    _file("./train/outdoor/scene_00001/readme.txt", b"not selected"),
]


def keep_outdoor_data(name: str) -> str | None:
    """A select() like PART B's: outdoor png/npy only, written under their scene folder."""
    parts = find_component(name, "outdoor")
    if parts is None or not name.endswith((".png", ".npy")):
        return None
    return "/".join(["outdoor", *parts])


@pytest.mark.parametrize("gz", [True, False], ids=["tar.gz", "tar"])
@pytest.mark.parametrize("as_stream", [False, True], ids=["path", "stream"])
def test_extract_tar__writes_the_selected_files_and_counts_the_rest(
    tmp_path: Path, gz: bool, as_stream: bool
) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(make_tar(DIODE_LIKE, gz=gz))
    target = tmp_path / "out" / "diode"
    source = io.BytesIO(archive.read_bytes()) if as_stream else archive

    result = extract_tar(source, target, keep_outdoor_data)

    scan = target / "outdoor" / "scene_00001" / "scan_00002"
    assert result == Extracted(files=2, bytes=150 + len(BIG), skipped=2)
    assert (scan / "00001_00002_outdoor_000_000.png").read_bytes() == b"png" * 50
    assert (scan / "00001_00002_outdoor_000_000_depth.npy").read_bytes() == BIG
    assert {p for p in every_path(target) if (target / p).is_file()} == {
        "outdoor/scene_00001/scan_00002/00001_00002_outdoor_000_000.png",
        "outdoor/scene_00001/scan_00002/00001_00002_outdoor_000_000_depth.npy",
    }
    assert every_path(tmp_path / "out") == {"diode", *(f"diode/{p}" for p in every_path(target))}


def test_extract_tar__removes_a_killed_runs_staging_folder(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(make_tar(DIODE_LIKE))
    stale = tmp_path / ".diode.partial-deadbeef"
    (stale / "outdoor").mkdir(parents=True)
    (stale / "outdoor" / "half.png").write_bytes(b"half")
    other = tmp_path / ".diode2.partial-x"  # another target's: not ours to remove
    other.mkdir()

    extract_tar(archive, tmp_path / "diode", keep_outdoor_data)

    assert not stale.exists() and other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".diode2.partial-x", "a.tar.gz", "diode"]


UNSAFE = {
    "parent": (_file("../x", b"escaped"), "'../x' has a '..' component"),
    "nested-parent": (_file("train/../../x", b"escaped"), "has a '..' component"),
    "absolute": (None, "is an absolute path"),  # built in the test: a path under tmp_path
    "symlink": (_special("train/link", tarfile.SYMTYPE, "../../outside"), "is a symbolic link"),
    "symlink-inside": (_special("train/ok", tarfile.SYMTYPE, "a.png"), "is a symbolic link"),
    "hardlink": (_special("train/hard", tarfile.LNKTYPE, "/etc/passwd"), "is a hard link"),
    "fifo": (_special("train/pipe", tarfile.FIFOTYPE), "'train/pipe' is a fifo"),
    "char-device": (_special("train/tty", tarfile.CHRTYPE), "is a character device"),
    "block-device": (_special("train/disk", tarfile.BLKTYPE), "is a block device"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_extract_tar__refuses_an_unsafe_member_and_writes_nothing(
    tmp_path: Path, case: str
) -> None:
    member, reason = UNSAFE[case]
    outside = tmp_path / "outside"
    if member is None:
        member = _file(str(outside), b"escaped")
    # A selected file before the bad member: it must not survive the refusal either.
    members = [_file("train/outdoor/first.png", b"first"), member, _file("train/z.png", b"z")]
    archive = tmp_path / "in" / "a.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(make_tar(members))
    target = tmp_path / "out" / "target"

    with pytest.raises(UnsafeArchiveError) as error:
        extract_tar(archive, target, lambda name: name)

    assert repr(member[0].name) in str(error.value) and reason in str(error.value)
    assert every_path(tmp_path) == {"in", "in/a.tar.gz", "out"}  # nothing at target or outside


@pytest.mark.parametrize("mapped", ["../escaped", "/tmp/escaped", "a/../../escaped", ""])
def test_extract_tar__refuses_an_unsafe_select_result(tmp_path: Path, mapped: str) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(make_tar([_file("train/a.png", b"a")]))

    with pytest.raises(UnsafeArchiveError, match=re.escape("select() mapped member 'train/a.png'")):
        extract_tar(archive, tmp_path / "out", lambda name: mapped)

    assert every_path(tmp_path) == {"a.tar.gz"}


def test_extract_tar__an_existing_target_is_an_error_and_untouched(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(make_tar(DIODE_LIKE))
    target = tmp_path / "diode"
    target.mkdir()
    (target / "mine.txt").write_text("keep")

    with pytest.raises(DepthpipeError, match="already exists"):
        extract_tar(archive, target, keep_outdoor_data)

    assert every_path(tmp_path) == {"a.tar.gz", "diode", "diode/mine.txt"}


def _without_end_blocks(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A plain tar cut exactly after its last member (tarfile alone would accept it)."""
    plain = make_tar(members, gz=False)
    end = len(plain.rstrip(b"\0"))
    return plain[: end + (-end % tarfile.BLOCKSIZE)]


TRUNCATED = {
    "tar.gz cut mid-member": lambda whole: whole[: len(whole) // 2],
    "tar.gz without its gzip trailer": lambda whole: whole[:-8],
    "tar.gz cut after the header": lambda whole: whole[:30],
}


@pytest.mark.parametrize("case", [*sorted(TRUNCATED), "tar cut at a member boundary", "empty"])
def test_extract_tar__a_truncated_archive_is_an_error_and_writes_nothing(
    tmp_path: Path, case: str
) -> None:
    archive = tmp_path / "a.tar.gz"
    if case == "tar cut at a member boundary":
        archive.write_bytes(_without_end_blocks(DIODE_LIKE))
    elif case == "empty":
        archive.write_bytes(b"")
    else:
        archive.write_bytes(TRUNCATED[case](make_tar(DIODE_LIKE)))

    with pytest.raises(DepthpipeError) as error:
        extract_tar(archive, tmp_path / "diode", keep_outdoor_data)

    assert str(archive) in str(error.value) and "nothing was extracted" in str(error.value)
    assert every_path(tmp_path) == {"a.tar.gz"}


def test_find_component__parts_after_the_component_whatever_the_prefix() -> None:
    name = "phoenix/S6/zl548/MegaDepth_v1/0001/dense0/imgs/a.jpg"
    assert find_component(name, "MegaDepth_v1") == ["0001", "dense0", "imgs", "a.jpg"]
    assert find_component("./MegaDepth_v1/0001/dense0/imgs/a.jpg", "MegaDepth_v1") == [
        "0001",
        "dense0",
        "imgs",
        "a.jpg",
    ]
    assert find_component("MegaDepth_v1/", "MegaDepth_v1") == []
    assert find_component("other/MegaDepth_v1x/0001/a.jpg", "MegaDepth_v1") is None
    # the first occurrence counts
    assert find_component("a/X/b/X/c", "X") == ["b", "X", "c"]
