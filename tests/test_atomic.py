"""replace_dir, replace_together: all of the new folder (and files) or none of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from transferlab.atomic import replace_dir, replace_together


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


def test_a_run_killed_between_the_two_renames_loses_nothing(tmp_path: Path) -> None:
    """`kill -9` after the old folder moved aside and before the new one moved in: the next
    replace_dir on the target puts the old content back first (before, it deleted both)."""
    target = tmp_path / "out"
    aside = tmp_path / ".out.old-999999999-abc"  # no such process id
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "old.txt").write_text("old")
    half = tmp_path / ".out.tmp-999999999-def"
    half.mkdir()
    (half / "new.txt").write_text("new, complete or not")
    with pytest.raises(RuntimeError), replace_dir(target):
        raise RuntimeError("this run fails too")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_folder_and_files_beside_it_are_replaced_together(tmp_path: Path) -> None:
    """Train's unit: models/ with reports/history.csv; a failure before the end keeps all the old."""
    folder, file = tmp_path / "models", tmp_path / "reports" / "history.csv"
    folder.mkdir()
    (folder / "model.keras").write_text("old")
    file.parent.mkdir()
    file.write_text("old")

    def contents() -> list[str]:
        return [(folder / "model.keras").read_text(), file.read_text()]

    with pytest.raises(RuntimeError), replace_together(folder, [file]) as (new_folder, (new_file,)):
        (new_folder / "model.keras").write_text("new")
        new_file.write_text("new")
        raise RuntimeError("killed before the end")
    assert contents() == ["old", "old"]
    with replace_together(folder, [file]) as (new_folder, (new_file,)):
        assert new_file.name == "history.csv" and new_file != file
        (new_folder / "model.keras").write_text("new")
        new_file.write_text("new")
        assert contents() == ["old", "old"], "nothing changes before the block ends"
    assert contents() == ["new", "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "reports"]
    assert [p.name for p in file.parent.iterdir()] == ["history.csv"], "no temporary folder is left"
