"""`transferlab export`: a trained `.keras` model as a TensorFlow SavedModel or a TFLite file.

Both exports are checked before returning: one probe image goes through the exported model
and through Keras, and the probabilities must agree.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from transferlab.errors import ModelError, TransferlabError, first_line
from transferlab.inference import load_model, model_image_size

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

ExportFormat = Literal["savedmodel", "tflite"]
# Largest allowed difference between Keras and exported probabilities on the probe image.
TOLERANCE = 1e-3


def probe_image(image_size: int) -> np.ndarray:
    """A deterministic (1, size, size, 3) float32 image in [0, 255] (smooth colour gradients)."""
    ramp = np.linspace(0.0, 255.0, image_size, dtype=np.float32)
    red = np.tile(ramp[None, :], (image_size, 1))
    green = np.tile(ramp[:, None], (1, image_size))
    blue = np.full((image_size, image_size), 96.0, dtype=np.float32)
    return np.round(np.stack([red, green, blue], axis=-1))[None].astype(np.float32)


def _check_agreement(expected: np.ndarray, got: np.ndarray, what: str) -> float:
    diff = float(np.max(np.abs(np.asarray(expected, dtype=np.float64) - np.asarray(got, dtype=np.float64))))
    if np.shape(expected) != np.shape(got) or diff > TOLERANCE:
        raise ModelError(f"{what} disagrees with the Keras model (max difference {diff:.2g} > {TOLERANCE})")
    log.info("%s matches Keras on a probe image (max difference %.2g)", what, diff)
    return diff


def export_savedmodel(model: keras.Model, out: Path) -> Path:
    """`model.export` to a SavedModel folder with a `serve` endpoint; verified by reloading it."""
    import tensorflow as tf

    model.export(str(out), format="tf_saved_model", verbose=False)
    image = probe_image(model_image_size(model))
    reloaded = tf.saved_model.load(str(out))
    _check_agreement(model.predict(image, verbose=0), reloaded.serve(tf.constant(image)).numpy(), "SavedModel")
    return out


def run_tflite(path: Path, image: np.ndarray) -> np.ndarray:
    """Probabilities of a TFLite classifier for one (1, size, size, 3) float32 image."""
    import tensorflow as tf

    with warnings.catch_warnings():  # tf.lite.Interpreter announces its move to ai-edge-litert
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    interpreter.set_tensor(source["index"], image.astype(source["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(target["index"])


def export_tflite(model: keras.Model, out: Path) -> Path:
    """Convert (via a temporary SavedModel) to a float32 `.tflite` file; verified with the interpreter."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="transferlab-export-") as tmp:
        saved = Path(tmp) / "savedmodel"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        try:
            flatbuffer = tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert()
        except Exception as exc:  # converter errors are long MLIR dumps; keep the first line
            raise ModelError(f"TFLite conversion failed: {first_line(exc)}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(flatbuffer)
    image = probe_image(model_image_size(model))
    _check_agreement(model.predict(image, verbose=0), run_tflite(out, image), "TFLite model")
    return out


def export_model(model_path: Path, out: Path, fmt: ExportFormat) -> Path:
    """Export `model_path` to `out` in format `fmt`; refuses to overwrite an existing path."""
    if fmt not in ("savedmodel", "tflite"):
        raise TransferlabError(f"unknown export format {fmt!r}: use savedmodel or tflite")
    if out.exists():
        raise TransferlabError(f"{out} already exists: remove it or choose another output path")
    model = load_model(model_path)
    model_image_size(model)
    exported = export_savedmodel(model, out) if fmt == "savedmodel" else export_tflite(model, out)
    log.info("exported %s as %s to %s", model_path, fmt, exported)
    return exported
