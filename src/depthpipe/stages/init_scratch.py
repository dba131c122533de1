"""init_scratch: the randomly initialised encoder that finetune@scratch starts from.

Stored as models/pretrain/scratch/encoder.pt, like a pretrained encoder, so that every finetune
stage reads ``models/pretrain/<name>/encoder.pt`` the same way and DVC tracks the baseline's
initial weights (fixed by ``seed``) like any other input.
"""

from __future__ import annotations

from pathlib import Path

import torch

from depthpipe.atomic import atomic_dir
from depthpipe.cli import open_project, stage_arguments
from depthpipe.config import Params
from depthpipe.encoders import build_resnet
from depthpipe.errors import run_cli
from depthpipe.paths import ENCODER_FILE, SCRATCH, ProjectPaths


def run(params: Params, paths: ProjectPaths) -> Path:
    torch.manual_seed(params.seed)
    encoder = build_resnet(params.model.arch)  # torchvision's own initialisation, no weights
    with atomic_dir(paths.encoder_dir(SCRATCH)) as staged:
        torch.save(encoder.state_dict(), staged / ENCODER_FILE)
    return paths.encoder_file(SCRATCH)


def main() -> None:
    args = stage_arguments(__doc__)
    params, paths = open_project(args.root)
    out = run(params, paths)
    print(f"init_scratch: wrote {out.relative_to(paths.root)}")


if __name__ == "__main__":
    run_cli(main)
