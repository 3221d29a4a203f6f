"""Random training-time augmentation built from `augment` config (applied in tf.data only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transferlab.config import AugmentConfig

if TYPE_CHECKING:
    import keras


def build_augmenter(cfg: AugmentConfig, seed: int) -> keras.Sequential | None:
    """A Sequential of Keras random layers, or None when every strength is zero.

    It runs inside the training input pipeline, never in the saved inference model.
    """
    import keras

    if not cfg.enabled:
        return None
    layers: list[keras.layers.Layer] = []
    if cfg.flip != "none":
        layers.append(keras.layers.RandomFlip(cfg.flip, seed=seed))
    if cfg.rotation:
        layers.append(keras.layers.RandomRotation(cfg.rotation, fill_mode="reflect", seed=seed + 1))
    if cfg.zoom:
        layers.append(keras.layers.RandomZoom(cfg.zoom, fill_mode="reflect", seed=seed + 2))
    if cfg.translation:
        layers.append(
            keras.layers.RandomTranslation(cfg.translation, cfg.translation, fill_mode="reflect", seed=seed + 3)
        )
    if cfg.contrast:
        layers.append(keras.layers.RandomContrast(cfg.contrast, value_range=(0, 255), seed=seed + 4))
    return keras.Sequential(layers, name="augment")
