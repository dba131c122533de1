"""HTTP downloads of very large archives that survive a flaky network and prove what they got.

``download_file`` streams into ``<dest>.partial``, resumes it with an HTTP Range request after any
interruption (in this run or an earlier, killed one), retries with exponential back-off, and
renames to ``dest`` only after the size and the MD5 are verified. The server's ETag (or
Last-Modified) is kept beside the partial file in ``<dest>.partial.validator`` and sent as
``If-Range`` on resume, so a file that changed on the server in between comes back whole (200)
and restarts the partial file instead of being spliced onto the old bytes. ``stream_extract`` is the
no-disk variant: the archive is extracted while it downloads, hashing the same bytes.

The transfer uses urllib3 (what requests and botocore are built on; typed, and it lets us turn
off content decoding so the bytes hashed are exactly the bytes the server stores).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import io
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import urllib3
from tqdm import tqdm

from depthpipe.errors import DepthpipeError

T = TypeVar("T")

CHUNK = 1 << 20
# urllib3 itself must not retry (we count and report every retry) but may follow redirects
# (mirrors and CDNs answer with 301/302).
_NO_RETRIES = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=10)
# A server asking us to slow down or a gateway timing out is transient, like a 5xx.
_TRANSIENT_STATUS = {408, 429}
_NETWORK_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError)


class DownloadError(DepthpipeError):
    """A download failed for good (4xx, retries exhausted, wrong size or MD5); names the URL."""


@dataclass(frozen=True)
class Downloaded:
    """A verified file at ``path``.

    ``resumed_from``: bytes of an earlier run's ``.partial`` that were kept (not fetched again);
    ``restarts``: requests made after the first one (retries and resumes within this call);
    ``fetched``: bytes received over the network by this call.
    """

    path: Path
    size: int
    md5: str
    resumed_from: int
    restarts: int
    fetched: int = 0


class _Transient(Exception):
    """A failure worth another attempt (connection lost, stall, 5xx); the message says which."""


def _pool() -> urllib3.PoolManager:
    return urllib3.PoolManager(retries=_NO_RETRIES)


def _timeout(connect_timeout: float, stall_timeout: float) -> urllib3.Timeout:
    # The read timeout applies to every socket read, so it is exactly a stall detector: a
    # connection that delivers nothing for stall_timeout seconds is dropped and retried.
    return urllib3.Timeout(connect=connect_timeout, read=stall_timeout)


def _request(
    pool: urllib3.PoolManager,
    method: str,
    url: str,
    headers: dict[str, str],
    timeout: urllib3.Timeout,
) -> urllib3.BaseHTTPResponse:
    """Send one request; 5xx and network errors are transient, other 4xx fail at once."""
    # identity: a server must not gzip the body in transit, or the MD5 would be of other bytes.
    headers = {"Accept-Encoding": "identity", **headers}
    try:
        response = pool.request(
            method,
            url,
            headers=headers,
            timeout=timeout,
            preload_content=False,
            decode_content=False,
        )
    except _NETWORK_ERRORS as error:
        raise _Transient(f"connection failed ({error})") from error
    status = response.status
    if status >= 500 or status in _TRANSIENT_STATUS:
        response.release_conn()
        raise _Transient(f"the server answered HTTP {status} {response.reason or ''}".rstrip())
    if status >= 400 and status != 416:
        response.release_conn()
        raise DownloadError(f"{url}: the server answered HTTP {status} {response.reason or ''}")
    return response


def _header_int(response: urllib3.BaseHTTPResponse, name: str) -> int | None:
    value = response.headers.get(name)
    return int(value) if value is not None and value.strip().isdigit() else None


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")


def _content_range(response: urllib3.BaseHTTPResponse) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``Content-Range: bytes a-b/N`` or ``bytes */N``."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match is None:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def _bar(label: str, total: int | None, initial: int, enabled: bool) -> Iterator[Any]:
    """A byte progress bar with rate and ETA on stderr (the rate counts only new bytes)."""
    bar = tqdm(
        total=total,
        initial=initial,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        # None: off when stderr is not a terminal (DVC's log, CI), so no bar floods the log.
        disable=None if enabled else True,
        dynamic_ncols=True,
    )
    try:
        yield bar
    finally:
        bar.close()


def _md5_of_file(path: Path, label: str, progress: bool) -> tuple[Any, int]:
    """A running MD5 of the file's bytes and their count (to go on appending to it)."""
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    with path.open("rb") as f, _bar(f"{label} (hashing)", path.stat().st_size, 0, progress) as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            bar.update(len(chunk))
    return digest, size


