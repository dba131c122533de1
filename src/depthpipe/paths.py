"""Every path the pipeline reads or writes, relative to the project root (where dvc.yaml is),
and the file and folder names that more than one module uses (split folders, model files, image
suffixes): defined here once.

dvc.yaml repeats these strings as deps/outs; ``stage_io`` says, per stage, which of them it
declares, and tests/test_dvc_yaml.py checks that dvc.yaml lists exactly those (and that each
stage's code uses the ProjectPaths members they come from).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# What DVCLive (3.x) writes inside its ``dir``: the summary of the last value of every metric,
# and under plots/ one TSV per metric (``train/loss`` -> plots/metrics/train/loss.tsv) and the
# images given to ``Live.log_image`` (plots/images/).
DVCLIVE_SUMMARY = "metrics.json"
DVCLIVE_PLOTS = "plots"

# Splits. DIODE ships two, data/raw/diode/{train,val}/; preprocess packs three into
# data/processed/diode/{train,validation,test}/: train and validation carved from DIODE train by
# scene, test = DIODE val (untouched until evaluate).
DIODE_TRAIN_SPLIT = "train"
DIODE_VAL_SPLIT = "val"
TRAIN_SPLIT = "train"
VALIDATION_SPLIT = "validation"
TEST_SPLIT = "test"
PACKED_SPLITS = (TRAIN_SPLIT, VALIDATION_SPLIT, TEST_SPLIT)

# Files of a pretrained encoder's folder, models/pretrain/<name>/.
ENCODER_FILE = "encoder.pt"  # torchvision ResNet state dict, loaded with strict=True
PRETRAIN_LOG = "train.log"  # LightlyTrain's log of the run
PRETRAIN_SUMMARY = "pretrain.json"
# Files of a fine-tuned model's folder, models/finetune/<name>/.
MODEL_WEIGHTS = "model.pt"  # plain DepthNet state dict of the best epoch
MODEL_SPEC = "model.json"  # depthpipe.model.ModelSpec: how to rebuild the network
BEST_CHECKPOINT = "best.ckpt"  # the Lightning checkpoint of the best epoch
FINETUNE_SUMMARY = "finetune.json"

# What LightlyTrain writes in its ``out`` folder (pretrain's working folder).
LIGHTLY_LAST_CHECKPOINT = Path("checkpoints", "last.ckpt")  # a killed run resumes from it
LIGHTLY_EXPORT = Path("exported_models", "exported_last.pt")  # the encoder's state dict
LIGHTLY_LOG = "train.log"
LIGHTLY_METRICS = "metrics.jsonl"

# Image files: what predict accepts from users' folders and pretrain counts in its image folder
# (all decoded by PIL; LightlyTrain reads every suffix PIL opens, a superset of these).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def is_image(path: Path) -> bool:
    """Whether ``path`` has one of IMAGE_SUFFIXES (case-insensitive)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def dvclive_curve(live_dir: Path, metric: str) -> Path:
    """The TSV DVCLive writes for ``metric`` (``val/abs_rel``) in ``live_dir``."""
    return live_dir / DVCLIVE_PLOTS / "metrics" / f"{metric}.tsv"


@dataclass(frozen=True)
class ProjectPaths:
    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    # fingerprint
    @property
    def local_fingerprint(self) -> Path:
        """Names, sizes and mtimes of data.local's files, summed up: fetch's dependency on them."""
        return self.root / "data" / "raw" / "local_fingerprint.json"

    # fetch
    @property
    def fetch_report(self) -> Path:
        """Where the raw data came from: source, archives (URL, size, MD5), counts, link mode."""
        return self.root / "data" / "raw" / "fetch_report.json"

    @property
    def fetch_workdir(self) -> Path:
        # Downloads and finished extractions between runs (resume); outside every stage output.
        return self.root / ".depthpipe" / "fetch"

    @property
    def leader_lock(self) -> Path:
        """The lock one leader (a job, or a training stage outside one) holds on the project;
        the file's text names the holder (depthpipe.distributed)."""
        return self.root / ".depthpipe" / "leader.lock"

    def training_workdirs(self, stage: str) -> Path:
        """The folder of a training stage's working folders (pretrain_workdir, finetune_workdir)."""
        return self.root / ".depthpipe" / stage

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

    def packed_split(self, name: str) -> Path:
        """One packed split folder (``name`` in PACKED_SPLITS) under processed_diode."""
        if name not in PACKED_SPLITS:
            raise ValueError(f"no packed split {name!r} (have: {', '.join(PACKED_SPLITS)})")
        return self.processed_diode / name

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
        return self.encoder_dir(name) / ENCODER_FILE

    def pretrain_workdir(self, name: str, key: str) -> Path:
        # Outside every stage output, so DVC neither deletes it before a re-run nor caches it.
        return self.root / ".depthpipe" / "pretrain" / f"{name}-{key}"

    def pretrain_live(self, name: str) -> Path:
        return self.root / "dvclive" / "pretrain" / name

    def pretrain_live_summary(self, name: str) -> Path:
        return self.pretrain_live(name) / DVCLIVE_SUMMARY

    def pretrain_live_plots(self, name: str) -> Path:
        return self.pretrain_live(name) / DVCLIVE_PLOTS

    def finetune_dir(self, name: str) -> Path:
        return self.root / "models" / "finetune" / name

    def finetune_workdir(self, name: str, key: str) -> Path:
        # Checkpoints and curves while training, kept until exported so a killed run resumes;
        # outside every stage output, like pretrain_workdir.
        return self.root / ".depthpipe" / "finetune" / f"{name}-{key}"

    def finetune_live(self, name: str) -> Path:
        return self.root / "dvclive" / "finetune" / name

    def finetune_live_summary(self, name: str) -> Path:
        return self.finetune_live(name) / DVCLIVE_SUMMARY

    def finetune_live_plots(self, name: str) -> Path:
        return self.finetune_live(name) / DVCLIVE_PLOTS

    # evaluate
    @property
    def evaluate_metrics(self) -> Path:
        return self.root / "metrics" / "evaluate.json"

    @property
    def evaluate_per_image(self) -> Path:
        """Each test image's metrics per model (CSV): the scatter plot and bootstrap's input."""
        return self.root / "metrics" / "evaluate_per_image.csv"

    @property
    def evaluate_live(self) -> Path:
        return self.root / "dvclive" / "evaluate"

    @property
    def evaluate_images(self) -> Path:
        """The prediction grid and the metric chart (predictions.png, metrics.png)."""
        return self.evaluate_live / DVCLIVE_PLOTS / "images"


