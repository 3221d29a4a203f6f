"""Train stage: a real (tiny) Keras model on synthetic JPEGs, logged to a real SQLite MLflow store."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import (
    curve_panels,
    mlflow_client,
    run_cli,
    tiny_cfg,
    train_killed_after,
    train_to_the_end,
    widen_photos,
)

from transferlab import errors, tracking
from transferlab.config import write_params
from transferlab.errors import DataError
from transferlab.paths import StagePaths
from transferlab.stages.train import train
from transferlab.trainer import plan_phases

pytestmark = pytest.mark.slow


def test_one_epoch_writes_model_and_a_complete_mlflow_run(prepared_project: StagePaths) -> None:
    paths = prepared_project
    cfg = tiny_cfg()
    result = train(cfg, paths)

    assert paths.model_file.is_file() and paths.history.is_file() and paths.training_curves.stat().st_size > 0
    record = tracking.RunRecord.read(paths.run_file)
    assert record.run_id == result.run_id
    assert not paths.checkpoints.exists(), "a finished run must not leave a checkpoint to resume"

    client = mlflow_client(paths)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.backbone"] == "small_cnn"
    assert run.data.params["train.learning_rate"] == str(cfg.train.learning_rate)
    assert run.data.params["data.name"] == "synthetic"
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        assert [m.step for m in client.get_metric_history(result.run_id, metric)] == [1]
    tags = run.data.tags
    for tag in (
        tracking.TAG_CONFIG_HASH,
        tracking.TAG_MANIFEST_HASH,
        tracking.TAG_GIT_COMMIT,
        tracking.TAG_GIT_DIRTY,
        tracking.TAG_TF_VERSION,
        tracking.TAG_DEVICE,
    ):
        assert tags[tag], tag
    assert tags[tracking.TAG_DEVICE].startswith("CPU")
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "history.csv", "classes.json", "figures"} <= artifacts
    assert [a.path for a in client.list_artifacts(result.run_id, "figures")] == ["figures/training_curves.png"]

    history = pd.read_csv(paths.history)
    assert list(history.columns) == ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]
    assert history["epoch"].tolist() == [1]

    datasets = {d.dataset.name: d for d in run.inputs.dataset_inputs}  # "Datasets used" in the UI
    assert sorted(datasets) == ["synthetic-test", "synthetic-train", "synthetic-val"]
    assert {d.dataset.digest for d in datasets.values()} == {tags[tracking.TAG_MANIFEST_HASH]}
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in datasets.items()}
    assert contexts == {"synthetic-train": "training", "synthetic-val": "validation", "synthetic-test": "test"}
    description = tags["mlflow.note.content"]
    assert description.startswith("**small_cnn** (random weights, dropout 0.2) on **synthetic**: 3 classes;")
    assert f"**Best epoch** 1 of 1: validation accuracy **{history['val_accuracy'].iloc[-1]:.3f}**" in description
    (version,) = client.search_model_versions(f"name = '{cfg.mlflow.registered_model}'")
    assert version.run_id == result.run_id and version.source.startswith("models:/m-")


def test_logged_model_loads_through_pyfunc(prepared_project: StagePaths) -> None:
    import mlflow

    from transferlab.serving import encode_image_file

    result = train(tiny_cfg(), prepared_project)
    mlflow.set_tracking_uri(tracking.tracking_uri(tiny_cfg().mlflow, prepared_project.root))
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    images = sorted(prepared_project.raw_dataset("synthetic").rglob("*.jpg"))[:2]
    out = model.predict(pd.DataFrame({"image": [encode_image_file(p) for p in images]}))
    classes = json.loads(prepared_project.classes.read_text())
    assert len(out) == 2 and set(out["label"]) <= set(classes)
    assert ((out["probability"] > 0) & (out["probability"] <= 1)).all()
    assert out[classes].sum(axis=1).to_numpy() == pytest.approx([1.0, 1.0], abs=1e-4)


def _phase_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(("head:", "finetune:"))]


def test_two_phase_finetune_records_both_phases(prepared_project: StagePaths, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_cfg(
        "finetune=top20",
        "finetune.epochs=1",
        "finetune.warmup_epochs=0",
        "finetune.schedule=null",
        "finetune.learning_rate=0.0001",
    )
    with caplog.at_level(logging.INFO, logger="transferlab"):
        result = train(cfg, prepared_project)
    history = result.history
    assert history["phase"].tolist() == ["head", "finetune"]
    assert history["learning_rate"].tolist() == pytest.approx([cfg.train.learning_rate, 0.0001])
    head, finetune, refit = _phase_lines(caplog)
    lr = cfg.train.learning_rate
    views = "cached features of 3 augmented views"  # the default flips, one at each of the 3 squares
    assert head == f"head: backbone frozen, head trained on {views}; epochs 1..1 at learning rate {lr:g}"
    assert finetune.startswith("finetune: top 20 backbone layers unfrozen (")
    assert finetune.endswith("with weights; BatchNorm stays frozen); epochs 2..2 at learning rate 0.0001")
    # small_cnn has no frozen layer below its top 20: that phase trains on images, its flips fresh
    assert "this phase trains on images: fresh augmentation every epoch" in caplog.text
    assert refit == "finetune: the head is not refitted: phase finetune trained on images"


def test_augmented_training_bypasses_the_feature_cache(
    prepared_project: StagePaths, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_cfg("augment=light", "augment.cached_views=0")
    assert [p.source for p in plan_phases(cfg)] == ["images"]
    with caplog.at_level(logging.INFO, logger="transferlab"):
        train(cfg, prepared_project)
    assert not prepared_project.feature_cache.exists()
    assert _phase_lines(caplog) == [f"head: backbone frozen; epochs 1..1 at learning rate {cfg.train.learning_rate:g}"]


def test_cached_and_uncached_training_agree(prepared_project: StagePaths) -> None:
    epochs = ("train.epochs=3", "train.learning_rate=0.01")
    cached = train(tiny_cfg(*epochs), prepared_project).history
    assert any(prepared_project.feature_cache.glob("*.npz"))
    uncached = train(tiny_cfg(*epochs, "train.feature_cache=false"), prepared_project).history
    # Same data, order and weights: only dropout masks differ between the two graphs.
    assert cached["val_accuracy"].iloc[-1] == pytest.approx(uncached["val_accuracy"].iloc[-1], abs=0.15)
    assert cached["val_loss"].iloc[-1] == pytest.approx(uncached["val_loss"].iloc[-1], rel=0.2)


STOP_EARLY = "train.early_stopping={monitor:val_loss,patience:2}"


def _validation_loss(model_file: Path, paths: StagePaths) -> tuple[float, np.ndarray]:
    """Cross-entropy of a saved model on the validation images, and its probabilities."""
    from transferlab.images import square_positions
    from transferlab.inference import load_model, model_crops
    from transferlab.manifests import load_classes, load_manifest
    from transferlab.pipeline import make_dataset

    model = load_model(model_file)
    val = load_manifest(paths.manifest("val"), paths.raw_dataset("synthetic"), load_classes(paths.classes))
    squares = square_positions(model_crops(model))
    pixels = make_dataset(val, image_size=64, batch_size=8, positions=squares).map(lambda x, y: x)
    probabilities = model.predict(pixels, verbose=0)
    picked = probabilities[np.arange(len(val)), list(val.labels)]
    return float(-np.mean(np.log(np.clip(picked, 1e-7, 1)))), probabilities


def test_early_stopping_keeps_the_best_epoch_in_the_model_mlflow_and_evaluate(
    prepared_project: StagePaths, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow

    from transferlab.serving import encode_image_file
    from transferlab.stages.evaluate import evaluate

    paths = prepared_project
    # Uncalibrated, unflipped, one square: the saved model's validation loss is then the best epoch's
    # (calibration and test-time views have their own tests).
    plain = ("train.calibrate=false", "model.test_time_flip=false", "model.test_time_crops=1")
    cfg = tiny_cfg("train.epochs=12", "train.learning_rate=0.05", STOP_EARLY, *plain)
    with caplog.at_level(logging.INFO, logger="transferlab.trainer"):
        result = train(cfg, paths)
    history = result.history
    best = history.loc[history["val_loss"].idxmin()]
    assert result.best_epoch == best["epoch"] and result.val_accuracy == best["val_accuracy"]
    stopped = len(history) < 12
    assert not stopped or history["epoch"].iloc[-1] == result.best_epoch + 2, "stops `patience` epochs after the best"
    if stopped:  # the decision is logged after the epoch it is about
        last = int(history["epoch"].iloc[-1])
        lines = [r.getMessage() for r in caplog.records if r.name == "transferlab.trainer"]
        at = lines.index(f"early stopping after epoch {last}: best epoch {result.best_epoch}")
        assert lines[at - 1].startswith(f"epoch {last}/12 (head): ")
    loss, _ = _validation_loss(paths.model_file, paths)
    assert loss == pytest.approx(best["val_loss"], abs=2e-3), "the saved model holds the best epoch's weights"

    client = mlflow_client(paths)
    logged = client.get_run(result.run_id).data.metrics
    assert logged["best_epoch"] == result.best_epoch and logged["final_val_loss"] == pytest.approx(best["val_loss"])
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg.mlflow, paths.root))
    served = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    val_image = sorted(paths.raw_dataset("synthetic").rglob("*.jpg"))[0]
    classes = json.loads(paths.classes.read_text())
    out = served.predict(pd.DataFrame({"image": [encode_image_file(val_image)]}))
    direct = _validation_loss(paths.model_file, paths)[1]
    assert out[classes].to_numpy().shape == (1, 3) and direct.shape[1] == 3
    metrics = evaluate(cfg, paths)  # scores models/model.keras: the best epoch
    assert 0 <= metrics["test_accuracy"] <= 1


def test_resume_restores_optimizer_schedule_and_stopping_state_exactly(prepared_project: StagePaths) -> None:
    """An uninterrupted run and a run killed after an epoch, then resumed, train the same epochs alike."""
    paths = prepared_project
    cfg = tiny_cfg(
        "train.epochs=8",
        "train.learning_rate=0.05",
        "train.schedule=cosine",
        "train.warmup_epochs=2",
        STOP_EARLY.replace("patience:2", "patience:3"),
        "model.dropout=0.0",
        "train.deterministic=true",
        "mlflow.log_model=false",
    )
    write_params(cfg, paths.root / "params.yaml")
    train_to_the_end(paths)
    uninterrupted = pd.read_csv(paths.history)

    train_killed_after(paths, paths.checkpoints / "state.json", epochs=2)
    assert "resuming after epoch" in train_to_the_end(paths)
    pd.testing.assert_frame_equal(pd.read_csv(paths.history), uninterrupted)


def test_each_epoch_logs_the_learning_rate_of_its_first_step(prepared_project: StagePaths) -> None:
    """Warm-up over 2 epochs, then cosine decay over 2: the last epoch trains at half the rate, not 0."""
    from transferlab.model import WARMUP_START

    rate = 0.01
    cfg = tiny_cfg(
        "train.epochs=4",
        f"train.learning_rate={rate}",
        "train.schedule=cosine",
        "train.warmup_epochs=2",
        "train.early_stopping=null",
        "mlflow.log_model=false",
    )
    result = train(cfg, prepared_project)
    history = result.history
    halfway_up = WARMUP_START + (1 - WARMUP_START) / 2
    expected = [rate * WARMUP_START, rate * halfway_up, rate, rate / 2]
    assert history["learning_rate"].tolist() == pytest.approx(expected, rel=1e-5)
    logged = mlflow_client(prepared_project).get_metric_history(result.run_id, "learning_rate")
    assert [m.value for m in sorted(logged, key=lambda m: m.step)] == pytest.approx(expected, rel=1e-5)


def test_cached_augmented_views_train_the_head_at_cache_speed(prepared_project: StagePaths, caplog) -> None:
    from transferlab.feature_cache import FeatureCache

    cfg = tiny_cfg("augment=light", "augment.cached_views=3", "train.epochs=4", "model.test_time_crops=1")
    with caplog.at_level(logging.INFO, logger="transferlab"):
        first = train(cfg, prepared_project)
    assert "pooled backbone features: cache miss for 24 images" in caplog.text
    views = {}
    for file in prepared_project.feature_cache.glob("*.npz"):
        with np.load(file) as cached:
            views[json.loads(str(cached["key"]))["augmentation"]] = cached["array_0"].shape[0]
    # validation: the images themselves and (for test-time flipping) their mirror images; training: three views
    assert views.pop("none") == 1 and views.pop("mirror") == 1 and list(views.values()) == [3]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transferlab"):
        again = train(cfg, prepared_project)
    assert "pooled backbone features: cache hit for 24 images" in caplog.text and "miss" not in caplog.text
    assert len(first.history) == len(again.history) == 4
    assert len(list(prepared_project.feature_cache.glob("*.npz"))) == 3
    assert len(FeatureCache(prepared_project.feature_cache).directory.name) > 0


def test_cut_point_cache_trains_the_unfrozen_top_like_the_full_network(prepared_project: StagePaths) -> None:
    """Same seed, data order and weights: cached activations at the cut give the full network's epochs."""
    common = ("augment=none", "finetune.unfreeze=2", "train.epochs=3", "model.dropout=0.0", "train.deterministic=true")
    cut = train(tiny_cfg(*common), prepared_project).history
    stored = prepared_project.feature_cache.glob("*.npz")  # not "*": the cache folder also holds .locks/
    assert any("cut:" in json.loads(str(np.load(f)["key"]))["tensor"] for f in stored)
    full = train(tiny_cfg(*common, "train.feature_cache=false"), prepared_project).history
    assert (cut["val_accuracy"] - full["val_accuracy"]).abs().max() <= 0.005
    np.testing.assert_allclose(cut["val_loss"], full["val_loss"], rtol=0.02)


