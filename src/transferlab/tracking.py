"""The one owner of MLflow: the store, runs (new, resumed, child, reopened), tags and artifacts.

Stages and the sweep code call these and never `mlflow.*` directly. The default store is
`sqlite:///<project>/mlruns/mlflow.db` with artifacts under `<project>/mlruns/artifacts`;
`MLFLOW_TRACKING_URI` (or `mlflow.tracking_uri`) points runs at a shared `mlflow server`.

`open_store` opens a store once per process (tracking URI plus experiment). A `Run` is bound
to its run id: its log methods write to that run whatever run MLflow holds active, so a sweep
job's child and its parent can never be mixed up.

A tracking server is checked before any work starts (`/health`, a few seconds): unreachable, it
stops the command with one line naming the URI. MLflow's own HTTP retries (about 4 minutes per
call by default) are bounded (`HTTP_LIMITS`, unless set in the environment), so losing the
server in mid-run fails within seconds instead of hanging; the checkpoint and model on disk stay.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from transferlab import atomic
from transferlab.config import Config, MlflowConfig, config_hash, flatten
from transferlab.errors import TransferlabError, describe, first_line, interrupts_deferred, stops_as_interrupts
from transferlab.paths import StagePaths, tracking_root

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities import Run as MlflowRun
    from mlflow.tracking import MlflowClient

    from transferlab.manifests import SplitDataset

log = logging.getLogger(__name__)

# Tag names, shared by the stages, the sweep code and the tests.
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
TAG_INERT_OVERRIDES = "transferlab.inert_overrides"  # overridden keys with no effect on the run (trainer.py)
TAG_SWEEP_KEYS = "transferlab.sweep_keys"
TAG_SWEEP_DIR = "transferlab.sweep_dir"
TAG_SWEEP_ID = "transferlab.sweep_id"  # the same sweep command on the same project settings
TAG_SWEEPER = "transferlab.sweeper"
TAG_LAUNCHER = "transferlab.launcher"
TAG_PARENT_RUN = "mlflow.parentRunId"
TAG_DVC_EXP_NAME = "transferlab.dvc_exp_name"  # set when the run is a stage of `dvc exp run`
TAG_DVC_EXP_REF = "transferlab.dvc_exp_ref"  # the git ref DVC commits the experiment to, after the run
TAG_DVC_EXP_BASELINE = "transferlab.dvc_exp_baseline"  # the commit the experiment starts from
TAG_DESCRIPTION = "mlflow.note.content"  # the run's description (markdown) in the UI
INPUT_TAG_DATA_SOURCE = "transferlab.data_source"  # on each dataset input: where the images came from
FIGURE_ARTIFACT_DIR = "figures"  # a run's figures: training curves (train), evaluation figures (evaluate)

# Defaults for MLflow's HTTP client (a dead server: about 7 s per call; a hung one: 4 x 30 s).
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
HEALTH_TIMEOUT_S = 5
# Tries at logging a run's datasets when another run inserts the same one meanwhile (`_lost_insert_race`).
DATASET_LOG_ATTEMPTS = 3


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


def _default_artifact_root(uri: str) -> str | None:
    """Local SQLite stores keep artifacts beside the database; servers decide for themselves."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str) -> None:
    """Bound MLflow's HTTP retries and, for a tracking server, check that it answers."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    if not is_server(uri):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S) as response:
            response.read()
    except (OSError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise TransferlabError(
            f"MLflow tracking server {uri} is unreachable ({first_line(reason)}): start it, or unset "
            "MLFLOW_TRACKING_URI / mlflow.tracking_uri to use the project's own store"
        ) from exc


def _answers(uri: str) -> bool:
    try:
        check_reachable(uri)
    except TransferlabError:
        return False
    return True


@contextmanager
def _losing_the_server(uri: str) -> Iterator[None]:
    """A run whose tracking server went away ends with one line naming it, not MLflow's traceback."""
    try:
        yield
    except TransferlabError:
        raise
    except Exception as exc:
        if is_server(uri) and not _answers(uri):
            raise TransferlabError(
                f"lost the MLflow tracking server {uri} during the run: what it finished is on disk "
                "(checkpoints/, models/, reports/); when the server is back, run the same command again "
                "to resume and log the rest"
            ) from exc
        raise


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