def project_paths(root: Path | str = ".") -> ProjectPaths:
    return ProjectPaths(Path(root).resolve())


STAGES = (
    "fingerprint",
    "fetch",
    "preprocess",
    "pretrain",
    "init_scratch",
    "finetune",
    "evaluate",
)
SCRATCH = "scratch"  # the encoder of finetune@scratch, written by init_scratch
# The DVCLive metrics whose curves `dvc plots show` must draw (the names the code logs).
PRETRAIN_CURVES = ("train/loss",)
FINETUNE_CURVES = ("train/loss", "val/loss", "val/abs_rel", "val/delta1")


@dataclass(frozen=True)
class StageIO:
    """What one stage (one ``foreach`` item) reads and writes besides params and source files,
    as dvc.yaml declares it: relative posix paths."""

    data_deps: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()  # cached outputs
    metrics: tuple[str, ...] = ()  # stage-level ``metrics:`` (cache: false)
    plots: tuple[str, ...] = ()  # stage-level ``plots:`` (cache: false), files or folders
    # Curve files inside the outputs that a plot definition of dvc.yaml (stage-level or
    # top-level ``plots:``) must draw. Not a dvc.yaml field.
    curves: tuple[str, ...] = ()

    @property
    def written(self) -> tuple[str, ...]:
        return self.outs + self.metrics + self.plots


def stage_io(stage: str, item: str | None = None, *, aug: str | None = None) -> StageIO:
    """The data paths of ``stage`` (``item``: the preset of pretrain, the encoder name of
    finetune; ``aug``: the encoder evaluate compares with scratch)."""
    p = ProjectPaths(Path())  # relative to the project root

    def rel(*paths: Path) -> tuple[str, ...]:
        return tuple(path.as_posix() for path in paths)

    needs_item = stage in ("pretrain", "finetune")
    if stage in STAGES and needs_item != (item is not None):
        raise ValueError(f"stage_io: {stage} takes {'an' if needs_item else 'no'} item")
    if stage == "evaluate" and aug is None:
        raise ValueError("stage_io: evaluate needs aug")
    if stage == "fingerprint":
        return StageIO(outs=rel(p.local_fingerprint))
    if stage == "fetch":
        return StageIO(
            data_deps=rel(p.local_fingerprint),
            outs=rel(p.raw_diode, p.raw_megadepth, p.fetch_report),
        )
    if stage == "preprocess":
        return StageIO(
            data_deps=rel(p.raw_diode, p.raw_megadepth),
            outs=rel(p.processed_diode, p.processed_megadepth, p.preprocess_report),
        )
    if stage == "pretrain" and item is not None:
        return StageIO(
            data_deps=rel(p.processed_megadepth),
            outs=rel(p.encoder_dir(item), p.pretrain_live_plots(item)),
            metrics=rel(p.pretrain_live_summary(item)),
            curves=rel(*(dvclive_curve(p.pretrain_live(item), m) for m in PRETRAIN_CURVES)),
        )
    if stage == "init_scratch":
        return StageIO(outs=rel(p.encoder_dir(SCRATCH)))
    if stage == "finetune" and item is not None:
        return StageIO(
            data_deps=rel(p.processed_diode, p.encoder_file(item)),
            outs=rel(p.finetune_dir(item), p.finetune_live_plots(item)),
            metrics=rel(p.finetune_live_summary(item)),
            curves=rel(*(dvclive_curve(p.finetune_live(item), m) for m in FINETUNE_CURVES)),
        )
    if stage == "evaluate" and aug is not None:
        return StageIO(
            # The packed test split at the training resolution, the raw DIODE val files for
            # the ground truth at its own resolution, the packed train split for the prior.
            data_deps=rel(
                p.packed_split(TEST_SPLIT),
                p.raw_diode / DIODE_VAL_SPLIT,
                p.packed_split(TRAIN_SPLIT),
                # The files evaluate loads (load_finetuned), not the whole network folder.
                *(
                    p.finetune_dir(n) / f
                    for n in (SCRATCH, aug)
                    for f in (MODEL_WEIGHTS, MODEL_SPEC)
                ),
            ),
            metrics=rel(p.evaluate_metrics),
            plots=rel(p.evaluate_per_image, p.evaluate_images),
        )
    raise ValueError(f"stage_io: unknown stage {stage!r} (have: {', '.join(STAGES)})")
