"""``source: official``: the published DIODE and MegaDepth archives, downloaded and extracted.

Everything happens in a work folder outside every DVC output (``.depthpipe/fetch/``), so an
interrupted fetch resumes where it stopped:

    archives/<name>-<url hash>-<file>        the download (``.partial`` until verified)
    extracted/<name>-<selection hash>/       a complete, checked extraction
    extracted/<name>-<selection hash>.json   its record (URL, size, MD5, counts)

An archive is deleted as soon as its extraction is complete and checked (unless
``keep_archives``), and a rerun reuses every extraction that has its record, so no archive is
downloaded twice. The extractions stay after fetch succeeded: data/raw gets reflinks or hard
links to their files (a copy where neither works), so a rerun of fetch (a code change, another
``data.seed``) re-links in seconds instead of downloading 283 GB again.

Extraction keeps only what the params select: the DIODE domains listed in
``data.diode_domains`` (``<split>/<domain>/scene_*/scan_*/`` sample files) and MegaDepth's
photos (``.../MegaDepth_v1/<scene>/dense*/imgs/*.jpg``, never the depth ``.h5`` files).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from depthpipe.config import ArchiveConfig, DataConfig
from depthpipe.data import diode, megadepth
from depthpipe.data.archive import Extracted, extract_tar, find_component
from depthpipe.data.download import (
    check_free_space,
    download_file,
    human_size,
    remote_size,
    stream_extract,
)
from depthpipe.errors import DepthpipeError
from depthpipe.paths import DIODE_TRAIN_SPLIT, DIODE_VAL_SPLIT

# Estimated bytes extracted per byte of archive, for the free-space check before any download
# (an estimate on the generous side: running out of disk after hours is worse than a warning).
# DIODE: per sample a 1024x768 float32 depth (3.1 MB) and mask (3.1 MB) and a PNG (~1.5 MB),
# ~7.8 MB; 25,458 train samples are ~199 GB from the 86.7 GB archive: x2.3, rounded up to 2.4.
DIODE_EXPANSION = 2.4
# MegaDepth: only the photos are kept, 128,228 JPEGs of ~0.6 MB (long side up to ~1600 px),
# ~77 GB of the ~199 GB archive (the rest is depth .h5): x0.39, rounded up to 0.4.
MEGADEPTH_EXPANSION = 0.4
# Share of DIODE's samples per domain (facts: train 16,884 outdoor + 8,574 indoors; val 446 +
# 325), to scale the estimate when one domain is selected.
DIODE_DOMAIN_SHARE = {
    DIODE_TRAIN_SPLIT: {diode.OUTDOOR: 16884 / 25458, diode.INDOORS: 8574 / 25458},
    DIODE_VAL_SPLIT: {diode.OUTDOOR: 446 / 771, diode.INDOORS: 325 / 771},
}


@dataclass(frozen=True)
class Archive:
    """One archive to fetch and what to keep of it."""

    name: str  # the params key: diode_train, diode_val, megadepth
    url: str
    md5: str | None
    selection: str  # what select() keeps, in words: part of the extraction's folder name
    select: Callable[[str], str | None]
    expansion: float  # estimated extracted bytes per archive byte
    check: Callable[[Path, Extracted, str], None]  # raises if the extraction lacks something


@dataclass(frozen=True)
class Record:
    """What the fetch report says about one archive."""

    url: str
    size: int | None  # bytes of the archive, if the server said
    md5: str  # computed over every byte received
    md5_pinned: bool  # false: params had md5 null, so nothing was checked: pin this one
    files: int  # extracted
    bytes: int  # extracted
    skipped: int  # regular files the selection left out
    stream: bool
    resumed_from: int | None  # bytes of an earlier partial download kept (None: streamed)
    restarts: int | None  # requests after the first (None: streamed)


def _diode_select(split: str, domains: Sequence[str]) -> Callable[[str], str | None]:
    def select(member: str) -> str | None:
        parts = member.removeprefix("./").split("/")
        if parts[0] != split:
            return None
        return diode.sample_file_path(parts[1:], domains)

    return select


def _megadepth_select(member: str) -> str | None:
    parts = find_component(member, megadepth.ROOT_DIR)
    return megadepth.photo_path(parts) if parts is not None else None


def _diode_check(split: str, domains: Sequence[str]) -> Callable[[Path, Extracted, str], None]:
    """Every listed domain is there; train also holds every file the manifest lists."""

    def check(folder: Path, _: Extracted, label: str) -> None:
        for domain in domains:
            if not (folder / domain).is_dir():
                raise DepthpipeError(
                    f"{label} has no {split}/{domain}/ samples, but data.diode_domains lists "
                    f"{domain}: is the URL right? (nothing of it was kept)"
                )
        if split == DIODE_TRAIN_SPLIT:
            present = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            diode.check_manifest(present, split, domains, label)

    return check


def _megadepth_check(_: Path, extracted: Extracted, label: str) -> None:
    if extracted.files == 0:
        raise DepthpipeError(
            f"{label} has no {megadepth.ROOT_DIR}/<scene>/dense*/imgs/*.jpg photos: is the URL "
            "right? (nothing of it was kept)"
        )


def plan(data: DataConfig) -> list[Archive]:
    """The three archives in fetch order: the small DIODE val first, so a wrong URL or domain
    shows up after 2.6 GB, not 81 GB."""
    official, domains = data.official, data.diode_domains

    def diode_archive(name: str, config: ArchiveConfig, split: str) -> Archive:
        share = sum(DIODE_DOMAIN_SHARE[split][d] for d in domains)
        return Archive(
            name=name,
            url=config.url,
            md5=config.md5,
            selection=f"{split}/{'+'.join(domains)}",
            select=_diode_select(split, domains),
            expansion=DIODE_EXPANSION * share,
            check=_diode_check(split, domains),
        )

    return [
        diode_archive("diode_val", official.diode_val, DIODE_VAL_SPLIT),
        diode_archive("diode_train", official.diode_train, DIODE_TRAIN_SPLIT),
        Archive(
            name="megadepth",
            url=official.megadepth.url,
            md5=official.megadepth.md5,
            selection="photos",
            select=_megadepth_select,
            expansion=MEGADEPTH_EXPANSION,
            check=_megadepth_check,
        ),
    ]


def _short_hash(*parts: str | None) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class WorkFolder:
    """Where one fetch keeps its downloads and extractions between runs."""

    root: Path

    def archive(self, a: Archive) -> Path:
        # The URL's hash in the name: a partial download is only ever resumed from its own URL.
        file = Path(urlparse(a.url).path).name or "archive"
        return self.root / "archives" / f"{a.name}-{_short_hash(a.url)}-{file}"

    def extraction(self, a: Archive) -> Path:
        return self.root / "extracted" / f"{a.name}-{_short_hash(a.url, a.selection)}"

    def record_file(self, a: Archive) -> Path:
        return self.extraction(a).with_suffix(".json")

    def ready(self, a: Archive) -> Record | None:
        """The record of a complete extraction from an earlier run, if there is one and its
        archive had the MD5 now pinned (a pin added since then is fine if it matches)."""
        record_file, folder = self.record_file(a), self.extraction(a)
        if not (record_file.is_file() and folder.is_dir()):
            return None
        try:
            record = Record(**json.loads(record_file.read_text()))
        except (ValueError, TypeError):  # cut short, or written by another version
            return None
        if a.md5 not in (None, record.md5):
            return None
        # The folder outlives many fetches: one where files were deleted by hand is made again
        # rather than published incomplete (counting 200,000 files takes about a second).
        return record if len(extracted_files(folder)) == record.files else None

    def forget_others(self, a: Archive) -> None:
        """Before fetching ``a``: its extractions for other params or half made, and downloads
        from other URLs. A rerun with other params is restored by DVC's run cache, not from
        here, and a partial download is only resumed from its own URL."""
        for path in (self.root / "extracted").glob(f"{a.name}-*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        keep = self.archive(a).name
        for path in (self.root / "archives").glob(f"{a.name}-*"):
            # keep the download, its .partial and the .partial's validator (If-Range)
            if not path.name.startswith(keep):
                path.unlink()


def _on_disk(path: Path) -> int:
    """Bytes of ``path`` or its ``.partial`` already downloaded."""
    for candidate in (path, path.with_name(path.name + ".partial")):
        if candidate.is_file():
            return candidate.stat().st_size
    return 0


def check_disk(
    archives: list[Archive], work: WorkFolder, raw: Path, *, stream: bool, keep: bool
) -> None:
    """Refuse to start when the disk cannot hold what is still to come: the extractions (an
    estimate) plus, unless streaming, what is left to download (all archives if kept, else the
    largest: each one is deleted once extracted)."""
    extracted, downloads = 0, [0]
    for a in archives:
        size = remote_size(a.url)
        if size is None:
            print(f"fetch: {a.url} does not say its size: left out of the disk check")
            continue
        extracted += round(size * a.expansion)
        if not stream:
            downloads.append(max(0, size - _on_disk(work.archive(a))))
    download = sum(downloads) if keep else max(downloads)
    what = f"fetch ({human_size(download)} to download + about {human_size(extracted)} extracted)"
    check_free_space(work.root, download + extracted, what)
    if not _same_filesystem(work.root, raw):
        # Extractions are made in the work folder, then copied into data/raw on the other disk.
        check_free_space(raw, extracted, f"fetch (about {human_size(extracted)} extracted)")


def _device(folder: Path) -> int:
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    return existing.stat().st_dev


def _same_filesystem(a: Path, b: Path) -> bool:
    return _device(a) == _device(b)


def _extract_fresh(source: Path | BinaryIO, target: Path, a: Archive) -> Extracted:
    # stream_extract calls this again from byte 0 after a dropped connection, and a drop after
    # the tar's end (while the rest is drained) leaves a complete target behind.
    if target.exists():
        shutil.rmtree(target)
    return extract_tar(source, target, a.select, label=f"{a.name} ({a.url})")


def _download_and_extract(a: Archive, work: WorkFolder, target: Path, stream: bool) -> Record:
    if stream:
        size = remote_size(a.url)
        try:
            extracted, md5 = stream_extract(
                a.url,
                md5=a.md5,
                label=a.name,
                extract=lambda f: _extract_fresh(f, target, a),
                discard=lambda: shutil.rmtree(target, ignore_errors=True),
            )
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)  # an MD5 mismatch comes after extraction
            raise
        return _record(a, size, md5, extracted, stream=True, resumed_from=None, restarts=None)
    got = download_file(a.url, work.archive(a), md5=a.md5, label=a.name)
    extracted = _extract_fresh(got.path, target, a)
    return _record(
        a,
        got.size,
        got.md5,
        extracted,
        stream=False,
        resumed_from=got.resumed_from,
        restarts=got.restarts,
    )


def _record(
    a: Archive,
    size: int | None,
    md5: str,
    extracted: Extracted,
    *,
    stream: bool,
    resumed_from: int | None,
    restarts: int | None,
) -> Record:
    return Record(
        url=a.url,
        size=size,
        md5=md5,
        md5_pinned=a.md5 is not None,
        files=extracted.files,
        bytes=extracted.bytes,
        skipped=extracted.skipped,
        stream=stream,
        resumed_from=resumed_from,
        restarts=restarts,
    )


def fetch_archive(a: Archive, work: WorkFolder, *, stream: bool, keep: bool) -> tuple[Path, Record]:
    """A complete, checked extraction of ``a`` in the work folder (reused from an earlier run
    when there is one) and its record."""
    folder = work.extraction(a)
    found = work.ready(a)
    if found is not None:
        print(f"fetch: {a.name}: reusing the extraction of an earlier run ({folder})")
        return folder, found
    work.forget_others(a)
    record = _download_and_extract(a, work, folder, stream)
    label = f"{a.name} ({a.url})"
    try:
        a.check(folder, Extracted(record.files, record.bytes, record.skipped), label)
    except DepthpipeError:
        shutil.rmtree(folder)
        raise
    try:
        work.record_file(a).write_text(json.dumps(asdict(record), indent=2) + "\n")
    except OSError as error:  # a full disk: without its record the extraction is not reused
        work.record_file(a).unlink(missing_ok=True)
        raise DepthpipeError(
            f"{a.name}: cannot write {work.record_file(a)} ({error.strerror or error}): free "
            "space and run again (the extraction is redone from the kept archive or download)"
        ) from error
    if not keep and not stream:
        work.archive(a).unlink(missing_ok=True)
    return folder, record


def extracted_files(folder: Path) -> dict[str, Path]:
    """Every file of an extraction, keyed by its path relative to ``folder`` (posix)."""
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
