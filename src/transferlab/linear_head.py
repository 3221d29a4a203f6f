"""A converged linear head (`train.head_solver: lbfgs`): the head phase as a convex problem.

On cached pooled features the head is multinomial logistic regression. Instead of stepping it
with Adam until validation loss stalls (where early stopping then cuts it), this fits it to
convergence with L-BFGS, the way linear probes of pretrained features are usually fitted, once
per L2 strength of `L2_STRENGTHS` (strongest first, each starting from the previous solution,
until the validation log loss has risen `PATIENCE` times in a row past its lowest), and keeps
the strength whose solution has the lowest validation log loss: the regularisation is chosen on
the validation split, as the epoch is by early stopping. A head phase fed any other way (images,
a fine-tuned cut) has no fixed features to fit and steps Adam, whatever `train.head_solver`.

The objective is the mean cross-entropy over every cached view of every training image (with
`train.label_smoothing`, against smoothed targets) plus l2 / 2 * |kernel|^2; the bias is not
penalised. Dropout is the identity at inference and takes no part.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Mean-loss form: the penalty added to the mean cross-entropy is l2 / 2 * |kernel|^2.
L2_STRENGTHS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
MAX_ITERATIONS = 1000
# Converged when no gradient component exceeds this: scikit-learn's default tolerance, with which
# the gain of this head was measured. SciPy's tighter defaults took 1.6 to 2.4 times as long and
# kept the same strengths.
GRADIENT_TOLERANCE = 1e-4
PATIENCE = 2  # weaker strengths fit longer and only over-fit more once validation loss rises


@dataclass(frozen=True)
class LinearFit:
    """One strength's solution and how it scores."""

    l2: float
    kernel: np.ndarray  # (features, classes)
    bias: np.ndarray  # (classes,)
    loss: float  # training cross-entropy (with smoothing), without the penalty
    accuracy: float
    val_loss: float
    val_accuracy: float

    def scores(self) -> dict[str, float]:
        """Its strength and scores, as the checkpoint state and the training curves keep them."""
        return {
            "l2": self.l2,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
        }


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def targets(labels: np.ndarray, classes: int, smoothing: float = 0.0) -> np.ndarray:
    """One-hot rows, smoothed as Keras smooths them: (1 - s) * one_hot + s / classes."""
    return (1.0 - smoothing) * np.eye(classes)[labels] + smoothing / classes


def fit_logistic(
    features: np.ndarray, target: np.ndarray, l2: float, start: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) minimising mean cross-entropy(features @ kernel + bias, target) + l2 / 2 * |kernel|^2.

    The products with `features`, where the time goes, run in float32, as the features were
    computed; sums and the optimiser's state are float64."""
    from scipy.optimize import minimize

    rows, width = features.shape
    classes = target.shape[1]
    features, target = np.ascontiguousarray(features, np.float32), target.astype(np.float32)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        kernel, bias = theta[: width * classes].reshape(width, classes), theta[width * classes :]
        log_p = _log_softmax(features @ kernel.astype(np.float32) + bias.astype(np.float32))
        loss = -float((target * log_p).sum(dtype=np.float64)) / rows + 0.5 * l2 * float((kernel * kernel).sum())
        error = (np.exp(log_p) - target) / rows
        kernel_gradient = (error.T @ features).T + l2 * kernel  # error.T @ features: the faster product
        return loss, np.concatenate([kernel_gradient.ravel(), error.sum(axis=0, dtype=np.float64)])

    initial = np.zeros(width * classes + classes) if start is None else np.concatenate([start[0].ravel(), start[1]])
    options = {"maxiter": MAX_ITERATIONS, "gtol": GRADIENT_TOLERANCE}
    result = minimize(objective, initial, jac=True, method="L-BFGS-B", options=options)
    if not result.success:
        log.warning("L-BFGS stopped before converging at l2 %g: %s", l2, result.message)
    theta = result.x
    return theta[: width * classes].reshape(width, classes), theta[width * classes :]


def _scores(
    features: np.ndarray, target: np.ndarray, labels: np.ndarray, kernel: np.ndarray, bias: np.ndarray
) -> tuple[float, float]:
    """Mean cross-entropy against `target` and accuracy against `labels`."""
    log_p = _log_softmax(features @ kernel + bias)
    return -float((target * log_p).sum()) / len(labels), float(np.mean(log_p.argmax(axis=1) == labels))


def search_l2(
    features: np.ndarray,
    labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    classes: int,
    smoothing: float = 0.0,
) -> list[LinearFit]:
    """The solutions along `L2_STRENGTHS`, strongest first, each scored on both splits (validation
    loss against the plain labels, as Keras' val_loss is), until validation loss has risen
    `PATIENCE` times in a row past its lowest."""
    features, val_features = np.asarray(features, np.float32), np.asarray(val_features, np.float32)
    target, val_target = targets(labels, classes, smoothing), targets(val_labels, classes)
    fits, start = [], None
    for l2 in L2_STRENGTHS:
        kernel, bias = fit_logistic(features, target, l2, start)
        start = (kernel, bias)
        loss, accuracy = _scores(features, target, labels, kernel, bias)
        val_loss, val_accuracy = _scores(val_features, val_target, val_labels, kernel, bias)
        fits.append(LinearFit(l2, kernel, bias, loss, accuracy, val_loss, val_accuracy))
        log.info(
            "l2 %g: loss %.4f, accuracy %.4f, val_loss %.4f, val_accuracy %.4f",
            l2,
            loss,
            accuracy,
            val_loss,
            val_accuracy,
        )
        lowest = min(range(len(fits)), key=lambda i: fits[i].val_loss)
        if len(fits) - 1 - lowest >= PATIENCE:
            break
    return fits


def best_fit(fits: list[LinearFit]) -> LinearFit:
    """The solution with the lowest validation log loss (the strongest of tied ones)."""
    return min(fits, key=lambda fit: fit.val_loss)
