"""The phases of one training run: what each trains, how it is fed, and how its epochs are judged.

Training runs in up to two phases. Phase `head` trains the new head with the backbone frozen;
phase `finetune` unfreezes the top backbone layers (BatchNorm stays frozen and in inference
mode) and continues at its own learning rate. Each phase is fed the cheapest exact way:

- `pool`: cached pooled backbone features; the head alone trains (frozen backbone);
- `cut`: cached activations at the cut of a partially unfrozen backbone (cut.py); the unfrozen
  top and the head train, and an epoch costs only those layers;
- `images`: the whole network on decoded images (fresh augmentation every epoch, everything
  unfrozen, or the cache switched off).

With augmentation and `augment.cached_views: K > 0`, the cached phases train on the
activations of K augmented views of every training image, cycling through one view per epoch
(with `augment.crops`, the views are taken in turn at squares along each photo's long side).
Every epoch is judged (progress.py) and checkpointed; at the end the best epoch's weights are
restored (with early stopping). After fine-tuning from the cut-point cache, the head is fitted
again by L-BFGS on the fine-tuned features and kept if it validates better (`refit_head`). Then
what the saved model adds goes in (`finish_model`): with `train.calibrate`, a temperature fitted
on the validation split; with `model.test_time_flip`, the mirror image's prediction averaged in;
with `model.test_time_crops`, those of squares along each photo's long side.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from transferlab import tracking
from transferlab.checkpoint import Checkpointer, CheckpointState, ModelKind
from transferlab.config import Config
from transferlab.console import keras_progress
from transferlab.descriptions import backbone_state
from transferlab.errors import interrupts_deferred, stop_if_received
from transferlab.feature_cache import (
    NO_AUGMENTATION,
    POOLED,
    Activations,
    FeatureCache,
    FeatureKey,
    augmentation_digest,
    describe_tensor,
)
from transferlab.images import CENTRAL, CENTRE, square_positions, test_time_views
from transferlab.manifests import Manifest, load_classes, load_manifest
from transferlab.paths import StagePaths
from transferlab.pipeline import epoch_batches, make_dataset, prefetched
from transferlab.progress import judge_epoch, monitored_metric, phase_is_over, start_phase
from transferlab.runtime import batches_per_pass, whole_batches

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from transferlab.cut import CutModels
    from transferlab.linear_head import LinearFit
    from transferlab.model import Classifier

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]
# reports/l2_search.csv: an L-BFGS head's fit per strength tried, strongest first (log10_l2 for DVC's
# linear axis); no rows for a head stepped by Adam
L2_SEARCH_COLUMNS = ["l2", "log10_l2", "loss", "accuracy", "val_loss", "val_accuracy"]
EPOCH_METRICS = ["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]
Source = Literal["pool", "cut", "images"]
Schedule = Literal["constant", "cosine", "plateau"]


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs with one trainable set, one learning rate and one way to feed it."""

    name: Literal["head", "finetune"]
    epochs: int  # at most: early stopping may end the phase sooner
    learning_rate: float
    warmup_epochs: int
    schedule: Schedule
    unfreeze: int | Literal["all"]
    source: Source
    views: int  # cached augmented views per training image (1: the images themselves)
    solver: Literal["adam", "lbfgs"] = "adam"  # lbfgs: one convex fit (linear_head.py), a phase of one epoch

    @property
    def kind(self) -> ModelKind:
        """Which model the phase fits and checkpoints."""
        return {"pool": "head", "cut": "top", "images": "full"}[self.source]


def _source(cfg: Config, unfreeze: int | Literal["all"]) -> tuple[Source, int]:
    augmented = cfg.augment.enabled or cfg.augment.crops > 1
    if not cfg.train.feature_cache or unfreeze == "all" or (augmented and cfg.augment.cached_views == 0):
        return "images", 1
    if cfg.train.strategy == "multi_worker":  # the workers split each batch: one process's cache is no use
        return "images", 1
    views = cfg.augment.cached_views if augmented else 1
    return ("pool" if unfreeze == 0 else "cut"), views


