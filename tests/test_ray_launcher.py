"""Sweeps on Ray: `transferlab-train -m hydra/launcher=ray` (conf/hydra/launcher/ray.yaml and
transferlab.ray_launcher) with the MLflow layout of a local sweep, in the shared tracking server.

A Ray head and one worker node (1 CPU each) run inside the session's loopback-only network
namespace, beside PostgreSQL and `mlflow server` (conftest: `tracking_server`). They are started
from `/`, not from the project, as on a real node. One 4-job sweep runs once; the tests read it
back from the server. The same command again (on Ray, then with the local launcher) must skip
every job. Only the driver is given MLFLOW_TRACKING_URI: the jobs get it through the launcher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO_ROOT, chatter, prepare_project, quick_job_overrides
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from services import LoopbackNamespace, RayCluster, TrackingService

from transferlab import ray_launcher, tracking
from transferlab.config import Config

EXPERIMENT = "ray-sweep"
TINY = quick_job_overrides(EXPERIMENT)
GRID = ("model.dropout=0.1,0.2", "train.learning_rate=0.01,0.001")
SWEEP_TIMEOUT_S = 900


# --- without a cluster ---------------------------------------------------------------------


def test_driver_settings_reach_jobs_and_configured_ones_win() -> None:
    environ = {"MLFLOW_TRACKING_URI": "http://server:5000", "KERAS_HOME": "/k", "HOME": "/root", "PATH": "/bin"}
    forwarded = ray_launcher.forwarded_environment(environ, {"KERAS_HOME": "/shared/keras", "SEED": 3})
    assert forwarded == {"MLFLOW_TRACKING_URI": "http://server:5000", "KERAS_HOME": "/shared/keras", "SEED": "3"}


def test_init_arguments_join_the_cluster_in_the_project() -> None:
    init = {"address": "10.0.0.1:6379", "object_store_memory": None, "runtime_env": {"env_vars": {}}}
    arguments = ray_launcher.init_arguments(init, {"MLFLOW_TRACKING_URI": "http://s"}, Path("/srv/project"))
    assert "object_store_memory" not in arguments  # Ray refuses it when joining a cluster
    assert arguments["address"] == "10.0.0.1:6379"
    runtime_env = arguments["runtime_env"]
    assert runtime_env["worker_process_setup_hook"] == "transferlab.ray_launcher.enter_project"
    assert runtime_env["env_vars"] == {ray_launcher.PROJECT_ENV: "/srv/project", "MLFLOW_TRACKING_URI": "http://s"}


def test_a_job_that_fits_no_node_is_refused_with_what_each_node_has() -> None:
    nodes = [
        {"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 8.0, "GPU": 1.0}},
        {"Alive": False, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 64.0, "GPU": 8.0}},
    ]
    assert ray_launcher.job_request({"num_cpus": 2, "num_gpus": 0}) == {"CPU": 2.0}
    assert ray_launcher.unfit_reason(ray_launcher.job_request({"num_cpus": 4, "num_gpus": 1}), nodes) is None
    reason = ray_launcher.unfit_reason(ray_launcher.job_request({"num_cpus": 4, "num_gpus": 2}), nodes)
    assert reason == "no node offers what one job asks for (CPU 4, GPU 2): 10.0.0.1 has CPU 8, GPU 1"
    assert ray_launcher.unfit_reason({"CPU": 1.0}, nodes[1:]) == "the cluster has no live node"


def _composed_hydra(*overrides: str) -> OmegaConf:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_ray_launcher_config_fixes_the_plugin_defaults() -> None:
    launcher = _composed_hydra("hydra/launcher=ray").hydra.launcher
    assert launcher._target_ == ray_launcher.PLUGIN_LAUNCHER
    assert "object_store_memory" in launcher.ray.init and launcher.ray.init.object_store_memory is None
    assert OmegaConf.to_container(launcher.ray.remote) == {"num_cpus": 1, "num_gpus": 0}


def test_without_ray_only_a_ray_sweep_fails_and_it_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the extra looks like
    setup = ray_launcher.RaySweepSetup()
    setup.on_multirun_start(_composed_hydra())  # the local launcher: nothing to do
    with pytest.raises(SystemExit) as stopped:  # Hydra would only warn about an exception
        setup.on_multirun_start(_composed_hydra("hydra/launcher=ray"))
    assert stopped.value.code == 2
    assert "make setup EXTRAS=ray" in capsys.readouterr().err


# --- on a cluster --------------------------------------------------------------------------


@dataclass
class Sweep:
    returncode: int
    output: str
    summary: pd.DataFrame | None


@pytest.fixture(scope="module")
def ray_project(synthetic_cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with the synthetic splits and conf/, as `dvc repro split` leaves it."""
    return prepare_project(synthetic_cfg, tmp_path_factory.mktemp("ray_project"), conf=True).root


