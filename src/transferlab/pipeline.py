"""Input pipeline: a split's manifest -> `tf.data` dataset of (pixels in [0, 255], one-hot label).

Knows nothing of models: backbone preprocessing lives inside the model, so the same
dataset feeds every backbone, and a served model takes plain RGB pixels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transferlab.images import decode_and_resize
from transferlab.manifests import Manifest

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

# Decoded, resized images are cached in memory (as uint8) when they fit in this budget.
MEMORY_CACHE_BYTES = 3 * 1024**3


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
        lambda p, y: (decode_and_resize(tf.io.read_file(p), image_size), y),
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
