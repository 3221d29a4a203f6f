"""Builds Keras classifiers from config. Knows nothing of files, datasets or MLflow.

The model takes RGB pixels in [0, 255] and carries the backbone's own preprocessing, so
the input pipeline, `predict` and the served model never need to know which backbone it is:

    image -> preprocessing -> backbone (inference mode) -> GlobalAveragePooling -> head
    head:  BatchNormalization -> Dropout -> Dense softmax
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from transferlab.backbones import BACKBONES, imagenet_weights_filename
from transferlab.config import ModelConfig, TrainConfig
from transferlab.errors import ModelError, first_line

if TYPE_CHECKING:
    import keras

IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)
# Names of the pooling layer and the head inside a classifier (checkpoints are matched by them).
POOL_LAYER = "pool"
HEAD_MODEL = "head"


@dataclass
class Classifier:
    """The pieces training needs: the full model and its parts (layers are shared)."""

    model: keras.Model
    backbone: keras.Model
    features: keras.Model  # image -> pooled backbone features
    head: keras.Model  # pooled features -> class probabilities


def _preprocessing(kind: str, image_size: int) -> list[keras.layers.Layer]:
    """Layers that map [0, 255] RGB to what the backbone was trained on."""
    import keras

    if kind == "builtin":
        return []
    if kind == "tf":
        return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale_to_unit_range")]
    if kind == "caffe":
        # RGB -> BGR and mean subtraction as a frozen 1x1 linear map: plain Keras layers, so the
        # saved model loads anywhere without custom objects.
        flip = np.eye(3, dtype="float32")[::-1]
        means = -np.asarray(IMAGENET_BGR_MEANS, dtype="float32")
        dense = keras.layers.Dense(3, name="caffe_rgb_to_bgr_centered", trainable=False)
        dense.build((None, image_size, image_size, 3))
        dense.set_weights([flip, means])
        return [dense]
    raise ModelError(f"unknown preprocessing {kind!r}")


def _weights_argument(cfg: ModelConfig) -> str | None:
    """What to pass as `weights=`: None, 'imagenet' (cache or download) or a checked file path."""
    if cfg.weights is None:
        return None
    if cfg.weights == "imagenet":
        return "imagenet"
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise ModelError(f"model.weights file {path} does not exist")
    return str(path.resolve())


def _missing_imagenet_hint(cfg: ModelConfig, image_size: int) -> str:
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    filename = imagenet_weights_filename(cfg.backbone, cfg.alpha, image_size)
    return (
        f"could not load ImageNet weights for {cfg.backbone} (offline?): put {filename} in "
        f"{keras_home / 'models'}/ or set model.weights=/path/to/{filename}"
    )


def build_backbone(cfg: ModelConfig, image_size: int) -> keras.Model:
    """The headless `keras.applications` network with the configured weights."""
    import keras

    spec = BACKBONES[cfg.backbone]
    constructor = spec.application
    if isinstance(constructor, str):
        constructor = getattr(keras.applications, constructor)
    kwargs: dict[str, object] = {
        "include_top": False,
        "weights": _weights_argument(cfg),
        "input_shape": (image_size, image_size, 3),
    }
    if spec.alphas is not None:
        kwargs["alpha"] = cfg.alpha if cfg.alpha is not None else 1.0
    try:
        return constructor(**kwargs)
    except ValueError as exc:
        raise ModelError(f"cannot build {cfg.backbone}: {first_line(exc)}") from exc
    except Exception as exc:  # URL, HTTP and OS errors of Keras' weight download
        if kwargs["weights"] == "imagenet":
            raise ModelError(_missing_imagenet_hint(cfg, image_size)) from exc
        raise ModelError(f"cannot load model.weights {cfg.weights}: {first_line(exc)}") from exc


def build_head(num_features: int, num_classes: int, dropout: float) -> keras.Model:
    """GlobalAveragePooling's successor: BatchNormalization -> Dropout -> Dense softmax."""
    import keras

    inputs = keras.Input((num_features,), name="pooled_features")
    # momentum 0.9 (Keras: 0.99): inference statistics settle within a few dozen steps, which
    # matters on small datasets where an epoch is only a handful of batches.
    x = keras.layers.BatchNormalization(momentum=0.9, name="head_batchnorm")(inputs)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    # float32 output keeps softmax stable under a mixed_float16 policy.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=HEAD_MODEL)


def build_classifier(cfg: ModelConfig, num_classes: int, image_size: int) -> Classifier:
    """A frozen backbone with a new head; call `set_trainable_layers` to fine-tune."""
    import keras

    backbone = build_backbone(cfg, image_size)
    backbone.trainable = False
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    for layer in _preprocessing(BACKBONES[cfg.backbone].preprocessing, image_size):
        x = layer(x)
    # training=False keeps every BatchNormalization in inference mode, even when unfrozen.
    x = backbone(x, training=False)
    pooled = keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
    features = keras.Model(inputs, pooled, name="features")
    head = build_head(int(pooled.shape[-1]), num_classes, cfg.dropout)
    model = keras.Model(inputs, head(pooled), name=f"{cfg.backbone}_classifier")
    return Classifier(model=model, backbone=backbone, features=features, head=head)


def attach_head(features: keras.Model, head: keras.Model, name: str) -> keras.Model:
    """The full classifier from a feature extractor and a (trained) head."""
    import keras

    return keras.Model(features.input, head(features.output), name=name)


def adopt_trained(classifier: Classifier, trained: keras.Model, *, head_only: bool) -> Classifier:
    """Put a trained (checkpointed) head, or whole classifier, in place of a freshly built one."""
    import keras

    if head_only:
        model = attach_head(classifier.features, trained, classifier.model.name)
        return Classifier(model, classifier.backbone, classifier.features, trained)
    backbone = trained.get_layer(classifier.backbone.name)
    features = keras.Model(trained.input, trained.get_layer(POOL_LAYER).output, name="features")
    return Classifier(trained, backbone, features, trained.get_layer(HEAD_MODEL))


def compile_classifier(model: keras.Model, cfg: TrainConfig, learning_rate: float) -> None:
    """Compile for training: the configured optimizer at `learning_rate`, cross-entropy, accuracy."""
    import keras

    optimizers = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "sgd": lambda learning_rate: keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9),
        "rmsprop": keras.optimizers.RMSprop,
    }
    model.compile(
        optimizer=optimizers[cfg.optimizer](learning_rate=learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def set_trainable_layers(backbone: keras.Model, unfreeze: int | Literal["all"]) -> int:
    """Unfreeze the top `unfreeze` layers (0: none, 'all': every layer); BatchNorm stays frozen.

    Returns how many backbone layers are trainable afterwards.
    """
    import keras

    layers = backbone.layers
    count = len(layers) if unfreeze == "all" else min(int(unfreeze), len(layers))
    backbone.trainable = count > 0
    first = len(layers) - count
    for index, layer in enumerate(layers):
        layer.trainable = index >= first and not isinstance(layer, keras.layers.BatchNormalization)
    return sum(1 for layer in layers if layer.trainable and layer.weights)


def weights_digest(model: keras.Model) -> str:
    """Digest of every weight value: identifies ImageNet, random-init and file weights alike."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(weight.path.encode())
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()[:16]
