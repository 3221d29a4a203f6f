"""Builds Keras classifiers from config. Knows nothing of files, datasets or MLflow.

The model takes RGB pixels in [0, 255] and carries the backbone's own preprocessing, so
the input pipeline, `predict` and the served model never need to know which backbone it is:

    image -> preprocessing -> backbone (inference mode) -> GlobalAveragePooling -> head
    head:  [power normalisation] -> [BatchNormalization] -> Dropout -> Dense logits -> / temperature -> softmax

The temperature is 1 while training; calibration (`with_temperature`) sets it from the
validation split, inside the saved model, so every consumer gets calibrated probabilities.
With test-time flipping (`attach_head`), the saved model runs the same layers on the image and
on its mirror image and averages the two probability vectors; with test-time crops, it takes
several squares of each photo along its long side and averages over them too.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
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
LOGITS_LAYER = "logits"
HEAD_BATCHNORM_LAYER = "head_batchnorm"
POWER_LAYER = "power_normalization"
TEMPERATURE_LAYER = "temperature"
MIRROR_LAYER = "mirror"  # in a saved model with test-time flipping
SINGLE_VIEW_MODEL = "single_view"  # in a saved model with test-time crops: the model of one square
# A warm-up starts at this fraction of the phase's learning rate.
WARMUP_START = 0.01


@dataclass
class Classifier:
    """The pieces training needs: the full model and its parts (layers are shared)."""

    model: keras.Model
    backbone: keras.Model
    features: keras.Model  # image -> pooled backbone features
    head: keras.Model  # pooled features -> class probabilities
    preprocess: Callable[[keras.KerasTensor], keras.KerasTensor]  # pixels in [0, 255] -> backbone input


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


def weights_argument(cfg: ModelConfig) -> str | None:
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
    """Where Keras looks for the weights file it could not download, and what `model.weights` takes
    instead: for a backbone whose files Keras names by input size (the MobileNets), any size's
    no-top file of the alpha, since no-top weights load at every input size."""
    models = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    filename = imagenet_weights_filename(cfg.backbone, cfg.alpha, image_size)
    missing = f"could not load ImageNet weights for {cfg.backbone} (offline?): put {filename} in {models}/"
    if len(BACKBONES[cfg.backbone].imagenet_sizes) == 1:
        return f"{missing} or set model.weights=/path/to/{filename}"
    alpha = cfg.alpha if cfg.alpha is not None else 1.0
    example = imagenet_weights_filename(cfg.backbone, cfg.alpha, 224)
    return (
        f"{missing}, or set model.weights=<path> to the no-top file of alpha {alpha} for any input size, "
        f"such as {example} (Keras names them by size; each loads at every data.image_size)"
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
        "weights": weights_argument(cfg),
        "input_shape": (image_size, image_size, 3),
    }
    if spec.alphas is not None:
        kwargs["alpha"] = cfg.alpha if cfg.alpha is not None else 1.0
    try:
        with warnings.catch_warnings():  # at sizes with no weights of their own (288), the 224 ones: what we want
            warnings.filterwarnings("ignore", message=".*Weights for input shape .* will be loaded as the default")
            return constructor(**kwargs)
    except ValueError as exc:
        raise ModelError(f"cannot build {cfg.backbone}: {first_line(exc)}") from exc
    except Exception as exc:  # URL, HTTP and OS errors of Keras' weight download
        if kwargs["weights"] == "imagenet":
            raise ModelError(_missing_imagenet_hint(cfg, image_size)) from exc
        raise ModelError(f"cannot load model.weights {cfg.weights}: {first_line(exc)}") from exc


def build_head(num_features: int, num_classes: int, cfg: ModelConfig, seed: int | None = None) -> keras.Model:
    """GlobalAveragePooling's successor: [power normalisation] -> [BatchNormalization] -> Dropout ->
    Dense logits -> softmax. Power normalisation (`model.feature_power` below 1) needs no cache of
    its own: the cached pooled features go in as they are.

    With `seed`, the initial weights and the dropout masks follow from it alone, not from how
    much of the global random state earlier layer constructions drew.
    """
    import keras

    from transferlab.layers import PowerNormalization

    inputs = keras.Input((num_features,), name="pooled_features")
    x = inputs
    if cfg.feature_power != 1:
        x = PowerNormalization(cfg.feature_power, dtype="float32", name=POWER_LAYER)(x)
    if cfg.head_batchnorm:
        # momentum 0.9 (Keras: 0.99): inference statistics settle within a few dozen steps, which
        # matters on small datasets where an epoch is only a handful of batches.
        x = keras.layers.BatchNormalization(momentum=0.9, name=HEAD_BATCHNORM_LAYER)(x)
    x = keras.layers.Dropout(cfg.dropout, seed=seed, name="head_dropout")(x)
    # float32 from here on keeps softmax stable under a mixed_float16 policy.
    initializer = keras.initializers.GlorotUniform(seed=seed)
    logits = keras.layers.Dense(num_classes, kernel_initializer=initializer, dtype="float32", name=LOGITS_LAYER)(x)
    return keras.Model(inputs, _probabilities(logits, 1.0), name=HEAD_MODEL)


def _probabilities(logits: keras.KerasTensor, temperature: float) -> keras.KerasTensor:
    import keras

    scaled = keras.layers.Rescaling(1.0 / temperature, dtype="float32", name=TEMPERATURE_LAYER)(logits)
    return keras.layers.Softmax(dtype="float32", name="probabilities")(scaled)


def with_temperature(head: keras.Model, temperature: float) -> keras.Model:
    """The same head (shared layers) with its logits divided by `temperature` before the softmax."""
    import keras

    logits = head.get_layer(LOGITS_LAYER).output
    return keras.Model(head.input, _probabilities(logits, temperature), name=HEAD_MODEL)


def head_logits(head: keras.Model) -> keras.Model:
    """pooled features -> logits (before temperature and softmax), sharing the head's layers."""
    import keras

    return keras.Model(head.input, head.get_layer(LOGITS_LAYER).output, name="head_logits")


