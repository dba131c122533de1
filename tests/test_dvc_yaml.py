"""dvc.yaml agrees with the code: stage names, source deps, where `aug` is read, every data path.

``pipeline_problems`` takes a dvc.yaml file, lets DVC itself resolve it (``foreach``, ``${key}``,
``${item}``, ``${aug}``) against the committed params.yaml, and compares every stage exactly with
``depthpipe.paths.stage_io`` (data deps, outs, metrics and plots, DVCLive file names included)
and with the source files its module imports. The mutation tests feed it edited copies of
dvc.yaml, so a check that cannot fail shows up as a failing test.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from depthpipe.paths import PACKED_SPLITS, SCRATCH, STAGES, ProjectPaths, StageIO, stage_io
from depthpipe.register import ARTIFACT_NAME, depth_artifact, encoder_artifact
from tests.helpers import REPO, committed_params, deep_merge, top_level_files, write_params

STAGE_MODULES = {
    "fingerprint": "depthpipe.stages.fingerprint",
    "fetch": "depthpipe.stages.fetch",
    "preprocess": "depthpipe.stages.preprocess",
    "pretrain": "depthpipe.stages.pretrain",
    "init_scratch": "depthpipe.stages.init_scratch",
    "finetune": "depthpipe.stages.finetune",
    "evaluate": "depthpipe.stages.evaluate",
}
# Imported by every module but carry no behaviour that changes outputs.
NEUTRAL = {"depthpipe", "depthpipe.errors"}
# ProjectPaths members that are no pipeline data: the project folder, the params file (a DVC
# params dep, not a path dep) and the resumable working folders of pretrain, finetune and fetch
# (outside every output).
# Members for no stage input or output: the params, working folders outside every output, and
# the project's leader lock (depthpipe.distributed).
NEUTRAL_MEMBERS = {
    "root",
    "params",
    "pretrain_workdir",
    "finetune_workdir",
    "fetch_workdir",
    "training_workdirs",
    "leader_lock",
}
# ProjectPaths methods whose argument is no encoder or preset name, and the names they take.
MEMBER_ARGUMENTS = {"packed_split": PACKED_SPLITS}


# -- what the code imports ----------------------------------------------------------------------


def _module_file(module: str) -> Path:
    base = REPO / "src" / Path(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _depthpipe_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """The depthpipe modules ``module`` imports, transitively (by reading the source)."""
    seen = set() if seen is None else seen
    tree = ast.parse(_module_file(module).read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("depthpipe"):
            names = [node.module]
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("depthpipe")]
        for name in names:
            if name not in seen and _module_file(name).is_file():
                seen.add(name)
                _depthpipe_imports(name, seen)
    return seen


def imported_source_files(stage: str) -> set[str]:
    """src/... files a stage's module runs: itself and every depthpipe module it imports."""
    module = STAGE_MODULES[stage]
    needed = {module} | (_depthpipe_imports(module) - NEUTRAL)
    files = {_module_file(m).relative_to(REPO).as_posix() for m in needed}
    return {f for f in files if not f.endswith("__init__.py")}


# -- what dvc.yaml declares, as DVC resolves it -------------------------------------------------


@dataclass(frozen=True)
class DeclaredStage:
    name: str  # as DVC names it: pretrain@aggressive
    base: str  # pretrain
    item: str | None  # aggressive
    src_deps: tuple[str, ...]
    io: StageIO  # the non-src deps, outs, stage-level metrics and plots


@dataclass(frozen=True)
class Pipeline:
    stages: tuple[DeclaredStage, ...]
    top_level: tuple[str, ...]  # files and folders the top-level plots: and metrics: name
    params: dict[str, Any]


