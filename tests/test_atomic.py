from __future__ import annotations

from pathlib import Path

import pytest

from depthpipe.atomic import atomic_dir, atomic_outputs


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
