"""The team tracking server (transferlab.tracking_server) and how runs behave against a server
(transferlab.tracking: the reachability check and bounded HTTP retries).

The session's server (conftest: `tracking_server`) is `python -m transferlab.tracking_server start`
run inside a loopback-only network namespace: PostgreSQL from the system packages in a temporary
folder, `mlflow server --serve-artifacts` in front of it. Nothing else listens there, so a port
without a server is really closed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from helpers import SYNTHETIC_OVERRIDES, quick_job_overrides, tiny_cfg
from mlflow.tracking import MlflowClient
from services import LoopbackNamespace, TrackingService

from transferlab import tracking
from transferlab.config import write_params
from transferlab.errors import TransferlabError
from transferlab.paths import StagePaths
from transferlab.tracking_server import DATABASE, Postgres, postgres_bin

CLOSED_PORT_URI = "http://127.0.0.1:5999"  # inside the namespace: nothing listens there


def test_http_retries_are_bounded_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in tracking.HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    tracking.check_reachable("sqlite:///unused.db")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"  # the user's own setting wins


def test_missing_postgresql_programs_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("transferlab.tracking_server.POSTGRES_LIB", tmp_path / "no-postgresql")
    with pytest.raises(TransferlabError, match="apt-get install postgresql"):
        postgres_bin()


@pytest.mark.slow
def test_server_keeps_runs_in_postgresql_and_artifacts_behind_its_url(
    loopback_namespace: LoopbackNamespace, tracking_server: TrackingService, tmp_path
) -> None:
    note = tmp_path / "note.txt"
    note.write_text("proxied")
    with loopback_namespace.entered():
        client = MlflowClient(tracking_server.url)
        experiment = client.create_experiment("server-check")
        run_id = client.create_run(experiment).info.run_id
        client.log_artifact(run_id, str(note))
        assert client.get_experiment(experiment).artifact_location.startswith("mlflow-artifacts:")
    postgres = Postgres(tracking_server.directory / "postgres")
    psql = [str(postgres_bin() / "psql"), "-h", str(postgres.socket_dir), "-p", str(postgres.port), "-U", "postgres"]
    rows = subprocess.run(
        [*psql, "-d", DATABASE, "-tAc", f"SELECT experiment_id FROM runs WHERE run_uuid = '{run_id}'"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert rows == [experiment]
    stored = list((tracking_server.directory / "artifacts").rglob("note.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "proxied"


@pytest.mark.slow
def test_unreachable_server_stops_training_before_it_starts(
    prepared_project: StagePaths, loopback_namespace: LoopbackNamespace
) -> None:
    paths = prepared_project
    write_params(tiny_cfg(), paths.root / "params.yaml")
    started = time.monotonic()
    done = loopback_namespace.run(
        ["transferlab", "train"], timeout=120, cwd=paths.root, env={"MLFLOW_TRACKING_URI": CLOSED_PORT_URI}
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"TransferlabError: MLflow tracking server {CLOSED_PORT_URI} is unreachable (")
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 60
    assert not paths.checkpoints.exists() and not paths.models.exists()


@pytest.mark.slow
def test_unreachable_server_stops_a_sweep_before_any_job(
    prepared_project: StagePaths, loopback_namespace: LoopbackNamespace
) -> None:
    sweep_dir = prepared_project.root / "outputs" / "sweeps" / "unreachable"
    done = loopback_namespace.run(
        ["transferlab-train", "-m", *SYNTHETIC_OVERRIDES, "model.dropout=0.1,0.2", f"hydra.sweep.dir={sweep_dir}"],
        timeout=120,
        cwd=prepared_project.root,
        env={"MLFLOW_TRACKING_URI": CLOSED_PORT_URI},
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"TransferlabError: MLflow tracking server {CLOSED_PORT_URI} is unreachable (")
    assert not any(path.is_dir() for path in sweep_dir.glob("*"))  # no job started


@pytest.mark.slow
def test_a_local_sweep_logs_its_parent_and_children_in_the_server(
    prepared_project: StagePaths, loopback_namespace: LoopbackNamespace, tracking_server: TrackingService
) -> None:
    """The local launcher, like the Ray one (test_ray_launcher.py), logs only to the server."""
    experiment = "local-sweep"
    sweep_dir = prepared_project.root / "outputs" / "sweeps" / "local"
    done = loopback_namespace.run(
        [
            "transferlab-train",
            "-m",
            *quick_job_overrides(experiment),
            "model.dropout=0.1,0.2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        timeout=600,
        cwd=prepared_project.root,
        env={"MLFLOW_TRACKING_URI": tracking_server.url},
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with loopback_namespace.entered():
        client = MlflowClient(tracking_server.url)
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        (parent,) = [run for run in runs if run.data.tags.get(tracking.TAG_SWEEP) == "parent"]
        parent_files = {item.path for item in client.list_artifacts(parent.info.run_id)}
    children = [run for run in runs if run.data.tags.get(tracking.TAG_SWEEP) == "child"]
    assert parent.info.status == "FINISHED" and parent.data.tags[tracking.TAG_LAUNCHER] == "BasicLauncher"
    assert [run.info.status for run in children] == ["FINISHED"] * 2
    assert {run.data.tags[tracking.TAG_PARENT_RUN] for run in children} == {parent.info.run_id}
    assert parent.data.tags[tracking.TAG_BEST_CHILD] in {run.info.run_id for run in children}
    assert "sweep_summary.csv" in parent_files
    assert not (prepared_project.root / "mlruns").exists()  # nothing in a local store


@pytest.mark.slow
def test_losing_the_server_mid_run_fails_in_bounded_time_and_keeps_the_checkpoint(
    prepared_project: StagePaths, loopback_namespace: LoopbackNamespace, tracking_server: TrackingService
) -> None:
    """Re-running the same command then resumes and logs the rest (README); the resume itself is
    test_train.py's test_killed_run_resumes_in_the_same_mlflow_run."""
    paths = prepared_project
    epochs = 60  # still training while the server stops (a few seconds)
    cfg = tiny_cfg(
        f"train.epochs={epochs}", "train.feature_cache=false", "mlflow.log_model=false", "mlflow.experiment=lost-server"
    )
    write_params(cfg, paths.root / "params.yaml")
    state_file = paths.checkpoints / "state.json"
    log_file = paths.root / "train.log"
    with log_file.open("w") as log:
        training = loopback_namespace.popen(
            ["transferlab", "train"],
            cwd=paths.root,
            env={"MLFLOW_TRACKING_URI": tracking_server.url},
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 300
        while not (state_file.is_file() and json.loads(state_file.read_text())["epochs_done"] >= 1):
            assert training.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
            time.sleep(0.05)
        tracking_server.stop()
        stopped = time.monotonic()
        training.wait(timeout=300)
        failed_after = time.monotonic() - stopped
    finally:
        if training.poll() is None:
            os.killpg(training.pid, signal.SIGKILL)
        tracking_server.start()  # back, for the rest of the session
    output = log_file.read_text()
    assert training.returncode == 2, output[-3000:]
    assert failed_after < 90, f"took {failed_after:.0f} s to give up on the lost server"
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"TransferlabError: lost the MLflow tracking server {tracking_server.url} during the run")
    kept = json.loads(state_file.read_text())
    assert 1 <= kept["epochs_done"] < epochs
    assert (paths.checkpoints / kept["model_file"]).is_file()
