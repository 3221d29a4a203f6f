"""`train.head_solver: lbfgs`: the head fitted to convergence on cached features (linear_head.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import REPO_ROOT, curve_panels, mlflow_client, tiny_cfg, train_killed_after, train_to_the_end

from transferlab.config import compose, write_params
from transferlab.linear_head import L2_STRENGTHS, PATIENCE, best_fit, fit_logistic, search_l2, targets
from transferlab.paths import StagePaths
from transferlab.stages.train import train
from transferlab.trainer import L2_SEARCH_COLUMNS

CONF = REPO_ROOT / "conf"


def _blobs(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three overlapping Gaussian classes in 6 dimensions."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    return rng.normal(size=(rows, 6)) + np.eye(3, 6)[labels] * 1.5, labels


def test_the_fit_is_the_regularised_logistic_regression_scikit_learn_finds() -> None:
    """sklearn minimises C * sum(cross-entropy) + |W|^2 / 2, which is ours with l2 = 1 / (C * rows);
    ours stops at GRADIENT_TOLERANCE, so the probabilities agree to 1e-3, not to sklearn's 1e-10."""
    from sklearn.linear_model import LogisticRegression

    features, labels = _blobs(300, 0)
    kernel, bias = fit_logistic(features, targets(labels, 3), l2=1 / (0.05 * 300))
    reference = LogisticRegression(C=0.05, tol=1e-10, max_iter=10_000).fit(features, labels)
    logits = features @ kernel + bias
    ours = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(ours / ours.sum(axis=1, keepdims=True), reference.predict_proba(features), atol=1e-3)


def test_smoothed_targets_are_the_ones_keras_uses() -> None:
    np.testing.assert_allclose(targets(np.array([2, 0]), 4, 0.1), [[0.025, 0.025, 0.925, 0.025], [0.925] + [0.025] * 3])


def test_the_search_goes_from_strong_to_weak_and_stops_once_validation_loss_has_risen_twice() -> None:
    features, labels = _blobs(200, 1)
    val_features, val_labels = _blobs(100, 2)
    fits = search_l2(features, labels, val_features, val_labels, classes=3)
    tried = [fit.l2 for fit in fits]
    assert tried == list(L2_STRENGTHS[: len(tried)]) and tuple(sorted(L2_STRENGTHS, reverse=True)) == L2_STRENGTHS
    kept = best_fit(fits)
    assert kept.val_loss == min(fit.val_loss for fit in fits)
    assert len(tried) == len(L2_STRENGTHS) or tried[-PATIENCE - 1] == kept.l2, "two rises past the lowest end it"
    norms = [float(np.abs(fit.kernel).sum()) for fit in fits]
    assert norms == sorted(norms), "weaker penalties leave larger kernels"
    assert all(fit.loss > 0 and 0 <= fit.accuracy <= 1 for fit in fits)


@pytest.mark.parametrize(
    "overrides",
    [
        ("train.feature_cache=false",),
        ("train.strategy=multi_worker",),
        ("finetune.unfreeze=20",),  # one phase, the top of the backbone trained from the start
        ("augment=light", "augment.cached_views=0"),  # fresh augmentation every epoch
    ],
)
def test_a_head_phase_without_cached_pooled_features_steps_adam(overrides) -> None:
    from transferlab.trainer import plan_phases

    assert plan_phases(compose(list(overrides), CONF))[0].solver == "adam"
    assert plan_phases(compose([], CONF))[0].solver == "lbfgs", "the default, on cached features"


def test_the_settings_an_lbfgs_head_leaves_unread_are_named_with_the_reason() -> None:
    """New-user report: `make sweep` swept learning rate and dropout over the default L-BFGS head
    and trained four identical models without a word."""
    from transferlab.trainer import describe_inert, inert_settings

    frozen = inert_settings(compose([], CONF))
    assert {"train.learning_rate", "train.optimizer", "train.epochs", "model.dropout"} <= set(frozen)
    assert not {"train.label_smoothing", "model.feature_power", "model.test_time_crops"} & set(frozen), "it reads them"
    assert describe_inert({"train.learning_rate": frozen["train.learning_rate"]}) == (
        "train.learning_rate has no effect here: the frozen backbone's head is fitted by L-BFGS, its L2 strength "
        "searched on validation (add train.head_solver=adam to step it with Adam)"
    )
    assert describe_inert({k: frozen[k] for k in ("model.dropout", "train.learning_rate")}).startswith(
        "model.dropout, train.learning_rate have no effect here: the frozen backbone's head is fitted by L-BFGS"
    )
    without_finetuning = {"finetune.learning_rate", "finetune.warmup_epochs", "finetune.schedule"}
    assert without_finetuning <= set(frozen)
    assert set(inert_settings(compose(["train.head_solver=adam"], CONF))) == without_finetuning
    assert set(inert_settings(compose(["augment=light", "augment.cached_views=0"], CONF))) == without_finetuning
    # Fine-tuning steps with train.optimizer and weight decay, and trains the head with dropout, at
    # its own finetune.learning_rate, epochs, warm-up and schedule.
    top20 = inert_settings(compose(["finetune=top20"], CONF))
    assert not {"model.dropout", "train.optimizer", "train.weight_decay"} & set(top20)
    assert set(top20) == {"train.learning_rate", "train.epochs", "train.warmup_epochs", "train.schedule"}
    assert "train.schedule" not in inert_settings(compose(["finetune=top20", "finetune.schedule=null"], CONF))