# Fine-tuning at a cut (small_cnn's top 2 layers), the saved model as trained: no calibration, no test-time views.
REFIT = (
    "train.head_solver=lbfgs",
    "finetune.unfreeze=2",
    "finetune.epochs=3",
    "finetune.learning_rate=0.0003",
    "train.early_stopping=null",
    "train.calibrate=false",
    "model.test_time_flip=false",
    "model.test_time_crops=1",
    "mlflow.log_model=false",
)


def test_after_fine_tuning_the_head_refitted_on_the_new_features_is_kept_when_it_validates_better(
    prepared_project: StagePaths, caplog: pytest.LogCaptureFixture
) -> None:
    paths = prepared_project
    with caplog.at_level(logging.INFO, logger="transferlab"):
        result = train(tiny_cfg(*REFIT), paths)
    run = mlflow_client(paths).get_run(result.run_id)
    logged = run.data.metrics
    trained = result.history["val_loss"].iloc[-1]  # the fine-tuned head's, at the last (kept) epoch
    assert "finetune: refitting the head by L-BFGS on 3 cached views of" in caplog.text
    assert logged["refit_l2"] > 0 and 0 <= logged["refit_val_accuracy"] <= 1
    assert logged["refit_kept"] == float(logged["refit_val_loss"] < trained)
    saved_loss, _ = _validation_loss(paths.model_file, paths)
    assert saved_loss == pytest.approx(min(logged["refit_val_loss"], trained), abs=2e-3), "the better head is saved"
    assert logged["final_val_loss"] == pytest.approx(saved_loss, abs=2e-3)
    outcome = "kept" if logged["refit_kept"] else "the fine-tuned head stays"
    assert "**Head refitted** after fine-tuning" in run.data.tags["mlflow.note.content"]
    assert f"against {trained:.3f}: {outcome}." in run.data.tags["mlflow.note.content"]
    client = mlflow_client(paths)
    history = {name: client.get_metric_history(run.info.run_id, f"refit_search/{name}") for name in ("l2", "val_loss")}
    searched = {name: [m.value for m in sorted(steps, key=lambda m: m.step)] for name, steps in history.items()}
    assert len(searched["l2"]) >= 2 and logged["refit_l2"] in searched["l2"], "every strength the refit tried"
    assert min(searched["val_loss"]) == pytest.approx(logged["refit_val_loss"])
    assert curve_panels(paths.training_curves) == 4, "loss, accuracy, phase 1's L2 search and the refit's"

    again = train(tiny_cfg(*REFIT, "finetune.refit_head=false"), paths)
    not_refitted = mlflow_client(paths).get_run(again.run_id).data.metrics
    assert not {"refit_l2", "refit_kept", "refit_search/l2"} & set(not_refitted)
    assert curve_panels(paths.training_curves) == 3
    assert _validation_loss(paths.model_file, paths)[0] == pytest.approx(again.history["val_loss"].iloc[-1], abs=2e-3)