class _Partial:
    """The ``.partial`` file and the MD5 of exactly the bytes in it, kept in step."""

    def __init__(self, path: Path, label: str, progress: bool) -> None:
        self.path = path
        self.validator_path = path.with_name(path.name + ".validator")
        self.discarded = False
        self.received = 0  # bytes that came over the network in this run
        if path.exists():
            # Hashing the resumed prefix is what lets the final MD5 cover the whole file.
            self.digest, self.size = _md5_of_file(path, label, progress)
        else:
            self.digest, self.size = hashlib.md5(usedforsecurity=False), 0
            self.validator_path.unlink(missing_ok=True)  # of a partial file that is gone

    def validator(self) -> str | None:
        """The ETag or Last-Modified of the version the kept bytes came from, if known."""
        if not self.size or not self.validator_path.is_file():
            return None
        return self.validator_path.read_text().strip() or None

    def remember(self, response: urllib3.BaseHTTPResponse) -> None:
        """Keep the validator of the version now being appended (none: resume without it)."""
        etag = response.headers.get("ETag")
        # If-Range takes only a strong ETag; a weak one (W/) would never match.
        strong = etag if etag and not etag.startswith("W/") else None
        value = strong or response.headers.get("Last-Modified")
        if value:
            self.validator_path.write_text(value + "\n")
        else:
            self.validator_path.unlink(missing_ok=True)

    def forget(self) -> None:
        """The download is complete (or thrown away): its validator is no longer needed."""
        self.validator_path.unlink(missing_ok=True)

    def restart(self) -> None:
        """Throw away every byte: the next write starts the file again."""
        self.path.write_bytes(b"")
        self.digest, self.size = hashlib.md5(usedforsecurity=False), 0
        self.discarded = True

    def append(self, response: urllib3.BaseHTTPResponse, bar: Any) -> None:
        """Append the body to the file. Network errors are transient."""
        with self.path.open("ab") as f:
            while True:
                try:
                    # read1: whatever has arrived, so bytes before a drop are never lost.
                    chunk = response.read1(CHUNK, decode_content=False)
                except _NETWORK_ERRORS as error:
                    # What arrived before the error is on disk and stays: the retry resumes.
                    raise _Transient(f"connection lost at byte {self.size} ({error})") from error
                if not chunk:
                    return
                f.write(chunk)
                self.digest.update(chunk)
                self.size += len(chunk)
                self.received += len(chunk)
                bar.update(len(chunk))


@dataclass
class _Settings:
    url: str
    label: str
    retries: int
    backoff_seconds: float
    timeout: urllib3.Timeout
    progress: bool


def _expected_total(response: urllib3.BaseHTTPResponse, part: _Partial, url: str) -> int | None:
    """Check the answer to a (possibly ranged) GET; return the whole file's size if known.

    Restarts the partial file when the server ignored the Range (200) or answered another range.
    """
    if response.status == 206:
        start, total = _content_range(response)
        if start == part.size:
            return total
        part.restart()
        raise _Transient(f"asked for bytes {part.size}- but got a range starting at {start}")
    if part.size:
        _say(
            f"{url}: the server sent the whole file (HTTP 200: it ignores Range, or the file "
            "changed since the partial download): starting again at byte 0"
        )
        part.restart()
    return _header_int(response, "Content-Length")


