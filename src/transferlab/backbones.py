"""Backbone registry: config name -> constructor, its preprocessing and input size.

Importing this module does not import TensorFlow: a `keras.applications` constructor is
named by a string and looked up only when a model is built; our own are plain functions
whose modules import Keras lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from transferlab.small_cnn import SmallCNN

# How raw RGB pixels in [0, 255] are turned into what the backbone expects.
#   builtin: the application rescales internally (EfficientNet)
#   tf:      scale to [-1, 1] (MobileNet family)
#   caffe:   RGB -> BGR and subtract the ImageNet channel means (ResNet)
Preprocessing = Literal["builtin", "tf", "caffe"]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone."""

    application: str | Callable[..., Any]  # a keras.applications name, or a constructor
    preprocessing: Preprocessing
    default_image_size: int  # when data.image_size is null
    alphas: tuple[float, ...] | None = None
    # File name Keras caches ImageNet no-top weights under; `{alpha}` and `{size}` are filled.
    imagenet_file: str | None = None
    # Input sizes Keras has ImageNet weights for (`{size}`); at any other size it loads the 224 ones.
    imagenet_sizes: tuple[int, ...] = (224,)


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_b0": BackboneSpec("EfficientNetB0", "builtin", 224, imagenet_file="efficientnetb0_notop.h5"),
    "efficientnet_b1": BackboneSpec("EfficientNetB1", "builtin", 240, imagenet_file="efficientnetb1_notop.h5"),
    "efficientnet_b2": BackboneSpec("EfficientNetB2", "builtin", 260, imagenet_file="efficientnetb2_notop.h5"),
    "efficientnet_b3": BackboneSpec("EfficientNetB3", "builtin", 300, imagenet_file="efficientnetb3_notop.h5"),
    # MobileNets: 288, not the 224 their ImageNet weights were trained at. Training crops zoomed
    # ImageNet objects in; a larger input shows whole photos at that scale. Measured for both
    # (README, "How the defaults were chosen"); EfficientNet and ResNet could not be, so they keep
    # their own size.
    "mobilenet_v2": BackboneSpec(
        "MobileNetV2",
        "tf",
        288,
        alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
        imagenet_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{size}_no_top.h5",
        imagenet_sizes=(96, 128, 160, 192, 224),
    ),
    "mobilenet": BackboneSpec(
        "MobileNet",
        "tf",
        288,
        alphas=(0.25, 0.5, 0.75, 1.0),
        imagenet_file="mobilenet_{alpha_code}_{size}_tf_no_top.h5",
        imagenet_sizes=(128, 160, 192, 224),
    ),
    "resnet50": BackboneSpec(
        "ResNet50", "caffe", 224, imagenet_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    ),
    # No pretrained weights: for the offline demo and plumbing tests.
    "small_cnn": BackboneSpec(SmallCNN, "tf", 64),
}


def imagenet_weights_filename(backbone: str, alpha: float | None, image_size: int) -> str | None:
    """The file name under `$KERAS_HOME/models/` that Keras reads ImageNet weights from."""
    spec = BACKBONES[backbone]
    if spec.imagenet_file is None:
        return None
    alpha = alpha if alpha is not None else 1.0
    alpha_code = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}.get(alpha, str(alpha))
    size = image_size if image_size in spec.imagenet_sizes else 224
    return spec.imagenet_file.format(alpha=alpha, alpha_code=alpha_code, size=size)