def test_no_refit_when_fine_tuning_never_beat_the_head_phase(
    prepared_project: StagePaths, caplog: pytest.LogCaptureFixture
) -> None:
    """New-user report: the kept epoch was phase 1's (every fine-tuning epoch validated worse), and
    the refit still ran, on phase 1's features, and was described as a refit after fine-tuning."""
    diverging = [o for o in REFIT if not o.startswith(("train.early_stopping", "finetune.learning_rate"))]
    with caplog.at_level(logging.INFO, logger="transferlab"):
        result = train(tiny_cfg(*diverging, "finetune.learning_rate=5.0"), prepared_project)
    assert result.best_epoch == 1 and len(result.history) == 4, "phase 1's one epoch kept, 3 fine-tuning epochs run"
    assert "finetune: the head is not refitted: the kept epoch, 1, is phase head's" in caplog.text
    run = mlflow_client(prepared_project).get_run(result.run_id)
    assert not {"refit_l2", "refit_kept"} & set(run.data.metrics)
    assert "Head refitted" not in run.data.tags["mlflow.note.content"]


def test_calibration_puts_a_fitted_temperature_inside_the_saved_model(prepared_project: StagePaths) -> None:
    from transferlab.inference import load_model
    from transferlab.model import single_view_model

    paths = prepared_project
    result = train(tiny_cfg("train.calibrate=true", "train.epochs=4", "train.learning_rate=0.05"), paths)
    logged = mlflow_client(paths).get_run(result.run_id).data.metrics
    temperature = logged["temperature"]
    assert 0.05 <= temperature <= 20 and logged["val_loss_calibrated"] <= logged["final_val_loss"] + 1e-6
    layer = single_view_model(load_model(paths.model_file)).get_layer("head").get_layer("temperature")
    assert layer.get_config()["scale"] == pytest.approx(1 / temperature)
    loss, _ = _validation_loss(paths.model_file, paths)
    assert loss == pytest.approx(logged["val_loss_calibrated"], abs=2e-3)


