"""The pre-flight check (``python -m depthpipe.doctor``) and the launch files in launch/.

The doctor's whole command (``doctor.main``: argument parsing, every check, the printed report,
the exit status) runs in-process on a temporary copy of the project's DVC set-up with params
written by tests/helpers.py; a new interpreter importing torch costs ~5 s a run, so one test
alone runs ``python -m depthpipe.doctor`` as a subprocess to prove the command line's exit
status. Small disks and read-only remotes are real tmpfs mounts where this machine allows
mounting (as root), else skipped. The pure decisions (precision and devices on a GPU node this
machine does not have) are called directly with a ``Hardware`` value.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from depthpipe import doctor
from depthpipe.config import TrainerConfig, load_params, parse_params
from depthpipe.data.packed import PackedWriter
from depthpipe.paths import project_paths
from depthpipe.stages import fetch
from tests.helpers import REPO, committed_params, deep_merge, run_module, write_params

LAUNCH = REPO / "launch"
LAUNCH_FILES = (LAUNCH / "slurm.sbatch", LAUNCH / "torchrun.sh")
# A synthetic data set far larger than any disk: 400 + 400 scenes x 99 scans x 216 views at
# 4096x3072 (petabytes), within the config's bounds.
HUGE = {
    "data": {
        "synthetic": {
            "width": 4096,
            "height": 3072,
            "train_scenes": 400,
            "val_scenes": 400,
            "scans_per_scene": 99,
            "views_per_scan": 216,
        }
    }
}


def _dvc_config(root: Path, remote: Path | str | None) -> None:
    """.dvc/config as the committed one, with the default remote at ``remote`` (None: none)."""
    lines = ["[cache]", '    type = "reflink,hardlink,copy"']
    if remote is not None:
        lines = [
            "[core]",
            "    remote = store",
            *lines,
            "['remote \"store\"']",
            f"    url = {remote}",
        ]
    (root / ".dvc").mkdir(exist_ok=True)
    (root / ".dvc" / "config").write_text("\n".join(lines) + "\n")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC project folder with the tiny params and an existing local-folder remote."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (tmp_path / "storage").mkdir()
    _dvc_config(root, tmp_path / "storage")
    write_params(root)
    return root


RunDoctor = Callable[[Path], tuple[int, list[str]]]


@pytest.fixture
def run_doctor(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> RunDoctor:
    """run(root) -> (exit status, printed lines) of ``python -m depthpipe.doctor --root root``,
    called in-process from the project folder as the command line would be. The doctor reads
    os.environ (SLURM_*, WORLD_SIZE) at call time, so a test sets a variable with
    monkeypatch.setenv; CUDA_VISIBLE_DEVICES it does not: torch reads that once per process, so
    a test of it would need a subprocess."""

    def run(root: Path) -> tuple[int, list[str]]:
        monkeypatch.chdir(root)
        capsys.readouterr()  # only this run's report
        code = doctor.main(["--root", str(root)])
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        return code, out.splitlines()

    return run


def _lines(lines: list[str], status: str, topic: str) -> list[str]:
    return [line for line in lines if re.match(rf"{status} +{re.escape(topic)} ", line)]


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Any]:
    """mount(folder, size, read_only=False): a real small filesystem, unmounted afterwards."""
    mounted: list[Path] = []

    def mount(folder: Path, size: str, read_only: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(folder)

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], check=True)


# --- the real module on a real project ------------------------------------------------------


def test_doctor__committed_demo_params_pass(project: Path, run_doctor: RunDoctor) -> None:
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    code, lines = run_doctor(project)
    assert code == 0, "\n".join(lines)
    assert not [line for line in lines if line.startswith("FAIL")], lines
    for topic in ("params", "accelerator", "precision", "devices", "disk", "remote", "raw data"):
        assert _lines(lines, "PASS", topic), f"no PASS {topic} line in {lines}"
    assert len(_lines(lines, "PASS", "disk")) == 4  # fetch work folder, raw, processed, cache
    assert any("reachable and writable" in line for line in _lines(lines, "PASS", "remote"))
    assert _lines(lines, "PASS", "raw data") == [
        "PASS raw data    not fetched yet (source synthetic)"
    ]
    assert lines[-1].startswith("doctor: ") and lines[-1].endswith("0 failed: ready")
    # The probes left nothing behind: the remote is empty, no link-test file in the project.
    assert list((project.parent / "storage").iterdir()) == []
    assert not list(project.glob("*link-probe*"))


def test_doctor__bad_params_yaml_is_a_fail_line_naming_the_key(
    project: Path, run_doctor: RunDoctor
) -> None:
    write_params(project, {"finetune": {"lr": 20.0}})
    code, lines = run_doctor(project)
    assert code == 1
    assert _lines(lines, "FAIL", "params") == [
        "FAIL params      finetune.lr: 20.0 is above the maximum 10.0"
    ]
    assert "1 failed" in lines[-1]


def test_doctor__missing_params_yaml_fails(project: Path, run_doctor: RunDoctor) -> None:
    (project / "params.yaml").unlink()
    code, lines = run_doctor(project)
    assert code == 1
    assert any("params file not found" in line for line in _lines(lines, "FAIL", "params"))


@pytest.mark.parametrize("accelerator", ["cpu", "gpu"])
def test_doctor__bf16_without_a_cuda_gpu_fails(
    project: Path, accelerator: str, run_doctor: RunDoctor
) -> None:
    trainer = {"accelerator": accelerator, "precision": "bf16-mixed"}
    write_params(project, {"finetune": {"trainer": trainer}})
    code, lines = run_doctor(project)
    assert code == 1
    fails = _lines(lines, "FAIL", "precision")
    assert len(fails) == 1 and fails[0].startswith(
        f"FAIL precision   finetune.trainer: precision bf16-mixed on accelerator {accelerator}"
    )
    expected = "bf16 needs a CUDA GPU" if accelerator == "cpu" else "no gpu device on this node"
    assert expected in fails[0]
    assert _lines(lines, "PASS", "precision")[0].startswith("PASS precision   pretrain.trainer")


def test_doctor__four_gpus_requested_on_a_node_without_any_fail(
    project: Path, run_doctor: RunDoctor
) -> None:
    trainer = {"accelerator": "gpu", "devices": 4}
    write_params(project, {"pretrain": {"trainer": trainer}, "finetune": {"trainer": trainer}})
    code, lines = run_doctor(project)
    assert code == 1
    assert _lines(lines, "FAIL", "devices") == [
        f"FAIL devices     {section}.trainer: 4 device(s) x 1 node(s) = 4 process(es) on gpu: "
        "this node has 0 GPUs"
        for section in ("pretrain", "finetune")
    ]


def test_doctor__data_beyond_any_disk_fails(project: Path, run_doctor: RunDoctor) -> None:
    write_params(project, HUGE)
    code, lines = run_doctor(project)
    assert code == 1
    raw = [line for line in _lines(lines, "FAIL", "disk") if " data/raw: " in line]
    assert raw and re.search(r"needs ~[\d.]+ TB; [\d.]+ [KMGT]?B free on /", raw[0]), raw


def test_doctor__data_on_a_small_disk_fails_there_only(
    project: Path, mount_tmpfs: Any, run_doctor: RunDoctor
) -> None:
    # data/ on its own 4 MB filesystem; one 1024x768 sample alone is ~8.6 MB raw.
    mount_tmpfs(project / "data", "4m")
    write_params(project, {"data": {"synthetic": {"width": 1024, "height": 768}}})
    code, lines = run_doctor(project)
    assert code == 1
    disk = {line.split(":")[0].split()[-1]: line for line in lines if " disk " in line}
    data = project / "data"
    for place in ("data/raw", "data/processed"):
        assert disk[place].startswith("FAIL"), disk[place]
        assert f"4.0 MB free on {data} " in disk[place], disk[place]
    # The cache stays on the big filesystem: hard links cannot cross, so DVC copies, and the
    # copies fit there.
    cache = next(line for key, line in disk.items() if "cache" in key)
    assert cache.startswith("PASS") and "cache.type gives copy" in cache, cache
    assert disk[".depthpipe/fetch"].startswith("PASS")


def test_doctor__fetched_data_are_reported_and_need_no_disk(
    project: Path, run_doctor: RunDoctor
) -> None:
    paths = project_paths(project)
    fetch.run(load_params(paths.params), paths)
    code, lines = run_doctor(project)
    assert code == 0, lines
    (state,) = _lines(lines, "PASS", "raw data")
    assert re.fullmatch(
        r"PASS raw data    fetched \(source synthetic; diode_train \d+, diode_val \d+, "
        r"megadepth \d+\), as params say",
        state,
    ), state
    raw = next(line for line in lines if " data/raw: " in line)
    assert "needs ~0 B (already there for these params)" in raw
    # Other params: fetch will run again, and the doctor says so.
    write_params(project, {"data": {"megadepth_max_images": 3}})
    code, lines = run_doctor(project)
    assert code == 0
    assert _lines(lines, "WARN", "raw data")[0].endswith("but params differ: fetch runs again")


def test_doctor__remote_under_a_file_fails(
    project: Path, tmp_path: Path, run_doctor: RunDoctor
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    _dvc_config(project, tmp_path / "a-file" / "storage")
    code, lines = run_doctor(project)
    assert code == 1
    (fail,) = _lines(lines, "FAIL", "remote")
    assert fail.startswith(
        f"FAIL remote      store ({tmp_path / 'a-file' / 'storage'}): not writable"
    )


def test_doctor__read_only_remote_fails(
    project: Path, tmp_path: Path, mount_tmpfs: Any, run_doctor: RunDoctor
) -> None:
    mount_tmpfs(tmp_path / "read-only", "1m", read_only=True)
    _dvc_config(project, tmp_path / "read-only")
    code, lines = run_doctor(project)
    assert code == 1
    (fail,) = _lines(lines, "FAIL", "remote")
    assert "not writable" in fail and "Read-only file system" in fail, fail


def test_doctor__remote_folder_not_made_yet_warns_and_stays_absent(
    project: Path, tmp_path: Path, run_doctor: RunDoctor
) -> None:
    remote = tmp_path / "shares" / "depthpipe"
    _dvc_config(project, remote)
    code, lines = run_doctor(project)
    assert code == 0
    (warn,) = _lines(lines, "WARN", "remote")
    assert "does not exist yet, writable" in warn
    assert not (tmp_path / "shares").exists()  # the probe's folders were removed again


def test_doctor__no_remote_warns(project: Path, run_doctor: RunDoctor) -> None:
    _dvc_config(project, None)
    code, lines = run_doctor(project)
    assert code == 0
    assert _lines(lines, "WARN", "remote") == [
        "WARN remote      no default DVC remote: dvc push has nowhere to go"
    ]


def test_doctor__command_line_exits_1_on_a_fail_and_0_on_a_pass(project: Path) -> None:
    """The real command, ``python -m depthpipe.doctor``, in a new interpreter: the one path the
    in-process tests skip (``__main__`` turning main's status into the process's exit status)."""

    def command_line() -> tuple[int, list[str]]:
        result = run_module("depthpipe.doctor", "--root", str(project), cwd=project, timeout=300)
        assert "Traceback" not in result.stderr, result.stderr
        return result.returncode, result.stdout.splitlines()

    write_params(project, {"finetune": {"lr": 20.0}})
    code, lines = command_line()
    assert code == 1, lines
    assert _lines(lines, "FAIL", "params") == [
        "FAIL params      finetune.lr: 20.0 is above the maximum 10.0"
    ]
    assert lines[-1].endswith("1 failed: not ready: fix the FAIL lines"), lines
    write_params(project)
    code, lines = command_line()
    assert code == 0, lines
    assert lines[-1].startswith("doctor: ") and lines[-1].endswith("0 failed: ready"), lines


# --- decisions for hardware this machine does not have --------------------------------------

A100x4 = doctor.Hardware(cuda=("NVIDIA A100",) * 4, cuda_bf16=(True,) * 4, mps=False, cpu_cores=64)
V100x4 = doctor.Hardware(cuda=("Tesla V100",) * 4, cuda_bf16=(False,) * 4, mps=False, cpu_cores=64)


def _trainer(**trainer: Any) -> TrainerConfig:
    return parse_params(
        deep_merge(committed_params(), {"finetune": {"trainer": trainer}})
    ).finetune.trainer


@pytest.mark.parametrize(
    ("hw", "precision", "status"),
    [
        (A100x4, "bf16-mixed", "PASS"),
        (A100x4, "16-mixed", "PASS"),
        (V100x4, "bf16-mixed", "FAIL"),
        (V100x4, "16-mixed", "PASS"),
        (V100x4, "32-true", "PASS"),
    ],
)
def test_precision_check__on_gpu_nodes(hw: doctor.Hardware, precision: str, status: str) -> None:
    check = doctor.precision_check("finetune", _trainer(accelerator="gpu", precision=precision), hw)
    assert check.status == status, check.line()


@pytest.mark.parametrize(
    ("trainer", "env", "status", "says"),
    [
        ({"devices": 4}, {}, "PASS", "this node has 4 cuda device(s)"),
        ({"devices": 8}, {}, "FAIL", "this node has 4 cuda device(s)"),
        ({"devices": 4, "num_nodes": 2}, {}, "WARN", "launch/slurm.sbatch"),
        (
            {"devices": 4, "num_nodes": 2},
            {"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "8"},
            "PASS",
            "",
        ),
        (
            {"devices": 4, "num_nodes": 2},
            {"SLURM_JOB_NUM_NODES": "1"},
            "FAIL",
            "the job has 1 node",
        ),
        ({"devices": 4, "num_nodes": 2}, {"WORLD_SIZE": "4"}, "FAIL", "starts 4 process(es)"),
        # An interactive allocation: Lightning starts the processes, SLURM's counts do not apply.
        ({"devices": 4}, {"SLURM_JOB_NAME": "bash", "SLURM_NTASKS": "1"}, "PASS", ""),
    ],
)
def test_devices_check__against_node_and_launcher(
    trainer: dict[str, int], env: dict[str, str], status: str, says: str
) -> None:
    check = doctor.devices_check("finetune", _trainer(accelerator="gpu", **trainer), A100x4, env)
    assert check.status == status and says in check.message, check.line()


def test_raw_data_check__a_missing_local_folder_fails_naming_the_key(tmp_path: Path) -> None:
    folders = {"diode": str(tmp_path / "not-there"), "megadepth": str(tmp_path)}
    raw = deep_merge(committed_params(), {"data": {"source": "local", "local": folders}})
    check = doctor.raw_data_check(parse_params(raw), project_paths(tmp_path))
    assert check.status == "FAIL", check.line()
    assert check.message == f"data.local.diode: {tmp_path / 'not-there'} is not a folder"


def test_packed_estimate_matches_a_real_packed_split(tmp_path: Path) -> None:
    writer = PackedWriter(tmp_path, capacity=5, size=(48, 64))
    on_disk = sum(f.stat().st_size for f in tmp_path.glob("*.npy"))
    estimate = 5 * 48 * 64 * doctor.PACKED_BYTES_PER_PIXEL
    assert estimate <= on_disk <= estimate + 3 * 256, (on_disk, estimate)  # + .npy headers
    del writer


def test_tutorial_estimates_match_readme_table() -> None:
    """README's "How much disk": extracted ~213 GB, peak while fetching ~412 GB, packed ~113 GB
    (GB as the data sets quote them, 2**30 bytes)."""
    profile = yaml.safe_load((REPO / "profiles" / "tutorial.yaml").read_text())
    params = parse_params(deep_merge(committed_params(), profile))
    raw = doctor.raw_bytes(params.data) / doctor.GIB
    download = max(doctor.ARCHIVE_BYTES.values()) / doctor.GIB
    assert raw == pytest.approx(213, rel=0.02)
    assert raw + download == pytest.approx(412, rel=0.02)
    assert doctor.processed_bytes(params) / doctor.GIB == pytest.approx(113, rel=0.1)


# --- launch files ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file__is_valid_bash(path: Path) -> None:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert os.access(path, os.X_OK)


def _commands(path: Path) -> list[list[str]]:
    """Every command line of a launch file, comments included (they show commands too), split
    as the shell would, with continuation lines joined."""
    text = path.read_text().replace("\\\n", " ")
    words = []
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line and not line.startswith("SBATCH"):
            try:
                words.append(shlex.split(line, comments=True))
            except ValueError:  # prose with an apostrophe
                continue
    return words


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file__names_only_what_exists(path: Path) -> None:
    text = path.read_text()
    stages = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    # Stage names: literal module names, and the values a variable module name takes (the
    # first argument of slurm.sbatch's train calls, torchrun.sh's case pattern).
    named = set(re.findall(r"depthpipe\.stages\.([a-z_]+)", text))
    named |= set(re.findall(r"^train ([a-z_]+) ", text, re.M))
    for pattern in re.findall(r"^\s*([a-z_]+(?: \| [a-z_]+)*)\)", text, re.M):
        named |= set(pattern.split(" | "))
    assert named, "no stage named"
    for name in named:
        assert (REPO / "src" / "depthpipe" / "stages" / f"{name}.py").is_file(), name
        assert name in stages, name
    for module in re.findall(r"python -m (depthpipe\.[a-z_.]+)", text):
        assert (REPO / "src" / Path(*module.split("."))).with_suffix(".py").is_file(), module
    params = committed_params()
    checked = 0
    for words in _commands(path):
        targets = []
        if words[:1] == ["dvc"]:  # repro, commit, status: each names stages
            targets = [w for w in words[2:] if not w.startswith("-")]
        elif words[:3] == ["python", "-m", "depthpipe.distributed"] and words[3] != "hold":
            targets = words[4:]  # prune, recorded
        for target in targets:
            checked += 1
            name = target.split("@")[0].strip('"').replace("$stage", "").replace("$STAGE", "")
            assert not name or name in stages, f"{path.name}: {' '.join(words[:4])} {target}"
        for i, word in enumerate(words):
            if word == "-S":
                key = words[i + 1].split("=")[0]
                node: Any = params
                for part in key.split("."):
                    assert isinstance(node, dict) and part in node, f"{path.name}: -S {key}"
                    node = node[part]
    if path.name == "slurm.sbatch":  # torchrun.sh names its stage only as $STAGE
        assert checked, f"{path.name}: no stage target checked"
    for key in re.findall(r"\b((?:pretrain|finetune)\.trainer\.[a-z_]+)", text):
        section, _, field = key.split(".")
        assert field in params[section]["trainer"], f"{path.name}: {key}"


def test_torchrun_script__refuses_what_it_cannot_run() -> None:
    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(LAUNCH / "torchrun.sh"), *args],
            cwd=REPO,
            env={
                k: v
                for k, v in os.environ.items()
                if k not in ("NODE_RANK", "MASTER_ADDR", "RUN_ID")
            }
            | env,
            capture_output=True,
            text=True,
            check=False,
        )

    single = run("evaluate", "x", NODE_RANK="0", MASTER_ADDR="localhost")
    assert single.returncode == 2 and "run: dvc repro evaluate" in single.stderr
    no_rank = run("pretrain", "conservative")
    assert no_rank.returncode != 0 and "set NODE_RANK" in no_rank.stderr
    # without a launch name every rank would list the images and decide for itself
    no_run_id = run("pretrain", "conservative", NODE_RANK="0", MASTER_ADDR="localhost")
    assert no_run_id.returncode != 0 and "set RUN_ID" in no_run_id.stderr


def test_slurm_allocation_matches_one_task_per_gpu() -> None:
    """Lightning's SLURM detection needs one task per device: ntasks-per-node = gpus-per-node."""
    options = dict(
        re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", (LAUNCH / "slurm.sbatch").read_text(), re.M)
    )
    assert options["ntasks-per-node"] == options["gpus-per-node"]


