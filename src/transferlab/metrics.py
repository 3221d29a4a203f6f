"""Classification metrics from true class indices and a probability matrix (pure numpy).

Every function takes `y_true` (n,) integer class indices and `probabilities` (n, classes),
rows summing to 1, as the model's softmax returns them. Definitions follow scikit-learn's
(`precision_recall_fscore_support`, `log_loss`, `top_k_accuracy_score`) with
`zero_division=0`, so reports from either agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Probabilities are clipped to [EPS, 1] before taking logs (a hard 0 would give log loss inf).
EPS = 1e-15


@dataclass(frozen=True)
class ClassificationReport:
    """Headline metrics plus per-class precision, recall, F1 and support (class index order)."""

    accuracy: float
    top_k: int
    top_k_accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    log_loss: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    confusion: np.ndarray  # confusion[actual, predicted] counts


@dataclass(frozen=True)
class Calibration:
    """Reliability of the top-1 confidence in equal-width bins over [0, 1]."""

    bin_edges: np.ndarray  # (bins + 1,)
    confidence: np.ndarray  # mean top-1 probability per bin (nan where empty)
    accuracy: np.ndarray  # fraction correct per bin (nan where empty)
    count: np.ndarray  # images per bin
    ece: float  # expected calibration error: sum over bins of count/n * |accuracy - confidence|


def _check(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"need y_true (n,) and probabilities (n, classes), got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise ValueError("no examples to score")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true must hold class indices in [0, {p.shape[1]})")
    return y.astype(np.int64), p


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with rows = actual class, columns = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def top_k_accuracy(y_true: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the k most probable (ties broken by index)."""
    y, p = _check(y_true, probabilities)
    k = min(k, p.shape[1])
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == y[:, None], axis=1)))


def log_loss(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean negative log probability of the true class."""
    y, p = _check(y_true, probabilities)
    true_prob = np.clip(p[np.arange(len(y)), y], EPS, 1.0)
    return float(-np.mean(np.log(true_prob)))


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def classification_report(y_true: np.ndarray, probabilities: np.ndarray, top_k: int = 2) -> ClassificationReport:
    """All headline and per-class metrics; the prediction is the argmax of each row."""
    y, p = _check(y_true, probabilities)
    num_classes = p.shape[1]
    confusion = confusion_matrix(y, np.argmax(p, axis=1), num_classes)
    true_positive = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = _safe_divide(true_positive, predicted.astype(np.float64))
    recall = _safe_divide(true_positive, support.astype(np.float64))
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    weights = support / support.sum()
    return ClassificationReport(
        accuracy=float(true_positive.sum() / len(y)),
        top_k=min(top_k, num_classes),
        top_k_accuracy=top_k_accuracy(y, p, top_k),
        macro_precision=float(precision.mean()),
        macro_recall=float(recall.mean()),
        macro_f1=float(f1.mean()),
        weighted_precision=float(weights @ precision),
        weighted_recall=float(weights @ recall),
        weighted_f1=float(weights @ f1),
        log_loss=log_loss(y, p),
        precision=precision,
        recall=recall,
        f1=f1,
        support=support,
        confusion=confusion,
    )


def calibration(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> Calibration:
    """Reliability bins and expected calibration error of the top-1 prediction.

    Bin i holds confidences in (edge[i], edge[i + 1]]; the first bin also holds 0.
    """
    y, p = _check(y_true, probabilities)
    confidence = p.max(axis=1)
    correct = (np.argmax(p, axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        mean_acc = np.where(count > 0, correct_sum / count, np.nan)
    ece = float(np.abs(correct_sum - conf_sum).sum() / len(y))
    return Calibration(bin_edges=edges, confidence=mean_conf, accuracy=mean_acc, count=count, ece=ece)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of `logits / temperature` over the last axis, computed stably."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def mean_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The mean over views of softmax(logits / temperature), as a model with test-time flipping
    outputs: `logits` shaped (views, images, classes), or (images, classes) for one view."""
    logits = np.asarray(logits)
    return softmax(logits, temperature).mean(axis=0) if logits.ndim == 3 else softmax(logits, temperature)


def fit_temperature(y_true: np.ndarray, logits: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T that minimises the log loss of softmax(logits / T) (Guo et al., 2017);
    with logits of several views, of the mean of their probabilities (`mean_probabilities`).

    With one view the log loss is convex in 1/T, so a golden-section search over 1/T finds the
    optimum; with several, convexity is not guaranteed, and the search finds a local optimum
    within `bounds`.
    """
    y = np.asarray(y_true, dtype=np.int64)

    def loss(inverse: float) -> float:
        return log_loss(y, mean_probabilities(logits, 1.0 / inverse))

    low, high = 1.0 / bounds[1], 1.0 / bounds[0]
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(80):  # the bracket shrinks by 0.618 per step: far below float precision
        if loss_a < loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return float(1.0 / ((low + high) / 2.0))