def test_test_time_flipping_goes_into_the_saved_model_and_its_validation_accuracy(prepared_project: StagePaths) -> None:
    """On (the default), the saved model flips and `final_val_accuracy` and `final_val_loss` are that
    model's on the validation images (the loss differs from the kept epoch's, which did not flip);
    off (and uncalibrated), the trained classifier is saved as it is."""
    from transferlab.inference import load_model
    from transferlab.manifests import load_classes, load_manifest
    from transferlab.model import flips_at_test_time

    paths = prepared_project
    trained = ("train.epochs=5", "train.learning_rate=0.05", "train.calibrate=false", "mlflow.log_model=false")
    result = train(tiny_cfg(*trained), paths)
    assert flips_at_test_time(load_model(paths.model_file))
    loss, probabilities = _validation_loss(paths.model_file, paths)
    val = load_manifest(paths.manifest("val"), paths.raw_dataset("synthetic"), load_classes(paths.classes))
    accuracy = float(np.mean(probabilities.argmax(axis=1) == np.asarray(val.labels)))
    logged = mlflow_client(paths).get_run(result.run_id).data.metrics
    assert logged["final_val_accuracy"] == pytest.approx(accuracy) == result.val_accuracy  # what sweeps rank by
    assert logged["final_val_loss"] == pytest.approx(loss, abs=2e-3)
    kept = result.history.loc[result.history["epoch"] == result.best_epoch, "val_loss"].iloc[0]
    assert abs(kept - loss) > 2e-3, f"the flipped model's loss, not the kept epoch's ({loss} vs {kept})"
    assert "temperature" not in logged
    mirrored = [
        f for f in paths.feature_cache.glob("*.npz") if json.loads(str(np.load(f)["key"]))["augmentation"] == "mirror"
    ]
    assert len(mirrored) == 1, "the validation images' mirror features are cached"

    train(
        tiny_cfg(
            "train.epochs=2",
            "train.calibrate=false",
            "model.test_time_flip=false",
            "model.test_time_crops=1",
            "mlflow.log_model=false",
        ),
        paths,
    )
    assert not flips_at_test_time(load_model(paths.model_file))