def head_features(head: keras.Model, pooled: np.ndarray) -> np.ndarray:
    """What the head's affine part (`head_affine`) maps to logits: the pooled features, power-
    normalised when the head starts with that (`model.feature_power`)."""
    if POWER_LAYER not in {layer.name for layer in head.layers}:
        return np.asarray(pooled)
    return run_head(head.get_layer(POWER_LAYER), pooled)


def head_affine(head: keras.Model) -> tuple[np.ndarray, np.ndarray]:
    """The head's logits as one affine map of its features (`head_features`), (kernel, bias), at
    inference.

    Dropout is the identity there, and a head BatchNormalization scales and shifts each feature by
    its moving statistics, which folds into the Dense layer's kernel and bias.
    """
    kernel, bias = (np.asarray(w, dtype=np.float64) for w in head.get_layer(LOGITS_LAYER).get_weights())
    if HEAD_BATCHNORM_LAYER in {layer.name for layer in head.layers}:
        norm = head.get_layer(HEAD_BATCHNORM_LAYER)
        gamma, beta, mean, variance = (np.asarray(w, dtype=np.float64) for w in norm.get_weights())
        scale = gamma / np.sqrt(variance + norm.epsilon)
        bias = bias + (beta - scale * mean) @ kernel
        kernel = scale[:, None] * kernel
    return kernel, bias


def set_head_affine(head: keras.Model, kernel: np.ndarray, bias: np.ndarray) -> None:
    """Make the head's logits the affine map (kernel, bias) of its features (`head_affine`);
    a head BatchNormalization becomes the identity (up to float32 rounding of its epsilon)."""
    if HEAD_BATCHNORM_LAYER in {layer.name for layer in head.layers}:
        norm = head.get_layer(HEAD_BATCHNORM_LAYER)
        size = len(kernel)
        identity = [np.ones(size), np.zeros(size), np.zeros(size), np.full(size, 1.0 - norm.epsilon)]
        norm.set_weights([w.astype("float32") for w in identity])
    head.get_layer(LOGITS_LAYER).set_weights([kernel.astype("float32"), bias.astype("float32")])


