"""preprocess: validate, split by scene, resize and pack the raw data for training.

DIODE train is split into train/validation by scene, domain by domain (each domain listed in
``data.diode_domains`` keeps ``preprocess.val_fraction`` of its scenes for validation; no scene
on both sides); DIODE val becomes the test split. Samples that fail validation are skipped and
listed with their reason in data/processed/report.json. MegaDepth photos are decoded fully
(corrupt ones reported), resized, and written as JPEGs into one folder LightlyTrain reads.

Decoding and resizing run in ``preprocess.workers`` processes (0 = one per core) with a progress
bar; results are written in the input order, so the files are the same for any number of
workers.
"""

from __future__ import annotations

import ctypes
import functools
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypedDict, TypeVar

import numpy as np
from tqdm import tqdm

from depthpipe.atomic import atomic_outputs
from depthpipe.cli import open_project, stage_arguments
from depthpipe.config import Params
from depthpipe.data import diode, megadepth
from depthpipe.data.packed import PackedWriter, resize_sample, write_slot
from depthpipe.errors import DepthpipeError, run_cli
from depthpipe.paths import (
    DIODE_TRAIN_SPLIT,
    DIODE_VAL_SPLIT,
    TEST_SPLIT,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    ProjectPaths,
)

A = TypeVar("A")
B = TypeVar("B")


class DiodeReport(TypedDict):
    counts: dict[str, int]  # packed split -> samples written
    domains: dict[str, dict[str, int]]  # domain -> packed split -> samples written
    train_scenes: list[str]
    validation_scenes: list[str]


class MegadepthReport(TypedDict):
    images: int  # photos written


class PreprocessReport(TypedDict):
    """What data/processed/report.json holds."""

    diode: DiodeReport
    megadepth: MegadepthReport
    skipped: list[dict[str, str]]  # {"file": relative to its raw root, "reason": ...}


def worker_count(setting: int) -> int:
    """``preprocess.workers``, with 0 meaning one per CPU core this process may run on."""
    if setting > 0:
        return setting
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies


def end_with_parent(parent: int) -> None:
    """Pool initializer: the worker is killed when the stage's process dies, even by SIGKILL (an
    out-of-memory kill, a cancelled job), which gives the pool no chance to stop its workers;
    they would go on decoding beside the re-run. Linux only (prctl); the signal comes when the
    thread that forked the worker ends, here the stage's main thread, which creates the pool."""
    if sys.platform.startswith("linux"):
        # A failure (never seen) costs only this safeguard, not the work: not worth stopping.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl: nobody reads our results
        os._exit(1)


def parallel_map(
    work: Callable[[A], B], items: Sequence[A], workers: int, what: str
) -> Iterator[B]:
    """``work`` over ``items`` in ``workers`` processes, results in the items' order, with a
    progress bar on a terminal (none in logs)."""
    with tqdm(total=len(items), desc=what, unit="file", disable=None) as bar:
        if workers <= 1 or len(items) < 2:
            for item in items:
                yield work(item)
                bar.update()
            return
        # fork where there is one: the workers only need numpy and PIL, and spawning would
        # import torch (3 s) again in every one of them.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        chunk = max(1, min(16, len(items) // (workers * 4)))
        pool = context.Pool(min(workers, len(items)), end_with_parent, (os.getpid(),))
        with pool:
            for result in pool.imap(work, items, chunksize=chunk):
                yield result
                bar.update()


