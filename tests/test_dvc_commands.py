"""dvc_commands.py: `transferlab repro` (`make run`) is `dvc repro` without the push hint when there is
no remote. `transferlab exps` (`make exps`) is checked on real experiments in test_entrypoints.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import VENV_BIN

from transferlab.dvc_commands import EXPS_COLUMNS, PUSH_HINT
from transferlab.paths import StagePaths
from transferlab.tracking import RunRecord, results_line


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A git + DVC repo with one stage that writes a file."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(repo, "git", "init", "-q")
    _run(repo, "dvc", "init", "-q")
    (repo / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: python -c \"open('out.txt', 'w').write('x')\"\n    outs: [out.txt]\n"
    )
    return repo


@pytest.mark.slow
def test_repro_leaves_out_the_push_hint_only_without_a_remote(dvc_repo: Path, tmp_path: Path) -> None:
    plain = _run(dvc_repo, "dvc", "repro", "-f")
    assert PUSH_HINT in plain.stdout, "what DVC prints after every run that changed something"
    ours = _run(dvc_repo, "transferlab", "repro", "-f")
    assert "Running stage 'make'" in ours.stdout + ours.stderr
    assert PUSH_HINT not in ours.stdout + ours.stderr
    assert (dvc_repo / "out.txt").read_text() == "x"
    _run(dvc_repo, "dvc", "remote", "add", "-d", "store", str(tmp_path / "store"))
    with_remote = _run(dvc_repo, "transferlab", "repro", "-f")
    assert PUSH_HINT in with_remote.stdout


EVALUATE_STAGE = """stages:
  evaluate:
    cmd: mkdir -p reports/evaluation && echo '{}' > reports/evaluation/metrics.json
    deps: [models/run.json]
    outs: [reports/evaluation]
"""


@pytest.mark.slow
def test_repro_says_where_the_results_are_also_when_evaluate_did_not_run(dvc_repo: Path) -> None:
    """Evaluate's last line says where the results are; a `dvc repro` that skips the stage (nothing
    changed) or restores its outputs from the run cache does not run it, so `transferlab repro` says it."""
    record = RunRecord(run_id="0123abcd", tracking_uri="sqlite:///mlruns/mlflow.db", experiment_id="1")
    record.write(StagePaths(dvc_repo).run_file)
    (dvc_repo / "dvc.yaml").write_text(EVALUATE_STAGE)
    line = results_line(StagePaths(dvc_repo.resolve()), record)

    def output(done: subprocess.CompletedProcess[str]) -> str:
        return done.stdout + done.stderr

    ran = output(_run(dvc_repo, "transferlab", "repro"))
    assert "Running stage 'evaluate'" in ran and line not in ran  # the stage says it itself
    unchanged = output(_run(dvc_repo, "transferlab", "repro"))
    assert "Stage 'evaluate' didn't change" in unchanged and unchanged.count(line) == 1
    shutil.rmtree(dvc_repo / "reports" / "evaluation")
    restored = output(_run(dvc_repo, "transferlab", "repro"))
    assert "Stage 'evaluate' is cached" in restored and restored.count(line) == 1
    assert (dvc_repo / "reports" / "evaluation" / "metrics.json").read_text() == "{}\n"


STOPPING_STAGE = """stages:
  check:
    cmd: >-
      python -c "import sys; print('DataError: no images', file=sys.stderr); sys.exit({status})"
"""


@pytest.mark.slow
def test_repro_exits_2_with_the_stages_one_line_when_a_stage_stops_on_bad_input(dvc_repo: Path) -> None:
    """New-user report: a stage's `DownloadError` line, then DVC's "ERROR: failed to reproduce ..."
    and status 255. A stage that exits 2 (bad input) has said what is wrong: that line alone, status 2.
    Any other failure keeps DVC's line and status; plain `dvc repro` is unchanged."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=dvc_repo, env=env, capture_output=True, text=True, timeout=300)

    (dvc_repo / "dvc.yaml").write_text(STOPPING_STAGE.format(status=2))
    ours = run("transferlab", "repro")
    assert ours.returncode == 2, ours.stdout + ours.stderr
    assert ours.stderr.splitlines() == ["DataError: no images"]
    plain = run("dvc", "repro")
    assert plain.returncode == 255 and "ERROR: failed to reproduce 'check'" in plain.stderr

    (dvc_repo / "dvc.yaml").write_text(STOPPING_STAGE.format(status=3))
    crashed = run("transferlab", "repro")
    assert crashed.returncode == 255
    assert "ERROR: failed to reproduce 'check': failed to run: " in crashed.stderr


def test_exps_view_keeps_the_three_test_metrics_over_the_dropped_ones() -> None:
    import re

    drop = re.compile(EXPS_COLUMNS[EXPS_COLUMNS.index("--drop") + 1])
    keep = re.compile(EXPS_COLUMNS[EXPS_COLUMNS.index("--keep") + 1])
    for column in ("test_top2_accuracy", "test_log_loss", "final_val_accuracy", "data/raw", "src/transferlab/x.py"):
        assert drop.match(column) and not keep.match(column), column
    for column in ("test_accuracy", "test_macro_f1", "test_ece", "mlflow_run_id"):
        assert keep.match(column), column
    for param in ("model.dropout", "data.name", "train.learning_rate"):
        assert not drop.match(param), param
