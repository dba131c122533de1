"""Pre-flight check, ``python -m depthpipe.doctor``: does this machine fit params.yaml?

It reads params.yaml (through the config loader) and reports, without starting a stage or
downloading anything, one PASS/WARN/FAIL line per check:

- ``params``: params.yaml is valid (else the loader's one-line reason);
- ``accelerator``: what this node has (CUDA GPUs and their names, MPS, or the CPU only);
- ``precision``: per training section, whether its ``precision`` (``auto`` resolved as the stages
  resolve it) runs on the device its ``accelerator`` gets here;
- ``devices``: per training section, ``devices`` x ``num_nodes`` against this node's devices;
- ``disk``: per place the data go (the fetch work folder, data/raw, data/processed, the DVC
  cache) an estimate of what is still to be written there against the free space of its
  filesystem (places sharing a filesystem are added up);
- ``remote``: the default DVC remote takes a small probe object (written, read back, deleted);
- ``raw data``: data/raw's state (its fetch report against the params, or not fetched yet);
- ``leader``: the project's leader lock (depthpipe.distributed) is free or this job's, and the
  filesystem gives file locks at all, across nodes (not NFS ``nolock`` / ``local_lock=flock|all``
  nor Lustre ``localflock``, where a lock holds on its own node only);
- ``ranks``: what each process of a multi-process run gets: its own augmentations (pretraining
  with ``num_workers`` 0 draws alike on every rank) and at least 2 images per BatchNorm batch;
- ``dvc site``: multi-node params only: DVC's hash cache (``core.site_cache_dir``) on the
  project's filesystem, and ``core.hardlink_lock`` on a network filesystem;
- ``cpus``: inside a SLURM job, whether ``srun`` hands each task ``--cpus-per-task``
  (``SRUN_CPUS_PER_TASK``; Slurm 22.05+ no longer passes it on by itself).

Exit status 1 when any line is FAIL, else 0. Every check is a function returning ``Check``s, so
each can be tested on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from depthpipe.config import DataConfig, Params, TrainerConfig, load_params
from depthpipe.data import local, official
from depthpipe.data.download import free_bytes, human_size
from depthpipe.distributed import (
    held_by_my_job,
    holder_text,
    launched,
    read_holder,
    slurm_manages,
    try_lock,
)
from depthpipe.errors import ConfigError, DepthpipeError
from depthpipe.hardware import resolve_precision
from depthpipe.paths import (
    DIODE_TRAIN_SPLIT,
    DIODE_VAL_SPLIT,
    TRAIN_SPLIT,
    ProjectPaths,
    project_paths,
)

Status = Literal["PASS", "WARN", "FAIL"]
Device = Literal["cuda", "mps", "cpu"]

GIB = 2**30
# The official archives' sizes, as their servers report them (the data sets quote GiB: DIODE's
# "81 GB" train archive is 86.7e9 bytes). fetch asks the servers at run time; the doctor stays
# off the network, so it uses these.
ARCHIVE_BYTES = {
    "diode_val": round(2.6 * GIB),
    "diode_train": 86_700_000_000,
    "megadepth": 199 * GIB,
}
# DIODE's sample counts over both domains; official.DIODE_DOMAIN_SHARE gives each domain's part.
DIODE_SAMPLES = {DIODE_TRAIN_SPLIT: 25458, DIODE_VAL_SPLIT: 771}
MEGADEPTH_PHOTOS = 128_228  # MegaDepth v1's photos (dense*/imgs/*.jpg)
# Bytes per pixel of a raw DIODE-layout sample: float32 depth + float32 mask (as DIODE ships
# them) + the PNG, at most 3 bytes per pixel. Each file also takes at least a 4 KiB block.
RAW_SAMPLE_BYTES_PER_PIXEL = 4 + 4 + 3
BLOCK = 4096
# Bytes per pixel of a packed sample (depthpipe/data/packed.py): RGB uint8 + float32 depth + bool
# mask. tests/test_doctor.py checks it against a real PackedWriter.
PACKED_BYTES_PER_PIXEL = 3 + 4 + 1
# A JPEG photo at quality 90-95 (synthetic and preprocessed MegaDepth): natural photos take 2-4
# bits per pixel there, so 4 bits is on the generous side. MegaDepth photos are about 3:2.
JPEG_BYTES_PER_PIXEL = 0.5
PHOTO_ASPECT = 1.5
# Below this much room left after the estimated writes, the disk line warns: the estimates are
# estimates, and a full disk hours into a run is what this check exists to prevent.
HEADROOM = 0.1
# How long the remote may take to answer the probe (a dead S3 endpoint retries for minutes).
REMOTE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Check:
    status: Status
    topic: str  # params, accelerator, precision, devices, disk, remote, raw data, leader, ...
    message: str

    def line(self) -> str:
        return f"{self.status} {self.topic:<11} {self.message}"


@dataclass(frozen=True)
class Hardware:
    """What this node offers a Lightning Trainer."""

    cuda: tuple[str, ...]  # names of the visible CUDA devices
    cuda_bf16: tuple[bool, ...]  # per CUDA device: bf16 in hardware (compute capability 8.0+)
    mps: bool
    cpu_cores: int  # cores this process may run on


def probe_hardware() -> Hardware:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Hardware(
        cuda=tuple(torch.cuda.get_device_name(i) for i in range(count)),
        cuda_bf16=tuple(torch.cuda.get_device_capability(i) >= (8, 0) for i in range(count)),
        mps=torch.backends.mps.is_available(),
        cpu_cores=cores or 1,
    )


def resolve_device(accelerator: str, hw: Hardware) -> Device | None:
    """The device Lightning picks for ``accelerator`` on ``hw`` (None: it would fail)."""
    # Lightning's order for "auto" and "gpu": CUDA, then MPS; "auto" falls back to the CPU.
    gpu: Device | None = "cuda" if hw.cuda else "mps" if hw.mps else None
    if accelerator == "cpu":
        return "cpu"
    if accelerator in ("cuda", "mps"):
        wanted: Device = "cuda" if accelerator == "cuda" else "mps"
        return wanted if gpu == wanted else None
    if accelerator == "gpu":
        return gpu
    return gpu or "cpu"  # auto


def accelerator_check(hw: Hardware) -> Check:
    if hw.cuda:
        names = ", ".join(
            f"{name}{'' if bf16 else ' (no bf16)'}"
            for name, bf16 in zip(hw.cuda, hw.cuda_bf16, strict=True)
        )
        return Check("PASS", "accelerator", f"cuda: {len(hw.cuda)} GPU(s): {names}")
    if hw.mps:
        return Check("PASS", "accelerator", "mps: Apple GPU")
    return Check("PASS", "accelerator", f"cpu only ({hw.cpu_cores} cores): no CUDA or MPS device")


def precision_check(section: str, cfg: TrainerConfig, hw: Hardware) -> Check:
    """Whether ``cfg.precision`` runs well on the device ``cfg.accelerator`` gets on ``hw``."""
    device = resolve_device(cfg.accelerator, hw)
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    said = precision if cfg.precision != "auto" else f"auto -> {precision}"
    shown = (
        cfg.accelerator if device in (None, cfg.accelerator) else f"{cfg.accelerator} ({device})"
    )
    where = f"{section}.trainer: precision {said} on accelerator {shown}"
    if device is None:
        return Check(
            "FAIL",
            "precision",
            f"{section}.trainer: precision {cfg.precision} on accelerator {cfg.accelerator}: "
            f"no {cfg.accelerator} device on this node to run it on",
        )
    if precision.startswith("bf16"):
        if device != "cuda":
            # Lightning would run CPU or MPS autocast, emulated in software on most CPUs and
            # far slower than 32-true: a setting meant for GPUs that silently costs days.
            return Check(
                "FAIL",
                "precision",
                f"{where}: bf16 needs a CUDA GPU with bf16 support "
                "(compute capability 8.0+); use precision auto or 32-true",
            )
        if not all(hw.cuda_bf16):
            return Check(
                "FAIL",
                "precision",
                f"{where}: a GPU here has no bf16 in hardware (compute capability below 8.0); "
                "use 16-mixed or 32-true",
            )
    if precision == "16-mixed" and device == "cpu":
        # Lightning replaces it with bf16-mixed on the CPU: the case above, under another name.
        return Check(
            "FAIL", "precision", f"{where}: fp16 AMP needs a GPU; use precision auto or 32-true"
        )
    return Check("PASS", "precision", f"{where}: supported")


def launcher_env(env: dict[str, str]) -> tuple[int | None, int | None]:
    """(nodes, processes) a SLURM job or torchrun gives this run, None where unknown."""
    # Lightning's rule: a SLURM job named bash or interactive (salloc, srun --pty) does not
    # manage the processes; Lightning then starts them itself, as without SLURM.
    slurm = env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    nodes = (env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")) if slurm else None
    processes = env.get("WORLD_SIZE") or (env.get("SLURM_NTASKS") if slurm else None)
    return (int(nodes) if nodes else None, int(processes) if processes else None)


def devices_check(
    section: str, cfg: TrainerConfig, hw: Hardware, env: dict[str, str] | None = None
) -> Check:
    """``devices`` per node against this node, and ``num_nodes`` against the launcher's job."""
    env = dict(os.environ) if env is None else env
    device = resolve_device(cfg.accelerator, hw)
    total = cfg.devices * cfg.num_nodes
    where = (
        f"{section}.trainer: {cfg.devices} device(s) x {cfg.num_nodes} node(s) = {total} "
        f"process(es) on {cfg.accelerator}"
    )
    present = {"cuda": len(hw.cuda), "mps": int(hw.mps), "cpu": hw.cpu_cores}
    if device is None:
        return Check("FAIL", "devices", f"{where}: this node has 0 GPUs")
    if device != "cpu" and cfg.devices > present[device]:
        return Check(
            "FAIL", "devices", f"{where}: this node has {present[device]} {device} device(s)"
        )
    nodes, processes = launcher_env(env)
    if nodes is not None and nodes != cfg.num_nodes:
        return Check("FAIL", "devices", f"{where}: the job has {nodes} node(s)")
    if processes is not None and processes != total:
        return Check("FAIL", "devices", f"{where}: the launcher starts {processes} process(es)")
    if cfg.num_nodes > 1 and nodes is None and processes is None:
        # Without a launcher each node's processes wait for the others at DDP's rendezvous.
        return Check(
            "WARN",
            "devices",
            f"{where}: start it on every node through a launcher "
            "(launch/slurm.sbatch or launch/torchrun.sh)",
        )
    if device == "cpu" and cfg.devices > hw.cpu_cores:
        return Check(
            "WARN", "devices", f"{where}: more processes than this node's {hw.cpu_cores} cores"
        )
    has = f"{hw.cpu_cores} cores" if device == "cpu" else f"{present[device]} {device} device(s)"
    return Check("PASS", "devices", f"{where}: this node has {has}")


