"""Would a sweep job's bookkeeping overlap the next job on a thread? (README, Performance)

    python bench/overlap.py [--rounds N]

A later sweep job spends about 0.6 s fitting its new head and 0.5 s drawing its three
evaluation figures. This probe times, per round, in one process: the two one after the other,
the figures on a second thread while the head fits, and a second fit of the head it has
already traced (what reusing a traced head across jobs would cost). Synthetic arrays of the
sizes of `flower_photos_dev` (1,050 training and 225 validation vectors of 1,280 features,
5 classes), the project's own head, optimizer and figures.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from transferlab import plots
from transferlab.config import ModelConfig, TrainConfig
from transferlab.metrics import calibration

CLASSES, FEATURES, TRAIN, VAL, MISTAKES = 5, 1280, 1050, 225, 12
log = logging.getLogger("overlap")


def seconds(action: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    action(*args)
    return time.perf_counter() - started


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds

    import keras

    from transferlab.model import build_head, compile_classifier

    rng = np.random.default_rng(0)
    x, x_val = rng.normal(size=(TRAIN, FEATURES)).astype("float32"), rng.normal(size=(VAL, FEATURES)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, CLASSES, TRAIN), CLASSES)
    y_val = keras.utils.to_categorical(rng.integers(0, CLASSES, VAL), CLASSES)
    probabilities, labels = rng.dirichlet(np.ones(CLASSES), VAL), rng.integers(0, CLASSES, VAL)
    thumbnails = [rng.integers(0, 255, (96, 96, 3)) for _ in range(MISTAKES)]
    folder = Path(tempfile.mkdtemp(prefix="overlap-"))
    names = [str(c) for c in range(CLASSES)]

    def new_head() -> keras.Model:
        head = build_head(FEATURES, CLASSES, ModelConfig(), seed=0)
        compile_classifier(head, TrainConfig(), 1e-3)
        return head

    def fit(head: keras.Model) -> None:
        head.fit(x, y, batch_size=32, epochs=2, validation_data=(x_val, y_val), verbose=0)

    def figures() -> None:
        confusion = rng.integers(0, 40, (CLASSES, CLASSES))
        plots.plot_confusion_matrix(confusion, names, folder / "confusion.png")
        plots.plot_misclassified(thumbnails, ["a"] * MISTAKES, ["b"] * MISTAKES, [0.9] * MISTAKES, folder / "m.png")
        plots.plot_reliability(calibration(labels, probabilities, bins=10), folder / "reliability.png")

    def threaded() -> None:
        drawing = threading.Thread(target=figures)
        drawing.start()
        fit(new_head())
        drawing.join()

    fit(new_head())  # warm-up: Keras and matplotlib imported and initialised
    figures()
    for round_ in range(1, rounds + 1):
        sequential = seconds(lambda: (fit(new_head()), figures()))
        overlapped = seconds(threaded)
        head = new_head()
        first, again = seconds(fit, head), seconds(fit, head)
        log.info(
            "round %d: fit + figures one after the other %.2f s, figures on a thread %.2f s; "
            "fit of a new head %.2f s, of the same head again %.2f s",
            round_,
            sequential,
            overlapped,
            first,
            again,
        )


if __name__ == "__main__":
    main()