def load_pipeline(dvc_yaml: Path, workdir: Path) -> Pipeline:
    """``dvc_yaml`` resolved by DVC in ``workdir`` (a scratch DVC repo) with the committed
    params.yaml."""
    from dvc.dependency.param import ParamsDependency
    from dvc.dvcfile import load_file
    from dvc.repo import Repo

    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(dvc_yaml, workdir / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", workdir / "params.yaml")
    if not (workdir / ".dvc").is_dir():
        Repo.init(str(workdir), no_scm=True)
    stages = []
    with Repo(str(workdir)) as repo:
        dvcfile = load_file(repo, str(workdir / "dvc.yaml"))
        for stage in dvcfile.stages.values():
            base, _, item = stage.name.partition("@")
            deps = [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)]
            outs = [o for o in stage.outs if not o.metric and not o.plot]
            stages.append(
                DeclaredStage(
                    name=stage.name,
                    base=base,
                    item=item or None,
                    src_deps=tuple(d for d in deps if d.startswith("src/")),
                    io=StageIO(
                        data_deps=tuple(d for d in deps if not d.startswith("src/")),
                        outs=tuple(o.def_path for o in outs),
                        metrics=tuple(o.def_path for o in stage.outs if o.metric),
                        plots=tuple(o.def_path for o in stage.outs if o.plot),
                    ),
                )
            )
        top_level = top_level_files(dvcfile.plots) + top_level_files(dvcfile.metrics)
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    return Pipeline(tuple(stages), tuple(top_level), params)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def pipeline_problems(dvc_yaml: Path, workdir: Path) -> list[tuple[str, str]]:
    """(kind, message) for every disagreement of ``dvc_yaml`` with the code; kind is ``data``
    (deps/outs/metrics/plots vs paths.stage_io), ``src`` (source deps vs imports), ``stages``,
    ``top-level`` (a top-level plot of no stage's output) or ``drawn`` (a curve of
    stage_io(...).curves that no plot definition draws)."""
    pipeline = load_pipeline(dvc_yaml, workdir)
    aug = pipeline.params["aug"]
    problems: list[tuple[str, str]] = []
    expected_names = [
        "fingerprint",
        "fetch",
        "preprocess",
        *(f"pretrain@{p}" for p in pipeline.params["pretrain"]["presets"]),
        "init_scratch",
        f"finetune@{SCRATCH}",
        f"finetune@{aug}",
        "evaluate",
    ]
    names = [s.name for s in pipeline.stages]
    if names != expected_names:
        problems.append(("stages", f"stages {names} != {expected_names}"))
    expected_io: dict[str, StageIO] = {}
    for stage in pipeline.stages:
        if stage.base not in STAGES:
            problems.append(("stages", f"{stage.name}: no such stage in depthpipe.paths.STAGES"))
            continue
        expected = stage_io(stage.base, stage.item, aug=aug if stage.base == "evaluate" else None)
        expected_io[stage.name] = expected
        for field in ("data_deps", "outs", "metrics", "plots"):
            declared, wanted = getattr(stage.io, field), getattr(expected, field)
            if sorted(declared) != sorted(wanted):
                problems.append(
                    ("data", f"{stage.name}: {field} {sorted(declared)} != {sorted(wanted)}")
                )
        needed, declared_src = imported_source_files(stage.base), set(stage.src_deps)
        if needed - declared_src:
            problems.append(("src", f"{stage.name}: missing deps {sorted(needed - declared_src)}"))
        if declared_src - needed:
            problems.append(
                ("src", f"{stage.name}: stale deps (not imported) {sorted(declared_src - needed)}")
            )
    written = [path for s in pipeline.stages for path in s.io.written]
    for path in pipeline.top_level:
        if not any(_within(path, out) for out in written):
            problems.append(("top-level", f"{path}: referenced but no stage's output"))
    drawn = [*pipeline.top_level, *(path for s in pipeline.stages for path in s.io.plots)]
    for name, io in expected_io.items():
        for curve in io.curves:
            if not any(_within(curve, plot) for plot in drawn):
                problems.append(("drawn", f"{name}: no plot in dvc.yaml draws {curve}"))
    return problems


# -- what each stage module uses of ProjectPaths ------------------------------------------------


def paths_members_used(source: str) -> set[str]:
    """Names of ``paths.<member>`` in a stage module's source (every stage names it ``paths``)."""
    return {
        node.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "paths"
    }


def _member_values(member: str, names: tuple[str, ...]) -> set[str] | None:
    """The relative paths a ProjectPaths member gives (called with each candidate name if it
    is a method: ``names``, or its own from MEMBER_ARGUMENTS); None if it is no ProjectPaths
    member."""
    paths = ProjectPaths(Path())
    if not hasattr(paths, member):
        return None
    value = getattr(paths, member)
    arguments = MEMBER_ARGUMENTS.get(member, names)
    values = [value(name) for name in arguments] if callable(value) else [value]
    return {v.as_posix() for v in values}


def _related(a: str, b: str) -> bool:
    return _within(a, b) or _within(b, a)


def member_problems(
    stage: str, source: str, ios: list[StageIO], names: tuple[str, ...]
) -> list[str]:
    """Each data path a stage declares comes from a ProjectPaths member its module uses, and
    each member it uses gives a path it declares (the member's folder or something inside it).

    Checked on member names, not on the values at run time: ``paths.finetune_dir(x)`` counts as
    ``models/finetune/<any of names>``.
    """
    used = paths_members_used(source) - NEUTRAL_MEMBERS
    values: dict[str, set[str]] = {}
    problems = []
    for member in sorted(used):
        found = _member_values(member, names)
        if found is None:
            problems.append(f"{stage}: paths.{member} is no ProjectPaths member")
        else:
            values[member] = found
    declared = {p for io in ios for p in (*io.data_deps, *io.written)}
    for path in sorted(declared):
        if not any(_related(path, v) for found in values.values() for v in found):
            problems.append(f"{stage}: declares {path} but uses no ProjectPaths member for it")
    for member, found in sorted(values.items()):
        if not any(_related(v, path) for v in found for path in declared):
            problems.append(f"{stage}: uses paths.{member} ({sorted(found)}) but declares none")
    return problems