# --- disk ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """A folder the configured data go to and the bytes estimated to be written there."""

    label: str
    path: Path
    need: int  # bytes that stay
    note: str = ""  # how the estimate came about, when it is not obvious
    # Bytes there only while fetch runs (archives deleted once extracted), and whether the
    # place is written after fetch (when those bytes are gone again).
    passing: int = 0
    after_fetch: bool = False


def diode_samples(data: DataConfig) -> int:
    """DIODE samples of the configured domains, train and val (the test split)."""
    if data.source == "synthetic":
        s = data.synthetic
        per_domain = (s.train_scenes + s.val_scenes) * s.scans_per_scene * s.views_per_scan
        return per_domain * len(data.diode_domains)
    share = official.DIODE_DOMAIN_SHARE
    return round(
        sum(
            count * share[split][d]
            for split, count in DIODE_SAMPLES.items()
            for d in data.diode_domains
        )
    )


def megadepth_photos(data: DataConfig) -> int:
    s = data.synthetic
    available = (
        s.megadepth_scenes * s.megadepth_images_per_scene
        if data.source == "synthetic"
        else MEGADEPTH_PHOTOS
    )
    cap = data.megadepth_max_images
    return min(available, cap) if cap else available


def photo_bytes(long_side: float) -> int:
    return round(long_side * long_side / PHOTO_ASPECT * JPEG_BYTES_PER_PIXEL) + BLOCK


