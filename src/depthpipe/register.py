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
  cannot be downloaded).

It then creates the tag and prints the commands that share it (git push of the tag, dvc push).

Artifact names follow the pipeline's names: ``encoder-<preset>``, ``encoder-scratch``,
``depth-<preset>``, ``depth-scratch`` (a preset's '_' becomes '-': artifact names allow lower-case
letters, digits and dashes).
"""

from __future__ import annotations

import argparse
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from depthpipe.errors import DepthpipeError, run_cli

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
    """What DVC sees at one Git revision: declared artifacts and outputs with a recorded hash."""

    artifacts: dict[str, str]  # name -> path, relative to the repository root
    recorded_outs: tuple[str, ...]  # DVC outputs (stage outs, .dvc files) with a hash


def read_revision(root: Path, rev: str) -> Revision:
    """Artifacts of dvc.yaml and the recorded outputs at ``rev``, as DVC itself resolves them
    (``${...}`` interpolated from that revision's params.yaml)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo, repo.switch(rev):
            artifacts = {
                name: artifact.path
                for found in repo.artifacts.read().values()
                for name, artifact in found.items()
            }
            outs = tuple(
                repo.fs.relpath(out.fs_path, repo.root_dir)
                for out in repo.index.outs
                if out.hash_info  # declared but never run/committed: nothing to download
            )
    except DvcException as error:
        raise DepthpipeError(f"{root}: cannot read the DVC project at {rev}: {error}") from error
    return Revision(artifacts, outs)


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


def register(root: Path, artifact: str, version_text: str, rev: str, message: str | None) -> str:
    """Check everything, then create the annotated tag on ``rev``; return the tag."""
    version = parse_version(version_text)
    commit = resolve_commit(root, rev)
    check_artifact(artifact, read_revision(root, commit), rev)
    check_newer(artifact, version, registered_versions(root, artifact))
    tag = version_tag(artifact, version)
    default = f"Registering artifact {artifact} version {format_version(version)}"
    git(root, "tag", "-a", tag, "-m", message or default, commit)
    return tag


def push_command(root: Path, commit: str) -> str:
    """`dvc push` sends the workspace's outputs; a tag on another commit needs its outputs."""
    return "dvc push" if commit == resolve_commit(root, "HEAD") else "dvc push --all-tags"


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
    tag = register(args.root, args.artifact, args.version, args.rev, args.message)
    commit = resolve_commit(args.root, tag)
    print(f"registered {tag} at {commit[:8]}")
    print(f"share it:  git push origin {tag} && {push_command(args.root, commit)}")
    print(f"get it:    dvc artifacts get <repo-url> {args.artifact} --rev {tag.partition('@')[2]}")


if __name__ == "__main__":
    run_cli(main)
