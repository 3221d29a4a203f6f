"""Execution environment: distribution strategy, this process's role among workers, mixed precision,
and a device description."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transferlab.config import MultiWorkerConfig, TrainConfig
from transferlab.errors import ConfigError

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerRole:
    """Where this process stands in a `multi_worker` cluster (a single process is its own chief)."""

    task: str = "chief"  # e.g. "worker:1"
    is_chief: bool = True
    workers: int = 1


def worker_role(cfg: TrainConfig) -> WorkerRole:
    """Read TF_CONFIG for `train.strategy=multi_worker`: the chief is task `chief`, else `worker` 0."""
    if cfg.strategy != "multi_worker":
        return WorkerRole()
    raw = os.environ.get("TF_CONFIG", "")
    try:
        spec = json.loads(raw)
        cluster, task = spec["cluster"], spec["task"]
        task_type, index = str(task["type"]), int(task["index"])
        if not 0 <= index < len(cluster[task_type]):
            raise IndexError(f"task index {index} is not in the cluster's {task_type} list")
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(
            "train.strategy=multi_worker needs TF_CONFIG naming the cluster and this task, e.g. "
            '{"cluster": {"worker": ["host1:23456", "host2:23456"]}, "task": {"type": "worker", "index": 0}}'
            f"; got {raw!r}"
        ) from exc
    unsupported = sorted(set(cluster) - {"chief", "worker"})
    if unsupported or task_type not in ("chief", "worker"):
        raise ConfigError(f"TF_CONFIG: only chief and worker tasks are supported, got {unsupported or task_type}")
    is_chief = task_type == "chief" or ("chief" not in cluster and index == 0)
    workers = sum(len(cluster[kind]) for kind in ("chief", "worker") if kind in cluster)
    return WorkerRole(f"{task_type}:{index}", is_chief, workers)


def make_strategy(cfg: TrainConfig, multi_worker: MultiWorkerConfig | None = None) -> tf.distribute.Strategy:
    """`auto`: mirrored over all GPUs when there are several, else the default strategy.

    `mirrored` without GPUs mirrors over the logical CPU devices (two of them in the tests);
    `multi_worker` reads the cluster from TF_CONFIG and waits for every worker to start (at most
    `multi_worker.join_timeout` seconds). It must come before any other TensorFlow work.
    """
    import tensorflow as tf

    if cfg.strategy == "multi_worker":
        return _multi_worker_strategy(worker_role(cfg), (multi_worker or MultiWorkerConfig()).join_timeout)
    gpus = tf.config.list_logical_devices("GPU")
    if cfg.strategy == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _multi_worker_strategy(role: WorkerRole, join_timeout: float) -> tf.distribute.MultiWorkerMirroredStrategy:
    """The strategy, once all workers are up. TensorFlow waits for them with no limit, holding the
    GIL (and a waiting worker ignores SIGTERM), so past `join_timeout` a watchdog process ends
    this one (SIGKILL) after printing one line."""
    import tensorflow as tf

    from transferlab import keras_multi_worker

    keras_multi_worker.apply()
    message = (
        f"ConfigError: multi_worker: not every worker in TF_CONFIG started within {join_timeout:g} s "
        f"(this is {role.task}); start them all, or raise multi_worker.join_timeout"
    )
    with _watchdog(join_timeout, message):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    log.info("multi_worker: %s of %d workers, %d replicas", role.task, role.workers, strategy.num_replicas_in_sync)
    return strategy


@contextmanager
def _watchdog(seconds: float, message: str) -> Iterator[None]:
    """Unless the block ends within `seconds`, a helper process prints `message` and kills this one."""
    me = os.getpid()
    code = (
        f"import os, sys, time\ntime.sleep({seconds!r})\n"
        f"if os.getppid() == {me}:\n    print({message!r}, file=sys.stderr, flush=True)\n    os.kill({me}, 9)\n"
    )
    helper = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield
    finally:
        helper.kill()
        helper.wait(timeout=10)


def from_chief(strategy: tf.distribute.Strategy, value: int, is_chief: bool) -> int:
    """`value` as the chief has it, on every worker (a collective: every worker must call it)."""
    import tensorflow as tf

    share = float(value) / len(strategy.extended.worker_devices) if is_chief else 0.0
    values = strategy.experimental_distribute_values_from_function(lambda _: tf.constant(share))
    return round(float(strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None)))


def _tail_left_out(examples: int, batch_size: int) -> int:
    """Under a multi-worker strategy, the examples of a last batch too small to give every replica
    one (Keras 3 fails on a replica's empty batch: "input depth must be evenly divisible by filter
    depth"); 0 otherwise, and under any other strategy."""
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 0
    replicas = strategy.num_replicas_in_sync
    if batch_size < replicas:
        raise ConfigError(f"train.batch_size must be at least the number of replicas ({replicas}), got {batch_size}")
    tail = examples % batch_size
    return tail if tail < replicas else 0


def batches_per_pass(examples: int, batch_size: int) -> int:
    """How many batches one pass over `examples` gives, once `whole_batches` has left out a tail."""
    return math.ceil(examples / batch_size) - (1 if _tail_left_out(examples, batch_size) else 0)


def whole_batches(dataset: tf.data.Dataset, examples: int, batch_size: int) -> tf.data.Dataset:
    """`dataset` (batches of passes over `examples`) without a last batch per pass that cannot give
    every replica of a multi-worker strategy an example: at most (replicas - 1) examples per pass."""
    import tensorflow as tf

    tail = _tail_left_out(examples, batch_size)
    if not tail:
        return dataset
    log.info("multi_worker: the last %d example(s) of each pass are left out", tail)
    return dataset.filter(lambda images, labels: tf.shape(labels)[0] == batch_size)


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
