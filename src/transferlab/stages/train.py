"""Train stage: fit a transfer-learning classifier on the prepared splits, tracked in MLflow.

The phases, their feeds (cached features, cached cut activations or images), early stopping
and calibration live in trainer.py; this module runs them inside one MLflow run: it resumes a
killed run from its checkpoint in the same MLflow run, writes the model, the history and the
curves at the end, describes the run and registers its model. Under `train.strategy=multi_worker`
only the chief does all that; the other workers train along and keep nothing (`_train_as_peer`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from transferlab import atomic, figure_workers, keras_saving, tracking
from transferlab.checkpoint import Checkpointer, CheckpointState
from transferlab.config import Config, config_hash
from transferlab.descriptions import training_description
from transferlab.ensemble import Member, train_ensemble
from transferlab.errors import TransferlabError, stop_if_received
from transferlab.locks import stage_lock
from transferlab.manifests import SplitDataset, check_splits_fresh, load_classes, split_datasets, splits_digest
from transferlab.paths import StagePaths
from transferlab.registry import register_run_model
from transferlab.trainer import HISTORY_COLUMNS, L2_SEARCH_COLUMNS, SavedModelReport, Trainer, log_l2_search

if TYPE_CHECKING:
    from transferlab.model import Classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a finished training run produced."""

    run_id: str
    history: pd.DataFrame
    resumed: bool
    best_epoch: int  # the epoch whose weights the model holds
    classifier: Classifier | None = field(default=None, compare=False, repr=False)  # the trained model, in memory
    saved_model: SavedModelReport | None = None  # calibration and test-time flipping, when on

    @property
    def val_accuracy(self) -> float:
        """The saved model's validation accuracy (`final_val_accuracy`)."""
        return final_validation(self.saved_model, kept_row(self.history, self.best_epoch))[0]


def kept_row(history: pd.DataFrame, epoch: int) -> pd.Series:
    """The history row of the epoch whose weights the saved model holds."""
    return history.loc[history["epoch"] == epoch].iloc[0]


def final_validation(saved_model: SavedModelReport | None, kept: pd.Series) -> tuple[float, float]:
    """The saved model's validation accuracy and loss (`final_val_accuracy`, `final_val_loss`):
    measured after calibration and test-time flipping went in, else the kept epoch's."""
    if saved_model is not None:
        return saved_model.val_accuracy, saved_model.val_loss
    return float(kept["val_accuracy"]), float(kept["val_loss"])


def _resumable_state(store: tracking.Store, checkpointer: Checkpointer, cfg_hash: str) -> CheckpointState | None:
    state = checkpointer.load(cfg_hash)
    if state is None:
        return None
    status = store.run_status(state.run_id)
    if status in (None, "FINISHED"):
        log.info("checkpoint belongs to run %s (%s): starting a new run", state.run_id, status or "missing")
        checkpointer.clear()
        return None
    return state


def train(
    cfg: Config,
    paths: StagePaths,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    register_model: bool = True,
) -> TrainResult:
    """Train, checkpoint every epoch, save `models/model.keras`, log everything to MLflow.

    With `register_model` (not for sweep jobs) the model becomes a new version of
    `mlflow.registered_model`. Under `train.strategy=multi_worker` only the chief does all that;
    the other workers train along (`_train_as_peer`).
    """
    from transferlab.runtime import worker_role

    check_splits_fresh(cfg, paths)
    load_classes(paths.classes)  # fail fast, before MLflow or TensorFlow start
    cfg_hash = config_hash(cfg)
    role = worker_role(cfg.train)
    if not role.is_chief:
        return _train_as_peer(cfg, paths, cfg_hash, role.task)
    with stage_lock(paths.locks, "train"):
        return _train_as_chief(cfg, paths, cfg_hash, role.workers, run_name, parent_run_id, extra_tags, register_model)