@pytest.fixture(scope="module")
def ray_cluster(loopback_namespace: LoopbackNamespace) -> RayCluster:
    cluster = RayCluster(loopback_namespace)
    try:
        cluster.start(cwd=Path("/"))
        yield cluster
    finally:
        cluster.close()


def run_sweep(namespace: LoopbackNamespace, project: Path, server: TrackingService, name: str, *args: str) -> Sweep:
    sweep_dir = project / "outputs" / "sweeps" / name
    done = namespace.run(
        ["transferlab-train", "-m", *TINY, f"hydra.sweep.dir={sweep_dir}", *args],
        timeout=SWEEP_TIMEOUT_S,
        cwd=project,
        env={"MLFLOW_TRACKING_URI": server.url, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    summary_file = sweep_dir / "sweep_summary.csv"
    summary = pd.read_csv(summary_file) if summary_file.is_file() else None
    return Sweep(done.returncode, done.stdout + done.stderr, summary)


def on_ray(cluster: RayCluster) -> tuple[str, ...]:
    return ("hydra/launcher=ray", f"hydra.launcher.ray.init.address={cluster.address}")


@pytest.fixture(scope="module")
def ray_sweep(
    loopback_namespace: LoopbackNamespace, ray_project: Path, tracking_server: TrackingService, ray_cluster: RayCluster
) -> Sweep:
    sweep = run_sweep(loopback_namespace, ray_project, tracking_server, "on-ray", *on_ray(ray_cluster), *GRID)
    assert sweep.returncode == 0, sweep.output[-5000:]
    return sweep


@dataclass
class Logged:
    parents: list[Run]
    children: list[Run]
    artifacts: dict[str, set[str]]


def logged_runs(namespace: LoopbackNamespace, server: TrackingService) -> Logged:
    """The sweep experiment's parents and children, and every run's artifact paths, from the server."""
    with namespace.entered():
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id])

        def paths(run_id: str, folder: str | None = None) -> set[str]:
            found = set()
            for item in client.list_artifacts(run_id, folder):
                found |= paths(run_id, item.path) if item.is_dir else {item.path}
            return found

        artifacts = {run.info.run_id: paths(run.info.run_id) for run in runs}
    parents = [run for run in runs if run.data.tags.get(tracking.TAG_SWEEP) == "parent"]
    children = [run for run in runs if run.data.tags.get(tracking.TAG_SWEEP) == "child"]
    return Logged(parents, children, artifacts)


@pytest.mark.slow
def test_ray_nodes_are_on_loopback_only(loopback_namespace: LoopbackNamespace, ray_cluster: RayCluster) -> None:
    assert loopback_namespace.interfaces() == ["lo"]
    nodes = ray_cluster.nodes()
    assert len(nodes) == 2 and all(node["Alive"] for node in nodes)
    assert {node["NodeManagerAddress"] for node in nodes} == {"127.0.0.1"}


@pytest.mark.slow
def test_ray_sweep_is_one_parent_and_four_finished_children_in_the_server(
    ray_sweep: Sweep, ray_project: Path, loopback_namespace: LoopbackNamespace, tracking_server: TrackingService
) -> None:
    logged = logged_runs(loopback_namespace, tracking_server)
    (parent,) = logged.parents
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_LAUNCHER] == "RayLauncher"
    assert len(logged.children) == 4
    assert {run.info.status for run in logged.children} == {"FINISHED"}
    assert {run.data.tags[tracking.TAG_PARENT_RUN] for run in logged.children} == {parent.info.run_id}
    assert parent.data.tags[tracking.TAG_BEST_CHILD] in {run.info.run_id for run in logged.children}
    assert {"sweep_summary.csv", "multirun.yaml"} <= logged.artifacts[parent.info.run_id]
    for run in logged.children:
        assert {"final_val_accuracy", "test_accuracy", "test_macro_f1"} <= set(run.data.metrics)
        artifacts = logged.artifacts[run.info.run_id]
        assert {"config.yaml", "history.csv", "classes.json", "figures/training_curves.png"} <= artifacts
        assert any(path.startswith("evaluation/") for path in artifacts)
    # Proxied: the files are in the server's artifact store, not in the project.
    stored = {path.name for path in (tracking_server.directory / "artifacts").rglob("*") if path.is_file()}
    assert {"history.csv", "sweep_summary.csv"} <= stored
    assert not (ray_project / "mlruns" / "mlflow.db").exists()  # no local store
    assert list(ray_sweep.summary["status"]) == ["FINISHED"] * 4
    assert chatter(ray_sweep.output) == []  # the jobs import TensorFlow as quietly as a local sweep


