"""Seeding and determinism: the one place that touches global random state."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and TensorFlow; with `deterministic`, also make TF ops deterministic.

    Op determinism makes two CPU runs with the same seed produce identical metrics, at some
    cost in speed; it stays on for the rest of the process.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
        log.info("TensorFlow op determinism enabled (seed %d)", seed)
