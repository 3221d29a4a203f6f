"""The one owner of MLflow: store URI, experiment, runs (new, resumed, child), tags, artifacts.

Stages call these functions and never `mlflow.*` directly. The default store is
`sqlite:///<project>/mlruns/mlflow.db` with artifacts under `<project>/mlruns/artifacts`;
`MLFLOW_TRACKING_URI` (or `mlflow.tracking_uri`) points runs at a shared `mlflow server`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab import atomic
from transferlab.config import Config, MlflowConfig, config_hash, flatten
from transferlab.errors import TransferlabError
from transferlab.paths import tracking_root

log = logging.getLogger(__name__)

# Tag names, shared by the stages, the sweep callback and the tests.
TAG_CONFIG_HASH = "transferlab.config_hash"
TAG_MANIFEST_HASH = "transferlab.manifest_hash"
TAG_GIT_COMMIT = "transferlab.git_commit"
TAG_GIT_DIRTY = "transferlab.git_dirty"
TAG_OVERRIDES = "transferlab.overrides"
TAG_TF_VERSION = "transferlab.tensorflow_version"
TAG_DEVICE = "transferlab.device"
TAG_STAGE = "transferlab.stage"
TAG_SWEEP = "transferlab.sweep"
TAG_BEST_CHILD = "transferlab.best_child_run_id"
TAG_ERROR = "transferlab.error"
TAG_JOB = "transferlab.job"
TAG_OVERRIDE_PREFIX = "transferlab.override."  # one tag per Hydra override of a job
TAG_SWEEP_KEYS = "transferlab.sweep_keys"
TAG_SWEEP_DIR = "transferlab.sweep_dir"
TAG_SWEEPER = "transferlab.sweeper"
TAG_LAUNCHER = "transferlab.launcher"
# Columns of a sweep's summary table; one column per swept key goes after "job".
SUMMARY_COLUMNS = [
    "job",
    "overrides",
    "status",
    "run_id",
    "val_accuracy",
    "val_loss",
    "test_accuracy",
    "test_macro_f1",
    "duration_s",
    "rss_mb",
    "error",
]


def tracking_uri(cfg: MlflowConfig, root: Path) -> str:
    """MLFLOW_TRACKING_URI, else the config's URI, else the project's SQLite store.

    A queued or `--temp` DVC experiment runs in a throwaway copy of the repo under
    `.dvc/tmp/exps/`; its runs go to the repo's own store (see `paths.tracking_root`).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return f"sqlite:///{(tracking_root(root) / 'mlruns' / 'mlflow.db').resolve()}"


