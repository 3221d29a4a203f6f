"""Sweeps: Hydra multirun (grid and Optuna) as one MLflow parent with a child per job, and
`dvc exp run` with DVC's Hydra composition; both land in the project's MLflow store.

The grid sweep runs once per module (a subprocess of the real `transferlab-train -m`, ten jobs
of a tiny model on synthetic data, two of them with an invalid value) and several tests read
its results back from MLflow; a second run of the same command checks `sweep.skip_finished`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT, SYNTHETIC_OVERRIDES, VENV_BIN
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from transferlab import tracking
from transferlab.config import Config, MlflowConfig
from transferlab.paths import StagePaths
from transferlab.sweep import job_name_and_tags, sweep_keys

TINY = (
    *SYNTHETIC_OVERRIDES,
    "model=mobilenet_v2",
    "model.alpha=0.35",
    "model.weights=null",
    "train.batch_size=8",
    "train.epochs=1",
    "mlflow.log_model=false",
    "mlflow.system_metrics=false",
)
# 5 x 2 = 10 jobs; model.dropout=1.5 is invalid, so 2 jobs fail and 8 train.
GRID = ("model.dropout=0.0,0.2,0.4,0.6,1.5", "train.learning_rate=0.01,0.001")
DROPOUT_ERROR = "ConfigError: model.dropout must be in [0, 1), got 1.5"
# RSS may rise this much from the third job (warm caches, first traces) to the last.
RSS_GROWTH_LIMIT_MB = 150


def run_train_cli(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`transferlab-train ARGS` in the project `root` (Hydra reads ./conf, jobs read ./data)."""
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
    }
    done = subprocess.run(
        [str(VENV_BIN / "transferlab-train"), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def client_for(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking.tracking_uri(MlflowConfig(), root))


def experiment_id(client: MlflowClient) -> str:
    return client.get_experiment_by_name(MlflowConfig().experiment).experiment_id


def parent_runs(client: MlflowClient) -> list[Run]:
    """Sweep parents, oldest first."""
    return client.search_runs(
        [experiment_id(client)],
        filter_string=f"tags.`{tracking.TAG_SWEEP}` = 'parent'",
        order_by=["attributes.start_time ASC"],
    )


def children_of(client: MlflowClient, parent: Run) -> list[Run]:
    return client.search_runs(
        [experiment_id(client)], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )


def summary_from_mlflow(client: MlflowClient, parent: Run, tmp: Path) -> pd.DataFrame:
    local = client.download_artifacts(parent.info.run_id, "sweep_summary.csv", str(tmp))
    return pd.read_csv(local)


@dataclass
class Sweep:
    root: Path
    client: MlflowClient
    parent: Run
    children: list[Run]
    summary: pd.DataFrame
    seconds: float


def _prepare(cfg: Config, root: Path) -> StagePaths:
    """What the `prepared_project` fixture makes, once for this module; plus conf/ for Hydra."""
    from transferlab.stages.download import download
    from transferlab.stages.split import split

    paths = StagePaths(root)
    raw = paths.raw_dataset(cfg.data.name)
    download(cfg.data, raw)
    split(cfg.data, raw, paths.splits)
    shutil.copytree(REPO_ROOT / "conf", root / "conf")
    return paths


def _sweep(root: Path, sweep_dir: str, tmp: Path) -> Sweep:
    started = time.monotonic()
    run_train_cli(root, "-m", *TINY, *GRID, f"hydra.sweep.dir={sweep_dir}")
    seconds = time.monotonic() - started
    client = client_for(root)
    parent = parent_runs(client)[-1]
    return Sweep(root, client, parent, children_of(client, parent), summary_from_mlflow(client, parent, tmp), seconds)


@pytest.fixture(scope="module")
def grid_sweep(synthetic_cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    root = tmp_path_factory.mktemp("sweep_project")
    _prepare(synthetic_cfg, root)
    return _sweep(root, "outputs/sweeps/first", tmp_path_factory.mktemp("first_summary"))


@pytest.fixture(scope="module")
def grid_rerun(grid_sweep: Sweep, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    return _sweep(grid_sweep.root, "outputs/sweeps/again", tmp_path_factory.mktemp("again_summary"))


# --- naming and keys (no training) ---------------------------------------------------------


def test_sweep_keys_are_the_overrides_that_vary() -> None:
    task = ["data=synthetic", "model.dropout=0.2,0.5", "augment=none,light", "train.epochs=1"]
    assert sweep_keys(task, None) == ["model.dropout", "augment"]
    optuna_space = {"train.learning_rate": "tag(log, interval(0.0001, 0.1))", "finetune": "choice(frozen, top20)"}
    assert sweep_keys(["finetune=frozen"], optuna_space) == ["train.learning_rate"]
    assert sweep_keys(["model.dropout=choice(0.1,0.3)"], optuna_space) == [
        "train.learning_rate",
        "finetune",
        "model.dropout",
    ]


def test_child_is_named_by_the_varying_overrides_and_tagged_with_all() -> None:
    job = ["data=synthetic", "train.learning_rate=0.0012345678", "augment=light"]
    name, tags = job_name_and_tags(job, ["train.learning_rate", "augment"])
    assert name == "train.learning_rate=0.001235 augment=light"
    assert tags == {
        f"{tracking.TAG_OVERRIDE_PREFIX}data": "synthetic",
        f"{tracking.TAG_OVERRIDE_PREFIX}train.learning_rate": "0.0012345678",
        f"{tracking.TAG_OVERRIDE_PREFIX}augment": "light",
    }
    assert job_name_and_tags(job[:1], [])[0] == "data=synthetic"
    assert job_name_and_tags([], [])[0] == "defaults"


# --- the grid sweep ------------------------------------------------------------------------


@pytest.mark.slow
def test_grid_sweep_is_one_parent_with_a_child_per_job(grid_sweep: Sweep) -> None:
    parent, children = grid_sweep.parent, grid_sweep.children
    assert len(parent_runs(grid_sweep.client)) == 1
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "sweep-first"
    assert parent.data.tags[tracking.TAG_SWEEP_KEYS] == "model.dropout train.learning_rate"
    assert len(children) == 10
    names = sorted(run.info.run_name for run in children)
    expected = sorted(
        f"model.dropout={d} train.learning_rate={lr}" for d in (0, 0.2, 0.4, 0.6, 1.5) for lr in (0.01, 0.001)
    )
    assert names == expected
    for run in children:
        tags = run.data.tags
        assert tags[tracking.TAG_SWEEP] == "child"
        assert f"model.dropout={tags[tracking.TAG_OVERRIDE_PREFIX + 'model.dropout']}" in tags[tracking.TAG_OVERRIDES]
        assert tags[tracking.TAG_OVERRIDE_PREFIX + "data"] == "synthetic"
    finished = [run for run in children if run.info.status == "FINISHED"]
    assert len(finished) == 8
    for run in finished:  # comparable side by side: same params and metrics in every child
        assert run.data.params["model.dropout"] == run.data.tags[tracking.TAG_OVERRIDE_PREFIX + "model.dropout"]
        assert {"final_val_accuracy", "test_accuracy", "test_macro_f1"} <= set(run.data.metrics)


@pytest.mark.slow
def test_parent_holds_the_summary_table_and_names_the_best_child(grid_sweep: Sweep) -> None:
    client, parent, summary = grid_sweep.client, grid_sweep.parent, grid_sweep.summary
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.csv", "sweep_summary.json"} <= artifacts
    assert list(summary.columns[:3]) == ["job", "model.dropout", "train.learning_rate"]
    assert {"overrides", "status", "run_id", "val_accuracy", "test_accuracy", "duration_s", "error"} <= set(summary)
    assert summary["job"].tolist() == list(range(10))
    assert set(summary["run_id"]) == {run.info.run_id for run in grid_sweep.children}
    finished = summary[summary["status"] == "FINISHED"]
    assert finished[["val_accuracy", "test_accuracy", "duration_s"]].notna().all().all()

    best = tracking.best_row(summary)
    assert best is not None and best["val_accuracy"] == finished["val_accuracy"].max()
    assert parent.data.tags[tracking.TAG_BEST_CHILD] == best["run_id"]
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best["val_accuracy"])
    assert parent.data.metrics["jobs_finished"] == 8
    assert parent.data.metrics["jobs_failed"] == 2


@pytest.mark.slow
def test_failing_jobs_are_failed_children_and_the_sweep_goes_on(grid_sweep: Sweep) -> None:
    failed = [run for run in grid_sweep.children if run.info.status == "FAILED"]
    assert sorted(run.data.tags[tracking.TAG_OVERRIDE_PREFIX + "model.dropout"] for run in failed) == ["1.5", "1.5"]
    for run in failed:
        assert run.data.tags[tracking.TAG_ERROR] == DROPOUT_ERROR
        text = grid_sweep.client.download_artifacts(run.info.run_id, "error.txt")
        assert "Traceback" in Path(text).read_text()
    rows = grid_sweep.summary[grid_sweep.summary["status"] == "FAILED"]
    assert rows["error"].tolist() == [DROPOUT_ERROR, DROPOUT_ERROR]
    assert rows["job"].tolist() == [8, 9], "the failures come last; the jobs before them all finished"


@pytest.mark.slow
def test_memory_does_not_grow_from_job_to_job(grid_sweep: Sweep) -> None:
    trained = grid_sweep.summary[grid_sweep.summary["status"] == "FINISHED"]
    rss = trained["rss_mb"].tolist()
    assert len(rss) == 8 and all(value > 0 for value in rss)
    growth = max(rss[2:]) - rss[2]
    assert growth < RSS_GROWTH_LIMIT_MB, f"RSS per job (MB): {rss}"


@pytest.mark.slow
def test_rerun_skips_configs_that_already_finished(grid_sweep: Sweep, grid_rerun: Sweep) -> None:
    assert [run.info.run_id for run in parent_runs(grid_rerun.client)] == [
        grid_sweep.parent.info.run_id,
        grid_rerun.parent.info.run_id,
    ]
    summary = grid_rerun.summary
    assert summary["status"].value_counts().to_dict() == {"SKIPPED": 8, "FAILED": 2}
    first = grid_sweep.summary.set_index("job")
    skipped = summary[summary["status"] == "SKIPPED"].set_index("job")
    # Each skipped job points at the run that already holds its result.
    assert (skipped["run_id"] == first.loc[skipped.index, "run_id"]).all()
    assert skipped["val_accuracy"].tolist() == pytest.approx(first.loc[skipped.index, "val_accuracy"].tolist())
    assert {run.info.status for run in grid_rerun.children} == {"FAILED"}, "nothing was trained again"
    assert grid_rerun.parent.data.tags[tracking.TAG_BEST_CHILD] == grid_sweep.parent.data.tags[tracking.TAG_BEST_CHILD]
    assert grid_rerun.seconds < grid_sweep.seconds / 2


# --- Optuna --------------------------------------------------------------------------------


def test_optuna_search_space_composes() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna"], return_hydra_config=True)
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    assert sweeper["_target_"].endswith("OptunaSweeper")
    assert sweeper["sampler"]["_target_"] == "optuna.samplers.TPESampler"
    assert isinstance(sweeper["sampler"]["seed"], int)
    assert sweeper["direction"] == "maximize"
    assert sweeper["n_trials"] >= 1
    assert set(sweeper["params"]) == {"train.learning_rate", "model.dropout", "finetune", "augment"}
    assert sweeper["params"]["train.learning_rate"].startswith("tag(log")


@pytest.mark.slow
def test_optuna_sweep_runs_trials_as_children(synthetic_cfg: Config, tmp_path: Path) -> None:
    _prepare(synthetic_cfg, tmp_path)
    # Fix the two expensive knobs (fine-tuning, augmentation): Optuna searches the other two.
    fixed = ("finetune=frozen", "augment=none")
    done = run_train_cli(tmp_path, "-m", *TINY, "hparams_search=optuna", "hydra.sweeper.n_trials=2", *fixed)
    assert "Best parameters" in done.stdout + done.stderr
    client = client_for(tmp_path)
    (parent,) = parent_runs(client)
    assert parent.info.run_name.startswith("optuna-")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_SWEEP_KEYS] == "train.learning_rate model.dropout"
    children = children_of(client, parent)
    assert len(children) == 2 and {run.info.status for run in children} == {"FINISHED"}
    for run in children:
        assert 1e-4 <= float(run.data.params["train.learning_rate"]) <= 0.1
        assert 0.0 <= float(run.data.params["model.dropout"]) <= 0.6
        assert run.info.run_name.startswith("train.learning_rate=")
    assert parent.data.tags[tracking.TAG_BEST_CHILD] in {run.info.run_id for run in children}
    assert (Path(parent.data.tags[tracking.TAG_SWEEP_DIR]) / "optimization_results.yaml").is_file()


# --- the MLflow store under concurrent jobs ------------------------------------------------

CONFIGURE_SCRIPT = """
import sys, time
from pathlib import Path
from transferlab import tracking
from transferlab.config import MlflowConfig
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
print(tracking.configure(MlflowConfig(), Path.cwd()))
"""


@pytest.mark.slow
def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    """joblib jobs or `dvc queue start -j N` on a fresh project: MLflow's schema migrations race."""
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONFIGURE_SCRIPT, str(go)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    time.sleep(3)  # let them import MLflow, then release them together
    go.touch()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], [err[-1500:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1, "all must see one experiment"


def test_failed_job_marks_the_run_its_training_left(tmp_path: Path) -> None:
    """Training finished but evaluate failed: the run must not stay FINISHED (a re-run would skip it)."""
    cfg = MlflowConfig()
    experiment = tracking.configure(cfg, tmp_path)
    client = client_for(tmp_path)
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    tags = {tracking.TAG_JOB: "job-1"}
    trained = client.create_run(experiment, tags={**tags, "mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(trained, "FINISHED")

    run_id = tracking.failed_child_run(cfg, tmp_path, "x", parent, tags, "DataError: boom", "Traceback ...")
    assert run_id == trained
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[tracking.TAG_ERROR] == "DataError: boom"
    assert [a.path for a in client.list_artifacts(run_id)] == ["error.txt"]

    fresh = tracking.failed_child_run(cfg, tmp_path, "y", parent, {tracking.TAG_JOB: "job-2"}, "ConfigError: bad")
    run = client.get_run(fresh)
    assert run.info.status == "FAILED" and run.info.run_name == "y"
    assert run.data.tags["mlflow.parentRunId"] == parent


# --- DVC experiments -----------------------------------------------------------------------


def test_dvc_temp_workspaces_log_to_the_repos_store(tmp_path: Path) -> None:
    """Queued and --temp experiments run in <repo>/.dvc/tmp/exps/...: their runs belong to the repo."""
    repo = tmp_path / "repo"
    expected = tracking.tracking_uri(MlflowConfig(), repo)
    for workspace in (".dvc/tmp/exps/tmpab12cd", ".dvc/tmp/exps/standalone/tmpab12cd"):
        assert tracking.tracking_uri(MlflowConfig(), repo / workspace) == expected
    assert expected == f"sqlite:///{(repo / 'mlruns' / 'mlflow.db').resolve()}"


def dvc(repo: Path, *args: str, timeout: float = 600) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [str(VENV_BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


@pytest.mark.slow
def test_dvc_exp_run_composes_conf_and_lands_in_mlflow(project_copy: Path) -> None:
    # DVC composes conf/ afresh from its defaults plus every -S: the tiny synthetic setup
    # must be passed along with the parameter under study.
    overrides = [arg for item in (*TINY, "model.dropout=0.3") for arg in ("-S", item)]
    dvc(project_copy, "exp", "run", "--name", "dropout-03", *overrides)

    rows = json.loads(dvc(project_copy, "exp", "show", "--json"))
    experiments = [exp for row in rows for exp in row.get("experiments") or []]
    (record,) = [exp for exp in experiments if exp.get("name") == "dropout-03"]
    data = record["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["model"]["dropout"] == 0.3
    assert data["params"]["params.yaml"]["data"]["data"]["name"] == "synthetic"
    metrics = data["metrics"]["reports/metrics.json"]["data"]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0

    client = client_for(project_copy)
    (run,) = client.search_runs([experiment_id(client)])
    assert run.data.params["model.dropout"] == "0.3"
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
