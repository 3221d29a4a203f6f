"""Sweeps on Ray: `transferlab-train -m hydra/launcher=ray` (conf/hydra/launcher/ray.yaml and
transferlab.ray_launcher) with the MLflow layout of a local sweep, in the shared tracking server.

A Ray head and one worker node (1 CPU each) run inside the session's loopback-only network
namespace, beside PostgreSQL and `mlflow server` (conftest: `tracking_server`). They are started
from `/`, not from the project, as on a real node. One 4-job sweep runs once; the tests read it
back from the server. The same command again (on Ray, then with the local launcher) must skip
every job. Only the driver is given MLFLOW_TRACKING_URI: the jobs get it through the launcher.

Stop signals (issue 12): SIGTERM and Ctrl-C to the sweep's driver, and SIGTERM to the Ray worker
running a job, each while a job trains; the moments come from the jobs' checkpoints and log lines.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from helpers import (
    REPO_ROOT,
    SYNTHETIC_OVERRIDES,
    TINY_MODEL,
    Process,
    chatter,
    checkpointed_run,
    epochs_done,
    job_outputs,
    prepare_project,
    quick_job_overrides,
    running_runs,
)
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from services import LoopbackNamespace, RayCluster, TrackingService

from transferlab import ray_launcher, tracking
from transferlab.config import Config
from transferlab.paths import StagePaths

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


# --- stop signals: the sweep's driver, and a job's Ray worker (issue 12) -------------------

STOPS_EXPERIMENT = "ray-stops"
LONG_JOBS = (
    *SYNTHETIC_OVERRIDES,
    *TINY_MODEL,
    "train.early_stopping=null",  # every epoch runs: a job trains for seconds, long enough to stop it in
    "mlflow.log_model=false",
    "mlflow.system_metrics=false",
    f"mlflow.experiment={STOPS_EXPERIMENT}",
)
# The driver closes the runs of the jobs Ray ended when it left; a job whose worker got Ray's
# SIGTERM before that closes its own.
STOPPED_CHILD_REASONS = {"stopped with its sweep (KILLED)", "Interrupted: SIGTERM received"}


@dataclass
class StoppableSweep:
    """One `transferlab-train -m hydra/launcher=ray` command of the stop tests, run as often as a test needs."""

    namespace: LoopbackNamespace
    project: Path
    server: TrackingService
    cluster: RayCluster
    name: str
    grid: tuple[str, ...]

    @property
    def folder(self) -> Path:
        return self.project / "outputs" / "sweeps" / self.name

    def job(self, number: int) -> StagePaths:
        return StagePaths(self.project, self.folder / str(number))

    def start(self) -> Process:
        command = ["transferlab-train", "-m", *LONG_JOBS, f"hydra.sweep.dir={self.folder}"]
        # RAY_DEDUP_LOGS=0: Ray would print one of the lines of two jobs that differ only in numbers.
        env = {"MLFLOW_TRACKING_URI": self.server.url, "TF_CPP_MIN_LOG_LEVEL": "2", "RAY_DEDUP_LOGS": "0"}
        return self.namespace.process([*command, *on_ray(self.cluster), *self.grid], self.project, env)

    def summary(self) -> pd.DataFrame:
        return pd.read_csv(self.folder / "sweep_summary.csv")


def assert_stopped(process: Process, signum: int, stopped: list[str], client: MlflowClient, finished: int) -> None:
    """`signum` to the driver: it exits 128 + signum with one line, the parent ends KILLED after the
    `finished` jobs, the children that were running KILLED with a reason and nothing logged to them
    after that, no run left RUNNING, each job's folder empty or holding one run's whole results."""
    name = signal.Signals(signum).name
    assert process.stop(signum) == 128 + signum, process.output[-3000:]
    assert f"interrupted ({name} received)" in [line.strip() for line in process.lines], process.output[-3000:]
    assert "Traceback" not in process.output, process.output[-3000:]
    for run in (client.get_run(run_id) for run_id in stopped):
        assert run.info.status == "KILLED", f"{run.info.run_name} is {run.info.status} after {name}"
        if run.data.tags[tracking.TAG_SWEEP] == "parent":
            assert run.data.tags[tracking.TAG_ERROR] == f"sweep stopped early (KILLED) after {finished} jobs"
            continue
        assert run.data.tags[tracking.TAG_ERROR] in STOPPED_CHILD_REASONS, run.data.tags[tracking.TAG_ERROR]
        logged = [metric.timestamp for metric in client.get_metric_history(run.info.run_id, "val_loss")]
        assert max(logged, default=0) <= run.info.end_time, f"{run.info.run_name} trained on after it was closed"
    assert not running_runs(client, STOPS_EXPERIMENT), f"runs left RUNNING after {name}"


@pytest.mark.slow
def test_sigterm_and_ctrl_c_to_a_ray_sweep_driver_kill_its_runs_and_the_rerun_finishes(
    loopback_namespace: LoopbackNamespace, ray_project: Path, tracking_server: TrackingService, ray_cluster: RayCluster
) -> None:
    """SIGTERM to the driver while job 0 trains; then Ctrl-C to the same command, which resumed
    both jobs, once job 0 has finished and job 1 trains again. Each time as promised for a local
    sweep (`assert_stopped`); the summary holds the finished job. The same command then skips job 0,
    resumes job 1 from its checkpoint in its run and finishes. Before: ray.init's own SIGTERM
    handler ended the driver at once (exit 1 or SIGABRT, the parent FAILED, Ray's C++ core printing
    the signal), and after Ctrl-C the jobs trained on in runs the parent had already closed."""
    sweep = StoppableSweep(
        loopback_namespace, ray_project, tracking_server, ray_cluster, "stopped-driver", ("train.epochs=40,220",)
    )
    jobs = [sweep.job(0), sweep.job(1)]
    with loopback_namespace.entered():
        client = MlflowClient(tracking_server.url)
        process = sweep.start()
        process.wait_for(lambda: epochs_done(jobs[0].checkpoints / "state.json") >= 1)  # job 0 mid-training
        stopped = [run.info.run_id for run in running_runs(client, STOPS_EXPERIMENT)]
        assert_stopped(process, signal.SIGTERM, stopped, client, finished=0)
        assert [job_outputs(job, client) for job in jobs] == [None, None]
        trained = epochs_done(jobs[1].checkpoints / "state.json")

        def job_0_finished_and_job_1_trains_on() -> bool:
            done = (sweep.folder / "0" / "job_result.json").exists()
            return done and epochs_done(jobs[1].checkpoints / "state.json") > trained

        process = sweep.start()
        process.wait_for(job_0_finished_and_job_1_trains_on)
        stopped = [run.info.run_id for run in running_runs(client, STOPS_EXPERIMENT)]
        assert_stopped(process, signal.SIGINT, stopped, client, finished=1)
        assert list(sweep.summary()["status"]) == ["FINISHED"]
        assert job_outputs(jobs[0], client) == sweep.summary()["run_id"][0] and job_outputs(jobs[1], client) is None
        stopped_job = checkpointed_run(jobs[1].checkpoints / "state.json")
        assert stopped_job in stopped

        process = sweep.start()
        assert process.finish() == 0, process.output[-3000:]
        assert "skipping train.epochs=40" in process.output and "resuming after epoch" in process.output
        summary = sweep.summary()
        assert list(summary["status"]) == ["SKIPPED", "FINISHED"]
        assert summary["run_id"][1] == stopped_job, "job 1 resumed in the run its stop left KILLED"
        parent = client.get_run(client.get_run(stopped_job).data.tags[tracking.TAG_PARENT_RUN])
        assert parent.info.status == "FINISHED" and tracking.TAG_ERROR not in parent.data.tags
        for job, run_id in zip(jobs, summary["run_id"], strict=True):
            run = client.get_run(run_id)
            assert run.info.status == "FINISHED" and tracking.TAG_ERROR not in run.data.tags
            assert job_outputs(job, client) == run_id
        assert not running_runs(client, STOPS_EXPERIMENT)


def running(pid: int) -> bool:
    """The process `pid` exists and has not ended (a zombie not yet reaped has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def worker_pid(process: Process, job_line: str) -> int:
    """The pid of the Ray worker that printed the line matching `job_line` (Ray prefixes the lines
    it forwards from a worker with `(<task> pid=<pid>)`)."""
    pattern = rf"\(_run_job pid=(\d+)\).*{job_line}"
    process.wait_for(pattern)
    return int(next(found for line in process.lines if (found := re.search(pattern, line))).group(1))


@pytest.mark.slow
def test_sigterm_to_the_ray_worker_of_a_job_kills_its_run_and_ray_retries_it_from_its_checkpoint(
    loopback_namespace: LoopbackNamespace, ray_project: Path, tracking_server: TrackingService, ray_cluster: RayCluster
) -> None:
    """SIGTERM, what Ray and schedulers send a worker, to the Ray worker running job 0 while it
    trains: the job's run ends KILLED with the reason, and the worker exits as Ray's own SIGTERM
    handler would have it. Ray retries the job in a new worker, which resumes from the job's
    checkpoint in the same run; the sweep finishes. Before: the stop reached Ray as a cancelled
    task, and the launcher ended the whole sweep with a traceback (exit 1, the parent FAILED, the
    other job's run FAILED)."""
    grid = ("train.learning_rate=0.01,0.001", "train.epochs=100")
    sweep = StoppableSweep(loopback_namespace, ray_project, tracking_server, ray_cluster, "stopped-worker", grid)
    job = sweep.job(0)
    with loopback_namespace.entered():
        client = MlflowClient(tracking_server.url)
        process = sweep.start()
        pid = worker_pid(process, r"at learning rate 0\.01$")
        process.wait_for(lambda: epochs_done(job.checkpoints / "state.json") >= 1)
        os.kill(pid, signal.SIGTERM)
        process.wait_for(r"job train\.learning_rate=0\.01 stopped \(SIGTERM received\)")
        # read now: a new worker takes seconds to reopen the run
        stopped = client.get_run(checkpointed_run(job.checkpoints / "state.json"))
        assert stopped.info.status == "KILLED"
        assert stopped.data.tags[tracking.TAG_ERROR] == "Interrupted: SIGTERM received"

        assert process.finish() == 0, process.output[-3000:]
        assert "Traceback" not in process.output, process.output[-3000:]
        assert not running(pid), "the stopped worker exited"
        assert worker_pid(process, r"resuming after epoch \d+") != pid
        summary = sweep.summary()
        assert list(summary["status"]) == ["FINISHED", "FINISHED"]
        assert summary["run_id"][0] == stopped.info.run_id, "resumed in the run the stop left KILLED"
        for number, run_id in enumerate(summary["run_id"]):
            run = client.get_run(run_id)
            assert run.info.status == "FINISHED" and tracking.TAG_ERROR not in run.data.tags
            assert job_outputs(sweep.job(number), client) == run_id
        assert not running_runs(client, STOPS_EXPERIMENT)
