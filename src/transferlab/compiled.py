"""Frozen forward passes on a TensorFlow Lite copy of the frozen part (XNNPACK kernels on CPU).

The feature and cut-point caches run the frozen part of a backbone over every image, once per
view. On CPU, TensorFlow Lite's XNNPACK kernels run these networks 2-3 times faster than
TensorFlow's own (MobileNetV2-0.35 at 224 px on 2 cores: 1,195 against 447 images/s on tensors
in memory). So the frozen part is converted once per backbone, weights, image size, tensor and
TensorFlow/Keras version (a few seconds), checked against Keras on a probe batch, and kept in
`data/cache/compiled/` with the SHA-256 of its bytes, checked on every load; every later pass on
this machine reuses it, and a process that finds another converting it waits for that copy
(`locks.computing_alone`). `keras_only_reason` says when Keras runs the pass instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab import atomic
from transferlab.console import quiet_c_stderr
from transferlab.errors import first_line
from transferlab.locks import LOCKS_DIR, computing_alone

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Largest difference between the converted model and Keras on the probe batch, relative to the
# largest activation of that output (float32 kernels summing in another order differ by ~1e-6).
TOLERANCE = 1e-3
PROBE_IMAGES = 2
MESSAGE_CHARS = 160  # of a converter error, in the warning
# Copies loaded or refused in this process, by file: every sweep job and stage reuses them, and a
# frozen part that cannot be converted is tried (and warned about) once per process.
_LOADED: dict[Path, CompiledModel | None] = {}


class ConversionError(Exception):
    """The TFLite converter refused a model (its message: the converter's first line)."""


def usable_cores() -> int:
    """Cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tflite_interpreter(*, model_path: Path | None = None, model_content: bytes | None = None) -> Any:
    """A `tf.lite.Interpreter` on every usable core, without its start-up chatter (the notice
    of its move to ai-edge-litert, XNNPACK's INFO line on fd 2)."""
    import tensorflow as tf

    with warnings.catch_warnings(), quiet_c_stderr():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        interpreter = tf.lite.Interpreter(
            model_path=None if model_path is None else str(model_path),
            model_content=model_content,
            num_threads=usable_cores(),
        )
        interpreter.allocate_tensors()
    return interpreter


class CompiledModel:
    """A converted model: batches of float32 pixels in, its outputs in Keras's order out."""

    def __init__(self, interpreter: Any) -> None:
        self._run = interpreter.get_signature_runner()
        # Keras exports name their outputs output_0, output_1, ... in the model's order.
        self.output_names = sorted(self._run.get_output_details(), key=lambda name: int(name.rsplit("_", 1)[-1]))
        (self.input_name,) = self._run.get_input_details()
        self._batch_shape: tuple[int, ...] | None = None

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        pixels = np.ascontiguousarray(batch, dtype=np.float32)
        if pixels.shape == self._batch_shape:
            outputs = self._run(**{self.input_name: pixels})
        else:
            with quiet_c_stderr():  # a new batch shape re-plans XNNPACK, which says so on fd 2
                outputs = self._run(**{self.input_name: pixels})
            self._batch_shape = pixels.shape
        return [outputs[name] for name in self.output_names]

    def predict(self, batches: Iterable[np.ndarray], on_batch: Callable[[], object] | None = None) -> list[np.ndarray]:
        """Every batch's outputs, concatenated per output; `on_batch()` after each batch."""
        per_batch = []
        for batch in batches:
            per_batch.append(self(batch))
            if on_batch is not None:
                on_batch()
        return [np.concatenate(parts) for parts in zip(*per_batch, strict=True)]


def keras_only_reason(model: keras.Model) -> str | None:
    """Why Keras should run `model`'s forward pass itself, or None when a TFLite copy may.

    A visible GPU runs TensorFlow faster than TFLite runs on the CPU; a model computing in another
    precision than float32 (mixed precision) would compute differently when converted.
    """
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "a GPU is visible"
    compute = getattr(model.dtype_policy, "compute_dtype", "float32")
    if compute != "float32":
        return f"the model computes in {compute}"
    return None


def to_tflite(model: keras.Model) -> bytes:
    """The float32 TFLite flatbuffer of `model`, via a temporary SavedModel (for the copies here
    and for `transferlab export`).

    `ConversionError` with the first line of the converter's message; its diagnostics on fd 2
    (MLIR dumps) stay out of the terminal.
    """
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="transferlab-compile-") as tmp, quiet_c_stderr(keep=lambda line: False):
        saved = Path(tmp) / "savedmodel"
        try:
            model.export(str(saved), format="tf_saved_model", verbose=False)
            return tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert()
        except Exception as exc:  # the converter's errors are MLIR dumps on one line
            failure = exc
    raise ConversionError(first_line(failure)) from failure


def _probe_batch(model: keras.Model) -> np.ndarray:
    """A deterministic batch of pixels in [0, 255] shaped as `model`'s input."""
    shape = (PROBE_IMAGES, *(int(side) for side in model.input_shape[1:]))
    return np.random.default_rng(0).uniform(0.0, 255.0, shape).astype(np.float32)


def disagreement(model: keras.Model, compiled: Callable[[np.ndarray], list[np.ndarray]]) -> float:
    """Largest difference between `compiled` and `model` on the probe batch, each output's
    relative to its own largest activation (random-init networks have tiny ones)."""
    probe = _probe_batch(model)
    expected = model(probe, training=False)
    expected = [np.asarray(e) for e in (expected if isinstance(expected, list | tuple) else [expected])]
    got = compiled(probe)
    if [e.shape for e in expected] != [np.shape(g) for g in got]:
        return float("inf")
    return max(
        float(np.max(np.abs(e - g))) / max(float(np.max(np.abs(e))), np.finfo(np.float32).tiny)
        for e, g in zip(expected, got, strict=True)
    )


class CompiledModels:
    """A folder of `<key>.tflite` files, each a converted frozen part, with `<key>.sha256` beside it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @staticmethod
    def key_digest(key: dict[str, object]) -> str:
        """Digest of the key (backbone, weights, image size, tensor...) and this TensorFlow's and Keras's versions."""
        import keras
        import tensorflow as tf

        payload = {**key, "tensorflow": tf.__version__, "keras": keras.__version__, "format": FORMAT_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]

    def path(self, digest: str) -> Path:
        return self.directory / f"{digest}.tflite"

    def lock_path(self, digest: str) -> Path:
        """The lock a process holds while it loads or converts the copy of `digest` (locks.py)."""
        return self.directory / LOCKS_DIR / f"{digest}.lock"

    def get(self, model: keras.Model, key: dict[str, object]) -> CompiledModel | None:
        """`model` converted (or loaded from an earlier conversion), or None when Keras should run it.

        A process that finds another converting the same copy waits for it, then loads its copy.
        """
        digest = self.key_digest(key)
        path = self.path(digest)
        if path not in _LOADED:
            with computing_alone(self.lock_path(digest), "a TensorFlow Lite copy of the frozen part"):
                _LOADED[path] = self._load(path) or self._compile(model, path)
        return _LOADED[path]

    def _load(self, path: Path) -> CompiledModel | None:
        if not path.is_file():
            return None
        try:
            flatbuffer = path.read_bytes()
            if path.with_suffix(".sha256").read_text().strip() != hashlib.sha256(flatbuffer).hexdigest():
                raise ValueError("its SHA-256 does not match")
            return CompiledModel(tflite_interpreter(model_content=flatbuffer))
        except (OSError, ValueError, RuntimeError) as exc:
            log.info("compiled model %s is unreadable (%s): converting again", path.name, first_line(exc))
            return None

    def _compile(self, model: keras.Model, path: Path) -> CompiledModel | None:
        log.info("converting the frozen part to TensorFlow Lite, once for this backbone, weights and size")
        try:
            flatbuffer = to_tflite(model)
            compiled = CompiledModel(tflite_interpreter(model_content=flatbuffer))
            difference = disagreement(model, compiled)
        except Exception as exc:  # ConversionError, or the interpreter refusing what the converter made
            message = first_line(exc)
            shown = message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + "..."
            log.warning("TensorFlow Lite conversion failed, Keras runs the frozen part: %s", shown)
            return None
        if not difference <= TOLERANCE:
            log.warning(
                "the TensorFlow Lite copy disagrees with Keras (relative difference %.2g > %g): Keras runs the "
                "frozen part",
                difference,
                TOLERANCE,
            )
            return None
        log.info("TensorFlow Lite copy matches Keras (relative difference %.2g)", difference)
        try:  # the copy, then its checksum: a copy without one is converted again
            atomic.write_file(path, lambda tmp: tmp.write_bytes(flatbuffer))
            checksum = hashlib.sha256(flatbuffer).hexdigest()
            atomic.write_file(path.with_suffix(".sha256"), lambda tmp: tmp.write_text(checksum + "\n"))
        except OSError as exc:
            log.warning("cannot keep the TensorFlow Lite copy in %s (%s): this run uses it", self.directory, exc)
        return compiled
