"""Training-loop overhead: the real fine-tuning and pretraining loops against their bare arithmetic.

    python benchmarks/train_step.py                  # about 4 min on 2 idle CPU cores
    python benchmarks/train_step.py --epochs 6 --pretrain-epochs 30    # more steps
    python benchmarks/train_step.py --ablate         # also each suspected cost removed (~12 min)
    python benchmarks/train_step.py --profile DIR    # also cProfile both real loops into DIR

Builds a demo project (the committed params.yaml) in a temporary folder with the real fetch,
preprocess and init_scratch ``run`` functions (``--data DIR`` keeps and reuses it), then measures
images/s in one process, with the same torch threads throughout:

- fine-tuning, real: finetune.py's own datasets, loaders (DepthAugment, num_workers from params),
  DepthModule, Trainer with the DVCLive logger, its callbacks and checkpoint writer
  (make_trainer, fit), for ``--epochs`` epochs (only the schedule's length differs from the
  stage's).
- pretraining, real: ``lightly_train.pretrain`` with pretrain.lightly_arguments(params, aug) (the
  method from params, never LightlyTrain's default, which downloads a teacher) for
  ``--pretrain-epochs`` epochs; its own Trainer, loader, augmentation, loggers and callbacks.

In both a callback (slipped into the Trainer's list, changing nothing) marks every training batch
and validation loop. The timed window starts at the end of the warm-up steps and spans whole
epochs, so each timed epoch has one epoch boundary, as in the stage. In: every next batch
(loading, augmentation, collation), the step, per-step hooks and logging, epoch boundaries
(epoch-end logging, checkpoints, LightlyTrain's export, a new loader iterator). Out: start-up,
model build, the sanity check, validation loops, whatever follows the last timed step.

- fine-tuning, bare: a copy of that DepthModule's network and one augmented batch already in
  memory; zero_grad + forward + depth loss + backward + optimizer step (same optimizer, lr, weight
  decay), the same warm-up and number of steps, deterministic algorithms off.
- pretraining, bare: what the real run resolved (read from its train.log): the torchvision ResNet
  body + the method's projection head and loss from ``lightly``. DINO: EMA update of the teacher,
  teacher on the 2 global views, student on global + local views, DINO loss, backward, gradient
  clipping at norm 3, optimizer step. SimCLR: backbone + head on 2 views, NT-Xent, backward, step.
  Views are random tensors of the resolved count and sizes.

Prints real and bare images/s and their ratio (1.0 = the pipeline costs nothing beyond the
arithmetic), then where the real loop's time went, per step.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchvision
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from depthpipe.cli import configure_environment  # noqa: E402
from depthpipe.config import Params, load_params  # noqa: E402
from depthpipe.data.packed import Batch  # noqa: E402
from depthpipe.losses import depth_loss  # noqa: E402
from depthpipe.paths import LIGHTLY_LOG, SCRATCH, ProjectPaths, project_paths  # noqa: E402
from depthpipe.stages import fetch, finetune, init_scratch, preprocess  # noqa: E402
from depthpipe.stages.pretrain import lightly_arguments  # noqa: E402
from depthpipe.training import DepthModule, make_optimizer  # noqa: E402
from tests.helpers import committed_params, deep_merge  # noqa: E402

LOADER_BATCHES = 12  # batches the loader-alone measurement draws
WALL, CPU = 0, 1  # the two clocks of a Mark


Mark = tuple[float, float]  # (wall seconds, CPU seconds of this process, all its threads)


def now() -> Mark:
    return time.perf_counter(), time.process_time()


def elapsed(start: Mark) -> Mark:
    end = now()
    return end[WALL] - start[WALL], end[CPU] - start[CPU]


# -- the demo project -------------------------------------------------------------------------


def prepare_project(root: Path, params: dict[str, Any]) -> ProjectPaths:
    """A project in ``root`` with raw and packed data and the scratch encoder (made once)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    paths = project_paths(root)
    configure_environment(paths)
    loaded = load_params(paths.params)
    if not paths.preprocess_report.is_file():
        start = time.perf_counter()
        fetch.run(loaded, paths)
        preprocess.run(loaded, paths)
        print(f"data: rendered and packed in {time.perf_counter() - start:.0f} s", flush=True)
    if not paths.encoder_file(SCRATCH).is_file():
        init_scratch.run(loaded, paths)
    return paths