def _attempt(pool: urllib3.PoolManager, part: _Partial, s: _Settings) -> int | None:
    """One GET appending to the partial file; returns the total size if the server said."""
    headers = {"Range": f"bytes={part.size}-"} if part.size else {}
    validator = part.validator()
    if validator is not None:
        # The server sends the rest only if the file is still the version the kept bytes came
        # from, else the whole (new) file with 200, which restarts the partial file cleanly.
        headers["If-Range"] = validator
    response = _request(pool, "GET", s.url, headers, s.timeout)
    try:
        if response.status == 416:
            # Nothing left after our offset: complete if the sizes agree, else start again.
            _, total = _content_range(response)
            if total == part.size:
                return total
            part.restart()
            raise _Transient(f"the partial file is not a prefix of the remote file ({total} B)")
        total = _expected_total(response, part, s.url)
        part.remember(response)
        with _bar(s.label, total, part.size, s.progress) as bar:
            part.append(response, bar)
    finally:
        response.release_conn()
    if total is not None and part.size < total:
        raise _Transient(f"the connection closed at byte {part.size} of {total}")
    return total


def _with_retries(
    run: Callable[[], T],
    s: _Settings,
    progress_made: Callable[[], bool],
    advice: Callable[[], str] = lambda: "",
) -> T:
    """Call ``run`` until it succeeds, sleeping backoff * 2^(n-1) after the n-th failure.

    ``retries`` bounds consecutive failures that brought no new bytes (progress_made), so a long
    transfer over a connection that drops every hour still completes. ``advice`` ends the
    message when giving up.
    """
    failures = 0
    while True:
        try:
            return run()
        except _Transient as error:
            failures = 1 if progress_made() else failures + 1
            if failures > s.retries:
                raise DownloadError(
                    f"{s.url}: giving up after {s.retries} retries without progress: {error}"
                    + advice()
                ) from error
            delay = s.backoff_seconds * 2 ** (failures - 1)
            _say(f"{s.label}: {error}; retry {failures}/{s.retries} in {delay:.1f} s")
            time.sleep(delay)


def _md5_mismatch(url: str, expected: str, actual: str, removed: str) -> DownloadError:
    return DownloadError(
        f"{url}: MD5 mismatch: expected {expected}, got {actual} ({removed}); the server's file "
        "differs from the pinned one, or the transfer was corrupted: run again, and if it "
        "persists check the URL and md5 in params.yaml"
    )


def _announce_md5(label: str, actual: str) -> None:
    # Printed so a team can pin it in params.yaml and verify every later download.
    print(f"{label}: md5 {actual} (no md5 was given to check against: pin this value)")


def _already_there(dest: Path, md5: str | None, label: str, progress: bool) -> Downloaded | None:
    """``dest`` from an earlier run, if it is still good (it only ever appears verified)."""
    digest, size = _md5_of_file(dest, label, progress)
    actual = digest.hexdigest()
    if md5 is not None and actual != md5:
        _say(f"{dest}: MD5 {actual}, expected {md5}: removing it and downloading again")
        dest.unlink()
        return None
    if md5 is None:
        _announce_md5(label, actual)
    return Downloaded(dest, size, actual, resumed_from=0, restarts=0, fetched=0)


