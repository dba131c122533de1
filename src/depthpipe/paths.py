"""Every path the pipeline reads or writes, relative to the project root (where dvc.yaml is).

dvc.yaml repeats these strings as deps/outs; tests/test_dvc_yaml.py checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProjectPaths:
    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    # fetch
    @property
    def raw_diode(self) -> Path:
        return self.root / "data" / "raw" / "diode"

    @property
    def raw_megadepth(self) -> Path:
        return self.root / "data" / "raw" / "megadepth"

    # preprocess
    @property
    def processed_diode(self) -> Path:
        return self.root / "data" / "processed" / "diode"

    @property
    def processed_megadepth(self) -> Path:
        return self.root / "data" / "processed" / "megadepth"

    @property
    def preprocess_report(self) -> Path:
        return self.root / "data" / "processed" / "report.json"

    # pretrain / finetune
    def encoder_dir(self, name: str) -> Path:
        return self.root / "models" / "pretrain" / name

    def encoder_file(self, name: str) -> Path:
        return self.encoder_dir(name) / "encoder.pt"

    def pretrain_workdir(self, name: str, key: str) -> Path:
        # Outside every stage output, so DVC neither deletes it before a re-run nor caches it.
        return self.root / ".depthpipe" / "pretrain" / f"{name}-{key}"

    def pretrain_live(self, name: str) -> Path:
        return self.root / "dvclive" / "pretrain" / name

    def finetune_dir(self, name: str) -> Path:
        return self.root / "models" / "finetune" / name

    def finetune_live(self, name: str) -> Path:
        return self.root / "dvclive" / "finetune" / name

    # evaluate
    @property
    def evaluate_metrics(self) -> Path:
        return self.root / "metrics" / "evaluate.json"

    @property
    def evaluate_live(self) -> Path:
        return self.root / "dvclive" / "evaluate"


def project_paths(root: Path | str = ".") -> ProjectPaths:
    return ProjectPaths(Path(root).resolve())