def _experiment_id(uri: str, experiment: str) -> str:
    """The id of `experiment` in the store at `uri`, created (with its artifact location) if needed."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        with interrupts_deferred(), _store_lock(uri):
            found = mlflow.get_experiment_by_name(experiment)
            if found is not None:
                return found.experiment_id
            return mlflow.create_experiment(experiment, artifact_location=_default_artifact_root(uri))
    except Exception as exc:  # MLflow raises many types for an unreachable or broken store
        raise TransferlabError(f"MLflow store {uri} is not usable: {first_line(exc)}") from exc


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
class DvcExperiment:
    """The DVC experiment a stage command runs in: `dvc exp run` (DVC 3) passes its name and
    baseline commit to every stage command as DVC_EXP_NAME and DVC_EXP_BASELINE_REV."""

    name: str
    baseline: str

    @classmethod
    def current(cls) -> DvcExperiment | None:
        name, baseline = os.environ.get("DVC_EXP_NAME"), os.environ.get("DVC_EXP_BASELINE_REV")
        return cls(name, baseline) if name and baseline else None

    @property
    def ref(self) -> str:
        """Where DVC commits the experiment when it has run: `git rev-parse <ref>` gives its commit."""
        return f"refs/exps/{self.baseline[:2]}/{self.baseline[2:]}/{self.name}"

    def tags(self) -> dict[str, str]:
        return {TAG_DVC_EXP_NAME: self.name, TAG_DVC_EXP_REF: self.ref, TAG_DVC_EXP_BASELINE: self.baseline}


def base_tags(cfg: Config, root: Path) -> dict[str, str]:
    """Tags every training run carries (the stage adds TF version, device, manifest hash).

    `transferlab.git_commit` is the commit checked out when the run starts. In a DVC experiment
    that is the experiment's baseline (its params differ, so `git_dirty` is true); DVC commits the
    experiment itself only after the run, under the ref in `transferlab.dvc_exp_ref`.
    """
    experiment = DvcExperiment.current()
    return {TAG_CONFIG_HASH: config_hash(cfg), **git_state(root), **(experiment.tags() if experiment else {})}


def default_run_name(cfg: Config) -> str:
    """A DVC experiment's run is named after the experiment; other runs after backbone and data."""
    experiment = DvcExperiment.current()
    return experiment.name if experiment else f"{cfg.model.backbone}-{cfg.data.name}"


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


def results_line(paths: StagePaths, record: RunRecord) -> str:
    """Where the pipeline's results are: the test metrics, figures and model, and the MLflow run
    that holds them (the last line of evaluate, and of `transferlab repro` when evaluate did not run)."""
    return (
        f"results: {paths.metrics}, {paths.figures}/ and {paths.model_file}; "
        f"MLflow run {record.run_id} in {record.tracking_uri}"
    )