def _default_artifact_root(uri: str, root: Path) -> str | None:
    """Local SQLite stores keep artifacts beside the database; servers decide for themselves."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise creating a local SQLite store and its experiment across processes.

    MLflow waits on a busy database (busy_timeout) once its tables exist, but processes that
    open a new store at the same moment (joblib sweep jobs, `dvc queue start -j 2`) all run
    its schema migrations and fail with "table ... already exists" or leave it half-migrated;
    two of them may also create the same experiment. Other stores need no lock.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no lock; start one process first to create the store
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with (db.parent / f".{db.name}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def configure(cfg: MlflowConfig, root: Path) -> str:
    """Point MLflow at the store, create the experiment if needed; return the experiment id."""
    import mlflow

    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri):
            experiment = mlflow.get_experiment_by_name(cfg.experiment)
            if experiment is not None:
                return experiment.experiment_id
            return mlflow.create_experiment(cfg.experiment, artifact_location=_default_artifact_root(uri, root))
    except Exception as exc:  # MLflow raises many types for an unreachable or broken store
        raise TransferlabError(f"MLflow store {uri} is not usable: {str(exc).splitlines()[0]}") from exc


def git_state(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the project, or 'unknown' outside a git checkout."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        TAG_GIT_COMMIT: commit or "unknown",
        TAG_GIT_DIRTY: "unknown" if status is None else str(bool(status)).lower(),
    }


@dataclass(frozen=True)
class RunRecord:
    """What `models/run.json` holds: enough for evaluate to log into the training run."""

    run_id: str
    tracking_uri: str
    experiment_id: str

    def write(self, path: Path) -> None:
        atomic.write_text(path, json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise TransferlabError(f"{path} not found: run `dvc repro train` first") from exc
        except (ValueError, TypeError) as exc:
            raise TransferlabError(f"{path} is not a valid run record: run `dvc repro train` again") from exc


class Run:
    """A handle on the active MLflow run, with the few operations stages need."""

    def __init__(self, run_id: str, experiment_id: str, uri: str) -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = uri

    @property
    def record(self) -> RunRecord:
        return RunRecord(self.run_id, self.tracking_uri, self.experiment_id)

    def log_config(self, cfg: Config) -> None:
        import mlflow

        params = {k: "None" if v is None else v for k, v in flatten(cfg).items()}
        existing = self.params()
        # A resumed run already holds its params; MLflow refuses to change a logged value.
        mlflow.log_params({k: v for k, v in params.items() if k not in existing})

    def params(self) -> dict[str, str]:
        import mlflow

        return dict(mlflow.get_run(self.run_id).data.params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def logged_steps(self, metric: str) -> set[int]:
        """Steps of `metric` already in the store (a resumed run must not log them twice)."""
        from mlflow.tracking import MlflowClient

        return {m.step for m in MlflowClient().get_metric_history(self.run_id, metric)}

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, payload: Mapping[str, Any], artifact_file: str) -> None:
        import mlflow

        mlflow.log_dict(dict(payload), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        import mlflow

        mlflow.log_text(text, artifact_file)

    def log_model(self, model_file: Path, classes: list[str], image_size: int) -> None:
        """Log the Keras model as a servable pyfunc model named `model` (see transferlab.serving)."""
        from transferlab.serving import log_image_classifier

        log_image_classifier(model_file, classes, image_size, name="model")


def base_tags(cfg: Config, root: Path) -> dict[str, str]:
    """Tags every training run carries (the stage adds TF version, device, manifest hash)."""
    return {TAG_CONFIG_HASH: config_hash(cfg), **git_state(root)}


@contextmanager
def start_run(
    cfg: Config,
    root: Path,
    *,
    run_name: str | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Run]:
    """Start (or with `run_id`, resume) a run; it ends FINISHED, or FAILED on an exception."""
    import mlflow

    experiment_id = configure(cfg.mlflow, root)
    system_metrics = cfg.mlflow.system_metrics and _psutil_available()
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=None if run_id else run_name,
        parent_run_id=parent_run_id,
        tags=dict(tags or {}),
        log_system_metrics=system_metrics,
    ) as active:
        try:
            yield Run(active.info.run_id, active.info.experiment_id, mlflow.get_tracking_uri())
        except BaseException as exc:
            # The run ends FAILED (or KILLED on Ctrl-C); say why in the UI.
            mlflow.set_tag(TAG_ERROR, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise


@contextmanager
def reopen_run(record: RunRecord) -> Iterator[Run]:
    """Log more into a finished run (evaluate adds test metrics to the training run)."""
    import mlflow

    mlflow.set_tracking_uri(record.tracking_uri)
    try:
        mlflow.get_run(record.run_id)
    except Exception as exc:
        raise TransferlabError(
            f"MLflow run {record.run_id} not found in {record.tracking_uri}: run `dvc repro train` again"
        ) from exc
    with mlflow.start_run(run_id=record.run_id) as active:
        yield Run(active.info.run_id, active.info.experiment_id, record.tracking_uri)


def run_status(run_id: str) -> str | None:
    """RUNNING / FINISHED / FAILED / KILLED, or None if the run does not exist."""
    import mlflow

    try:
        return mlflow.get_run(run_id).info.status
    except Exception:
        return None


def find_finished_run(experiment_id: str, cfg_hash: str, evaluated: bool = True) -> str | None:
    """A FINISHED run of this experiment with the given config hash (sweeps skip those).

    With `evaluated`, only a run that also holds the test metrics counts: a run whose
    evaluate step never ran (or failed) is trained again.
    """
    from mlflow.tracking import MlflowClient

    query = f"tags.`{TAG_CONFIG_HASH}` = '{cfg_hash}' and attributes.status = 'FINISHED'"
    if evaluated:
        query += " and metrics.test_accuracy >= 0"
    runs = MlflowClient().search_runs(
        [experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0].info.run_id if runs else None


def _psutil_available() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def final_val_accuracy(run_id: str) -> float | None:
    """The `final_val_accuracy` metric a training run logged, if any."""
    import mlflow

    value = mlflow.get_run(run_id).data.metrics.get("final_val_accuracy")
    return None if value is None else float(value)


def create_parent_run(cfg: MlflowConfig, root: Path, name: str, tags: Mapping[str, str]) -> RunRecord:
    """Open (without activating) the parent run of a sweep; jobs attach children to it."""
    from mlflow.tracking import MlflowClient

    experiment_id = configure(cfg, root)
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=name, tags={TAG_SWEEP: "parent", **git_state(root), **dict(tags)})
    return RunRecord(run.info.run_id, tracking_uri(cfg, root), experiment_id)


def failed_child_run(
    cfg: MlflowConfig,
    root: Path,
    name: str,
    parent_run_id: str | None,
    tags: Mapping[str, str],
    error: str,
    details: str | None = None,
) -> str:
    """The FAILED child of a job: the run its training left (FAILED even if training itself
    finished and evaluate failed), or a new one when none started. `error` becomes the
    `transferlab.error` tag, `details` (a traceback) the artifact `error.txt`."""
    from mlflow.tracking import MlflowClient

    experiment_id = configure(cfg, root)
    client = MlflowClient()
    job = tags.get(TAG_JOB)
    existing = (
        client.search_runs([experiment_id], filter_string=f"tags.`{TAG_JOB}` = '{job}'", max_results=1) if job else []
    )
    if existing:
        run_id = existing[0].info.run_id
        client.set_tag(run_id, TAG_ERROR, error)
    else:
        run_tags = {**dict(tags), TAG_ERROR: error}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run_id = client.create_run(experiment_id, run_name=name, tags=run_tags).info.run_id
    if details:
        client.log_text(run_id, details, "error.txt")
    if not existing or existing[0].info.status in ("RUNNING", "FINISHED"):
        client.set_terminated(run_id, status="FAILED")
    return run_id


def _summary_table(client: Any, rows: list[dict[str, Any]], keys: Sequence[str]) -> Any:
    """One row per job: swept values, status, validation and test metrics, duration, memory."""
    import pandas as pd

    for row in rows:
        if row.get("run_id"):
            metrics = client.get_run(row["run_id"]).data.metrics
            if row.get("val_accuracy") is None:
                row["val_accuracy"] = metrics.get("final_val_accuracy")
            row["val_loss"] = metrics.get("final_val_loss")
            row["test_accuracy"] = metrics.get("test_accuracy")
            row["test_macro_f1"] = metrics.get("test_macro_f1")
    columns = [SUMMARY_COLUMNS[0], *keys, *SUMMARY_COLUMNS[1:]]
    table = pd.DataFrame(rows, columns=columns)
    numeric = ["val_accuracy", "val_loss", "test_accuracy", "test_macro_f1", "duration_s", "rss_mb"]
    return table.astype({c: float for c in numeric})


def best_row(table: Any) -> Any | None:
    """The row with the highest validation accuracy (lower validation loss breaks ties)."""
    scored = table.dropna(subset=["val_accuracy"])
    if not len(scored):
        return None
    ranked = scored.assign(_loss=scored["val_loss"].fillna(float("inf")))
    return ranked.sort_values(["val_accuracy", "_loss"], ascending=[False, True], kind="stable").iloc[0]


def finish_parent_run(
    parent: RunRecord,
    rows: list[dict[str, Any]],
    summary_csv: Path,
    keys: Sequence[str] = (),
    status: str = "FINISHED",
    extra_artifacts: Sequence[Path] = (),
) -> str:
    """Log the sweep summary table on the parent, tag the best child, end the parent with `status`.

    The table goes to the parent as `sweep_summary.csv` and as the MLflow table
    `sweep_summary.json` (shown in the UI's artifact view), beside `extra_artifacts` (the
    sweep's Hydra config, Optuna's result). Returns the table as text.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(parent.tracking_uri)
    client = MlflowClient()
    table = _summary_table(client, rows, keys)
    summary_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(summary_csv, index=False)
    client.log_artifact(parent.run_id, str(summary_csv))
    client.log_table(parent.run_id, table, "sweep_summary.json")
    for path in extra_artifacts:
        client.log_artifact(parent.run_id, str(path))
    best = best_row(table)
    if best is not None:
        client.set_tag(parent.run_id, TAG_BEST_CHILD, best["run_id"])
        client.log_metric(parent.run_id, "best_val_accuracy", float(best["val_accuracy"]))
        if best["test_accuracy"] == best["test_accuracy"]:  # not NaN
            client.log_metric(parent.run_id, "best_test_accuracy", float(best["test_accuracy"]))
    for state in ("FINISHED", "FAILED", "SKIPPED"):
        client.log_metric(parent.run_id, f"jobs_{state.lower()}", int((table["status"] == state).sum()))
    if status != "FINISHED":
        client.set_tag(parent.run_id, TAG_ERROR, f"sweep stopped early ({status}) after {len(rows)} jobs")
    client.set_terminated(parent.run_id, status=status)
    return table.drop(columns=["overrides"]).to_string(index=False)
