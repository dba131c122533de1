"""A training stage among its ranks and beside other jobs (depthpipe.distributed): the launch
check on SLURM's and torchrun's variables, the project's leader lock held by real processes, the
prune of a recorded working folder in a real DVC project, per-rank augmentation in real
2-process DDP. The stages' own use of them: tests/stages/test_finetune.py and test_pretrain.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from depthpipe import distributed, doctor
from depthpipe.config import TrainerConfig, parse_params
from depthpipe.errors import DepthpipeError
from depthpipe.paths import project_paths
from depthpipe.stages import finetune, fingerprint, init_scratch
from tests.helpers import REPO, committed_params, deep_merge, run_main, run_module

# What a batch step of `sbatch --nodes=2 --ntasks-per-node=4` carries (no srun step).
BATCH_STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "depthpipe",
    "SLURM_NTASKS": "8",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "node[01-02]",
    "SLURM_CPUS_PER_TASK": "9",
}
# One task of `srun` in that job.
SRUN_TASK = {**BATCH_STEP, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8"}


def _trainer(**trainer: object) -> TrainerConfig:
    raw = deep_merge(committed_params(), {"finetune": {"trainer": trainer}})
    return parse_params(raw).finetune.trainer


GPU_2x4 = {"accelerator": "gpu", "devices": 4, "num_nodes": 2}


# -- ranks that exist ---------------------------------------------------------------------------


def test_check_launch__batch_step_announcing_absent_ranks_refuses() -> None:
    with pytest.raises(DepthpipeError, match=r"announces 8 tasks .* not an srun step"):
        distributed.check_launch("finetune", _trainer(**GPU_2x4), BATCH_STEP)


@pytest.mark.parametrize(
    ("env", "trainer"),
    [
        (SRUN_TASK, GPU_2x4),  # srun started all 8
        ({}, {"devices": 2}),  # no launcher, one node: Lightning's own processes
        ({"NODE_RANK": "1", "MASTER_ADDR": "node01"}, GPU_2x4),  # each node started by hand
        ({**BATCH_STEP, "SLURM_NTASKS": "1"}, {"devices": 1}),  # a one-task job
        ({**BATCH_STEP, "SLURM_JOB_NAME": "interactive"}, {"devices": 2}),  # salloc: Lightning's
    ],
)
def test_check_launch__ranks_that_exist_pass(env: dict[str, str], trainer: dict) -> None:
    distributed.check_launch("finetune", _trainer(**trainer), env)


@pytest.mark.parametrize(
    "env",
    [
        {},  # nothing: each node would wait for the others at the rendezvous
        {"MASTER_ADDR": "node01"},  # no node rank
        {"NODE_RANK": "0"},  # no address of node 0
        {**BATCH_STEP, "SLURM_JOB_NAME": "interactive"},  # salloc: SLURM starts no tasks
    ],
)
def test_check_launch__two_nodes_without_a_launcher_refuse(env: dict[str, str]) -> None:
    with pytest.raises(DepthpipeError, match=r"no launcher starts the other nodes .*NODE_RANK"):
        distributed.check_launch("finetune", _trainer(**GPU_2x4), env)


def test_check_launch__world_size_other_than_params_refuses_naming_them() -> None:
    with pytest.raises(DepthpipeError, match=r"step has 8 tasks, finetune.trainer devices 4 x"):
        distributed.check_launch("finetune", _trainer(devices=4), SRUN_TASK)
    torchrun = {"RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}
    with pytest.raises(DepthpipeError, match=r"torchrun starts 4 process\(es\) \(WORLD_SIZE\)"):
        distributed.check_launch("pretrain", _trainer(**GPU_2x4), {**torchrun, "WORLD_SIZE": "4"})
    distributed.check_launch("pretrain", _trainer(**GPU_2x4), {**torchrun, "WORLD_SIZE": "8"})


def test_cpu_warning__one_core_for_a_trainer_and_its_loaders() -> None:
    cfg = _trainer(num_workers=8)
    warning = distributed.cpu_warning("finetune", cfg, cores=1)
    assert warning is not None and "num_workers 8 + the trainer want 9" in warning
    assert "SRUN_CPUS_PER_TASK" in warning
    assert distributed.cpu_warning("finetune", cfg, cores=9) is None


@pytest.mark.slow
def test_finetune_in_a_batch_step_refuses_at_once(scratch_project: Path, tmp_path: Path) -> None:
    """The hang the issue reproduced (still waiting after 240 s): the stage started as one
    process with a batch step's SLURM variables now stops within its start-up, exit 2, nothing
    written. The real command line, in a new interpreter with those variables."""
    from tests.helpers import copy_project, write_params

    project = copy_project(scratch_project, tmp_path / "p")
    write_params(
        project, {"finetune": {"batch_size": 8, "trainer": {"devices": 4, "num_nodes": 2}}}
    )
    start = time.monotonic()
    result = run_module(
        "depthpipe.stages.finetune", "scratch", cwd=project, env=BATCH_STEP, timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "finetune: this SLURM job announces 8 tasks (SLURM_NTASKS)" in result.stderr
    assert time.monotonic() - start < 90
    assert not project_paths(project).finetune_dir("scratch").exists()
    assert not (project / ".depthpipe" / "finetune").exists()


# -- one leader per project --------------------------------------------------------------------


def _hold(root: Path, *command: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "depthpipe.distributed",
            "--root",
            str(root),
            "hold",
            "--",
            *command,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )


def _wait_for_holder(lock: Path, process: subprocess.Popen[str]) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        holder = distributed.read_holder(lock)
        if holder:
            return holder
        time.sleep(0.05)
    raise AssertionError(f"no holder written: {process.communicate()}")


@pytest.mark.slow
def test_leader_lock__second_leader_stops_at_once_naming_the_holder(
    scratch_project: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.helpers import copy_project

    root = copy_project(scratch_project, tmp_path / "p")
    lock = project_paths(root).leader_lock
    first = _hold(root, "sleep", "120")
    try:
        holder = _wait_for_holder(lock, first)
        assert holder["pid"] == first.pid and holder["what"] == "sleep 120"
        assert holder["host"] == socket.gethostname()
        named = f"held by sleep 120 (host {socket.gethostname()}, pid {first.pid}"

        # A second job's hold: refused at once, naming the first.
        start = time.monotonic()
        second = run_module(
            "depthpipe.distributed", "--root", str(root), "hold", "--", "true", cwd=root
        )
        assert second.returncode == 2 and named in second.stderr, second.stderr
        assert time.monotonic() - start < 60

        # A training stage started outside that job (a login node's dvc repro): refused too.
        assert run_main(finetune.main, "scratch", cwd=root) == 2
        assert named in capsys.readouterr().err
        assert not project_paths(root).finetune_dir("scratch").exists()

        # The doctor says so; inside the holder's own job (its token) the lock is the job's.
        assert doctor.leader_check(project_paths(root), {}).status == "FAIL"
        assert named.removeprefix("held by ") in doctor.leader_check(project_paths(root)).message
        own = {distributed.HOLDER_TOKEN: holder["token"]}
        assert doctor.leader_check(project_paths(root), own).status == "PASS"
        monkeypatch.setenv(distributed.HOLDER_TOKEN, holder["token"])
        with distributed.project_lock(lock, "finetune@scratch"):
            pass  # the job's own stage goes on (the lock stays the job's)
        assert distributed.read_holder(lock)["token"] == holder["token"]
        monkeypatch.delenv(distributed.HOLDER_TOKEN)
    finally:
        first.send_signal(signal.SIGKILL)  # a job killed outright: no chance to let go
        first.wait(timeout=60)

    # The lock went with its holder: the next leader takes it.
    third = run_module("depthpipe.distributed", "--root", str(root), "hold", "--", "true", cwd=root)
    assert third.returncode == 0, third.stderr
    assert doctor.leader_check(project_paths(root), {}).status == "PASS"


def test_hold__passes_its_token_to_the_command(tmp_path: Path) -> None:
    """The command runs under the lock with the token and the job id in its environment (what
    a stage of the same job, and launch/slurm.sbatch, compare with the lock file's)."""
    probe = (
        "import os; print(os.environ['DEPTHPIPE_LEADER_TOKEN'], os.environ['DEPTHPIPE_LEADER_JOB'])"
    )
    result = run_module(
        "depthpipe.distributed",
        "--root",
        str(tmp_path),
        "hold",
        "--",
        sys.executable,
        "-c",
        probe,
        cwd=tmp_path,
        env={"SLURM_JOB_ID": "77"},
    )
    assert result.returncode == 0, result.stderr
    holder = distributed.read_holder(project_paths(tmp_path).leader_lock)
    assert result.stdout.split() == [holder["token"], "77"]
    assert holder["slurm_job"] == "77"


def test_held_by_my_job__an_inherited_token_without_a_live_holder_is_not_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token a dead holder left in the lock file (or a job inherited from another): the
    lock is free, so a stage must take it itself, not trust the variable."""
    lock = project_paths(tmp_path).leader_lock
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"token": "dead", "what": "hold", "slurm_job": None}) + "\n")
    assert not distributed.held_by_my_job(lock, {distributed.HOLDER_TOKEN: "dead"})
    monkeypatch.setenv(distributed.HOLDER_TOKEN, "dead")
    with distributed.project_lock(lock, "finetune@scratch"):
        taken = distributed.read_holder(lock)
        assert taken["token"] != "dead" and taken["what"] == "finetune@scratch"
        assert distributed.is_held(lock)
    assert not distributed.is_held(lock)


def test_held_by_my_job__a_live_holder_of_another_slurm_job_is_not_this_jobs(
    tmp_path: Path,
) -> None:
    lock = project_paths(tmp_path).leader_lock
    holding = _hold(tmp_path, "sleep", "120", env={"SLURM_JOB_ID": "1"})
    try:
        token = _wait_for_holder(lock, holding)["token"]
        mine = {distributed.HOLDER_TOKEN: token}
        assert distributed.held_by_my_job(lock, {**mine, "SLURM_JOB_ID": "1"})
        assert not distributed.held_by_my_job(lock, {**mine, "SLURM_JOB_ID": "2"})
        assert not distributed.held_by_my_job(lock, {distributed.HOLDER_TOKEN: "other"})
    finally:
        holding.kill()
        holding.wait(timeout=60)
    assert not distributed.held_by_my_job(lock, {**mine, "SLURM_JOB_ID": "1"})  # gone with it


@pytest.mark.slow
def test_stage_lock__single_process_stages_refuse_while_another_leads(
    scratch_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """init_scratch and fingerprint (as fetch, preprocess and evaluate: cli.open_project) stop
    while another process holds the project; run alone, each takes the lock and lets go as its
    main ends, so `dvc repro` runs them one after another."""
    from tests.helpers import copy_project

    root = copy_project(scratch_project, tmp_path / "p")
    paths = project_paths(root)
    encoder = paths.encoder_file("scratch")
    encoder.unlink()
    holding = _hold(root, "sleep", "120")
    try:
        _wait_for_holder(paths.leader_lock, holding)
        capsys.readouterr()
        assert run_main(init_scratch.main, cwd=root) == 2
        assert f"held by sleep 120 (host {socket.gethostname()}, pid {holding.pid}" in (
            capsys.readouterr().err
        )
        assert not encoder.exists()
        # fingerprint alone goes on: a second `dvc repro` reaches it while the first still
        # runs, and it rewrites one small file (stages/fingerprint.py says why)
        assert run_main(fingerprint.main, cwd=root) == 0
    finally:
        holding.kill()
        holding.wait(timeout=60)
    assert run_main(init_scratch.main, cwd=root) == 0
    assert encoder.is_file()
    assert distributed.read_holder(paths.leader_lock)["what"] == "init_scratch"
    assert not distributed.is_held(paths.leader_lock)  # let go as main returned
    assert run_main(fingerprint.main, cwd=root) == 0


def _no_flock(fd: int, operation: int) -> None:
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))


@pytest.mark.parametrize(
    ("trainer", "env", "lone"),
    [
        (None, {}, True),  # a single-process stage on a laptop
        ({"devices": 1}, {}, True),  # the CPU demo's training
        ({"devices": 2}, {}, False),  # Lightning's own 2 processes share the project
        ({"devices": 1}, {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "d"}, True),  # one-task job
        ({"devices": 1}, {"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "d"}, False),  # a job's task
        (None, {"NODE_RANK": "0", "MASTER_ADDR": "n0"}, False),
    ],
)
def test_alone__decides_whether_a_filesystem_without_locks_only_warns(
    trainer: dict | None, env: dict[str, str], lone: bool
) -> None:
    assert distributed.alone(None if trainer is None else _trainer(**trainer), env) is lone


def test_project_lock__no_locks_warns_for_a_lone_process_and_refuses_otherwise(
    scratch_project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A filesystem without flock (NFS nolock without local locks, Lustre without -o flock)
    cannot be mounted here: flock(2) answers ENOLCK as it does there."""
    from tests.helpers import copy_project

    root = copy_project(scratch_project, tmp_path / "p")
    lock = project_paths(root).leader_lock
    monkeypatch.setattr(distributed.fcntl, "flock", _no_flock)
    refused = pytest.raises(distributed.NoLocks, match=r"leader.lock: this filesystem gives no")
    with refused, distributed.project_lock(lock, "finetune@scratch", lone=False):
        pass
    with distributed.project_lock(lock, "finetune@scratch", lone=True):
        pass
    assert "warning: " in capsys.readouterr().err
    for name in ("SLURM_NTASKS", "WORLD_SIZE", "RANK", "NODE_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert run_main(init_scratch.main, cwd=root) == 0  # the demo's stages go on, warned
    assert "gives no file locks" in capsys.readouterr().err
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "node01")
    assert run_main(init_scratch.main, cwd=root) == 2
    assert "error: " in capsys.readouterr().err


# -- prune after dvc commit --------------------------------------------------------------------


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        check=False,
    )


