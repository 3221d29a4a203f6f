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


def test_shuffle_is_seeded_and_reshuffles_each_epoch(train_manifest) -> None:
    first = make_dataset(train_manifest, image_size=16, batch_size=4, shuffle=True, seed=3)
    again = make_dataset(train_manifest, image_size=16, batch_size=4, shuffle=True, seed=3)
    order = _epoch(first)[1].argmax(axis=1)
    np.testing.assert_array_equal(order, _epoch(again)[1].argmax(axis=1))
    pixels = [_epoch(first)[0] for _ in range(2)]  # two more epochs of the same dataset
    assert not np.array_equal(pixels[0], pixels[1])
    assert sorted(order.tolist()) == sorted(train_manifest.labels)


def test_augmenter_runs_only_when_given(train_manifest) -> None:
    import keras

    flip = keras.layers.RandomFlip("horizontal", seed=0)
    plain = _epoch(make_dataset(train_manifest, image_size=16, batch_size=8))[0]
    augmented = _epoch(make_dataset(train_manifest, image_size=16, batch_size=8, augmenter=flip))[0]
    assert not np.array_equal(plain, augmented)
    assert np.array_equal(np.sort(plain.ravel()), np.sort(augmented.ravel()))  # flips move pixels, never change them
