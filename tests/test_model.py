"""Model construction: every backbone, its preprocessing, the unfreeze policy, weights sources."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from transferlab.backbones import BACKBONES, imagenet_weights_filename
from transferlab.config import ModelConfig
from transferlab.errors import ConfigError, ModelError
from transferlab.model import (
    attach_head,
    build_classifier,
    flips_at_test_time,
    set_trainable_layers,
    single_view_model,
    weights_digest,
)

MOBILENET_V2_WEIGHTS = "weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"


def alpha_for(backbone: str) -> float | None:
    alphas = BACKBONES[backbone].alphas
    return None if alphas is None else alphas[0]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_builds_a_softmax_classifier(backbone: str) -> None:
    cfg = ModelConfig(backbone=backbone, alpha=alpha_for(backbone), weights=None, dropout=0.3)
    classifier = build_classifier(cfg, num_classes=4, image_size=64)
    probabilities = classifier.model.predict(np.full((2, 64, 64, 3), 128.0, "float32"), verbose=0)
    assert probabilities.shape == (2, 4)
    assert probabilities.sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert classifier.model.input_shape == (None, 64, 64, 3)
    assert not any(w.trainable for w in classifier.backbone.weights), "the backbone starts frozen"
    head = [layer.name for layer in classifier.head.layers]
    assert head == ["pooled_features", "head_dropout", "logits", "temperature", "probabilities"]
    assert classifier.head.get_layer("head_dropout").rate == pytest.approx(0.3)


def test_the_published_recipe_head_has_batchnorm_before_dropout() -> None:
    cfg = ModelConfig(backbone="small_cnn", weights=None, dropout=0.2, head_batchnorm=True)
    head = [layer.name for layer in build_classifier(cfg, num_classes=3, image_size=32).head.layers]
    assert head[:3] == ["pooled_features", "head_batchnorm", "head_dropout"]


def test_power_normalisation_takes_signed_roots_with_a_finite_gradient_at_zero() -> None:
    import tensorflow as tf

    from transferlab.layers import PowerNormalization

    layer = PowerNormalization(0.5)
    x = tf.constant([[-4.0, 0.0, 0.25, 9.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    np.testing.assert_allclose(y.numpy(), [[-2.0, 0.0, 0.5, 3.0]], atol=0.035)  # eps moves them by ~eps ** 0.5
    gradient = tape.gradient(y, x).numpy()
    assert np.all(np.isfinite(gradient))  # without eps, 0 * inf = NaN at 0, the value of a dead channel


def test_a_power_normalised_head_stays_affine_in_its_features_and_survives_saving(tmp_path: Path) -> None:
    """With `model.feature_power`, the head starts with the power normalisation; its logits are an
    affine map of `head_features` (what an ensemble averages), and a saved model loads in safe mode."""
    from transferlab.inference import load_model
    from transferlab.model import head_affine, head_features, head_logits, run_head

    cfg = ModelConfig(backbone="small_cnn", weights=None, feature_power=0.5, head_batchnorm=True)
    classifier = build_classifier(cfg, num_classes=3, image_size=32, seed=0)
    head = classifier.head
    assert [layer.name for layer in head.layers][:3] == ["pooled_features", "power_normalization", "head_batchnorm"]
    pooled = np.random.default_rng(0).uniform(0, 6, (5, int(head.input.shape[-1]))).astype("float32")
    features = head_features(head, pooled)
    np.testing.assert_allclose(features, np.sqrt(pooled + 1e-3) - np.sqrt(1e-3), rtol=1e-5)
    kernel, bias = head_affine(head)
    np.testing.assert_allclose(features @ kernel + bias, run_head(head_logits(head), pooled), rtol=1e-4, atol=1e-4)

    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    classifier.model.save(tmp_path / "model.keras")
    np.testing.assert_allclose(load_model(tmp_path / "model.keras")(images), classifier.model(images), atol=1e-6)


def test_feature_power_outside_zero_to_one_is_one_line_at_the_door() -> None:
    for power in (0.0, 1.5):
        with pytest.raises(ConfigError, match=r"model.feature_power must be in \(0, 1\], got"):
            ModelConfig(backbone="small_cnn", weights=None, feature_power=power).check()


def test_mobilenet_preprocessing_maps_pixels_to_unit_range() -> None:
    classifier = build_classifier(ModelConfig("mobilenet_v2", alpha=0.35, weights=None), 3, 32)
    layer = classifier.model.get_layer("scale_to_unit_range")
    out = np.asarray(layer(np.array([[[[0.0, 127.5, 255.0]]]], "float32")))
    assert out.ravel() == pytest.approx([-1.0, 0.0, 1.0])


def test_resnet_preprocessing_matches_keras_caffe_mode() -> None:
    import keras

    classifier = build_classifier(ModelConfig("resnet50", weights=None), 3, 32)
    layer = classifier.model.get_layer("caffe_rgb_to_bgr_centered")
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = keras.applications.resnet50.preprocess_input(pixels.copy())
    assert np.asarray(layer(pixels)) == pytest.approx(expected, abs=1e-3)


def test_test_time_flipping_averages_the_image_and_its_mirror_image_and_survives_saving(tmp_path: Path) -> None:
    """The saved model's output is the mean of the classifier on each image and on it flipped
    left to right; it loads back in safe mode with the same output (layers.py registers the flip)."""
    import keras

    from transferlab.inference import load_model

    cfg = ModelConfig(backbone="small_cnn", alpha=None, weights=None)
    classifier = build_classifier(cfg, num_classes=3, image_size=32, seed=0)
    flipping = attach_head(classifier, classifier.head, test_time_flip=True)
    plain = attach_head(classifier, classifier.head, test_time_flip=False)
    assert flips_at_test_time(flipping) and not flips_at_test_time(plain)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    expected = (plain(images).numpy() + plain(images[:, :, ::-1]).numpy()) / 2
    assert not np.allclose(plain(images).numpy(), expected, atol=1e-4), "these images are not symmetric"
    np.testing.assert_allclose(flipping(images).numpy(), expected, atol=1e-6)
    flipping.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")  # safe mode
    assert flips_at_test_time(loaded) and len(loaded.weights) == len(plain.weights)  # layers shared, not copied
    np.testing.assert_allclose(loaded(images).numpy(), expected, atol=1e-6)
    # evaluate's cached path cuts its extractor at the pooling layer's first call: the image, not its mirror
    extractor = keras.Model(loaded.input, loaded.get_layer("pool").output)
    np.testing.assert_allclose(extractor(images).numpy(), classifier.features(images).numpy(), atol=1e-6)


def test_test_time_crops_average_the_model_of_one_square_over_each_square_and_survive_saving(tmp_path: Path) -> None:
    """With 3 crops the model takes (n, 3, size, size, 3) and outputs the mean of the flipping model
    on each square; saved and loaded (safe mode), it still does, with the layers shared, not copied."""
    from transferlab.inference import load_model, model_crops, model_image_size, predict_pixels

    cfg = ModelConfig(backbone="small_cnn", alpha=None, weights=None)
    classifier = build_classifier(cfg, num_classes=3, image_size=32, seed=0)
    one_square = attach_head(classifier, classifier.head, test_time_flip=True)
    cropping = attach_head(classifier, classifier.head, test_time_flip=True, test_time_crops=3)
    squares = np.random.default_rng(0).uniform(0, 255, (4, 3, 32, 32, 3)).astype("float32")
    per_square = [one_square(squares[:, i]).numpy() for i in range(3)]
    assert not np.allclose(per_square[0], per_square[2], atol=1e-4), "the squares differ"
    np.testing.assert_allclose(cropping(squares).numpy(), np.mean(per_square, axis=0), atol=1e-6)
    assert (model_crops(cropping), model_image_size(cropping), model_crops(one_square)) == (3, 32, 1)
    cropping.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    assert flips_at_test_time(loaded) and model_crops(loaded) == 3 and len(loaded.weights) == len(one_square.weights)
    np.testing.assert_allclose(loaded(squares).numpy(), np.mean(per_square, axis=0), atol=1e-6)
    assert single_view_model(loaded).input_shape == (None, 32, 32, 3)
    without_flips = attach_head(classifier, classifier.head, test_time_flip=False, test_time_crops=2)
    assert not flips_at_test_time(without_flips) and model_crops(without_flips) == 2
    # more squares than one eager call takes go through `predict`, a whole number of photos a batch
    many = np.random.default_rng(1).uniform(0, 255, (12, 3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(predict_pixels(loaded, many), loaded(many).numpy(), atol=1e-5)


def test_unfreeze_top_layers_keeps_batchnorm_frozen() -> None:
    import keras

    classifier = build_classifier(ModelConfig("mobilenet_v2", alpha=0.35, weights=None), 3, 32)
    backbone = classifier.backbone
    assert set_trainable_layers(backbone, 0) == 0
    assert not backbone.trainable_weights

    set_trainable_layers(backbone, 20)
    top, rest = backbone.layers[-20:], backbone.layers[:-20]
    assert all(not layer.trainable for layer in rest)
    for layer in top:
        assert layer.trainable == (not isinstance(layer, keras.layers.BatchNormalization)), layer.name
    assert any(layer.trainable and layer.weights for layer in top)

    trainable = set_trainable_layers(backbone, "all")
    batchnorms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert batchnorms and not any(layer.trainable for layer in batchnorms)
    assert trainable == sum(1 for layer in backbone.layers if layer.weights and layer not in batchnorms)


def test_imagenet_only_for_backbones_that_have_it() -> None:
    with pytest.raises(ConfigError, match=r"model.weights must be null or a file for small_cnn"):
        ModelConfig("small_cnn", weights="imagenet").check()


def test_missing_weights_file_is_one_clear_error(tmp_path: Path) -> None:
    cfg = ModelConfig("mobilenet_v2", alpha=0.35, weights=str(tmp_path / "nope.h5"))
    with pytest.raises(ModelError, match=r"model.weights file .*nope.h5 does not exist"):
        build_classifier(cfg, 3, 32)


def test_a_seeded_head_does_not_depend_on_what_was_built_before() -> None:
    cfg = ModelConfig("mobilenet_v2", alpha=0.35, weights=None)
    first = build_classifier(cfg, 3, 32, seed=5)
    build_classifier(cfg, 3, 32)  # draws from the global random state
    second = build_classifier(cfg, 3, 32, seed=5)
    for a, b in zip(first.head.get_weights(), second.head.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_imagenet_filenames_match_keras_cache_names() -> None:
    assert (
        imagenet_weights_filename("mobilenet_v2", 0.35, 224)
        == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    )
    assert imagenet_weights_filename("mobilenet", 0.25, 224) == "mobilenet_2_5_224_tf_no_top.h5"
    assert imagenet_weights_filename("mobilenet", 0.25, 288) == "mobilenet_2_5_224_tf_no_top.h5"  # the default size
    # Keras has weights at 96 px for MobileNetV2 only (keras.applications' own size checks).
    assert imagenet_weights_filename("mobilenet_v2", 0.35, 96).endswith("_0.35_96_no_top.h5")
    assert imagenet_weights_filename("mobilenet", 0.25, 96) == "mobilenet_2_5_224_tf_no_top.h5"
    assert imagenet_weights_filename("efficientnet_b0", None, 224) == "efficientnetb0_notop.h5"


@pytest.mark.shared
def test_weights_file_from_shared_loads_imagenet_weights(shared_dir: Path) -> None:
    path = shared_dir / MOBILENET_V2_WEIGHTS
    pretrained = build_classifier(ModelConfig("mobilenet_v2", alpha=0.35, weights=str(path)), 5, 224)
    random = build_classifier(ModelConfig("mobilenet_v2", alpha=0.35, weights=None), 5, 224)
    assert weights_digest(pretrained.backbone) != weights_digest(random.backbone)
    # ImageNet features respond to image content; frozen random ones barely do.
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 224, 224, 3)).astype("float32")
    spread = pretrained.features.predict(images, verbose=0).std(axis=0).mean()
    assert spread > 1e-3


IMAGENET_SCRIPT = """
from transferlab.config import ModelConfig
from transferlab.model import build_classifier
import sys
build_classifier(ModelConfig("mobilenet_v2", alpha=0.35, weights="imagenet"), 5, 288)
print("loaded")
"""


@pytest.mark.shared
@pytest.mark.slow
def test_imagenet_weights_load_from_keras_home_without_download(shared_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "keras" / "models"
    models.mkdir(parents=True)
    (models / Path(MOBILENET_V2_WEIGHTS).name).symlink_to(shared_dir / MOBILENET_V2_WEIGHTS)
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras")}
    done = subprocess.run([sys.executable, "-c", IMAGENET_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded" in done.stdout
    # 288 px, the MobileNets' default, has no weights of its own: the 224 px file loads, as chosen,
    # without Keras warning that it does.
    assert "will be loaded as the default" not in done.stderr


OFFLINE_SCRIPT = """
from transferlab.config import ModelConfig
from transferlab.errors import ModelError
from transferlab.model import build_classifier
for cfg, size in [(ModelConfig("efficientnet_b0", weights="imagenet"), 224),
                  (ModelConfig("mobilenet_v2", alpha=0.35, weights="imagenet"), 160)]:
    try:
        build_classifier(cfg, 5, size)
    except ModelError as exc:
        print("ModelError:", exc)
