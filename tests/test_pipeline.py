"""pipeline.py: batches of pixels and one-hot labels, seeded shuffling, augmentation on request."""

from __future__ import annotations

import numpy as np
import pytest

from transferlab.manifests import load_classes, load_manifest
from transferlab.paths import StagePaths
from transferlab.pipeline import make_dataset


@pytest.fixture
def train_manifest(prepared_project: StagePaths):
    classes = load_classes(prepared_project.classes)
    return load_manifest(prepared_project.manifest("train"), prepared_project.raw_dataset("synthetic"), classes)


def _epoch(dataset) -> tuple[np.ndarray, np.ndarray]:
    pixels, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset], strict=True)
    return np.concatenate(pixels), np.concatenate(labels)


def test_batches_are_whole_pixel_values_with_one_hot_labels(train_manifest) -> None:
    pixels, labels = _epoch(make_dataset(train_manifest, image_size=32, batch_size=5))
    assert pixels.shape == (len(train_manifest), 32, 32, 3) and pixels.dtype == np.float32
    assert pixels.min() >= 0 and pixels.max() <= 255 and np.array_equal(pixels, np.round(pixels))
    assert labels.shape == (len(train_manifest), 3)
    np.testing.assert_array_equal(labels.argmax(axis=1), train_manifest.labels)  # unshuffled: manifest order


@pytest.mark.parametrize("seed", [3, 0])
def test_each_epoch_has_its_own_seeded_order_and_a_resumed_run_sees_the_same_batches(train_manifest, seed) -> None:
    """Epochs 0-2 in one go, then epochs 1-2 as a run resumed after epoch 1 would ask for them.
    The trainer sets TensorFlow's global seed to the run's: 0 is a seed like any other."""
    import tensorflow as tf

    from transferlab.pipeline import epoch_batches

    tf.random.set_seed(seed)

    def labels(first: int, last: int) -> list[int]:
        dataset = make_dataset(train_manifest, image_size=16, batch_size=4, epochs=(first, last), seed=seed)
        return [label for _, y in dataset for label in y.numpy().argmax(axis=1).tolist()]

    count = len(train_manifest)
    full, resumed = labels(0, 3), labels(1, 3)
    assert len(full) == 3 * count and resumed == full[count:]
    epoch_orders = [full[i * count : (i + 1) * count] for i in range(3)]
    assert epoch_orders[0] != epoch_orders[1] and all(sorted(o) == sorted(train_manifest.labels) for o in epoch_orders)
    # Indices shuffle exactly like the images they stand for: cached features train in the same order.
    indices = epoch_batches(tf.data.Dataset.range(count), count, (0, 3), seed=seed, batch_size=4)
    order = [train_manifest.labels[i] for _, batch in indices for i in batch.numpy()]
    assert order == full


def test_augmenter_runs_only_when_given(train_manifest) -> None:
    import keras

    flip = keras.layers.RandomFlip("horizontal", seed=0)
    plain = _epoch(make_dataset(train_manifest, image_size=16, batch_size=8))[0]
    augmented = _epoch(make_dataset(train_manifest, image_size=16, batch_size=8, augmenter=flip))[0]
    assert not np.array_equal(plain, augmented)
    assert np.array_equal(np.sort(plain.ravel()), np.sort(augmented.ravel()))  # flips move pixels, never change them


@pytest.mark.parametrize("epochs", [None, (0, 2)])
def test_pipelines_run_without_the_autotuner_thread(train_manifest, epochs) -> None:
    """Deleting an iterator waited for the autotuner's sleep (0.4-20 s, measured): it is off, and
    every batch still comes, in order."""
    dataset = make_dataset(train_manifest, image_size=32, batch_size=5, epochs=epochs)
    assert dataset.options().autotune.enabled is False
    pixels, labels = _epoch(dataset)
    assert len(pixels) == len(train_manifest) * (1 if epochs is None else 2)
    if epochs is None:
        np.testing.assert_array_equal(labels.argmax(axis=1), train_manifest.labels)
