"""The model registry: dvc.yaml's artifacts, versions as Git tags, downloads by name and version.

The end-to-end tests (slow) work on a temporary copy of the project whose pretrain@conservative
and finetune@conservative outputs are a small encoder and the conftest's untrained (but real)
network, recorded in dvc.lock with ``dvc commit`` (README's recipe for outputs made outside ``dvc
repro``). Two versions of the encoder and one of the network are registered with
depthpipe.register, the tags pushed to a bare Git origin and the data to a local DVC remote. From a
folder outside any repository, ``dvc artifacts get <origin> <name> --rev <version>`` must give the
registered bytes, which the encoder loader and ``depthpipe.predict`` use as downloaded.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch
from PIL import Image

from depthpipe.encoders import build_resnet, load_encoder
from depthpipe.errors import DepthpipeError
from depthpipe.model import ModelSpec
from depthpipe.paths import MODEL_SPEC, MODEL_WEIGHTS, ProjectPaths, project_paths, stage_io
from depthpipe.register import (
    ARTIFACT_NAME,
    depth_artifact,
    encoder_artifact,
    parse_version,
    register,
    version_tag,
)
from tests.helpers import REPO, save_untrained_model

ARCH = "resnet18"


def save_encoder(path: Path, seed: int) -> bytes:
    """A ResNet state dict as the pretrain stage publishes it; returns the file's bytes."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # DVC may have linked it to its cache: never write through
    torch.save(build_resnet(ARCH).state_dict(), path)
    return path.read_bytes()


# -- names and versions -------------------------------------------------------------------------


def test_parse_version__semantic_version_core_only() -> None:
    assert parse_version("v1.0.0") == (1, 0, 0)
    assert parse_version("2.10.3") == (2, 10, 3)
    for bad in ("v1.0", "1", "v01.0.0", "v1.0.0-rc.1", "latest", "V1.0.0", ""):
        with pytest.raises(DepthpipeError, match=r"use vMAJOR\.MINOR\.PATCH"):
            parse_version(bad)


def test_version_tag__is_what_dvc_looks_up() -> None:
    """The tag parses, with GTO (what DVC uses to find versions), into the name and version."""
    from gto.tag import parse_name

    for name, version in (("encoder-conservative", (1, 0, 0)), ("depth-mild-tilt", (0, 12, 3))):
        tag = version_tag(name, version)
        parsed = parse_name(tag)
        assert (parsed["name"], parsed["version"]) == (name, "v" + ".".join(map(str, version)))


def test_artifact_names__every_preset_name_gives_a_valid_name() -> None:
    assert encoder_artifact("conservative") == "encoder-conservative"
    assert depth_artifact("scratch") == "depth-scratch"
    # preset names are lower-case letters, digits and '_' (config.PRESET_NAME)
    assert encoder_artifact("mild_tilt_2") == "encoder-mild-tilt-2"
    assert ARTIFACT_NAME.match(encoder_artifact("mild_tilt_2"))
    assert not ARTIFACT_NAME.match("encoder_mild") and not ARTIFACT_NAME.match("Encoder-x")


# -- the encoder loader on downloaded files and streams -----------------------------------------


