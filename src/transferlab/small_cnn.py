"""A small convolutional backbone with no pretrained weights, for demos and plumbing tests.

ImageNet backbones with random weights produce vanishing features when frozen (their
BatchNorm layers run on initial statistics), so nothing can be learnt from them offline.
Four plain conv blocks keep useful colour and shape information even at random init, and
train from scratch in seconds when unfrozen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras


def SmallCNN(  # noqa: N802 - named like the keras.applications constructors it stands beside
    include_top: bool = False,
    weights: str | None = None,
    input_shape: tuple[int, int, int] = (64, 64, 3),
    name: str = "small_cnn",
) -> keras.Model:
    """Same call signature as `keras.applications.*`; `weights` may be None or a weights file."""
    import keras

    if include_top:
        raise ValueError("small_cnn has no classification top")
    inputs = keras.Input(input_shape)
    x = inputs
    for index, filters in enumerate((32, 64, 128, 256)):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", name=f"conv{index + 1}")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model
