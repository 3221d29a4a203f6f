"""Input size without the test split: `make study-sizes` (README, "How the defaults were chosen").

For each input size, the backbone's pooled features of every training and validation photo of the
study's scratch project (the project's decode and model code), and of each photo flipped; then
repeated stratified 5-fold cross-validation over those 1,275 photos: a logistic regression trained
on the clean and flipped features of four folds scores the fifth (accuracy, log loss), on the
photos as they are and with test-time flipping (the mean of its probabilities on each photo and
its mirror image). That is 25 held-out folds per size instead of one score on 225 validation
photos, so it separates settings whose validation accuracies differ by less than their noise.
Needs `make study` first.

    SIZES_LIST     sizes to compare (default "224 256 288 320 352 384")
    SIZES_BACKBONE mobilenet_v2 (default: alpha 0.35) or mobilenet (alpha 0.25)
    STUDY_WEIGHTS  its no-top weights (default: the file of that name in ../shared/weights)
    STUDY_WORKDIR  as for bench/study.py
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
from study import SHARED, scratch_project, train_and_val

from transferlab import console
from transferlab.backbones import imagenet_weights_filename
from transferlab.config import ModelConfig
from transferlab.manifests import Manifest

ALPHAS = {"mobilenet_v2": 0.35, "mobilenet": 0.25}  # the backbones ../shared/weights holds
REGULARISATION = (0.3, 1.0)  # logistic regression's C: both are fitted, their scores averaged
log = logging.getLogger("sizes")


def pooled_features(manifest: Manifest, backbone: str, weights: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Features of each image as it is, and flipped left to right (the saved model's own flip)."""
    from transferlab.layers import MirrorImage
    from transferlab.model import build_classifier
    from transferlab.pipeline import make_dataset

    model = ModelConfig(backbone=backbone, alpha=ALPHAS[backbone], weights=str(weights))
    features = build_classifier(model, len(manifest.classes), size).features
    pixels = make_dataset(manifest, image_size=size, batch_size=32).map(lambda x, y: x)  # decoded once, cached
    clean = features.predict(pixels, verbose=0)
    flipped = features.predict(pixels.map(MirrorImage()), verbose=0)
    return clean, flipped


def cross_validate(clean: np.ndarray, flipped: np.ndarray, labels: np.ndarray) -> dict[str, list[tuple[float, float]]]:
    """Accuracy and log loss of every held-out fold (5 folds x 5 repeats, each regularisation),
    without and with test-time flipping."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import RepeatedStratifiedKFold

    scores: dict[str, list[tuple[float, float]]] = {"plain": [], "test-time flip": []}
    folds = RepeatedStratifiedKFold(n_splits=5, n_repeats=5, random_state=0)
    for train, held_out in folds.split(clean, labels):
        inputs = np.concatenate([clean[train], flipped[train]])
        targets = np.concatenate([labels[train], labels[train]])
        truth = labels[held_out]
        for c in REGULARISATION:
            fitted = LogisticRegression(C=c, max_iter=2000).fit(inputs, targets)
            plain = fitted.predict_proba(clean[held_out])
            averaged = (plain + fitted.predict_proba(flipped[held_out])) / 2
            for name, probabilities in (("plain", plain), ("test-time flip", averaged)):
                accuracy = float((probabilities.argmax(1) == truth).mean())
                scores[name].append((accuracy, log_loss(truth, probabilities, labels=fitted.classes_)))
    return scores


def describe(scores: dict[str, list[tuple[float, float]]]) -> str:
    """Mean accuracy and log loss of each way, and in how many fold scores (folds x regularisations)
    flipping did better."""
    averages = {name: np.mean(values, axis=0) for name, values in scores.items()}
    means = "; ".join(f"{name}: accuracy {100 * a:.1f} %, log loss {loss:.3f}" for name, (a, loss) in averages.items())
    plain, flipped = np.asarray(scores["plain"]), np.asarray(scores["test-time flip"])
    better = f"flipping better in {np.sum(flipped[:, 0] > plain[:, 0])} of {len(plain)} fold scores (accuracy), "
    better += f"{np.sum(flipped[:, 1] < plain[:, 1])} (log loss)"
    return f"{means}; {better}"


def main() -> None:
    """Cross-validated accuracy and log loss of each size, with and without test-time flipping: a line per size."""
    console.configure()
    workdir = scratch_project()
    backbone = os.environ.get("SIZES_BACKBONE", "mobilenet_v2")
    if backbone not in ALPHAS:
        sys.exit(f"sizes: SIZES_BACKBONE must be one of {sorted(ALPHAS)}, got {backbone!r}")
    shared_file = str(imagenet_weights_filename(backbone, ALPHAS[backbone], 224))
    weights = Path(os.environ.get("STUDY_WEIGHTS", SHARED / "weights" / shared_file))
    sizes = [int(size) for size in os.environ.get("SIZES_LIST", "224 256 288 320 352 384").split()]
    if not weights.is_file():
        sys.exit(f"sizes: {weights} not found (set STUDY_WEIGHTS)")
    both = train_and_val(workdir)
    labels = np.asarray(both.labels)
    log.info("%s on %d photos (train + val of %s), 5-fold CV x 5 repeats", backbone, len(both), workdir)
    for size in sizes:
        log.info("%d px: %s", size, describe(cross_validate(*pooled_features(both, backbone, weights, size), labels)))


if __name__ == "__main__":
    main()
