"""A trained classifier and its inputs: load a `.keras` model, read its input size, decode files for it.

Evaluate, predict, export and the served MLflow model all load models and decode images here;
the decode itself is `images.decode_and_resize`, the same function the training pipeline uses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferlab.errors import DataError, ModelError, first_line
from transferlab.images import decode_image_bytes, input_shape, square_positions

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


@dataclass
class ImageBatch:
    """Decoded images (float32 RGB in [0, 255], square; a stack of squares each for a model with
    test-time crops) and the files that could not be read."""

    pixels: np.ndarray
    paths: list[Path]
    errors: list[tuple[Path, str]] = field(default_factory=list)


def load_model(path: Path) -> keras.Model:
    """A trained `.keras` classifier, or a `ModelError` that says what to do."""
    import keras

    import transferlab.layers  # noqa: F401  (registers the layers a saved model may hold)

    if not path.is_file():
        raise ModelError(f"{path} not found: run `dvc repro train` (or `transferlab train`) first")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors, ...
        raise ModelError(f"cannot load {path}: {first_line(exc)}") from exc


# Batches up to this many squares run as one eager call (see `predict_pixels`); larger ones go
# through `predict` this many squares at a time (a model with test-time crops takes several per image).
EAGER_MAX_IMAGES = 32


def predict_pixels(model: keras.Model, pixels: np.ndarray) -> np.ndarray:
    """Class probabilities (float64) of a batch of decoded images.

    A small batch runs as one eager call: `predict` would first trace a predict function (a
    second or more on 2 cores), which a server's first request and MLflow's check of the input
    example when it logs the model would wait for. Larger batches go through `predict`.
    """
    import keras

    squares = pixels.shape[1] if pixels.ndim == 5 else 1
    if len(pixels) * squares <= EAGER_MAX_IMAGES:
        outputs = keras.ops.convert_to_numpy(model(keras.ops.convert_to_tensor(pixels), training=False))
    else:
        outputs = model.predict(pixels, batch_size=max(1, EAGER_MAX_IMAGES // squares), verbose=0)
    return np.asarray(outputs, dtype=np.float64)


def model_image_size(model: keras.Model) -> int:
    """The square input size of a model that takes `(None, size, size, 3)` pixels (or, with
    test-time crops, `(None, crops, size, size, 3)`)."""
    shape = tuple(model.input_shape)
    square = shape[-3:]
    if len(shape) not in (4, 5) or square[2] != 3 or square[0] is None or square[0] != square[1]:
        raise ModelError(f"model input must be (None, size, size, 3) RGB pixels, got {shape}")
    if len(shape) == 5 and (shape[1] is None or shape[1] < 2):
        raise ModelError(f"model input must be (None, crops, size, size, 3) with crops >= 2, got {shape}")
    return int(square[0])


def model_crops(model: keras.Model) -> int:
    """How many squares of each photo the model takes (`images.square_positions`): 1 but for a
    model with test-time crops."""
    shape = tuple(model.input_shape)
    return int(shape[1]) if len(shape) == 5 else 1


def find_classes(model_path: Path, num_classes: int) -> list[str] | None:
    """Class names for a model's outputs: `classes.json` beside it, or in the project's splits."""
    from transferlab.manifests import load_classes

    model_dir = model_path.resolve().parent
    candidates = [
        model_dir / "classes.json",
        model_dir.parent / "data" / "splits" / "classes.json",
        Path.cwd() / "data" / "splits" / "classes.json",
    ]
    # Run in the project of `models/model.keras`, the last two are one file: read (and warn about) it once.
    for candidate in dict.fromkeys(path.resolve() for path in candidates):
        if candidate.is_file():
            try:
                classes = load_classes(candidate)
            except DataError:
                continue
            if len(classes) == num_classes:
                return classes
            log.warning("%s lists %d classes but the model has %d outputs", candidate, len(classes), num_classes)
    return None


def load_image_batch(paths: Sequence[Path], image_size: int, crops: int = 1) -> ImageBatch:
    """Decode every readable file (as `crops` squares each for a model with test-time crops);
    unreadable ones go to `errors` with the reason."""
    positions = square_positions(crops)
    pixels: list[np.ndarray] = []
    decoded: list[Path] = []
    errors: list[tuple[Path, str]] = []
    for path in paths:
        try:
            pixels.append(decode_image_bytes(Path(path).read_bytes(), image_size, positions))
            decoded.append(Path(path))
        except (OSError, ValueError) as exc:
            errors.append((Path(path), first_line(exc)))
    array = np.stack(pixels) if pixels else np.zeros((0, *input_shape(image_size, crops)), dtype=np.float32)
    return ImageBatch(pixels=array, paths=decoded, errors=errors)