def _stage_ios(stage: str) -> tuple[list[StageIO], tuple[str, ...]]:
    """stage_io for every foreach item of the committed params, and the names it uses."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    aug = params["aug"]
    items: list[str | None] = {
        "pretrain": list(params["pretrain"]["presets"]),
        "finetune": [SCRATCH, aug],
    }.get(stage, [None])
    ios = [stage_io(stage, item, aug=aug if stage == "evaluate" else None) for item in items]
    return ios, (SCRATCH, aug, *params["pretrain"]["presets"])


def _source(stage: str) -> str:
    return _module_file(STAGE_MODULES[stage]).read_text()


# -- tests --------------------------------------------------------------------------------------


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _body(stage: dict) -> dict:
    return stage.get("do", stage)


@pytest.fixture(scope="module")
def committed_problems(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    return pipeline_problems(REPO / "dvc.yaml", tmp_path_factory.mktemp("committed"))


def test_dvc_yaml__stage_names(committed_problems: list[tuple[str, str]]) -> None:
    assert list(_stages()) == list(STAGES)
    assert _stages()["finetune"]["foreach"] == [SCRATCH, "${aug}"]
    assert _stages()["pretrain"]["foreach"] == "${pretrain.presets}"
    assert [m for kind, m in committed_problems if kind == "stages"] == []


def test_dvc_yaml__data_paths_are_exactly_stage_io(
    committed_problems: list[tuple[str, str]],
) -> None:
    assert [m for kind, m in committed_problems if kind in ("data", "top-level", "drawn")] == []


def test_dvc_yaml__source_deps_are_exactly_the_imported_files(
    committed_problems: list[tuple[str, str]],
) -> None:
    assert [m for kind, m in committed_problems if kind == "src"] == []
    for name, stage in _stages().items():
        for dep in _body(stage)["deps"]:
            if dep.startswith("src/"):
                assert (REPO / dep).is_file(), f"{name}: {dep}"


def _replace(old: str, new: str = "") -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert text.count(old) == 1, f"mutation target not found once: {old!r}"
        return text.replace(old, new)

    return edit


def _add_top_level_plot(entry: str) -> Callable[[str], str]:
    """Add ``entry`` (YAML of one list item, indented by 2) to the top-level ``plots:``."""

    def edit(text: str) -> str:
        if "\nplots:\n" in text:
            return text.replace("\nplots:\n", "\nplots:\n" + entry, 1)
        return text.rstrip("\n") + "\nplots:\n" + entry

    return edit


MUTATIONS: dict[str, tuple[Callable[[str], str], str, str]] = {
    # name: (edit of dvc.yaml's text, kind of the new problem, text in its message)
    "drop a foreach item": (
        _replace('foreach: [scratch, "${aug}"]', "foreach: [scratch]"),
        "stages",
        "finetune@conservative",
    ),
    "delete an out": (
        _replace("      - data/processed/report.json\n"),
        "data",
        "preprocess: outs",
    ),
    "delete a stage's model out": (
        _replace("        - models/pretrain/${key}\n"),
        "data",
        "pretrain@aggressive: outs",
    ),
    "delete a DVCLive plots out": (
        _replace("        - dvclive/finetune/${item}/plots\n"),
        "data",
        "finetune@scratch: outs",
    ),
    "delete a data dep": (
        _replace("        - models/pretrain/${item}/encoder.pt\n"),
        "data",
        "finetune@scratch: data_deps",
    ),
    "fetch no longer watches data.local": (
        _replace(
            "      - src/depthpipe/cli.py\n      - data/raw/local_fingerprint.json\n",
            "      - src/depthpipe/cli.py\n",
        ),
        "data",
        "fetch: data_deps",
    ),
    "delete evaluate's raw dep": (
        _replace("      - data/raw/diode/val\n"),
        "data",
        "evaluate: data_deps",
    ),
    "widen a data dep": (
        _replace("      - data/processed/diode/test\n", "      - data/processed/diode\n"),
        "data",
        "evaluate: data_deps",
    ),
    "rename a DVCLive summary": (
        _replace("dvclive/finetune/${item}/metrics.json", "dvclive/finetune/${item}/summary.json"),
        "data",
        "finetune@conservative: metrics",
    ),
    "rename the DVCLive images folder": (
        _replace("dvclive/evaluate/plots/images", "dvclive/evaluate/images"),
        "data",
        "evaluate: plots",
    ),
    "delete a stage's metrics": (
        _replace("    metrics:\n      - metrics/evaluate.json:\n          cache: false\n"),
        "data",
        "evaluate: metrics",
    ),
    "stale source dep": (
        _replace(
            "      - src/depthpipe/stages/fetch.py\n",
            "      - src/depthpipe/stages/fetch.py\n      - src/depthpipe/plots.py\n",
        ),
        "src",
        "fetch: stale deps",
    ),
    "missing source dep": (
        _replace("      - src/depthpipe/stages/init_scratch.py\n"),
        "src",
        "init_scratch: missing deps",
    ),
    "top-level plot of an undeclared file": (
        _add_top_level_plot("  - dvclive/evaluate/metrics.json\n"),
        "top-level",
        "dvclive/evaluate/metrics.json",
    ),
    "top-level plot with y files, one undeclared": (
        _add_top_level_plot(
            "  - curves:\n      x: step\n      y:\n"
            "        dvclive/finetune/${aug}/plots/metrics/val/abs_rel.tsv: abs_rel\n"
            "        dvclive/finetune/${aug}/params.yaml: lr\n"
        ),
        "top-level",
        "dvclive/finetune/conservative/params.yaml",
    ),
    "a preset's curve drawn by no plot": (
        _replace("        dvclive/pretrain/conservative/plots/metrics/train/loss.tsv: loss\n"),
        "drawn",
        "pretrain@conservative: no plot in dvc.yaml draws "
        "dvclive/pretrain/conservative/plots/metrics/train/loss.tsv",
    ),
    "a renamed DVCLive curve": (
        _replace(
            "dvclive/finetune/${aug}/plots/metrics/val/abs_rel.tsv",
            "dvclive/finetune/${aug}/plots/metrics/val/absrel.tsv",
        ),
        "drawn",
        "finetune@conservative: no plot in dvc.yaml draws "
        "dvclive/finetune/conservative/plots/metrics/val/abs_rel.tsv",
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_pipeline_problems__mutated_dvc_yaml_fails(
    mutation: str, tmp_path: Path, committed_problems: list[tuple[str, str]]
) -> None:
    edit, kind, message = MUTATIONS[mutation]
    mutated = tmp_path / "mutated.yaml"
    mutated.write_text(edit((REPO / "dvc.yaml").read_text()))
    new = set(pipeline_problems(mutated, tmp_path / "repo")) - set(committed_problems)
    assert any(k == kind and message in m for k, m in new), new


def test_pipeline_problems__top_level_plots_of_declared_outputs_pass(tmp_path: Path) -> None:
    edited = tmp_path / "edited.yaml"
    edit = _add_top_level_plot(
        "  - extra_curves:\n      x: step\n      y:\n"
        "        dvclive/finetune/scratch/plots/metrics/val/delta1.tsv: delta1\n"
        "        dvclive/finetune/${aug}/plots/metrics/val/delta1.tsv: delta1\n"
        "  - dvclive/evaluate/plots/images\n"
        "  - dvclive/pretrain/aggressive/plots/metrics/train/loss.tsv:\n      x: step\n"
    )
    edited.write_text(edit((REPO / "dvc.yaml").read_text()))
    pipeline = load_pipeline(edited, tmp_path / "repo")
    # really parsed (the id extra_curves is no path), so "no problem" below means something
    assert {
        "dvclive/finetune/scratch/plots/metrics/val/delta1.tsv",
        "dvclive/finetune/conservative/plots/metrics/val/delta1.tsv",
        "dvclive/evaluate/plots/images",
        "dvclive/pretrain/aggressive/plots/metrics/train/loss.tsv",
    } <= set(pipeline.top_level)
    assert "extra_curves" not in pipeline.top_level
    problems = pipeline_problems(edited, tmp_path / "repo")
    assert [m for kind, m in problems if kind == "top-level"] == []


@pytest.mark.parametrize("stage", STAGES)
def test_stage_io__each_path_comes_from_a_member_the_stage_uses(stage: str) -> None:
    ios, names = _stage_ios(stage)
    assert member_problems(stage, _source(stage), ios, names) == []


def _member_mutations() -> Iterator[tuple[str, str, str]]:
    # (stage, edited source, text in the expected problem)
    finetune = _source("finetune")
    yield (
        "finetune",
        finetune + "\n\ndef extra(paths):\n    return paths.raw_megadepth\n",
        ("uses paths.raw_megadepth"),
    )
    evaluate = _source("evaluate")
    assert "paths.raw_diode" in evaluate
    yield "evaluate", evaluate.replace("paths.raw_diode", "RAW"), "declares data/raw/diode/val"
    yield "fetch", _source("fetch") + "\nX = paths.raw_diodes\n", "paths.raw_diodes is no"


@pytest.mark.parametrize(("stage", "source", "message"), list(_member_mutations()))
def test_member_problems__mutated_source_fails(stage: str, source: str, message: str) -> None:
    ios, names = _stage_ios(stage)
    problems = member_problems(stage, source, ios, names)
    assert any(message in p for p in problems), problems


def test_stage_io__rejects_wrong_arguments() -> None:
    with pytest.raises(ValueError, match="takes an item"):
        stage_io("finetune")
    with pytest.raises(ValueError, match="takes no item"):
        stage_io("fetch", "x")
    with pytest.raises(ValueError, match="needs aug"):
        stage_io("evaluate")
    with pytest.raises(ValueError, match="unknown stage"):
        stage_io("train")


def test_dvc_yaml__fingerprint_runs_every_time_and_fetch_reads_it() -> None:
    """The fingerprint stage is how DVC notices a changed data.local folder: it must run on
    every repro, and fetch must depend on its file (the mutation above drops that dep)."""
    stages = _stages()
    assert stages["fingerprint"]["always_changed"] is True
    assert "always_changed" not in stages["fetch"]  # fetch keeps its run cache
    assert "data/raw/local_fingerprint.json" in stages["fetch"]["deps"]


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    return {
        leaf
        for key, value in tree.items()
        for leaf in (
            _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
        )
    }


# Keys that change how a stage works, never a byte of what it writes (so changing them must not
# re-run it): fetch's checks and transfer mode, preprocess's process count.
HOW_NOT_WHAT = {
    "fetch": {
        "data.official.diode_train.md5",
        "data.official.diode_val.md5",
        "data.official.megadepth.md5",
        "data.official.keep_archives",
        "data.official.stream",
    },
    "preprocess": {"preprocess.workers"},
}


@pytest.mark.parametrize(
    ("stage", "sections"), [("fetch", ("data",)), ("preprocess", ("preprocess",))]
)
def test_dvc_yaml__params_leave_out_only_how_not_what(stage: str, sections: tuple) -> None:
    """Every key of the sections a stage reads is a param of it, except HOW_NOT_WHAT: a new key
    cannot be forgotten, and a speed or check knob cannot re-run the stage."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    declared = _body(_stages()[stage])["params"]
    leaves = _leaves({section: params[section] for section in sections})
    covered = {
        leaf
        for leaf in leaves
        if any(_within(leaf.replace(".", "/"), d.replace(".", "/")) for d in declared)
    }
    assert leaves - covered == HOW_NOT_WHAT[stage]


