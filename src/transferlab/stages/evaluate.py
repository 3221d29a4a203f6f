"""Evaluate stage: score the trained model on the held-out test split.

Writes `reports/evaluation/` (every file declared in `dvc.yaml`):
- `metrics.json`: flat numeric test metrics (`test_accuracy`, `test_top2_accuracy`,
  `test_macro_f1`, `test_log_loss`, `test_ece`, ...) and `mlflow_run_id`, DVC metrics;
- `per_class.csv`: `class,precision,recall,f1,support`;
- `confusion.csv`: `actual,predicted` class names, one row per test image, for
  DVC's confusion template;
- `figures/{confusion_matrix,misclassified,reliability}.png`.
The same metrics and files, the test split as a dataset input and the test results in the run's
description are logged into the MLflow run that trained the model (`models/run.json`), so one
run holds both validation and test results.

All of it is one unit. The folder is built aside; its files go to MLflow first, then the test
metrics in one batch, and the folder is swapped in last. A kill leaves the previous folder
whole (and MLflow holding the previous metrics, or all the new ones), never a mix of the two.
A sweep job with a figure worker leaves its figures to follow it (`figure_workers.follow`):
they are drawn into the folder once it is in place and logged, then the test metrics, while the
next job trains; a job whose test metrics MLflow lacks is trained again by a resumed sweep.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from transferlab import figure_workers, plots, tracking
from transferlab.atomic import replace_dir
from transferlab.config import Config
from transferlab.console import keras_progress
from transferlab.descriptions import with_test_results
from transferlab.errors import DataError, ModelError, stop_if_received
from transferlab.images import square_positions, test_time_views
from transferlab.inference import load_model, model_crops, model_image_size
from transferlab.locks import stage_lock
from transferlab.manifests import Manifest, check_splits_fresh, load_classes, load_manifest, split_datasets
from transferlab.metrics import Calibration, ClassificationReport, calibration, classification_report
from transferlab.paths import StagePaths
from transferlab.pipeline import make_dataset

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

PER_CLASS_COLUMNS = ["class", "precision", "recall", "f1", "support"]
# Side of each thumbnail in the misclassified grid, in pixels.
THUMBNAIL_SIZE = 160
# The key of metrics.json naming the MLflow run that holds these results (`dvc exp show` lists it).
RUN_ID_KEY = "mlflow_run_id"
# The MLflow artifact folder of the reports inside the training run (figures: tracking.FIGURE_ARTIFACT_DIR).
ARTIFACT_DIR = "evaluation"


def figure_files(paths: StagePaths) -> list[Path]:
    """The PNGs evaluate writes (the training curves belong to the train stage)."""
    return [paths.confusion_figure, paths.misclassified_figure, paths.reliability_figure]


def predict_manifest(model: keras.Model, manifest: Manifest, batch_size: int) -> np.ndarray:
    """Class probabilities (n, classes) for every image of a split, in manifest order."""
    positions = square_positions(model_crops(model))
    photos = max(1, batch_size // len(positions))  # a batch holds `batch_size` squares, as in training
    dataset = make_dataset(
        manifest, image_size=model_image_size(model), batch_size=photos, cache=False, positions=positions
    )
    with keras_progress("evaluating") as progress:
        probabilities = model.predict(dataset.map(lambda x, y: x), verbose=0, callbacks=[progress])
    return np.asarray(probabilities, dtype=np.float64)


def predict_from_feature_cache(
    cfg: Config, paths: StagePaths, model: keras.Model, test: Manifest, features: keras.Model | None = None
) -> np.ndarray | None:
    """Test probabilities from cached backbone features, or None when the cache does not apply.

    It applies when the model's backbone still has the weights its features were cached with
    during training (the validation split's features are in the cache under that weights
    digest): the backbone was frozen, so only the head needs to run. The test features are
    computed once on a miss and cached for later evaluations of the same backbone, by
    `features` when given (the trained classifier's extractor, whose predict function training
    already traced), else by an extractor cut out of `model`. A model with test-time flipping or
    crops gets the mean of the head's probabilities over the same views it averages (each
    cached the same way).
    """
    from transferlab.feature_cache import FeatureCache, FeatureKey
    from transferlab.model import (
        HEAD_MODEL,
        POOL_LAYER,
        flips_at_test_time,
        run_head,
        single_view_model,
        weights_digest,
    )

    single_view = single_view_model(model)
    backbones = [layer for layer in single_view.layers if hasattr(layer, "layers") and layer.name != HEAD_MODEL]
    if len(backbones) != 1 or POOL_LAYER not in {layer.name for layer in single_view.layers}:
        return None
    cache = FeatureCache.of_project(paths, cfg.train)
    image_size = model_image_size(model)
    val = load_manifest(paths.manifest("val"), paths.raw_dataset(cfg.data.name), test.classes)

    digest = weights_digest(backbones[0])

    def key(manifest: Manifest) -> FeatureKey:
        return FeatureKey.of_split(cfg.model, digest, image_size, manifest)

    if not cache.holds(key(val)):
        return None
    import keras

    # The pooling layer's first call is on the image itself (a flipping model's second: its mirror image).
    extractor = (
        features if features is not None else keras.Model(single_view.input, single_view.get_layer(POOL_LAYER).output)
    )
    head = single_view.get_layer(HEAD_MODEL)
    hits, probabilities = [], []
    for position, mirrored in test_time_views(model_crops(model), flips_at_test_time(model)):
        found = cache.test_time_activations_for(
            key(test),
            extractor,
            test,
            image_size=image_size,
            batch_size=cfg.train.batch_size,
            position=position,
            mirrored=mirrored,
        )
        hits.append(found.hit)
        probabilities.append(run_head(head, found.arrays[0][0]))
    log.info("test features from the cache (%s): only the head runs", "hit" if all(hits) else "computed once")
    return np.mean(probabilities, axis=0)


def metrics_dict(report: ClassificationReport, reliability: Calibration, images: int) -> dict[str, float]:
    """The flat `test_*` numbers written to metrics.json and logged to MLflow."""
    values = {
        "test_accuracy": report.accuracy,
        f"test_top{report.top_k}_accuracy": report.top_k_accuracy,
        "test_macro_precision": report.macro_precision,
        "test_macro_recall": report.macro_recall,
        "test_macro_f1": report.macro_f1,
        "test_weighted_precision": report.weighted_precision,
        "test_weighted_recall": report.weighted_recall,
        "test_weighted_f1": report.weighted_f1,
        "test_log_loss": report.log_loss,
        "test_ece": reliability.ece,
    }
    return {**{k: round(float(v), 6) for k, v in values.items()}, "test_images": images}


def per_class_frame(report: ClassificationReport, classes: list[str]) -> pd.DataFrame:
    """One row per class, in classes.json order."""
    return pd.DataFrame(
        {
            "class": classes,
            "precision": np.round(report.precision, 6),
            "recall": np.round(report.recall, 6),
            "f1": np.round(report.f1, 6),
            "support": report.support,
        },
        columns=PER_CLASS_COLUMNS,
    )


def confusion_frame(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """`actual,predicted` class names per test image (DVC's confusion template counts them)."""
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame({"actual": names[y_true], "predicted": names[y_pred]})


def most_confident_mistakes(y_true: np.ndarray, probabilities: np.ndarray, limit: int) -> np.ndarray:
    """Indices of wrong predictions, highest predicted-class probability first, at most `limit`."""
    predicted = np.argmax(probabilities, axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:limit]


def _load_inputs(
    cfg: Config, paths: StagePaths, model: keras.Model | None
) -> tuple[list[str], Manifest, tracking.RunRecord, keras.Model]:
    """Classes, test manifest, run record and model (loaded unless given): each failure names the stage to run."""
    check_splits_fresh(cfg, paths)
    classes = load_classes(paths.classes)
    test = load_manifest(paths.manifest("test"), paths.raw_dataset(cfg.data.name), classes)
    if len(test) == 0:
        raise DataError(f"{paths.manifest('test')} is empty: set data.test_fraction > 0 and run `dvc repro split`")
    model = model if model is not None else load_model(paths.model_file)
    outputs = int(model.output_shape[-1])
    if outputs != len(classes):
        raise ModelError(
            f"{paths.model_file} predicts {outputs} classes but {paths.classes} lists {len(classes)}: "
            "run `dvc repro train`"
        )
    return classes, test, tracking.RunRecord.read(paths.run_file), model


def _staged(folder: Path, paths: StagePaths, file: Path) -> Path:
    """Where `file` of `reports/evaluation/` is written in `folder`, the one that will replace it."""
    return folder / file.relative_to(paths.evaluation)


@dataclass(frozen=True)
class _Scores:
    """The test split scored: what the reports and figures are made of."""

    test: Manifest
    classes: list[str]
    probabilities: np.ndarray
    report: ClassificationReport
    reliability: Calibration
    metrics: dict[str, float]


def _draw_figures(targets: list[Path], cfg: Config, scores: _Scores) -> list[figure_workers.Drawing]:
    """The three figures, in the figure worker when there is one."""
    confusion_png, misclassified_png, reliability_png = targets
    classes, probabilities = scores.classes, scores.probabilities
    y_true = np.asarray(scores.test.labels)
    picked = most_confident_mistakes(y_true, probabilities, cfg.evaluate.misclassified)
    predicted = np.argmax(probabilities, axis=1)
    photos = scores.test.absolute_paths
    mistakes = figure_workers.draw(
        plots.plot_misclassified_files,
        [Path(photos[i]) for i in picked],
        [classes[y_true[i]] for i in picked],
        [classes[predicted[i]] for i in picked],
        [float(probabilities[i, predicted[i]]) for i in picked],
        misclassified_png,
        THUMBNAIL_SIZE,
    )
    confusion = figure_workers.draw(plots.plot_confusion_matrix, scores.report.confusion, classes, confusion_png)
    calibration_figure = figure_workers.draw(plots.plot_reliability, scores.reliability, reliability_png)
    return [confusion, mistakes, calibration_figure]


def _write_reports(
    cfg: Config,
    paths: StagePaths,
    store: tracking.Store,
    record: tracking.RunRecord,
    scores: _Scores,
    *,
    with_figures: bool,
) -> None:
    """The unit of the module docstring: `reports/evaluation/` and its MLflow logging, the figures
    and the test metrics in it `with_figures`."""
    with replace_dir(paths.evaluation) as folder:
        metrics_json, per_class_csv, confusion_csv = (
            _staged(folder, paths, file) for file in (paths.metrics, paths.per_class, paths.confusion)
        )
        metrics_json.write_text(json.dumps({**scores.metrics, RUN_ID_KEY: record.run_id}, indent=2) + "\n")
        per_class_frame(scores.report, scores.classes).to_csv(per_class_csv, index=False)
        predicted = np.argmax(scores.probabilities, axis=1)
        confusion_frame(np.asarray(scores.test.labels), predicted, scores.classes).to_csv(confusion_csv, index=False)
        staged = [_staged(folder, paths, file) for file in figure_files(paths)]
        figures = _draw_figures(staged, cfg, scores) if with_figures else []
        log.info("logging the evaluation to MLflow run %s", record.run_id)
        with figure_workers.settled(*figures), store.reopen_run(record.run_id) as run:
            run.log_datasets(split_datasets(cfg, paths, ["test"]))
            for file in (metrics_json, per_class_csv, confusion_csv):
                run.log_artifact(file, ARTIFACT_DIR)
            run.description = with_test_results(run.description, scores.metrics, cfg.evaluate.top_k)
            if with_figures:
                _log_figures_then_metrics(run, scores.metrics, [figure.path() for figure in figures])


def _log_figures_then_metrics(run: tracking.Run, metrics: dict[str, float], figures: list[Path]) -> None:
    for figure in figures:
        run.log_artifact(figure, tracking.FIGURE_ARTIFACT_DIR)
    run.log_metrics(metrics)  # last, in one batch: test metrics in MLflow mean the reports are there too


def evaluate(
    cfg: Config, paths: StagePaths, *, model: keras.Model | None = None, features: keras.Model | None = None
) -> dict[str, float]:
    """Score `models/model.keras` on the test split; write reports, log them to the training run.

    A sweep job passes the `model` it has just trained and saved, so it is not loaded again,
    and its feature extractor `features` (see `predict_from_feature_cache`). One evaluate at a
    time per output folder (`BusyError` for a second).
    """
    with stage_lock(paths.locks, "evaluate"):
        classes, test, record, model = _load_inputs(cfg, paths, model)
        store = tracking.Store.of_record(record)
        with store.killed_if_interrupted(record.run_id):  # the training run says the evaluation was stopped
            return _evaluate(cfg, paths, store, classes, test, record, model, features)


def _evaluate(
    cfg: Config,
    paths: StagePaths,
    store: tracking.Store,
    classes: list[str],
    test: Manifest,
    record: tracking.RunRecord,
    model: keras.Model,
    features: keras.Model | None,
) -> dict[str, float]:
    stop_if_received()  # one that training's last steps swallowed: the run ends KILLED, unscored
    log.info("evaluating %s on %d test images", paths.model_file, len(test))
    probabilities = predict_from_feature_cache(cfg, paths, model, test, features)
    if probabilities is None:
        probabilities = predict_manifest(model, test, cfg.train.batch_size)
    y_true = np.asarray(test.labels)
    report = classification_report(y_true, probabilities, top_k=cfg.evaluate.top_k)
    reliability = calibration(y_true, probabilities, bins=cfg.evaluate.calibration_bins)
    scores = _Scores(test, classes, probabilities, report, reliability, metrics_dict(report, reliability, len(test)))

    # In a sweep with a figure worker, the figures follow the job: drawn into the folder once it
    # is in place, and logged with the test metrics while the next job trains. A stop meanwhile
    # waits until the folder is in place and its figures are on their way.
    with figure_workers.outputs_followed() as follows:
        _write_reports(cfg, paths, store, record, scores, with_figures=not follows)
        if follows:
            drawings = _draw_figures(figure_files(paths), cfg, scores)
            then = functools.partial(_log_figures_then_metrics, store.run(record.run_id), scores.metrics)
            figure_workers.follow(drawings, then, f"the evaluation of MLflow run {record.run_id}")
    log.info(
        "test accuracy %.4f, top-%d %.4f, macro F1 %.4f, log loss %.4f, ECE %.4f (MLflow run %s)",
        report.accuracy,
        report.top_k,
        report.top_k_accuracy,
        report.macro_f1,
        report.log_loss,
        reliability.ece,
        record.run_id,
    )
    log.info("%s", tracking.results_line(paths, record))
    return scores.metrics
