"""DVC remotes: the pipeline's outputs travel through `dvc push` / `dvc pull`, byte for byte.

In a scratch copy of the repo, `dvc exp run` runs the whole pipeline on synthetic data with
MLFLOW_TRACKING_URI pointing at the session's tracking server (so DVC stages and DVC experiments
log there), inside the loopback-only namespace where that server lives. The results are
committed and pushed to a local-path remote; a fresh `git clone` pulls them back.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from helpers import VENV_BIN, quick_job_overrides
from mlflow.tracking import MlflowClient
from services import LoopbackNamespace, TrackingService

from transferlab.paths import StagePaths

EXPERIMENT = "dvc-remote"
TINY = quick_job_overrides(EXPERIMENT)
GIT = ("git", "-c", "user.name=transferlab", "-c", "user.email=transferlab@localhost.invalid")


def digests(root: Path, *folders: str) -> dict[str, str]:
    """sha256 of every file under `folders`, by path relative to `root`."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted((root / folder).rglob("*"))
        if path.is_file()
    }


def run(args: list[str], cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


@pytest.mark.slow
def test_push_then_pull_into_a_fresh_clone_restores_the_outputs(
    project_copy: Path, tmp_path: Path, loopback_namespace: LoopbackNamespace, tracking_server: TrackingService
) -> None:
    repo, dvc = project_copy, str(VENV_BIN / "dvc")
    overrides = [arg for item in TINY for arg in ("-S", item)]
    done = loopback_namespace.run(
        [dvc, "exp", "run", *overrides],
        timeout=900,
        cwd=repo,
        env={"MLFLOW_TRACKING_URI": tracking_server.url, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    with loopback_namespace.entered():
        client = MlflowClient(tracking_server.url)
        (logged,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert logged.info.status == "FINISHED"
    assert {"final_val_accuracy", "test_accuracy"} <= set(logged.data.metrics)  # train and evaluate stages
    assert not (repo / "mlruns" / "mlflow.db").exists()  # no local store

    remote = tmp_path / "remote"
    run([dvc, "remote", "add", "--default", "storage", str(remote)], repo)
    run([*GIT, "add", "dvc.lock", "params.yaml", ".dvc/config"], repo)
    run([*GIT, "commit", "-q", "-m", "results"], repo)
    run([dvc, "push"], repo)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "models").exists()
    run([dvc, "pull"], clone)

    outputs = ("models", "reports")
    assert digests(clone, *outputs) == digests(repo, *outputs)
    assert StagePaths(clone).model_file.is_file() and StagePaths(clone).metrics.is_file()
    assert digests(clone, "data/raw", "data/splits") == digests(repo, "data/raw", "data/splits")
    status = run([dvc, "status"], clone)
    assert status.split() == ["source:", "always", "changed"], status  # the stage that runs on every repro
