"""Hydra jobs and sweeps: one MLflow parent run per sweep, one child run per job.

`SweepTracker` (a Hydra callback, enabled in conf/config.yaml) opens the parent run when a
multirun starts and writes it, with the config keys the sweep varies, into the sweep folder,
where every job finds it, also jobs in other processes (joblib launcher). When the sweep ends
it logs a summary table to the parent and tags the best child by validation accuracy; a sweep
that stops early (Ctrl-C, a crashed sweeper) still gets its parent closed with what finished.
`run_job` is the task of every job: it names the child run by the overrides the sweep varies,
skips configs that already have a FINISHED run (`sweep.skip_finished`), records a failing job
as a FAILED child with its error and lets the sweep go on, and frees Keras state between jobs.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import json
import logging
import math
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from transferlab import atomic, figure_workers, sweep_bookkeeping, sweep_configs, tracking
from transferlab.config import Config, MlflowConfig, config_hash, from_omegaconf, validate_section
from transferlab.errors import (
    describe,
    interrupted,
    run_reporting_errors,
    stop_if_received,
    stop_sweep_on_error,
    stops_as_interrupts,
    stops_handled,
    strip_ansi,
)
from transferlab.job_logs import optuna_logs_as_ours, quiet_job_logs
from transferlab.manifests import load_classes
from transferlab.paths import StagePaths, project_root
from transferlab.ray_launcher import exit_worker_on_sigterm, leave_cluster, placement_tags

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent_run.json"
RESULT_FILE = "job_result.json"
ERROR_FILE = "error.txt"  # a failed job's traceback, in its folder and in its MLflow run
SUMMARY_FILE = "sweep_summary.csv"
# What a failed job returns: the worst possible accuracy. Not NaN: Optuna 2.10 turns a NaN
# objective into a ValueError inside the Hydra Optuna sweeper, which then ends the whole sweep.
FAILED_VALUE = 0.0
# Files Hydra writes into the sweep folder that the parent run keeps as artifacts.
SWEEP_FILES = ("multirun.yaml", "optimization_results.yaml")

_interrupted = False  # a job saw Ctrl-C or SIGTERM: the parent ends KILLED rather than FAILED
_sweep_status: str | None = None  # how the last sweep's parent ended (this process ran its callback)


@dataclass(frozen=True)
class SweepInfo:
    """What the callback hands every job through the sweep folder."""

    parent: tracking.RunRecord
    keys: tuple[str, ...]  # config keys the sweep varies; child runs are named by them
    registered_model: str | None = None  # the best child's model goes there, alias `candidate`

    def write(self, sweep_dir: Path) -> None:
        payload = {**self.parent.__dict__, "sweep_keys": list(self.keys), "registered_model": self.registered_model}
        atomic.write_text(sweep_dir / PARENT_FILE, json.dumps(payload, indent=1) + "\n")

    @classmethod
    def read(cls, sweep_dir: Path) -> SweepInfo | None:
        path = sweep_dir / PARENT_FILE
        if not path.is_file():
            return None
        payload = json.loads(path.read_text())
        keys = tuple(payload.pop("sweep_keys", ()))
        registered_model = payload.pop("registered_model", None)
        return cls(tracking.RunRecord(**payload), keys, registered_model)


def _mlflow_section(node: DictConfig) -> MlflowConfig:
    """The job's `mlflow` section, validated on its own (the rest of the config may be invalid)."""
    raw = OmegaConf.to_container(node.get("mlflow", {}), resolve=True) or {}
    return validate_section("mlflow", raw)


def sweep_keys(task_overrides: Sequence[str], sweeper_params: dict[str, str] | None) -> list[str]:
    """Config keys a multirun varies: sweeps among the command-line overrides
    (`a=1,2`, `choice(...)`, `interval(...)`) and in the sweeper's `params` (Optuna's search
    space), minus any key the command line fixes to one value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    varies: dict[str, bool] = {}
    for key, value in (sweeper_params or {}).items():
        varies[key] = parser.parse_override(f"{key}={value}").is_sweep_override()
    for override in parser.parse_overrides(list(task_overrides)):
        varies[override.key_or_group] = override.is_sweep_override()
    return [key for key, sweep in varies.items() if sweep]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def job_name_and_tags(task_overrides: Sequence[str], keys: Sequence[str]) -> tuple[str, dict[str, str]]:
    """The child run's name (the overrides the sweep varies, else all of them) and one tag per override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    tags = {f"{tracking.TAG_OVERRIDE_PREFIX}{o.key_or_group}": o.get_value_element_as_str() for o in parsed}
    named = [o for o in parsed if o.key_or_group in keys] or parsed
    name = " ".join(f"{o.key_or_group}={_short(o.value())}" for o in named) or "defaults"
    return name, tags