def _train_as_chief(
    cfg: Config,
    paths: StagePaths,
    cfg_hash: str,
    workers: int,
    run_name: str | None,
    parent_run_id: str | None,
    extra_tags: Mapping[str, str] | None,
    register_model: bool,
) -> TrainResult:
    """The train stage of a single process, or of the multi_worker chief: everything `train` says."""
    from transferlab.model import local_copy
    from transferlab.runtime import device_description, from_chief, make_strategy, precision_policy
    from transferlab.seeding import seed_everything

    store = tracking.open_store(cfg.mlflow, paths.root)
    checkpointer = Checkpointer(paths.checkpoints)
    resume = _resumable_state(store, checkpointer, cfg_hash)
    strategy = make_strategy(cfg.train, cfg.multi_worker)  # multi_worker: before any other TensorFlow work
    if workers > 1:
        from_chief(strategy, resume.epochs_done if resume else 0, is_chief=True)  # where the peers resume
    seed_everything(cfg.train.seed, cfg.train.deterministic)

    import tensorflow as tf

    tags = {
        **tracking.base_tags(cfg, paths.root),
        tracking.TAG_MANIFEST_HASH: splits_digest(paths),
        tracking.TAG_TF_VERSION: tf.__version__,
        tracking.TAG_DEVICE: device_description(),
        tracking.TAG_STAGE: "train",
        **(extra_tags or {}),
    }
    name = run_name or tracking.default_run_name(cfg)
    with (
        store.start_run(
            run_name=name,
            run_id=resume.run_id if resume else None,
            parent_run_id=parent_run_id,
            tags=tags,
            system_metrics=cfg.mlflow.system_metrics,
        ) as run,
        precision_policy(cfg.train),
    ):
        state = resume or checkpointer.begin(run.run_id, cfg_hash)
        run.log_config(cfg)
        run.log_dict(cfg.to_dict(), "config.yaml")
        datasets = split_datasets(cfg, paths)
        run.log_datasets(datasets)
        members: list[Member] = []
        with strategy.scope():
            trainer = Trainer(cfg, paths, run, state)
            if resume:
                trainer.log_missing_epochs()
            classifier = trainer.train(resumed=resume is not None)
            if cfg.train.ensemble > 1:
                classifier, members = train_ensemble(cfg, paths, run, cfg_hash, trainer, classifier)
        if workers > 1:  # its variables are the workers' collectives: the chief goes on alone, with a copy
            classifier = local_copy(classifier, cfg.model, len(trainer.classes), trainer.image_size)
            strategy = tf.distribute.get_strategy()
        with strategy.scope():
            trainer.refit_head(classifier)
            saved_model = trainer.finish_model(classifier)
        if trainer.refit is not None:
            run.log_metrics(trainer.refit.metrics())
            log_l2_search(run, "refit_search", trainer.refit.search)
        if saved_model is not None and saved_model.temperature is not None:
            _log_calibration(run, saved_model)
        if resume is not None and _saved_by(paths, run.run_id):
            log.info("%s already holds run %s (saved before a kill): closing the run", paths.models, run.run_id)
        else:
            _save_outputs(cfg, paths, run, trainer, classifier, state, datasets, saved_model, members)
        if register_model and cfg.mlflow.log_model and cfg.mlflow.registered_model:
            _register(run, cfg.mlflow.registered_model)
    checkpointer.clear()
    history = pd.DataFrame(state.history, columns=HISTORY_COLUMNS)
    return TrainResult(run.run_id, history, resume is not None, trainer.kept_epoch, classifier, saved_model)


def _log_calibration(run: tracking.Run, saved_model: SavedModelReport) -> None:
    """The temperature and what it did on the validation split."""
    run.log_metrics(
        {
            "temperature": saved_model.temperature,
            "val_ece_uncalibrated": saved_model.val_ece_uncalibrated,
            "val_ece": saved_model.val_ece,
            "val_loss_calibrated": saved_model.val_loss,
        }
    )