class Run:
    """One MLflow run, addressed by its id."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    @property
    def record(self) -> RunRecord:
        return RunRecord(self.run_id, self.store.uri, self.store.experiment_id)

    @property
    def _client(self) -> MlflowClient:
        return self.store.client

    def log_config(self, cfg: Config) -> None:
        """The flattened config as params; a resumed run keeps the ones it has (MLflow refuses changes)."""
        from mlflow.entities import Param

        existing = self.params()
        values = flatten(cfg.resolved())  # data.image_size: the size trained at, also when left null
        params = [Param(k, "None" if v is None else str(v)) for k, v in values.items() if k not in existing]
        for start in range(0, len(params), 100):  # MLflow's batch limit
            self._client.log_batch(self.run_id, params=params[start : start + 100])

    def params(self) -> dict[str, str]:
        return dict(self._client.get_run(self.run_id).data.params)

    def metrics(self) -> dict[str, float]:
        """The latest value of every metric of the run."""
        return dict(self._client.get_run(self.run_id).data.metrics)

    def logged_steps(self, metric: str) -> set[int]:
        """Steps of `metric` already in the store (a resumed run must not log them twice)."""
        return {m.step for m in self._client.get_metric_history(self.run_id, metric)}

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def set_tag(self, key: str, value: str) -> None:
        self._client.set_tag(self.run_id, key, value)

    def delete_tag(self, key: str) -> None:
        """Remove a tag if the run has it."""
        if key in self._client.get_run(self.run_id).data.tags:
            self._client.delete_tag(self.run_id, key)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def log_dict(self, payload: Mapping[str, Any], artifact_file: str) -> None:
        self._client.log_dict(self.run_id, dict(payload), artifact_file)

    def log_table(self, table: pd.DataFrame, artifact_file: str) -> None:
        """An MLflow table (the UI shows it); one logged before is replaced (MLflow would append to it)."""
        folder = posixpath.dirname(artifact_file) or None
        if artifact_file in {a.path for a in self._client.list_artifacts(self.run_id, folder)}:
            text = table.to_json(orient="split", index=False, date_format="iso")  # what log_table writes
            self._client.log_text(self.run_id, text, artifact_file)
        else:
            self._client.log_table(self.run_id, table, artifact_file)

    def log_model(self, model_file: Path, classes: list[str], image_size: int) -> str:
        """Log the Keras model as a servable pyfunc model named `model` (see transferlab.serving).

        The run need not be active. Returns the logged model's URI, `models:/<model_id>`.
        """
        from transferlab.serving import log_image_classifier

        run = self._client.get_run(self.run_id)
        with interrupts_deferred():
            return log_image_classifier(model_file, classes, image_size, self._client, run).model_uri

    def log_datasets(self, datasets: Sequence[SplitDataset]) -> None:
        """The splits as dataset inputs ("Datasets used" in the UI); MLflow keeps each one once per run."""
        import mlflow
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.exceptions import MlflowException
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = []
        for split in datasets:
            with warnings.catch_warnings():  # a relative path "can be interpreted in multiple ways" (all local)
                warnings.simplefilter("ignore")
                dataset = mlflow.data.from_pandas(
                    split.frame, source=split.source, name=split.name, digest=split.digest, targets="label"
                )
            tags = [InputTag(MLFLOW_DATASET_CONTEXT, split.context), InputTag(INPUT_TAG_DATA_SOURCE, split.data_source)]
            # `_to_mlflow_entity` is how mlflow.log_input itself turns a dataset into a run input.
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags))
        for attempt in range(1, DATASET_LOG_ATTEMPTS + 1):
            try:
                self._client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException as exc:
                if attempt == DATASET_LOG_ATTEMPTS or not _lost_insert_race(exc):
                    raise
                log.info("another run logged the same dataset at the same moment: logging the inputs again")

    @property
    def description(self) -> str:
        return self._client.get_run(self.run_id).data.tags.get(TAG_DESCRIPTION, "")

    @description.setter
    def description(self, markdown: str) -> None:
        self.set_tag(TAG_DESCRIPTION, markdown)

    def discard_logged_models(self) -> list[str]:
        """Delete the models an earlier, killed attempt of this run logged (READY or stuck PENDING),
        so a resumed run ends with one model. Returns their ids."""
        found = self._client.search_logged_models(
            [self.store.experiment_id], filter_string=f"source_run_id = '{self.run_id}'"
        )
        for model in found:
            self._client.delete_logged_model(model.model_id)
            log.info("deleted model %s (%s) of an earlier attempt of run %s", model.model_id, model.status, self.run_id)
        return [model.model_id for model in found]

    def terminate(self, status: str) -> None:
        self._client.set_terminated(self.run_id, status=status)


class Store:
    """An MLflow tracking store and the experiment this project's runs go to."""

    def __init__(self, uri: str, experiment_id: str | None) -> None:
        self.uri = uri
        self.experiment_id = experiment_id  # None: a store opened for the model registry only
        self._client: MlflowClient | None = None

    @classmethod
    def of_record(cls, record: RunRecord) -> Store:
        """The store a recorded run lives in (checked like `open_store` checks its store)."""
        check_reachable(record.tracking_uri)
        return cls(record.tracking_uri, record.experiment_id)

    @property
    def client(self) -> MlflowClient:
        """The store's MlflowClient; each of its calls runs whole (see `_Uninterrupted`)."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = cast("MlflowClient", _Uninterrupted(MlflowClient(tracking_uri=self.uri)))
        return self._client

    def run(self, run_id: str) -> Run:
        """A handle on an existing run (no check that it exists)."""
        return Run(self, run_id)

    def find_run(self, run_id: str) -> MlflowRun | None:
        """The run (its info, params, metrics and tags), or None if it does not exist."""
        try:
            return self.client.get_run(run_id)
        except Exception:
            return None

    def run_status(self, run_id: str) -> str | None:
        """RUNNING / FINISHED / FAILED / KILLED, or None if the run does not exist."""
        found = self.find_run(run_id)
        return found.info.status if found else None

    def search(self, filter_string: str, max_results: int = 1) -> list[str]:
        """Ids of this experiment's runs matching `filter_string`, newest first."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=filter_string, max_results=max_results, order_by=["start_time DESC"]
        )
        return [run.info.run_id for run in runs]

    @contextmanager
    def start_run(
        self,
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        system_metrics: bool = False,
    ) -> Iterator[Run]:
        """Start (or with `run_id`, resume) the active run.

        It ends FINISHED; KILLED on Ctrl-C or SIGTERM; FAILED on any other exception. The
        `transferlab.error` tag says why; a resumed run drops the one of its earlier attempt.
        """
        with self._active_run(
            resumed=run_id is not None,
            run_id=run_id,
            experiment_id=None if run_id else self.experiment_id,
            run_name=None if run_id else run_name,
            parent_run_id=parent_run_id,
            tags=dict(tags or {}),
            log_system_metrics=system_metrics and _psutil_available(),
        ) as run:
            yield run

    @contextmanager
    def reopen_run(self, run_id: str) -> Iterator[Run]:
        """Log more into a finished run (evaluate adds test metrics to the training run).

        The run is active meanwhile: it ends FINISHED again, KILLED on Ctrl-C or SIGTERM, or
        FAILED if the block fails (with the `transferlab.error` tag, as `start_run`).
        """
        if self.run_status(run_id) is None:
            raise TransferlabError(f"MLflow run {run_id} not found in {self.uri}: run `dvc repro train` again")
        with self._active_run(resumed=True, run_id=run_id) as run:
            yield run

    @contextmanager
    def _active_run(self, *, resumed: bool, **start: Any) -> Iterator[Run]:
        """`mlflow.start_run(**start)` for the block, ended here rather than by MLflow's context,
        which says FAILED on any exception, Ctrl-C included.

        The run ends FINISHED; KILLED on Ctrl-C or SIGTERM; FAILED on any other exception, with
        `describe(exc)` in the `transferlab.error` tag (a resumed run first drops the old one).
        Starting and ending run whole: an interrupt meanwhile waits for them.
        """
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        with _losing_the_server(self.uri):
            with interrupts_deferred():
                run = Run(self, mlflow.start_run(**start).info.run_id)
                if resumed:
                    run.delete_tag(TAG_ERROR)  # the reason an earlier attempt stopped
            try:
                with stops_as_interrupts():
                    yield run
            except BaseException as exc:
                with interrupts_deferred():
                    if self._reachable():
                        run.set_tag(TAG_ERROR, describe(exc))  # the UI says why the run ended
                    mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
                raise
            with interrupts_deferred():
                mlflow.end_run("FINISHED")

    @contextmanager
    def killed_if_interrupted(self, run_id: str) -> Iterator[None]:
        """Work for an ended run that does not reopen it for its whole length (evaluate scoring the
        test split): Ctrl-C or SIGTERM meanwhile ends the run KILLED with the reason, as if it had
        been open; whatever reopens it later ends it FINISHED again and drops the reason."""
        try:
            with stops_as_interrupts():
                yield
        except KeyboardInterrupt as exc:
            with interrupts_deferred():
                if self._reachable():
                    self.client.set_tag(run_id, TAG_ERROR, describe(exc))
                    self.client.set_terminated(run_id, "KILLED")
            raise

    def _reachable(self) -> bool:
        """False for a tracking server that stopped answering: one call fewer to wait for."""
        return not is_server(self.uri) or _answers(self.uri)

    def logged_model_uri(self, run_id: str) -> str | None:
        """`models:/<model_id>` of the model named `model` that run `run_id` logged, if any."""
        with _registry_errors(f"run {run_id}"):
            run = self.client.get_run(run_id)
            found = self.client.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run_id}' AND name = 'model'",
                max_results=1,
            )
        return f"models:/{found[0].model_id}" if found else None

    def version_of_run(self, name: str, run_id: str) -> str | None:
        """The newest version of registered model `name` that holds run `run_id`'s model, if any."""
        with _registry_errors(f"registered model {name}"):
            found = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        return str(max(int(v.version) for v in found)) if found else None

    def register_version(self, name: str, model_uri: str, run_id: str) -> str:
        """A new version of registered model `name` (created if needed) holding `model_uri`."""
        from mlflow.exceptions import MlflowException

        with _registry_errors(f"registered model {name}"):
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            model_id = model_uri.removeprefix("models:/")
            version = self.client.create_model_version(name, source=model_uri, run_id=run_id, model_id=model_id)
        return str(version.version)

    def model_version_run(self, name: str, version: str) -> str:
        """The run whose model version `version` of `name` holds."""
        with _registry_errors(f"version {version} of registered model {name}"):
            return self.client.get_model_version(name, version).run_id

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version of `name` that `alias` points at, if the alias is set."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point `name@alias` at `version` (moving it from the version that had it)."""
        with _registry_errors(f"registered model {name}"):
            self.client.set_registered_model_alias(name, alias, version)

    def download_model(self, uri: str, destination: Path) -> Path:
        """Download a logged or registered model (`models:/...`, `runs:/...`) into `destination`."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)  # MLflow resolves `models:/` names in the global registry only
        with _registry_errors(uri):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(destination), tracking_uri=self.uri
            )
        return Path(local)

    def create_parent_run(self, name: str, tags: Mapping[str, str], root: Path) -> Run:
        """Open (without activating) the parent run of a sweep; jobs attach children to it."""
        all_tags = {TAG_SWEEP: "parent", **git_state(root), **dict(tags)}
        return Run(self, self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id)

    def reopen_parent_run(self, run_id: str, tags: Mapping[str, str]) -> Run:
        """Set a sweep's earlier parent RUNNING again, with `tags` updated, for a resumed sweep."""
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
        self.client.update_run(run_id, status="RUNNING")
        return Run(self, run_id)

    def failed_child_run(
        self, name: str, parent_run_id: str | None, tags: Mapping[str, str], error: str, details: str | None = None
    ) -> str:
        """The FAILED child of a job: the run its training left (FAILED even if training itself
        finished and evaluate failed), or a new one when none started. `error` becomes the
        `transferlab.error` tag, `details` (a traceback) the artifact `error.txt`."""
        job = tags.get(TAG_JOB)
        query = f"tags.`{TAG_JOB}` = '{job}'"
        existing = self.client.search_runs([self.experiment_id], query, max_results=1) if job else []
        if existing:
            run_id = existing[0].info.run_id
            self.client.set_tag(run_id, TAG_ERROR, error)
        else:
            run_tags = {**dict(tags), TAG_ERROR: error}
            if parent_run_id:
                run_tags[TAG_PARENT_RUN] = parent_run_id
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=run_tags).info.run_id
        if details:
            self.client.log_text(run_id, details, "error.txt")
        if not existing or existing[0].info.status in ("RUNNING", "FINISHED"):
            self.client.set_terminated(run_id, status="FAILED")
        return run_id


