"""download_file, stream_extract, remote_size and check_free_space against real loopback servers.

The fault server (tests/servers.py) logs every request, so the tests assert what went over the
wire (Range headers, bytes served), not only the file that came out.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import shutil
import tarfile
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from depthpipe.data.archive import Extracted, extract_tar
from depthpipe.data.download import (
    DownloadError,
    check_free_space,
    download_file,
    free_bytes,
    remote_size,
    stream_extract,
)
from depthpipe.errors import DepthpipeError
from tests.servers import Faults, FaultServer, S3Server

pytest_plugins = ("tests.servers",)

DATA = random.Random(1).randbytes(3 * 1024 * 1024 + 123)  # several 1 MiB chunks, odd size
MD5 = hashlib.md5(DATA).hexdigest()
DROP = 1_234_567
# Retries in these tests must not wait: the back-off itself is not what is tested.
FAST = {"backoff_seconds": 0.01, "progress": False}


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_download_file__fetches_verifies_and_renames(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    url = fault_server.add("train.tar.gz", DATA)
    dest = tmp_path / "archives" / "train.tar.gz"  # the folder does not exist yet

    result = download_file(url, dest, md5=MD5, **FAST)

    assert dest.read_bytes() == DATA
    assert (result.path, result.size, result.md5) == (dest, len(DATA), MD5)
    assert (result.resumed_from, result.restarts, result.fetched) == (0, 0, len(DATA))
    assert listing(dest.parent) == ["train.tar.gz"]  # no .partial left
    assert [(r.range, r.status) for r in fault_server.requests("train.tar.gz")] == [(None, 200)]


def test_download_file__a_dropped_connection_resumes_where_it_stopped(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    url = fault_server.add("f.bin", DATA, Faults(drop_after=DROP))

    result = download_file(url, tmp_path / "f.bin", md5=MD5, **FAST)

    first, second = fault_server.requests("f.bin")
    assert (first.range, first.status, first.sent) == (None, 200, DROP)
    # the retry asks for exactly the bytes after the drop, and only those are sent again
    assert (second.range, second.status, second.sent) == (f"bytes={DROP}-", 206, len(DATA) - DROP)
    assert fault_server.sent("f.bin") == len(DATA)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert (result.restarts, result.fetched, result.md5) == (1, len(DATA), MD5)


def test_download_file__resumes_a_partial_file_left_by_an_earlier_run(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    url = fault_server.add("f.bin", DATA)
    (tmp_path / "f.bin.partial").write_bytes(DATA[:DROP])

    result = download_file(url, tmp_path / "f.bin", md5=MD5, **FAST)

    [request] = fault_server.requests("f.bin")
    assert (request.range, request.status) == (f"bytes={DROP}-", 206)
    assert request.sent == len(DATA) - DROP  # the kept bytes were not fetched again
    # the MD5 covers the resumed prefix too: it matched the whole file
    assert (result.resumed_from, result.fetched, result.md5) == (DROP, len(DATA) - DROP, MD5)
    assert listing(tmp_path) == ["f.bin"] and (tmp_path / "f.bin").read_bytes() == DATA


@pytest.mark.parametrize("kept", [len(DATA), len(DATA) + 10], ids=["complete", "too-long"])
def test_download_file__a_partial_file_as_long_as_the_remote_one(
    fault_server: FaultServer, tmp_path: Path, kept: int
) -> None:
    """A run killed between the last byte and the rename (complete), or a remote file that
    shrank since (too long): the server answers 416 to the Range."""
    url = fault_server.add("f.bin", DATA)
    (tmp_path / "f.bin.partial").write_bytes((DATA + b"0123456789")[:kept])

    result = download_file(url, tmp_path / "f.bin", md5=MD5, **FAST)

    statuses = [(r.range, r.status) for r in fault_server.requests("f.bin")]
    if kept == len(DATA):  # nothing fetched: the kept bytes were the whole file
        assert statuses == [(f"bytes={kept}-", 416)]
        assert (result.resumed_from, result.fetched) == (kept, 0)
    else:  # started again from byte 0
        assert statuses == [(f"bytes={kept}-", 416), (None, 200)]
        assert (result.resumed_from, result.fetched) == (0, len(DATA))
    assert (tmp_path / "f.bin").read_bytes() == DATA and listing(tmp_path) == ["f.bin"]


def test_download_file__a_server_ignoring_range_restarts_the_file_cleanly(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    url = fault_server.add("f.bin", DATA, Faults(drop_after=DROP, ignore_range=True))
    # Bytes from an earlier run that are NOT a prefix of the file: they must not survive.
    (tmp_path / "f.bin.partial").write_bytes(b"x" * 1000)

    result = download_file(url, tmp_path / "f.bin", md5=MD5, **FAST)

    served = fault_server.requests("f.bin")
    assert [(r.range, r.status) for r in served] == [("bytes=1000-", 200), (f"bytes={DROP}-", 200)]
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert (result.resumed_from, result.restarts, result.md5) == (0, 1, MD5)
    assert listing(tmp_path) == ["f.bin"]


def test_download_file__a_file_changed_on_the_server_since_the_partial_restarts_it(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    """The first run is cut off; before the rerun the server's file is replaced by another of
    the same size. Range alone would splice old and new bytes (and fail the MD5 after the whole
    transfer); If-Range with the kept ETag gets the new file whole and restarts cleanly."""
    url = fault_server.add("f.bin", DATA, Faults(drop_after=DROP))
    with pytest.raises(DownloadError, match="run again to resume"):
        download_file(url, tmp_path / "f.bin", md5=None, retries=0, **FAST)
    etag = f'"{MD5}"'
    assert (tmp_path / "f.bin.partial.validator").read_text().strip() == etag

    new = bytes(reversed(DATA))
    fault_server.add("f.bin", new)
    result = download_file(url, tmp_path / "f.bin", md5=hashlib.md5(new).hexdigest(), **FAST)

    first, second = fault_server.requests("f.bin")
    assert (first.range, first.if_range, first.sent) == (None, None, DROP)
    # asked for the rest of the old version; got the whole new one
    assert (second.range, second.if_range, second.status) == (f"bytes={DROP}-", etag, 200)
    assert (tmp_path / "f.bin").read_bytes() == new
    assert (result.resumed_from, result.restarts, result.fetched) == (0, 0, len(new))
    assert listing(tmp_path) == ["f.bin"]  # neither the partial file nor its validator


def test_download_file__503_is_retried_with_back_off(
    fault_server: FaultServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = fault_server.add("f.bin", DATA, Faults(fail_first=2))

    result = download_file(url, tmp_path / "f.bin", md5=MD5, **FAST)

    assert [r.status for r in fault_server.requests("f.bin")] == [503, 503, 200]
    assert result.restarts == 2 and (tmp_path / "f.bin").read_bytes() == DATA
    assert "HTTP 503" in capsys.readouterr().err  # each retry is reported


def test_download_file__gives_up_after_the_retries(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    url = fault_server.add("f.bin", DATA, Faults(fail_first=100))

    with pytest.raises(DownloadError, match=f"{re.escape(url)}: giving up after 2 retries.*503"):
        download_file(url, tmp_path / "f.bin", md5=MD5, retries=2, **FAST)

    assert len(fault_server.requests("f.bin")) == 3 and listing(tmp_path) == []


def test_download_file__404_fails_at_once(fault_server: FaultServer, tmp_path: Path) -> None:
    url = fault_server.add("gone.tar.gz", DATA, Faults(status=404))
    start = time.monotonic()

    with pytest.raises(DownloadError, match=f"^{re.escape(url)}: the server answered HTTP 404"):
        download_file(url, tmp_path / "gone.tar.gz", md5=MD5, backoff_seconds=30, progress=False)

    assert time.monotonic() - start < 5  # no back-off: a 4xx is not retried
    assert len(fault_server.requests("gone.tar.gz")) == 1 and listing(tmp_path) == []


def test_download_file__a_stall_times_out_and_resumes(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    # The server sends DROP bytes, then goes silent for 10 s: the 0.5 s stall timeout ends it.
    url = fault_server.add("f.bin", DATA, Faults(drop_after=DROP, stall_seconds=10))
    start = time.monotonic()

    result = download_file(url, tmp_path / "f.bin", md5=MD5, stall_timeout=0.5, **FAST)

    assert time.monotonic() - start < 5
    assert [r.range for r in fault_server.requests("f.bin")] == [None, f"bytes={DROP}-"]
    assert (tmp_path / "f.bin").read_bytes() == DATA and result.restarts == 1


def test_download_file__wrong_md5_removes_the_file_and_names_both_sums(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    url = fault_server.add("f.bin", DATA)
    pinned = "0" * 32

    with pytest.raises(DownloadError) as error:
        download_file(url, tmp_path / "f.bin", md5=pinned, **FAST)

    message = str(error.value)
    assert url in message and f"expected {pinned}, got {MD5}" in message
    assert listing(tmp_path) == []  # neither the file nor its .partial


def test_download_file__without_md5_prints_the_computed_one(
    fault_server: FaultServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = fault_server.add("megadepth.tar.gz", DATA)

    result = download_file(url, tmp_path / "m.tar.gz", md5=None, label="megadepth", **FAST)

    assert result.md5 == MD5 and (tmp_path / "m.tar.gz").read_bytes() == DATA
    assert f"megadepth: md5 {MD5}" in capsys.readouterr().out


def test_download_file__an_existing_verified_file_is_not_downloaded_again(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    url = fault_server.add("f.bin", DATA)
    (tmp_path / "f.bin").write_bytes(DATA)
    (tmp_path / "g.bin").write_bytes(b"stale")  # a different file under the same name

    kept = download_file(url, tmp_path / "f.bin", md5=MD5, **FAST)
    assert fault_server.requests("f.bin") == [] and (kept.fetched, kept.md5) == (0, MD5)

    replaced = download_file(url, tmp_path / "g.bin", md5=MD5, **FAST)
    assert (tmp_path / "g.bin").read_bytes() == DATA and replaced.fetched == len(DATA)


def test_remote_size__from_the_server_or_a_clear_error(fault_server: FaultServer) -> None:
    assert remote_size(fault_server.add("f.bin", DATA)) == len(DATA)
    missing = fault_server.add("missing", b"", Faults(status=404))
    with pytest.raises(DownloadError, match=f"{re.escape(missing)}: .*HTTP 404"):
        remote_size(missing)


def test_check_free_space__too_little_names_the_folder_and_both_sizes(tmp_path: Path) -> None:
    folder = tmp_path / "not" / "made" / "yet"  # measured on the nearest existing parent
    free = free_bytes(folder)
    check_free_space(folder, 1, "a small file")  # enough: no error

    with pytest.raises(DepthpipeError) as error:
        check_free_space(folder, free + 10**12, "DIODE train")

    match = re.fullmatch(
        r"DIODE train needs ([\d.]+) ([KMGT]B) at (.+) but only ([\d.]+) ([KMGT]?B) is free",
        str(error.value),
    )
    assert match is not None, str(error.value)
    scale = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    needed = float(match[1]) * scale[match[2]]
    assert match[3] == str(folder)
    assert needed == pytest.approx(free + 10**12, rel=0.01)
    assert float(match[4]) * scale[match[5]] == pytest.approx(free, rel=0.01, abs=1024)


# --- stream_extract ----------------------------------------------------------------------------

FILES = {
    f"val/outdoor/scene_0000{i}/scan_00001/img_{i}.png": random.Random(i).randbytes(400_000)
    for i in range(5)
}


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


ARCHIVE = tar_gz(FILES)
ARCHIVE_MD5 = hashlib.md5(ARCHIVE).hexdigest()


class Extractor:
    """What a caller passes as ``extract``: starts from scratch on every call."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.calls = 0

    def __call__(self, stream: BinaryIO) -> Extracted:
        self.calls += 1
        shutil.rmtree(self.target, ignore_errors=True)
        return extract_tar(stream, self.target, lambda name: name)


