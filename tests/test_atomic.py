"""replace_dir: all of the new folder or none of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from transferlab.atomic import replace_dir


def test_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with replace_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_error_keeps_old_content_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), replace_dir(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftovers_of_dead_runs_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / ".out.tmp-999999999-abc"  # no such process id
    dead.mkdir()
    (dead / "half.txt").write_text("half")
    unrelated = tmp_path / ".other.tmp-999999999-abc"
    unrelated.mkdir()
    with replace_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-999999999-abc", "out"]