def raw_bytes(data: DataConfig) -> int:
    """data/raw once fetched: the extractions (official, local) or the rendered scenes."""
    if data.source == "synthetic":
        s = data.synthetic
        diode_bytes = s.width * s.height * RAW_SAMPLE_BYTES_PER_PIXEL + 3 * BLOCK
        return diode_samples(data) * diode_bytes + megadepth_photos(data) * photo_bytes(
            s.megadepth_long_side
        )
    # plan() has each archive's expansion, scaled to the selected DIODE domains. All of
    # MegaDepth's photos are extracted (megadepth_max_images picks from them), so all count.
    return sum(round(ARCHIVE_BYTES[a.name] * a.expansion) for a in official.plan(data))


def download_bytes(data: DataConfig, work: official.WorkFolder) -> int:
    """Archive bytes on disk at the peak of an official fetch, as official.check_disk counts
    them: none when streaming, all when kept, else the largest (each is deleted once extracted),
    less what earlier runs already downloaded."""
    if data.source != "official" or data.official.stream:
        return 0
    left = []
    for a in official.plan(data):
        archive = work.archive(a)
        done = [
            p.stat().st_size
            for p in (archive, archive.with_name(archive.name + ".partial"))
            if p.is_file()
        ]
        left.append(max(0, ARCHIVE_BYTES[a.name] - sum(done)))
    return sum(left) if data.official.keep_archives else max(left)


