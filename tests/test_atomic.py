from __future__ import annotations

from pathlib import Path

import pytest

from depthpipe.atomic import atomic_dir, atomic_file, atomic_outputs, leftovers


def test_atomic_dir__failure_keeps_previous_output(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as staged:
        (staged / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as staged:
        (staged / "a.txt").write_text("half")
        raise KeyboardInterrupt
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_outputs__all_or_nothing(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "report.json"
    with pytest.raises(RuntimeError), atomic_outputs(one, two) as (staged_one, staged_two):
        (staged_one / "x").write_text("x")
        staged_two.write_text("{}")
        raise RuntimeError("boom half-way")
    assert list(tmp_path.iterdir()) == []
    with atomic_outputs(one, two) as (staged_one, staged_two):
        (staged_one / "x").write_text("x")
        staged_two.write_text("{}")
    assert (one / "x").read_text() == "x" and two.read_text() == "{}"


def _killed_staging(final: Path) -> list[Path]:
    """What a process killed while staging ``final`` leaves (as atomic_dir/_replace name it):
    a half-built copy and the previous version moved aside."""
    building = final.with_name(f".{final.name}.tmp-k1ll3d_x")
    building.mkdir()
    (building / "half.txt").write_text("half")
    aside = final.with_name(f".{final.name}.old-4242")
    aside.write_text("old")
    return [building, aside]


def test_atomic_outputs__staging_again_removes_only_that_outputs_leftovers(tmp_path: Path) -> None:
    model, report = tmp_path / "model", tmp_path / "report.json"
    left = _killed_staging(model) + _killed_staging(report)
    # Siblings that only look alike: other outputs' leftovers, and user files.
    others = [
        tmp_path / ".model2.tmp-abcdefgh",
        tmp_path / ".model.tmp-x.tmp-abcdefgh",  # a leftover of an output named model.tmp-x
        tmp_path / ".model.old-12.bak",
        tmp_path / "model.tmp-abcdefgh",
        tmp_path / ".other.old-4242",
    ]
    for path in others:
        path.write_text("keep")
    with atomic_outputs(model, report) as (staged_model, staged_report):
        (staged_model / "w").write_text("new")
        staged_report.write_text("{}")
    assert not any(p.exists() for p in left)
    assert all(p.read_text() == "keep" for p in others)
    assert (model / "w").read_text() == "new" and report.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model", "report.json", *(p.name for p in others)]
    )


def test_atomic_dir__sweeps_leftovers_and_atomic_file_only_when_asked(tmp_path: Path) -> None:
    folder, data = tmp_path / "encoder", tmp_path / "depth.npy"
    assert leftovers(folder) == []
    left = _killed_staging(folder)
    assert leftovers(folder) == sorted(left)
    with atomic_dir(folder) as staged:
        assert leftovers(folder) == [staged]  # only its own staging copy remains
    assert leftovers(folder) == []
    left = _killed_staging(data)
    with atomic_file(data) as staged:  # predict's per-file writes: no folder listing
        staged.write_text("a")
    assert all(p.exists() for p in left)
    with atomic_file(data, sweep=True) as staged:
        staged.write_text("b")
    assert leftovers(data) == [] and data.read_text() == "b"
