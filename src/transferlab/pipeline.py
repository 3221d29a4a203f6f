"""Input pipeline: a split's manifest -> `tf.data` dataset of (pixels in [0, 255], one-hot label).

Knows nothing of models: backbone preprocessing lives inside the model, so the same
dataset feeds every backbone, and a served model takes plain RGB pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from transferlab.errors import DataError, interrupts_deferred
from transferlab.images import CENTRAL, decode_and_resize, first_oversized
from transferlab.manifests import Manifest

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

# Decoded, resized images are cached in memory (as uint8) when they fit in this budget.
MEMORY_CACHE_BYTES = 3 * 1024**3
# Epoch e of a run with seed s shuffles with seed s * SEED_STRIDE + e.
SEED_STRIDE = 100_003


def prefetched(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """The end of every input pipeline: `prefetch(AUTOTUNE)`, with tf.data's autotuner off.

    The autotuner's thread sleeps between its rounds for a period that doubles up to a minute,
    and in TensorFlow 2.21 deleting an iterator waits for that sleep to end: the end of a
    training phase, a feature pass or an evaluation stalled for 0.4-20 s at random (seen with
    py-spy and gdb: the main thread in `~LogicalThreadWrapper`, the autotuner in
    `Model::OptimizeLoop`). Without it, AUTOTUNE parallelism is min(16, CPU cores) and prefetch
    buffers still grow on demand; `tests/test_pipeline.py` checks the option is set.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: a function of the run's seed and the epoch number alone."""
    return seed * SEED_STRIDE + epoch


def epoch_batches(
    elements: tf.data.Dataset, count: int, epochs: tuple[int, int], seed: int, batch_size: int
) -> tf.data.Dataset:
    """`(epoch, batch)` pairs for epochs `[first, last)`: each epoch one pass over `elements`, shuffled by its own seed.

    The order of an epoch depends only on (seed, epoch), so a run resumed at epoch e sees the
    batches the uninterrupted run would, and a dataset of indices `range(count)` is shuffled
    exactly like a dataset of `count` images (cached features and images train in the same order).
    """
    import tensorflow as tf

    def one_epoch(epoch: int) -> tf.data.Dataset:
        # A Python int seed: a tensor one (from flat_map) breaks tf's seed check when train.seed is 0.
        shuffled = elements.shuffle(count, seed=epoch_seed(seed, epoch), reshuffle_each_iteration=False)
        number = tf.constant(epoch, tf.int64)
        return shuffled.batch(batch_size).map(lambda *batch: (number, batch if len(batch) > 1 else batch[0]))

    parts = [one_epoch(epoch) for epoch in range(*epochs)]
    while len(parts) > 1:  # a balanced tree of concatenations: depth log2(epochs)
        pairs = [parts[i].concatenate(parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        parts = pairs + parts[len(parts) - len(parts) % 2 :]
    return parts[0]


def make_dataset(
    manifest: Manifest,
    *,
    image_size: int,
    batch_size: int,
    epochs: tuple[int, int] | None = None,
    seed: int = 0,
    augmenter: keras.Layer | None = None,
    cache: bool = True,
    positions: Sequence[float] = CENTRAL,
) -> tf.data.Dataset:
    """Batched (float32 pixels in [0, 255], one-hot labels), decoded in parallel and prefetched.

    Without `epochs`: one pass in manifest order. With `epochs=(first, last)`: the training
    batches of those epochs, in `epoch_batches` order. Decoded images are cached in memory as
    uint8 when they fit, so every epoch after the first skips JPEG decoding; shuffling and
    `augmenter` (training only) run after the cache. `positions` places the square along each
    photo's long side (see `images.square_positions`); several give each image as a stack of
    squares, the input of a model with test-time crops.
    An image whose header declares more than `images.MAX_IMAGE_PIXELS` stops it before any decode.

    Building it (tracing its map functions, the augmenter's layers among them: a fraction of a
    second) holds Ctrl-C and SIGTERM back: a stop that lands inside TensorFlow's tracing comes out
    as an error of TensorFlow's own ("Could not pack sequence") or as tracebacks it prints.
    """
    import tensorflow as tf

    oversized = first_oversized(manifest.absolute_paths)
    if oversized is not None:
        path, problem = oversized
        raise DataError(f"{path}: {problem}; the split stage skips such files: run `dvc repro split`")
    with interrupts_deferred():
        autotune = tf.data.AUTOTUNE
        num_classes = len(manifest.classes)
        ds = tf.data.Dataset.from_tensor_slices((manifest.absolute_paths, list(manifest.labels)))
        ds = ds.map(
            lambda p, y: (decode_and_resize(tf.io.read_file(p), image_size, positions), y),
            num_parallel_calls=autotune,
            deterministic=True,
        )
        if cache and len(manifest) * len(positions) * image_size * image_size * 3 <= MEMORY_CACHE_BYTES:
            ds = ds.cache()
        if epochs is None:
            ds = ds.batch(batch_size)
        else:
            ds = epoch_batches(ds, len(manifest), epochs, seed, batch_size).map(lambda epoch, batch: batch)
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, num_classes)), num_parallel_calls=autotune)
        if augmenter is not None:
            ds = ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=autotune)
        return prefetched(ds)