class SweepTracker(Callback):
    """Hydra callback that owns the parent run of a multirun."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        params = config.hydra.sweeper.get("params")
        task = list(config.hydra.overrides.task)
        keys = sweep_keys(task, {str(k): str(v) for k, v in params.items()} if params else None)
        sweeper = str(config.hydra.sweeper.get("_target_", "")).rsplit(".", 1)[-1]
        launcher = str(config.hydra.launcher.get("_target_", "")).rsplit(".", 1)[-1]
        name = f"{'optuna' if 'Optuna' in sweeper else 'sweep'}-{sweep_dir.name}"
        if "Optuna" in sweeper:  # before Hydra creates the sweeper, whose study logs its first line
            optuna_logs_as_ours()
        tags = {
            tracking.TAG_OVERRIDES: " ".join(task),
            tracking.TAG_SWEEP_KEYS: " ".join(keys),
            tracking.TAG_SWEEP_DIR: str(sweep_dir.resolve()),
            tracking.TAG_SWEEPER: sweeper,
            tracking.TAG_LAUNCHER: launcher,
        }
        tags[tracking.TAG_SWEEP_ID] = _sweep_id(config, task)
        root = project_root()
        mlflow_cfg = _mlflow_section(config)
        store = stop_sweep_on_error(lambda: tracking.open_store(mlflow_cfg, root))
        earlier = sweep_bookkeeping.find_sweep_parent(store, tags[tracking.TAG_SWEEP_ID])
        if earlier and config.sweep.get("skip_finished", True):
            parent = store.reopen_parent_run(earlier, tags)
            log.info("resuming sweep parent run %s: jobs with a FINISHED child there are skipped", earlier)
        else:
            parent = store.create_parent_run(name, tags, root)
        if not (sweep_dir / SWEEP_FILES[0]).is_file():  # the basic sweeper writes it, Optuna's does not
            OmegaConf.save(config, sweep_dir / SWEEP_FILES[0])
        registered_model = mlflow_cfg.registered_model if mlflow_cfg.log_model else None
        SweepInfo(parent.record, tuple(keys), registered_model).write(sweep_dir)
        atexit.register(_close_unfinished, sweep_dir)
        log.info("sweep parent run %s, varying %s", parent.run_id, ", ".join(keys) or "nothing")
        figure_workers.start()  # jobs that run in this process (the basic launcher) draw there
        sweep_configs.compose_each_job_once(config)  # before Hydra makes the sweeper, which validates

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        atexit.unregister(_close_unfinished)
        figure_workers.stop()
        sweep_configs.compose_as_before()
        _close_parent(sweep_dir, "FINISHED")


def _sweep_id(config: DictConfig, task: Sequence[str]) -> str:
    params = config.hydra.sweeper.get("params")
    base = OmegaConf.to_container(config, resolve=False)
    sweeper = OmegaConf.to_container(params, resolve=False) if params else {}
    return sweep_bookkeeping.sweep_id(task, base, sweeper)


def _close_parent(sweep_dir: Path, status: str) -> None:
    """Summarise the jobs that wrote a result and end the parent run with `status` (FAILED if none has one)."""
    global _sweep_status
    info = SweepInfo.read(sweep_dir)
    if info is None:
        return
    rows = [json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{RESULT_FILE}")]
    rows.sort(key=lambda r: r["job"])
    extra = [sweep_dir / name for name in SWEEP_FILES if (sweep_dir / name).is_file()]
    summary, _sweep_status = sweep_bookkeeping.finish_parent_run(
        info.parent, rows, sweep_dir / SUMMARY_FILE, info.keys, status, extra, info.registered_model
    )
    for line in summary.splitlines():
        log.info("%s", line)
    where = sweep_dir / SUMMARY_FILE
    log.info("sweep summary: %s; MLflow parent run %s (%s)", where, info.parent.run_id, _sweep_status)
    if _sweep_status == "FAILED" and status == "FINISHED":
        log.error("no job of the sweep finished: the errors are in the summary's error column")


def sweep_exit_status() -> int:
    """Exit status of `transferlab-train -m`: 1 when the sweep's parent ended FAILED (no job finished)."""
    return 1 if _sweep_status == "FAILED" else 0


