"""A training stage among its ranks and beside other jobs: what a multi-node run needs.

- ``check_launch``: refuse at once when the environment announces ranks that do not exist (a
  single-process ``dvc`` step inside a SLURM batch job would otherwise wait 30 minutes in
  ``init_process_group`` for ranks that never come), or a world size the params do not ask for.
- ``project_lock``, ``stage_lock`` and ``python -m depthpipe.distributed hold``: one leader per
  project. A file lock (``flock``), so it goes with its holder when that dies, even by SIGKILL;
  the lock file's text names the holder for whoever is refused. Every stage takes it (the
  single-process ones for their whole ``main``, a training stage's rank 0 while it trains).
- ``stop_on_sigterm`` / ``sigterm_ends_training``: a SIGTERM (time limit, scancel) ends the
  stage with a non-zero status (``errors.Terminated``), never Lightning's bare exit 0.
- ``discard_outputs``, ``DONE_MARKER``, ``remove_when_recorded`` and ``python -m
  depthpipe.distributed prune``: outputs are never left for ``dvc commit`` to record from an
  unfinished run, and a working folder goes only once its outputs are recorded.
- ``python -m depthpipe.distributed recorded STAGE...``: whether dvc.lock records those stages
  as up to date, each on its own (launch/slurm.sbatch asks before ``dvc repro evaluate``).

Plain Python (no torch, no Lightning): `hold` and the doctor import it in a second. The
Lightning parts of the same story are in depthpipe.trainer_plugins.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from depthpipe.config import TrainerConfig
from depthpipe.errors import DepthpipeError, Terminated, run_cli
from depthpipe.paths import project_paths

# Written into a working folder once its outputs are exported: a re-run with the same key
# exports again instead of training again.
DONE_MARKER = "depthpipe-complete.json"
# Set by `hold` for the command it runs: the token its lock file holds. A stage of the same job
# (srun's tasks inherit the batch step's environment) then knows the lock is its own job's.
HOLDER_TOKEN = "DEPTHPIPE_LEADER_TOKEN"
# Set by `hold` beside the token: the SLURM job that holds the lock ("" outside a job). A job
# submitted from inside another one inherits both; launch/slurm.sbatch compares this with its
# own SLURM_JOB_ID before it trusts them.
HOLDER_JOB = "DEPTHPIPE_LEADER_JOB"
# Errors of flock(2) on a filesystem that gives no locks (Lustre mounted without -o flock or
# -o localflock): two leaders could then run at once unseen. (NFS nolock and local_lock=flock
# give node-local locks that never fail: the doctor's leader line reads the mount options.)
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


# -- ranks that exist ---------------------------------------------------------------------------


def slurm_manages(env: Mapping[str, str]) -> bool:
    """Lightning's rule (SLURMEnvironment.detect): a job with SLURM_NTASKS, unless it is an
    interactive one (named bash or interactive), where Lightning starts the processes itself."""
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def torchrun_manages(env: Mapping[str, str]) -> bool:
    """Lightning's rule (TorchElasticEnvironment.detect)."""
    return all(k in env for k in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


def check_launch(section: str, cfg: TrainerConfig, env: Mapping[str, str] | None = None) -> None:
    """Raise unless the ranks the launcher announces exist and match ``section.trainer``.

    Inside a SLURM job Lightning takes SLURM_NTASKS for the world size and SLURM_PROCID for the
    rank, in the batch step too, where no other task runs: only an ``srun`` step starts
    SLURM_STEP_NUM_TASKS tasks. Without a launcher (or with Lightning's own processes) nothing
    announces a world size, and there is nothing to check.
    """
    env = os.environ if env is None else env
    wanted = cfg.devices * cfg.num_nodes
    asked = f"{section}.trainer devices {cfg.devices} x num_nodes {cfg.num_nodes} = {wanted}"
    if slurm_manages(env):
        announced = int(env["SLURM_NTASKS"])
        started = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
        if announced > 1 and started != announced:
            raise DepthpipeError(
                f"{section}: this SLURM job announces {announced} tasks (SLURM_NTASKS) but this "
                f"process is one of {started} (SLURM_STEP_NUM_TASKS "
                f"{env.get('SLURM_STEP_NUM_TASKS', 'unset: not an srun step')}): it would wait "
                "for ranks that never come. Run the training stages under srun "
                "(launch/slurm.sbatch), never through dvc repro inside the job"
            )
        if announced != wanted:
            raise DepthpipeError(f"{section}: the SLURM step has {announced} tasks, {asked}")
    elif torchrun_manages(env):
        if int(env.get("WORLD_SIZE", "1")) != wanted:
            raise DepthpipeError(
                f"{section}: torchrun starts {env.get('WORLD_SIZE')} process(es) (WORLD_SIZE), "
                f"{asked}"
            )
    elif cfg.num_nodes > 1 and not names_its_node(env):
        # Lightning's own processes (no launcher) on several nodes need every node started by
        # hand with NODE_RANK and MASTER_ADDR; without them each node waits for the others at
        # the rendezvous until NCCL's timeout.
        raise DepthpipeError(
            f"{section}: {asked}, but no launcher starts the other nodes (no srun step, no "
            "torchrun) and NODE_RANK / MASTER_ADDR are unset: use launch/slurm.sbatch or "
            "launch/torchrun.sh (docs/clusters.md)"
        )


def names_its_node(env: Mapping[str, str]) -> bool:
    """Whether the environment says which node this is and where node 0 is (Lightning's
    LightningEnvironment reads NODE_RANK or GROUP_RANK, and MASTER_ADDR)."""
    return ("NODE_RANK" in env or "GROUP_RANK" in env) and "MASTER_ADDR" in env


def launched(env: Mapping[str, str]) -> bool:
    """Whether a launcher (a SLURM job's tasks, torchrun) or a hand-started node set runs this."""
    return slurm_manages(env) or torchrun_manages(env) or names_its_node(env)


def alone(cfg: TrainerConfig | None, env: Mapping[str, str] | None = None) -> bool:
    """Whether this is the only process of its run (one device on one node, or a
    single-process stage: ``cfg`` None), with no launcher announcing more (a one-task SLURM
    job counts as alone: `sbatch --wrap "dvc repro"` on one GPU). There a filesystem without
    file locks is a warning, not a refusal: no other rank shares the project, and a laptop's,
    a workstation's or a one-GPU job's odd filesystem must not stop the run."""
    env = os.environ if env is None else env
    one = cfg is None or cfg.devices * cfg.num_nodes == 1
    one_task_job = slurm_manages(env) and env.get("SLURM_NTASKS") == "1"
    others = torchrun_manages(env) or names_its_node(env)
    return one and not others and (one_task_job or not slurm_manages(env))


def cpu_warning(section: str, cfg: TrainerConfig, cores: int) -> str | None:
    """A warning when this rank may run on fewer cores than its trainer and loader processes
    (``srun`` without --cpus-per-task gives one core per task on Slurm 22.05+)."""
    wanted = cfg.num_workers + 1
    if cores >= wanted:
        return None
    return (
        f"warning: {section}: this process may run on {cores} core(s), but "
        f"{section}.trainer.num_workers {cfg.num_workers} + the trainer want {wanted}: give srun "
        "--cpus-per-task or export SRUN_CPUS_PER_TASK (docs/clusters.md)"
    )


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_rank(section: str, cfg: TrainerConfig) -> None:
    """``check_launch`` on this process's environment, and the cores warning on stderr."""
    check_launch(section, cfg)
    warning = cpu_warning(section, cfg, usable_cores())
    if warning and slurm_manages(os.environ):
        print(warning, file=sys.stderr, flush=True)


# -- one leader per project ---------------------------------------------------------------------


def describe_self(what: str) -> dict[str, Any]:
    """Who holds the lock, in the words a refused user needs to find it."""
    return {
        "what": what,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "token": uuid.uuid4().hex,
    }


def holder_text(holder: Mapping[str, Any]) -> str:
    job = f"SLURM job {holder['slurm_job']}, " if holder.get("slurm_job") else ""
    return (
        f"{holder.get('what', '?')} ({job}host {holder.get('host', '?')}, "
        f"pid {holder.get('pid', '?')}, since {holder.get('since', '?')})"
    )


def read_holder(lock: Path) -> dict[str, Any]:
    """The holder the lock file names ({} when unreadable: written a moment ago, or never)."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class NoLocks(DepthpipeError):
    """The project's filesystem gives no file locks (flock fails with ENOLCK and the like)."""


def _no_locks(lock: Path, error: OSError) -> NoLocks:
    return NoLocks(
        f"{lock}: this filesystem gives no file locks ({error.strerror}), so two jobs could "
        "lead this project at once: mount it with locks across nodes (Lustre: -o flock; NFS: "
        "without nolock, with local_lock=none), see docs/clusters.md"
    )


def try_lock(lock: Path) -> int | None:
    """An open descriptor holding ``lock`` exclusively, or None when another holds it."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:  # a read-only project, a file where the folder should be
        raise DepthpipeError(
            f"{lock}: cannot open the project's lock file: {error.strerror}"
        ) from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as error:
        os.close(fd)
        if error.errno in NO_LOCKS:
            raise _no_locks(lock, error) from error
        raise
    return fd


def is_held(lock: Path) -> bool:
    """Whether some process holds ``lock`` now: a try-lock on a fresh descriptor fails (flock
    locks belong to an open file, so this fails even in the holder itself)."""
    if not lock.is_file():
        return False
    fd = try_lock(lock)
    if fd is None:
        return True
    os.close(fd)
    return False


def held_by_my_job(lock: Path, env: Mapping[str, str] | None = None) -> bool:
    """Whether the lock's holder is the `hold` command this process runs under: the token it
    inherited is the one in the lock file, the file is locked right now (a token inherited from
    a holder that has since died would otherwise pass), and inside a SLURM job the holder is
    this job (a job submitted from within another inherits the other's token)."""
    env = os.environ if env is None else env
    token = env.get(HOLDER_TOKEN)
    holder = read_holder(lock)
    if not token or holder.get("token") != token:
        return False
    job = env.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job") != job:
        return False
    return is_held(lock)


def acquire(lock: Path, what: str) -> tuple[int, dict[str, Any]]:
    """Take the lock and write its holder into it; raise naming the holder when it is taken."""
    fd = try_lock(lock)
    if fd is None:
        holder = read_holder(lock)
        raise DepthpipeError(
            f"{lock}: the project is held by {holder_text(holder)}; wait for it to end or "
            "cancel it (scancel / kill), then run again"
        )
    holder = describe_self(what)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return fd, holder


def take(lock: Path, what: str, lone: bool) -> int | None:
    """The descriptor holding ``lock`` for ``what``; None when nothing needs closing: this
    process's job holds it already (`hold`), or the filesystem gives no locks and ``lone``
    (see ``alone``), which is said on stderr."""
    if held_by_my_job(lock):
        return None
    try:
        fd, _ = acquire(lock, what)
    except NoLocks as error:
        if not lone:
            raise
        print(f"warning: {error}; going on: this is the run's only process", file=sys.stderr)
        return None
    return fd


@contextlib.contextmanager
def project_lock(lock: Path, what: str, lone: bool = False) -> Iterator[None]:
    """Hold the project's lock while the block runs, unless this process's job already holds
    it (`hold` in launch/slurm.sbatch). Released when the block ends or the process dies."""
    fd = take(lock, what, lone)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases a flock


# The descriptor a single-process stage holds from open_project until its main returns
# (errors.run_cli calls release_stage_lock): evaluate, fetch, ... need no code of their own.
_STAGE_LOCK: list[int] = []


def stage_lock(lock: Path, what: str) -> None:
    """Take the project's lock for the rest of this stage's ``main`` (release_stage_lock)."""
    fd = take(lock, what, alone(None))
    if fd is not None:
        _STAGE_LOCK.append(fd)


def release_stage_lock() -> None:
    """Let go of what stage_lock took (a no-op when it took nothing)."""
    while _STAGE_LOCK:
        os.close(_STAGE_LOCK.pop())


def hold(root: Path, command: Sequence[str]) -> None:
    """Take the lock, then become ``command`` (exec): the lock stays with it and its children
    until the last of them exits; they find the token in HOLDER_TOKEN."""
    if not command:
        raise DepthpipeError("hold: name the command to run after --")
    lock = project_paths(root).leader_lock
    fd, holder = acquire(lock, " ".join(command))
    os.set_inheritable(fd, True)  # the lock lives in the open file: keep it across exec
    os.environ[HOLDER_TOKEN] = holder["token"]
    os.environ[HOLDER_JOB] = holder["slurm_job"] or ""
    sys.stdout.flush()
    try:
        os.execvp(command[0], list(command))
    except OSError as error:
        raise DepthpipeError(f"hold: cannot run {command[0]}: {error.strerror}") from error


# -- SIGTERM ------------------------------------------------------------------------------------


class _Sigterm:
    received = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _Sigterm.received = True
    # While a Lightning Trainer runs, its handler calls this one after its own: it finishes the
    # step, tells the other ranks and raises SIGTERMException, which sigterm_ends_training turns
    # into Terminated. Called directly (no Trainer running), nobody else stops the stage.
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        raise Terminated("SIGTERM: nothing was published; run the stage again to resume")


def stop_on_sigterm() -> None:
    """From now on SIGTERM ends this process with errors.Terminated (exit 143 via run_cli)."""
    _Sigterm.received = False
    signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def sigterm_ends_training() -> Iterator[None]:
    """Around a Lightning (or LightlyTrain) fit: Lightning ends a fit that received SIGTERM with
    a bare SystemExit, exit status 0, as if it had finished; raise Terminated instead."""
    try:
        yield
    except SystemExit as stop:
        if _Sigterm.received:
            raise Terminated("SIGTERM during training: nothing was published") from stop
        raise
    if _Sigterm.received:  # the signal came as the last step ended
        raise Terminated("SIGTERM at the end of training: nothing was published")


# -- outputs and working folders ----------------------------------------------------------------


def discard_outputs(*finals: Path) -> None:
    """Remove a stage's outputs before it works, as ``dvc repro`` does: a run outside DVC (srun,
    torchrun) that ends early then leaves nothing ``dvc commit`` could record as its result."""
    for final in finals:
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()


def recorded_on_exit(stage: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether DVC runs this very stage (it sets DVC_STAGE) and so records its outputs the
    moment it exits; under a launcher ``dvc commit`` comes later, in another command.

    DVC sets DVC_STAGE to the stage's address: the bare name for the dvc.yaml of the folder it
    runs in, else ``<path to dvc.yaml>:<name>`` (``dvc.yaml:finetune@scratch`` or
    ``../dvc.yaml:finetune@scratch``, by where ``dvc repro`` was started).
    """
    address = (os.environ if env is None else env).get("DVC_STAGE", "")
    return address == stage or address.endswith(f":{stage}")


def remove_when_recorded(stage: str, workdir: Path) -> None:
    """Remove the working folder if DVC records the outputs as this process exits; otherwise
    keep it (with its DONE_MARKER): a kill before `dvc commit` then re-exports instead of
    training again, and `python -m depthpipe.distributed prune` removes it after the commit."""
    if recorded_on_exit(stage):
        shutil.rmtree(workdir)


def done_workdirs(root: Path, stage: str, item: str) -> list[Path]:
    """``item``'s working folders of ``stage`` whose outputs were exported (DONE_MARKER)."""
    folder = project_paths(root).training_workdirs(stage)
    own = re.compile(rf"{re.escape(item)}-[0-9a-f]{{12}}")
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if own.fullmatch(p.name) and (p / DONE_MARKER).is_file()
    )


def stale_stages(root: Path, targets: Sequence[str], command: str) -> dict[str, Any]:
    """``{target: what changed}`` for each of ``targets`` that dvc.lock does not record as up
    to date, each judged on its own: its own deps, params and outs against dvc.lock, never its
    upstream stages'. (``dvc status --with-deps`` always reports a stage below the
    ``always_changed`` fingerprint stage, which is why the job does not ask it.)"""
    from dvc.repo import Repo  # heavy, and only these commands need it

    stale: dict[str, Any] = {}
    try:
        # From inside the project: DVC resolves a stage's paths against the working folder.
        with contextlib.chdir(root), Repo(".") as repo:
            for target in targets:
                changed = repo.status(targets=[target])
                if changed:
                    stale[target] = changed
    except Exception as error:  # DVC's errors for a bad project or target are many
        raise DepthpipeError(
            f"{command}: {' '.join(targets)}: DVC cannot tell whether they are recorded: "
            f"{type(error).__name__}: {error}"
        ) from error
    return stale


def check_recorded(root: Path, targets: Sequence[str]) -> None:
    """Raise naming each of ``targets`` that dvc.lock does not record as up to date."""
    if not targets:
        raise DepthpipeError("recorded: name the stages to check (e.g. finetune@scratch)")
    stale = stale_stages(root, targets, "recorded")
    if stale:
        named = "; ".join(
            f"{target} ({describe_change(changed)})" for target, changed in stale.items()
        )
        raise DepthpipeError(
            f"recorded: not up to date in dvc.lock: {named}. Run them again (resubmit the job)"
        )


def describe_change(changed: Mapping[str, Any]) -> str:
    """DVC's status of one stage ({address: [what changed]}) in a line."""
    return "; ".join(json.dumps(what, default=str) for what in changed.values())


def handoff_file(root: Path, preset: str) -> Path:
    """Pretraining's hand-off from rank 0 to the other ranks of one launch
    (depthpipe.stages.pretrain)."""
    return project_paths(root).training_workdirs("pretrain") / f"{preset}.handoff.json"


def prune(root: Path, target: str) -> list[Path]:
    """Remove the exported working folders of ``target`` (stage@item) once dvc.lock records it
    as up to date; refuse (keeping them) while it does not. Holds the project's lock (its job's
    own under `hold`): no other leader is then writing the folders."""
    stage, _, item = target.partition("@")
    if stage not in ("pretrain", "finetune") or not item:
        raise DepthpipeError(f"prune: {target}: expected pretrain@<preset> or finetune@<name>")
    with project_lock(project_paths(root).leader_lock, f"prune {target}", alone(None)):
        stale = stale_stages(root, [target], "prune")
        if stale:
            raise DepthpipeError(
                f"prune: {target} is not recorded in dvc.lock as up to date "
                f"({describe_change(stale[target])}); its working folder stays: run dvc "
                "commit first"
            )
        removed = done_workdirs(root, stage, item)
        for workdir in removed:
            shutil.rmtree(workdir)
        if stage == "pretrain":
            # The launch that wrote it has ended: no rank reads it again.
            handoff_file(root, item).unlink(missing_ok=True)
    return removed


# -- the command ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m depthpipe.distributed",
        description="hold: run a command holding the project's leader lock (launch/slurm.sbatch); "
        "prune: remove a recorded training stage's working folders; recorded: fail naming each "
        "stage dvc.lock does not record as up to date.",
    )
    parser.add_argument("--root", type=Path, default=Path("."), help="project folder")
    commands = parser.add_subparsers(dest="command", required=True)
    held = commands.add_parser("hold", help="hold the lock, then exec COMMAND")
    held.add_argument("run", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    pruned = commands.add_parser("prune", help="remove STAGE@ITEM's exported working folders")
    pruned.add_argument("target", help="pretrain@<preset> or finetune@<name>")
    checked = commands.add_parser("recorded", help="fail unless dvc.lock records each STAGE")
    checked.add_argument("targets", nargs="+", help="stage names (pretrain@<preset>, ...)")
    args = parser.parse_args(argv)
    if args.command == "hold":
        hold(args.root, [w for i, w in enumerate(args.run) if not (i == 0 and w == "--")])
    elif args.command == "recorded":
        check_recorded(args.root, args.targets)
        print(f"recorded: up to date in dvc.lock: {' '.join(args.targets)}")
    else:
        for workdir in prune(args.root, args.target):
            print(f"prune: removed {workdir}")


if __name__ == "__main__":
    run_cli(main)
