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
