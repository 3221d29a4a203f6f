"""Input pipeline: manifests -> `tf.data` datasets of (pixels in [0, 255], one-hot label).

Knows nothing of models: backbone preprocessing lives inside the model, so the same
dataset feeds every backbone, and a served model takes plain RGB pixels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from transferlab.errors import DataError

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

MANIFEST_COLUMNS = ("path", "label")
# Decoded, resized images are cached in memory (as uint8) when they fit in this budget.
MEMORY_CACHE_BYTES = 3 * 1024**3


@dataclass(frozen=True)
class Manifest:
    """One split: image paths relative to `raw_root`, and their class indices."""

    raw_root: Path
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def absolute_paths(self) -> list[str]:
        return [str(self.raw_root / p) for p in self.paths]


def load_classes(path: Path) -> list[str]:
    """Ordered class names written by the split stage."""
    try:
        classes = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{path} not found: run `dvc repro split` (or `transferlab split`) first") from exc
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON: run `dvc repro split` again") from exc
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(classes) < 2:
        raise DataError(f"{path} must list at least two class names: run `dvc repro split` again")
    return classes


def load_manifest(path: Path, raw_root: Path, classes: Sequence[str]) -> Manifest:
    """Read `<split>.csv`; fail with the stage to run when it is missing or inconsistent."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as exc:
        raise DataError(f"{path} not found: run `dvc repro split` (or `transferlab split`) first") from exc
    if tuple(frame.columns) != MANIFEST_COLUMNS:
        raise DataError(f"{path} must have columns {','.join(MANIFEST_COLUMNS)}: run `dvc repro split` again")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(frame["label"]) - set(index))
    if unknown:
        raise DataError(f"{path} has label {unknown[0]!r} not in classes.json: run `dvc repro split` again")
    if len(frame) and not (raw_root / frame["path"].iloc[0]).is_file():
        raise DataError(
            f"{raw_root / frame['path'].iloc[0]} listed in {path} is missing: run `dvc repro download` "
            "and `dvc repro split` again"
        )
    return Manifest(
        raw_root=raw_root,
        paths=tuple(frame["path"]),
        labels=tuple(index[label] for label in frame["label"]),
        classes=tuple(classes),
    )


def decode_and_resize(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Read any JPEG/PNG/GIF/BMP as RGB (grayscale, CMYK, alpha converted) resized to a square."""
    import tensorflow as tf

    data = tf.io.read_file(path)
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return tf.image.resize(image, [image_size, image_size], method="bilinear")


def make_dataset(
    manifest: Manifest,
    *,
    image_size: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augmenter: keras.Layer | None = None,
    cache: bool = True,
) -> tf.data.Dataset:
    """Batched (float32 pixels in [0, 255], one-hot labels), decoded in parallel and prefetched.

    Decoded images are cached in memory as uint8 when they fit, so every epoch after the
    first skips JPEG decoding; shuffling and `augmenter` (training only) run after the cache.
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    num_classes = len(manifest.classes)
    ds = tf.data.Dataset.from_tensor_slices((manifest.absolute_paths, list(manifest.labels)))
    ds = ds.map(
        lambda p, y: (tf.cast(tf.round(decode_and_resize(p, image_size)), tf.uint8), y),
        num_parallel_calls=autotune,
        deterministic=True,
    )
    if cache and len(manifest) * image_size * image_size * 3 <= MEMORY_CACHE_BYTES:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(min(len(manifest), 10_000), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, num_classes)), num_parallel_calls=autotune)
    if augmenter is not None:
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=autotune)
    return ds.prefetch(autotune)
