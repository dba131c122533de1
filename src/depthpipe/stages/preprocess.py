"""preprocess: validate, split by scene, resize and pack the raw data for training.

DIODE outdoor train is split into train/validation by scene (no scene on both sides); DIODE val
becomes the test split. Samples that fail validation are skipped and listed with their reason in
data/processed/report.json. MegaDepth photos are decoded fully (corrupt ones reported), resized,
and written as JPEGs into one folder LightlyTrain reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict

import numpy as np

from depthpipe.atomic import atomic_outputs
from depthpipe.cli import open_project, stage_arguments
from depthpipe.config import Params
from depthpipe.data import diode, megadepth
from depthpipe.data.packed import PackedWriter
from depthpipe.errors import DepthpipeError, run_cli
from depthpipe.paths import (
    DIODE_TRAIN_SPLIT,
    DIODE_VAL_SPLIT,
    TEST_SPLIT,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    ProjectPaths,
)


class DiodeReport(TypedDict):
    counts: dict[str, int]  # packed split -> samples written
    train_scenes: list[str]
    validation_scenes: list[str]


class MegadepthReport(TypedDict):
    images: int  # photos written


class PreprocessReport(TypedDict):
    """What data/processed/report.json holds."""

    diode: DiodeReport
    megadepth: MegadepthReport
    skipped: list[dict[str, str]]  # {"file": relative to its raw root, "reason": ...}


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


def _entry(files: diode.SampleFiles, raw_root: Path) -> dict[str, str]:
    return {
        "name": files.stem,
        "scene": files.scene,
        "image": files.image.relative_to(raw_root).as_posix(),
        "depth": files.depth.relative_to(raw_root).as_posix(),
        "mask": files.mask.relative_to(raw_root).as_posix(),
    }


def pack_split(
    samples: list[diode.SampleFiles],
    out: Path,
    size: tuple[int, int],
    raw_root: Path,
    skipped: list[dict[str, str]],
) -> int:
    writer = PackedWriter(out, capacity=len(samples), size=size)
    skipped_before = len(skipped)
    for files in samples:
        try:
            sample = diode.read_sample(files)
        except diode.BadSample as error:
            skipped.append(
                {"file": files.image.relative_to(raw_root).as_posix(), "reason": str(error)}
            )
            continue
        writer.add(sample.image, sample.depth, sample.mask, _entry(files, raw_root))
    count = writer.close()
    if count == 0:
        first = skipped[skipped_before] if len(skipped) > skipped_before else None
        why = f"; first: {first['file']}: {first['reason']}" if first else ""
        raise DepthpipeError(
            f"{out.name}: no valid sample left ({len(skipped) - skipped_before} skipped{why})"
        )
    return count


def preprocess_diode(
    params: Params, raw: Path, out: Path, skipped: list[dict[str, str]]
) -> DiodeReport:
    train_all = diode.list_samples(raw, DIODE_TRAIN_SPLIT)
    test = diode.list_samples(raw, DIODE_VAL_SPLIT)
    for split, found in ((DIODE_TRAIN_SPLIT, train_all), (DIODE_VAL_SPLIT, test)):
        if not found:
            raise DepthpipeError(f"{raw / split / diode.DOMAIN}: no DIODE samples found")
    train_scenes, val_scenes = split_scenes(
        [s.scene for s in train_all], params.preprocess.val_fraction, params.data.seed
    )
    parts = {
        TRAIN_SPLIT: [s for s in train_all if s.scene in train_scenes],
        VALIDATION_SPLIT: [s for s in train_all if s.scene in val_scenes],
        TEST_SPLIT: test,
    }
    size = (params.preprocess.height, params.preprocess.width)
    counts = {
        name: pack_split(files, out / name, size, raw, skipped) for name, files in parts.items()
    }
    return {"counts": counts, "train_scenes": train_scenes, "validation_scenes": val_scenes}


def preprocess_megadepth(
    params: Params, raw: Path, out: Path, skipped: list[dict[str, str]]
) -> int:
    images = megadepth.list_images(raw)
    if not images:
        raise DepthpipeError(f"{raw}: no MegaDepth images (*/dense*/imgs/*.jpg) found")
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in images:
        try:
            image = megadepth.load_rgb(path)
        except megadepth.BadImage as error:
            skipped.append({"file": path.relative_to(raw).as_posix(), "reason": str(error)})
            continue
        small = megadepth.resize_short_side(image, params.preprocess.megadepth_short_side)
        small.save(out / f"{megadepth.scene_of(path)}_{path.stem}.jpg", format="JPEG", quality=95)
        written += 1
    if written == 0:
        raise DepthpipeError(f"{raw}: every MegaDepth image is unreadable")
    return written


def run(params: Params, paths: ProjectPaths) -> PreprocessReport:
    for raw in (paths.raw_diode, paths.raw_megadepth):
        if not raw.is_dir():
            raise DepthpipeError(f"{raw}: raw data not found (run the fetch stage)")
    skipped: list[dict[str, str]] = []
    outs = (paths.processed_diode, paths.processed_megadepth, paths.preprocess_report)
    with atomic_outputs(*outs) as (diode_out, megadepth_out, report_out):
        report: PreprocessReport = {
            "diode": preprocess_diode(params, paths.raw_diode, diode_out, skipped),
            "megadepth": {
                "images": preprocess_megadepth(params, paths.raw_megadepth, megadepth_out, skipped)
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
