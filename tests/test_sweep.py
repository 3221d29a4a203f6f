"""Sweeps: Hydra multirun (grid and Optuna) as one MLflow parent with a child per job. (DVC
experiments, the other way to try many settings, are checked in test_entrypoints.py.)

The grid sweep runs once per module (a subprocess of the real `transferlab-train -m`: ten jobs
of a tiny model on synthetic data, six of them with an invalid value) and several tests read
its results back from MLflow. A second run of the same command checks that it resumes the same
parent and skips its finished jobs (`sweep.skip_finished`); the Optuna sweep runs in the same
project. The joblib launcher is not run here (its worker processes would add 10-20 s); the store
lock that makes concurrent jobs safe is tested below.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO_ROOT, SYNTHETIC_OVERRIDES, VENV_BIN, job_outputs, prepare_project
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from transferlab import tracking
from transferlab.config import Config, MlflowConfig, compose, config_hash
from transferlab.paths import StagePaths
from transferlab.sweep import ERROR_FILE, SweepInfo, free_memory, job_name_and_tags, sweep_keys
from transferlab.sweep_bookkeeping import best_row

TINY = (
    *SYNTHETIC_OVERRIDES,
    "model=mobilenet_v2",
    "model.alpha=0.35",
    "model.weights=null",
    "train.batch_size=8",
    "train.epochs=1",
    "mlflow.system_metrics=false",
)
# 5 x 2 = 10 jobs in this order: (1.5, 0.01), (1.5, 0.001), (0.0, 0.01), ... Dropouts 1.5, 2.0
# and 2.5 are invalid: jobs 0-1 fail, 2-5 train (head only, on cached features), 6-9 fail.
GRID = ("model.dropout=1.5,0.0,0.5,2.0,2.5", "train.learning_rate=0.01,0.001")
DROPOUTS = (1.5, 0.0, 0.5, 2.0, 2.5)
TRAINED_JOBS, FAILED_JOBS = [2, 3, 4, 5], [0, 1, 6, 7, 8, 9]
# RSS after the second trained job (the first one loads TensorFlow) may rise this much by the
# last. Measured: within 10 MB.
RSS_GROWTH_LIMIT_MB = 50


def dropout_error(value: float) -> str:
    return f"ConfigError: model.dropout must be in [0, 1), got {value}"


def run_train_cli(root: Path, *args: str, timeout: float = 600, status: int = 0) -> subprocess.CompletedProcess[str]:
    """`transferlab-train ARGS` in the project `root` (Hydra reads ./conf, jobs read ./data); exits `status`."""
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
    assert done.returncode == status, (done.stdout + done.stderr)[-4000:]
    return done


def client_for(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking.tracking_uri(MlflowConfig(), root))


def experiment_id(client: MlflowClient) -> str:
    return client.get_experiment_by_name(MlflowConfig().experiment).experiment_id


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
    sweep_dir: Path
    client: MlflowClient
    parent: Run
    children: list[Run]
    summary: pd.DataFrame
    seconds: float
    console: str


def parent_of_sweep(client: MlflowClient, sweep_dir: Path) -> Run:
    """The parent run a sweep recorded in its folder (a resumed sweep's is the first run's parent)."""
    info = SweepInfo.read(sweep_dir)
    assert info is not None
    return client.get_run(info.parent.run_id)


def _sweep(root: Path, name: str, tmp: Path, *args: str) -> Sweep:
    started = time.monotonic()
    done = run_train_cli(root, "-m", *TINY, *GRID, f"hydra.sweep.dir=outputs/sweeps/{name}", *args)
    seconds = time.monotonic() - started
    client = client_for(root)
    sweep_dir = root / "outputs" / "sweeps" / name
    parent = parent_of_sweep(client, sweep_dir)
    summary = summary_from_mlflow(client, parent, tmp)
    children = children_of(client, parent)
    return Sweep(root, sweep_dir, client, parent, children, summary, seconds, done.stdout + done.stderr)


@pytest.fixture(scope="module")
def sweep_project(hydra_project: Path) -> Path:
    """`hydra_project` (made once for this module) with a pipeline run in its store."""
    _plant_a_pipeline_run(hydra_project)
    return hydra_project


def _plant_a_pipeline_run(root: Path) -> str:
    """A FINISHED, evaluated run outside any sweep (as `dvc repro` leaves one) with the config of the
    grid's first trained job: `sweep.skip_finished` must not take it for that job's result."""
    cfg = compose([*TINY, "model.dropout=0.0", "train.learning_rate=0.01"], REPO_ROOT / "conf")
    store = tracking.open_store(cfg.mlflow, root)
    with store.start_run(run_name="small_cnn-synthetic", tags={tracking.TAG_CONFIG_HASH: config_hash(cfg)}) as run:
        run.log_metrics({"final_val_accuracy": 1.0, "test_accuracy": 1.0})
    return run.run_id


@pytest.fixture(scope="module")
def grid_sweep(sweep_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    return _sweep(sweep_project, "first", tmp_path_factory.mktemp("first"))


@pytest.fixture(scope="module")
def grid_rerun(grid_sweep: Sweep, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    return _sweep(grid_sweep.root, "again", tmp_path_factory.mktemp("again"))


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
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_SWEEP_KEYS] == "model.dropout train.learning_rate"
    assert parent.data.tags[tracking.TAG_LAUNCHER] == "BasicLauncher"
    assert len(children) == 10
    names = sorted(run.info.run_name for run in children)
    expected = [f"model.dropout={d:g} train.learning_rate={lr}" for d in DROPOUTS for lr in (0.01, 0.001)]
    assert names == sorted(expected)
    for run in children:
        tags = run.data.tags
        assert tags[tracking.TAG_SWEEP] == "child"
        assert f"model.dropout={tags[tracking.TAG_OVERRIDE_PREFIX + 'model.dropout']}" in tags[tracking.TAG_OVERRIDES]
        assert tags[tracking.TAG_OVERRIDE_PREFIX + "data"] == "synthetic"
    finished = [run for run in children if run.info.status == "FINISHED"]
    assert len(finished) == len(TRAINED_JOBS)
    for run in finished:  # comparable side by side: the same params and metrics in every child
        assert run.data.params["model.dropout"] == run.data.tags[tracking.TAG_OVERRIDE_PREFIX + "model.dropout"]
        assert {"final_val_accuracy", "test_accuracy", "test_macro_f1"} <= set(run.data.metrics)
    # The pipeline run planted with job 2's config is no child of this sweep: job 2 trained.
    assert grid_sweep.summary.set_index("job").loc[TRAINED_JOBS[0], "status"] == "FINISHED"


@pytest.mark.slow
def test_each_job_warns_once_of_the_swept_keys_its_lbfgs_head_leaves_unread(grid_sweep: Sweep) -> None:
    """New-user report: `make sweep` trained four identical models without a word."""
    inert = "train.learning_rate train.epochs model.dropout"
    finished = [run for run in grid_sweep.children if run.info.status == "FINISHED"]
    assert [run.data.tags[tracking.TAG_INERT_OVERRIDES] for run in finished] == [inert] * len(TRAINED_JOBS)
    warned = [line for line in grid_sweep.console.splitlines() if "no effect here" in line]
    assert len(warned) == len(TRAINED_JOBS), (
        "one line per job that trained; a job that fails validation warns of nothing"
    )
    assert "[WARNING]" in warned[0] and warned[0].split(" - ", 1)[1] == (
        f"{inert.replace(' ', ', ')} have no effect here: the frozen backbone's head is fitted by L-BFGS, "
        "its L2 strength searched on validation (add train.head_solver=adam to step it with Adam)"
    )


@pytest.mark.slow
def test_every_finished_job_has_its_figures_on_disk_and_in_its_run(grid_sweep: Sweep) -> None:
    """Later jobs leave their figures to follow them (drawn in the figure worker while the next
    job trains): by the sweep's end each is in its job's folder and run, before the test metrics."""
    figures = ["confusion_matrix.png", "misclassified.png", "reliability.png", "training_curves.png"]
    finished = grid_sweep.summary[grid_sweep.summary["status"] == "FINISHED"]
    for job, run_id in zip(finished["job"], finished["run_id"], strict=True):
        paths = StagePaths(grid_sweep.root, output_root=grid_sweep.sweep_dir / str(job))
        assert job_outputs(paths, grid_sweep.client) == run_id, "the folder holds the run's results, figures too"
        logged = [Path(a.path).name for a in grid_sweep.client.list_artifacts(run_id, "figures")]
        assert sorted(logged) == figures
        drawn = [paths.training_curves, *(paths.evaluation / "figures" / name for name in figures[:3])]
        assert all(png.stat().st_size > 0 for png in drawn)
    job_logs = "".join(log.read_text() for log in grid_sweep.sweep_dir.glob("*/*.log"))
    assert "(in the figure worker)" in job_logs, "later jobs' figures were drawn in the worker"


@pytest.mark.slow
def test_sweep_logs_are_quiet_and_plain(grid_sweep: Sweep) -> None:
    logs = [(grid_sweep.sweep_dir / str(job) / "app.log").read_text() for job in range(10)]
    for text in [grid_sweep.console, *logs]:
        assert "retracing" not in text and "\x1b" not in text
        assert "Traceback" not in text, "a failing job prints one line; its traceback goes to error.txt"
    failures = [line for line in grid_sweep.console.splitlines() if " failed: ConfigError" in line]
    assert len(failures) == len(FAILED_JOBS)
    assert all(f"{ERROR_FILE})" in line for line in failures)
    assert "Traceback" in (grid_sweep.sweep_dir / str(FAILED_JOBS[0]) / ERROR_FILE).read_text()
    # New-user report: the sweep's closing lines, ours, carried Hydra's `[HYDRA]` tag.
    lines = grid_sweep.console.splitlines()
    [summary] = [line for line in lines if "sweep summary: " in line]
    assert "][transferlab.sweep][INFO] - sweep summary: " in summary
    assert any("][HYDRA] Launching " in line for line in lines), "Hydra's own lines keep their tag"


@pytest.mark.slow
def test_parent_holds_the_summary_table_and_names_the_best_child(grid_sweep: Sweep) -> None:
    client, parent, summary = grid_sweep.client, grid_sweep.parent, grid_sweep.summary
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.csv", "sweep_summary.json", "sweep_val_accuracy.png", "multirun.yaml"} <= artifacts
    assert list(summary.columns[:3]) == ["job", "model.dropout", "train.learning_rate"]
    assert {"overrides", "status", "run_id", "val_accuracy", "test_accuracy", "duration_s", "error"} <= set(summary)
    assert summary["job"].tolist() == list(range(10))
    assert set(summary["run_id"]) == {run.info.run_id for run in grid_sweep.children}
    finished = summary[summary["status"] == "FINISHED"]
    assert finished["job"].tolist() == TRAINED_JOBS
    assert finished[["val_accuracy", "test_accuracy", "duration_s"]].notna().all().all()

    best = best_row(summary)
    assert best is not None and best["val_accuracy"] == finished["val_accuracy"].max()
    assert parent.data.tags[tracking.TAG_BEST_CHILD] == best["run_id"]
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best["val_accuracy"])
    # sweep.log_models=best: only the best child logs its model, when the sweep ends.
    logged = client.search_logged_models([experiment_id(client)])
    assert [model.source_run_id for model in logged] == [best["run_id"]]
    (registered,) = client.search_registered_models()
    assert client.get_model_version_by_alias(registered.name, "candidate").run_id == best["run_id"]
    assert parent.data.metrics["jobs_finished"] == len(TRAINED_JOBS)
    assert parent.data.metrics["jobs_failed"] == len(FAILED_JOBS)


@pytest.mark.slow
def test_failing_jobs_are_failed_children_and_the_sweep_goes_on(grid_sweep: Sweep) -> None:
    failed = [run for run in grid_sweep.children if run.info.status == "FAILED"]
    assert len(failed) == len(FAILED_JOBS)
    for run in failed:
        value = float(run.data.tags[tracking.TAG_OVERRIDE_PREFIX + "model.dropout"])
        assert run.data.tags[tracking.TAG_ERROR] == dropout_error(value)
        text = grid_sweep.client.download_artifacts(run.info.run_id, "error.txt")
        assert "Traceback" in Path(text).read_text()
    rows = grid_sweep.summary[grid_sweep.summary["status"] == "FAILED"]
    assert rows["job"].tolist() == FAILED_JOBS, "the jobs after the first failures still ran"
    assert rows["error"].tolist() == [dropout_error(v) for v in (1.5, 1.5, 2.0, 2.0, 2.5, 2.5)]
    lines = grid_sweep.console.splitlines()
    start = next(i for i, line in enumerate(lines) if " status " in line and " run_id " in line)
    end = next(i for i in range(start, len(lines)) if "sweep summary:" in lines[i])
    printed = "\n".join(lines[start:end])  # the summary table, as printed
    assert dropout_error(2.5) in printed and "NaN" not in printed and "None" not in printed, "no value is a -"


@pytest.mark.slow
def test_jobs_share_the_frozen_feature_cache(grid_sweep: Sweep) -> None:
    """The first job computes the backbone features of train, val and test; the others reuse them."""
    logs = {job: (grid_sweep.sweep_dir / str(job) / "app.log").read_text() for job in TRAINED_JOBS}
    first = logs[TRAINED_JOBS[0]]
    assert first.count("pooled backbone features: cache miss") == 2
    assert "test features from the cache (computed once)" in first
    for job in TRAINED_JOBS[1:]:
        assert logs[job].count("pooled backbone features: cache hit") == 2
        assert "test features from the cache (hit)" in logs[job] and "computing" not in logs[job]


@pytest.mark.slow
def test_memory_does_not_grow_from_job_to_job(grid_sweep: Sweep) -> None:
    rss = grid_sweep.summary.set_index("job")["rss_mb"]  # after each job, its models freed
    assert (rss > 0).all()
    growth = rss[TRAINED_JOBS[2:]].max() - rss[TRAINED_JOBS[1]]
    assert growth < RSS_GROWTH_LIMIT_MB, f"RSS after each job (MB): {rss.tolist()}"


def test_freeing_memory_after_a_job_releases_its_graphs() -> None:
    """Every `fit` leaves graphs that `keras.backend.clear_session` alone does not free: TensorFlow
    keeps a gradient function per traced step in a process-wide registry. Unchecked, a sweep of a
    tiny MobileNetV2 grew by about 35 MB per job."""
    import gc

    import keras
    import numpy as np
    from tensorflow.python.framework.func_graph import FuncGraph

    def fit_a_model() -> None:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer="adam", loss="categorical_crossentropy")
        model.fit(np.zeros((8, 4)), np.eye(2)[np.zeros(8, dtype=int)], epochs=1, verbose=0)

    def graphs_alive() -> int:
        gc.unfreeze()  # free_memory freezes survivors: count them too
        gc.collect()
        return sum(isinstance(obj, FuncGraph) for obj in gc.get_objects())

    fit_a_model()
    free_memory()
    after_one = graphs_alive()
    for _ in range(3):
        fit_a_model()
        free_memory()
    assert graphs_alive() == after_one


@pytest.mark.slow
def test_rerun_resumes_the_sweeps_parent_and_skips_its_finished_jobs(grid_sweep: Sweep, grid_rerun: Sweep) -> None:
    parent = grid_rerun.parent
    assert parent.info.run_id == grid_sweep.parent.info.run_id, "no second parent"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_SWEEP_DIR].endswith("again")
    sweep_id = parent.data.tags[tracking.TAG_SWEEP_ID]
    same_sweep = grid_rerun.client.search_runs(
        [experiment_id(grid_rerun.client)], filter_string=f"tags.`{tracking.TAG_SWEEP_ID}` = '{sweep_id}'"
    )
    assert [run.info.run_id for run in same_sweep] == [parent.info.run_id]

    summary = grid_rerun.summary
    assert summary["status"].value_counts().to_dict() == {"SKIPPED": len(TRAINED_JOBS), "FAILED": len(FAILED_JOBS)}
    first = grid_sweep.summary.set_index("job")
    skipped = summary[summary["status"] == "SKIPPED"].set_index("job")
    assert skipped.index.tolist() == TRAINED_JOBS
    # Each skipped job points at this sweep's own run that already holds its result.
    assert (skipped["run_id"] == first.loc[TRAINED_JOBS, "run_id"]).all()
    assert skipped["val_accuracy"].tolist() == pytest.approx(first.loc[TRAINED_JOBS, "val_accuracy"].tolist())
    children = {run.info.run_id for run in grid_rerun.children}
    assert set(summary["run_id"]) <= children, "the summary names only children of this parent"
    best = parent.data.tags[tracking.TAG_BEST_CHILD]
    assert best in children and best in set(summary["run_id"])
    assert best == grid_sweep.parent.data.tags[tracking.TAG_BEST_CHILD]
    new_children = children - {run.info.run_id for run in grid_sweep.children}
    assert len(new_children) == len(FAILED_JOBS), "nothing was trained again; the failed jobs ran again"
    assert grid_rerun.seconds < grid_sweep.seconds / 2


@pytest.mark.slow
def test_a_sweep_in_which_every_job_fails_exits_non_zero(sweep_project: Path) -> None:
    """No training: every job fails validation. The same command again resumes the same (FAILED) parent."""
    args = ("-m", *TINY, "model.dropout=1.5,2.0", "hydra.sweep.dir=outputs/sweeps/all_failed")
    done = run_train_cli(sweep_project, *args, status=1)
    console = done.stdout + done.stderr
    assert "Traceback" not in console
    assert [line.split(" - ", 1)[1] for line in console.splitlines() if " failed: " in line] == [
        f"job model.dropout={value:g} failed: {dropout_error(value)} (traceback: "
        f"{sweep_project / 'outputs' / 'sweeps' / 'all_failed' / str(job) / ERROR_FILE})"
        for job, value in ((0, 1.5), (1, 2.0))
    ]
    assert "no job of the sweep finished" in console
    client = client_for(sweep_project)
    parent = parent_of_sweep(client, sweep_project / "outputs" / "sweeps" / "all_failed")
    assert parent.info.status == "FAILED"
    assert parent.data.tags[tracking.TAG_ERROR] == "no job finished (2 failed)"
    assert tracking.TAG_BEST_CHILD not in parent.data.tags
    again = run_train_cli(sweep_project, *args, status=1)
    assert f"resuming sweep parent run {parent.info.run_id}" in again.stdout + again.stderr


@pytest.mark.slow
def test_a_single_run_is_named_by_its_overrides_and_warns_of_those_without_effect(
    synthetic_cfg: Config, tmp_path: Path
) -> None:
    root = prepare_project(synthetic_cfg, tmp_path / "project", conf=True).root
    overrides = (*TINY, "train.learning_rate=0.01", "model.feature_power=0.5", "mlflow.log_model=false")
    done = run_train_cli(root, *overrides)
    [warned] = [line for line in (done.stdout + done.stderr).splitlines() if "no effect here" in line]
    assert "WARNING" in warned and "train.learning_rate, train.epochs have no effect here" in warned
    (run,) = client_for(root).search_runs([experiment_id(client_for(root))])
    # Named by its overrides as Hydra parses them (null -> None, false -> False).
    assert run.info.run_name == " ".join(overrides).replace("=null", "=None").replace("=false", "=False")
    assert run.data.tags[tracking.TAG_INERT_OVERRIDES] == "train.learning_rate train.epochs"


def test_a_single_run_that_fails_at_work_keeps_its_traceback_in_its_folder(sweep_project: Path) -> None:
    """The one line on the terminal; the folder it leaves (MLflow run, checkpoint state) says why."""
    missing = sweep_project / "no-such-weights.h5"
    done = run_train_cli(
        sweep_project, *TINY, f"model.weights={missing}", "hydra.run.dir=outputs/runs/failed", status=2
    )
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("ModelError: ") and str(missing) in line
    folder = sweep_project / "outputs" / "runs" / "failed"
    traceback = (folder / ERROR_FILE).read_text()
    assert traceback.startswith("Traceback") and traceback.rstrip().endswith(line.split(": ", 1)[1])
    assert (folder / "checkpoints").is_dir()


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
    space = {"finetune", "finetune.learning_rate", "model.dropout", "model.feature_power", "augment"}
    assert set(sweeper["params"]) == space, "what the default L-BFGS head and fine-tuning respond to"
    assert sweeper["params"]["finetune.learning_rate"].startswith("tag(log")


@pytest.mark.slow
def test_optuna_sweep_runs_trials_as_children(sweep_project: Path) -> None:
    # Fix the two expensive knobs (fine-tuning, augmentation): Optuna searches the others, and
    # train.learning_rate, added to the space on the command line as for an Adam head.
    fixed = ("finetune=frozen", "augment=none", "hydra.sweep.dir=outputs/sweeps/optuna")
    head_rate = "train.learning_rate=tag(log, interval(0.0001, 0.1))"
    done = run_train_cli(
        sweep_project, "-m", *TINY, "hparams_search=optuna", "hydra.sweeper.n_trials=2", head_rate, *fixed
    )
    console = done.stdout + done.stderr
    assert "Best parameters" in console
    assert re.search(r"\]\[optuna\.[\w.]+\]\[INFO\] - A new study created", console), "tagged as ours are"
    assert "\x1b[" not in console and "alembic" not in console, "no colours, no lines of Optuna's imports"
    assert re.search(r"\]\[transferlab\.sweep_bookkeeping\]\[INFO\] - best child: job [01] ", console)
    client = client_for(sweep_project)
    parent = parent_of_sweep(client, sweep_project / "outputs" / "sweeps" / "optuna")
    assert parent.info.run_name == "optuna-optuna"
    assert parent.info.status == "FINISHED"
    keys = "finetune.learning_rate model.dropout model.feature_power train.learning_rate"
    assert parent.data.tags[tracking.TAG_SWEEP_KEYS] == keys
    children = children_of(client, parent)
    assert len(children) == 2 and {run.info.status for run in children} == {"FINISHED"}
    for run in children:
        assert 1e-5 <= float(run.data.params["finetune.learning_rate"]) <= 1e-3
        assert 0.0 <= float(run.data.params["model.dropout"]) <= 0.6
        assert run.data.params["model.feature_power"] in {"0.5", "1.0"}
        assert 1e-4 <= float(run.data.params["train.learning_rate"]) <= 0.1
        assert run.info.run_name.startswith("finetune.learning_rate=")
    assert parent.data.tags[tracking.TAG_BEST_CHILD] in {run.info.run_id for run in children}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.csv", "optimization_results.yaml", "multirun.yaml"} <= artifacts
