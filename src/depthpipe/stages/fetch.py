"""fetch: acquire the raw data sets in their own layouts (data/raw/diode, data/raw/megadepth).

Only ``source: synthetic`` exists so far: the embedded procedural data set. The config refuses
the other sources with a "not available yet" error before anything is written.
"""

from __future__ import annotations

from depthpipe.atomic import atomic_outputs
from depthpipe.cli import open_project, stage_arguments
from depthpipe.config import Params
from depthpipe.data import synthetic
from depthpipe.errors import run_cli
from depthpipe.paths import DIODE_TRAIN_SPLIT, DIODE_VAL_SPLIT, ProjectPaths

# Scene ids of the synthetic DIODE val split start here, so no id is shared with train.
VAL_SCENE_OFFSET = 500


def run(params: Params, paths: ProjectPaths) -> dict[str, int]:
    """Write both raw data sets; nothing replaces the old ones unless both were fully written."""
    cfg = params.data.synthetic
    size = (cfg.width, cfg.height)
    with atomic_outputs(paths.raw_diode, paths.raw_megadepth) as (diode_dir, megadepth_dir):
        counts = {
            "diode_train": synthetic.write_diode_split(
                diode_dir,
                DIODE_TRAIN_SPLIT,
                range(1, cfg.train_scenes + 1),
                cfg.scans_per_scene,
                cfg.views_per_scan,
                size,
                params.data.seed,
            ),
            "diode_val": synthetic.write_diode_split(
                diode_dir,
                DIODE_VAL_SPLIT,
                range(VAL_SCENE_OFFSET, VAL_SCENE_OFFSET + cfg.val_scenes),
                cfg.scans_per_scene,
                cfg.views_per_scan,
                size,
                params.data.seed,
            ),
            "megadepth": synthetic.write_megadepth(
                megadepth_dir,
                cfg.megadepth_scenes,
                cfg.megadepth_images_per_scene,
                cfg.megadepth_long_side,
                params.data.seed,
            ),
        }
    return counts


def main() -> None:
    args = stage_arguments(__doc__)
    params, paths = open_project(args.root)
    counts = run(params, paths)
    print("fetch: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_cli(main)
