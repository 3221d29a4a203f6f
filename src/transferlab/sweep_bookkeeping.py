"""Sweep bookkeeping: which jobs are already done, the summary table, and the best child.

Pure logic over the `tracking` API (it never calls MLflow itself): `sweep.py` runs the jobs,
this module keeps their accounts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from transferlab import registry, tracking
from transferlab.config import TRAINING_SECTIONS
from transferlab.errors import TransferlabError
from transferlab.plots import plot_sweep

log = logging.getLogger(__name__)

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
JOB_STATES = ("FINISHED", "FAILED", "SKIPPED")
SWEEP_PLOT = "sweep_val_accuracy.png"
NUMERIC_COLUMNS = ["val_accuracy", "val_loss", "test_accuracy", "test_macro_f1", "duration_s", "rss_mb"]


def find_finished_run(
    store: tracking.Store, cfg_hash: str, parent_run_id: str | None = None, evaluated: bool = True
) -> str | None:
    """A FINISHED run of the experiment with the given config hash; with `parent_run_id`, only
    a child of that sweep parent counts (a resumed sweep skips its own finished jobs).

    With `evaluated`, only a run that also holds the test metrics counts: a run whose
    evaluate step never ran (or failed) is trained again.
    """
    query = f"tags.`{tracking.TAG_CONFIG_HASH}` = '{cfg_hash}' and attributes.status = 'FINISHED'"
    if parent_run_id:
        query += f" and tags.`{tracking.TAG_PARENT_RUN}` = '{parent_run_id}'"
    if evaluated:
        query += " and metrics.test_accuracy >= 0"
    found = store.search(query, max_results=1)
    return found[0] if found else None


def sweep_id(task_overrides: Sequence[str], base: Mapping[str, Any], sweeper_params: Mapping[str, Any]) -> str:
    """A stable id of a sweep: the same command on the same project settings gets the same id.

    It covers the job overrides (what is swept and what is fixed), the base config's training
    sections and the sweeper's search space. Overrides that only change where or how jobs run
    (`hydra.*`, `hydra/launcher=...`) or how they are recorded (`sweep.*`, `mlflow.*`) are left out.
    """
    ignored = ("hydra", "sweep", "mlflow")
    kept = sorted(o for o in task_overrides if o.lstrip("+~").split("=")[0].split("/")[0].split(".")[0] not in ignored)
    payload = {"overrides": kept, "base": {k: base.get(k) for k in TRAINING_SECTIONS}, "sweeper": sweeper_params}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_sweep_parent(store: tracking.Store, sweep: str) -> str | None:
    """The newest parent run of the sweep with id `sweep`, if it ran before."""
    query = f"tags.`{tracking.TAG_SWEEP_ID}` = '{sweep}' and tags.`{tracking.TAG_SWEEP}` = 'parent'"
    found = store.search(query, max_results=1)
    return found[0] if found else None


def final_val_accuracy(store: tracking.Store, run_id: str) -> float | None:
    """The `final_val_accuracy` metric a training run logged, if any."""
    value = store.run(run_id).metrics().get("final_val_accuracy")
    return None if value is None else float(value)


def summary_table(store: tracking.Store, rows: list[dict[str, Any]], keys: Sequence[str]) -> pd.DataFrame:
    """One row per job: swept values, status, validation and test metrics, duration, memory."""
    for row in rows:
        if row.get("run_id"):
            metrics = store.run(row["run_id"]).metrics()
            if row.get("val_accuracy") is None:
                row["val_accuracy"] = metrics.get("final_val_accuracy")
            row["val_loss"] = metrics.get("final_val_loss")
            row["test_accuracy"] = metrics.get("test_accuracy")
            row["test_macro_f1"] = metrics.get("test_macro_f1")
    columns = [SUMMARY_COLUMNS[0], *keys, *SUMMARY_COLUMNS[1:]]
    return pd.DataFrame(rows, columns=columns).astype({c: float for c in NUMERIC_COLUMNS})


def best_row(table: pd.DataFrame) -> pd.Series | None:
    """The row with the highest validation accuracy (lower validation loss breaks ties)."""
    scored = table.dropna(subset=["val_accuracy"])
    if not len(scored):
        return None
    ranked = scored.assign(_loss=scored["val_loss"].fillna(float("inf")))
    return ranked.sort_values(["val_accuracy", "_loss"], ascending=[False, True], kind="stable").iloc[0]


def describe_best(table: pd.DataFrame, best: pd.Series, keys: Sequence[str]) -> str:
    """One line on the best child: its job, swept values, validation scores and run; and, when other
    jobs tie with it on accuracy, that the lower loss chose it (Optuna's "Best parameters" name the
    first trial of a tie, which may be another job)."""
    values = ", ".join(f"{key}={best[key]}" for key in keys)
    line = (
        f"best child: job {best['job']}{f' ({values})' if values else ''}: validation accuracy "
        f"{best['val_accuracy']:.4f}, loss {best['val_loss']:.4f}; MLflow run {best['run_id']}"
    )
    tied = table[(table["val_accuracy"] == best["val_accuracy"]) & (table["job"] != best["job"])]
    if len(tied):
        others = ", ".join(str(job) for job in tied["job"])
        line += f" (tied on accuracy with job {others}: the lower validation loss chose it)"
    return line


def log_deferred_model(store: tracking.Store, rows: list[dict[str, Any]], run_id: str) -> None:
    """Log the model of the child `run_id` if its job left that to the end of the sweep (`sweep.log_models: best`)."""
    pending = next((row.get("model_to_log") for row in rows if row.get("run_id") == run_id), None)
    if pending and Path(pending["model_file"]).is_file():
        store.run(run_id).log_model(Path(pending["model_file"]), pending["classes"], pending["image_size"])


def close_running_children(store: tracking.Store, parent_run_id: str, status: str) -> list[str]:
    """End the children still RUNNING when their sweep stops early, with the parent's `status`.

    A job in the sweep's own process closes its run itself (KILLED on Ctrl-C or SIGTERM); a job
    in a launcher's worker (joblib) is ended with SIGKILL when the sweep stops, and cannot.
    """
    query = f"tags.`{tracking.TAG_PARENT_RUN}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    running = store.search(query, max_results=1000)
    for run_id in running:
        child = store.run(run_id)
        child.set_tag(tracking.TAG_ERROR, f"stopped with its sweep ({status})")
        child.terminate(status)
    return running


def finish_parent_run(
    parent: tracking.RunRecord,
    rows: list[dict[str, Any]],
    summary_csv: Path,
    keys: Sequence[str] = (),
    status: str = "FINISHED",
    extra_artifacts: Sequence[Path] = (),
    register_as: str | None = None,
) -> tuple[str, str]:
    """Log the sweep summary table on the parent, tag the best child, end the parent with `status`
    (FAILED instead of FINISHED when no job has a result).

    The table goes to `summary_csv` (in the sweep folder) and to the parent as an artifact and
    as the MLflow table `sweep_summary.json` (shown in the UI's artifact view), beside a plot of
    validation accuracy per swept value (`sweep_val_accuracy.png`) and `extra_artifacts` (the
    sweep's Hydra config, Optuna's result). A finished sweep registers its best child's model as
    a version of `register_as` with the alias `candidate`. Returns the table as text and the
    status the parent ended with.
    """
    store = tracking.Store.of_record(parent)
    run = store.run(parent.run_id)
    table = summary_table(store, rows, keys)
    summary_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(summary_csv, index=False)
    run.log_artifact(summary_csv)
    run.log_table(table, "sweep_summary.json")
    best = best_row(table)
    if keys:
        run.log_artifact(plot_sweep(table, keys, summary_csv.parent / SWEEP_PLOT, None if best is None else best.name))
    for path in extra_artifacts:
        run.log_artifact(path)
    if best is not None:
        log.info("%s", describe_best(table, best, keys))
        run.set_tag(tracking.TAG_BEST_CHILD, best["run_id"])
        log_deferred_model(store, rows, best["run_id"])
        run.log_metrics({"best_val_accuracy": float(best["val_accuracy"])})
        if best["test_accuracy"] == best["test_accuracy"]:  # not NaN
            run.log_metrics({"best_test_accuracy": float(best["test_accuracy"])})
        if register_as and status == "FINISHED":
            _register_candidate(store, register_as, best["run_id"])
    else:
        run.delete_tag(tracking.TAG_BEST_CHILD)  # a resumed parent may hold one from before
    run.log_metrics({f"jobs_{state.lower()}": int((table["status"] == state).sum()) for state in JOB_STATES})
    if status == "FINISHED" and not succeeded(table):
        status = "FAILED"
        run.set_tag(tracking.TAG_ERROR, f"no job finished ({len(rows)} failed)")
    elif status != "FINISHED":
        run.set_tag(tracking.TAG_ERROR, f"sweep stopped early ({status}) after {len(rows)} jobs")
        close_running_children(store, parent.run_id, status)
    else:
        run.delete_tag(tracking.TAG_ERROR)
    run.terminate(status)
    if table.empty:  # stopped before any job wrote a result
        return "no job of the sweep wrote a result", status
    return table.drop(columns=["overrides"]).to_string(index=False, na_rep="-"), status  # "-": no value


def succeeded(table: pd.DataFrame) -> bool:
    """At least one job has a result: it trained now, or it had a finished run from before."""
    return bool(table["status"].isin(["FINISHED", "SKIPPED"]).any())


def _register_candidate(store: tracking.Store, name: str, run_id: str) -> None:
    """The best child's model as `name@candidate` (`registry.register_candidate`); a registry failure
    loses nothing, so it only warns."""
    try:
        registry.register_candidate(store, name, run_id)
    except TransferlabError as exc:
        log.warning("best child not registered (%s): `transferlab promote %s --alias candidate`", exc, run_id)
