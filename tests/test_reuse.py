"""What a sweep process keeps from job to job (reuse.py): the backbone and the compiled heads
come back exactly as new, and the jobs' models are not kept alive by them."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

from transferlab import reuse
from transferlab.config import ModelConfig, TrainConfig
from transferlab.model import build_backbone, build_classifier, set_trainable_layers, weights_digest

FEATURES = np.random.default_rng(0).normal(size=(96, 8)).astype("float32")
LABELS = np.eye(3, dtype="float32")[np.random.default_rng(1).integers(0, 3, 96)]


@pytest.fixture
def file_weights(tmp_path: Path) -> ModelConfig:
    """MobileNetV2 at 32 px with weights from a file (the kind of backbone that is kept)."""
    weights = tmp_path / "backbone.weights.h5"
    build_backbone(ModelConfig("mobilenet_v2", alpha=0.35, weights=None), 32).save_weights(weights)
    return ModelConfig("mobilenet_v2", alpha=0.35, weights=str(weights))


def test_a_backbone_with_file_weights_is_reused_and_reset_to_them(file_weights: ModelConfig) -> None:
    """Sweep jobs share one built backbone; each gets it back with the file's weights, frozen."""
    cfg = file_weights
    first = reuse.classifier(cfg, 3, 32, seed=7)
    pristine = weights_digest(first.backbone)
    assert reuse.backbone_digest(first.backbone) == pristine
    set_trainable_layers(first.backbone, 20)
    for variable in first.backbone.weights:  # what fine-tuning the previous job did
        variable.assign(variable + 1.0)

    second = reuse.classifier(cfg, 3, 32, seed=7)
    assert second.backbone is first.backbone
    assert weights_digest(second.backbone) == reuse.backbone_digest(second.backbone) == pristine
    assert not second.backbone.trainable_weights
    fresh = build_classifier(cfg, 3, 32, seed=7)
    assert fresh.backbone is not second.backbone
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    reused, built = (c.model.predict(pixels, verbose=0) for c in (second, fresh))
    np.testing.assert_allclose(reused, built, atol=1e-6)
    random = reuse.classifier(ModelConfig("mobilenet_v2", alpha=0.35, weights=None), 3, 32, seed=7)
    assert random.backbone is not first.backbone, "random-init backbones are always built afresh"


def test_forgetting_the_classifiers_lets_them_go(file_weights: ModelConfig) -> None:
    """The kept backbone and head record every call on them; those records must not keep old
    jobs' layers (and what those reach) alive."""
    from transferlab.cut import split_at_cut
    from transferlab.model import POOL_LAYER, TEMPERATURE_LAYER, first_trainable_layer, with_temperature

    classifier = reuse.classifier(file_weights, 3, 32, seed=1)
    cut = split_at_cut(classifier, first_trainable_layer(classifier.backbone, 20))  # calls layers inside the backbone
    calibrated = with_temperature(classifier.head, 2.0)  # calls a layer inside the head
    job_layers = [
        weakref.ref(classifier.features.get_layer(POOL_LAYER)),  # called on the backbone's output
        weakref.ref(calibrated.get_layer(TEMPERATURE_LAYER)),  # called on the head's logits
    ]
    del classifier, cut, calibrated
    gc.collect()
    assert all(ref() is not None for ref in job_layers), "the kept models' call records hold them"
    reuse.forget_classifiers()
    gc.collect()
    assert all(ref() is None for ref in job_layers)
    again = reuse.classifier(file_weights, 3, 32, seed=1)
    assert again.model(np.zeros((1, 32, 32, 3), "float32")).shape == (1, 3)


def batches() -> object:
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((FEATURES, LABELS)).batch(32)


def fit_head(cfg: ModelConfig, train: TrainConfig, learning_rate: float) -> tuple[object, dict, list[np.ndarray]]:
    """One sweep job's head phase on fixed features: the head, its history and final weights."""
    import keras

    keras.utils.set_random_seed(train.seed)
    head = reuse._reusable_head(FEATURES.shape[1], 3, cfg, train.seed)
    reuse.compile_for_job(head, train, learning_rate)
    history = head.fit(batches(), validation_data=batches(), epochs=3, verbose=0, shuffle=False).history
    return head, history, [w.copy() for w in head.get_weights()]


def test_a_kept_head_trains_exactly_as_a_new_one_and_keeps_its_traced_steps() -> None:
    import keras

    from transferlab.model import build_head, compile_classifier

    cfg = ModelConfig("mobilenet_v2", alpha=0.35, weights=None, dropout=0.3, head_batchnorm=True)
    train = TrainConfig(seed=4)
    first, history, weights = fit_head(cfg, train, 1e-2)
    traced = first.train_function
    other, _, _ = fit_head(cfg, dataclasses.replace(train, seed=9), 3e-3)  # another job trains it on
    assert other is first
    again, history_again, weights_again = fit_head(cfg, train, 1e-2)
    assert again is first and again.train_function is traced, "the traced step is kept"
    assert history_again == history
    for a, b in zip(weights_again, weights, strict=True):
        np.testing.assert_array_equal(a, b)

    keras.utils.set_random_seed(train.seed)  # a head built and compiled the usual way agrees
    new = build_head(FEATURES.shape[1], 3, cfg, train.seed)
    compile_classifier(new, train, 1e-2)
    assert new.fit(batches(), validation_data=batches(), epochs=3, verbose=0, shuffle=False).history == history


def test_what_keras_traces_as_a_constant_is_never_reused() -> None:
    cfg = ModelConfig("mobilenet_v2", alpha=0.35, weights=None, dropout=0.2, head_batchnorm=False)
    train = TrainConfig(seed=1)
    head, _, _ = fit_head(cfg, train, 1e-3)
    other_dropout, _, _ = fit_head(dataclasses.replace(cfg, dropout=0.5), train, 1e-3)
    assert other_dropout is not head
    traced = head.train_function
    smoothed, _, _ = fit_head(cfg, dataclasses.replace(train, label_smoothing=0.1), 1e-3)
    assert smoothed is head and smoothed.train_function is not traced, "compiled and traced anew"
