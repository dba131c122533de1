"""Lightning plugins and callbacks of a crash-safe, multi-rank training stage.

- ``SameFolderCheckpointIO``: checkpoints written beside their final place and renamed
  (fine-tuning; pretraining gets the same from depthpipe.stages.pretrain.temp_files_beside).
- ``RankSeed``: each rank draws its own augmentations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from depthpipe.atomic import atomic_file


class SameFolderCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint beside its final path, then renames it into place.

    Lightning's own writer stages the file in the system temp folder and moves it, which is a
    copy over the old file (not atomic) when that folder is another filesystem, e.g. a tmpfs
    /tmp or a node-local disk under a shared project: a kill mid-copy truncates the only resume
    point. A rename is atomic, and it makes every save a new file: the hard link a resume point
    keeps to the best checkpoint still holds that checkpoint after a better one replaces it.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_file(Path(path), sweep=True) as staged:
            torch.save(checkpoint, staged)


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed of its own for each rank and epoch (any fixed, distinct mapping will do)."""
    return (seed * 1_000_003 + rank * 7_919 + epoch) % 2**63


class RankSeed(pl.Callback):
    """Reseeds the global torch RNG of every rank but rank 0 at the start of each epoch.

    Every rank starts from the same ``seed``, and with ``num_workers: 0`` the augmentation
    draws from that global RNG in the training process: without this all ranks would draw the
    same crops and flips. Rank 0 keeps its stream, so a one-process run is what it always was;
    the other ranks' seeds follow from the epoch, so a resumed run draws as an uninterrupted
    one. (Loader workers are seeded per rank by Lightning already.)
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank > 0:
            torch.manual_seed(rank_seed(self.seed, trainer.global_rank, trainer.current_epoch))