def test_dvc_yaml__aug_only_where_it_belongs() -> None:
    for name, stage in _stages().items():
        params = _body(stage).get("params", [])
        assert ("aug" in params) == (name == "evaluate"), name


def test_dvc_yaml__third_preset_adds_a_stage_without_code(tmp_path: Path) -> None:
    """`dvc stage list` on dvc.yaml as committed, with one more preset and another aug."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    write_params(
        tmp_path,
        {
            "aug": "mild",
            "pretrain": {"presets": {"mild": {"random_rotation": {"prob": 1.0, "degrees": 5}}}},
        },
    )
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    listing = subprocess.run(
        [sys.executable, "-m", "dvc", "stage", "list", "--name-only"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listing == [
        "fingerprint",
        "fetch",
        "preprocess",
        "pretrain@aggressive",
        "pretrain@conservative",
        "pretrain@mild",
        "init_scratch",
        "finetune@scratch",
        "finetune@mild",
        "evaluate",
    ]


# -- artifacts: dvc.yaml's model registry against params.yaml and the stages --------------------
#
# DVC interpolates ${...} inside `artifacts:` but has no foreach there, so each preset's encoder and
# fine-tuned network is declared by hand: these checks catch a preset added without them, a path
# that is no stage's output, and `meta` that says something else than the params of the commit.


@dataclass(frozen=True)
class ExpectedArtifact:
    kind: str  # encoder or depth
    item: str  # scratch or a preset
    path: str
    stage: str  # the stage that makes it, as DVC names it


def expected_artifacts(params: dict[str, Any]) -> dict[str, ExpectedArtifact]:
    """One encoder and one fine-tuned network per preset and for scratch, named as
    depthpipe.register names them."""
    p = ProjectPaths(Path())
    expected = {}
    for item in (SCRATCH, *params["pretrain"]["presets"]):
        pretrain = "init_scratch" if item == SCRATCH else f"pretrain@{item}"
        expected[encoder_artifact(item)] = ExpectedArtifact(
            "encoder", item, p.encoder_file(item).as_posix(), pretrain
        )
        expected[depth_artifact(item)] = ExpectedArtifact(
            "depth", item, p.finetune_dir(item).as_posix(), f"finetune@{item}"
        )
    return expected


def lookup(params: dict[str, Any], dotted: str) -> Any:
    """The value of a DVC params key (``pretrain.presets.aggressive``)."""
    value: Any = params
    for part in dotted.split("."):
        value = value[part]
    return value


def load_artifacts(
    dvc_yaml: Path, workdir: Path, params: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The artifacts of ``dvc_yaml`` as DVC resolves them against ``params``, and each stage's
    declared params keys."""
    from dvc.dependency.param import ParamsDependency
    from dvc.dvcfile import load_file
    from dvc.repo import Repo

    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(dvc_yaml, workdir / "dvc.yaml")
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (workdir / ".dvc").is_dir():
        Repo.init(str(workdir), no_scm=True)
    with Repo(str(workdir)) as repo:
        artifacts = repo.artifacts.read().get("dvc.yaml", {})
        stage_params = {
            stage.name: [
                key for dep in stage.deps if isinstance(dep, ParamsDependency) for key in dep.params
            ]
            for stage in load_file(repo, str(workdir / "dvc.yaml")).stages.values()
        }
    return artifacts, stage_params