def processed_bytes(params: Params) -> int:
    """data/processed: the packed DIODE splits at the training size and the shrunk photos."""
    pre = params.preprocess
    packed = diode_samples(params.data) * pre.height * pre.width * PACKED_BYTES_PER_PIXEL
    photos = megadepth_photos(params.data) * photo_bytes(pre.megadepth_short_side * PHOTO_ASPECT)
    return packed + photos


def raw_in_place(params: Params, paths: ProjectPaths) -> bool:
    """Whether data/raw holds what these params fetch, as far as its fetch report tells."""
    try:
        report = json.loads(paths.fetch_report.read_text())
    except (OSError, ValueError):
        return False
    data = params.data
    wanted = (data.source, data.diode_domains, data.megadepth_max_images)
    return (
        report.get("source"),
        report.get("diode_domains"),
        report.get("megadepth_max_images"),
    ) == wanted


def processed_in_place(params: Params, paths: ProjectPaths) -> bool:
    """Whether data/processed is packed at the configured size (its train split's index)."""
    try:
        index = json.loads((paths.packed_split(TRAIN_SPLIT) / "index.json").read_text())
    except (OSError, ValueError):
        return False
    size = (params.preprocess.height, params.preprocess.width)
    return paths.preprocess_report.is_file() and (index.get("height"), index.get("width")) == size


def existing(path: Path) -> Path:
    """``path`` or its nearest existing parent: where a folder not made yet will live."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def mount_point(path: Path) -> Path:
    path = existing(path)
    device = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == device:
        path = path.parent
    return path


def same_filesystem(a: Path, b: Path) -> bool:
    return existing(a).stat().st_dev == existing(b).stat().st_dev


def cache_link(types: Sequence[str], cache_dir: Path, workspace: Path) -> str:
    """The link type DVC would use between its cache and the workspace: the first of
    ``cache.type`` that works, tried as DVC tries them (a 4-byte file, removed again)."""
    from dvc_objects.fs.generic import test_links
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    # In the nearest existing folders: a fresh clone has neither .dvc/cache nor data/ yet, and
    # the folders made later sit on the same filesystems.
    works = test_links(
        list(types), fs, str(existing(cache_dir)), fs, str(existing(workspace) / "link-probe")
    )
    return works[0] if works else "copy"


def disk_places(params: Params, paths: ProjectPaths, cache_dir: Path, link: str) -> list[Place]:
    """Each place the configured data go and the bytes still to be written there."""
    data = params.data
    raw_done, processed_done = raw_in_place(params, paths), processed_in_place(params, paths)
    raw = 0 if raw_done else raw_bytes(data)
    processed = 0 if processed_done else processed_bytes(params)
    work = paths.fetch_workdir
    fetching = data.source == "official" and not raw_done
    # official: archives and extractions land in the work folder, and stay there (a rerun of
    # fetch re-links them); data/raw gets hard links to them, or copies on another filesystem.
    archives = download_bytes(data, official.WorkFolder(work)) if fetching else 0
    kept = data.official.keep_archives
    in_work, passing = (raw if fetching else 0) + archives * kept, archives * (not kept)
    work_note = " (nothing to download)"
    if fetching:
        work_note = f" (~{human_size(archives)} of it archives{'' if kept else ' while fetching'})"
    raw_dir = paths.raw_diode.parent
    raw_note = ""
    if fetching and same_filesystem(work, raw_dir):
        raw, raw_note = 0, " (hard links to .depthpipe/fetch's extractions: counted there)"
    elif data.source == "local" and not raw_done:
        folders = [Path(f or ".").expanduser() for f in (data.local.diode, data.local.megadepth)]
        if all(same_filesystem(paths.root / f, raw_dir) for f in folders):
            raw, raw_note = 0, " (data.local is on this filesystem: hard links or reflinks)"
    # The cache holds the stage outputs (models are small beside the data): with links the
    # cache's files are the workspace's, with copies every byte is there twice.
    in_cache = 0 if link != "copy" else raw_bytes(data) * (not raw_done) + processed
    cache_note = f" (cache.type gives {link}{': no second copy' if link != 'copy' else ''})"
    done = " (already there for these params)"
    return [
        Place(".depthpipe/fetch", work, in_work, work_note, passing=passing),
        Place("data/raw", raw_dir, raw, done if raw_done else raw_note),
        Place(
            "data/processed",
            paths.processed_diode.parent,
            processed,
            done if processed_done else "",
            after_fetch=True,
        ),
        Place(
            f"DVC cache {_label(cache_dir, paths.root)}",
            cache_dir,
            in_cache,
            cache_note,
            after_fetch=True,  # DVC stores a stage's outputs once it has finished
        ),
    ]


def _label(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def peak(places: Sequence[Place]) -> int:
    """The most bytes ``places`` (on one filesystem) hold at once: while fetching (with the
    passing archives) or at the end (with what is written after fetch)."""
    fetching = sum(p.need + p.passing for p in places if not p.after_fetch)
    return max(fetching, sum(p.need for p in places))


def disk_checks(places: Sequence[Place], free: Callable[[Path], int] = free_bytes) -> list[Check]:
    """One line per place. Places on one filesystem are judged by their sum: each may fit on
    its own while together they do not."""
    device = {place.label: existing(place.path).stat().st_dev for place in places}
    checks = []
    for place in places:
        together = [p for p in places if device[p.label] == device[place.label]]
        total, room = peak(together), free(place.path)
        status: Status = (
            "FAIL" if total > room else "WARN" if total > (1 - HEADROOM) * room else "PASS"
        )
        others = len(together) - 1
        shared = f" (all {others + 1} places there: ~{human_size(total)} at the peak)"
        message = (
            f"{place.label}: needs ~{human_size(place.need + place.passing)}{place.note}; "
            f"{human_size(room)} free on {mount_point(place.path)}{shared if others else ''}"
        )
        checks.append(Check(status, "disk", message))
    return checks


# --- remote and raw data ---------------------------------------------------------------------


def _within(seconds: float, work: Callable[[], Check], late: Check) -> Check:
    """``work()``'s result, or ``late`` if it takes longer than ``seconds``."""
    result: list[Check] = []
    # A daemon thread: a remote that never answers must not keep the process alive.
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    thread.join(seconds)
    return result[0] if result else late