def test_test_time_crops_go_into_the_saved_model_and_its_validation_accuracy(prepared_project: StagePaths) -> None:
    """With 3 crops the saved model takes 3 squares of each photo, `final_val_accuracy` is that
    model's on the validation photos, and the features of every view it averages are cached."""
    from transferlab.images import square_positions
    from transferlab.inference import load_model, model_crops
    from transferlab.manifests import load_classes, load_manifest
    from transferlab.pipeline import make_dataset

    paths = prepared_project
    widen_photos(paths)
    cfg = tiny_cfg("train.epochs=3", "model.test_time_crops=3")
    result = train(cfg, paths)
    model = load_model(paths.model_file)
    assert model_crops(model) == 3
    val = load_manifest(paths.manifest("val"), paths.raw_dataset("synthetic"), load_classes(paths.classes))
    squares = make_dataset(val, image_size=64, batch_size=8, positions=square_positions(3)).map(lambda x, y: x)
    probabilities = model.predict(squares, verbose=0)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == np.asarray(val.labels)))
    logged = mlflow_client(paths).get_run(result.run_id).data.metrics
    assert logged["final_val_accuracy"] == pytest.approx(accuracy) == result.val_accuracy
    views = {json.loads(str(np.load(f)["key"]))["augmentation"] for f in paths.feature_cache.glob("*.npz")}
    expected = {"mirror", "square at 0", "square at 0, mirror", "square at 1", "square at 1, mirror"}
    assert expected <= views, "the validation images' features of every view are cached"
    assert (
        "With test-time crops (3) and flipping (the saved model)"
        in mlflow_client(paths).get_run(result.run_id).data.tags["mlflow.note.content"]
    )
    # the logged MLflow model takes one photo per row and cuts its 3 squares itself
    import mlflow

    from transferlab.serving import encode_image_file

    mlflow.set_tracking_uri(tracking.tracking_uri(cfg.mlflow, paths.root))
    served = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    out = served.predict(pd.DataFrame({"image": [encode_image_file(Path(val.absolute_paths[0]))]}))
    classes = json.loads(paths.classes.read_text())
    np.testing.assert_allclose(out[classes].to_numpy()[0], probabilities[0], atol=1e-5)