@pytest.mark.slow
def test_the_settings_named_unread_leave_an_lbfgs_run_unchanged(prepared_project: StagePaths) -> None:
    """What `inert_settings` names for the frozen L-BFGS head, all changed at once, trains the same model."""
    from transferlab.trainer import inert_settings

    base = ("train.head_solver=lbfgs", "train.calibrate=true", "mlflow.log_model=false")
    changed = (
        "train.learning_rate=0.05",
        "train.epochs=7",
        "train.warmup_epochs=2",
        "train.schedule=cosine",
        "train.optimizer=sgd",
        "train.weight_decay=0.01",
        "model.dropout=0.6",
    )
    assert {o.split("=")[0] for o in changed} == {
        k for k in inert_settings(tiny_cfg(*base)) if k.startswith(("train", "model"))
    }
    first = train(tiny_cfg(*base), prepared_project)
    assert first.classifier is not None
    weights = [np.array(w) for w in first.classifier.model.get_weights()]
    second = train(tiny_cfg(*base, *changed), prepared_project)
    assert second.classifier is not None
    pd.testing.assert_frame_equal(first.history, second.history)
    for ours, theirs in zip(weights, second.classifier.model.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_an_lbfgs_head_phase_is_one_epoch_with_every_strength_in_mlflow(prepared_project: StagePaths) -> None:
    paths = prepared_project
    result = train(tiny_cfg("train.head_solver=lbfgs", "train.epochs=5", "mlflow.log_model=false"), paths)
    [row] = result.history.to_dict("records")
    assert (row["epoch"], row["phase"]) == (1, "head") and math.isnan(row["learning_rate"])
    client = mlflow_client(paths)
    searched = {
        name: [
            m.value for m in sorted(client.get_metric_history(result.run_id, f"l2_search/{name}"), key=lambda m: m.step)
        ]
        for name in ("l2", "val_loss", "val_accuracy")
    }
    assert searched["l2"] == list(L2_STRENGTHS[: len(searched["l2"])])
    kept = int(np.argmin(searched["val_loss"]))
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["head_l2"] == searched["l2"][kept]
    assert metrics["val_loss"] == pytest.approx(searched["val_loss"][kept])
    assert metrics["best_epoch"] == 1
    assert "learning_rate" not in metrics, "no NaN learning rate in MLflow"
    assert curve_panels(paths.training_curves) == 3, "loss, accuracy and the L2 search"
    table = pd.read_csv(paths.l2_search)  # what `dvc plots` draws: the search is this head's curve
    assert table["l2"].tolist() == searched["l2"] and table["val_loss"].tolist() == pytest.approx(searched["val_loss"])
    assert table["log10_l2"].tolist() == pytest.approx(np.log10(searched["l2"]).tolist())
    logged = Path(client.download_artifacts(result.run_id, "l2_search.csv", str(paths.root / "fetched")))
    assert logged.read_bytes() == paths.l2_search.read_bytes()


def test_a_head_stepped_by_adam_writes_an_empty_l2_search(prepared_project: StagePaths) -> None:
    paths = prepared_project
    train(tiny_cfg("train.head_solver=adam", "mlflow.log_model=false"), paths)
    table = pd.read_csv(paths.l2_search)
    assert table.empty and list(table.columns) == L2_SEARCH_COLUMNS


@pytest.mark.slow
def test_a_fine_tuning_run_after_an_lbfgs_head_resumes_after_a_kill_as_if_uninterrupted(
    prepared_project: StagePaths,
) -> None:
    paths = prepared_project
    cfg = tiny_cfg(
        "train.head_solver=lbfgs",
        "finetune.unfreeze=2",
        "finetune.epochs=6",
        "finetune.learning_rate=0.001",
        "train.early_stopping=null",
        "train.deterministic=true",
        "model.dropout=0.0",
        "mlflow.log_model=false",
    )
    write_params(cfg, paths.root / "params.yaml")
    train_to_the_end(paths)
    uninterrupted = paths.history.read_text()
    client = mlflow_client(paths)
    refit = {k: v for k, v in client.get_run(_run_id(paths)).data.metrics.items() if k.startswith("refit_")}

    state_file = paths.checkpoints / "state.json"
    train_killed_after(paths, state_file, epochs=3)  # the head's epoch and two of fine-tuning
    killed_run = json.loads(state_file.read_text())["run_id"]
    out = train_to_the_end(paths)
    assert "resuming after epoch" in out and "head: L-BFGS" not in out, "phase 1 is not fitted again"
    assert paths.history.read_text() == uninterrupted
    assert curve_panels(paths.training_curves) == 4, "phase 1's L2 search from the checkpoint, the refit's anew"
    steps = [m.step for m in client.get_metric_history(killed_run, "val_loss")]
    assert sorted(steps) == list(range(1, 8)), "every epoch logged exactly once"
    assert _run_id(paths) == killed_run and len(refit) == 4 + 3, "refit_*, and refit_search/* per strength"
    resumed = client.get_run(killed_run).data.metrics
    assert {k: resumed[k] for k in refit} == pytest.approx(refit), "the head refitted after fine-tuning, as before"


def _run_id(paths: StagePaths) -> str:
    from transferlab.tracking import RunRecord

    return RunRecord.read(paths.run_file).run_id