def probe_remote(fs: Any, path: str) -> str:
    """Write, read back and delete a small object in the remote's folder; return what had to be
    created for it ("" when the folder existed). Raises what the filesystem raises."""
    made = ""
    if fs.protocol == "local" and not fs.exists(path):
        # dvc push would create it. Make it for the probe and remove it again, so the check
        # leaves nothing behind; still a warning: an unmounted share also "does not exist yet".
        made = str(existing(Path(path)))
        fs.makedirs(path)
    probe = fs.join(path, f".depthpipe-doctor-{uuid.uuid4().hex}")
    content = b"depthpipe doctor probe\n"
    try:
        fs.pipe_file(probe, content)
        if fs.cat_file(probe) != content:
            raise OSError(f"{probe} read back different bytes")
    finally:
        if fs.exists(probe):
            fs.rm(probe)
        if made:
            # Remove the folders made above, deepest first, up to the one that existed.
            folder = Path(path)
            while str(folder) != made and folder != folder.parent:
                folder.rmdir()
                folder = folder.parent
    return made


def remote_check(root: Path) -> Check:
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            remote = repo.cloud.get_remote()
    except NoRemoteError:
        return Check("WARN", "remote", "no default DVC remote: dvc push has nowhere to go")
    except Exception as error:  # DVC's errors for a bad config or no project are many
        return Check("FAIL", "remote", f"DVC cannot open the project or its remote: {error}")
    url = remote.config.get("url", remote.path)
    where = f"{remote.name} ({url})"

    def probe() -> Check:
        try:
            made = probe_remote(remote.fs, remote.path)
        except Exception as error:  # any filesystem's error: permissions, network, auth
            return Check(
                "FAIL", "remote", f"{where}: not writable: {type(error).__name__}: {error}"
            )
        if made:
            return Check(
                "WARN",
                "remote",
                f"{where}: does not exist yet, writable (dvc push creates it: is it the folder "
                "or share you mean?)",
            )
        return Check(
            "PASS", "remote", f"{where}: reachable and writable (probe written, read, deleted)"
        )

    late = Check("FAIL", "remote", f"{where}: no answer within {REMOTE_TIMEOUT_S:.0f} s")
    return _within(REMOTE_TIMEOUT_S, probe, late)