def run_head(head: keras.Model | keras.layers.Layer, pooled: np.ndarray) -> np.ndarray:
    """The head (or `head_logits`, or one of its layers) on pooled features, in one eager call.

    `predict` would first trace a predict function for this tiny model, which costs more
    than running it on a whole split; one eager call takes milliseconds.
    """
    import keras

    outputs = head(keras.ops.convert_to_tensor(np.asarray(pooled, dtype="float32")), training=False)
    return np.asarray(keras.ops.convert_to_numpy(outputs), dtype=np.float64)


def build_classifier(
    cfg: ModelConfig,
    num_classes: int,
    image_size: int,
    *,
    seed: int | None = None,
    backbone: keras.Model | None = None,
    head: keras.Model | None = None,
) -> Classifier:
    """A frozen backbone with a new head; call `set_trainable_layers` to fine-tune.

    `seed` seeds the head (see `build_head`). A `backbone` or `head` given (reuse.py: kept from
    an earlier job) is used instead of a new one.
    """
    import keras

    if backbone is None:
        backbone = build_backbone(cfg, image_size)
    backbone.trainable = False
    layers = _preprocessing(BACKBONES[cfg.backbone].preprocessing, image_size)

    def preprocess(x: keras.KerasTensor) -> keras.KerasTensor:
        for layer in layers:
            x = layer(x)
        return x

    inputs = keras.Input((image_size, image_size, 3), name="image")
    # training=False keeps every BatchNormalization in inference mode, even when unfrozen.
    x = backbone(preprocess(inputs), training=False)
    pooled = keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
    features = keras.Model(inputs, pooled, name="features")
    if head is None:
        head = build_head(int(pooled.shape[-1]), num_classes, cfg, seed)
    model = keras.Model(inputs, head(pooled), name=f"{cfg.backbone}_classifier")
    return Classifier(model=model, backbone=backbone, features=features, head=head, preprocess=preprocess)


def attach_head(
    classifier: Classifier, head: keras.Model, *, test_time_flip: bool, test_time_crops: int = 1
) -> keras.Model:
    """The full classifier: `classifier`'s features and a (trained) head.

    With `test_time_flip`, the same layers also run on the mirror image, and the model outputs
    the mean of the two probability vectors. With `test_time_crops` above 1, the model takes
    that many squares of each photo, spread along its long side (`images.square_positions`), as
    an (n, crops, size, size, 3) batch, runs that model of one square (`SINGLE_VIEW_MODEL`, the
    same layers) on each, and outputs the mean of their probabilities.
    """
    import keras

    from transferlab.layers import CropView, MirrorImage

    features = classifier.features
    probabilities = head(features.output)
    if test_time_flip:
        mirrored = classifier.preprocess(MirrorImage(name=MIRROR_LAYER)(features.input))
        pooled = features.get_layer(POOL_LAYER)(classifier.backbone(mirrored, training=False))
        # float32, as the head's output: under a mixed_float16 policy the mean would be float16.
        mean = keras.layers.Average(dtype="float32", name="test_time_flip")
        probabilities = mean([probabilities, head(pooled)])
    if test_time_crops == 1:
        return keras.Model(features.input, probabilities, name=classifier.model.name)
    single_view = keras.Model(features.input, probabilities, name=SINGLE_VIEW_MODEL)
    crops = keras.Input((test_time_crops, *features.input.shape[1:]), name="image_crops")
    # float32: under a mixed_float16 policy the layer would round the pixels to float16
    per_crop = [single_view(CropView(i, dtype="float32", name=f"crop_{i}")(crops)) for i in range(test_time_crops)]
    mean = keras.layers.Average(dtype="float32", name="test_time_crops")
    return keras.Model(crops, mean(per_crop), name=classifier.model.name)