"""


@pytest.mark.slow
def test_unreachable_imagenet_download_says_where_to_put_the_file(tmp_path: Path) -> None:
    # No network here; on a machine with one, a proxy that refuses keeps the test offline.
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": ""}
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    efficientnet, mobilenet = [line for line in done.stdout.splitlines() if line.startswith("ModelError:")]
    assert efficientnet.startswith("ModelError: could not load ImageNet weights for efficientnet_b0")
    assert "efficientnetb0_notop.h5" in efficientnet and str(tmp_path / "keras" / "models") in efficientnet
    # New-user report: at 160 px the line asked for the 160 px file alone, though any size's loads.
    models = tmp_path / "keras" / "models"
    assert mobilenet == (
        "ModelError: could not load ImageNet weights for mobilenet_v2 (offline?): put "
        f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_160_no_top.h5 in {models}/, or set "
        "model.weights=<path> to the no-top file of alpha 0.35 for any input size, such as "
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5 (Keras names them by size; "
        "each loads at every data.image_size)"
    )


@pytest.mark.shared
def test_a_no_top_weights_file_of_another_size_loads(shared_dir: Path) -> None:
    """What the offline hint promises: the 224 px no-top file, set as model.weights, at 160 px."""
    cfg = ModelConfig("mobilenet_v2", alpha=0.35, weights=str(shared_dir / MOBILENET_V2_WEIGHTS))
    model = build_classifier(cfg, 5, 160)
    assert model.backbone.input_shape == (None, 160, 160, 3)