def _declared_params(stage: str, stage_params: dict[str, list[str]]) -> list[str] | None:
    """Params keys of ``stage``; finetune@<preset> exists only while aug is that preset, and
    its params are finetune@scratch's (no key depends on the item)."""
    base = stage.partition("@")[0]
    return stage_params.get(stage, stage_params.get(f"{base}@{SCRATCH}"))


# Upstream params a downloader needs besides the stage's own (it never sees dvc.lock): how the
# encoder of depth-<preset> was pretrained, in meta.pretraining (the preset's key is added).
PRETRAINING_KEYS = (
    "preprocess.megadepth_short_side",
    "pretrain.method",
    "pretrain.epochs",
    "pretrain.batch_size",
    "pretrain.image_size",
    "pretrain.lr",
)


def _dotted_problems(
    name: str, field: str, recorded: Any, keys: list[str], params: dict[str, Any]
) -> list[str]:
    """``recorded`` (meta.<field>) maps exactly ``keys`` to their values in ``params``."""
    if not isinstance(recorded, dict) or sorted(recorded) != sorted(keys):
        found = sorted(recorded) if isinstance(recorded, dict) else recorded
        return [f"{name}: meta.{field} keys {found} != {sorted(keys)}"]
    return [
        f"{name}: meta.{field}.{key} {value!r} != params.yaml's {lookup(params, key)!r}"
        for key, value in recorded.items()
        if value != lookup(params, key)
    ]