def plan_phases(cfg: Config) -> list[Phase]:
    """The phases a config asks for, each with the cheapest exact feed."""
    ft = cfg.finetune
    head_unfreeze = 0 if ft.two_phase else ft.unfreeze
    tc = cfg.train
    feed = _source(cfg, head_unfreeze)
    head = Phase("head", tc.epochs, tc.learning_rate, tc.warmup_epochs, tc.schedule, head_unfreeze, *feed)
    if tc.head_solver == "lbfgs" and head.source == "pool":  # other feeds have no fixed features to fit on
        head = dataclasses.replace(head, epochs=1, solver="lbfgs")
    phases = [head]
    if ft.two_phase:
        assert ft.learning_rate is not None
        schedule = ft.schedule or tc.schedule
        feed = _source(cfg, ft.unfreeze)
        phases.append(Phase("finetune", ft.epochs, ft.learning_rate, ft.warmup_epochs, schedule, ft.unfreeze, *feed))
    return phases


_LBFGS_HEAD = "the frozen backbone's head is fitted by L-BFGS, its L2 strength searched on validation"
_ADAM_HEAD = "add train.head_solver=adam to step it with Adam"
# Settings only phases stepped by an optimizer read; an L-BFGS head reads none of them (its fit
# is one epoch, the first, so no schedule acts; dropout is the identity there). A fine-tuning
# phase 2 has finetune.epochs, learning_rate, warmup_epochs and schedule (null: train.schedule)
# of its own, but steps with train.optimizer and weight_decay and trains the head with dropout.
_STEPPED_HEAD_ONLY = ("train.learning_rate", "train.epochs", "train.warmup_epochs")
_STEPPED = ("train.optimizer", "train.weight_decay", "model.dropout")
# Read by phase 2 alone (`finetune.epochs` > 0).
_FINETUNE_ONLY = ("finetune.learning_rate", "finetune.warmup_epochs", "finetune.schedule")


def inert_settings(cfg: Config) -> dict[str, str]:
    """The settings that have no effect on what `cfg` trains, each with the reason (`plan_phases`):
    with the head fitted by L-BFGS, what only an optimizer's epochs read; without fine-tuning
    (`finetune.epochs: 0`), phase 2's own settings."""
    phases = plan_phases(cfg)
    inert: dict[str, str] = {}
    if phases[0].solver == "lbfgs" and len(phases) == 1:
        inert.update(dict.fromkeys([*_STEPPED_HEAD_ONLY, "train.schedule", *_STEPPED], f"{_LBFGS_HEAD} ({_ADAM_HEAD})"))
    elif phases[0].solver == "lbfgs":
        keys = [*_STEPPED_HEAD_ONLY, *(["train.schedule"] if cfg.finetune.schedule is not None else [])]
        reason = f"{_LBFGS_HEAD} ({_ADAM_HEAD}), and fine-tuning has finetune.* settings of its own"
        inert.update(dict.fromkeys(keys, reason))
    if not cfg.finetune.two_phase:
        inert.update(dict.fromkeys(_FINETUNE_ONLY, "finetune.epochs is 0, so no fine-tuning phase runs"))
    return inert


def describe_inert(inert: Mapping[str, str]) -> str:
    """One line for the settings of `inert_settings`: `a, b have no effect here: reason`."""
    by_reason: dict[str, list[str]] = {}
    for key, reason in inert.items():
        by_reason.setdefault(reason, []).append(key)
    parts = [
        f"{', '.join(keys)} {'has' if len(keys) == 1 else 'have'} no effect here: {reason}"
        for reason, keys in by_reason.items()
    ]
    return "; ".join(parts)


@dataclass
class Fit:
    """What a phase fits, on what: images (a dataset), or cached activations."""

    model: keras.Model
    validation: tf.data.Dataset
    steps_per_epoch: int
    images: Callable[[int, int], tf.data.Dataset] | None = None  # training batches of epochs [first, last)
    train_activations: Activations | None = None
    val_inputs: Any = None  # cached validation activations (calibration reuses them)
    cut: CutModels | None = None
    trainable_layers: int = 0  # backbone layers with weights that train


@dataclass(frozen=True)
class SavedModelReport:
    """The saved model on the validation split, after `finish_model` put calibration and test-time
    views (flipping, crops) into it."""

    temperature: float | None  # fitted on the validation split; None: not calibrated
    val_accuracy: float
    val_loss: float
    val_ece: float
    val_ece_uncalibrated: float  # the same model with temperature 1


@dataclass(frozen=True)
class HeadRefit:
    """The head fitted again after fine-tuning (`Trainer.refit_head`), against the fine-tuned one."""

    l2: float  # the strength kept for the refit head
    val_loss: float
    val_accuracy: float
    trained_val_loss: float  # the fine-tuned head's, at the kept epoch
    kept: bool  # True: the refit head replaced the fine-tuned one
    search: tuple[dict[str, float], ...]  # every strength tried, strongest first (`LinearFit.scores`)

    def metrics(self) -> dict[str, float]:
        """Its figures as MLflow metrics (`refit_*`); the search is `refit_search/*`, per step."""
        return {
            "refit_l2": self.l2,
            "refit_val_loss": self.val_loss,
            "refit_val_accuracy": self.val_accuracy,
            "refit_kept": float(self.kept),
        }


