"""fetch: acquire the raw data sets in their own layouts (data/raw/diode, data/raw/megadepth) and
record where they came from (data/raw/fetch_report.json).

``data.source`` says how:

- ``synthetic``: render the embedded procedural data set (no download);
- ``official``: download the published archives into .depthpipe/fetch/ (resumable, verified,
  safely extracted; see depthpipe.data.official) and hard-link the kept extractions into place;
- ``local``: take extracted copies already on this machine as reflinks, hard links or copies
  (depthpipe.data.local); the fingerprint stage's file makes this stage re-run when they change.

Every source writes the same layout (DIODE's ``{train,val}/<domain>/scene_*/scan_*/`` for each
domain in ``data.diode_domains``, MegaDepth's ``MegaDepth_v1/<scene>/dense*/imgs/*.jpg``), so no
later stage knows where the data came from. ``data.megadepth_max_images`` keeps a fixed subset of
the photos, spread over scenes. Nothing replaces the old outputs unless all were written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from depthpipe.atomic import atomic_outputs
from depthpipe.cli import open_project, stage_arguments
from depthpipe.config import DataConfig, Params
from depthpipe.data import diode, local, megadepth, official, synthetic
from depthpipe.errors import DepthpipeError, run_cli
from depthpipe.paths import DIODE_TRAIN_SPLIT, DIODE_VAL_SPLIT, ProjectPaths

# Scene ids of the synthetic data start here. DIODE's ids are unique across splits and domains
# (train outdoor 7-18, val outdoor 22-24, ...), and so are these.
FIRST_SCENE = {
    (diode.OUTDOOR, DIODE_TRAIN_SPLIT): 1,
    (diode.OUTDOOR, DIODE_VAL_SPLIT): 500,
    (diode.INDOORS, DIODE_TRAIN_SPLIT): 1001,
    (diode.INDOORS, DIODE_VAL_SPLIT): 1500,
}

Counts = dict[str, int]


def _report(data: DataConfig, counts: Counts, **details: Any) -> str:
    report = {
        "source": data.source,
        "diode_domains": data.diode_domains,
        "megadepth_max_images": data.megadepth_max_images,
        "counts": counts,
        **details,
    }
    return json.dumps(report, indent=2) + "\n"


def _domain_counts(diode_dir: Path, domains: Sequence[str]) -> dict[str, dict[str, int]]:
    return {
        split: {d: len(diode.list_samples(diode_dir, split, (d,))) for d in domains}
        for split in (DIODE_TRAIN_SPLIT, DIODE_VAL_SPLIT)
    }


def _counts(diode_dir: Path, megadepth_dir: Path) -> Counts:
    return {
        "diode_train": len(diode.list_samples(diode_dir, DIODE_TRAIN_SPLIT)),
        "diode_val": len(diode.list_samples(diode_dir, DIODE_VAL_SPLIT)),
        "megadepth": len(megadepth.list_images(megadepth_dir)),
    }


def _render_diode(data: DataConfig, diode_dir: Path) -> None:
    cfg = data.synthetic
    scenes = {DIODE_TRAIN_SPLIT: cfg.train_scenes, DIODE_VAL_SPLIT: cfg.val_scenes}
    for domain in data.diode_domains:
        for split, count in scenes.items():
            first = FIRST_SCENE[(domain, split)]
            synthetic.write_diode_split(
                diode_dir,
                split,
                range(first, first + count),
                cfg.scans_per_scene,
                cfg.views_per_scan,
                (cfg.width, cfg.height),
                data.seed,
                domain=domain,
            )


def fetch_synthetic(params: Params, paths: ProjectPaths) -> Counts:
    data, cfg = params.data, params.data.synthetic
    outs = (paths.raw_diode, paths.raw_megadepth, paths.fetch_report)
    with atomic_outputs(*outs) as (diode_dir, megadepth_dir, report):
        _render_diode(data, diode_dir)
        synthetic.write_megadepth(
            megadepth_dir,
            cfg.megadepth_scenes,
            cfg.megadepth_images_per_scene,
            cfg.megadepth_long_side,
            data.seed,
        )
        photos = megadepth_dir / megadepth.ROOT_DIR
        megadepth.prune_to_subset(photos, data.megadepth_max_images, data.seed)
        counts = _counts(diode_dir, megadepth_dir)
        details = {"diode": _domain_counts(diode_dir, data.diode_domains)}
        report.write_text(_report(data, counts, **details))
    return counts


def fetch_official(params: Params, paths: ProjectPaths) -> Counts:
    data, settings = params.data, params.data.official
    work = official.WorkFolder(paths.fetch_workdir)
    archives = official.plan(data)
    pending = [a for a in archives if work.ready(a) is None]
    if pending:
        official.check_disk(
            pending,
            work,
            paths.raw_diode.parent,
            stream=settings.stream,
            keep=settings.keep_archives,
        )
    done = {
        a.name: official.fetch_archive(a, work, stream=settings.stream, keep=settings.keep_archives)
        for a in archives
    }
    # Hard links (a copy where they fail): the extractions stay in the work folder, so a rerun
    # of this stage re-links them instead of downloading again, and nothing is lost if this
    # block fails. MegaDepth's subset is chosen before linking: the rest is never linked.
    linker = local.Linker()
    files = {name: official.extracted_files(folder) for name, (folder, _) in done.items()}
    photos = megadepth.select_subset(files["megadepth"], data.megadepth_max_images, data.seed)
    files["megadepth"] = {photo: files["megadepth"][photo] for photo in photos}
    outs = (paths.raw_diode, paths.raw_megadepth, paths.fetch_report)
    with atomic_outputs(*outs) as (diode_dir, megadepth_dir, report):
        targets = {
            "diode_val": diode_dir / DIODE_VAL_SPLIT,
            "diode_train": diode_dir / DIODE_TRAIN_SPLIT,
            "megadepth": megadepth_dir / megadepth.ROOT_DIR,
        }
        for name, found in files.items():
            local.bring_in(found, targets[name], linker)
        counts = _counts(diode_dir, megadepth_dir)
        details = {
            "diode": _domain_counts(diode_dir, data.diode_domains),
            "archives": {name: asdict(record) for name, (_, record) in done.items()},
            "link": linker.counts,
        }
        report.write_text(_report(data, counts, **details))
    print(f"fetch: files linked from {paths.fetch_workdir} as {linker.counts}")
    if "copy" in linker.counts:
        print(
            f"fetch: {linker.counts['copy']} files were copied, not linked ({paths.fetch_workdir} "
            "and data/raw are on different filesystems, or links are not allowed): the "
            "extractions take that space a second time"
        )
    for name, (_, record) in done.items():
        if not record.md5_pinned:
            print(f"fetch: {name} md5 {record.md5}: pin it as data.official.{name}.md5")
    return counts


def read_fingerprint(paths: ProjectPaths) -> dict[str, Any]:
    """The fingerprint stage's record of data.local (what fetch's outputs must correspond to)."""
    path = paths.local_fingerprint
    if not path.is_file():
        raise DepthpipeError(
            f"{path}: not found; `dvc repro` writes it (the fingerprint stage), or run "
            "`python -m depthpipe.stages.fingerprint` first"
        )
    return dict(json.loads(path.read_text()))


def fetch_local(params: Params, paths: ProjectPaths) -> Counts:
    data = params.data
    found = local.LocalData.find(data, paths.root)
    diode.check_manifest(
        (name.split("/", 1)[1] for name in found.files["diode"] if name.startswith("train/")),
        DIODE_TRAIN_SPLIT,
        data.diode_domains,
        f"data.local.diode ({found.folders['diode']})",
    )
    fingerprint = found.fingerprint()
    recorded = read_fingerprint(paths)
    if recorded.get("local") != fingerprint:
        raise DepthpipeError(
            f"data.local changed since the fingerprint stage wrote {paths.local_fingerprint}: "
            "run `dvc repro` again (it fingerprints the folders first)"
        )
    photos = megadepth.select_subset(found.files["megadepth"], data.megadepth_max_images, data.seed)
    linker = local.Linker()
    outs = (paths.raw_diode, paths.raw_megadepth, paths.fetch_report)
    with atomic_outputs(*outs) as (diode_dir, megadepth_dir, report):
        local.bring_in(found.files["diode"], diode_dir, linker)
        chosen = {photo: found.files["megadepth"][photo] for photo in photos}
        local.bring_in(chosen, megadepth_dir / megadepth.ROOT_DIR, linker)
        counts = _counts(diode_dir, megadepth_dir)
        details = {
            "diode": _domain_counts(diode_dir, data.diode_domains),
            "link": linker.counts,
            "fingerprint": fingerprint,
        }
        report.write_text(_report(data, counts, **details))
    print(f"fetch: files brought in as {linker.counts} (reflink/hardlink share the bytes)")
    return counts


def run(params: Params, paths: ProjectPaths) -> Counts:
    """Write both raw data sets and the report; nothing is replaced unless all were written."""
    fetchers = {"synthetic": fetch_synthetic, "official": fetch_official, "local": fetch_local}
    return fetchers[params.data.source](params, paths)


def main() -> None:
    args = stage_arguments(__doc__)
    params, paths = open_project(args.root)
    counts = run(params, paths)
    print("fetch: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_cli(main)