def _close_unfinished(sweep_dir: Path) -> None:
    """atexit: the sweep stopped before `on_multirun_end` (Ctrl-C, SIGTERM, a crash): close its parent."""
    status = "KILLED" if _interrupted or interrupted() else "FAILED"
    try:
        leave_cluster()  # a Ray sweep's jobs end first: nothing runs on in a run closed here
        figure_workers.stop()  # the figures and test metrics of jobs that finished reach MLflow
        _close_parent(sweep_dir, status)
    except Exception as exc:  # the interpreter is shutting down; never mask the original error
        print(f"could not close the sweep's MLflow parent run: {exc}", file=sys.stderr)


def _train_and_evaluate(
    cfg: Config, paths: StagePaths, name: str, parent: str | None, tags: dict[str, str]
) -> tuple[str, float]:
    from transferlab.runtime import worker_role
    from transferlab.stages.evaluate import evaluate
    from transferlab.stages.train import train

    tags = {**tags, **_inert_override_tags(cfg, tags)}
    result = train(cfg, paths, run_name=name, parent_run_id=parent, extra_tags=tags, register_model=parent is None)
    trained = result.classifier
    if worker_role(cfg.train).is_chief:  # multi_worker: the other workers only train along
        evaluate(cfg, paths, model=trained.model if trained else None, features=trained.features if trained else None)
    return result.run_id, result.val_accuracy


def _inert_override_tags(cfg: Config, tags: dict[str, str]) -> dict[str, str]:
    """Warn, in one line, of the job's overrides (its `transferlab.override.<key>` tags) that have no
    effect under its config (`trainer.inert_settings`); the tag naming them, or none."""
    from transferlab.trainer import describe_inert, inert_settings

    overridden = {
        key.removeprefix(tracking.TAG_OVERRIDE_PREFIX) for key in tags if key.startswith(tracking.TAG_OVERRIDE_PREFIX)
    }
    inert = {key: reason for key, reason in inert_settings(cfg).items() if key in overridden}
    if not inert:
        return {}
    log.warning("%s", describe_inert(inert))
    return {tracking.TAG_INERT_OVERRIDES: " ".join(inert)}


def free_memory() -> None:
    """Drop the finished job's Keras models and traced graphs so memory stays flat from job to job."""
    if "keras" in sys.modules:
        import keras

        from transferlab.reuse import forget_classifiers

        forget_classifiers()  # the backbone and heads the next job reuses would keep this job's models alive
        keras.backend.clear_session(free_memory=False)
        _drop_custom_gradients()
    gc.collect()
    # What is still alive now (modules, TensorFlow's registries) lives for the whole sweep: exempt
    # it from later collections, so the next job's collection scans only what that job allocated
    # instead of TensorFlow's million objects (half a second of CPU per job).
    gc.freeze()


def _drop_custom_gradients() -> None:
    """Unregister the gradient functions that graph-mode `tf.custom_gradient` calls left behind.

    TensorFlow registers one under a fresh name ("CustomGradient-<n>") in a process-wide
    registry each time such a function is traced (under `tf.distribute`, every traced train
    step does) and never removes it; each one keeps its whole traced graph alive. After a job
    none of its graphs is traced again, so they can go. This is TensorFlow internals, hence
    the defensive lookup: if they move, memory grows again, but nothing breaks.
    """
    try:
        from tensorflow.python.framework import ops

        registry = ops._gradient_registry._registry
    except (ImportError, AttributeError):
        return
    for name in [name for name in registry if name.startswith("CustomGradient-")]:
        del registry[name]


def _rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def run_job(node: DictConfig) -> float:
    """Task of every Hydra job; returns the validation accuracy (the Optuna objective)."""
    quiet_job_logs()
    with stops_handled():  # also in launcher worker processes (joblib, Ray), which start elsewhere
        return _run_job(node)