class Trainer:
    """Holds one run's data, model and checkpoint state while the phases execute."""

    def __init__(
        self,
        cfg: Config,
        paths: StagePaths,
        run: tracking.Run | None,
        state: CheckpointState,
        *,
        checkpoints: Path | None = None,
        metric_prefix: str = "",
        backbone: keras.Model | None = None,
    ) -> None:
        """`checkpoints` (default `paths.checkpoints`) holds the state's files; epoch metrics reach
        MLflow with `metric_prefix` before their names; a `backbone` given is trained on instead of
        a new one (an ensemble member's: ensemble.py)."""
        self.cfg, self.paths, self.run, self.state = cfg, paths, run, state
        self.checkpointer = Checkpointer(checkpoints or paths.checkpoints)
        self.metric_prefix = metric_prefix
        self.backbone = backbone
        self.cache = FeatureCache.of_project(paths, cfg.train)
        self.image_size = cfg.image_size
        self.classes = load_classes(paths.classes)
        raw = paths.raw_dataset(cfg.data.name)
        self.train_set = load_manifest(paths.manifest("train"), raw, self.classes)
        self.val_set = load_manifest(paths.manifest("val"), raw, self.classes)
        self.keep_best = cfg.train.early_stopping is not None
        self.last_fit: Fit | None = None
        self.phases: list[Phase] = []
        self.weights_digest = ""  # of the pristine backbone: part of every cache key
        self.refit: HeadRefit | None = None  # the head fitted again after fine-tuning (`refit_head`)

    # --- the run -----------------------------------------------------------------------------

    def train(self, resumed: bool) -> Classifier:
        """Run every phase not yet over; return the classifier with the epoch to keep restored."""
        from transferlab import reuse

        seed = self.cfg.train.seed
        classifier = reuse.classifier(self.cfg.model, len(self.classes), self.image_size, seed, self.backbone)
        self.weights_digest = reuse.backbone_digest(classifier.backbone)
        self.phases = [_feasible(phase, classifier) for phase in plan_phases(self.cfg)]
        carried = not resumed  # the in-memory weights are the state's (nothing trained yet, or trained here)
        for phase in self.phases:
            if phase_is_over(self.state, phase.name, phase.epochs, self.cfg.train):
                continue
            state = self.state
            resuming_phase = resumed and state.phase == phase.name and state.epochs_done > state.phase_start
            self._run_phase(classifier, phase, resuming_phase, carried)
            carried = True
        if not carried:  # every phase was over before the kill: restore what the state holds
            self._restore_carry_over(classifier, self._final_fit(classifier))
        elif self.keep_best and self.state.best_epoch != self.state.epochs_done:
            self._restore_best(self._final_fit(classifier).model)
            log.info("restored epoch %d, the best by %s", self.state.best_epoch, monitored_metric(self.cfg.train))
        return classifier

    def log_missing_epochs(self) -> None:
        """Epochs checkpointed before a kill but not yet logged reach MLflow exactly once."""
        assert self.run is not None
        logged = self.run.logged_steps(self.metric_prefix + "val_accuracy")
        for row in self.state.history:
            if row["epoch"] not in logged:
                self._log_epoch(row)

    def _log_epoch(self, row: Mapping[str, Any]) -> None:
        """One history row's metrics in MLflow, at its epoch, under this trainer's metric names; a
        NaN (the learning rate of an L-BFGS head) is left out, as the UI's charts and compare view
        cannot show it."""
        assert self.run is not None
        metrics = {self.metric_prefix + k: row[k] for k in EPOCH_METRICS if not math.isnan(row[k])}
        self.run.log_metrics(metrics, step=row["epoch"])

    @property
    def kept_epoch(self) -> int:
        """The epoch whose weights the saved model holds."""
        return (self.state.best_epoch or self.state.epochs_done) if self.keep_best else self.state.epochs_done

    def _run_phase(self, classifier: Classifier, phase: Phase, resuming: bool, carried: bool) -> None:
        fit = self._prepare(classifier, phase)
        self.last_fit = fit
        if phase.solver == "lbfgs":  # the first phase, of one epoch: nothing to resume or carry over
            start_phase(self.state, phase.name)
            self._solve_head(classifier, fit, phase)
        else:
            self._step_phase(classifier, fit, phase, resuming, carried)
        self.state.finished_phases.append(phase.name)
        self.checkpointer.write_state(self.state)

    def _step_phase(self, classifier: Classifier, fit: Fit, phase: Phase, resuming: bool, carried: bool) -> None:
        """The phase's epochs of the optimizer, from where a killed run stopped when `resuming`."""
        from transferlab.model import learning_rate_schedule, load_training_state
        from transferlab.reuse import compile_for_job

        schedule = learning_rate_schedule(
            phase.schedule, phase.learning_rate, phase.epochs, phase.warmup_epochs, fit.steps_per_epoch
        )
        compile_for_job(fit.model, self.cfg.train, schedule)
        if resuming:
            restored = self.checkpointer.restore_model(self.state)
            assert restored is not None, "a phase in progress always has a checkpoint"
            load_training_state(fit.model, restored)
            log.info("resuming after epoch %d (phase %s)", self.state.epochs_done, phase.name)
        else:
            if not carried:
                self._restore_carry_over(classifier, fit)
            elif self.keep_best and self.state.best_epoch not in (None, self.state.epochs_done):
                self._restore_best(self._model_of_kind(classifier, self.state.best_kind, fit))
            start_phase(self.state, phase.name)
            if self.keep_best and self.state.best_epoch is not None:  # carry the best over as this phase's kind
                self.checkpointer.save_best(self.state, fit.model, phase.kind, phase.name)
            else:
                self.checkpointer.write_state(self.state)
        first = self.state.epochs_done
        last = self.state.phase_start + phase.epochs
        what = backbone_state(phase, fit.trainable_layers)
        log.info("%s: %s; epochs %d..%d at learning rate %g", phase.name, what, first + 1, last, phase.learning_rate)
        with keras_progress(f"phase {phase.name}", epochs=last - first) as progress:
            fit.model.fit(
                self._training_batches(fit, last - first),
                validation_data=fit.validation,
                epochs=last,
                initial_epoch=first,
                steps_per_epoch=fit.steps_per_epoch,
                callbacks=[self._epoch_monitor(phase, last), progress],
                shuffle=False,  # the datasets shuffle themselves, seeded
                verbose=0,
            )

    def _solve_head(self, classifier: Classifier, fit: Fit, phase: Phase) -> None:
        """The head phase as one convex fit per L2 strength on the cached features (linear_head.py),
        recorded as one epoch: the kept solution's scores. Every strength's scores reach MLflow as
        `l2_search/*` at steps 1, 2, ... and the kept strength as `head_l2`."""
        train = fit.train_activations
        assert train is not None and phase.source == "pool"
        views = np.asarray(train.arrays[0], dtype=np.float32)  # (views, images, features)
        log.info("head: L-BFGS on %d cached views of %d images, frozen backbone", views.shape[0], views.shape[1])
        fits, kept = self._search_head(classifier, views, train.labels, np.asarray(fit.val_inputs))
        log.info("head: kept l2 %g (validation loss %.4f, accuracy %.4f)", kept.l2, kept.val_loss, kept.val_accuracy)
        self.state.l2_search = [fit.scores() for fit in fits]
        if self.run is not None:
            log_l2_search(self.run, f"{self.metric_prefix}l2_search", self.state.l2_search)
            self.run.log_metrics({f"{self.metric_prefix}head_l2": kept.l2})
        # The kept solution's scores are the epoch's logs (finish_epoch reads its metrics from them).
        self.finish_epoch(fit.model, phase, self.state.epochs_done + 1, kept.scores(), learning_rate=float("nan"))

    def _search_head(
        self, classifier: Classifier, views: np.ndarray, labels: np.ndarray, val_pooled: np.ndarray
    ) -> tuple[list[LinearFit], LinearFit]:
        """Set the head to the L-BFGS solution with the lowest validation loss along the L2
        strengths, fitted on the pooled features of the training `views` (views, images, features)
        and scored on `val_pooled`; returns every strength's solution and the kept one."""
        from transferlab.linear_head import best_fit, search_l2
        from transferlab.model import head_features, set_head_affine

        features = head_features(classifier.head, views.reshape(-1, views.shape[-1]))
        tiled = np.tile(np.asarray(labels), views.shape[0])
        val_features = head_features(classifier.head, val_pooled)
        val_labels = np.asarray(self.val_set.labels)
        fits = search_l2(features, tiled, val_features, val_labels, len(self.classes), self.cfg.train.label_smoothing)
        kept = best_fit(fits)
        set_head_affine(classifier.head, kept.kernel, kept.bias)
        return fits, kept

    def refit_head(self, classifier: Classifier) -> None:
        """After fine-tuning from the cut-point cache (`finetune.refit_head`): the head fitted
        again by L-BFGS, as phase 1 fits it, on the pooled features of the cached training views
        through the fine-tuned backbone, L2 chosen on validation. It replaces the fine-tuned head
        when its validation loss is lower than that of the kept epoch.

        What it found goes to `self.refit`, which stays None when no phase fine-tuned from the
        cut-point cache (a frozen backbone; a phase on images has no cached views) or when the kept
        epoch is not a fine-tuning one (the backbone is then as phase 1 left it). Nothing of it
        is checkpointed: it is a function of the kept weights, so a run resumed before its model
        was saved refits again, to the same head.
        """
        from transferlab.model import head_affine, set_head_affine

        if not self.cfg.finetune.refit_head or self.phases[-1].unfreeze == 0:
            return
        last = self.phases[-1].name
        kept_row = next(row for row in self.state.history if row["epoch"] == self.kept_epoch)
        if kept_row["phase"] != last:
            log.info(
                "finetune: the head is not refitted: the kept epoch, %d, is phase %s's",
                self.kept_epoch,
                kept_row["phase"],
            )
            return
        fit = self._final_fit(classifier)
        train = fit.train_activations
        if fit.cut is None or train is None:
            log.info("finetune: the head is not refitted: phase %s trained on images", last)
            return
        batch = self.cfg.train.batch_size
        views = np.stack(
            [
                fit.cut.to_pooled.predict(_inputs(train.arrays, v), batch_size=batch, verbose=0)
                for v in range(train.views)
            ]
        )
        log.info("finetune: refitting the head by L-BFGS on %d cached views of %d images", *views.shape[:2])
        trained = head_affine(classifier.head)
        fits, refit = self._search_head(classifier, views, train.labels, self._validation_pooled(classifier))
        trained_loss = kept_row["val_loss"]
        kept = refit.val_loss < trained_loss
        if not kept:
            set_head_affine(classifier.head, *trained)
        log.info(
            "finetune: refitted head (l2 %g): validation loss %.4f against %.4f at epoch %d: %s",
            refit.l2,
            refit.val_loss,
            trained_loss,
            self.kept_epoch,
            "kept" if kept else "the fine-tuned head stays",
        )
        searched = tuple(fit.scores() for fit in fits)
        self.refit = HeadRefit(refit.l2, refit.val_loss, refit.val_accuracy, trained_loss, kept, searched)

    @property
    def head_refitted(self) -> bool:
        """True when the head refitted after fine-tuning replaced the trained one (`refit_head`)."""
        return self.refit is not None and self.refit.kept

    # --- feeding a phase ------------------------------------------------------------------------

    def _prepare(self, classifier: Classifier, phase: Phase) -> Fit:
        from transferlab.model import first_trainable_layer, set_trainable_layers

        trainable = set_trainable_layers(classifier.backbone, phase.unfreeze)
        if phase.source == "pool":
            train, val = (self._activations(classifier.features, m, POOLED, v, phase) for m, v in self._splits(phase))
            fit = self._cached_fit(classifier.head, train, val, phase)
        elif phase.source == "cut":
            from transferlab.cut import split_at_cut

            cut = split_at_cut(classifier, first_trainable_layer(classifier.backbone, phase.unfreeze))
            train, val = (self._activations(cut.bottom, m, cut.name, v, phase) for m, v in self._splits(phase))
            fit = dataclasses.replace(self._cached_fit(cut.top, train, val, phase), cut=cut)
        else:
            fit = self._image_fit(classifier.model)
        return dataclasses.replace(fit, trainable_layers=trainable)

    def _splits(self, phase: Phase) -> list[tuple[Manifest, int]]:
        return [(self.train_set, phase.views), (self.val_set, 1)]

    def _activations(
        self, extractor: keras.Model, manifest: Manifest, tensor: str, views: int, phase: Phase
    ) -> Activations:
        from transferlab.augment import build_augmenter

        training = manifest is self.train_set
        augmented = views > 1 or (training and self.cfg.augment.enabled)
        settings = dataclasses.asdict(self.cfg.augment)
        augmentation = augmentation_digest(settings, self.cfg.train.seed, views) if augmented else NO_AUGMENTATION
        activations = self.cache.activations_for(
            FeatureKey.of_split(
                self.cfg.model, self.weights_digest, self.image_size, manifest, tensor=tensor, augmentation=augmentation
            ),
            extractor,
            manifest,
            image_size=self.image_size,
            batch_size=self.cfg.train.batch_size,
            views=views,
            augmenter=(lambda: build_augmenter(self.cfg.augment, self.cfg.train.seed)) if augmented else None,
            positions=square_positions(self.cfg.augment.crops) if training else CENTRAL,
        )
        log.info(
            "%s: cache %s for %d images", describe_tensor(tensor), "hit" if activations.hit else "miss", len(manifest)
        )
        return activations

    def _cached_fit(self, model: keras.Model, train: Activations, val: Activations, phase: Phase) -> Fit:
        import tensorflow as tf

        batch = self.cfg.train.batch_size
        val_inputs = _inputs(val.arrays, view=0)
        validation = tf.data.Dataset.from_tensor_slices((val_inputs, self._one_hot(val.labels))).batch(batch)
        steps = math.ceil(len(train.labels) / batch)
        return Fit(model, prefetched(validation), steps, train_activations=train, val_inputs=val_inputs)

    def _training_batches(self, fit: Fit, epochs: int) -> tf.data.Dataset:
        """Training batches for the next `epochs` epochs, in `pipeline.epoch_batches` order.

        Cached activations: epoch e draws view (e - phase start) mod K of every image.
        """
        import tensorflow as tf

        first = self.state.epochs_done
        if fit.images is not None:
            return fit.images(first, first + epochs)
        train = fit.train_activations
        assert train is not None
        arrays = [tf.constant(np.asarray(a, dtype="float32")) for a in train.arrays]  # (views, images, ...)
        labels = tf.constant(self._one_hot(train.labels))
        views, phase_start = train.views, self.state.phase_start

        def gather(epoch: tf.Tensor, index: tf.Tensor) -> tuple[Any, tf.Tensor]:
            view = (epoch - phase_start) % views
            inputs = [tf.gather(a[view], index) for a in arrays]
            return (inputs[0] if len(inputs) == 1 else tuple(inputs)), tf.gather(labels, index)

        count = len(train.labels)
        with interrupts_deferred():  # built whole (its maps traced), as `pipeline.make_dataset` says why
            indices = tf.data.Dataset.range(count)
            epoch_range = (first, first + epochs)
            batches = epoch_batches(indices, count, epoch_range, self.cfg.train.seed, self.cfg.train.batch_size)
            return prefetched(batches.map(gather))

    def _image_fit(self, model: keras.Model) -> Fit:
        from transferlab.augment import build_augmenter

        batch, seed = self.cfg.train.batch_size, self.cfg.train.seed
        common = {"image_size": self.image_size, "batch_size": batch}
        augmenter = build_augmenter(self.cfg.augment, seed)
        if self.cfg.augment.enabled and self.cfg.train.feature_cache:
            why = "augment.cached_views is 0" if not self.cfg.augment.cached_views else "this phase trains on images"
            log.info("%s: fresh augmentation every epoch, through the whole backbone (slow)", why)
        if self.cfg.augment.crops > 1:
            log.info("augment.crops applies to cached views: this phase trains on the central squares")

        def train(first: int, last: int) -> tf.data.Dataset:
            batches = make_dataset(self.train_set, epochs=(first, last), seed=seed, augmenter=augmenter, **common)
            return whole_batches(batches, len(self.train_set), batch)

        validation = whole_batches(make_dataset(self.val_set, **common), len(self.val_set), batch)
        return Fit(model, validation, batches_per_pass(len(self.train_set), batch), images=train)

    def _one_hot(self, labels: np.ndarray) -> np.ndarray:
        return np.eye(len(self.classes), dtype="float32")[labels]

    # --- epochs ---------------------------------------------------------------------------------

    def _epoch_monitor(self, phase: Phase, last: int) -> keras.callbacks.Callback:
        """Keras callback: judge and checkpoint the epoch, then log it, so a kill never duplicates a metric."""
        import keras

        from transferlab.model import current_learning_rate

        trainer = self

        class EpochMonitor(keras.callbacks.Callback):
            rate = float("nan")

            def on_epoch_begin(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
                self.rate = current_learning_rate(self.model)  # at the end, a cosine's last epoch shows 0

            def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
                stop_if_received()  # a stop during the epoch: it is not checkpointed
                decisions = trainer.finish_epoch(self.model, phase, epoch + 1, dict(logs or {}), self.rate)
                row = trainer.state.history[-1]
                shown = ", ".join(f"{k} {row[k]:.4f}" for k in EPOCH_METRICS[:4])
                log.info("epoch %d/%d (%s): %s", epoch + 1, last, phase.name, shown)
                for decision in decisions:  # after the epoch they are about
                    log.info("%s", decision)

        return EpochMonitor()

    def finish_epoch(
        self, model: keras.Model, phase: Phase, epoch: int, logs: dict[str, float], learning_rate: float
    ) -> list[str]:
        """Record an epoch: history, best model, plateau, early stopping, checkpoint, MLflow.

        `learning_rate` is the rate of the epoch's first step (NaN: none, an L-BFGS head). Returns
        what was decided (a lower learning rate, early stopping), for the log.
        """
        cfg, state = self.cfg.train, self.state
        rate = learning_rate
        row = {"epoch": epoch, "phase": phase.name, **{k: float(logs[k]) for k in EPOCH_METRICS[:4]}}
        row["learning_rate"] = rate
        state.history.append(row)
        state.epochs_done = epoch
        verdict = judge_epoch(state, epoch, row, cfg, phase.schedule)
        decisions = []
        if verdict.lower_learning_rate:
            lowered = max(rate * cfg.plateau.factor, cfg.plateau.min_learning_rate)
            model.optimizer.learning_rate.assign(lowered)
            decisions.append(
                f"{monitored_metric(cfg)} has not improved for {cfg.plateau.patience} epochs: "
                f"learning rate {rate:g} -> {lowered:g}"
            )
        if verdict.stop:
            model.stop_training = True
            decisions.append(f"early stopping after epoch {epoch}: best epoch {state.best_epoch}")
        self.checkpointer.save(state, model, phase.kind, best=verdict.improved and self.keep_best)
        if self.run is not None:  # None: a multi_worker peer, which logs nothing
            self._log_epoch(row)
        return decisions

    # --- restoring --------------------------------------------------------------------------------

    def _model_of_kind(self, classifier: Classifier, kind: ModelKind | None, fit: Fit) -> keras.Model:
        if kind == "head":
            return classifier.head
        if kind == "full":
            return classifier.model
        assert kind == "top" and fit.cut is not None, "a cut checkpoint belongs to the phase that wrote it"
        return fit.cut.top

    def _restore_best(self, model: keras.Model) -> None:
        model.set_weights(self.checkpointer.restore_best(self.state).get_weights())

    def _restore_carry_over(self, classifier: Classifier, fit: Fit) -> None:
        """A resumed process: put the weights the next phase starts from (or the run ends with) in place."""
        if self.keep_best and self.state.best_kind is not None:
            self._restore_best(self._model_of_kind(classifier, self.state.best_kind, fit))
        elif self.state.model_file is not None:
            saved = self.checkpointer.restore_model(self.state)
            assert saved is not None
            self._model_of_kind(classifier, self.state.model_kind, fit).set_weights(saved.get_weights())

    def _final_fit(self, classifier: Classifier) -> Fit:
        """The last phase's fit (prepared again when this process ran none of it)."""
        if self.last_fit is None:
            self.last_fit = self._prepare(classifier, self.phases[-1])
        return self.last_fit

    # --- the saved model ---------------------------------------------------------------------------

    def finish_model(self, classifier: Classifier) -> SavedModelReport | None:
        """Put into the classifier what the saved model adds to the trained one, as configured: a
        temperature fitted on the validation split (`train.calibrate`), test-time flipping
        (`model.test_time_flip`) and crops (`model.test_time_crops`). None when none is on and the
        head is the trained one (no `train.ensemble`, no refit head kept): the trained model is
        saved as it is.
        """
        from transferlab.metrics import calibration, fit_temperature, log_loss, mean_probabilities
        from transferlab.model import attach_head, head_logits, run_head, with_temperature

        calibrate, flip, crops = self.cfg.train.calibrate, self.cfg.model.test_time_flip, self.cfg.model.test_time_crops
        if not (
            calibrate or self.cfg.model.averages_test_time_views or self.cfg.train.ensemble > 1 or self.head_refitted
        ):
            return None
        to_logits = head_logits(classifier.head)
        views = test_time_views(crops, flip)
        logits = np.stack([run_head(to_logits, pooled) for pooled in self.validation_features(classifier)])
        labels = np.asarray(self.val_set.labels)
        temperature = fit_temperature(labels, logits) if calibrate else 1.0
        if calibrate:
            classifier.head = with_temperature(classifier.head, temperature)
        classifier.model = attach_head(classifier, classifier.head, test_time_flip=flip, test_time_crops=crops)
        probabilities = mean_probabilities(logits, temperature)
        bins = self.cfg.evaluate.calibration_bins
        report = SavedModelReport(
            temperature if calibrate else None,
            val_accuracy=float(np.mean(probabilities.argmax(axis=1) == labels)),
            val_loss=log_loss(labels, probabilities),
            val_ece=calibration(labels, probabilities, bins).ece,
            val_ece_uncalibrated=calibration(labels, mean_probabilities(logits), bins).ece,
        )
        if len(views) > 1:
            _log_test_time_views(views, logits, labels, report.val_accuracy)
        if calibrate:
            log.info(
                "calibrated: temperature %.3f, validation ECE %.4f -> %.4f",
                temperature,
                report.val_ece_uncalibrated,
                report.val_ece,
            )
        return report

    def validation_features(self, classifier: Classifier) -> list[np.ndarray]:
        """Pooled backbone features of the validation images in each view the saved model averages
        (`images.test_time_views`: squares along the long side, and their mirror images)."""
        views = test_time_views(self.cfg.model.test_time_crops, self.cfg.model.test_time_flip)
        return [self._validation_pooled(classifier, *view) for view in views]

    def _validation_pooled(
        self, classifier: Classifier, position: float = CENTRE, mirrored: bool = False
    ) -> np.ndarray:
        """Pooled backbone features of the validation images (their squares at `position` along the
        long side, or the mirror images of those) under the final weights: from the cache while the
        backbone stayed frozen, else computed."""
        fit = self._final_fit(classifier)
        size, batch_size = self.image_size, self.cfg.train.batch_size
        central = position == CENTRE and not mirrored
        if fit.cut is None and fit.val_inputs is not None:  # pooled features, cached
            if central:
                return np.asarray(fit.val_inputs)
            key = FeatureKey.of_split(self.cfg.model, self.weights_digest, size, self.val_set)
            found = self.cache.test_time_activations_for(
                key,
                classifier.features,
                self.val_set,
                image_size=size,
                batch_size=batch_size,
                position=position,
                mirrored=mirrored,
            )
            return np.asarray(found.arrays[0][0])
        if fit.cut is not None and central:
            return np.asarray(fit.cut.to_pooled.predict(fit.val_inputs, verbose=0))
        from transferlab.layers import MirrorImage

        flip = MirrorImage() if mirrored else None
        dataset = make_dataset(
            self.val_set, image_size=size, batch_size=batch_size, augmenter=flip, positions=(position,)
        )
        return np.asarray(classifier.features.predict(dataset.map(lambda x, y: x), verbose=0))


def log_l2_search(run: tracking.Run, prefix: str, searched: Sequence[dict[str, float]]) -> None:
    """An L-BFGS search as MLflow metrics `<prefix>/l2`, `/val_loss`, `/val_accuracy`, one step per strength."""
    for step, tried in enumerate(searched, start=1):
        run.log_metrics({f"{prefix}/{k}": tried[k] for k in ("l2", "val_loss", "val_accuracy")}, step=step)


def _log_test_time_views(
    views: list[tuple[float, bool]], logits: np.ndarray, labels: np.ndarray, accuracy: float
) -> None:
    """The saved model's validation accuracy beside that of one view alone (the central square,
    when there is one: 2 crops have none)."""
    alone = views.index((CENTRE, False)) if (CENTRE, False) in views else 0
    log.info(
        "test-time views (%d): validation accuracy %.4f (the square at %g alone: %.4f)",
        len(views),
        accuracy,
        views[alone][0],
        float(np.mean(logits[alone].argmax(axis=1) == labels)),
    )


def _feasible(phase: Phase, classifier: Classifier) -> Phase:
    """The phase as it can run on this backbone: a cut with nothing frozen below it trains on images."""
    from transferlab.model import first_trainable_layer

    if phase.source == "cut" and first_trainable_layer(classifier.backbone, phase.unfreeze) <= 1:
        log.info(
            "unfreezing %s layers leaves no frozen layer below the cut: phase %s trains on images",
            phase.unfreeze,
            phase.name,
        )
        return dataclasses.replace(phase, source="images", views=1)
    return phase


def _inputs(arrays: list[np.ndarray], view: int) -> Any:
    """One view of the cached arrays as model input: an array, or a tuple for several cut tensors."""
    chosen = [np.asarray(a[view], dtype="float32") for a in arrays]
    return chosen[0] if len(chosen) == 1 else tuple(chosen)