def with_overrides(paths: ProjectPaths, base: dict[str, Any], override: dict[str, Any]) -> Params:
    """``base`` merged with ``override``, validated by the real loader (written in the project)."""
    path = paths.root / "params-benchmark.yaml"
    path.write_text(yaml.safe_dump(deep_merge(base, override), sort_keys=False))
    return load_params(path)


# -- timing the real loops --------------------------------------------------------------------


class StepClock(Callback):
    """Wall and CPU marks of every training batch, validation loop and checkpoint save.

    Installed first in the callback list, so its validation-end mark falls before
    ModelCheckpoint's save (Lightning keeps checkpoint callbacks last): the save counts as
    training-loop time, the validation loop does not. Hooks are called by name, so it serves
    LightlyTrain's ``pytorch_lightning`` Trainer too.
    """

    def __init__(self) -> None:
        self.starts: list[Mark] = []
        self.ends: list[Mark] = []
        self.epochs: list[int] = []
        self.validations: list[tuple[Mark, Mark]] = []
        self.saves: list[tuple[Mark, Mark]] = []
        self.saved_bytes: list[int] = []  # size of each saved file
        self.loader_batch: Mark = (0.0, 0.0)  # s per batch of the training loader alone
        self._validation_start = now()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.starts.append(now())
        self.epochs.append(trainer.current_epoch)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.ends.append(now())

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = now()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validations.append((self._validation_start, now()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not after fit: LightlyTrain deletes its file list when fit returns.
        loader = trainer.train_dataloader
        assert loader is not None  # fit has just run on it
        self.loader_batch = loader_seconds_per_batch(loader)

    def attach(self, trainer: pl.Trainer) -> None:
        """Go first in ``trainer``'s callbacks; record every ``trainer.save_checkpoint``."""
        callbacks: list[Callback] = trainer.__dict__["callbacks"]  # set by its connector
        callbacks.insert(0, self)
        save = trainer.save_checkpoint

        def timed_save(*args: Any, **kwargs: Any) -> None:
            start = now()
            save(*args, **kwargs)
            self.saves.append((start, now()))
            path = Path(kwargs.get("filepath", args[0] if args else ""))
            self.saved_bytes.append(path.stat().st_size if path.is_file() else 0)

        setattr(trainer, "save_checkpoint", timed_save)  # noqa: B010 (mypy: method assign)


@dataclass(frozen=True)
class LoopTime:
    """Seconds of a timed window of training steps, split by where they went."""

    steps: int
    images: int
    seconds: float  # the window, validation loops excluded
    in_step: float  # batch start to batch end: forward, loss, logs, backward, optimizer
    between_steps: float  # within an epoch: next batch (load, augment, collate), step hooks
    epoch_boundaries: float  # epoch end to next epoch's first batch, validation excluded
    checkpoints: float  # part of epoch_boundaries
    checkpoint_count: int
    checkpoint_bytes: int
    validation: float  # excluded from seconds

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def timed_window(clock: StepClock, warmup: int, batch_size: int, which: int) -> LoopTime:
    """The whole epochs of steps after step ``warmup``, from the end of the last warm-up step,
    by the ``which`` clock (WALL or CPU)."""
    per_epoch = clock.epochs.count(clock.epochs[0])
    steps = (len(clock.ends) - warmup) // per_epoch * per_epoch
    if warmup < 1 or steps < 1:
        raise SystemExit(
            f"{len(clock.ends)} steps, {per_epoch} per epoch: no whole epoch after {warmup} "
            "warm-up steps (need at least 1 warm-up step; raise the epochs)"
        )
    first, last = warmup, warmup + steps - 1
    starts, ends = [m[which] for m in clock.starts], [m[which] for m in clock.ends]
    t0, t1 = ends[first - 1], ends[last]

    def within(span: tuple[Mark, Mark]) -> bool:
        return t0 <= span[0][which] and span[1][which] <= t1

    def inside(spans: list[tuple[Mark, Mark]]) -> float:
        return sum(b[which] - a[which] for a, b in spans if within((a, b)))

    saved = [
        size for span, size in zip(clock.saves, clock.saved_bytes, strict=True) if within(span)
    ]

    validation = inside(clock.validations)
    gaps = [(starts[i] - ends[i - 1], i) for i in range(first, last + 1)]
    return LoopTime(
        steps=steps,
        images=steps * batch_size,
        seconds=t1 - t0 - validation,
        in_step=sum(ends[i] - starts[i] for i in range(first, last + 1)),
        between_steps=sum(g for g, i in gaps if clock.epochs[i] == clock.epochs[i - 1]),
        epoch_boundaries=sum(g for g, i in gaps if clock.epochs[i] != clock.epochs[i - 1])
        - validation,
        checkpoints=inside(clock.saves),
        checkpoint_count=len(saved),
        checkpoint_bytes=sum(saved),
        validation=validation,
    )


@dataclass(frozen=True)
class RealRun:
    """A real loop's timed window by both clocks, and its loader alone."""

    wall: LoopTime
    cpu: LoopTime
    loader_batch: Mark  # seconds per batch of the training loader alone

    @staticmethod
    def of(clock: StepClock, warmup: int, batch_size: int) -> RealRun:
        return RealRun(
            timed_window(clock, warmup, batch_size, WALL),
            timed_window(clock, warmup, batch_size, CPU),
            clock.loader_batch,
        )


def loader_seconds_per_batch(loader: Iterable[Any], batches: int = LOADER_BATCHES) -> Mark:
    """A training DataLoader alone (read, augment, collate; a fresh iterator), per batch."""
    count, start = 0, now()
    while count < batches:
        for _ in loader:
            count += 1
            if count == batches:
                break
    wall, cpu = elapsed(start)
    return wall / batches, cpu / batches


def timed_steps(step: Callable[[], None], warmup: int, steps: int) -> Mark:
    """Wall and CPU seconds of ``steps`` calls of ``step`` after ``warmup`` untimed ones, with
    deterministic algorithms off (the bare arithmetic)."""
    with deterministic(False):
        for _ in range(warmup):
            step()
        start = now()
        for _ in range(steps):
            step()
        return elapsed(start)


@contextmanager
def profiled(folder: Path | None) -> Iterator[None]:
    """cProfile the block into ``folder`` (numbered .prof files) and print its top functions."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        path = folder / f"{len(list(folder.glob('*.prof'))):02d}.prof"
        profiler.dump_stats(path)
        print(f"\nprofile {path}: top 30 by cumulative time")
        pstats.Stats(str(path)).sort_stats("cumulative").print_stats(30)


@contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Lightning's ``deterministic=True`` sets this process-wide and leaves it set."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


# -- fine-tuning --------------------------------------------------------------------------------

TrainerChange = Callable[[pl.Trainer], None]


@dataclass(frozen=True)
class FinetuneRun:
    real: RealRun
    module: DepthModule  # for the bare loop
    batch: Batch  # one augmented training batch


def finetune_real(
    params: Params,
    paths: ProjectPaths,
    warmup: int,
    change: TrainerChange | None = None,
    profile: Path | None = None,
) -> FinetuneRun:
    """The finetune stage's loop (finetune.run without the export), timed by a StepClock."""
    pl.seed_everything(params.seed, workers=True, verbose=False)
    train_set, val_set = finetune.datasets(params, paths)
    train_loader, val_loader = finetune.loaders(params, train_set, val_set)
    module, _ = finetune.build_module(params, paths, SCRATCH)
    prior = finetune.prior_scores(params, paths)
    workdir = Path(tempfile.mkdtemp(dir=paths.root))  # the stage's working folder, fresh
    trainer = finetune.make_trainer(params, workdir, prior, resume=False)
    clock = StepClock()
    clock.attach(trainer)
    if change:
        change(trainer)
    with profiled(profile):
        finetune.fit(trainer, module, (train_loader, val_loader), workdir, resume=False)
    shutil.rmtree(workdir)
    real = RealRun.of(clock, warmup, params.finetune.batch_size)
    return FinetuneRun(real, module, next(iter(train_loader)))


def finetune_bare(run: FinetuneRun, params: Params, warmup: int) -> Mark:
    """Seconds of as many plain optimisation steps as the real loop timed, after ``warmup``."""
    cfg, depth_range, batch = params.finetune, params.depth, run.batch
    net = copy.deepcopy(run.module.net).train()
    trainable = (p for p in net.parameters() if p.requires_grad)
    optimizer = make_optimizer(cfg.optimizer, trainable, cfg.lr, cfg.weight_decay)
    valid = (
        batch["mask"]
        & (batch["depth"] >= depth_range.min_depth)
        & (batch["depth"] <= depth_range.max_depth)
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = depth_loss(cfg.loss, net(batch["image"]), batch["depth"], valid)
        assert loss is not None, "the in-memory batch has no valid pixel"
        loss.backward()
        optimizer.step()

    return timed_steps(step, warmup, run.real.wall.steps)


# -- pretraining --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainRun:
    real: RealRun
    call: float  # wall seconds of the whole lightly_train.pretrain call
    resolved: dict[str, Any]  # the configuration LightlyTrain resolved (train.log)


@contextmanager
def clocked_lightly_trainer(clock: StepClock) -> Iterator[None]:
    """Attach ``clock`` to the Trainer LightlyTrain builds, just before it fits."""
    import pytorch_lightning

    fit = pytorch_lightning.Trainer.fit

    def clocked_fit(trainer: Any, *args: Any, **kwargs: Any) -> Any:
        clock.attach(trainer)
        return fit(trainer, *args, **kwargs)

    setattr(pytorch_lightning.Trainer, "fit", clocked_fit)  # noqa: B010
    try:
        yield
    finally:
        setattr(pytorch_lightning.Trainer, "fit", fit)  # noqa: B010


def resolved_config(train_log: Path) -> dict[str, Any]:
    """The JSON LightlyTrain logs after 'Resolved configuration:' (arguments after its defaults)."""
    text = train_log.read_text()
    marker = text.index("Resolved configuration:")
    config, _ = json.JSONDecoder().raw_decode(text[text.index("{", marker) :])
    return dict(config)


def pretrain_arguments(params: Params, epochs: int) -> dict[str, Any]:
    arguments = {**lightly_arguments(params, params.aug), "epochs": epochs}
    if arguments["method"] not in ("dino", "simclr"):
        raise SystemExit(f"pretrain.method {arguments['method']!r}: only dino and simclr")
    return arguments


def pretrain_real(
    arguments: dict[str, Any], data: Path, out: Path, warmup: int, profile: Path | None = None
) -> PretrainRun:
    import lightly_train

    # The fine-tuning Trainer (deterministic=True) left this on; LightlyTrain's Trainer does not
    # reset it, and the pretrain stage runs in its own process where it is off.
    torch.use_deterministic_algorithms(False)
    clock = StepClock()
    start = time.perf_counter()
    with profiled(profile), clocked_lightly_trainer(clock):
        lightly_train.pretrain(out=str(out), data=str(data), overwrite=True, **arguments)
    call = time.perf_counter() - start
    real = RealRun.of(clock, warmup, arguments["batch_size"])
    return PretrainRun(real, call, resolved_config(out / LIGHTLY_LOG))


def resnet_body(arch: str) -> tuple[nn.Module, int]:
    """The torchvision ResNet up to its average pool, flattened (LightlyTrain's embedding), and
    its width."""
    resnet = getattr(torchvision.models, arch)(weights=None)
    return nn.Sequential(*list(resnet.children())[:-1], nn.Flatten(1)), resnet.fc.in_features


def pretrain_optimizer(resolved: dict[str, Any], params: Iterator[nn.Parameter]) -> Any:
    args = resolved["optim_args"]
    if resolved["optim"] == "adamw":
        return torch.optim.AdamW(params, lr=args["lr"], weight_decay=args["weight_decay"])
    return torch.optim.SGD(
        params, lr=args["lr"], momentum=args.get("momentum", 0.9), weight_decay=args["weight_decay"]
    )


def dino_bare_step(resolved: dict[str, Any], arch: str) -> Callable[[], None]:
    """One DINO step as LightlyTrain's DINO takes it, on random in-memory views."""
    from lightly.loss import DINOLoss  # type: ignore[import-untyped]
    from lightly.models.modules.heads import DINOProjectionHead  # type: ignore[import-untyped]
    from lightly.models.utils import update_momentum  # type: ignore[import-untyped]

    m, t = resolved["method_args"], resolved["transform_args"]

    def network() -> nn.Module:
        body, width = resnet_body(arch)
        head = DINOProjectionHead(
            input_dim=width,
            hidden_dim=m["hidden_dim"],
            bottleneck_dim=m["bottleneck_dim"],
            output_dim=m["output_dim"],
            batch_norm=m["batch_norm"],
            freeze_last_layer=-1,
            norm_last_layer=m["norm_last_layer"],
        )
        return nn.Sequential(body, head).train()

    # Built twice, not deep-copied: the head's weight_norm weight cannot be deep-copied.
    student, teacher = network(), network().requires_grad_(False)
    teacher.load_state_dict(student.state_dict())
    criterion = DINOLoss(
        output_dim=m["output_dim"],
        teacher_temp=m["teacher_temp"],
        warmup_teacher_temp=m["warmup_teacher_temp"],
        student_temp=m["student_temp"],
        center_momentum=m["center_momentum"],
    )
    optimizer = pretrain_optimizer(resolved, student.parameters())
    n, local = resolved["batch_size"], t["local_view"] or {"num_views": 0, "view_size": (1, 1)}
    global_views = torch.randn(2 * n, 3, *t["image_size"])  # (2B, 3, H, W): 2 global views
    local_views = torch.randn(local["num_views"] * n, 3, *local["view_size"])  # (6B, 3, h, w)
    views = 2 + local["num_views"]

    def step() -> None:
        update_momentum(student, teacher, m=m["momentum_start"])
        with torch.no_grad():
            teacher_out = teacher(global_views)
        student_out = student(global_views)
        if len(local_views):
            student_out = torch.cat([student_out, student(local_views)])
        loss = criterion(teacher_out.chunk(2), student_out.chunk(views), m["teacher_temp"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 3.0)  # LightlyTrain's DINO clips at 3
        optimizer.step()

    return step


def simclr_bare_step(resolved: dict[str, Any], arch: str) -> Callable[[], None]:
    """One SimCLR step: backbone + projection head on 2 views, NT-Xent, backward, step."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules.heads import SimCLRProjectionHead

    m, t = resolved["method_args"], resolved["transform_args"]
    body, width = resnet_body(arch)
    model = nn.Sequential(
        body,
        SimCLRProjectionHead(
            input_dim=width,
            hidden_dim=m["hidden_dim"],
            output_dim=m["output_dim"],
            num_layers=m["num_layers"],
            batch_norm=m["batch_norm"],
        ),
    ).train()
    criterion = NTXentLoss(temperature=m["temperature"])
    optimizer = pretrain_optimizer(resolved, model.parameters())
    views = torch.randn(2 * resolved["batch_size"], 3, *t["image_size"])  # (2B, 3, H, W)

    def step() -> None:
        first, second = model(views).chunk(2)
        loss = criterion(first, second)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def pretrain_bare(run: PretrainRun, arch: str, warmup: int) -> Mark:
    """Seconds of as many bare steps of the resolved method as the real loop timed."""
    builders = {"dino": dino_bare_step, "simclr": simclr_bare_step}
    step = builders[run.resolved["method"]](run.resolved, arch)
    return timed_steps(step, warmup, run.real.wall.steps)


# -- reporting ----------------------------------------------------------------------------------

HEADER = f"{'loop':<46} {'real img/s':>10} {'bare img/s':>10} {'ratio':>6} {'CPU ratio':>9}"


def ratio_row(label: str, real: RealRun, bare: Mark) -> str:
    """images/s by the wall clock and their ratio; the CPU ratio is bare over real CPU seconds
    for the same steps (the work each did, whatever else ran on the machine)."""
    rate, bare_rate = real.wall.images_per_second, real.wall.images / bare[WALL]
    cpu_ratio = bare[CPU] / real.cpu.seconds
    return f"{label:<46} {rate:10.2f} {bare_rate:10.2f} {rate / bare_rate:6.2f} {cpu_ratio:9.2f}"


def breakdown(name: str, real: RealRun, bare: Mark) -> str:
    """Where one real step's time went, beside one bare step, by both clocks."""
    wall, cpu = real.wall, real.cpu
    per = 1.0 / wall.steps
    size = wall.checkpoint_bytes / max(1, wall.checkpoint_count) / 2**20
    rows = [
        ("real loop", wall.seconds * per, cpu.seconds * per, ""),
        (
            "  in step",
            wall.in_step * per,
            cpu.in_step * per,
            "forward, loss, backward, step, hooks",
        ),
        ("  between steps", wall.between_steps * per, cpu.between_steps * per, "next batch"),
        ("  epoch boundaries", wall.epoch_boundaries * per, cpu.epoch_boundaries * per, ""),
        (
            "    checkpoint saves",
            wall.checkpoints * per,
            cpu.checkpoints * per,
            f"{wall.checkpoint_count} saves of {size:.0f} MB on average",
        ),
        ("bare step", bare[WALL] * per, bare[CPU] * per, ""),
        ("loader alone, per batch", *real.loader_batch, ""),
        ("validation (excluded)", wall.validation * per, cpu.validation * per, ""),
    ]
    lines = [f"{name + ', seconds per step':<34} {'wall':>8} {'CPU':>8}"]
    lines += [f"  {label:<32} {w:8.3f} {c:8.3f}  {note}".rstrip() for label, w, c, note in rows]
    return "\n".join(lines)


# -- ablations: the real loop with one suspected cost removed -------------------------------------


def remove_callbacks(class_name: str) -> TrainerChange:
    def change(trainer: pl.Trainer) -> None:
        callbacks: list[Callback] = trainer.__dict__["callbacks"]
        callbacks[:] = [c for c in callbacks if class_name not in type(c).__name__]

    return change


def finetune_ablations() -> dict[str, tuple[dict[str, Any], TrainerChange | None]]:
    """label -> (params override, trainer change)."""

    def no_determinism(trainer: pl.Trainer) -> None:
        torch.use_deterministic_algorithms(False)

    def no_memory_fill(trainer: pl.Trainer) -> None:
        # Deterministic mode fills every new tensor's memory (NaN for floats) unless told not to.
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]

    def weights_only_checkpoint(trainer: pl.Trainer) -> None:
        for callback in trainer.__dict__["callbacks"]:
            if isinstance(callback, ModelCheckpoint):
                callback.save_weights_only = True

    def no_logger(trainer: pl.Trainer) -> None:
        trainer.loggers = []

    return {
        "as the stage runs": ({}, None),
        "deterministic off": ({}, no_determinism),
        "deterministic without memory fill": ({}, no_memory_fill),
        "best checkpoint weights only": ({}, weights_only_checkpoint),
        "no best checkpoint": ({}, remove_callbacks("ModelCheckpoint")),
        "no resume point": ({}, remove_callbacks("ResumePoint")),
        "no DVCLive logger": ({}, no_logger),
        "no progress bar": ({}, remove_callbacks("ProgressBar")),
        "num_workers 1": ({"finetune": {"trainer": {"num_workers": 1}}}, None),
    }


def pretrain_ablations() -> dict[str, dict[str, Any]]:
    """label -> extra lightly_train.pretrain arguments."""
    return {
        "as the stage runs": {},
        "no checkpoint callback": {"callbacks": {"model_checkpoint": None}},
        "checkpoint every 5 epochs": {"callbacks": {"model_checkpoint": {"every_n_epochs": 5}}},
        "no export callback": {"callbacks": {"model_export": None}},
        "no tensorboard logger": {"loggers": {"tensorboard": None}},
        "num_workers 1": {"num_workers": 1},
        "num_workers 2": {"num_workers": 2},
    }


def run_ablations(paths: ProjectPaths, base: dict[str, Any], args: argparse.Namespace) -> None:
    print("\nablations: the real loop with one cost removed (the bare loop measured once per part)")
    print(HEADER, flush=True)
    bare: Mark | None = None
    for label, (override, change) in finetune_ablations().items():
        epochs = {"finetune": {"epochs": args.epochs}}
        params = with_overrides(paths, base, deep_merge(epochs, override))
        fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
        run = finetune_real(params, paths, args.warmup, change)
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]
        bare = bare or finetune_bare(run, params, args.warmup)
        print(ratio_row(f"fine-tuning: {label}", run.real, bare), flush=True)
    params = load_params(paths.params)
    bare = None
    for label, extra in pretrain_ablations().items():
        arguments = {**pretrain_arguments(params, args.pretrain_epochs), **extra}
        out = Path(tempfile.mkdtemp(dir=paths.root))
        pre = pretrain_real(arguments, paths.processed_megadepth, out, args.pretrain_warmup)
        shutil.rmtree(out)
        bare = bare or pretrain_bare(pre, params.model.arch, args.pretrain_warmup)
        print(ratio_row(f"pretraining: {label}", pre.real, bare), flush=True)


# -------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    parser.add_argument("--warmup", type=int, default=4, help="fine-tuning warm-up steps")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--pretrain-warmup", type=int, default=2, help="pretraining warm-up steps")
    parser.add_argument("--data", type=Path, help="project folder to build once and reuse")
    parser.add_argument("--override", default="{}", help="JSON merged into params.yaml")
    parser.add_argument("--ablate", action="store_true", help="also each cost switched off")
    parser.add_argument("--profile", type=Path, help="cProfile the real loops into this folder")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["LIGHTLY_TRAIN_EVENTS_DISABLED"] = "1"
    base = deep_merge(committed_params(), json.loads(args.override))
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare_project(args.data or Path(tmp) / "project", base)
        load_before = os.getloadavg()[0]
        params = with_overrides(paths, base, {"finetune": {"epochs": args.epochs}})
        fine = finetune_real(params, paths, args.warmup, profile=args.profile)
        fine_bare = fine.real, finetune_bare(fine, params, args.warmup)

        params = load_params(paths.params)
        arguments = pretrain_arguments(params, args.pretrain_epochs)
        out = Path(tempfile.mkdtemp(dir=paths.root))
        pre = pretrain_real(
            arguments, paths.processed_megadepth, out, args.pretrain_warmup, args.profile
        )
        shutil.rmtree(out)
        pre_bare = pre.real, pretrain_bare(pre, params.model.arch, args.pretrain_warmup)

        print(
            f"\ntorch threads {torch.get_num_threads()}; 1-min load average "
            f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
        )
        print(HEADER)
        batch = params.finetune.batch_size
        print(ratio_row(f"fine-tuning ({fine.real.wall.steps} steps, batch {batch})", *fine_bare))
        method, batch = pre.resolved["method"], arguments["batch_size"]
        label = f"pretraining ({method}, {pre.real.wall.steps} steps, batch {batch})"
        print(ratio_row(label, *pre_bare))
        print("\n" + breakdown("fine-tuning", *fine_bare))
        print("\n" + breakdown("pretraining", *pre_bare))
        print(f"  pretraining: the whole lightly_train.pretrain call took {pre.call:.1f} s")
        if args.ablate:
            run_ablations(paths, base, args)


if __name__ == "__main__":
    main()