def raw_data_check(params: Params, paths: ProjectPaths) -> Check:
    data = params.data
    if data.source == "local":
        for key in ("diode", "megadepth"):
            try:  # resolved as fetch resolves it (relative to the project folder)
                local.folder_of(getattr(data.local, key), f"data.local.{key}", paths.root)
            except DepthpipeError as error:
                return Check("FAIL", "raw data", str(error))
    try:
        report = json.loads(paths.fetch_report.read_text())
    except FileNotFoundError:
        if any(p.exists() for p in (paths.raw_diode, paths.raw_megadepth)):
            return Check(
                "WARN",
                "raw data",
                "data/raw holds files but no fetch_report.json (a fetch cut short?)",
            )
        return Check("PASS", "raw data", f"not fetched yet (source {data.source})")
    except (OSError, ValueError) as error:
        return Check("WARN", "raw data", f"{paths.fetch_report}: unreadable: {error}")
    counts = ", ".join(f"{k} {v}" for k, v in report.get("counts", {}).items())
    fetched = f"fetched (source {report.get('source')}; {counts})"
    if not raw_in_place(params, paths):
        return Check("WARN", "raw data", f"{fetched}, but params differ: fetch runs again")
    return Check("PASS", "raw data", f"{fetched}, as params say")


# --- running on a cluster ---------------------------------------------------------------------

# Filesystems whose files every node sees: DVC's docs advise core.hardlink_lock on them (its
# default lock is not reliable there), and a hash cache on a node-local disk is lost on them.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "fuse")


# The mount table: which filesystem holds a path, and with which options.
MOUNTS = Path("/proc/mounts")


@dataclass(frozen=True)
class Mount:
    point: Path
    fstype: str
    options: tuple[str, ...]


