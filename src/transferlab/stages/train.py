"""Train stage: fit a transfer-learning classifier on the prepared splits, tracked in MLflow.

Training runs in up to two phases. Phase `head` trains the new head with the backbone
frozen; with no augmentation it trains on cached backbone features (see feature_cache),
which is exact and skips the backbone's forward pass every epoch. Phase `finetune`
unfreezes the top backbone layers (BatchNorm stays frozen) and continues at its own
learning rate. Every finished epoch is checkpointed; the same command resumes a killed run
in the same MLflow run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from transferlab import atomic, tracking
from transferlab.backbones import resolve_image_size
from transferlab.checkpoint import Checkpointer, CheckpointState, ModelKind
from transferlab.config import Config, config_hash
from transferlab.console import keras_progress
from transferlab.descriptions import backbone_state, training_description
from transferlab.errors import TransferlabError
from transferlab.feature_cache import FeatureCache, FeatureKey, manifest_digest
from transferlab.manifests import (
    Manifest,
    SplitDataset,
    check_splits_fresh,
    load_classes,
    load_manifest,
    split_datasets,
    splits_digest,
)
from transferlab.paths import StagePaths
from transferlab.pipeline import make_dataset
from transferlab.registry import register_run_model

if TYPE_CHECKING:
    import keras

    from transferlab.model import Classifier

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]
EPOCH_METRICS = ["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs with one trainable set and one learning rate."""

    name: Literal["head", "finetune"]
    first_epoch: int  # epochs already done before this phase
    last_epoch: int  # global epoch count at the end of this phase
    learning_rate: float
    unfreeze: int | Literal["all"]
    cached: bool  # trains the head on cached features


@dataclass(frozen=True)
class TrainResult:
    """What a finished training run produced."""

    run_id: str
    history: pd.DataFrame
    resumed: bool

    @property
    def val_accuracy(self) -> float:
        return float(self.history["val_accuracy"].iloc[-1])


def plan_phases(cfg: Config) -> list[Phase]:
    """The phases a config asks for, with global epoch numbering."""
    frozen_ok = not cfg.augment.enabled and cfg.train.feature_cache
    ft = cfg.finetune
    first_unfreeze = 0 if ft.two_phase else ft.unfreeze
    phases = [
        Phase("head", 0, cfg.train.epochs, cfg.train.learning_rate, first_unfreeze, frozen_ok and first_unfreeze == 0)
    ]
    if ft.two_phase:
        assert ft.learning_rate is not None
        end = cfg.train.epochs + ft.epochs
        phases.append(Phase("finetune", cfg.train.epochs, end, ft.learning_rate, ft.unfreeze, False))
    return phases


