"""Keras layers of our own inside saved models; importing this module registers them for loading.

Kept apart from model.py because registration needs Keras at import time, and model.py is
imported by paths that must not pay for it.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="transferlab")
class MirrorImage(keras.layers.Layer):
    """Flips a batch of NHWC images left to right, in training and inference alike.

    The second view of test-time flipping: the saved model averages the class probabilities of
    each image and its mirror image.
    """

    def call(self, images: keras.KerasTensor) -> keras.KerasTensor:
        return keras.ops.flip(images, axis=-2)