def split_scenes(scenes: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministically pick whole scenes for validation; at least one scene on each side."""
    unique = sorted(set(scenes))
    if len(unique) < 2:
        raise DepthpipeError(
            f"DIODE train has {len(unique)} scene(s): at least 2 are needed to split by scene"
        )
    order = np.random.default_rng([seed, 0x5B117]).permutation(len(unique))
    n_val = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    val = sorted(unique[i] for i in order[:n_val])
    train = sorted(s for s in unique if s not in val)
    return train, val


def split_by_domain(
    samples: list[diode.SampleFiles], domains: Sequence[str], val_fraction: float, seed: int
) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(domain, scene) pairs for training and for validation: each domain split on its own, so
    both sides see every domain."""
    train: set[tuple[str, str]] = set()
    validation: set[tuple[str, str]] = set()
    for domain in domains:
        scenes = [s.scene for s in samples if s.domain == domain]
        if len(set(scenes)) < 2:
            raise DepthpipeError(
                f"DIODE train {domain} has {len(set(scenes))} scene(s): at least 2 are needed "
                "to split it by scene"
            )
        kept, held_out = split_scenes(scenes, val_fraction, seed)
        train.update((domain, scene) for scene in kept)
        validation.update((domain, scene) for scene in held_out)
    return train, validation


def _entry(files: diode.SampleFiles, raw_root: Path) -> dict[str, str]:
    return {
        "name": files.stem,
        "scene": files.scene,
        "domain": files.domain,
        "image": files.image.relative_to(raw_root).as_posix(),
        "depth": files.depth.relative_to(raw_root).as_posix(),
        "mask": files.mask.relative_to(raw_root).as_posix(),
    }


def pack_sample(job: tuple[int, diode.SampleFiles], out: Path, size: tuple[int, int]) -> str | None:
    """Read, check and resize sample ``job = (slot, files)`` and write it into that slot of the
    split at ``out`` (a worker's job); None if it went well, else why the sample is bad."""
    slot, files = job
    try:
        sample = diode.read_sample(files)
    except diode.BadSample as error:
        return str(error)
    write_slot(out, slot, *resize_sample(sample.image, sample.depth, sample.mask, size))
    return None


def pack_split(
    samples: list[diode.SampleFiles],
    out: Path,
    size: tuple[int, int],
    raw_root: Path,
    skipped: list[dict[str, str]],
    workers: int = 1,
) -> int:
    writer = PackedWriter(out, capacity=len(samples), size=size)
    skipped_before = len(skipped)
    work = functools.partial(pack_sample, out=out, size=size)
    jobs = list(enumerate(samples))
    filled = []
    for (slot, files), reason in zip(
        jobs, parallel_map(work, jobs, workers, out.name), strict=True
    ):
        if reason is None:
            filled.append((slot, _entry(files, raw_root)))
        else:
            skipped.append({"file": files.image.relative_to(raw_root).as_posix(), "reason": reason})
    count = writer.close(filled)
    if count == 0:
        first = skipped[skipped_before] if len(skipped) > skipped_before else None
        why = f"; first: {first['file']}: {first['reason']}" if first else ""
        raise DepthpipeError(
            f"{out.name}: no valid sample left ({len(skipped) - skipped_before} skipped{why})"
        )
    return count


def preprocess_diode(
    params: Params, raw: Path, out: Path, skipped: list[dict[str, str]], workers: int = 1
) -> DiodeReport:
    domains = params.data.diode_domains
    train_all = diode.list_samples(raw, DIODE_TRAIN_SPLIT, domains)
    test = diode.list_samples(raw, DIODE_VAL_SPLIT, domains)
    for split, found in ((DIODE_TRAIN_SPLIT, train_all), (DIODE_VAL_SPLIT, test)):
        for domain in domains:
            if not any(s.domain == domain for s in found):
                raise DepthpipeError(f"{raw / split / domain}: no DIODE samples found")
    train_keys, val_keys = split_by_domain(
        train_all, domains, params.preprocess.val_fraction, params.data.seed
    )
    parts = {
        TRAIN_SPLIT: [s for s in train_all if (s.domain, s.scene) in train_keys],
        VALIDATION_SPLIT: [s for s in train_all if (s.domain, s.scene) in val_keys],
        TEST_SPLIT: test,
    }
    size = (params.preprocess.height, params.preprocess.width)
    counts = {
        name: pack_split(files, out / name, size, raw, skipped, workers)
        for name, files in parts.items()
    }
    return {
        "counts": counts,
        "domains": _domain_counts(out, domains),
        "train_scenes": sorted(scene for _, scene in train_keys),
        "validation_scenes": sorted(scene for _, scene in val_keys),
    }


def _domain_counts(out: Path, domains: Sequence[str]) -> dict[str, dict[str, int]]:
    """Packed samples per domain and split, from the indexes just written."""
    indexes = {
        name: json.loads((out / name / "index.json").read_text())
        for name in (TRAIN_SPLIT, VALIDATION_SPLIT, TEST_SPLIT)
    }
    return {
        domain: {
            name: sum(1 for entry in index["samples"] if entry["domain"] == domain)
            for name, index in indexes.items()
        }
        for domain in domains
    }


def shrink_photo(path: Path, out: Path, short_side: int) -> str | None:
    """Decode, resize and save one MegaDepth photo into ``out`` (a worker's job); None if it
    went well, else why not."""
    try:
        image = megadepth.load_rgb(path)
    except megadepth.BadImage as error:
        return str(error)
    small = megadepth.resize_short_side(image, short_side)
    small.save(out / f"{megadepth.scene_of(path)}_{path.stem}.jpg", format="JPEG", quality=95)
    return None


def preprocess_megadepth(
    params: Params, raw: Path, out: Path, skipped: list[dict[str, str]], workers: int = 1
) -> int:
    images = megadepth.list_images(raw)
    if not images:
        raise DepthpipeError(f"{raw}: no MegaDepth images (*/dense*/imgs/*.jpg) found")
    out.mkdir(parents=True, exist_ok=True)
    shrink = functools.partial(
        shrink_photo, out=out, short_side=params.preprocess.megadepth_short_side
    )
    written = 0
    for path, reason in zip(
        images, parallel_map(shrink, images, workers, "megadepth"), strict=True
    ):
        if reason is not None:
            skipped.append({"file": path.relative_to(raw).as_posix(), "reason": reason})
            continue
        written += 1
    if written == 0:
        raise DepthpipeError(f"{raw}: every MegaDepth image is unreadable")
    return written


def run(params: Params, paths: ProjectPaths) -> PreprocessReport:
    for raw in (paths.raw_diode, paths.raw_megadepth):
        if not raw.is_dir():
            raise DepthpipeError(f"{raw}: raw data not found (run the fetch stage)")
    skipped: list[dict[str, str]] = []
    workers = worker_count(params.preprocess.workers)
    outs = (paths.processed_diode, paths.processed_megadepth, paths.preprocess_report)
    with atomic_outputs(*outs) as (diode_out, megadepth_out, report_out):
        report: PreprocessReport = {
            "diode": preprocess_diode(params, paths.raw_diode, diode_out, skipped, workers),
            "megadepth": {
                "images": preprocess_megadepth(
                    params, paths.raw_megadepth, megadepth_out, skipped, workers
                )
            },
            "skipped": skipped,
        }
        report_out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    args = stage_arguments(__doc__)
    params, paths = open_project(args.root)
    report = run(params, paths)
    counts = report["diode"]["counts"]
    print(
        f"preprocess: diode {counts}, megadepth {report['megadepth']['images']} images, "
        f"{len(report['skipped'])} skipped (see {paths.preprocess_report.relative_to(paths.root)})"
    )
    for item in report["skipped"]:
        print(f"  skipped {item['file']}: {item['reason']}")


if __name__ == "__main__":
    run_cli(main)