def single_view_model(model: keras.Model) -> keras.Model:
    """The model of one square inside a model with test-time crops; any other model itself."""
    names = {layer.name for layer in model.layers}
    return model.get_layer(SINGLE_VIEW_MODEL) if SINGLE_VIEW_MODEL in names else model


def flips_at_test_time(model: keras.Model) -> bool:
    """True when `model` averages each image's prediction with its mirror image's."""
    from transferlab.layers import MirrorImage

    return any(isinstance(layer, MirrorImage) for layer in single_view_model(model).layers)


def local_copy(classifier: Classifier, cfg: ModelConfig, num_classes: int, image_size: int) -> Classifier:
    """`classifier` rebuilt outside any distribution strategy, with its weights.

    A `multi_worker` chief calibrates and saves the model alone; the trained variables take part
    in the workers' collectives, which the others have left by then.
    """
    copy = build_classifier(cfg, num_classes, image_size)
    copy.model.set_weights(classifier.model.get_weights())
    return copy


def load_training_state(model: keras.Model, saved: keras.Model) -> None:
    """Copy a checkpointed twin's weights and optimizer state (step, moments, learning rate) into `model`.

    `model` is freshly built and compiled the same way; its optimizer is built here if needed.
    """
    model.set_weights(saved.get_weights())
    if saved.optimizer is None or not saved.optimizer.variables:
        return
    model.optimizer.build(model.trainable_variables)
    for ours, theirs in zip(model.optimizer.variables, saved.optimizer.variables, strict=True):
        ours.assign(theirs)


def learning_rate_schedule(
    schedule: str, learning_rate: float, epochs: int, warmup_epochs: int, steps_per_epoch: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The phase's learning rate: constant, or cosine decay over its epochs; linear warm-up first.

    `plateau` starts constant; the training loop lowers it when validation stalls.
    """
    import keras

    warmup_steps = warmup_epochs * steps_per_epoch
    if schedule == "plateau" or (schedule == "constant" and not warmup_steps):
        return learning_rate
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate * WARMUP_START if warmup_steps else learning_rate,
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
        decay_steps=max(1, (epochs - warmup_epochs) * steps_per_epoch),
        alpha=1.0 if schedule == "constant" else 0.0,  # alpha 1: no decay after the warm-up
    )


def current_learning_rate(model: keras.Model) -> float:
    """The rate of the optimizer's next step: a constant, or its schedule at the step reached."""
    import keras

    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def compile_classifier(
    model: keras.Model, cfg: TrainConfig, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule
) -> None:
    """Compile for training: the configured optimizer and weight decay, cross-entropy, accuracy."""
    import keras

    optimizers = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "sgd": lambda **kwargs: keras.optimizers.SGD(momentum=0.9, **kwargs),
        "rmsprop": keras.optimizers.RMSprop,
    }
    model.compile(
        optimizer=optimizers[cfg.optimizer](learning_rate=learning_rate, weight_decay=cfg.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def first_trainable_layer(backbone: keras.Model, unfreeze: int | Literal["all"]) -> int:
    """Index of the lowest backbone layer that trains when the top `unfreeze` layers do."""
    layers = backbone.layers
    return 0 if unfreeze == "all" else len(layers) - min(int(unfreeze), len(layers))


def set_trainable_layers(backbone: keras.Model, unfreeze: int | Literal["all"]) -> int:
    """Unfreeze the top `unfreeze` layers (0: none, 'all': every layer); BatchNorm stays frozen.

    Returns how many backbone layers are trainable afterwards.
    """
    import keras

    layers = backbone.layers
    first = first_trainable_layer(backbone, unfreeze)
    backbone.trainable = first < len(layers)
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