def _unescape(field: str) -> str:
    """A /proc/mounts field: space, tab, newline and backslash are written as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: Path, mounts: Path = MOUNTS) -> Mount | None:
    """The mount holding ``path``: the longest mount point above it (the later line when two
    are mounted on one point, as the kernel stacks them); None when the table is unreadable."""
    target = existing(path).resolve()
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    found: Mount | None = None
    for fields in (line.split() for line in lines):
        if len(fields) < 4:
            continue
        point = Path(_unescape(fields[1]))
        if point != target and point not in target.parents:
            continue
        if found is None or len(point.parts) >= len(found.point.parts):
            found = Mount(point, fields[2], tuple(fields[3].split(",")))
    return found


def node_local_locks(mount: Mount) -> str | None:
    """Why flock(2) on this mount locks within one node only (None when it does not): there the
    leader lock is taken by a job on every node at once and stops nothing."""
    options = set(mount.options)
    where = f"{mount.point} ({mount.fstype})"
    if "nolock" in options:
        return f"{where} is mounted nolock: remount it without nolock"
    for option in ("local_lock=flock", "local_lock=all"):
        if option in options:
            return f"{where} is mounted {option}: remount it with local_lock=none (the default)"
    if "localflock" in options:
        return f"{where} is mounted -o localflock: mount it with -o flock"
    return None


def leader_check(
    paths: ProjectPaths,
    env: dict[str, str] | None = None,
    mounts: Path = MOUNTS,
    shared: bool = True,
) -> Check:
    """Whether this run may lead the project: its lock is free (taken and let go at once) or
    held by the job this runs in, on a filesystem whose file locks hold across nodes.

    ``shared``: the params run processes on several nodes, or under a launcher. Only then do
    locks that hold on one node (or none at all) fail the check; a single process on one
    machine, which the stages let go on with a warning (distributed.alone), gets a WARN.
    """
    lock = paths.leader_lock
    weak: Status = "FAIL" if shared else "WARN"
    mount = mount_of(paths.root, mounts)
    why = node_local_locks(mount) if mount else None
    if why:
        return Check(
            weak,
            "leader",
            f"{why}: file locks there hold on one node only, so two jobs could lead this "
            "project at once (docs/clusters.md)",
        )
    if held_by_my_job(lock, env):
        return Check("PASS", "leader", f"{_label(lock, paths.root)}: held by this job")
    try:
        fd = try_lock(lock)
    except DepthpipeError as error:
        return Check(weak, "leader", str(error))
    except OSError as error:
        return Check("FAIL", "leader", f"{lock}: cannot open the lock file: {error.strerror}")
    if fd is None:
        holder = holder_text(read_holder(lock))
        return Check("FAIL", "leader", f"the project is held by {holder}: wait or cancel it")
    os.close(fd)
    return Check("PASS", "leader", f"{_label(lock, paths.root)}: free; file locks work here")


def filesystem_type(path: Path, mounts: Path = MOUNTS) -> str:
    """The type the mount table gives the filesystem holding ``path`` ("" when unknown)."""
    mount = mount_of(path, mounts)
    return mount.fstype if mount else ""


def rank_checks(params: Params) -> list[Check]:
    """What each process of a multi-process run gets: its own augmentations (FAIL without) and
    a BatchNorm batch of more than one image (WARN); nothing to say for one process."""
    checks = []
    pre = params.pretrain.trainer
    world = pre.devices * pre.num_nodes
    if world > 1 and pre.num_workers == 0:
        # LightlyTrain seeds every rank alike (seed_everything(seed)); only loader workers get
        # a per-rank seed (Lightning's pl_worker_init_function), and none run here.
        # FAIL, not WARN: the ranks would pretrain on the same views, a silent waste of all
        # but one GPU, and the params fix it.
        checks.append(
            Check(
                "FAIL",
                "ranks",
                f"pretrain: {world} processes with pretrain.trainer.num_workers 0 draw the same "
                "augmentations on every rank: set num_workers to 1 or more (docs/clusters.md)",
            )
        )
    fine = params.finetune.trainer
    share = params.finetune.batch_size // (fine.devices * fine.num_nodes)
    if share < 2:
        # BatchNorm normalises over each process's own batch: one image gives it no spread
        # (its running variance learns nothing) and the statistics no average.
        checks.append(
            Check(
                "WARN",
                "ranks",
                f"finetune: batch_size {params.finetune.batch_size} over "
                f"{fine.devices * fine.num_nodes} process(es) is {share} image(s) per process: "
                "BatchNorm then normalises a single image; raise finetune.batch_size to at "
                "least 2 per process (docs/clusters.md)",
            )
        )
    return checks or [
        Check("PASS", "ranks", "each process draws its own augmentations and batches")
    ]


def site_checks(
    params: Params, root: Path, site_cache_dir: Path, fstype: str, hardlink_lock: bool
) -> list[Check]:
    """DVC settings a multi-node project needs (nothing to say for a one-node one)."""
    if max(params.pretrain.trainer.num_nodes, params.finetune.trainer.num_nodes) == 1:
        return [Check("PASS", "dvc site", "one node: DVC's node-local defaults are right")]
    checks = []
    if same_filesystem(site_cache_dir, root):
        checks.append(
            Check("PASS", "dvc site", f"core.site_cache_dir {site_cache_dir}: beside the project")
        )
    else:
        checks.append(
            Check(
                "WARN",
                "dvc site",
                f"core.site_cache_dir {site_cache_dir} is on another filesystem than the project "
                "(node-local by default): a job on another node hashes every output again "
                "(hours at full scale); set `dvc config --local core.site_cache_dir "
                "<a folder on the shared filesystem>`",
            )
        )
    network = fstype.split(".")[0] in NETWORK_FILESYSTEMS
    if network and not hardlink_lock:
        checks.append(
            Check(
                "WARN",
                "dvc site",
                f"the project is on {fstype}, where DVC's docs advise hard-link locks: set "
                "`dvc config core.hardlink_lock true`",
            )
        )
    else:
        how = "on" if hardlink_lock else f"not needed on {fstype or 'this filesystem'}"
        checks.append(Check("PASS", "dvc site", f"core.hardlink_lock: {how}"))
    return checks


def runs_several_processes(params: Params) -> bool:
    """Whether a training stage runs more than one process (then srun starts them)."""
    return any(
        t.devices * t.num_nodes > 1 for t in (params.pretrain.trainer, params.finetune.trainer)
    )


def cpus_check(params: Params, env: dict[str, str]) -> Check:
    """Inside a SLURM batch job: does srun give each task the job's --cpus-per-task?"""
    if not slurm_manages(env):
        return Check("PASS", "cpus", "not in a SLURM job: each process uses this node's cores")
    if not runs_several_processes(params):
        # One process per stage (`sbatch --wrap "dvc repro"` on one GPU): no srun step starts
        # the training, so the job's own CPUs are the process's.
        return Check("PASS", "cpus", "one process per stage: it has the job's CPUs, no srun")
    wanted = max(params.pretrain.trainer.num_workers, params.finetune.trainer.num_workers) + 1
    per_task = env.get("SRUN_CPUS_PER_TASK") or env.get("SLURM_CPUS_PER_TASK")
    if not per_task and wanted == 1:
        return Check("PASS", "cpus", "each training task wants 1 core (num_workers 0)")
    if not per_task:
        return Check(
            "FAIL",
            "cpus",
            f"the job gives no --cpus-per-task: each training task gets 1 core, its trainer "
            f"and num_workers want {wanted}; add #SBATCH --cpus-per-task={wanted}",
        )
    if "SRUN_CPUS_PER_TASK" not in env:
        return Check(
            "FAIL",
            "cpus",
            f"SRUN_CPUS_PER_TASK is not set: since Slurm 22.05 srun does not pass on the job's "
            f"--cpus-per-task={per_task}, so each task gets 1 core; export "
            "SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK (launch/slurm.sbatch does)",
        )
    if int(per_task) < wanted:
        return Check(
            "WARN",
            "cpus",
            f"{per_task} CPUs per task, but the trainer and num_workers want {wanted}",
        )
    return Check("PASS", "cpus", f"srun gives each task {per_task} CPUs ({wanted} wanted)")


