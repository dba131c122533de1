"""Two CPU processes (DDP over gloo) run fine-tuning's augmentation and write, per rank, a
fingerprint of every augmented sample: ``python tests/ddp_seed_probe.py OUT [--no-rank-seed]``
(without RankSeed: how fine-tuning ran before it).

Run by tests/test_distributed.py (Lightning starts the second process by running this file
again); not a test itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from depthpipe.config import load_params
from depthpipe.trainer_plugins import RankSeed
from depthpipe.transforms import DepthAugment

REPO = Path(__file__).resolve().parents[1]
SEED = 0


class Scenes(Dataset[dict[str, torch.Tensor]]):
    """Eight copies of one sample (a depth ramp), augmented by fine-tuning's DepthAugment: the
    ranks load different indices but the same pixels, so only the draws can differ."""

    def __init__(self) -> None:
        params = load_params(REPO / "params.yaml")
        self.augment = DepthAugment(params.finetune.augment, params.depth)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        depth = torch.linspace(1.0, 50.0, 48 * 64).reshape(1, 48, 64)
        sample = {
            "image": torch.zeros(3, 48, 64),
            "depth": depth,
            "mask": torch.ones(1, 48, 64, dtype=torch.bool),
        }
        return self.augment(sample)


class Recorder(pl.LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out = out
        self.seen: list[float] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen += [float(d.sum()) for d in batch["depth"]]
        return self.weight.sum() * 0.0  # a step that changes nothing: the draws are the point

    def on_train_end(self) -> None:
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    out = Path(sys.argv[1])
    pl.seed_everything(SEED, workers=True, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        callbacks=[] if "--no-rank-seed" in sys.argv else [RankSeed(SEED)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Recorder(out), DataLoader(Scenes(), batch_size=2, num_workers=0))


if __name__ == "__main__":
    main()