def _srun_lines(text: str) -> list[str]:
    """Each srun command of a launch file (continuation lines joined), comments left out."""
    joined = text.replace("\\\n", " ")
    return [
        line.strip()
        for line in joined.splitlines()
        if re.match(r"\s*srun\b", line) and not line.strip().startswith("#")
    ]


def test_slurm_job__every_srun_carries_the_cpus_per_task_and_the_environment() -> None:
    """Since Slurm 22.05 srun does not inherit --cpus-per-task: each srun must say it, and the
    script exports SRUN_CPUS_PER_TASK before it (both). --export=ALL: a site's
    SLURM_EXPORT_ENV=NONE would leave the tasks without the venv and the leader token."""
    text = (LAUNCH / "slurm.sbatch").read_text()
    sruns = _srun_lines(text)
    assert sruns, "slurm.sbatch starts no srun step"
    exported = re.search(r"^export SRUN_CPUS_PER_TASK=\S+", text, re.M)
    assert exported and exported.start() < text.index("\n    srun ")
    for line in sruns:
        assert '--cpus-per-task="$SLURM_CPUS_PER_TASK"' in line, line
        assert "--export=ALL" in line, line


def test_torchrun_script__starts_params_world_size_and_records_under_the_lock() -> None:
    """torchrun.sh (no SLURM, no srun) starts devices x num_nodes processes read from the
    params, and node 0 records the stage and prunes it holding the project's leader lock."""
    text = (LAUNCH / "torchrun.sh").read_text()
    assert not _srun_lines(text)
    joined = text.replace("\\\n", " ").splitlines()
    torchrun = shlex.split(next(line for line in joined if line.startswith("torchrun ")))
    assert torchrun[torchrun.index("--nnodes") + 1] == "$NNODES"
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "$NPROC"
    assert "t.devices, t.num_nodes" in text
    [held] = [w for w in _commands(LAUNCH / "torchrun.sh") if "dvc commit --force" in " ".join(w)]
    assert held[:5] == ["python", "-m", "depthpipe.distributed", "hold", "--"], held
    inner = " ".join(held[5:])
    assert inner.index("dvc commit --force") < inner.index("depthpipe.distributed prune")