def assert_extracted(target: Path) -> None:
    found = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*.png")}
    assert found == FILES


def test_stream_extract__extracts_while_downloading(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    url = fault_server.add("val.tar.gz", ARCHIVE)
    extract = Extractor(tmp_path / "val")

    result, md5 = stream_extract(url, md5=ARCHIVE_MD5, extract=extract, **FAST)

    assert md5 == ARCHIVE_MD5 and result == Extracted(files=5, bytes=2_000_000, skipped=0)
    assert_extracted(tmp_path / "val")
    assert listing(tmp_path) == ["val"]  # no archive, no partial folder
    assert [(r.status, r.sent) for r in fault_server.requests("val.tar.gz")] == [
        (200, len(ARCHIVE))
    ]


def test_stream_extract__a_dropped_connection_starts_again_from_zero(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    url = fault_server.add("val.tar.gz", ARCHIVE, Faults(drop_after=len(ARCHIVE) // 2))
    extract = Extractor(tmp_path / "val")

    _, md5 = stream_extract(url, md5=ARCHIVE_MD5, extract=extract, **FAST)

    assert [(r.range, r.sent) for r in fault_server.requests("val.tar.gz")] == [
        (None, len(ARCHIVE) // 2),
        (None, len(ARCHIVE)),  # no Range: the stream is read from byte 0 again
    ]
    assert extract.calls == 2 and md5 == ARCHIVE_MD5
    assert_extracted(tmp_path / "val")
    assert listing(tmp_path) == ["val"]  # the interrupted attempt left no staging folder


def test_stream_extract__wrong_md5_raises_after_extracting(
    fault_server: FaultServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = fault_server.add("val.tar.gz", ARCHIVE)

    with pytest.raises(DownloadError, match=f"expected {'f' * 32}, got {ARCHIVE_MD5}") as error:
        stream_extract(url, md5="f" * 32, extract=Extractor(tmp_path / "a"), **FAST)
    assert url in str(error.value) and "what was extracted from it must be removed" in str(
        error.value
    )
    assert (tmp_path / "a").is_dir()  # without discard the caller removes it

    def discard() -> None:
        shutil.rmtree(tmp_path / "c")

    with pytest.raises(DownloadError, match=r"\(what was extracted from it was removed\)"):
        extract = Extractor(tmp_path / "c")
        stream_extract(url, md5="f" * 32, extract=extract, discard=discard, **FAST)
    assert not (tmp_path / "c").exists()

    _, md5 = stream_extract(url, md5=None, extract=Extractor(tmp_path / "b"), **FAST)
    assert md5 == ARCHIVE_MD5 and f"val.tar.gz: md5 {ARCHIVE_MD5}" in capsys.readouterr().out


# --- a real object store: SeaweedFS's S3 gateway, read anonymously like DIODE's bucket ---------


def test_seaweedfs__download_file_reads_an_object_anonymously(
    seaweedfs: S3Server, tmp_path: Path
) -> None:
    url = seaweedfs.put("downloads/plain/train.tar.gz", DATA)

    assert remote_size(url) == len(DATA)
    result = download_file(url, tmp_path / "train.tar.gz", md5=MD5, **FAST)

    assert (tmp_path / "train.tar.gz").read_bytes() == DATA
    assert (result.size, result.md5, result.fetched) == (len(DATA), MD5, len(DATA))


def test_seaweedfs__resumes_a_partial_file_with_range(seaweedfs: S3Server, tmp_path: Path) -> None:
    url = seaweedfs.put("downloads/resume/train.tar.gz", DATA)
    (tmp_path / "train.tar.gz.partial").write_bytes(DATA[:DROP])

    result = download_file(url, tmp_path / "train.tar.gz", md5=MD5, **FAST)

    # the server honoured Range: only the rest came over the network, the prefix was kept
    assert (result.resumed_from, result.fetched, result.restarts) == (DROP, len(DATA) - DROP, 0)
    assert (tmp_path / "train.tar.gz").read_bytes() == DATA
    assert listing(tmp_path) == ["train.tar.gz"]


def test_seaweedfs__stream_extract_of_an_object(seaweedfs: S3Server, tmp_path: Path) -> None:
    url = seaweedfs.put("downloads/stream/val.tar.gz", ARCHIVE)

    result, md5 = stream_extract(url, md5=ARCHIVE_MD5, extract=Extractor(tmp_path / "v"), **FAST)

    assert md5 == ARCHIVE_MD5 and result.files == len(FILES)
    assert_extracted(tmp_path / "v")
