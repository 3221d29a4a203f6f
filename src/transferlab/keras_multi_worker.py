"""Make Keras 3.15's `Model.fit` work under `tf.distribute.MultiWorkerMirroredStrategy`.

With more than one worker, Keras 3.15 (TensorFlow backend) fails in `fit` twice over
(keras-team/keras#20585, tensorflow/tensorflow#72388; Keras 2 did not):

1. before the first step, `_maybe_symbolic_build` asks the strategy to reduce the first batch,
   a nested (images, labels) structure of per-worker values, which the collective strategy
   cannot do: "ValueError: Attempt to convert a value (PerReplica...)". The model only needs the
   batch's shapes, so it is built from this worker's own part of the batch instead;
2. after every step, `reduce_per_replica` averages the scalar logs (loss, accuracy) with
   `strategy.reduce("MEAN", value, axis=0)`: "Invalid reduction dimension 0 for input with 0
   dimensions". They are averaged with `axis=None` instead (the mean over replicas).

Both replace private Keras functions, so the patch is applied only for `train.strategy=
multi_worker`, only on the Keras versions it was tested with (`TESTED_VERSIONS`), and refuses
any other with one line. On an upgrade: run `tests/test_multi_worker.py`; if Keras fixed the bug,
delete this module and its call in `transferlab.runtime`.
"""

from __future__ import annotations

import logging
from typing import Any

from transferlab.errors import TransferlabError

log = logging.getLogger(__name__)

TESTED_VERSIONS = ("3.15.",)
_PATCHED_FLAG = "_transferlab_multi_worker_patch"


def apply() -> None:
    """Patch Keras' TensorFlow trainer once per process; a Keras version not tested is an error."""
    import keras
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    if not keras.__version__.startswith(TESTED_VERSIONS):
        raise TransferlabError(
            f"train.strategy=multi_worker needs Keras {' or '.join(v + 'x' for v in TESTED_VERSIONS)} "
            f"(transferlab.keras_multi_worker works around keras-team/keras#20585 there); Keras {keras.__version__} "
            "is installed: use the pinned versions (requirements.lock)"
        )
    if getattr(trainer, _PATCHED_FLAG, False):
        return
    original_build = trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = trainer.reduce_per_replica

    def maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> Any:
        if self._distribute_strategy is not None and iterator is not None:
            for _, _, batches in iterator:
                batch = next(batches)  # fit() resets the iterator before the first step
                break
            data_batch = tree.map_structure(
                lambda value: (
                    self._distribute_strategy.experimental_local_results(value)[0]
                    if isinstance(value, tf.distribute.DistributedValues)
                    else value
                ),
                batch,
            )
            iterator = None
        return original_build(self, iterator=iterator, data_batch=data_batch)

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(lambda value: strategy.reduce("MEAN", value, axis=None), values)
        return original_reduce(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    setattr(trainer, _PATCHED_FLAG, True)
    log.info("Keras %s patched for MultiWorkerMirroredStrategy (keras-team/keras#20585)", keras.__version__)