@pytest.mark.slow
def test_ray_jobs_ran_on_both_nodes(
    ray_sweep: Sweep, loopback_namespace: LoopbackNamespace, tracking_server: TrackingService, ray_cluster: RayCluster
) -> None:
    children = logged_runs(loopback_namespace, tracking_server).children
    placed = {run.data.tags[ray_launcher.TAG_RAY_NODE_ID] for run in children}
    assert placed == {node["NodeID"] for node in ray_cluster.nodes()}
    assert {run.data.tags[ray_launcher.TAG_RAY_NODE_IP] for run in children} == {"127.0.0.1"}


@pytest.mark.slow
def test_rerun_on_ray_and_locally_skips_all_four(
    ray_sweep: Sweep,
    loopback_namespace: LoopbackNamespace,
    ray_project: Path,
    tracking_server: TrackingService,
    ray_cluster: RayCluster,
) -> None:
    finished = {run.info.run_id for run in logged_runs(loopback_namespace, tracking_server).children}
    for name, launcher in (("again-on-ray", on_ray(ray_cluster)), ("again-locally", ())):
        sweep = run_sweep(loopback_namespace, ray_project, tracking_server, name, *launcher, *GRID)
        assert sweep.returncode == 0, sweep.output[-5000:]
        assert list(sweep.summary["status"]) == ["SKIPPED"] * 4, name
        assert set(sweep.summary["run_id"]) == finished, name
    children = logged_runs(loopback_namespace, tracking_server).children
    assert {run.info.run_id for run in children if run.info.status == "FINISHED"} == finished


@pytest.mark.slow
def test_failing_jobs_on_ray_are_failed_children_and_every_job_runs(
    ray_sweep: Sweep,
    loopback_namespace: LoopbackNamespace,
    ray_project: Path,
    tracking_server: TrackingService,
    ray_cluster: RayCluster,
) -> None:
    dropouts = ("model.dropout=1.5,2.0", "train.learning_rate=0.01")  # invalid: fail before training
    sweep = run_sweep(loopback_namespace, ray_project, tracking_server, "failing", *on_ray(ray_cluster), *dropouts)
    assert sweep.returncode == 1, sweep.output[-5000:]  # no job finished
    assert list(sweep.summary["status"]) == ["FAILED", "FAILED"]
    with loopback_namespace.entered():
        client = MlflowClient(tracking_server.url)
        failed = [client.get_run(run_id) for run_id in sweep.summary["run_id"]]
    assert {run.info.status for run in failed} == {"FAILED"}
    errors = {run.data.tags[tracking.TAG_ERROR] for run in failed}
    assert errors == {f"ConfigError: model.dropout must be in [0, 1), got {value}" for value in (1.5, 2.0)}
    assert len({run.data.tags[tracking.TAG_PARENT_RUN] for run in failed}) == 1


@pytest.mark.slow
def test_a_job_no_node_can_hold_fails_before_any_job_starts(
    loopback_namespace: LoopbackNamespace, ray_project: Path, tracking_server: TrackingService, ray_cluster: RayCluster
) -> None:
    started = time.monotonic()
    sweep = run_sweep(
        loopback_namespace,
        ray_project,
        tracking_server,
        "too-big",
        *on_ray(ray_cluster),
        *GRID,
        "hydra.launcher.ray.remote.num_gpus=1",
    )
    assert sweep.returncode != 0
    assert "no node offers what one job asks for (CPU 1, GPU 1): 127.0.0.1 has CPU 1, GPU 0" in sweep.output
    assert sweep.summary is None
    assert time.monotonic() - started < 120