def _meta_problems(
    name: str,
    want: ExpectedArtifact,
    meta: dict[str, Any],
    params: dict[str, Any],
    stage_params: dict[str, list[str]],
) -> list[str]:
    """``meta`` states what loading the model needs, with the values of ``params``."""
    stated = {
        "stage": want.stage,
        "arch": params["model"]["arch"],
        "data": {key: params["data"][key] for key in ("source", "diode_domains")},
    }
    if want.kind == "depth":
        stated |= {
            "encoder": encoder_artifact(want.item),
            "input_size": {k: params["preprocess"][k] for k in ("height", "width")},
            "depth_range": {
                "min": params["depth"]["min_depth"],
                "max": params["depth"]["max_depth"],
            },
        }
    elif want.item != SCRATCH:
        stated["input_size"] = params["pretrain"]["image_size"]
        short_side = params["preprocess"]["megadepth_short_side"]
        stated["preprocess"] = {"megadepth_short_side": short_side}
    problems = [
        f"{name}: meta.{key} {meta.get(key)!r} != {value!r}"
        for key, value in stated.items()
        if meta.get(key) != value
    ]
    if want.kind == "depth" and want.item != SCRATCH:
        pretraining = [*PRETRAINING_KEYS, f"pretrain.presets.{want.item}"]
        problems += _dotted_problems(
            name, "pretraining", meta.get("pretraining"), pretraining, params
        )
    keys = _declared_params(want.stage, stage_params)
    if keys is None:
        return [*problems, f"{name}: {want.stage}, the stage that makes it, is not in dvc.yaml"]
    return problems + _dotted_problems(name, "params", meta.get("params"), keys, params)


def _artifact_problems(
    name: str,
    artifact: Any,
    want: ExpectedArtifact,
    params: dict[str, Any],
    stage_params: dict[str, list[str]],
) -> list[str]:
    problems = []
    if artifact.path != want.path:
        problems.append(f"{name}: path {artifact.path} != {want.path}")
    base, _, item = want.stage.partition("@")
    outs = stage_io(base, item or None).outs  # the artifact must be inside what the stage writes
    if not any(_within(artifact.path, out) for out in outs):
        problems.append(f"{name}: {artifact.path} is in none of {want.stage}'s outs {list(outs)}")
    if artifact.type != "model" or not artifact.desc:
        problems.append(f"{name}: type {artifact.type!r} (want 'model') or no desc")
    if not {want.kind, want.item} <= set(artifact.labels):
        problems.append(f"{name}: labels {artifact.labels} lack {want.kind!r} or {want.item!r}")
    return problems + _meta_problems(name, want, artifact.meta, params, stage_params)


