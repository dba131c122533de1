"""fetch with real-data sources: ``official`` against servers on loopback serving small archives
with DIODE's and MegaDepth's real layouts, and ``local`` against folders on disk.

The "release" is made by the synthetic source itself (both DIODE domains): its raw folders are
what a local copy looks like, and they are packed into train.tar.gz, val.tar.gz and a
MegaDepth_v1.tar.gz nested under MegaDepth's long prefix with depth .h5 files beside the photos.
So "the same downstream behaviour as the synthetic source" is checked byte for byte: every
source must produce exactly the synthetic source's raw folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from depthpipe.config import load_params
from depthpipe.data import diode, megadepth, official
from depthpipe.data.download import DownloadError
from depthpipe.errors import DepthpipeError
from depthpipe.paths import ProjectPaths, project_paths
from depthpipe.stages import fetch, fingerprint, preprocess
from tests.helpers import run_module, save_untrained_model, write_params
from tests.servers import Faults, FaultServer, S3Server

pytest_plugins = ("tests.servers",)

BOTH = [diode.OUTDOOR, diode.INDOORS]
# The release: per domain 3 train scenes and 1 val scene, 1 scan of 2 views each.
RELEASE_PARAMS: dict[str, Any] = {
    "data": {
        "diode_domains": BOTH,
        "synthetic": {"train_scenes": 3, "val_scenes": 1, "views_per_scan": 2},
    }
}
MEGADEPTH_PREFIX = "phoenix/S6/zl548/MegaDepth_v1"


def digest(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder``."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def tar_gz(members: dict[str, bytes]) -> bytes:
    """A tar.gz with a folder entry before the files of each folder, as tar writes them."""
    buffer = io.BytesIO()
    folders: set[str] = set()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            parts = name.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                if folder not in folders:
                    folders.add(folder)
                    info = tarfile.TarInfo(folder)
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass(frozen=True)
class Release:
    """The synthetic source's output and the archives and manifest made from it."""

    project: Path  # fetched with source synthetic and preprocessed
    diode: Path  # its data/raw/diode: a local DIODE copy
    megadepth: Path  # its data/raw/megadepth: a local MegaDepth copy (holds MegaDepth_v1/)
    manifest: Path
    archives: dict[str, bytes]  # train, val, megadepth

    def files(self, split: str) -> dict[str, bytes]:
        base = self.diode / split
        return {
            f"{split}/{p.relative_to(base).as_posix()}": p.read_bytes()
            for p in sorted(base.rglob("*"))
            if p.is_file()
        }

    def without(self, split: str, drop: Callable[[str], bool]) -> bytes:
        """The split's archive without the members ``drop`` picks."""
        return tar_gz({n: d for n, d in self.files(split).items() if not drop(n)})


def _manifest(diode_dir: Path) -> dict[str, Any]:
    """diode_meta.json's format: split -> domain -> scene -> scan -> stems."""
    listing: dict[str, Any] = {"train": {}, "val": {}}
    for files in diode.list_samples(diode_dir, "train"):
        scans = listing["train"].setdefault(files.domain, {}).setdefault(files.scene, {})
        scans.setdefault(files.scan, []).append(files.stem)
    return listing


@pytest.fixture(scope="session")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    root = tmp_path_factory.mktemp("release")
    write_params(root, RELEASE_PARAMS)
    paths = project_paths(root)
    params = load_params(paths.params)
    fetch.run(params, paths)
    preprocess.run(params, paths)
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps(_manifest(paths.raw_diode)))
    photos = {}
    for path in megadepth.list_images(paths.raw_megadepth / megadepth.ROOT_DIR):
        relative = path.relative_to(paths.raw_megadepth / megadepth.ROOT_DIR).as_posix()
        photos[f"{MEGADEPTH_PREFIX}/{relative}"] = path.read_bytes()
        depth = relative.replace("/imgs/", "/depths/").replace(".jpg", ".h5")
        photos[f"{MEGADEPTH_PREFIX}/{depth}"] = b"HDF5 depth map: never extracted"
    result = Release(root, paths.raw_diode, paths.raw_megadepth, manifest, {})
    result.archives.update(
        train=tar_gz(result.files("train")),
        val=tar_gz(result.files("val")),
        megadepth=tar_gz(photos),
    )
    return result