def dvc_site(root: Path) -> tuple[Path, bool]:
    """DVC's site cache folder (its hash cache) and core.hardlink_lock."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return Path(repo.site_cache_dir), bool(repo.config["core"].get("hardlink_lock", False))


# --- the whole check ------------------------------------------------------------------------


def dvc_cache(root: Path) -> tuple[Path, list[str]]:
    """The DVC cache folder and ``cache.type`` (DVC's default: reflink, then copy)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        types = repo.config["cache"].get("type") or ["reflink", "copy"]
        # local_cache_dir, not cache.local.path (its files/md5/ inside): the folder users set.
        folder = Path(repo.cache.local_cache_dir)
        return folder, [types] if isinstance(types, str) else list(types)


def run_checks(root: Path) -> list[Check]:
    paths = project_paths(root)
    hw = probe_hardware()
    checks = [accelerator_check(hw)]
    try:
        params = load_params(paths.params)
    except ConfigError as error:
        return [Check("FAIL", "params", str(error)), *checks, remote_check(paths.root)]
    checks.insert(0, Check("PASS", "params", f"{paths.params.name} is valid"))
    for section, trainer in (
        ("pretrain", params.pretrain.trainer),
        ("finetune", params.finetune.trainer),
    ):
        checks += [precision_check(section, trainer, hw), devices_check(section, trainer, hw)]
    checks += rank_checks(params)
    try:
        cache_dir, types = dvc_cache(paths.root)
        link = cache_link(types, cache_dir, paths.raw_diode.parent)
    except Exception as error:  # no DVC project: the cache cannot be placed
        checks.append(Check("FAIL", "disk", f"DVC cache: cannot open the DVC project: {error}"))
    else:
        checks += disk_checks(disk_places(params, paths, cache_dir, link))
    checks += [remote_check(paths.root), raw_data_check(params, paths)]
    shared = runs_several_processes(params) or launched(dict(os.environ))
    checks.append(leader_check(paths, shared=shared))
    try:
        site_cache_dir, hardlink_lock = dvc_site(paths.root)
    except Exception as error:  # no DVC project: said by the disk line already
        checks.append(Check("FAIL", "dvc site", f"cannot open the DVC project: {error}"))
    else:
        fstype = filesystem_type(paths.root)
        checks += site_checks(params, paths.root, site_cache_dir, fstype, hardlink_lock)
    checks.append(cpus_check(params, dict(os.environ)))
    return checks


def summary(checks: Sequence[Check]) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "WARN", "FAIL")}
    verdict = "not ready: fix the FAIL lines" if counts["FAIL"] else "ready"
    tally = f"{counts['PASS']} passed, {counts['WARN']} warnings, {counts['FAIL']} failed"
    return f"doctor: {tally}: {verdict}"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report and return the exit status; ``argv`` None reads the command line.
    Returning (not raising SystemExit) lets tests run the whole command in-process."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("."), help="project folder")
    checks = run_checks(parser.parse_args(argv).root)
    for check in checks:
        print(check.line(), flush=True)
    print(summary(checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())