def _epoch_tracker(
    run: tracking.Run, checkpointer: Checkpointer, state: CheckpointState, phase: Phase, kind: ModelKind
) -> keras.callbacks.Callback:
    """Keras callback: checkpoint first, then log the epoch, so a kill never duplicates a metric."""
    import keras

    class EpochTracker(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
            logs = dict(logs or {})
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            row = {"epoch": epoch + 1, "phase": phase.name, **{k: float(logs[k]) for k in EPOCH_METRICS[:4]}}
            row["learning_rate"] = lr
            state.history.append(row)
            state.epochs_done = epoch + 1
            checkpointer.save(state, self.model, kind)
            run.log_metrics({k: row[k] for k in EPOCH_METRICS}, step=epoch + 1)
            shown = ", ".join(f"{k} {row[k]:.4f}" for k in EPOCH_METRICS[:4])
            log.info("epoch %d/%d (%s): %s", epoch + 1, phase.last_epoch, phase.name, shown)

    return EpochTracker()


def _relog_missing_epochs(run: tracking.Run, state: CheckpointState) -> None:
    """Epochs checkpointed before a kill but not yet logged reach MLflow exactly once."""
    logged = run.logged_steps("val_accuracy")
    for row in state.history:
        if row["epoch"] not in logged:
            run.log_metrics({k: row[k] for k in EPOCH_METRICS}, step=row["epoch"])


class _Trainer:
    """Holds one run's data, model pieces and checkpoint state while the phases execute."""

    def __init__(self, cfg: Config, paths: StagePaths, run: tracking.Run, state: CheckpointState) -> None:
        self.cfg, self.paths, self.run, self.state = cfg, paths, run, state
        self.checkpointer = Checkpointer(paths.checkpoints)
        self.image_size = resolve_image_size(cfg.model.backbone, cfg.data.image_size)
        self.classes = load_classes(paths.classes)
        raw = paths.raw_dataset(cfg.data.name)
        self.train_set = load_manifest(paths.manifest("train"), raw, self.classes)
        self.val_set = load_manifest(paths.manifest("val"), raw, self.classes)

    def build(self) -> Classifier:
        from transferlab.model import adopt_trained, build_classifier

        classifier = build_classifier(self.cfg.model, len(self.classes), self.image_size)
        restored = self.checkpointer.restore_model(self.state)
        if restored is not None:
            classifier = adopt_trained(classifier, restored, head_only=self.state.model_kind == "head")
            log.info("resuming after epoch %d from %s", self.state.epochs_done, self.state.model_file)
        return classifier

    def _feature_datasets(self, classifier: Classifier) -> tuple[Any, Any]:
        import tensorflow as tf

        from transferlab.model import weights_digest

        cache = FeatureCache(self.paths.feature_cache)
        digest = weights_digest(classifier.backbone)
        batch = self.cfg.train.batch_size

        def load(manifest: Manifest, shuffle: bool) -> tf.data.Dataset:
            key = FeatureKey(
                self.cfg.model.backbone, self.cfg.model.alpha, digest, self.image_size, manifest_digest(manifest)
            )
            features, labels, hit = cache.features_for(key, classifier.features, manifest, self.image_size, batch)
            log.info("feature cache %s for %d images", "hit" if hit else "miss", len(manifest))
            ds = tf.data.Dataset.from_tensor_slices((features, tf.one_hot(labels, len(self.classes))))
            if shuffle:
                ds = ds.shuffle(len(manifest), seed=self.cfg.train.seed, reshuffle_each_iteration=True)
            return ds.batch(batch).prefetch(tf.data.AUTOTUNE)

        return load(self.train_set, True), load(self.val_set, False)

    def _image_datasets(self) -> tuple[Any, Any]:
        from transferlab.augment import build_augmenter

        common = {"image_size": self.image_size, "batch_size": self.cfg.train.batch_size}
        augmenter = build_augmenter(self.cfg.augment, self.cfg.train.seed)
        train_ds = make_dataset(self.train_set, shuffle=True, seed=self.cfg.train.seed, augmenter=augmenter, **common)
        return train_ds, make_dataset(self.val_set, **common)

    def run_phase(self, classifier: Classifier, phase: Phase, resuming_this_phase: bool) -> Classifier:
        """Fit one phase from where the checkpoint left it."""
        from transferlab.model import Classifier, attach_head, compile_classifier, set_trainable_layers

        kind: ModelKind = "head" if phase.cached else "full"
        trainable = 0
        if phase.cached:
            model, (train_ds, val_ds) = classifier.head, self._feature_datasets(classifier)
        else:
            if not resuming_this_phase:
                # The head may have been trained on cached features: assemble the full model.
                model = attach_head(classifier.features, classifier.head, classifier.model.name)
                classifier = Classifier(model, classifier.backbone, classifier.features, classifier.head)
            model = classifier.model
            trainable = set_trainable_layers(classifier.backbone, phase.unfreeze)
            train_ds, val_ds = self._image_datasets()
        if not resuming_this_phase:
            compile_classifier(model, self.cfg.train, phase.learning_rate)
        start = max(phase.first_epoch, self.state.epochs_done)
        log.info(
            "%s: %s; epochs %d..%d at learning rate %g",
            phase.name,
            backbone_state(phase, trainable),
            start + 1,
            phase.last_epoch,
            phase.learning_rate,
        )
        with keras_progress(f"phase {phase.name}", epochs=phase.last_epoch - start) as progress:
            model.fit(
                train_ds,
                validation_data=val_ds,
                epochs=phase.last_epoch,
                initial_epoch=start,
                callbacks=[_epoch_tracker(self.run, self.checkpointer, self.state, phase, kind), progress],
                shuffle=False,  # the datasets shuffle themselves, seeded
                verbose=0,
            )
        if phase.cached:
            classifier.model = attach_head(classifier.features, classifier.head, classifier.model.name)
        return classifier


def best_epoch(history: pd.DataFrame) -> pd.Series:
    """The history row of the epoch whose weights the saved model holds: the last one."""
    return history.iloc[-1]


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
    `mlflow.registered_model`."""
    from transferlab.runtime import device_description, make_strategy, precision_policy
    from transferlab.seeding import seed_everything

    check_splits_fresh(cfg, paths)
    load_classes(paths.classes)  # fail fast, before MLflow or TensorFlow start
    cfg_hash = config_hash(cfg)
    store = tracking.open_store(cfg.mlflow, paths.root)
    checkpointer = Checkpointer(paths.checkpoints)
    resume = _resumable_state(store, checkpointer, cfg_hash)
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
        if resume:
            _relog_missing_epochs(run, state)
        run.log_config(cfg)
        run.log_dict(cfg.to_dict(), "config.yaml")
        datasets = split_datasets(cfg, paths)
        run.log_datasets(datasets)
        with make_strategy(cfg.train).scope():
            trainer = _Trainer(cfg, paths, run, state)
            classifier = trainer.build()
            for phase in plan_phases(cfg):
                if state.epochs_done >= phase.last_epoch:
                    continue
                resuming = resume is not None and state.epochs_done > phase.first_epoch
                classifier = trainer.run_phase(classifier, phase, resuming)
        _finish(cfg, paths, run, trainer, classifier, state, datasets, register_model)
    checkpointer.clear()
    return TrainResult(run.run_id, pd.DataFrame(state.history, columns=HISTORY_COLUMNS), resume is not None)


def _finish(
    cfg: Config,
    paths: StagePaths,
    run: tracking.Run,
    trainer: _Trainer,
    classifier: Classifier,
    state: CheckpointState,
    datasets: list[SplitDataset],
    register_model: bool,
) -> None:
    """Write the model, history and curves; log them, describe the run, register the model; record
    the run for evaluate."""
    from transferlab.plots import plot_training_curves

    atomic.write_file(paths.model_file, classifier.model.save)
    history = pd.DataFrame(state.history, columns=HISTORY_COLUMNS)
    paths.reports.mkdir(parents=True, exist_ok=True)
    history.to_csv(paths.history, index=False)
    plot_training_curves(history, paths.training_curves)
    run.log_artifact(paths.history)
    run.log_artifact(paths.training_curves, "figures")
    run.log_artifact(paths.classes)
    final = history.iloc[-1]
    run.log_metrics({"final_val_accuracy": final["val_accuracy"], "final_val_loss": final["val_loss"]})
    images = {dataset.split: len(dataset.frame) for dataset in datasets}
    digest = datasets[0].digest
    best = best_epoch(history)
    run.description = training_description(cfg, plan_phases(cfg), history, best, images, len(trainer.classes), digest)
    if cfg.mlflow.log_model:
        model_uri = run.log_model(paths.model_file, list(trainer.classes), trainer.image_size)
        if register_model and cfg.mlflow.registered_model:
            _register(run, cfg.mlflow.registered_model, model_uri)
    run.record.write(paths.run_file)
    log.info("model saved to %s; MLflow run %s", paths.model_file, run.run_id)


def _register(run: tracking.Run, name: str, model_uri: str) -> None:
    """A new version of `name` for this run's model; a registry failure loses nothing, so it only warns."""
    try:
        register_run_model(run.store, name, run.run_id, model_uri)
    except TransferlabError as exc:
        log.warning("model not registered (%s): register it with `transferlab promote %s`", exc, run.run_id)
