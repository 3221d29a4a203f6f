"""Keras layers of our own inside saved models; importing this module registers them for loading.

Kept apart from model.py because registration needs Keras at import time, and model.py is
imported by paths that must not pay for it.
"""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="transferlab")
class MirrorImage(keras.layers.Layer):
    """Flips a batch of NHWC images left to right, in training and inference alike.

    The second view of test-time flipping: the saved model averages the class probabilities of
    each image and its mirror image.
    """

    def call(self, images: Any) -> Any:  # a backend tensor, or a KerasTensor while a model is built
        return keras.ops.flip(images, axis=-2)


@keras.saving.register_keras_serializable(package="transferlab")
class CropView(keras.layers.Layer):
    """One square of a batch of stacked squares: (n, crops, h, w, 3) -> (n, h, w, 3).

    The input of a model with test-time crops holds several squares of each photo
    (`images.square_positions`); one of these layers feeds each square to the shared layers.
    """

    def __init__(self, index: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index = index

    def call(self, crops: Any) -> Any:
        return crops[:, self.index]

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], *input_shape[2:])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "index": self.index}


@keras.saving.register_keras_serializable(package="transferlab")
class PowerNormalization(keras.layers.Layer):
    """sign(x) * ((|x| + eps)^power - eps^power), elementwise: power normalisation of pooled features.

    It compresses the large activations a few channels reach, so the head weighs many moderate
    features instead of a few large ones. `eps` keeps the gradient finite at 0 (a channel pooled
    to exactly 0, as a dead ReLU's is) when a fine-tuned backbone trains through it; it moves the
    values by at most eps^power (0.03 at power 0.5).
    """

    def __init__(self, power: float, epsilon: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.power, self.epsilon = power, epsilon

    def call(self, features: Any) -> Any:
        ops = keras.ops
        return ops.sign(features) * (ops.power(ops.abs(features) + self.epsilon, self.power) - self.epsilon**self.power)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "power": self.power, "epsilon": self.epsilon}
