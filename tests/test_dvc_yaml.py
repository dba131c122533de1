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
from tests.helpers import REPO, write_params

STAGE_MODULES = {
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
# params dep, not a path dep) and pretrain's resumable working folder (outside every output).
NEUTRAL_MEMBERS = {"root", "params", "pretrain_workdir"}
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


def top_level_files(entries: list[Any]) -> list[str]:
    """Paths named by dvc.yaml's top-level ``plots:``/``metrics:`` (after DVC's interpolation).

    A plot is a path, ``{path: {x: ..., y: ...}}`` or ``{id: {x: {file: field}, y: {file:
    field}}}``; in the last form the files are the keys of ``x``/``y`` and the id is no path.
    """
    files: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            files.append(entry)
            continue
        for key, config in entry.items():
            config = config or {}
            named = [
                file
                for axis in ("x", "y")
                if isinstance(config.get(axis), dict)
                for file in config[axis]
            ]
            files.extend(named or [key])
    return files


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
