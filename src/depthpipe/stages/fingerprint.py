"""fingerprint: what data.local's folders hold, summed up in data/raw/local_fingerprint.json.

DVC cannot watch a folder outside the project whose path is a param, so this stage does: it runs
on every ``dvc repro`` (``always_changed`` in dvc.yaml) and writes, for ``source: local``, the
number, bytes and a SHA-256 of the relative names, sizes and modification times of the files
fetch takes. fetch depends on this file: it re-runs exactly when the folders changed (or comes
back from DVC's run cache when they changed back). For the other sources the file is a constant,
so fetch never re-runs because of it. Listing ~200,000 files takes seconds; no content is read.
"""

from __future__ import annotations

import json
from typing import Any

from depthpipe.atomic import write_text_atomic
from depthpipe.cli import open_project, stage_arguments
from depthpipe.config import Params
from depthpipe.data import local
from depthpipe.errors import run_cli
from depthpipe.paths import ProjectPaths


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    data = params.data
    found = local.LocalData.find(data, paths.root) if data.source == "local" else None
    record = {"source": data.source, "local": found.fingerprint() if found else None}
    write_text_atomic(paths.local_fingerprint, json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    args = stage_arguments(__doc__)
    # No leader lock: a second `dvc repro` reaches this always-changed stage while the first
    # still runs (DVC lets go of its own lock during a stage), and DVC deletes the stage's file
    # before running it; refused, the stage would leave fetch without its dependency. Writing
    # the same small file again harms nothing, and fetch, next, does take the lock.
    params, paths = open_project(args.root, lock=False)
    record = run(params, paths)
    if record["local"] is not None:
        for name, summary in record["local"].items():
            print(f"fingerprint: data.local.{name}: {summary['files']} files, {summary['sha256']}")


if __name__ == "__main__":
    run_cli(main)
