"""Hydra jobs and sweeps: one MLflow parent run per sweep, one child run per job.

`SweepTracker` (a Hydra callback, enabled in conf/config.yaml) opens the parent run when a
multirun starts and writes its id into the sweep folder, where every job finds it, also jobs
in other processes (joblib launcher). When the sweep ends it logs a summary table to the
parent and tags the best child by validation accuracy. `run_job` is the task of every job:
it skips configs that already have a FINISHED run (`sweep.skip_finished`), records a failing
job as a FAILED child and lets the sweep go on, and frees Keras state between jobs.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from transferlab import tracking
from transferlab.config import Config, MlflowConfig, config_hash, from_omegaconf
from transferlab.errors import TransferlabError
from transferlab.paths import StagePaths, project_root

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent_run.json"
RESULT_FILE = "job_result.json"
SUMMARY_FILE = "sweep_summary.csv"
FAILED_VALUE = float("nan")  # Optuna records a NaN objective as a failed trial


def _mlflow_section(node: DictConfig) -> MlflowConfig:
    raw = OmegaConf.to_container(node.get("mlflow", {}), resolve=True) or {}
    try:
        return MlflowConfig(**raw)  # type: ignore[arg-type]
    except TypeError:
        return MlflowConfig()


class SweepTracker(Callback):
    """Hydra callback that owns the parent run of a multirun."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        name = f"sweep-{sweep_dir.name}"
        args = " ".join(config.hydra.overrides.task)
        run = tracking.create_parent_run(
            _mlflow_section(config), project_root(), name, {tracking.TAG_OVERRIDES: args, "sweep_dir": str(sweep_dir)}
        )
        (sweep_dir / PARENT_FILE).write_text(json.dumps(run.__dict__))
        log.info("sweep parent run %s (%s)", run.run_id, name)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        parent = _read_parent(sweep_dir)
        if parent is None:
            return
        rows = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"*/{RESULT_FILE}"))]
        rows.sort(key=lambda r: r["job"])
        summary = tracking.finish_parent_run(parent, rows, sweep_dir / SUMMARY_FILE)
        log.info("sweep summary (%d jobs) in %s", len(rows), sweep_dir / SUMMARY_FILE)
        for line in summary.splitlines():
            log.info("%s", line)


def _read_parent(sweep_dir: Path) -> tracking.RunRecord | None:
    path = sweep_dir / PARENT_FILE
    if not path.is_file():
        return None
    return tracking.RunRecord(**json.loads(path.read_text()))


def _train_and_evaluate(
    cfg: Config, paths: StagePaths, name: str, parent: str | None, tags: dict[str, str]
) -> tuple[str, float]:
    from transferlab.stages.evaluate import evaluate
    from transferlab.stages.train import train

    result = train(cfg, paths, run_name=name, parent_run_id=parent, extra_tags=tags)
    evaluate(cfg, paths)
    return result.run_id, result.val_accuracy


def _free_memory() -> None:
    """Drop Keras graphs and models so memory stays flat from job to job."""
    if "keras" in sys.modules:
        import keras

        keras.backend.clear_session(free_memory=True)
    gc.collect()


def run_job(node: DictConfig) -> float:
    """Task of every Hydra job; returns the validation accuracy (the Optuna objective)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    output_dir = Path(hydra_cfg.runtime.output_dir)
    paths = StagePaths(root=project_root(), output_root=output_dir)
    tags = {tracking.TAG_OVERRIDES: " ".join(overrides), tracking.TAG_JOB: uuid.uuid4().hex}
    name = ",".join(overrides) or "defaults"

    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            cfg = from_omegaconf(node)
            return _train_and_evaluate(cfg, paths, name, None, tags)[1]
        except TransferlabError as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            sys.exit(2)

    parent = _read_parent(Path(hydra_cfg.sweep.dir))
    parent_id = parent.run_id if parent else None
    started = time.time()
    record: dict[str, Any] = {"job": hydra_cfg.job.num, "overrides": " ".join(overrides), "output_dir": str(output_dir)}
    try:
        cfg = from_omegaconf(node)
        done = None
        if cfg.sweep.skip_finished:
            experiment_id = tracking.configure(cfg.mlflow, paths.root)
            done = tracking.find_finished_run(experiment_id, config_hash(cfg))
        if done is not None:
            log.info("skipping %s: config already has FINISHED run %s", name, done)
            record.update(status="SKIPPED", run_id=done, val_accuracy=tracking.final_val_accuracy(done))
        else:
            run_id, val_accuracy = _train_and_evaluate(cfg, paths, name, parent_id, tags)
            record.update(status="FINISHED", run_id=run_id, val_accuracy=val_accuracy)
    except Exception as exc:  # one failing job (bad value, out of memory) must not end the sweep
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.error("job %s failed: %s", name, message)
        run_id = tracking.failed_child_run(
            _mlflow_section(node), paths.root, name, parent_id, tags, message, job_tag=tags[tracking.TAG_JOB]
        )
        record.update(status="FAILED", run_id=run_id, val_accuracy=None, error=message)
    finally:
        _free_memory()
    record["duration_s"] = round(time.time() - started, 1)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULT_FILE).write_text(json.dumps(record, indent=1))
    value = record.get("val_accuracy")
    return float(value) if value is not None and not math.isnan(value) else FAILED_VALUE
