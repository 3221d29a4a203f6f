"""dvc.yaml agrees with the code: each stage's command, declared outputs and source dependencies.

A stage's source dependencies must be exactly the modules its code imports, directly or
through other modules (including imports inside functions): then editing any module that can
change a stage's result reruns it under `dvc repro`, and no stale path lingers. That every
file a real pipeline run writes is declared is checked on the end-to-end run in test_evaluate.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from helpers import REPO_ROOT, declared_outputs

from transferlab.paths import StagePaths

SRC = REPO_ROOT / "src"
STAGES = ("source", "download", "split", "train", "evaluate")


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(file: Path) -> set[str]:
    """`transferlab.*` modules a file imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("transferlab"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("transferlab"):
            assert node.module is not None
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}"))
    return found


def import_closure(module: str) -> set[str]:
    """Repo-relative paths of `module` and every transferlab module it imports, transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        file = _module_file(name)
        if file is not None:
            todo.extend(_imported_modules(file))
    files = {_module_file(name) for name in seen} - {None, SRC / "transferlab" / "__init__.py"}
    return {file.relative_to(REPO_ROOT).as_posix() for file in files if file is not None}


@pytest.fixture(scope="module")
def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def test_the_four_stages_run_their_commands(stages: dict[str, dict]) -> None:
    assert list(stages) == list(STAGES)
    for name, spec in stages.items():
        assert spec["cmd"] == f"transferlab {name}"


@pytest.mark.parametrize("stage", STAGES)
def test_source_deps_are_the_stage_modules_import_closure(stages: dict[str, dict], stage: str) -> None:
    declared = {dep for dep in stages[stage].get("deps", []) if dep.startswith("src/")}
    needed = import_closure(f"transferlab.stages.{stage}")
    assert not needed - declared, f"{stage} misses deps: {sorted(needed - declared)}"
    assert not declared - needed, f"{stage} declares modules it does not use: {sorted(declared - needed)}"


def test_outputs_are_the_ones_stage_paths_defines() -> None:
    declared = declared_outputs(REPO_ROOT)
    expected = StagePaths(REPO_ROOT).stage_outputs()
    assert {stage: sorted(paths) for stage, paths in declared.items()} == {
        stage: sorted(paths) for stage, paths in expected.items()
    }


def test_data_deps_are_outputs_of_earlier_stages(stages: dict[str, dict]) -> None:
    """A stage reads only what an earlier stage declares, so DVC orders and reruns them right."""
    earlier: list[Path] = []
    outputs = StagePaths(REPO_ROOT).stage_outputs()
    for stage in STAGES:
        for dep in stages[stage].get("deps", []):
            if dep.startswith("src/"):
                continue
            path = REPO_ROOT / dep
            assert any(path == out or out in path.parents for out in earlier), f"{stage}: {dep} comes from no stage"
        earlier.extend(outputs[stage])