def test_slurm_job__one_leader_and_checked_stages() -> None:
    """singleton and the leader lock both; the doctor first; the last single-process step checks
    the training stages first; a recorded stage's working folder pruned after its commit."""
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert re.search(r"^#SBATCH --dependency=singleton$", text, re.M)
    lines = [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]
    hold = next(i for i, line in enumerate(lines) if "depthpipe.distributed hold" in line)
    first_work = next(i for i, line in enumerate(lines) if "depthpipe.doctor" in line)
    assert hold < first_work  # the lock before anything else runs
    # The lock's pair is trusted only when it is this job's (a job submitted from a job).
    guard = lines[hold - 1]
    assert '"${DEPTHPIPE_LEADER_JOB:-}" != "$SLURM_JOB_ID"' in guard, guard
    assert not [line for line in lines if "--with-deps" in line]  # always stale: fingerprint
    check = next(i for i, line in enumerate(lines) if "depthpipe.distributed recorded" in line)
    evaluate = next(i for i, line in enumerate(lines) if line == "dvc repro evaluate")
    assert check < evaluate
    checked = " ".join(lines[check : check + 2])
    stages = ("fetch", "preprocess", '"pretrain@$AUG"', "init_scratch", '"finetune@scratch"')
    for stage in (*stages, '"finetune@$AUG"'):
        assert stage in checked, checked
    commit = next(i for i, line in enumerate(lines) if line.startswith("dvc commit --force"))
    assert "depthpipe.distributed prune" in lines[commit + 1]
    # The up-to-date branch prunes too: a job ended between commit and prune left the folder.
    up_to_date = next(i for i, line in enumerate(lines) if line.startswith('echo "$stage@$item'))
    assert lines[up_to_date + 1] == 'python -m depthpipe.distributed prune "$stage@$item"'
    assert lines[up_to_date + 2] == "return"


