"""Register a version of a model declared in dvc.yaml's ``artifacts:`` (DVC's model registry).

    python -m depthpipe.register encoder-conservative v1.0.0 [--rev HEAD] [-m MESSAGE]

A version is an annotated Git tag ``<artifact>@vX.Y.Z``, the format of GTO that ``dvc artifacts
get <repo> <artifact> --rev vX.Y.Z`` and ``dvc.api.artifacts_show`` look up. ``git tag`` alone
would accept anything; this checks first what would otherwise only fail for the person trying to
download the version later:

- the artifact is declared in dvc.yaml at that revision (a typo would register a name nobody can
  get: DVC answers "Unable to find artifact");
- the version is vMAJOR.MINOR.PATCH and greater than every registered version of the artifact
  (DVC takes the greatest as the latest);
- the revision's DVC outputs hold the artifact's path with a recorded hash (a tag on a commit whose
  dvc.lock lacks the model, such as depth-aggressive while aug is conservative, is a version that
  cannot be downloaded);
- the revision's committed .dvc/config names a default remote that a clone can reach: ``dvc
  artifacts get`` clones the repository into a temporary folder and downloads from that remote, so
  a relative folder (the one the project ships) resolves next to the temporary clone and holds
  nothing ("No storage files available"). An absolute folder is accepted with a note: only this
  machine reaches it;
- the stage that makes the artifact is what dvc.lock says at that revision (``dvc status``'s
  question, asked of the commit): a params.yaml or a source file edited and committed without
  ``dvc repro`` would make ``meta`` (read from params.yaml) describe another model than the file.

It then creates the tag and prints the commands that share it: git push of the tag, and ``dvc push
<stage>`` of the stage that makes the artifact (its meta.stage), which sends only that stage's
outputs, not the data sets.

Artifact names follow the pipeline's names: ``encoder-<preset>``, ``encoder-scratch``,
``depth-<preset>``, ``depth-scratch`` (a preset's '_' becomes '-': artifact names allow lower-case
letters, digits and dashes).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from depthpipe.errors import DepthpipeError, run_cli

# What DVC itself takes for a URL rather than a local path (dvc.config.Config._resolve).
URL_SCHEME = re.compile(r"^\w+://")

# Lower-case letters and digits in dash-separated words: a subset of what GTO (and so DVC) accepts,
# kept strict so that names stay valid everywhere a tag name or a URL holds them.
ARTIFACT_NAME = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
# Only the semantic-version core: prerelease and build suffixes would need semver's full ordering
# to check that a new version is the greatest, which is what DVC serves as the latest.
VERSION = re.compile(r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
ENCODER_PREFIX = "encoder-"
DEPTH_PREFIX = "depth-"


def encoder_artifact(name: str) -> str:
    """Artifact name of the encoder ``models/pretrain/<name>/encoder.pt`` (a preset or scratch)."""
    return ENCODER_PREFIX + name.replace("_", "-")


def depth_artifact(name: str) -> str:
    """Artifact name of the fine-tuned network ``models/finetune/<name>/``."""
    return DEPTH_PREFIX + name.replace("_", "-")


Version = tuple[int, int, int]  # (major, minor, patch)


def parse_version(text: str) -> Version:
    """(major, minor, patch) of ``vX.Y.Z`` (or ``X.Y.Z``); DepthpipeError otherwise."""
    match = VERSION.match(text)
    if match is None:
        raise DepthpipeError(
            f"version {text!r}: use vMAJOR.MINOR.PATCH, e.g. v1.0.0 (semantic versioning)"
        )
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def format_version(version: Version) -> str:
    return "v" + ".".join(map(str, version))


def version_tag(artifact: str, version: Version) -> str:
    """The Git tag of one version: ``encoder-conservative@v1.0.0``."""
    return f"{artifact}@{format_version(version)}"


@dataclass(frozen=True)
class Revision:
    """What DVC sees at one Git revision: declared artifacts, outputs with a recorded hash, and
    the default remote of the committed .dvc/config (what a clone of that commit downloads from)."""

    artifacts: dict[str, str]  # name -> path, relative to the repository root
    recorded_outs: tuple[str, ...]  # DVC outputs (stage outs, .dvc files) with a hash
    default_remote: str | None = None  # name; None: the committed config sets none
    remote_url: str | None = None  # as written in the committed config (unresolved)
    stage: str | None = None  # the stage whose output holds the artifact asked about
    changed: tuple[str, ...] = ()  # that stage's deps that differ from dvc.lock, with how


def _committed_remote(repo: Any) -> tuple[str | None, str | None]:
    """(name, url) of the default remote in the revision's .dvc/config, read as written: DVC's
    loaded config would have turned a relative folder into an absolute path of this checkout, and
    config.local (never committed) is not what a clone sees."""
    from dvc.config import Config

    try:
        conf = Config.load_file(repo.fs.join(repo.dvc_dir, Config.CONFIG), fs=repo.fs)
    except FileNotFoundError:
        return None, None
    name = conf.get("core", {}).get("remote")
    if not name:
        return None, None
    return name, conf.get("remote", {}).get(name, {}).get("url")


def _changed_deps(repo: Any, stage: Any) -> tuple[str, ...]:
    """``stage``'s deps whose state at the switched-to commit differs from its dvc.lock entry.
    Data deps are no Git files, so they read as deleted: as ``dvc repro --allow-missing`` does,
    such a dep counts as changed only when the output recording it (upstream, in the same
    dvc.lock) has another hash."""
    recorded = {out.fs_path: out.hash_info for out in repo.index.outs if out.hash_info}
    changed = []
    for dep in stage.deps:
        for name, state in dep.status().items():
            upstream = recorded.get(dep.fs_path)
            if state == "deleted" and (upstream is None or upstream == dep.hash_info):
                continue
            if isinstance(state, dict):  # params: {key: "modified", ...}
                state = ", ".join(f"{key} {how}" for key, how in state.items())
            changed.append(f"{name}: {state}")
    if stage.changed_stage():
        changed.append("its command or definition (changed checksum)")
    return tuple(changed)


def _push_target(repo: Any, stage: Any) -> str:
    """The stage as `dvc push` names it from the project's root (DVC's own addressing is
    relative to the current directory)."""
    from dvc.stage import PipelineStage

    file = repo.fs.relpath(stage.path, repo.root_dir)
    if not isinstance(stage, PipelineStage):
        return str(file)  # a .dvc file
    return str(stage.name) if file == "dvc.yaml" else f"{file}:{stage.name}"


def read_revision(root: Path, rev: str, artifact: str | None = None) -> Revision:
    """Artifacts of dvc.yaml and the recorded outputs at ``rev``, as DVC itself resolves them
    (``${...}`` interpolated from that revision's params.yaml), and for ``artifact`` the stage
    that makes it and how that stage differs from dvc.lock."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo, repo.switch(rev):
            artifacts = {
                name: found_artifact.path
                for found in repo.artifacts.read().values()
                for name, found_artifact in found.items()
            }
            remote, url = _committed_remote(repo)
            outs = tuple(
                repo.fs.relpath(out.fs_path, repo.root_dir)
                for out in repo.index.outs
                if out.hash_info  # declared but never run/committed: nothing to download
            )
            # the stage is found from its outputs, not meta.stage: what dvc.lock records is
            # what will be downloaded (tests/test_dvc_yaml.py checks that meta.stage agrees)
            makers = [
                stage
                for stage in repo.index.stages
                for out in stage.outs
                if artifact in artifacts
                and _within(artifacts[artifact], repo.fs.relpath(out.fs_path, repo.root_dir))
            ]
            stage = _push_target(repo, makers[0]) if makers else None
            changed = _changed_deps(repo, makers[0]) if makers else ()
    except DvcException as error:
        raise DepthpipeError(f"{root}: cannot read the DVC project at {rev}: {error}") from error
    return Revision(artifacts, outs, remote, url, stage, changed)


def _within(path: str, folder: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(folder))


def check_artifact(name: str, revision: Revision, rev: str) -> str:
    """The artifact's path; DepthpipeError when the name is invalid, undeclared, or its path is
    no recorded output at ``rev``."""
    if not ARTIFACT_NAME.match(name):
        raise DepthpipeError(f"{name}: an artifact name is lower-case letters, digits and dashes")
    if name not in revision.artifacts:
        have = ", ".join(sorted(revision.artifacts)) or "none"
        raise DepthpipeError(f"{name}: no such artifact in dvc.yaml at {rev} (have: {have})")
    path = revision.artifacts[name]
    if not any(_within(path, out) for out in revision.recorded_outs):
        raise DepthpipeError(
            f"{name}: {path} is no recorded DVC output at {rev}, so this version could not be "
            "downloaded (run the stage that makes it and commit dvc.lock first)"
        )
    return path


def check_up_to_date(revision: Revision) -> None:
    """The stage's dvc.lock entry describes the commit's params and code (else meta, read from
    params.yaml, would describe another model than the recorded file)."""
    if revision.changed:
        raise DepthpipeError(
            f"{revision.stage} changed since dvc.lock: run dvc repro and commit "
            f"(changed: {', '.join(revision.changed)})"
        )


def check_remote(revision: Revision, rev: str) -> str | None:
    """None when the default remote at ``rev`` is reachable from any clone, a note when only from
    this machine (an absolute folder); DepthpipeError when from no other folder at all."""
    if revision.default_remote is None:
        raise DepthpipeError(
            f"no default remote in .dvc/config at {rev}: dvc artifacts get would not know where "
            "to download from; set a team remote (README Sharing) with `dvc remote add -d` and "
            "commit .dvc/config"
        )
    url = revision.remote_url
    if not url:
        raise DepthpipeError(
            f"the default remote '{revision.default_remote}' at {rev} has no url in .dvc/config"
        )
    if URL_SCHEME.match(url):
        return None
    if not os.path.isabs(os.path.expanduser(url)):
        raise DepthpipeError(
            f"the default remote '{url}' is a relative folder: dvc artifacts get from another "
            "folder cannot reach it; set a team remote (README Sharing) or an absolute path"
        )
    return (
        f"note: the default remote '{url}' is a folder on this machine: only this machine can "
        "get the version (a team remote, README Sharing, serves everyone)"
    )


def git(root: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise DepthpipeError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def resolve_commit(root: Path, rev: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        # --quiet silences an unknown revision; what git still says is a bigger problem
        problem = result.stderr.strip() or f"{rev}: no such commit"
        raise DepthpipeError(f"{root.resolve()}: {problem}")
    return result.stdout.strip()


def registered_versions(root: Path, artifact: str) -> list[Version]:
    """Versions of ``artifact`` already tagged (tags of other formats are ignored)."""
    prefix = f"{artifact}@"
    versions = []
    for tag in git(root, "tag", "--list", f"{prefix}v*").splitlines():
        try:
            versions.append(parse_version(tag.removeprefix(prefix)))
        except DepthpipeError:
            continue  # e.g. a prerelease tagged by hand: not ours to order
    return versions


def check_newer(artifact: str, version: Version, existing: list[Version]) -> None:
    """DVC serves the greatest version as the latest: a smaller new one would never be it."""
    if existing and version <= max(existing):
        raise DepthpipeError(
            f"{version_tag(artifact, version)}: not greater than the latest version, "
            f"{version_tag(artifact, max(existing))}"
        )


@dataclass(frozen=True)
class Registered:
    tag: str
    commit: str
    push_target: str  # what `dvc push` needs to send: the stage that makes it (its meta.stage)
    remote_note: str | None  # said when only this machine can reach the default remote


def register(
    root: Path, artifact: str, version_text: str, rev: str, message: str | None
) -> Registered:
    """Check everything, then create the annotated tag on ``rev``."""
    version = parse_version(version_text)
    commit = resolve_commit(root, rev)
    revision = read_revision(root, commit, artifact)
    path = check_artifact(artifact, revision, rev)
    check_up_to_date(revision)
    note = check_remote(revision, rev)
    check_newer(artifact, version, registered_versions(root, artifact))
    tag = version_tag(artifact, version)
    default = f"Registering artifact {artifact} version {format_version(version)}"
    git(root, "tag", "-a", tag, "-m", message or default, commit)
    return Registered(tag, commit, revision.stage or path, note)


def push_command(root: Path, registered: Registered) -> str:
    """Only the artifact's stage: a bare `dvc push` would send every output, the data sets too.
    `dvc push` sends the workspace's outputs; a tag on another commit needs that commit's, which
    --all-tags collects (stages missing at other tags are skipped with a warning)."""
    at_head = registered.commit == resolve_commit(root, "HEAD")
    return f"dvc push {'' if at_head else '--all-tags '}{registered.push_target}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("artifact", help="a name in dvc.yaml's artifacts:, e.g. encoder-scratch")
    parser.add_argument("version", help="vMAJOR.MINOR.PATCH, e.g. v1.0.0")
    parser.add_argument("--rev", default="HEAD", help="the commit to register (default: HEAD)")
    parser.add_argument("-m", "--message", help="the tag's message")
    parser.add_argument("--root", type=Path, default=Path("."), help="project folder")
    args = parser.parse_args()
    registered = register(args.root, args.artifact, args.version, args.rev, args.message)
    tag = registered.tag
    print(f"registered {tag} at {registered.commit[:8]}")
    if registered.remote_note:
        print(registered.remote_note)
    print(f"share it:  git push origin {tag} && {push_command(args.root, registered)}")
    print(f"get it:    dvc artifacts get <repo-url> {args.artifact} --rev {tag.partition('@')[2]}")


if __name__ == "__main__":
    run_cli(main)
