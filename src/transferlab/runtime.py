"""Execution environment: distribution strategy, mixed precision, and a device description."""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from transferlab.config import TrainConfig

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)


def make_strategy(cfg: TrainConfig) -> tf.distribute.Strategy:
    """`auto`: mirrored over all GPUs when there are several, else the default strategy.

    `mirrored` without GPUs mirrors over the logical CPU devices (two of them in the tests);
    `multi_worker` reads the cluster from TF_CONFIG.
    """
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if cfg.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if cfg.strategy == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


@contextmanager
def precision_policy(cfg: TrainConfig) -> Iterator[str]:
    """mixed_float16 on GPU when asked for; float32 otherwise. Restored afterwards."""
    import keras
    import tensorflow as tf

    previous = keras.mixed_precision.global_policy().name
    policy = "float32"
    if cfg.mixed_precision:
        if tf.config.list_physical_devices("GPU"):
            policy = "mixed_float16"
        else:
            log.warning("train.mixed_precision is ignored on CPU (no speed-up there): training in float32")
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield policy
    finally:
        keras.mixed_precision.set_global_policy(previous)


def device_description() -> str:
    """e.g. 'GPU: NVIDIA H200' or 'CPU: x86_64 (2 cores)'."""
    import os

    import tensorflow as tf

    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("device_name", gpu.name))
    if names:
        return "GPU: " + ", ".join(names)
    return f"CPU: {platform.machine()} ({os.cpu_count()} cores)"