def _train_as_peer(cfg: Config, paths: StagePaths, cfg_hash: str, task: str) -> TrainResult:
    """A `multi_worker` worker other than the chief: the same training steps (the collectives
    need every worker), nothing logged, no MLflow run, no model, no calibration.

    Its checkpoints go to a temporary folder of this project and task, deleted at the end (and
    at the start: what a killed worker left). It resumes where the chief resumes, from a copy of
    the chief's checkpoint (`paths.checkpoints`, a folder every worker must see).
    """
    from transferlab.runtime import from_chief, make_strategy, precision_policy
    from transferlab.seeding import seed_everything

    project = hashlib.sha256(str(paths.root.resolve()).encode()).hexdigest()[:12]
    scratch = Path(tempfile.gettempdir()) / f"transferlab-peer-{project}-{task.replace(':', '')}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        own = StagePaths(paths.root, output_root=scratch)
        strategy = make_strategy(cfg.train, cfg.multi_worker)
        epochs_done = from_chief(strategy, 0, is_chief=False)
        state = _peer_state(paths.checkpoints, own.checkpoints, cfg_hash, epochs_done)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        with precision_policy(cfg.train), strategy.scope():
            trainer = Trainer(cfg, own, None, state)
            trainer.train(resumed=epochs_done > 0)
        log.info("multi_worker peer finished; the chief saves and logs the model")
        history = pd.DataFrame(state.history, columns=HISTORY_COLUMNS)
        return TrainResult("", history, epochs_done > 0, trainer.kept_epoch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _peer_state(chief: Path, own: Path, cfg_hash: str, epochs_done: int) -> CheckpointState:
    """A fresh state, or a copy of the chief's checkpoint after `epochs_done` epochs."""
    checkpointer = Checkpointer(own)
    if epochs_done == 0:
        return checkpointer.begin("", cfg_hash)
    shutil.copytree(chief, own, dirs_exist_ok=True)
    state = checkpointer.load(cfg_hash)
    if state is None or state.epochs_done != epochs_done:
        raise TransferlabError(
            f"multi_worker: the chief resumes after epoch {epochs_done} but this worker finds no such checkpoint "
            f"in {chief}: every worker must see the chief's project folder"
        )
    log.info("multi_worker peer resuming after epoch %d from the chief's checkpoint", epochs_done)
    return state


def _save_outputs(
    cfg: Config,
    paths: StagePaths,
    run: tracking.Run,
    trainer: Trainer,
    classifier: Classifier,
    state: CheckpointState,
    datasets: list[SplitDataset],
    saved_model: SavedModelReport | None,
    members: list[Member],
) -> None:
    """Write the model, its run record, the history and the curves as one unit; log them and
    describe the run.

    `models/` (model.keras + run.json), `reports/history.csv` and `reports/training_curves.png`
    are built aside and replaced together as the very last step, so they always hold one run's
    results: the previous run's until then. A sweep job with a figure worker leaves the curves to
    follow it (`figure_workers.follow`): drawn once the rest is in place, and logged while the
    next job trains; a stop meanwhile waits until the rest is in place and the curves are on
    their way.
    """
    history = pd.DataFrame(state.history, columns=HISTORY_COLUMNS)
    with figure_workers.outputs_followed() as follows:
        _write_outputs(
            cfg, paths, run, trainer, classifier, history, datasets, saved_model, members, with_curves=not follows
        )
        if follows:
            curves = _draw_curves(history, paths.training_curves, trainer)
            figure_workers.follow(
                [curves], functools.partial(_log_curves, run), f"the curves of MLflow run {run.run_id}"
            )
    log.info("model (epoch %d) saved to %s; MLflow run %s", trainer.kept_epoch, paths.model_file, run.run_id)


def _write_outputs(
    cfg: Config,
    paths: StagePaths,
    run: tracking.Run,
    trainer: Trainer,
    classifier: Classifier,
    history: pd.DataFrame,
    datasets: list[SplitDataset],
    saved_model: SavedModelReport | None,
    members: list[Member],
    *,
    with_curves: bool,
) -> None:
    """The unit of `_save_outputs`, the curves in it `with_curves`."""
    together = [paths.history, paths.l2_search, *([paths.training_curves] if with_curves else [])]
    with atomic.replace_together(paths.models, together) as (models, (history_csv, l2_search_csv, *curves_png)):
        history.to_csv(history_csv, index=False)
        searched = l2_search_table(trainer.state.l2_search)
        searched.to_csv(l2_search_csv, index=False)
        curves = [_draw_curves(history, png, trainer) for png in curves_png]
        with figure_workers.settled(*curves):  # drawn into the folder a failure would remove
            run.log_artifact(history_csv)
            if len(searched):
                run.log_artifact(l2_search_csv)
            run.log_artifact(paths.classes)
            kept = kept_row(history, trainer.kept_epoch)
            final_accuracy, final_loss = final_validation(saved_model, kept)
            run.log_metrics(
                {
                    "best_epoch": trainer.kept_epoch,
                    "final_val_accuracy": final_accuracy,
                    "final_val_loss": final_loss,
                }
            )
            images = {dataset.split: len(dataset.frame) for dataset in datasets}
            digest = datasets[0].digest
            phases = trainer.phases
            saved_differs = cfg.model.averages_test_time_views or members or trainer.head_refitted
            run.description = training_description(
                cfg,
                phases,
                history,
                kept,
                images,
                len(trainer.classes),
                digest,
                test_time_val_accuracy=final_accuracy if saved_differs else None,
                ensemble=[(m.seed, m.kept_epoch, m.val_accuracy, m.averaged) for m in members],
                refit=trainer.refit,
            )
            model_file = models / paths.model_file.name
            keras_saving.save(classifier.model, model_file)
            if cfg.mlflow.log_model:
                run.discard_logged_models()  # a killed earlier attempt may have logged one (or left it PENDING)
                run.log_model(model_file, list(trainer.classes), trainer.image_size)
                stop_if_received()  # a stop while the model was logged: models/ stays as it was
            _log_curves(run, [curve.path() for curve in curves])
            run.record.write(models / paths.run_file.name)


def l2_search_table(l2_search: list[dict[str, float]]) -> pd.DataFrame:
    """`reports/l2_search.csv`: an L-BFGS head's strengths tried, with their scores (none for Adam)."""
    table = pd.DataFrame(l2_search, columns=L2_SEARCH_COLUMNS)  # the fits' scores hold no log10_l2
    table["log10_l2"] = np.log10(table["l2"].astype(float))
    return table


def _draw_curves(history: pd.DataFrame, path: Path, trainer: Trainer) -> figure_workers.Drawing:
    from transferlab.plots import plot_training_curves

    kept, searched = trainer.kept_epoch, trainer.state.l2_search
    refit = trainer.refit.search if trainer.refit is not None else ()
    return figure_workers.draw(
        plot_training_curves, history, path, kept_epoch=kept, l2_search=searched, refit_search=refit
    )


def _log_curves(run: tracking.Run, curves: list[Path]) -> None:
    for curve in curves:
        run.log_artifact(curve, tracking.FIGURE_ARTIFACT_DIR)


def _saved_by(paths: StagePaths, run_id: str) -> bool:
    """True when `models/` already holds this run (an earlier attempt was killed after saving it)."""
    try:
        return tracking.RunRecord.read(paths.run_file).run_id == run_id
    except TransferlabError:
        return False


def _register(run: tracking.Run, name: str) -> None:
    """A version of `name` for this run's model (unless a killed earlier attempt made one already);
    a registry failure loses nothing, so it only warns."""
    try:
        register_run_model(run.store, name, run.run_id)
    except TransferlabError as exc:
        log.warning("model not registered (%s): register it with `transferlab promote %s`", exc, run.run_id)