def _dvc_accepts(name: str) -> bool:
    """DVC's own rule for artifact names (ARTIFACT_NAME is a stricter subset)."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.repo.artifacts import check_name_format

    try:
        check_name_format(name)
    except InvalidArgumentError:
        return False
    return True


def artifact_problems(
    dvc_yaml: Path, workdir: Path, params: dict[str, Any] | None = None
) -> list[str]:
    """Every disagreement of ``dvc_yaml``'s artifacts with ``params`` (default: the committed
    params.yaml) and the pipeline: a missing or unexpected artifact, an invalid name, a path
    that is not the stage's output, and meta that is not the params."""
    params = committed_params() if params is None else params
    declared, stage_params = load_artifacts(dvc_yaml, workdir, params)
    expected = expected_artifacts(params)
    problems = [
        f"{name}: no artifact for the {want.kind} of '{want.item}' in dvc.yaml"
        for name, want in expected.items()
        if name not in declared
    ]
    for name, artifact in declared.items():
        if not (ARTIFACT_NAME.match(name) and _dvc_accepts(name)):
            problems.append(f"{name}: not a valid artifact name (lower-case, digits, dashes)")
        if name not in expected:
            problems.append(f"{name}: names no encoder or fine-tuned network of params.yaml")
        else:
            problems += _artifact_problems(name, artifact, expected[name], params, stage_params)
    return problems


def test_dvc_yaml__artifacts_are_every_encoder_and_network(tmp_path: Path) -> None:
    declared, _ = load_artifacts(REPO / "dvc.yaml", tmp_path, committed_params())
    presets = list(committed_params()["pretrain"]["presets"])
    assert len(presets) >= 2 and set(declared) == set(expected_artifacts(committed_params()))
    assert declared["encoder-conservative"].path == "models/pretrain/conservative/encoder.pt"
    assert declared["depth-scratch"].path == "models/finetune/scratch"
    assert artifact_problems(REPO / "dvc.yaml", tmp_path) == []


def _other(value: Any) -> Any:
    """A different value of the same kind (every leaf of a mapping differs)."""
    if isinstance(value, dict):
        return {key: _other(item) for key, item in value.items()}
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, "other"]
    return "other"  # null