def test_cached_training_views_are_taken_in_turn_at_the_squares_of_augment_crops(prepared_project: StagePaths) -> None:
    """With `augment.crops=3` and 3 cached views (no random augmentation), view v of every
    training photo is the backbone's features of its square at position v / 2 along the long side."""
    from transferlab.images import square_positions
    from transferlab.manifests import load_classes, load_manifest
    from transferlab.pipeline import make_dataset

    paths = prepared_project
    widen_photos(paths)
    crops = ("augment=none", "augment.crops=3", "augment.cached_views=3", "model.test_time_crops=3")
    result = train(tiny_cfg(*crops, "mlflow.log_model=false"), paths)
    train_set = load_manifest(paths.manifest("train"), paths.raw_dataset("synthetic"), load_classes(paths.classes))
    (cached,) = [
        data["array_0"]
        for data in map(np.load, paths.feature_cache.glob("*.npz"))
        if data["array_0"].shape[:2] == (3, len(train_set))
    ]
    for view, position in enumerate(square_positions(3)):
        squares = make_dataset(train_set, image_size=64, batch_size=8, positions=(position,)).map(lambda x, y: x)
        expected = result.classifier.features.predict(squares, verbose=0)
        np.testing.assert_allclose(cached[view], expected, atol=1e-4)
    assert not np.allclose(cached[0], cached[2], atol=1e-3), "the first and last squares differ"


