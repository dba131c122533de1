"""dvc.yaml agrees with the code: stage names, source deps, params and paths."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from depthpipe.paths import project_paths
from tests.conftest import REPO, write_params

STAGE_MODULES = {
    "fetch": "depthpipe.stages.fetch",
    "preprocess": "depthpipe.stages.preprocess",
    "pretrain": "depthpipe.stages.pretrain",
    "init_scratch": "depthpipe.stages.init_scratch",
    "finetune": "depthpipe.stages.finetune",
    "evaluate": "depthpipe.stages.evaluate",
}
# Imported by every module but carry no behaviour that changes outputs.
NEUTRAL = {"depthpipe", "depthpipe.errors", "depthpipe.paths"}


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


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _body(stage: dict) -> dict:
    return stage.get("do", stage)


def test_dvc_yaml__stage_names() -> None:
    assert list(_stages()) == [
        "fetch",
        "preprocess",
        "pretrain",
        "init_scratch",
        "finetune",
        "evaluate",
    ]
    assert _stages()["finetune"]["foreach"] == ["scratch", "${aug}"]
    assert _stages()["pretrain"]["foreach"] == "${pretrain.presets}"


def test_dvc_yaml__every_imported_source_file_is_a_dep() -> None:
    for name, module in STAGE_MODULES.items():
        deps = {d for d in _body(_stages()[name])["deps"] if d.startswith("src/")}
        needed = {module} | (_depthpipe_imports(module) - NEUTRAL)
        files = {_module_file(m).relative_to(REPO).as_posix() for m in needed}
        files = {f for f in files if not f.endswith("__init__.py")}
        assert files <= deps, f"{name}: missing deps {sorted(files - deps)}"
        assert all((REPO / d).is_file() for d in deps), name


def test_dvc_yaml__aug_only_where_it_belongs() -> None:
    for name, stage in _stages().items():
        params = _body(stage).get("params", [])
        assert ("aug" in params) == (name == "evaluate"), name


def test_dvc_yaml__paths_match_paths_module() -> None:
    paths = project_paths(REPO)
    text = (REPO / "dvc.yaml").read_text()
    for path in (
        paths.raw_diode,
        paths.raw_megadepth,
        paths.processed_diode,
        paths.processed_megadepth,
        paths.preprocess_report,
        paths.evaluate_metrics,
    ):
        assert path.relative_to(REPO).as_posix() in text
    for template in (
        "models/pretrain/${key}",
        "models/finetune/${item}",
        "dvclive/finetune/${item}",
        "dvclive/pretrain/${key}",
    ):
        assert template in text
    assert paths.encoder_file("x").relative_to(REPO).as_posix() == "models/pretrain/x/encoder.pt"
    assert paths.finetune_live("x").relative_to(REPO).as_posix() == "dvclive/finetune/x"


def test_dvc_yaml__third_preset_adds_a_stage_without_code(tmp_path: Path) -> None:
    """`dvc stage list` on dvc.yaml as committed, with one more preset and another aug."""
    import shutil
    import subprocess
    import sys

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
