"""Multi-worker training: `train.strategy=multi_worker` with TF_CONFIG (transferlab.runtime,
transferlab.keras_multi_worker, the chief/peer parts of stages/train.py and trainer.py).

Two `transferlab train` processes on 127.0.0.1 ports, inside the session's loopback-only network
namespace and logging to its tracking server (PostgreSQL + `mlflow server`), train one model:
killed after a few epochs and started again, they resume from the chief's checkpoint and finish
as exactly one MLflow run, logged by the chief alone (which also calibrates the model; the
evaluate stage then logs into the same run). Batches of 11 leave a last validation
batch of one image, which two workers cannot share (`runtime.whole_batches`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT, SYNTHETIC_OVERRIDES, prepare_project
from mlflow.tracking import MlflowClient
from services import LoopbackNamespace, TrackingService

from transferlab import tracking
from transferlab.config import TrainConfig, compose, write_params
from transferlab.errors import ConfigError, TransferlabError
from transferlab.paths import StagePaths
from transferlab.runtime import WorkerRole, worker_role

EPOCHS = 6
KILL_AFTER_EPOCHS = 2
EXPERIMENT = "multi-worker"
PORTS = (23456, 23457)
PAIR_TIMEOUT_S = 600
MULTI_WORKER = TrainConfig(strategy="multi_worker")


def tf_config(cluster: dict[str, list[str]], task: str, index: int) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": task, "index": index}})


# --- roles (no TensorFlow) -----------------------------------------------------------------


def test_worker_zero_is_chief_unless_there_is_a_chief_task(monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_role(TrainConfig()) == WorkerRole()  # not multi_worker: a single chief
    workers = {"worker": ["a:1", "b:1", "c:1"]}
    for index, chief in ((0, True), (2, False)):
        monkeypatch.setenv("TF_CONFIG", tf_config(workers, "worker", index))
        assert worker_role(MULTI_WORKER) == WorkerRole(f"worker:{index}", chief, 3)
    with_chief = {"chief": ["a:1"], "worker": ["b:1"]}
    monkeypatch.setenv("TF_CONFIG", tf_config(with_chief, "worker", 0))
    assert worker_role(MULTI_WORKER) == WorkerRole("worker:0", False, 2)
    monkeypatch.setenv("TF_CONFIG", tf_config(with_chief, "chief", 0))
    assert worker_role(MULTI_WORKER).is_chief


@pytest.mark.parametrize(
    "value",
    [None, "not json", tf_config({"worker": ["a:1"]}, "worker", 1), tf_config({"ps": ["a:1"]}, "ps", 0)],
)
def test_a_missing_or_unusable_tf_config_is_one_line(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(ConfigError, match="TF_CONFIG") as caught:
        worker_role(MULTI_WORKER)
    assert "\n" not in str(caught.value)


def test_the_keras_work_around_refuses_an_untested_keras(monkeypatch: pytest.MonkeyPatch) -> None:
    import keras

    from transferlab import keras_multi_worker

    monkeypatch.setattr(keras, "__version__", "3.99.0")
    with pytest.raises(TransferlabError, match=r"needs Keras 3\.15\.x .* Keras 3\.99\.0 is installed"):
        keras_multi_worker.apply()


# --- two workers ---------------------------------------------------------------------------


@pytest.fixture
def mw_project(tmp_path: Path) -> StagePaths:
    """Synthetic splits (36 train, 12 validation images) and params.yaml for a multi_worker run."""
    cfg = compose(
        [
            *SYNTHETIC_OVERRIDES,
            "data.synthetic.images_per_class=20",
            "model=small_cnn",
            "train.batch_size=11",
            f"train.epochs={EPOCHS}",
            "train.strategy=multi_worker",
            f"mlflow.experiment={EXPERIMENT}",
            "mlflow.system_metrics=false",
            "multi_worker.join_timeout=240",
        ],
        config_dir=REPO_ROOT / "conf",
    )
    return prepare_project(cfg, tmp_path / "project")


def start_pair(namespace: LoopbackNamespace, paths: StagePaths, server: TrackingService, tag: str) -> list:
    cluster = {"worker": [f"127.0.0.1:{port}" for port in PORTS]}
    pair = []
    for index in range(2):
        env = {"TF_CONFIG": tf_config(cluster, "worker", index), "MLFLOW_TRACKING_URI": server.url}
        with (paths.root / f"{tag}-worker{index}.log").open("w") as log:
            pair.append(namespace.popen(["transferlab", "train"], cwd=paths.root, env=env, stdout=log, stderr=log))
    return pair


def wait_pair(pair: list, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for process in pair:
        try:
            codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for other in pair:
                os.killpg(other.pid, signal.SIGKILL)  # a waiting TensorFlow worker ignores SIGTERM
            raise AssertionError(f"the worker pair did not finish within {timeout:.0f} s") from None
    return codes


def kill_after_epochs(pair: list, state_file: Path, epochs: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(process.poll() is None for process in pair):
        if state_file.is_file() and json.loads(state_file.read_text())["epochs_done"] >= epochs:
            break
        time.sleep(0.05)
    for process in pair:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert [process.returncode for process in pair] == [-signal.SIGKILL] * 2, "the pair ended before the kill"
    return json.loads(state_file.read_text())


def peer_scratch_dirs() -> set[str]:
    return {path.name for path in Path(tempfile.gettempdir()).glob("transferlab-peer-*")}


@pytest.mark.slow
def test_killed_worker_pair_resumes_and_finishes_as_one_run_logged_by_the_chief(
    mw_project: StagePaths, loopback_namespace: LoopbackNamespace, tracking_server: TrackingService
) -> None:
    paths = mw_project
    scratch_before = peer_scratch_dirs()
    killed = kill_after_epochs(
        start_pair(loopback_namespace, paths, tracking_server, "first"),
        paths.checkpoints / "state.json",
        KILL_AFTER_EPOCHS,
        PAIR_TIMEOUT_S,
    )
    assert KILL_AFTER_EPOCHS <= killed["epochs_done"] < EPOCHS

    codes = wait_pair(start_pair(loopback_namespace, paths, tracking_server, "again"), PAIR_TIMEOUT_S)
    chief_log = (paths.root / "again-worker0.log").read_text()
    peer_log = (paths.root / "again-worker1.log").read_text()
    assert codes == [0, 0], (chief_log + peer_log)[-5000:]
    assert f"resuming after epoch {killed['epochs_done']}" in chief_log
    assert f"peer resuming after epoch {killed['epochs_done']} from the chief's checkpoint" in peer_log
    assert "the last 1 example(s) of each pass are left out" in chief_log  # the 12th validation image
    # The saved model is whole: the evaluate stage (as `dvc repro` runs it next) logs into the run.
    evaluated = loopback_namespace.run(
        ["transferlab", "evaluate"], timeout=300, cwd=paths.root, env={"MLFLOW_TRACKING_URI": tracking_server.url}
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    with loopback_namespace.entered():
        client = MlflowClient(tracking_server.url)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        (run,) = client.search_runs([experiment.experiment_id])
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy"))
        models = client.search_logged_models([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id == killed["run_id"] == tracking.RunRecord.read(paths.run_file).run_id
    assert run.data.params["train.strategy"] == "multi_worker"
    assert steps == list(range(1, EPOCHS + 1))
    assert {"temperature", "val_ece", "best_epoch", "test_accuracy"} <= set(run.data.metrics)  # calibrated alone
    assert [model.source_run_id for model in models] == [run.info.run_id]
    assert paths.model_file.is_file() and not paths.checkpoints.exists()
    assert peer_scratch_dirs() == scratch_before  # temporary: what the killed peer left went at its restart


@pytest.mark.slow
def test_a_worker_whose_peers_never_start_gives_up_after_the_join_timeout(
    prepared_project: StagePaths, loopback_namespace: LoopbackNamespace
) -> None:
    paths = prepared_project
    cfg = compose(
        [*SYNTHETIC_OVERRIDES, "model=small_cnn", "train.strategy=multi_worker", "multi_worker.join_timeout=3"],
        config_dir=REPO_ROOT / "conf",
    )
    write_params(cfg, paths.root / "params.yaml")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in PORTS]}
    started = time.monotonic()
    done = loopback_namespace.run(
        ["transferlab", "train"], timeout=180, cwd=paths.root, env={"TF_CONFIG": tf_config(cluster, "worker", 0)}
    )
    assert done.returncode == -9  # TensorFlow's wait cannot be interrupted: the watchdog kills the worker
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "ConfigError: multi_worker: not every worker in TF_CONFIG started within 3 s (this is worker:0)"
    )
    assert time.monotonic() - started < 120
    assert not paths.checkpoints.exists()