def test_missing_splits_name_the_stage_to_run(tmp_path: Path) -> None:
    paths = StagePaths(tmp_path)
    with pytest.raises(DataError, match=r"dvc repro split"):
        train(tiny_cfg(), paths)


def test_stale_splits_are_refused(prepared_project: StagePaths) -> None:
    with pytest.raises(DataError, match=r"stale.*data.val_fraction.*dvc repro split"):
        train(tiny_cfg("data.val_fraction=0.3"), prepared_project)


def test_cli_reports_missing_data_in_one_line(tmp_path: Path) -> None:
    paths = StagePaths(tmp_path)
    write_params(tiny_cfg(), tmp_path / "params.yaml")
    proc = run_cli(paths, "train")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    last = out.strip().splitlines()[-1]
    assert last.startswith("DataError: ") and "dvc repro split" in last
    assert "Traceback" not in out


def test_deterministic_runs_give_identical_metrics(prepared_project: StagePaths) -> None:
    paths = prepared_project
    write_params(
        tiny_cfg("train.epochs=2", "train.deterministic=true", "mlflow.log_model=false"), paths.root / "params.yaml"
    )
    histories = []
    for _ in range(2):
        proc = run_cli(paths, "train")
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:]
        histories.append(pd.read_csv(paths.history))
    pd.testing.assert_frame_equal(histories[0], histories[1])


MIRRORED_SCRIPT = """
import sys
from pathlib import Path
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from transferlab.config import load_params
from transferlab.paths import StagePaths
from transferlab.runtime import make_strategy
from transferlab.stages.train import train
cfg = load_params(Path("params.yaml"))
strategy = make_strategy(cfg.train)
print("replicas", strategy.num_replicas_in_sync, type(strategy).__name__)
result = train(cfg, StagePaths(Path.cwd()))
print("val_accuracy", result.val_accuracy)
"""


def test_mirrored_strategy_on_two_logical_cpus(prepared_project: StagePaths) -> None:
    paths = prepared_project
    write_params(tiny_cfg("train.strategy=mirrored", "mlflow.log_model=false"), paths.root / "params.yaml")
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT], cwd=paths.root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replicas 2 MirroredStrategy" in done.stdout
    assert paths.model_file.is_file()


def test_a_stop_that_a_library_swallowed_still_ends_training_at_the_epoch(
    prepared_project: StagePaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stress run of test_faults once saw a `transferlab-train` given Ctrl-C train to the end and
    exit 0: the handler ran, and its exception never reached us. At the end of the epoch the stop
    wins: the run ends KILLED, nothing is saved and the epoch is not checkpointed."""
    monkeypatch.setattr(errors, "_received", [signal.SIGINT])  # the handler ran; its Interrupted was lost
    with pytest.raises(errors.Interrupted):
        train(tiny_cfg("train.epochs=3"), prepared_project)
    experiment = tracking.open_store(tiny_cfg().mlflow, prepared_project.root).experiment_id
    [run] = mlflow_client(prepared_project).search_runs([experiment])
    assert run.info.status == "KILLED"
    assert run.data.tags[tracking.TAG_ERROR] == "Interrupted: SIGINT received"
    assert not run.data.metrics, "no epoch was logged"
    assert not prepared_project.model_file.exists()