@pytest.mark.slow
def test_prune__removes_the_working_folder_only_once_dvc_recorded_the_outputs(
    tmp_path: Path,
) -> None:
    """In a real DVC project: the exported working folder stays while dvc.lock does not record
    the stage, and goes after `dvc commit` (the launch files' order)."""
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    assert _dvc(root, "init", "-q").returncode == 0
    (root / "dvc.yaml").write_text(
        "stages:\n  pretrain:\n    foreach: [conservative]\n    do:\n"
        "      cmd: 'true'\n      outs: ['models/${item}']\n"
    )
    (root / "models" / "conservative").mkdir(parents=True)
    (root / "models" / "conservative" / "encoder.pt").write_bytes(b"weights")
    paths = project_paths(root)
    done = paths.pretrain_workdir("conservative", "0123456789ab")
    unfinished = paths.pretrain_workdir("conservative", "ba9876543210")
    for folder in (done, unfinished):
        folder.mkdir(parents=True)
    (done / distributed.DONE_MARKER).write_text("{}\n")
    handoff = distributed.handoff_file(root, "conservative")  # the launch's, read by every rank
    handoff.write_text('{"launch": "slurm-7.0.r0"}\n')

    refused = run_module(
        "depthpipe.distributed", "--root", str(root), "prune", "pretrain@conservative", cwd=root
    )
    assert refused.returncode == 2 and "not recorded in dvc.lock" in refused.stderr
    assert done.is_dir() and handoff.is_file()

    committed = _dvc(root, "commit", "--force", "pretrain@conservative")
    assert committed.returncode == 0, committed.stderr
    assert distributed.prune(root, "pretrain@conservative") == [done]
    assert not done.exists() and unfinished.is_dir()  # no DONE marker: a run still going
    assert not handoff.exists()


