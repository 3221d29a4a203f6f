"""keras_saving.save: the file Keras writes, without a throwaway reference layer per saved layer."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from keras.src.layers.layer import Layer

from transferlab import keras_saving
from transferlab.config import ModelConfig
from transferlab.model import build_classifier


@pytest.fixture
def classifier() -> keras.Model:
    """A small compiled classifier with optimizer state, as a checkpoint or `models/` holds."""
    keras.backend.clear_session()  # the skip sets live in Keras's global state: start without them
    model = build_classifier(ModelConfig("mobilenet_v2", alpha=0.35, weights=None), 3, 32, seed=0).model
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    model.fit(pixels, np.eye(3, dtype="float32")[[0, 1, 2, 0]], epochs=1, verbose=0)
    return model


@pytest.fixture
def layers_built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The class names of the layers constructed from now on."""
    built: list[str] = []
    original = Layer.__init__

    def counting_init(self: Layer, *args: object, **kwargs: object) -> None:
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Layer, "__init__", counting_init)
    return built


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_plain_keras_save_builds_a_reference_layer_per_saved_layer(
    classifier: keras.Model, layers_built: list[str], tmp_path: Path
) -> None:
    """The Keras behaviour keras_saving works around: a Keras that kept its skip sets would build
    one reference object per type. When this fails, keras_saving can go."""
    classifier.save(tmp_path / "first.keras")  # Keras has computed each type's set once now
    layers_built.clear()
    classifier.save(tmp_path / "plain.keras")
    assert layers_built.count("Layer") > 100  # MobileNetV2-0.35 and the head: about 160 layers walked


def test_save_builds_no_layers_and_writes_what_keras_writes(
    classifier: keras.Model, layers_built: list[str], tmp_path: Path
) -> None:
    keras_saving.save(classifier, tmp_path / "first.keras")  # computes each type's set once
    layers_built.clear()
    keras_saving.save(classifier, tmp_path / "ours.keras")
    assert layers_built == []

    keras.backend.clear_session()  # the global state emptied again: Keras's own way, from nothing
    classifier.save(tmp_path / "plain.keras")
    ours, plain = _members(tmp_path / "ours.keras"), _members(tmp_path / "plain.keras")
    assert ours.keys() == plain.keys()
    assert json.loads(ours["config.json"]) == json.loads(plain["config.json"])
    loaded_ours = keras.models.load_model(tmp_path / "ours.keras")
    loaded_plain = keras.models.load_model(tmp_path / "plain.keras")
    for a, b in zip(loaded_ours.get_weights(), loaded_plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(loaded_ours.optimizer.variables, loaded_plain.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_save_fills_the_sets_again_after_clear_session(
    classifier: keras.Model, layers_built: list[str], tmp_path: Path
) -> None:
    """`clear_session` (between sweep jobs) empties Keras's global state; the next save fills it again."""
    keras_saving.save(classifier, tmp_path / "first.keras")
    keras.backend.clear_session(free_memory=False)
    keras_saving.save(classifier, tmp_path / "second.keras")  # computes the sets again
    layers_built.clear()
    keras_saving.save(classifier, tmp_path / "third.keras")
    assert layers_built == []