def download_file(
    url: str,
    dest: Path,
    *,
    md5: str | None,
    retries: int = 5,
    backoff_seconds: float = 1.0,
    stall_timeout: float = 60.0,
    progress: bool = True,
    label: str | None = None,
    connect_timeout: float = 30.0,
) -> Downloaded:
    """Download ``url`` to ``dest`` (resumable, retried, size- and MD5-verified).

    Bytes go to ``<dest>.partial``; an existing one is resumed with ``Range: bytes=<size>-``
    (those bytes are not fetched again, but are hashed). A server that ignores Range (200)
    restarts the file cleanly. Connection errors, stalls longer than ``stall_timeout`` seconds
    and 5xx are retried with back-off; a 4xx fails at once. On an MD5 mismatch the bad file is
    deleted. With ``md5=None`` the computed MD5 is printed and returned. An existing ``dest``
    whose MD5 matches (or with ``md5=None``: it is only ever created verified) is returned as is.
    """
    label = label or dest.name
    md5 = md5.lower() if md5 else None
    if dest.exists():
        found = _already_there(dest, md5, label, progress)
        if found is not None:
            return found
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _Partial(dest.with_name(dest.name + ".partial"), label, progress)
    kept = part.size
    settings = _Settings(
        url, label, retries, backoff_seconds, _timeout(connect_timeout, stall_timeout), progress
    )
    pool = _pool()
    attempts = 0
    high_water = part.size

    def attempt() -> int | None:
        nonlocal attempts
        attempts += 1
        return _attempt(pool, part, settings)

    def grew() -> bool:
        # Progress = the file got longer than ever before (a restart at 0 is no progress).
        nonlocal high_water
        if part.size > high_water:
            high_water = part.size
            return True
        return False

    def resumable() -> str:
        if not part.size:
            return ""
        return f"; the {part.size} bytes so far are kept in {part.path}: run again to resume"

    try:
        total = _with_retries(attempt, settings, grew, resumable)
    except OSError as error:
        # Network errors became _Transient or DownloadError: an OSError here is the disk's
        # (ENOSPC above all, when something else filled the disk after the free-space check).
        raise _write_failed(url, part.path, error) from error
    actual = _verify(part, url, total, md5)
    os.replace(part.path, dest)
    part.forget()
    if md5 is None:
        _announce_md5(label, actual)
    resumed_from = 0 if part.discarded else kept
    return Downloaded(dest, part.size, actual, resumed_from, attempts - 1, part.received)


def _write_failed(url: str, partial: Path, error: OSError) -> DownloadError:
    kept = partial.stat().st_size if partial.is_file() else 0
    reason = error.strerror or str(error)
    todo = (
        "free space and run again to resume"
        if error.errno in (errno.ENOSPC, errno.EDQUOT)
        else "fix that and run again to resume"
    )
    return DownloadError(
        f"{url}: cannot write {partial} ({reason}); the {kept} bytes received so far are kept "
        f"in it: {todo}"
    )


def _verify(part: _Partial, url: str, total: int | None, md5: str | None) -> str:
    """Size and MD5 of the finished partial file; a bad file is deleted."""
    if total is not None and part.size != total:
        part.path.unlink()
        part.forget()
        raise DownloadError(f"{url}: got {part.size} bytes, the server announced {total}")
    actual: str = part.digest.hexdigest()
    if md5 is not None and actual != md5:
        part.path.unlink()
        part.forget()
        raise _md5_mismatch(url, md5, actual, f"{part.path} was removed")
    return actual


def remote_size(url: str, *, timeout: float = 30.0) -> int | None:
    """The size of the file at ``url`` in bytes, or None if the server does not say.

    HEAD first, then a one-byte ranged GET (some servers refuse HEAD). A 4xx raises
    DownloadError (the URL is wrong: better to say so before checking disk space); a network
    error or 5xx gives None, and the download's own retries deal with it.
    """
    pool = _pool()
    limit = _timeout(timeout, timeout)
    for method, headers in (("HEAD", {}), ("GET", {"Range": "bytes=0-0"})):
        try:
            response = _request(pool, method, url, headers, limit)
        except _Transient:
            return None
        except DownloadError:
            if method == "HEAD":
                continue
            raise
        try:
            if response.status in (206, 416):  # 416: an empty file has no byte 0
                return _content_range(response)[1]
            if response.status == 200:
                size = _header_int(response, "Content-Length")
                if size is not None:
                    return size
        finally:
            response.release_conn()
    return None


def human_size(size: float) -> str:
    # Powers of 1024, as `df -h` shows them and as the data sets quote their sizes
    # (DIODE's "81 GB" train archive is 86.7e9 bytes).
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TB"