def _always_changed_project(root: Path) -> None:
    """A real DVC project shaped like the pipeline: an always_changed stage (fingerprint) above
    init_scratch and a pretrain@<preset> stage, all run and recorded by `dvc repro`."""
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    assert _dvc(root, "init", "-q").returncode == 0
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  fingerprint:\n    cmd: echo same > fingerprint.txt\n    always_changed: true\n"
        "    outs: [fingerprint.txt]\n"
        "  init_scratch:\n    cmd: cp fingerprint.txt scratch.txt\n"
        "    deps: [fingerprint.txt]\n    outs: [scratch.txt]\n"
        "  pretrain:\n    foreach: [conservative]\n    do:\n"
        "      cmd: cp fingerprint.txt ${item}.txt\n"
        "      deps: [fingerprint.txt]\n      outs: ['${item}.txt']\n"
    )
    repro = _dvc(root, "repro")
    assert repro.returncode == 0, repro.stderr


@pytest.mark.slow
def test_recorded__judges_each_stage_alone_below_an_always_changed_stage(tmp_path: Path) -> None:
    """The check launch/slurm.sbatch runs before `dvc repro evaluate`: `dvc status --with-deps`
    reports every stage below the always_changed fingerprint (the job never scored); the
    `recorded` command passes recorded stages and fails naming the one that is not."""
    root = tmp_path / "project"
    _always_changed_project(root)
    targets = ("pretrain@conservative", "init_scratch")
    with_deps = _dvc(root, "status", "--quiet", "--with-deps", *targets)
    assert with_deps.returncode == 1  # what the job asked before: never up to date

    command = ("depthpipe.distributed", "--root", str(root), "recorded")
    fresh = run_module(*command, *targets, cwd=root)
    assert fresh.returncode == 0, fresh.stderr
    assert "up to date in dvc.lock: pretrain@conservative init_scratch" in fresh.stdout

    (root / "conservative.txt").write_text("trained under other params\n")
    stale = run_module(*command, *targets, cwd=root)
    assert stale.returncode == 2
    assert "not up to date in dvc.lock: pretrain@conservative (" in stale.stderr
    assert "modified" in stale.stderr and "init_scratch (" not in stale.stderr
    assert "resubmit the job" in stale.stderr

    unknown = run_module(*command, "pretrain@wild", cwd=root)
    assert unknown.returncode == 2 and "pretrain@wild" in unknown.stderr