@contextmanager
def _registry_errors(subject: str) -> Iterator[None]:
    """MLflow's registry errors as one line naming what was looked for."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise TransferlabError(f"{subject}: {first_line(exc.message)}") from exc


def connect(cfg: MlflowConfig, root: Path) -> Store:
    """The store `cfg` names, for the model registry: no experiment is created, no new local store either."""
    uri = tracking_uri(cfg, root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TransferlabError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}: run this in the project that trained the "
            "model, or set MLFLOW_TRACKING_URI"
        )
    check_reachable(uri)
    return Store(uri, None)


def _lost_insert_race(exc: Exception) -> bool:
    """True for MLflow's SQL store failing a dataset insert on its unique key.

    The store looks a run's datasets up and inserts those it did not find, in one transaction
    that is not serialised: two runs that log the same new dataset at the same moment (started
    together, jobs of a parallel sweep) can both insert it, and the second fails (SQLite: "UNIQUE
    constraint failed", PostgreSQL: "duplicate key value"). Its transaction is rolled back; a retry
    finds the row the other inserted.
    """
    message = str(exc).lower()
    return "unique constraint" in message or "duplicate key" in message


class _Uninterrupted:
    """An MlflowClient whose calls run whole: Ctrl-C and SIGTERM wait until a call returns.

    Interrupted inside a call, a SQLite session can keep the store's write lock, and every later
    call (ending the run KILLED too) fails with "database is locked". A second Ctrl-C does not
    wait (see `errors.interrupts_deferred`), so a call stuck on a network store can still be left.
    """

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            with interrupts_deferred():
                return attribute(*args, **kwargs)

        return call


_open_stores: dict[tuple[str, str], Store] = {}


def open_store(cfg: MlflowConfig, root: Path) -> Store:
    """The store and experiment `cfg` names, created if needed; opened once per process."""
    import mlflow

    uri = tracking_uri(cfg, root)
    key = (uri, cfg.experiment)
    if key not in _open_stores:
        check_reachable(uri)
        _open_stores[key] = Store(uri, _experiment_id(uri, cfg.experiment))
    mlflow.set_tracking_uri(uri)  # the fluent API (active runs, model logging) follows this store
    return _open_stores[key]


def _psutil_available() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True