def free_bytes(folder: Path) -> int:
    """Bytes free for an unprivileged user on the filesystem that holds (or will hold) folder."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    stats = os.statvfs(existing)
    return stats.f_bavail * stats.f_frsize


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Raise DepthpipeError if ``folder``'s filesystem has less than ``needed_bytes`` free."""
    free = free_bytes(folder)
    if needed_bytes > free:
        raise DepthpipeError(
            f"{what} needs {human_size(needed_bytes)} at {folder} but only {human_size(free)} "
            "is free"
        )


class _HashingStream(io.RawIOBase):
    """The response body as a file, hashing every byte read; remembers a network failure.

    The failure is kept because the caller's ``extract`` may wrap or swallow the exception; the
    retry decision must not depend on how it reports errors.
    """

    def __init__(self, response: urllib3.BaseHTTPResponse, bar: Any) -> None:
        super().__init__()
        self._response = response
        self._bar = bar
        self.digest = hashlib.md5(usedforsecurity=False)
        self.size = 0
        self.failure: _Transient | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._response.read1(len(view), decode_content=False)
        except _NETWORK_ERRORS as error:
            self.failure = _Transient(f"connection lost at byte {self.size} ({error})")
            raise self.failure from error
        view[: len(data)] = data
        self.digest.update(data)
        self.size += len(data)
        self._bar.update(len(data))
        return len(data)


def _stream_once(
    pool: urllib3.PoolManager, s: _Settings, extract: Callable[[BinaryIO], T]
) -> tuple[T, str]:
    """One full pass: GET from byte 0, extract from the stream, drain the rest; (result, md5)."""
    response = _request(pool, "GET", s.url, {}, s.timeout)
    total = _header_int(response, "Content-Length")
    try:
        with _bar(s.label, total, 0, s.progress) as bar:
            raw = _HashingStream(response, bar)
            reader = io.BufferedReader(raw, CHUNK)
            try:
                result = extract(reader)
                # Bytes after the archive's end (tar padding) still belong to the file's MD5.
                while reader.read(CHUNK):
                    pass
            except Exception as error:
                if raw.failure is not None and error is not raw.failure:
                    raise raw.failure from error
                raise
    finally:
        response.release_conn()
    if total is not None and raw.size != total:
        raise _Transient(f"the stream ended at byte {raw.size} of {total}")
    return result, raw.digest.hexdigest()


def stream_extract(
    url: str,
    *,
    md5: str | None,
    extract: Callable[[BinaryIO], T],
    retries: int = 5,
    backoff_seconds: float = 1.0,
    stall_timeout: float = 60.0,
    progress: bool = True,
    label: str | None = None,
    connect_timeout: float = 30.0,
    discard: Callable[[], None] | None = None,
) -> tuple[T, str]:
    """Extract the archive at ``url`` while it downloads; return (extract's result, MD5).

    ``extract`` reads the body from the binary file it is given (e.g. ``extract_tar``). Nothing
    is stored, so nothing can be resumed: after a connection error, stall or 5xx the whole
    transfer starts again from byte 0 and **``extract`` is called again**. Each call must
    therefore start from scratch (write into a fresh folder, removing what an earlier call
    left). The MD5 covers every byte of the body, also those after what ``extract`` read. On an
    MD5 mismatch ``discard`` is called (it removes what ``extract`` wrote) and DownloadError is
    raised; without ``discard`` the caller must remove it, and the message says so.
    """
    name = label or url.rsplit("/", 1)[-1]
    md5 = md5.lower() if md5 else None
    settings = _Settings(
        url, name, retries, backoff_seconds, _timeout(connect_timeout, stall_timeout), progress
    )
    pool = _pool()
    # Every restart repeats the whole transfer, so no attempt counts as progress.
    result, actual = _with_retries(
        lambda: _stream_once(pool, settings, extract), settings, progress_made=lambda: False
    )
    if md5 is not None and actual != md5:
        if discard is None:
            raise _md5_mismatch(url, md5, actual, "what was extracted from it must be removed")
        discard()
        raise _md5_mismatch(url, md5, actual, "what was extracted from it was removed")
    if md5 is None:
        _announce_md5(name, actual)
    return result, actual