def test_recorded_on_exit__dvc_stage_address_in_any_form() -> None:
    """DVC sets DVC_STAGE to stage.addressing: the bare name, or `<dvc.yaml path>:<name>`."""
    stage = "finetune@scratch"
    for address in (stage, f"dvc.yaml:{stage}", f"../dvc.yaml:{stage}", f"sub/dvc.yaml:{stage}"):
        assert distributed.recorded_on_exit(stage, {"DVC_STAGE": address}), address
    for address in ("", "finetune@scratch2", "dvc.yaml:finetune@conservative", "xfinetune@scratch"):
        assert not distributed.recorded_on_exit(stage, {"DVC_STAGE": address}), address
    assert not distributed.recorded_on_exit(stage, {})


# -- per-rank augmentation ---------------------------------------------------------------------


def _probe(out: Path, *flags: str) -> tuple[list[float], list[float]]:
    out.mkdir()
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ddp_seed_probe.py"), str(out), *flags],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks[0], ranks[1]


@pytest.mark.slow
def test_rank_seed__two_processes_draw_their_own_augmentations(tmp_path: Path) -> None:
    """Real 2-process DDP on the CPU, num_workers 0, the same pixels on both ranks: without
    RankSeed both draw identical crops and flips; with it they differ, and rank 0's draws are
    the one-process run's own (unchanged)."""
    before = _probe(tmp_path / "before", "--no-rank-seed")
    assert before[0] == before[1] and len(before[0]) == 8  # 2 epochs x 2 steps x 2 samples
    rank0, rank1 = _probe(tmp_path / "after")
    assert rank0 == before[0]
    assert len(rank1) == len(rank0) and rank1 != rank0
    assert len(set(rank0) & set(rank1)) == 0


def test_project_lock__unopenable_lock_file_is_a_clear_error(tmp_path: Path) -> None:
    """A file where .depthpipe should be a folder: an error naming the lock, no traceback."""
    (tmp_path / ".depthpipe").write_text("not a folder\n")
    lock = project_paths(tmp_path).leader_lock
    with (
        pytest.raises(DepthpipeError, match=r"leader.lock: cannot open the project's lock file"),
        distributed.project_lock(lock, "evaluate"),
    ):
        pass