class _Unseekable(io.RawIOBase):
    """A stream that can only be read forward (a network download, a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        return self._data.readinto(buffer)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict()


def test_load_encoder__file_stream_and_forward_only_stream_agree(tmp_path: Path) -> None:
    data = save_encoder(tmp_path / "encoder.pt", seed=3)
    from_file = _weights(load_encoder(ARCH, tmp_path / "encoder.pt"))
    streams: list[BinaryIO] = [io.BytesIO(data), io.BufferedReader(_Unseekable(data))]
    for stream in streams:
        loaded = _weights(load_encoder(ARCH, stream))
        assert loaded.keys() == from_file.keys()
        assert all(torch.equal(loaded[k], from_file[k]) for k in loaded)
    torch.manual_seed(4)  # and not just any ResNet: another seed differs
    other = build_resnet(ARCH).state_dict()
    assert not torch.equal(other["conv1.weight"], from_file["conv1.weight"])


def _bad_files(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (file content, what the error must say)."""
    good = save_encoder(tmp_path / "good.pt", seed=0)
    network = tmp_path / "network"
    save_untrained_model(network, ModelSpec(ARCH, 32, 32, 0.6, 350.0), seed=0)
    checkpoint = io.BytesIO()
    torch.save({"state_dict": torch.load(io.BytesIO(good)), "epoch": 3}, checkpoint)
    pickled = io.BytesIO()
    torch.save(build_resnet(ARCH), pickled)  # the whole module, not a state dict
    return {
        "empty": (b"", "an empty file, not an encoder"),
        "html": (b"<html><body>403 Forbidden</body></html>", "not a torch file (39 bytes"),
        "pointer": (b"version https://git-lfs.github.com/spec/v1\n", "not a torch file"),
        "truncated": (good[: len(good) // 2], "a damaged torch file"),
        "network": ((network / MODEL_WEIGHTS).read_bytes(), "a fine-tuned depth network's"),
        "checkpoint": (checkpoint.getvalue(), "a training checkpoint"),
        "pickled module": (pickled.getvalue(), "holds Python objects besides tensors"),
    }


def test_load_encoder__says_what_a_wrong_or_damaged_file_is(tmp_path: Path) -> None:
    for name, (content, message) in _bad_files(tmp_path).items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        with pytest.raises(DepthpipeError) as raised:
            load_encoder(ARCH, path)
        assert str(raised.value).startswith(f"{path}: "), name
        assert message in str(raised.value), (name, str(raised.value))
        assert "weights_only" not in str(raised.value)  # no advice to unpickle untrusted files
    with pytest.raises(DepthpipeError, match=r"encoder file not found .*dvc artifacts get"):
        load_encoder(ARCH, tmp_path / "missing.pt")


# -- helpers: commands as a user runs them ------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # `python` in subprocesses must be this interpreter (the project's virtual environment).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"] = "test"
        env[f"GIT_{role}_EMAIL"] = "test@example.com"
    return env


def run(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; with ``ok``, fail the test with its output unless it succeeds."""
    result = subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600, check=False
    )
    if ok and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def dvc(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "dvc", *args, cwd=cwd, ok=ok)


def git(*args: str, cwd: Path) -> str:
    return run("git", *args, cwd=cwd).stdout.strip()


# -- the default remote a clone downloads from (tiny projects, no training) ---------------------

TINY_DVC_YAML = """\
stages:
  make:
    cmd: python make.py
    deps: [make.py]
    params: [size]
    outs: [model.bin]
  other:
    cmd: python -c "open('other.bin', 'w').write('not the model')"
    outs: [other.bin]
artifacts:
  tiny:
    path: model.bin
    type: model
    meta: {stage: make}
"""


def tiny_project(root: Path, remote: str | None) -> Path:
    """A Git + DVC project whose stage `make` records model.bin (artifact `tiny`) and `other`
    something else, committed with ``remote`` (as typed to `dvc remote add -d`) as default."""
    root.mkdir()
    git("init", "-q", "-b", "main", cwd=root)
    dvc("init", "-q", cwd=root)
    (root / "dvc.yaml").write_text(TINY_DVC_YAML)
    (root / "params.yaml").write_text("size: 1\nunused: 0\n")
    (root / "make.py").write_text("open('model.bin', 'w').write('weights v1')\n")
    dvc("repro", "-q", cwd=root)
    if remote is not None:
        dvc("remote", "add", "-d", "team", remote, cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", "tiny model", cwd=root)
    return root


def test_register__refuses_a_relative_default_remote_at_the_tagged_commit(tmp_path: Path) -> None:
    root = tiny_project(tmp_path / "project", "../storage")
    committed = (root / ".dvc" / "config").read_text()
    assert "url = ../../storage" in committed  # DVC stores it relative to .dvc/
    # an absolute remote in the workspace only: the commit's config is what a clone gets
    dvc("remote", "modify", "team", "url", str(tmp_path / "storage"), cwd=root)
    with pytest.raises(DepthpipeError) as raised:
        register(root, "tiny", "v1.0.0", "HEAD", None)
    assert str(raised.value) == (
        "the default remote '../../storage' is a relative folder: dvc artifacts get from "
        "another folder cannot reach it; set a team remote (README Sharing) or an absolute path"
    )
    assert git("tag", "--list", cwd=root) == ""


def test_register__refuses_without_a_default_remote(tmp_path: Path) -> None:
    root = tiny_project(tmp_path / "project", None)
    with pytest.raises(DepthpipeError, match=r"^no default remote in \.dvc/config at HEAD: "):
        register(root, "tiny", "v1.0.0", "HEAD", None)
    assert git("tag", "--list", cwd=root) == ""


def test_register__refuses_a_stage_changed_since_dvc_lock(tmp_path: Path) -> None:
    """meta is read from params.yaml at the commit: it must be what made the recorded model."""
    root = tiny_project(tmp_path / "project", str(tmp_path / "storage"))
    (root / "params.yaml").write_text("size: 2\nunused: 1\n")  # not `unused`: no param of make
    (root / "make.py").write_text("open('model.bin', 'w').write('weights v2')\n")
    git("commit", "-q", "-am", "edited without dvc repro", cwd=root)
    with pytest.raises(DepthpipeError) as raised:
        register(root, "tiny", "v1.0.0", "HEAD", None)
    assert str(raised.value) == (
        "make changed since dvc.lock: run dvc repro and commit "
        "(changed: make.py: modified, params.yaml: size modified)"
    )
    # the commit before the edit still registers
    assert register(root, "tiny", "v1.0.0", "HEAD~1", None).tag == "tiny@v1.0.0"
    dvc("repro", "-q", cwd=root)
    git("commit", "-q", "-am", "reproduced", cwd=root)
    assert register(root, "tiny", "v1.1.0", "HEAD", None).push_target == "make"


def test_register__absolute_folder_remote__note_then_stage_push_and_get(tmp_path: Path) -> None:
    """Accepted with a note; the printed `dvc push make` sends the model and nothing else; a
    version whose data was never pushed fails to download as README says, then downloads."""
    storage = tmp_path / "storage"
    root = tiny_project(tmp_path / "project", str(storage))
    printed = run(sys.executable, "-m", "depthpipe.register", "tiny", "v1.0.0", cwd=root).stdout
    commit = git("rev-parse", "HEAD", cwd=root)
    assert printed.splitlines() == [
        f"registered tiny@v1.0.0 at {commit[:8]}",
        f"note: the default remote '{storage}' is a folder on this machine: only this machine "
        "can get the version (a team remote, README Sharing, serves everyone)",
        "share it:  git push origin tiny@v1.0.0 && dvc push make",
        "get it:    dvc artifacts get <repo-url> tiny --rev v1.0.0",
    ]
    # from a bare origin, as from GitHub: a local project path would lend its own DVC cache
    origin = tmp_path / "origin.git"
    git("clone", "-q", "--bare", str(root), str(origin), cwd=tmp_path)
    here = _elsewhere(tmp_path)
    never_pushed = dvc(
        "artifacts", "get", str(origin), "tiny", "--rev", "v1.0.0", cwd=here, ok=False
    )
    assert never_pushed.returncode == 1
    said = "Failed to download artifact 'tiny' via DVC remote: [Errno 2] No storage files available"
    assert said in never_pushed.stderr, never_pushed.stderr
    # README quotes what DVC says, so a reader can search for it
    assert said.replace("'tiny'", "'encoder-conservative'") in " ".join(sharing_section().split())
    assert list(here.iterdir()) == []

    dvc("push", "make", cwd=root)  # the command printed above
    pushed = sorted(p for p in storage.rglob("*") if p.is_file())
    assert [p.read_bytes() for p in pushed] == [b"weights v1"]  # not other.bin
    dvc("artifacts", "get", str(origin), "tiny", "--rev", "v1.0.0", cwd=here)
    assert (here / "model.bin").read_bytes() == b"weights v1"


def fill_other_outputs(root: Path, stage: str, item: str) -> None:
    """Stand-ins for the stage's outputs the registry does not use (DVCLive curves and summary),
    so that ``dvc commit`` can record the stage."""
    declared = stage_io(stage, item)
    for path in (root / p for p in declared.outs + declared.metrics):
        if path.suffix == ".json":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text('{"step": 0}\n')
        elif not path.exists():
            path.mkdir(parents=True)
            (path / "placeholder.tsv").write_text("step\tvalue\n0\t0\n")


def new_project(root: Path, scored_project: Path, remote: Path) -> ProjectPaths:
    """The project's code, dvc.yaml and the scored project's params and packed data, in a new Git
    repository with a DVC remote (a folder) as its default remote."""
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copy(scored_project / "params.yaml", root / "params.yaml")
    shutil.copytree(scored_project / "data" / "processed", root / "data" / "processed")
    git("init", "-q", "-b", "main", cwd=root)
    # the stages' inputs are no output here: keep them out of Git without a committed rule
    (root / ".git" / "info" / "exclude").write_text("/data/\n")
    dvc("init", "-q", cwd=root)
    dvc("remote", "add", "-d", "team", str(remote), cwd=root)
    return project_paths(root)


def commit_models(paths: ProjectPaths, message: str, stages: tuple[str, ...]) -> None:
    dvc("commit", "-f", *stages, cwd=paths.root)
    git("add", "-A", cwd=paths.root)
    git("commit", "-q", "-m", message, cwd=paths.root)


def register_cli(paths: ProjectPaths, artifact: str, version: str) -> str:
    return run(sys.executable, "-m", "depthpipe.register", artifact, version, cwd=paths.root).stdout


@dataclass(frozen=True)
class Registry:
    origin: Path  # the bare Git repository others get from
    project: ProjectPaths
    encoder_v1: bytes  # encoder-conservative@v1.0.0
    encoder_v2: bytes  # encoder-conservative@v1.1.0, the latest
    network: Path  # the network folder registered as depth-conservative@v1.0.0
    register_output: str  # what `python -m depthpipe.register ... v1.0.0` printed
    remote: Path  # the DVC remote, a folder (absolute path)


@pytest.fixture(scope="module")
def registry(scored_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    base = tmp_path_factory.mktemp("registry")
    paths = new_project(base / "project", scored_project, base / "dvc-remote")
    aug = "conservative"
    encoder_v1 = save_encoder(paths.encoder_file(aug), seed=1)
    shutil.copytree(project_paths(scored_project).finetune_dir(aug), paths.finetune_dir(aug))
    for stage in ("pretrain", "finetune"):
        fill_other_outputs(paths.root, stage, aug)
    commit_models(paths, "models v1", (f"pretrain@{aug}", f"finetune@{aug}"))
    printed = register_cli(paths, "encoder-conservative", "v1.0.0")  # the CLI once, then
    register(paths.root, "depth-conservative", "v1.0.0", "HEAD", None)  # its function (faster)
    # as README says: each artifact's stage, not a bare `dvc push`
    dvc("push", "-q", f"pretrain@{aug}", f"finetune@{aug}", cwd=paths.root)

    encoder_v2 = save_encoder(paths.encoder_file(aug), seed=2)
    commit_models(paths, "encoder v2", (f"pretrain@{aug}",))
    register(paths.root, "encoder-conservative", "v1.1.0", "HEAD", None)
    dvc("push", "-q", f"pretrain@{aug}", cwd=paths.root)

    origin = base / "origin.git"
    git("init", "-q", "--bare", "-b", "main", str(origin), cwd=base)
    git("push", "-q", str(origin), "main", cwd=paths.root)
    for tag in git("tag", "--list", cwd=paths.root).split():  # as README: one push per tag
        git("push", "-q", str(origin), tag, cwd=paths.root)
    return Registry(
        origin, paths, encoder_v1, encoder_v2, paths.finetune_dir(aug), printed, base / "dvc-remote"
    )


def _elsewhere(tmp_path: Path) -> Path:
    """A folder in no Git repository and no DVC project."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    assert run("git", "rev-parse", cwd=folder, ok=False).returncode != 0
    return folder


@pytest.mark.slow
def test_register__tags_and_says_how_to_share(registry: Registry) -> None:
    root = registry.project.root
    tags = git("tag", "--list", cwd=root).split()
    assert sorted(tags) == [
        "depth-conservative@v1.0.0",
        "encoder-conservative@v1.0.0",
        "encoder-conservative@v1.1.0",
    ]
    # annotated (DVC ignores lightweight tags), on the commit that recorded each version
    assert git("cat-file", "-t", "encoder-conservative@v1.0.0", cwd=root) == "tag"
    v1 = git("rev-parse", "encoder-conservative@v1.0.0^{commit}", cwd=root)
    assert v1 == git("rev-parse", "HEAD~1", cwd=root) != git("rev-parse", "HEAD", cwd=root)
    assert registry.register_output.splitlines() == [
        f"registered encoder-conservative@v1.0.0 at {v1[:8]}",
        # an absolute folder as the default remote here
        f"note: the default remote '{registry.remote}' is a folder on this machine: only this "
        "machine can get the version (a team remote, README Sharing, serves everyone)",
        # registered on HEAD then: the workspace's outputs are the version's, and only the
        # stage that makes it is pushed (not the data)
        "share it:  git push origin encoder-conservative@v1.0.0 && dvc push pretrain@conservative",
        "get it:    dvc artifacts get <repo-url> encoder-conservative --rev v1.0.0",
    ]


@pytest.mark.slow
def test_register__refuses_what_could_not_be_downloaded(registry: Registry) -> None:
    root = registry.project.root
    before = git("tag", "--list", cwd=root)
    refusals = {
        "encoder-conservatve": (
            "v2.0.0",
            "encoder-conservatve: no such artifact in dvc.yaml at "
            "HEAD (have: depth-aggressive, depth-conservative, ",
        ),
        "depth-aggressive": (
            "v1.0.0",
            "depth-aggressive: models/finetune/aggressive is no recorded DVC output at HEAD",
        ),
        "depth-scratch": ("v1.0.0", "depth-scratch: models/finetune/scratch is no recorded"),
        "encoder-conservative": (
            "v1.0.9",
            "encoder-conservative@v1.0.9: not greater than the "
            "latest version, encoder-conservative@v1.1.0",
        ),
        "depth-conservative": ("1.0", "version '1.0': use vMAJOR.MINOR.PATCH"),
    }
    for artifact, (version, message) in refusals.items():
        with pytest.raises(DepthpipeError) as raised:
            register(root, artifact, version, "HEAD", None)
        assert message in str(raised.value), str(raised.value)
    with pytest.raises(DepthpipeError, match="no-such-rev: no such commit"):
        register(root, "encoder-conservative", "v9.0.0", "no-such-rev", None)
    assert git("tag", "--list", cwd=root) == before


@pytest.mark.slow
def test_get__encoder_version_is_byte_identical_and_loads(
    registry: Registry, tmp_path: Path
) -> None:
    here = _elsewhere(tmp_path)
    got = dvc(
        "artifacts",
        "get",
        str(registry.origin),
        "encoder-conservative",
        "--rev",
        "v1.0.0",
        cwd=here,
    )
    assert "Downloaded 1 file(s) to 'encoder.pt'" in got.stdout
    data = (here / "encoder.pt").read_bytes()
    assert data == registry.encoder_v1 != registry.encoder_v2  # the version, not the latest
    encoder = load_encoder(ARCH, here / "encoder.pt")
    expected = torch.load(io.BytesIO(registry.encoder_v1), weights_only=True)
    assert torch.equal(
        encoder.state_dict()["layer4.1.conv2.weight"], expected["layer4.1.conv2.weight"]
    )


def _meta_at(root: Path, tag: str) -> dict:
    """The artifact's meta as DVC resolves it at the tagged commit (params.yaml of that commit;
    read in the project, which pushed that commit to the origin)."""
    from dvc.repo import Repo

    name = tag.partition("@")[0]
    with Repo(str(root)) as repo, repo.switch(tag):
        return repo.artifacts.read()["dvc.yaml"][name].meta


@pytest.mark.slow
def test_get__network_folder_runs_in_predict(registry: Registry, tmp_path: Path) -> None:
    here = _elsewhere(tmp_path)
    dvc(
        "artifacts",
        "get",
        str(registry.origin),
        "depth-conservative",
        "--rev",
        "v1.0.0",
        "-o",
        "depth-conservative",
        cwd=here,
    )
    folder = here / "depth-conservative"
    for name in (MODEL_WEIGHTS, MODEL_SPEC):
        assert (folder / name).read_bytes() == (registry.network / name).read_bytes(), name
    # meta says what the downloaded network is
    spec = json.loads((folder / MODEL_SPEC).read_text())
    meta = _meta_at(registry.project.root, "depth-conservative@v1.0.0")
    assert meta["arch"] == spec["arch"]
    assert meta["input_size"] == {"height": spec["height"], "width": spec["width"]}
    assert meta["depth_range"] == {"min": spec["min_depth"], "max": spec["max_depth"]}

    photo = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(photo).save(here / "photo.png")
    result = run(
        sys.executable,
        "-m",
        "depthpipe.predict",
        "photo.png",
        "--model",
        "depth-conservative",
        "--out",
        "predictions",
        cwd=here,
    )
    assert "1 depth map(s) written" in result.stdout
    depth = np.load(here / "predictions" / "photo_depth.npy")
    assert depth.shape == (30, 50) and depth.dtype == np.float32
    assert spec["min_depth"] <= depth.min() and depth.max() <= spec["max_depth"]


@pytest.mark.slow
def test_get__missing_name_or_version_is_a_clear_error(registry: Registry, tmp_path: Path) -> None:
    here = _elsewhere(tmp_path)
    cases = {
        ("encoder-nope", "v1.0.0"): "Unable to find artifact 'encoder-nope @ v1.0.0'",
        (
            "encoder-conservative",
            "v9.9.9",
        ): "Unable to find artifact 'encoder-conservative @ v9.9.9'",
    }
    for (name, version), message in cases.items():
        result = dvc(
            "artifacts", "get", str(registry.origin), name, "--rev", version, cwd=here, ok=False
        )
        assert result.returncode == 1, result.stderr
        assert message in result.stderr, result.stderr
    assert list(here.iterdir()) == []  # nothing half-downloaded


def sharing_section() -> str:
    return (
        REPO.joinpath("docs", "sharing.md")
        .read_text()
        .split("\n## Sharing", 1)[1]
        .split("\n## ")[0]
    )


def test_readme__quotes_the_shipped_remote_as_dvc_config_holds_it() -> None:
    from dvc.config import Config

    shipped = Config.load_file(str(REPO / ".dvc" / "config"))
    url = shipped["remote"][shipped["core"]["remote"]]["url"]
    assert f"`url = {url}`" in sharing_section()


def readme_python() -> str:
    """The README's ```python block that loads an encoder through dvc.api (Sharing section)."""
    blocks = re.findall(r"```python\n(.*?)```", sharing_section(), flags=re.DOTALL)
    found = [block for block in blocks if "artifacts_show" in block]
    assert len(found) == 1, "README's Sharing section lost its dvc.api example"
    return found[0]


@pytest.mark.slow
def test_readme_python__loads_the_version_from_the_repository(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dvc.api

    code = readme_python()
    placeholder = '"https://github.com/<org>/depthpipe"'
    assert code.count(placeholder) == 1 and code.count("load_encoder(") == 1
    # the architecture comes from the version's params, never from the README
    assert not re.search(r"resnet\d|wide_resnet|resnext", code), code
    monkeypatch.chdir(_elsewhere(tmp_path))
    # run in this process: the same lines a user runs, without a second start of torch and DVC
    namespace: dict[str, object] = {}
    exec(code.replace(placeholder, repr(str(registry.origin))), namespace)
    encoder = namespace["encoder"]
    assert isinstance(encoder, torch.nn.Module)
    v1 = torch.load(io.BytesIO(registry.encoder_v1), weights_only=True)
    assert all(torch.equal(value, v1[key]) for key, value in encoder.state_dict().items())
    # without a version: the greatest one, v1.1.0
    latest = dvc.api.artifacts_show("encoder-conservative", repo=str(registry.origin))
    root = registry.project.root
    assert latest["rev"] == git("rev-parse", "encoder-conservative@v1.1.0^{commit}", cwd=root)