@pytest.fixture
def manifest(release: Release, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Check DIODE train against the release's manifest (the real one lists 25,458 samples)."""
    monkeypatch.setenv(diode.MANIFEST_ENV, str(release.manifest))
    return release.manifest


def official_params(urls: dict[str, str], **settings: Any) -> dict[str, Any]:
    """``data`` overrides for source official; DIODE's MD5s pinned like the real ones, none for
    MegaDepth (not published)."""

    def archive(name: str, pinned: str | None) -> dict[str, str | None]:
        return {"url": urls[name], "md5": pinned}

    return {
        "data": {
            **RELEASE_PARAMS["data"],
            "source": "official",
            "official": {
                "diode_train": archive("train", settings.pop("train_md5", None)),
                "diode_val": archive("val", settings.pop("val_md5", None)),
                "megadepth": archive("megadepth", None),
                **settings,
            },
        }
    }


def pinned(release: Release) -> dict[str, str]:
    return {"train_md5": md5(release.archives["train"]), "val_md5": md5(release.archives["val"])}


def serve(s3: S3Server, release: Release, prefix: str, **replace: bytes) -> dict[str, str]:
    """Upload the archives (some replaced) under ``prefix``; their anonymous URLs."""
    names = {"train": "train.tar.gz", "val": "val.tar.gz", "megadepth": "MegaDepth_v1.tar.gz"}
    return {
        key: s3.put(f"{prefix}/{name}", replace.get(key, release.archives[key]))
        for key, name in names.items()
    }


def project(root: Path, *overrides: dict[str, Any]) -> tuple[Any, ProjectPaths]:
    root.mkdir(parents=True, exist_ok=True)
    write_params(root, *overrides)
    paths = project_paths(root)
    return load_params(paths.params), paths


def assert_nothing_published(paths: ProjectPaths) -> None:
    """No fetch output and no half-written staging folder (the fingerprint stage's file may
    be there: it is another stage's output)."""
    raw = paths.raw_diode.parent
    found = sorted(p.name for p in raw.iterdir()) if raw.exists() else []
    assert [name for name in found if name != paths.local_fingerprint.name] == [], found


def work_files(paths: ProjectPaths) -> list[str]:
    return sorted(
        p.relative_to(paths.fetch_workdir).as_posix()
        for p in paths.fetch_workdir.rglob("*")
        if p.is_file()
    )


# -- official -------------------------------------------------------------------------------


def test_fetch_official__stream_gives_the_synthetic_layout_without_archives(
    release: Release, seaweedfs: S3Server, manifest: Path, tmp_path: Path
) -> None:
    urls = serve(seaweedfs, release, "stream")
    params, paths = project(tmp_path, official_params(urls, stream=True, **pinned(release)))

    counts = fetch.run(params, paths)

    assert digest(paths.raw_diode) == digest(release.diode)
    assert digest(paths.raw_megadepth) == digest(release.megadepth)  # photos only, no .h5
    assert counts == {"diode_train": 12, "diode_val": 4, "megadepth": 8}
    report = json.loads(paths.fetch_report.read_text())
    assert report["source"] == "official" and report["counts"] == counts
    assert report["diode"]["train"] == {"outdoor": 6, "indoors": 6}
    archives = report["archives"]
    assert archives["megadepth"]["md5"] == md5(release.archives["megadepth"])
    assert archives["megadepth"]["md5_pinned"] is False
    assert archives["diode_train"]["md5_pinned"] is True and archives["diode_train"]["stream"]
    assert archives["megadepth"]["skipped"] == 8  # the depth maps
    kept = work_files(paths)
    assert not any(name.startswith("archives/") for name in kept), kept  # none ever landed


def test_fetch_official__wrong_md5_exits_2_extracts_nothing_removes_the_file(
    release: Release, seaweedfs: S3Server, manifest: Path, tmp_path: Path
) -> None:
    urls = serve(seaweedfs, release, "wrong-md5")
    wrong = {"train_md5": "0" * 32, "val_md5": md5(release.archives["val"])}
    _, paths = project(tmp_path, official_params(urls, **wrong))

    result = run_module(
        "depthpipe.stages.fetch", cwd=tmp_path, env={diode.MANIFEST_ENV: str(manifest)}
    )

    assert result.returncode == 2, result.stderr
    assert f"{urls['train']}: MD5 mismatch: expected {'0' * 32}" in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_published(paths)
    # val was fine: its checked extraction waits for the rerun; train left nothing behind
    left = work_files(paths)
    assert not any("diode_train" in name for name in left), left
    assert any(name.startswith("extracted/diode_val-") for name in left), left


def test_fetch_official__rerun_reuses_what_an_interrupted_run_finished(
    release: Release, fault_server: FaultServer, manifest: Path, tmp_path: Path
) -> None:
    """The first run dies on a bad MegaDepth archive after both DIODE archives were extracted;
    the rerun with the right one downloads nothing of DIODE again."""
    urls = {
        "train": fault_server.add("train.tar.gz", release.archives["train"]),
        "val": fault_server.add("val.tar.gz", release.archives["val"]),
        "megadepth": fault_server.add("md.tar.gz", release.archives["train"]),  # no photos
    }
    params, paths = project(tmp_path, official_params(urls, **pinned(release)))
    with pytest.raises(DepthpipeError, match=r"megadepth \(.*md.tar.gz\) has no MegaDepth_v1/"):
        fetch.run(params, paths)
    assert_nothing_published(paths)

    urls["megadepth"] = fault_server.add("md2.tar.gz", release.archives["megadepth"])
    params, paths = project(tmp_path, official_params(urls, **pinned(release)))
    fetch.run(params, paths)

    assert digest(paths.raw_diode) == digest(release.diode)
    assert [r.status for r in fault_server.requests("train.tar.gz")] == [200]
    assert [r.status for r in fault_server.requests("val.tar.gz")] == [200]
    kept = work_files(paths)
    assert not any(name.startswith("archives/") for name in kept), kept  # deleted once extracted


def test_fetch_official__404_names_the_url_and_writes_nothing(
    release: Release, fault_server: FaultServer, manifest: Path, tmp_path: Path
) -> None:
    urls = {
        "train": fault_server.add("train.tar.gz", release.archives["train"]),
        "val": fault_server.add("val.tar.gz", b"", Faults(status=404)),
        "megadepth": fault_server.add("md.tar.gz", release.archives["megadepth"]),
    }
    params, paths = project(tmp_path, official_params(urls))

    with pytest.raises(DepthpipeError, match=rf"{urls['val']}: the server answered HTTP 404"):
        fetch.run(params, paths)

    assert_nothing_published(paths)
    assert fault_server.requests("train.tar.gz") == []  # refused before any download


def test_fetch_official__archive_without_a_requested_domain(
    release: Release, fault_server: FaultServer, manifest: Path, tmp_path: Path
) -> None:
    outdoor_only = release.without("val", lambda name: "/indoors/" in name)
    urls = {
        "train": fault_server.add("train.tar.gz", release.archives["train"]),
        "val": fault_server.add("val.tar.gz", outdoor_only),
        "megadepth": fault_server.add("md.tar.gz", release.archives["megadepth"]),
    }
    params, paths = project(tmp_path, official_params(urls))

    with pytest.raises(
        DepthpipeError,
        match=r"diode_val \(.*val.tar.gz\) has no val/indoors/ samples, but data.diode_domains "
        "lists indoors",
    ):
        fetch.run(params, paths)

    assert_nothing_published(paths)
    # The verified archive stays for a rerun with other domains; nothing extracted stays.
    assert [f.split("-")[0] for f in work_files(paths)] == ["archives/diode_val"]


def test_fetch_official__manifest_check_names_the_missing_file(
    release: Release, fault_server: FaultServer, manifest: Path, tmp_path: Path
) -> None:
    missing = sorted(n for n in release.files("train") if n.endswith("_depth_mask.npy"))[3]
    urls = {
        "train": fault_server.add("train.tar.gz", release.without("train", missing.__eq__)),
        "val": fault_server.add("val.tar.gz", release.archives["val"]),
        "megadepth": fault_server.add("md.tar.gz", release.archives["megadepth"]),
    }
    params, paths = project(tmp_path, official_params(urls))

    with pytest.raises(DepthpipeError) as error:
        fetch.run(params, paths)

    message = str(error.value)
    assert f"1 of the 36 files the DIODE manifest ({manifest}) lists for train" in message
    assert message.endswith(missing.removeprefix("train/"))
    assert_nothing_published(paths)


def test_fetch_official__stream_with_a_wrong_md5_keeps_nothing_of_that_archive(
    release: Release, fault_server: FaultServer, manifest: Path, tmp_path: Path
) -> None:
    urls = {key: fault_server.add(f"{key}.tar.gz", data) for key, data in release.archives.items()}
    wrong = {"train_md5": "0" * 32, "val_md5": md5(release.archives["val"])}
    params, paths = project(tmp_path, official_params(urls, stream=True, **wrong))

    with pytest.raises(DownloadError) as error:
        fetch.run(params, paths)

    assert str(error.value) == (
        f"{urls['train']}: MD5 mismatch: expected {'0' * 32}, got {md5(release.archives['train'])}"
        " (what was extracted from it was removed); the server's file differs from the pinned "
        "one, or the transfer was corrupted: run again, and if it persists check the URL and md5 "
        "in params.yaml"
    )
    # train was extracted completely before the MD5 was known: neither the folder nor a staging
    # folder is left; val (right MD5) waits for the rerun; nothing reached data/raw.
    extracted = sorted(p.name for p in (paths.fetch_workdir / "extracted").iterdir())
    assert [name.split("-")[0] for name in extracted] == ["diode_val", "diode_val"], extracted
    assert not (paths.fetch_workdir / "archives").exists()
    assert_nothing_published(paths)


@contextlib.contextmanager
def small_disk(folder: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``folder`` (needs root or CAP_SYS_ADMIN)."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("a small filesystem is made with Linux's mount -t tmpfs")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        # Lazy (-l) if a file is still open: the mount must never outlive the test.
        if subprocess.run(["umount", str(folder)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int) -> Callable[[], None]:
    """What another program does while a download runs: fill the disk up to ``leave`` bytes."""

    def run() -> None:
        stats = os.statvfs(folder)
        free = stats.f_bavail * stats.f_frsize
        with (folder / "filler").open("wb") as f:
            f.truncate(0)
            f.write(b"\0" * max(0, free - leave))

    return run


def room_for(release: Release) -> int:
    """Bytes a tmpfs needs for a whole fetch of the release (archives and extractions), twice:
    the free-space check passes whatever its estimate."""
    archives = sum(len(data) for data in release.archives.values())
    extracted = sum(p.stat().st_size for p in release.diode.parent.rglob("*") if p.is_file())
    return 2 * (archives + extracted) + 2**20


SIZE_IN_MESSAGE = re.compile(r"([\d.]+) ([KMGT]?B)")
SCALE = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def as_bytes(text: str) -> float:
    match = SIZE_IN_MESSAGE.fullmatch(text)
    assert match is not None, text
    return float(match[1]) * SCALE[match[2]]


def test_fetch_official__too_little_disk_is_refused_before_any_get(
    release: Release, fault_server: FaultServer, manifest: Path, tmp_path: Path
) -> None:
    urls = {key: fault_server.add(f"{key}.tar.gz", data) for key, data in release.archives.items()}
    params, paths = project(tmp_path, official_params(urls))
    archives = official.plan(params.data)
    keys = {"diode_train": "train", "diode_val": "val", "megadepth": "megadepth"}
    sizes = {a.name: len(release.archives[keys[a.name]]) for a in archives}
    needed = max(sizes.values()) + sum(round(sizes[a.name] * a.expansion) for a in archives)

    with small_disk(paths.fetch_workdir.parent, 64 * 1024), pytest.raises(DepthpipeError) as error:
        fetch.run(params, paths)

    match = re.fullmatch(
        r"fetch \((.+) to download \+ about (.+) extracted\) needs (.+) at (.+) but only (.+) is "
        "free",
        str(error.value),
    )
    assert match is not None, str(error.value)
    assert match[4] == str(paths.fetch_workdir)
    assert as_bytes(match[1]) == pytest.approx(max(sizes.values()), rel=0.01)
    assert as_bytes(match[3]) == pytest.approx(needed, rel=0.01)
    assert as_bytes(match[5]) == 64 * 1024  # the tmpfs, empty
    assert {r.method for r in fault_server.log} == {"HEAD"}  # sizes asked, no GET at all
    assert_nothing_published(paths)


def test_fetch_official__disk_filling_up_during_the_download_keeps_the_partial_file(
    release: Release, fault_server: FaultServer, manifest: Path, tmp_path: Path
) -> None:
    """The free-space check passes, then another program fills the disk while DIODE train
    downloads: a one-line error (no traceback), nothing in data/raw, and once space is freed
    the rerun resumes from the bytes kept."""
    train = release.archives["train"]
    work = tmp_path / ".depthpipe"
    urls = {key: fault_server.add(f"{key}.tar.gz", data) for key, data in release.archives.items()}
    faults = Faults(before_first_body=fill(work, leave=len(train) // 2))
    urls["train"] = fault_server.add("train.tar.gz", train, faults)
    params, paths = project(tmp_path, official_params(urls, **pinned(release)))
    partial = official.WorkFolder(paths.fetch_workdir).archive(official.plan(params.data)[1])
    partial = partial.with_name(partial.name + ".partial")

    with small_disk(work, room_for(release)):
        result = run_module(
            "depthpipe.stages.fetch", cwd=tmp_path, env={diode.MANIFEST_ENV: str(manifest)}
        )
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        match = re.search(
            rf"{re.escape(urls['train'])}: cannot write {re.escape(str(partial))} \(No space left "
            r"on device\); the (\d+) bytes received so far are kept in it: free space and run "
            "again to resume",
            result.stderr,
        )
        assert match is not None, result.stderr
        kept = int(match[1])
        assert 0 < kept < len(train) and partial.stat().st_size == kept
        assert_nothing_published(paths)

        (work / "filler").unlink()
        fetch.run(params, paths)

    first, second = fault_server.requests("train.tar.gz")
    assert first.range is None
    assert (second.range, second.status) == (f"bytes={kept}-", 206)
    assert second.sent == len(train) - kept  # the kept bytes were not fetched again
    assert digest(paths.raw_diode) == digest(release.diode)


def test_fetch_official__disk_filling_up_during_a_streamed_extraction(
    release: Release, fault_server: FaultServer, manifest: Path, tmp_path: Path
) -> None:
    work = tmp_path / ".depthpipe"
    urls = {key: fault_server.add(f"{key}.tar.gz", data) for key, data in release.archives.items()}
    faults = Faults(before_first_body=fill(work, leave=8192))
    urls["train"] = fault_server.add("train.tar.gz", release.archives["train"], faults)
    params, paths = project(tmp_path, official_params(urls, stream=True))

    with small_disk(work, room_for(release)), pytest.raises(DepthpipeError) as error:
        fetch.run(params, paths)

    message = str(error.value)
    assert "No space left on device" in message, message
    assert message.endswith("nothing of this extraction is kept: free space and run again")
    assert not any("diode_train" in name for name in work_files(paths))
    assert_nothing_published(paths)


def test_fetch_official__rerun_relinks_the_kept_extractions_without_downloading(
    release: Release, fault_server: FaultServer, manifest: Path, tmp_path: Path
) -> None:
    """fetch re-runs on any change to its code or data params: that must not download the
    archives again (283 GB for real), only link the kept extractions once more."""
    urls = {key: fault_server.add(f"{key}.tar.gz", data) for key, data in release.archives.items()}
    params, paths = project(tmp_path, official_params(urls, **pinned(release)))
    counts = fetch.run(params, paths)
    first = (digest(paths.raw_diode), digest(paths.raw_megadepth))
    served = len(fault_server.log)

    report = json.loads(paths.fetch_report.read_text())
    files = 3 * (counts["diode_train"] + counts["diode_val"]) + counts["megadepth"]
    assert report["link"] == {"hardlink": files}  # /tmp is one filesystem without reflinks
    photo = next(paths.raw_megadepth.rglob("*.jpg"))
    kept = [p for p in (paths.fetch_workdir / "extracted").rglob(photo.name)]
    assert len(kept) == 1 and kept[0].stat().st_ino == photo.stat().st_ino

    counts_again = fetch.run(params, paths)  # e.g. after a change to the code

    assert fault_server.log[served:] == []  # not even a HEAD: nothing was pending
    assert counts_again == counts
    assert (digest(paths.raw_diode), digest(paths.raw_megadepth)) == first
    assert digest(paths.raw_diode) == digest(release.diode)

    subset = {"data": {"megadepth_max_images": 3}}
    params, paths = project(tmp_path, official_params(urls, **pinned(release)), subset)
    assert fetch.run(params, paths)["megadepth"] == 3
    assert fault_server.log[served:] == []
    extraction = official.WorkFolder(paths.fetch_workdir).extraction(official.plan(params.data)[2])
    assert len(list(extraction.rglob("*.jpg"))) == 8  # the subset only left photos unlinked


def test_fetch_official__a_failure_while_publishing_keeps_the_extractions(
    release: Release,
    fault_server: FaultServer,
    manifest: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure after the files were linked into the staging folders (here: counting them)
    loses nothing: the rerun downloads nothing."""
    urls = {key: fault_server.add(f"{key}.tar.gz", data) for key, data in release.archives.items()}
    params, paths = project(tmp_path, official_params(urls, **pinned(release)))

    def broken(*_: Any) -> fetch.Counts:
        raise DepthpipeError("failed after linking")

    with monkeypatch.context() as patch:
        patch.setattr(fetch, "_counts", broken)
        with pytest.raises(DepthpipeError, match="failed after linking"):
            fetch.run(params, paths)
    assert_nothing_published(paths)
    served = len(fault_server.log)

    fetch.run(params, paths)

    assert fault_server.log[served:] == []
    assert digest(paths.raw_diode) == digest(release.diode)
    assert digest(paths.raw_megadepth) == digest(release.megadepth)


# -- local ----------------------------------------------------------------------------------


def local_params(diode_dir: Path, megadepth_dir: Path) -> dict[str, Any]:
    return {
        "data": {
            **RELEASE_PARAMS["data"],
            "source": "local",
            "local": {"diode": str(diode_dir), "megadepth": str(megadepth_dir)},
        }
    }


def run_local(params: Any, paths: ProjectPaths) -> fetch.Counts:
    fingerprint.run(params, paths)  # what dvc repro runs first
    return fetch.run(params, paths)


def test_fetch_local__links_the_synthetic_layout(
    release: Release, manifest: Path, tmp_path: Path
) -> None:
    params, paths = project(tmp_path / "p", local_params(release.diode, release.megadepth))

    counts = run_local(params, paths)

    assert digest(paths.raw_diode) == digest(release.diode)
    assert digest(paths.raw_megadepth) == digest(release.megadepth)
    report = json.loads(paths.fetch_report.read_text())
    files = counts["diode_train"] * 3 + counts["diode_val"] * 3 + 8
    # /tmp is one filesystem without reflinks (ext4 here): every file is a hard link to the copy
    assert report["link"] == {"hardlink": files}
    assert same_inodes(paths.raw_diode, release.diode) == files - 8
    assert same_inodes(paths.raw_megadepth, release.megadepth) == 8
    assert report["fingerprint"]["diode"]["files"] == 48


def same_inodes(linked: Path, source: Path) -> int:
    """How many files under ``linked`` are the very file (inode) at the same place in source."""
    pairs = [(p, source / p.relative_to(linked)) for p in linked.rglob("*") if p.is_file()]
    return sum(os.path.samefile(a, b) for a, b in pairs)


def test_fetch_local__a_folder_on_another_filesystem_is_copied_the_other_still_linked(
    release: Release, manifest: Path, tmp_path: Path
) -> None:
    """DIODE on a small tmpfs (a hard link across filesystems fails with EXDEV), MegaDepth
    beside the project: the failure on one device must not turn the other's links into copies."""
    with small_disk(tmp_path / "other-disk", room_for(release)) as disk:
        shutil.copytree(release.diode, disk / "diode")
        params, paths = project(tmp_path / "p", local_params(disk / "diode", release.megadepth))
        counts = run_local(params, paths)

        report = json.loads(paths.fetch_report.read_text())
        diode_files = 3 * (counts["diode_train"] + counts["diode_val"])
        assert report["link"] == {"copy": diode_files, "hardlink": 8}
        assert same_inodes(paths.raw_diode, disk / "diode") == 0
        assert same_inodes(paths.raw_megadepth, release.megadepth) == 8
        assert digest(paths.raw_diode) == digest(release.diode)


def test_fetch_local__wrong_layout_names_the_first_thing_missing(
    release: Release, manifest: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "diode"
    shutil.copytree(release.diode / "train", copy / "train")  # no val/
    params, paths = project(tmp_path / "p", local_params(copy, release.megadepth))
    with pytest.raises(DepthpipeError, match=rf"data.local.diode: {copy}/val not found"):
        run_local(params, paths)

    shutil.copytree(release.diode / "val" / "outdoor", copy / "val" / "outdoor")  # no indoors
    with pytest.raises(DepthpipeError, match=r"val/indoors not found \(data.diode_domains"):
        run_local(params, paths)

    params, paths = project(tmp_path / "p", local_params(release.diode, release.diode))
    with pytest.raises(DepthpipeError, match=r"data.local.megadepth: .* holds neither"):
        run_local(params, paths)
    assert_nothing_published(paths)


def test_fetch_local__a_file_the_manifest_lists_is_missing(
    release: Release, manifest: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "diode"
    shutil.copytree(release.diode, copy)
    gone = sorted((copy / "train" / "indoors").rglob("*.png"))[0]
    gone.unlink()
    params, paths = project(tmp_path / "p", local_params(copy, release.megadepth))

    with pytest.raises(DepthpipeError, match=gone.relative_to(copy / "train").as_posix()):
        run_local(params, paths)
    assert_nothing_published(paths)


def test_fetch_local__changed_after_fingerprinting_is_refused(
    release: Release, manifest: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "megadepth"
    shutil.copytree(release.megadepth, copy)
    params, paths = project(tmp_path / "p", local_params(release.diode, copy))
    fingerprint.run(params, paths)
    next(copy.rglob("*.jpg")).write_bytes(b"edited after the fingerprint")

    with pytest.raises(DepthpipeError, match=r"data\.local changed since the fingerprint stage"):
        fetch.run(params, paths)
    assert_nothing_published(paths)


def test_diode_domains__any_order_gives_the_same_data_and_report(tmp_path: Path) -> None:
    outputs = []
    for order in (BOTH, BOTH[::-1]):
        params, paths = project(tmp_path / "-".join(order), {"data": {"diode_domains": order}})
        assert params.data.diode_domains == sorted(BOTH)
        fetch.run(params, paths)
        outputs.append((digest(paths.raw_diode), paths.fetch_report.read_bytes()))
    assert outputs[0] == outputs[1]


# -- MegaDepth subset -----------------------------------------------------------------------


def test_select_subset__deterministic_and_scene_balanced() -> None:
    sizes = {"0001": 10, "0002": 10, "0003": 2, "0004": 7}
    photos = [f"{s}/dense0/imgs/{i:04d}.jpg" for s, n in sizes.items() for i in range(n)]
    chosen = megadepth.select_subset(photos, 13, seed=0)

    assert chosen == megadepth.select_subset(list(reversed(photos)), 13, seed=0)
    per_scene = Counter(p.split("/")[0] for p in chosen)
    assert len(chosen) == 13 and per_scene["0003"] == 2  # a small scene gives all it has
    big = [per_scene[s] for s in ("0001", "0002", "0004")]
    assert max(big) - min(big) <= 1, per_scene
    assert megadepth.select_subset(photos, 13, seed=1) != chosen  # data.seed picks another
    assert megadepth.select_subset(photos, 0, seed=0) == sorted(photos)  # 0 = all
    assert megadepth.select_subset(photos, 100, seed=0) == sorted(photos)


def test_fetch__megadepth_max_images_keeps_the_same_balanced_subset(tmp_path: Path) -> None:
    subset = {"data": {"megadepth_max_images": 5}}  # TINY: 2 scenes of 4 photos
    kept = []
    for name in ("a", "b"):
        params, paths = project(tmp_path / name, subset)
        assert fetch.run(params, paths)["megadepth"] == 5
        kept.append(sorted(digest(paths.raw_megadepth)))
    assert kept[0] == kept[1]
    assert sorted(Counter(p.split("/")[1] for p in kept[0]).values()) == [2, 3]


# -- downstream -----------------------------------------------------------------------------


def test_preprocess__two_workers_write_the_same_bytes_as_one(
    fetched_project: Path, tmp_path: Path
) -> None:
    """Also when samples are skipped: the packed arrays are compacted the same way."""
    outputs = {}
    for workers in (1, 2):
        root = tmp_path / str(workers)
        shutil.copytree(fetched_project / "data" / "raw", root / "data" / "raw")
        params, paths = project(root, {"preprocess": {"workers": workers}})
        train = diode.list_samples(paths.raw_diode, "train")
        train[1].image.write_bytes(b"not a png")
        train[4].mask.unlink()
        report = preprocess.run(params, paths)
        assert len(report["skipped"]) == 2
        outputs[workers] = digest(root / "data" / "processed")
    assert outputs[1] == outputs[2] and len(outputs[1]) > 10


def test_both_domains__flow_through_preprocess_and_evaluate(
    release: Release, tmp_path: Path
) -> None:
    from depthpipe.model import ModelSpec
    from depthpipe.stages import evaluate

    root = shutil.copytree(release.project, tmp_path / "p")
    paths = project_paths(root)
    params = load_params(paths.params)
    report = json.loads(paths.preprocess_report.read_text())["diode"]
    for domain in BOTH:  # each domain split on its own: both on every side
        assert report["domains"][domain]["test"] == 2, report
        assert (
            report["domains"][domain]["train"] >= 2 and report["domains"][domain]["validation"] >= 2
        )
    spec = ModelSpec("resnet18", 48, 64, params.depth.min_depth, params.depth.max_depth)
    save_untrained_model(paths.finetune_dir("scratch"), spec, seed=1)
    save_untrained_model(paths.finetune_dir(params.aug), spec, seed=2)

    scores = evaluate.run(params, paths)

    assert scores["test_images"] == 4 and scores["test_scans"] == 2
    rows = paths.evaluate_per_image.read_text().splitlines()[1:]
    assert sorted(row.split(",")[0].split("_")[2] for row in rows) == sorted(BOTH * 2)


# -- through DVC ----------------------------------------------------------------------------


@pytest.mark.slow
def test_dvc_repro__official_then_local_give_the_synthetic_data_and_watch_the_folder(
    release: Release,
    seaweedfs: S3Server,
    manifest: Path,
    tmp_path: Path,
) -> None:
    """`dvc repro fetch preprocess` in a git repo: official from the S3 server gives the
    synthetic source's data and packed splits; local with the same files re-runs fetch only
    (preprocess's inputs are unchanged); a changed local folder shows up in `dvc status` after
    the fingerprint stage and re-runs fetch."""
    from tests.e2e import dvc, make_repo, ran

    root = make_repo(tmp_path / "project")
    paths = project_paths(root)
    urls = serve(seaweedfs, release, "dvc")
    write_params(root, official_params(urls, **pinned(release)))

    output = dvc("repro", "fetch", "preprocess", cwd=root)

    assert ran(output) == {"fingerprint", "fetch", "preprocess"}, output[-3000:]
    assert digest(paths.raw_diode) == digest(release.diode)
    assert digest(paths.raw_megadepth) == digest(release.megadepth)
    synthetic = project_paths(release.project)
    assert digest(paths.processed_diode) == digest(synthetic.processed_diode)
    assert paths.preprocess_report.read_bytes() == synthetic.preprocess_report.read_bytes()
    megadepth_md5 = md5(release.archives["megadepth"])
    assert f"megadepth md5 {megadepth_md5}: pin it as data.official.megadepth.md5" in output
    assert not any(name.startswith("archives/") for name in work_files(paths))

    local_copy = tmp_path / "local"
    shutil.copytree(release.diode, local_copy / "diode")
    shutil.copytree(release.megadepth, local_copy / "megadepth")
    write_params(root, local_params(local_copy / "diode", local_copy / "megadepth"))
    output = dvc("repro", "fetch", "preprocess", cwd=root)
    assert ran(output) == {"fingerprint", "fetch"}, output[-3000:]  # same raw data
    assert json.loads(paths.fetch_report.read_text())["source"] == "local"
    assert ran(dvc("repro", "fetch", "preprocess", cwd=root)) == {"fingerprint"}

    photo = next((local_copy / "megadepth").rglob("*.jpg"))
    shutil.copy(photo, photo.with_name("1234567890_0123456789_o.jpg"))  # a new photo
    dvc("repro", "fingerprint", cwd=root)
    status = dvc("status", "fetch", cwd=root)
    assert "fetch:" in status and "local_fingerprint.json" in status, status
    output = dvc("repro", "fetch", "preprocess", cwd=root)
    assert ran(output) == {"fingerprint", "fetch", "preprocess"}, output[-3000:]
    assert json.loads(paths.preprocess_report.read_text())["megadepth"]["images"] == 9