def _nccl_modes() -> dict[str, int]:
    """TORCH_NCCL_ASYNC_ERROR_HANDLING's values as the installed torch defines them."""
    import torch

    header = (
        Path(torch.__file__).parent / "include/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp"
    )
    if not header.is_file():
        pytest.skip(f"{header}: not installed with this torch")
    enum = re.search(r"enum ErrorHandlingMode \{(.*?)\}", header.read_text(), re.S)
    assert enum, header
    modes = {name: int(value) for name, value in re.findall(r"(\w+) = (\d)", enum.group(1))}
    assert re.search(r"default value \(3 - SkipCleanUp\)", header.read_text()), header
    return modes


@pytest.mark.parametrize(
    "path", [*LAUNCH_FILES, REPO / "docs" / "clusters.md"], ids=lambda p: p.name
)
def test_nccl_error_handling__described_as_torch_defines_it(path: Path) -> None:
    """1 TearDown (abort the communicators, end the process), 2 CleanUpOnly (abort, go on),
    3 SkipCleanUp (end the process without aborting: the default)."""
    modes = _nccl_modes()
    assert modes == {"NoHandling": 0, "TearDown": 1, "CleanUpOnly": 2, "SkipCleanUp": 3}
    text = " ".join(path.read_text().replace("#", " ").split())
    named = re.findall(r"\b(\d) \((\w+)", text)
    assert {name for _, name in named} >= {"TearDown", "SkipCleanUp", "CleanUpOnly"}, named
    for value, name in named:
        assert modes[name] == int(value), (value, name)
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in text
    assert "default is 3 (SkipCleanUp: end the process without aborting the communicators" in text
    assert "2 (CleanUpOnly) aborts them without ending the process" in text


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file__depthpipe_commands_exist(path: Path) -> None:
    """Every `python -m depthpipe.distributed <command>` names a command it has."""
    from depthpipe import distributed

    for words in _commands(path):
        if words[:3] == ["python", "-m", "depthpipe.distributed"]:
            command = words[3]
            assert command in ("hold", "prune", "recorded"), command
            with pytest.raises(SystemExit) as stop:
                distributed.main([command, "--help"])
            assert stop.value.code == 0


