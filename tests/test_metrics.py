"""metrics.py against values worked out by hand on a tiny fixed prediction set."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transferlab.metrics import (
    EPS,
    calibration,
    classification_report,
    confusion_matrix,
    fit_temperature,
    log_loss,
    mean_probabilities,
    softmax,
    top_k_accuracy,
)

# Seven images, three classes (supports 2, 3, 2). Argmax predictions: 0, 1, 1, 1, 0, 2, 1,
# so rows 1 (true 0) and 4 (true 2) are wrong; row 4's true class is not even in its top 2.
Y_TRUE = np.array([0, 0, 1, 1, 2, 2, 1])
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],
        [0.35, 0.55, 0.10],
        [0.20, 0.50, 0.30],
        [0.10, 0.85, 0.05],
        [0.50, 0.40, 0.10],
        [0.05, 0.10, 0.85],
        [0.20, 0.70, 0.10],
    ]
)
# Confusion (rows actual, columns predicted): [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
# precision = TP / predicted = 1/2, 3/4, 1/1;  recall = TP / support = 1/2, 3/3, 1/2
PRECISION = [0.5, 0.75, 1.0]
RECALL = [0.5, 1.0, 0.5]
F1 = [0.5, 2 * 0.75 * 1.0 / 1.75, 2 * 1.0 * 0.5 / 1.5]  # 0.5, 6/7, 2/3


def test_confusion_matrix_counts_actual_by_predicted() -> None:
    expected = [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    assert confusion_matrix(Y_TRUE, PROBS.argmax(axis=1), 3).tolist() == expected


def test_report_matches_hand_computed_values() -> None:
    report = classification_report(Y_TRUE, PROBS, top_k=2)
    assert report.accuracy == pytest.approx(5 / 7)
    assert report.top_k == 2
    assert report.top_k_accuracy == pytest.approx(6 / 7)
    assert report.precision == pytest.approx(PRECISION)
    assert report.recall == pytest.approx(RECALL)
    assert report.f1 == pytest.approx(F1)
    assert report.support.tolist() == [2, 3, 2]
    assert report.macro_precision == pytest.approx(0.75)
    assert report.macro_recall == pytest.approx(2 / 3)
    assert report.macro_f1 == pytest.approx((0.5 + 6 / 7 + 2 / 3) / 3)
    assert report.weighted_precision == pytest.approx((2 * 0.5 + 3 * 0.75 + 2 * 1.0) / 7)
    assert report.weighted_recall == pytest.approx(5 / 7)  # always equals accuracy
    assert report.weighted_f1 == pytest.approx((2 * 0.5 + 3 * 6 / 7 + 2 * 2 / 3) / 7)
    true_class_probs = [0.70, 0.35, 0.50, 0.85, 0.10, 0.85, 0.70]
    assert report.log_loss == pytest.approx(-sum(math.log(p) for p in true_class_probs) / 7)


def test_top_k_accuracy_per_k() -> None:
    assert top_k_accuracy(Y_TRUE, PROBS, 1) == pytest.approx(5 / 7)
    assert top_k_accuracy(Y_TRUE, PROBS, 2) == pytest.approx(6 / 7)
    assert top_k_accuracy(Y_TRUE, PROBS, 3) == 1.0
    assert top_k_accuracy(Y_TRUE, PROBS, 10) == 1.0  # k above the class count is clipped


def test_class_never_predicted_scores_zero_precision_not_nan() -> None:
    y = np.array([0, 1, 2])
    p = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.8, 0.1]])  # class 2 never predicted
    report = classification_report(y, p)
    assert report.precision.tolist() == [0.5, 0.0, 0.0]
    assert report.f1[2] == 0.0
    assert not np.isnan(report.macro_f1)


def test_log_loss_clips_zero_probability() -> None:
    value = log_loss(np.array([1]), np.array([[1.0, 0.0]]))
    assert value == pytest.approx(-math.log(EPS))


def test_calibration_bins_and_ece_by_hand() -> None:
    # Five bins of width 0.2. Top-1 confidences: .70 .55 .50 .85 .50 .85 .70
    #   (0.4, 0.6]: .55 (wrong) .50 (right) .50 (wrong) -> 3 images, conf 1.55/3, acc 1/3
    #   (0.6, 0.8]: .70 .70 (both right)                 -> 2 images, conf 0.70,   acc 1
    #   (0.8, 1.0]: .85 .85 (both right)                 -> 2 images, conf 0.85,   acc 1
    result = calibration(Y_TRUE, PROBS, bins=5)
    assert result.bin_edges == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert result.count.tolist() == [0, 0, 3, 2, 2]
    assert result.confidence[2:] == pytest.approx([1.55 / 3, 0.70, 0.85])
    assert result.accuracy[2:] == pytest.approx([1 / 3, 1.0, 1.0])
    assert np.isnan(result.confidence[:2]).all() and np.isnan(result.accuracy[:2]).all()
    expected_ece = 3 / 7 * abs(1 / 3 - 1.55 / 3) + 2 / 7 * abs(1 - 0.70) + 2 / 7 * abs(1 - 0.85)
    assert result.ece == pytest.approx(expected_ece)
    assert result.ece == pytest.approx(1.45 / 7)


def test_perfectly_confident_and_right_is_perfectly_calibrated() -> None:
    y = np.array([0, 1, 1])
    p = np.eye(2)[y]
    assert calibration(y, p).ece == 0.0
    assert classification_report(y, p).accuracy == 1.0


@pytest.mark.parametrize(
    ("y", "p"),
    [
        (np.array([0, 1]), np.array([0.5, 0.5])),  # probabilities not 2-D
        (np.array([0, 3]), np.full((2, 3), 1 / 3)),  # class index out of range
        (np.array([0]), np.full((2, 3), 1 / 3)),  # lengths differ
        (np.array([], dtype=int), np.zeros((0, 3))),  # nothing to score
    ],
)
def test_bad_inputs_are_rejected(y: np.ndarray, p: np.ndarray) -> None:
    with pytest.raises(ValueError):
        classification_report(y, p)


def test_agrees_with_scikit_learn_on_random_predictions() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, size=200)
    logits = rng.normal(size=(200, 5)) + 2.0 * np.eye(5)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    report = classification_report(y, p, top_k=3)
    pred = p.argmax(axis=1)
    prf = sklearn_metrics.precision_recall_fscore_support(y, pred, labels=range(5), zero_division=0)
    assert report.precision == pytest.approx(prf[0])
    assert report.recall == pytest.approx(prf[1])
    assert report.f1 == pytest.approx(prf[2])
    assert report.macro_f1 == pytest.approx(sklearn_metrics.f1_score(y, pred, average="macro"))
    assert report.weighted_f1 == pytest.approx(sklearn_metrics.f1_score(y, pred, average="weighted"))
    assert report.log_loss == pytest.approx(sklearn_metrics.log_loss(y, p, labels=range(5)))
    assert report.top_k_accuracy == pytest.approx(sklearn_metrics.top_k_accuracy_score(y, p, k=3, labels=range(5)))


def test_temperature_of_several_views_minimises_the_log_loss_of_their_mean() -> None:
    """Logits shaped (views, images, classes): `mean_probabilities` averages the views'
    probabilities, and the fitted temperature minimises the log loss of that mean (checked
    against a fine grid)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    logits = rng.normal(0, 2, (2, 300, 4)) + 3.0 * np.eye(4)[labels]  # two views
    np.testing.assert_allclose(mean_probabilities(logits), (softmax(logits[0]) + softmax(logits[1])) / 2)
    np.testing.assert_allclose(mean_probabilities(logits[0], 2.0), softmax(logits[0], 2.0))
    fitted = fit_temperature(labels, logits)
    grid = np.geomspace(0.05, 20.0, 3000)  # fit_temperature's bounds
    best = grid[np.argmin([log_loss(labels, mean_probabilities(logits, t)) for t in grid])]
    assert 0.1 < best < 10 and fitted == pytest.approx(best, rel=0.005)