def _run_job(node: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    output_dir = Path(hydra_cfg.runtime.output_dir)
    paths = StagePaths(root=project_root(), output_root=output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    info = SweepInfo.read(Path(hydra_cfg.sweep.dir)) if multirun else None
    name, tags = job_name_and_tags(overrides, info.keys if info else ())
    tags.update({tracking.TAG_OVERRIDES: " ".join(overrides), tracking.TAG_JOB: uuid.uuid4().hex})
    tags.update(placement_tags())

    if not multirun:
        return _single_run(node, paths, name, tags)

    parent_id = info.parent.run_id if info else None
    if parent_id:
        tags[tracking.TAG_SWEEP] = "child"
    started = time.time()
    record: dict[str, Any] = {"job": hydra_cfg.job.num, "overrides": " ".join(overrides), "output_dir": str(output_dir)}
    for key in info.keys if info else ():  # one summary column per varied key
        record[key] = tags.get(f"{tracking.TAG_OVERRIDE_PREFIX}{key}")
    try:
        with stops_as_interrupts():  # an error that a stop signal caused is the stop
            stop_if_received()
            record.update(_run_or_skip(node, paths, name, parent_id, tags))
    except KeyboardInterrupt:
        global _interrupted
        _interrupted = True
        exit_worker_on_sigterm(name)
        raise
    except Exception as exc:  # one failing job (bad value, out of memory) must not end the sweep
        message = describe(exc)
        details = _keep_traceback(output_dir)
        log.error("job %s failed: %s (traceback: %s)", name, message, output_dir / ERROR_FILE)
        record.update(status="FAILED", run_id=None, val_accuracy=None, error=message)
        try:
            store = tracking.open_store(_mlflow_section(node), paths.root)
            record["run_id"] = store.failed_child_run(name, parent_id, tags, message, details)
        except Exception:  # the store itself failing must not end the sweep either
            log.exception("could not record job %s as a FAILED run in MLflow", name)
    finally:
        free_memory()
    record["duration_s"] = round(time.time() - started, 1)
    record["rss_mb"] = _rss_mb()
    atomic.write_text(output_dir / RESULT_FILE, json.dumps(record, indent=1) + "\n")
    value = record.get("val_accuracy")
    return float(value) if value is not None and not math.isnan(value) else FAILED_VALUE


def _keep_traceback(folder: Path) -> str:
    """The traceback of the exception being handled, as plain text, written to `folder`'s `error.txt`."""
    details = strip_ansi(traceback.format_exc())
    atomic.write_text(folder / ERROR_FILE, details)
    return details


def _single_run(node: DictConfig, paths: StagePaths, name: str, tags: dict[str, str]) -> float:
    """`transferlab-train` without `-m`: a bad config or data prints one line and exits non-zero,
    and the run's folder keeps the traceback (`error.txt`), as a sweep job's does."""
    val_accuracy: list[float] = []

    def task() -> int:
        try:
            val_accuracy.append(_train_and_evaluate(from_omegaconf(node), paths, name, None, tags)[1])
        except Exception:
            _keep_traceback(paths.out)
            raise
        return 0

    status = run_reporting_errors(task)
    if status:
        sys.exit(status)
    return val_accuracy[0]


def _run_or_skip(node: DictConfig, paths: StagePaths, name: str, parent_id: str | None, tags: dict[str, str]) -> dict:
    cfg = from_omegaconf(node)
    if cfg.sweep.skip_finished and parent_id:
        store = tracking.open_store(cfg.mlflow, paths.root)
        done = sweep_bookkeeping.find_finished_run(store, config_hash(cfg), parent_id)
        if done is not None:
            log.info("skipping %s: this sweep already has its FINISHED run %s", name, done)
            accuracy = sweep_bookkeeping.final_val_accuracy(store, done)
            return {"status": "SKIPPED", "run_id": done, "val_accuracy": accuracy}
    deferred = cfg.mlflow.log_model and cfg.sweep.log_models == "best"
    if deferred:  # the sweep logs the best child's model when it ends (sweep_bookkeeping)
        cfg = dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, log_model=False))
    run_id, val_accuracy = _train_and_evaluate(cfg, paths, name, parent_id, tags)
    record = {"status": "FINISHED", "run_id": run_id, "val_accuracy": val_accuracy}
    if deferred:
        record["model_to_log"] = {
            "model_file": str(paths.model_file),
            "classes": load_classes(paths.classes),
            "image_size": cfg.image_size,
        }
    return record
