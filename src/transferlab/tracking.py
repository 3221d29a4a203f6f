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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab import atomic
from transferlab.config import Config, MlflowConfig, config_hash, flatten
from transferlab.errors import TransferlabError

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
SUMMARY_COLUMNS = [
    "job",
    "overrides",
    "status",
    "run_id",
    "val_accuracy",
    "test_accuracy",
    "test_macro_f1",
    "duration_s",
    "error",
]


def tracking_uri(cfg: MlflowConfig, root: Path) -> str:
    """MLFLOW_TRACKING_URI, else the config's URI, else the project's SQLite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}"


def _default_artifact_root(uri: str, root: Path) -> str | None:
    """Local SQLite stores keep artifacts beside the database; servers decide for themselves."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def configure(cfg: MlflowConfig, root: Path) -> str:
    """Point MLflow at the store, create the experiment if needed; return the experiment id."""
    import mlflow

    uri = tracking_uri(cfg, root)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    try:
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


def find_finished_run(experiment_id: str, cfg_hash: str) -> str | None:
    """A FINISHED run of this experiment with the given config hash (sweeps skip those)."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_CONFIG_HASH}` = '{cfg_hash}' and attributes.status = 'FINISHED'",
        max_results=1,
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
    job_tag: str,
) -> str:
    """The FAILED child of a job: the one its training run left, or a new one when none started."""
    from mlflow.tracking import MlflowClient

    experiment_id = configure(cfg, root)
    client = MlflowClient()
    existing = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_JOB}` = '{job_tag}'", max_results=1)
    if existing:
        run_id = existing[0].info.run_id
        client.set_tag(run_id, TAG_ERROR, error)
        return run_id
    run_tags = {**dict(tags), TAG_ERROR: error}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=name, tags=run_tags)
    client.set_terminated(run.info.run_id, status="FAILED")
    return run.info.run_id


def finish_parent_run(parent: RunRecord, rows: list[dict[str, Any]], summary_csv: Path) -> str:
    """Log the sweep summary table on the parent, tag the best child, end the parent FINISHED.

    Returns the summary as a Markdown table.
    """
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(parent.tracking_uri)
    client = MlflowClient()
    for row in rows:
        if row.get("run_id"):
            metrics = client.get_run(row["run_id"]).data.metrics
            row.setdefault("val_accuracy", metrics.get("final_val_accuracy"))
            row["test_accuracy"] = metrics.get("test_accuracy")
            row["test_macro_f1"] = metrics.get("test_macro_f1")
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    summary_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(summary_csv, index=False)
    client.log_artifact(parent.run_id, str(summary_csv))
    client.log_table(parent.run_id, table.astype({"val_accuracy": float}), "sweep_summary.json")
    scored = table.dropna(subset=["val_accuracy"])
    if len(scored):
        best = scored.loc[scored["val_accuracy"].astype(float).idxmax()]
        client.set_tag(parent.run_id, TAG_BEST_CHILD, best["run_id"])
        client.log_metric(parent.run_id, "best_val_accuracy", float(best["val_accuracy"]))
    client.log_metric(parent.run_id, "jobs_failed", int((table["status"] == "FAILED").sum()))
    client.set_terminated(parent.run_id, status="FINISHED")
    return table.to_string(index=False)