def _set(params: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    (lookup(params, ".".join(parents)) if parents else params)[last] = value


def test_artifact_problems__meta_follows_params(tmp_path: Path) -> None:
    """Every param any artifact states (its stage's declared params, its data, the encoder's
    pretraining) set to another value, as `dvc exp run -S` would: still no problem, so meta holds
    no literal that only happens to equal today's params.yaml."""
    committed = committed_params()
    _, stage_params = load_artifacts(REPO / "dvc.yaml", tmp_path / "committed", committed)
    keys = {"data.source", "data.diode_domains", *PRETRAINING_KEYS}
    for want in expected_artifacts(committed).values():
        keys |= set(_declared_params(want.stage, stage_params) or [])
    assert {"pretrain.lr", "pretrain.method", "pretrain.trainer", "finetune", "seed"} <= keys
    assert "pretrain.presets.aggressive" in keys and "aug" not in keys
    params = yaml.safe_load(yaml.safe_dump(committed))  # a deep copy
    for key in sorted(keys):
        _set(params, key, _other(lookup(committed, key)))
    declared, _ = load_artifacts(REPO / "dvc.yaml", tmp_path / "varied", params)
    meta = declared["depth-conservative"].meta  # really re-resolved
    assert meta["arch"] == "resnet18-other" and meta["data"]["diode_domains"][-1] == "other"
    assert meta["params"]["finetune"]["trainer"]["devices"] == 3
    assert artifact_problems(REPO / "dvc.yaml", tmp_path / "varied", params) == []


def _artifact_block(text: str, name: str) -> tuple[int, int]:
    """Where the ``artifacts:`` entry ``name`` is in dvc.yaml's text (up to a blank line)."""
    start = text.index(f"\n  {name}:\n", text.index("\nartifacts:\n"))
    end = text.find("\n\n", start + 1)
    return start, len(text) if end < 0 else end


def _in_artifact(name: str, old: str, new: str) -> Callable[[str], str]:
    """Replace ``old`` once inside the ``artifacts:`` entry ``name`` of dvc.yaml's text."""

    def edit(text: str) -> str:
        start, end = _artifact_block(text, name)
        block = text[start:end]
        assert block.count(old) == 1, f"mutation target not found once in {name}: {old!r}"
        return text[:start] + block.replace(old, new) + text[end:]

    return edit


def _add_artifact(copy_of: str, old: str, new: str) -> Callable[[str], str]:
    """Append a copy of the entry ``copy_of`` with every ``old`` replaced by ``new``."""

    def edit(text: str) -> str:
        start, end = _artifact_block(text, copy_of)
        block = text[start:end].replace(old, new)
        return text.rstrip("\n") + "\n" + block + "\n"

    return edit


MILD = {"pretrain": {"presets": {"mild": {"random_rotation": {"prob": 1.0, "degrees": 5}}}}}

ARTIFACT_MUTATIONS: dict[str, tuple[Callable[[str], str], dict[str, Any], str | list[str]]] = {
    # name: (edit of dvc.yaml's text, params override, text of the expected problem, or the
    # exact list of problems when nothing else may be reported)
    "a preset without its artifacts": (
        lambda text: text,
        {"pretrain": {"presets": {"mild_tilt": {"random_rotation": {"prob": 1.0, "degrees": 5}}}}},
        "encoder-mild-tilt: no artifact for the encoder of 'mild_tilt'",
    ),
    "a preset's network without its artifact": (
        # its encoder declared: only the network's check can report this
        _add_artifact("encoder-conservative", "conservative", "mild"),
        MILD,
        ["depth-mild: no artifact for the depth of 'mild' in dvc.yaml"],
    ),
    "an artifact that names no encoder or network": (
        _add_artifact("encoder-conservative", "encoder-conservative:", "encoder-extra:"),
        {},
        ["encoder-extra: names no encoder or fine-tuned network of params.yaml"],
    ),
    "the producing stage renamed": (
        _replace("\n  init_scratch:\n", "\n  init_random:\n"),
        {},
        ["encoder-scratch: init_scratch, the stage that makes it, is not in dvc.yaml"],
    ),
    "a literal data source": (
        _in_artifact("depth-conservative", "source: ${data.source}", "source: official"),
        {},
        "depth-conservative: meta.data {'source': 'official'",
    ),
    "an encoder without the photos' size": (
        _in_artifact(
            "encoder-aggressive",
            "        megadepth_short_side: ${preprocess.megadepth_short_side}\n",
            "        size_of_photos: ${preprocess.megadepth_short_side}\n",
        ),
        {},
        [
            "encoder-aggressive: meta.preprocess {'size_of_photos': 96} "
            "!= {'megadepth_short_side': 96}"
        ],
    ),
    "the pretraining of another preset": (
        _in_artifact(
            "depth-conservative",
            "pretrain.presets.conservative: ${pretrain.presets.conservative}",
            "pretrain.presets.conservative: ${pretrain.presets.aggressive}",
        ),
        {},
        "depth-conservative: meta.pretraining.pretrain.presets.conservative",
    ),
    "a network without its encoder's pretraining lr": (
        _in_artifact("depth-aggressive", "        pretrain.lr: ${pretrain.lr}\n", ""),
        {},
        "depth-aggressive: meta.pretraining keys",
    ),
    "a literal arch": (
        _in_artifact(
            "encoder-conservative", "\n      arch: ${model.arch}\n", "\n      arch: resnet50\n"
        ),
        {},
        "encoder-conservative: meta.arch 'resnet50' != 'resnet18'",
    ),
    "a literal depth range": (
        _in_artifact("depth-conservative", "min: ${depth.min_depth}", "min: 0.1"),
        {},
        "depth-conservative: meta.depth_range",
    ),
    "a stage param missing from meta.params": (
        _in_artifact("encoder-aggressive", "        pretrain.trainer: ${pretrain.trainer}\n", ""),
        {},
        "encoder-aggressive: meta.params keys",
    ),
    "a param of another preset": (
        _in_artifact(
            "encoder-conservative",
            "pretrain.presets.conservative: ${pretrain.presets.conservative}",
            "pretrain.presets.conservative: ${pretrain.presets.aggressive}",
        ),
        {},
        "encoder-conservative: meta.params.pretrain.presets.conservative",
    ),
    "the encoder path of another preset": (
        _in_artifact(
            "encoder-conservative",
            "path: models/pretrain/conservative/encoder.pt",
            "path: models/pretrain/aggressive/encoder.pt",
        ),
        {},
        "encoder-conservative: path models/pretrain/aggressive/encoder.pt",
    ),
    "a network folder that is no stage output": (
        _in_artifact("depth-scratch", "path: models/finetune/scratch", "path: models/scratch"),
        {},
        "depth-scratch: models/scratch is in none of finetune@scratch's outs",
    ),
    "an invalid name": (
        _in_artifact("depth-scratch", "depth-scratch:", "depth_Scratch:"),
        {},
        "depth_Scratch: not a valid artifact name",
    ),
    "a type other than model": (
        _in_artifact("encoder-scratch", "type: model", "type: data"),
        {},
        "encoder-scratch: type 'data'",
    ),
}


@pytest.mark.parametrize("mutation", list(ARTIFACT_MUTATIONS))
def test_artifact_problems__mutation_is_caught(mutation: str, tmp_path: Path) -> None:
    edit, override, expected = ARTIFACT_MUTATIONS[mutation]
    mutated = tmp_path / "mutated.yaml"
    mutated.write_text(edit((REPO / "dvc.yaml").read_text()))
    problems = artifact_problems(
        mutated, tmp_path / "repo", deep_merge(committed_params(), override)
    )
    if isinstance(expected, list):
        assert problems == expected
    else:
        assert any(expected in problem for problem in problems), problems
