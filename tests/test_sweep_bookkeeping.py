"""sweep_bookkeeping.py: finished-run lookup, the summary table and the best child, on a real SQLite store."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from transferlab import tracking
from transferlab.config import MlflowConfig
from transferlab.sweep_bookkeeping import (
    best_row,
    describe_best,
    find_finished_run,
    finish_parent_run,
    summary_table,
)


def _row(job: int, val_accuracy: float | None, val_loss: float | None) -> dict:
    return {"job": job, "status": "FINISHED", "val_accuracy": val_accuracy, "val_loss": val_loss}


def test_best_row_prefers_accuracy_then_lower_loss_and_skips_unscored_jobs() -> None:
    table = pd.DataFrame([_row(0, 0.8, 0.5), _row(1, 0.9, 0.7), _row(2, 0.9, 0.4), _row(3, None, None)])
    assert best_row(table)["job"] == 2
    assert best_row(pd.DataFrame([_row(0, 0.9, None), _row(1, 0.9, 0.3)]))["job"] == 1
    assert best_row(pd.DataFrame([_row(0, None, None)])) is None


def test_the_best_child_is_named_with_the_tie_its_loss_broke() -> None:
    rows = [_row(0, 0.9, 0.7), _row(1, 0.8, 0.2), _row(2, 0.9, 0.4), _row(3, 0.9, 0.5)]
    table = pd.DataFrame([{**row, "lr": 0.1 * row["job"], "run_id": f"r{row['job']}"} for row in rows])
    line = describe_best(table, best_row(table), ["lr"])
    assert line == (
        "best child: job 2 (lr=0.2): validation accuracy 0.9000, loss 0.4000; MLflow run r2"
        " (tied on accuracy with job 0, 3: the lower validation loss chose it)"
    )
    alone = table[table["job"] != 0].assign(val_accuracy=[0.8, 0.9, 0.85])
    assert describe_best(alone, best_row(alone), []) == (
        "best child: job 2: validation accuracy 0.9000, loss 0.4000; MLflow run r2"
    )


def test_only_evaluated_finished_runs_count_as_done(tmp_path: Path) -> None:
    store = tracking.open_store(MlflowConfig(system_metrics=False), tmp_path)
    tags = {tracking.TAG_CONFIG_HASH: "h1"}
    with store.start_run(run_name="trained only", tags=tags):
        pass
    assert find_finished_run(store, "h1") is None
    assert find_finished_run(store, "h1", evaluated=False) is not None
    with store.start_run(run_name="evaluated", tags=tags) as run:
        run.log_metrics({"test_accuracy": 0.75})
    assert find_finished_run(store, "h1") == run.run_id
    assert find_finished_run(store, "other") is None


def test_summary_reads_each_jobs_metrics_from_its_run(tmp_path: Path) -> None:
    store = tracking.open_store(MlflowConfig(system_metrics=False), tmp_path)
    with store.start_run(run_name="job") as run:
        run.log_metrics({"final_val_accuracy": 0.8, "final_val_loss": 0.4, "test_accuracy": 0.7})
    rows = [
        {"job": 0, "overrides": "a=1", "status": "FINISHED", "run_id": run.run_id, "a": "1"},
        {"job": 1, "overrides": "a=2", "status": "FAILED", "run_id": None, "a": "2", "error": "ConfigError: x"},
    ]
    table = summary_table(store, rows, ["a"])
    assert list(table.columns[:2]) == ["job", "a"]
    assert table.loc[0, "val_accuracy"] == 0.8 and table.loc[0, "test_accuracy"] == 0.7
    assert math.isnan(table.loc[1, "val_accuracy"]) and table.loc[1, "error"] == "ConfigError: x"


def test_a_stopped_sweep_ends_the_children_its_workers_left_running(tmp_path: Path) -> None:
    """joblib ends its workers with SIGKILL when the sweep gets Ctrl-C or SIGTERM: their runs
    stayed RUNNING (issue 12). The parent closes them with its own status."""
    store = tracking.open_store(MlflowConfig(system_metrics=False), tmp_path)
    parent = store.create_parent_run("sweep", {}, tmp_path)
    child = {tracking.TAG_PARENT_RUN: parent.run_id}
    running = store.client.create_run(store.experiment_id, tags=child).info.run_id
    done = store.client.create_run(store.experiment_id, tags=child).info.run_id
    store.client.set_terminated(done, "FINISHED")
    summary, _ = finish_parent_run(parent.record, [], tmp_path / "summary.csv", status="KILLED")
    assert summary == "no job of the sweep wrote a result"  # not pandas' "Empty DataFrame ..."
    assert store.run_status(parent.run_id) == "KILLED"
    assert store.run_status(running) == "KILLED"
    assert store.client.get_run(running).data.tags[tracking.TAG_ERROR] == "stopped with its sweep (KILLED)"
    assert store.run_status(done) == "FINISHED"