# --- site settings a cluster needs ------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "status", "says"),
    [
        ({}, "PASS", "not in a SLURM job"),
        (
            {"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "d", "SLURM_CPUS_PER_TASK": "9"},
            "FAIL",
            "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK",
        ),
        ({"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "d"}, "FAIL", "no --cpus-per-task"),
        (
            {"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "d", "SLURM_CPUS_PER_TASK": "9"}
            | {"SRUN_CPUS_PER_TASK": "9"},
            "PASS",
            "9 CPUs",
        ),
    ],
)
def test_cpus_check__srun_gets_the_jobs_cpus_per_task(
    env: dict[str, str], status: str, says: str
) -> None:
    two_gpus = {"num_workers": 8, "devices": 2, "accelerator": "gpu"}
    params = parse_params(deep_merge(committed_params(), {"finetune": {"trainer": two_gpus}}))
    check = doctor.cpus_check(params, env)
    assert check.status == status and says in check.message, check.line()


@pytest.mark.parametrize("workers", [0, 8])
def test_cpus_check__a_one_process_job_needs_no_srun_cpus(workers: int) -> None:
    """`sbatch --wrap "dvc repro"` on one GPU: no srun starts the training, so neither
    --cpus-per-task nor SRUN_CPUS_PER_TASK is needed."""
    params = parse_params(
        deep_merge(committed_params(), {"finetune": {"trainer": {"num_workers": workers}}})
    )
    job = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "d", "SLURM_CPUS_PER_TASK": "9"}
    for env in (job, {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "d"}):
        check = doctor.cpus_check(params, env)
        assert check.status == "PASS" and "one process per stage" in check.message, check.line()


def test_site_checks__multi_node_needs_a_shared_hash_cache_and_hardlink_locks(
    tmp_path: Path,
) -> None:
    two_nodes = {"devices": 4, "num_nodes": 2, "accelerator": "gpu"}
    params = parse_params(
        deep_merge(committed_params(), {"finetune": {"trainer": two_nodes, "batch_size": 8}})
    )
    shared = doctor.site_checks(params, tmp_path, tmp_path / "dvc-site", "nfs4", True)
    assert [c.status for c in shared] == ["PASS", "PASS"], shared
    unlocked = doctor.site_checks(params, tmp_path, tmp_path / "dvc-site", "lustre", False)
    assert unlocked[1].status == "WARN" and "core.hardlink_lock true" in unlocked[1].message
    # A site cache on another filesystem (/proc here, as node-local as it gets).
    local = doctor.site_checks(params, tmp_path, Path("/proc/dvc"), "ext4", False)
    assert local[0].status == "WARN" and "core.site_cache_dir" in local[0].message
    assert local[1].status == "PASS"
    one_node = doctor.site_checks(
        parse_params(committed_params()), tmp_path, Path("/proc/dvc"), "nfs", False
    )
    assert [c.status for c in one_node] == ["PASS"]


def test_doctor__reports_leader_site_and_cpus(project: Path, run_doctor: RunDoctor) -> None:
    code, lines = run_doctor(project)
    assert code == 0, lines
    assert _lines(lines, "PASS", "leader") == [
        "PASS leader      .depthpipe/leader.lock: free; file locks work here"
    ]
    assert _lines(lines, "PASS", "dvc site") and _lines(lines, "PASS", "cpus")


def _mounts(tmp_path: Path, *lines: str) -> Path:
    """A mount table in /proc/mounts' format (the real one cannot be changed here)."""
    table = tmp_path / "mounts"
    table.write_text("".join(f"{line}\n" for line in lines))
    return table


@pytest.mark.parametrize(
    ("fstype", "options", "says"),
    [
        ("nfs4", "rw,vers=4.2,local_lock=flock", "mounted local_lock=flock: remount it with"),
        ("nfs4", "rw,vers=4.2,local_lock=all", "local_lock=all: remount it with local_lock=none"),
        ("nfs", "rw,vers=3,nolock,local_lock=all", "mounted nolock: remount it without nolock"),
        ("lustre", "rw,localflock,lazystatfs", "mounted -o localflock: mount it with -o flock"),
    ],
)
def test_leader_check__node_local_locks_fail_naming_the_mount_option(
    tmp_path: Path, fstype: str, options: str, says: str
) -> None:
    """flock(2) succeeds on such a mount, but only against processes of the same node: the
    check reads the options of the mount holding the project (the longest mount point)."""
    root = tmp_path / "shared" / "project"
    root.mkdir(parents=True)
    real = root.resolve()
    table = _mounts(
        tmp_path,
        "/dev/sda1 / ext4 rw,relatime 0 0",
        f"server:/export {real.parent} {fstype} {options} 0 0",
        "tmpfs /dev/shm tmpfs rw 0 0",
    )
    check = doctor.leader_check(project_paths(root), {}, table)
    assert check.status == "FAIL" and says in check.message, check.line()
    assert str(real.parent) in check.message and "one node only" in check.message
    assert not project_paths(root).leader_lock.exists()  # refused before it took anything
    # one process on one machine: the stages go on there (warned), so the doctor warns too
    alone = doctor.leader_check(project_paths(root), {}, table, shared=False)
    assert alone.status == "WARN" and says in alone.message, alone.line()


def test_leader_check__the_longest_mount_point_decides(tmp_path: Path) -> None:
    """A project on a locking mount below a nolock one passes; the table's own escapes (a
    space is \\040) are read; and the filesystem type comes from the same entry."""
    root = tmp_path / "my share" / "project"
    root.mkdir(parents=True)
    real = str(root.resolve().parent).replace(" ", "\\040")
    table = _mounts(
        tmp_path,
        f"server:/all {tmp_path.resolve()} nfs rw,nolock 0 0",
        f"server:/export {real} nfs4 rw,vers=4.2,local_lock=none 0 0",
    )
    check = doctor.leader_check(project_paths(root), {}, table)
    assert check.status == "PASS", check.line()
    assert doctor.filesystem_type(root, table) == "nfs4"
    nolock = _mounts(tmp_path, f"server:/all {tmp_path.resolve()} nfs rw,nolock 0 0")
    assert doctor.leader_check(project_paths(root), {}, nolock).status == "FAIL"


def _params_with(**sections: Any) -> Any:
    return parse_params(deep_merge(committed_params(), sections))


def test_rank_checks__same_augmentations_fail_and_one_image_batches_warn() -> None:
    two = {"devices": 2, "accelerator": "cpu"}
    alike = doctor.rank_checks(
        _params_with(pretrain={"batch_size": 8, "trainer": {**two, "num_workers": 0}})
    )
    [warning] = alike
    assert warning.status == "FAIL" and warning.topic == "ranks"
    assert "pretrain.trainer.num_workers 0 draw the same augmentations" in warning.message
    own = doctor.rank_checks(
        _params_with(pretrain={"batch_size": 8, "trainer": {**two, "num_workers": 2}})
    )
    assert [c.status for c in own] == ["PASS"], own

    gpus = {"devices": 4, "num_nodes": 2, "accelerator": "gpu"}
    [single] = doctor.rank_checks(_params_with(finetune={"batch_size": 8, "trainer": gpus}))
    assert single.status == "WARN"
    assert "batch_size 8 over 8 process(es) is 1 image(s) per process" in single.message
    pairs = doctor.rank_checks(_params_with(finetune={"batch_size": 16, "trainer": gpus}))
    assert [c.status for c in pairs] == ["PASS"], pairs
