"""`transferlab export`: a trained `.keras` model as a TensorFlow SavedModel or a TFLite file.

Both exports are checked before returning: one probe image goes through the exported model
and through Keras, and the probabilities must agree. Both carry their class names, so an
export is usable on its own (`transferlab predict EXPORT IMAGES` needs no `data/splits/`):
- SavedModel: `assets.extra/classes.json` (TensorFlow's folder for files that accompany a
  SavedModel without being loaded by its graph);
- TFLite: a metadata entry `transferlab.classes` in the flatbuffer, holding the JSON list.
`load_export` reads either back as an `ExportedClassifier`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from transferlab.compiled import ConversionError, tflite_interpreter, to_tflite
from transferlab.errors import ModelError, TransferlabError, first_line
from transferlab.images import input_shape
from transferlab.inference import find_classes, load_model, model_crops, model_image_size

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

ExportFormat = Literal["savedmodel", "tflite"]
# Largest allowed difference between Keras and exported probabilities on the probe image.
TOLERANCE = 1e-3
SAVEDMODEL_CLASSES = Path("assets.extra") / "classes.json"  # inside the SavedModel folder
TFLITE_CLASSES = "transferlab.classes"  # name of the TFLite metadata entry with the class names


@dataclass(frozen=True)
class ExportedClassifier:
    """An export ready to predict: its input size, class names, and pixels -> probabilities."""

    image_size: int
    classes: list[str] | None  # None: an export written before exports carried their classes
    probabilities: Callable[[np.ndarray], np.ndarray]  # (n, *image_shape) float32 RGB in [0, 255]
    crops: int = 1  # squares of each photo (`images.square_positions`): a model with test-time crops

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One image's input: (size, size, 3), or (crops, size, size, 3)."""
        return input_shape(self.image_size, self.crops)

    @classmethod
    def of_input_shape(
        cls, shape: Sequence[int | None], classes: list[str] | None, probabilities: Callable[[np.ndarray], np.ndarray]
    ) -> ExportedClassifier:
        """From the exported input's shape: (batch, size, size, 3) or (batch, crops, size, size, 3)."""
        sizes = [int(side) for side in shape[1:] if side is not None and side >= 1]
        if len(shape) not in (4, 5) or len(sizes) != len(shape) - 1:
            raise ModelError(f"export input must be (1, size, size, 3) or (1, crops, size, size, 3), got {shape}")
        return cls(sizes[-2], classes, probabilities, sizes[0] if len(sizes) == 4 else 1)


def is_export(path: Path) -> bool:
    """A SavedModel folder or a `.tflite` file (rather than a `.keras` model)."""
    return (path / "saved_model.pb").is_file() or path.suffix.lower() == ".tflite"


def probe_image(image_size: int, crops: int = 1) -> np.ndarray:
    """A deterministic (1, size, size, 3) float32 image in [0, 255] (smooth colour gradients); for
    a model with test-time crops, (1, crops, size, size, 3), each square shifted differently."""
    ramp = np.linspace(0.0, 255.0, image_size, dtype=np.float32)
    red = np.tile(ramp[None, :], (image_size, 1))
    green = np.tile(ramp[:, None], (1, image_size))
    blue = np.full((image_size, image_size), 96.0, dtype=np.float32)
    square = np.round(np.stack([red, green, blue], axis=-1)).astype(np.float32)
    if crops == 1:
        return square[None]
    return np.stack([np.roll(square, i * image_size // crops, axis=1) for i in range(crops)])[None]


def model_probe_image(model: keras.Model) -> np.ndarray:
    """`probe_image` shaped for `model`'s input."""
    return probe_image(model_image_size(model), model_crops(model))


def _check_agreement(expected: np.ndarray, got: np.ndarray, what: str) -> float:
    diff = float(np.max(np.abs(np.asarray(expected, dtype=np.float64) - np.asarray(got, dtype=np.float64))))
    if np.shape(expected) != np.shape(got) or diff > TOLERANCE:
        raise ModelError(f"{what} disagrees with the Keras model (max difference {diff:.2g} > {TOLERANCE})")
    log.info("%s matches Keras on a probe image (max difference %.2g)", what, diff)
    return diff


def export_savedmodel(model: keras.Model, out: Path, classes: Sequence[str]) -> Path:
    """`model.export` to a SavedModel folder with a `serve` endpoint and its class names; verified by reloading it."""
    model.export(str(out), format="tf_saved_model", verbose=False)
    (out / SAVEDMODEL_CLASSES).parent.mkdir(exist_ok=True)
    (out / SAVEDMODEL_CLASSES).write_text(json.dumps(list(classes)) + "\n")
    image = model_probe_image(model)
    reloaded = load_export(out)
    _check_agreement(model.predict(image, verbose=0), reloaded.probabilities(image), "SavedModel")
    return out


def _load_savedmodel(path: Path) -> ExportedClassifier:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    inputs = loaded.signatures["serving_default"].structured_input_signature[1]
    (spec,) = inputs.values()
    classes_file = path / SAVEDMODEL_CLASSES
    classes = json.loads(classes_file.read_text()) if classes_file.is_file() else None

    def probabilities(pixels: np.ndarray) -> np.ndarray:
        return loaded.serve(tf.constant(pixels, dtype=tf.float32)).numpy()  # `loaded` keeps the variables alive

    return ExportedClassifier.of_input_shape(tuple(spec.shape), classes, probabilities)


def run_tflite(path: Path, image: np.ndarray) -> np.ndarray:
    """Probabilities of a TFLite classifier for one float32 image shaped as its input ((1, size, size, 3))."""
    return _load_tflite(path).probabilities(image)


def _load_tflite(path: Path) -> ExportedClassifier:
    interpreter = tflite_interpreter(model_path=path)
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]

    def probabilities(pixels: np.ndarray) -> np.ndarray:
        rows = []
        for image in pixels:  # the converted model takes one image at a time
            interpreter.set_tensor(source["index"], image[None].astype(source["dtype"]))
            interpreter.invoke()
            rows.append(interpreter.get_tensor(target["index"])[0])
        return np.stack(rows) if rows else np.zeros((0, int(target["shape"][-1])), dtype=np.float32)

    return ExportedClassifier.of_input_shape(tuple(source["shape"]), _tflite_classes(path.read_bytes()), probabilities)


def _with_tflite_classes(flatbuffer: bytes, classes: Sequence[str]) -> bytes:
    """The flatbuffer with a metadata entry `transferlab.classes` (a buffer holding the JSON list)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(list(classes)).encode(), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = TFLITE_CLASSES
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _tflite_classes(flatbuffer: bytes) -> list[str] | None:
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == TFLITE_CLASSES:
            return json.loads(bytes(model.buffers[entry.buffer].data).decode())
    return None


def export_tflite(model: keras.Model, out: Path, classes: Sequence[str]) -> Path:
    """Convert (via a temporary SavedModel) to a float32 `.tflite` file with its class names;
    verified with the interpreter."""
    try:
        flatbuffer = to_tflite(model)
    except ConversionError as exc:
        raise ModelError(f"TFLite conversion failed: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(_with_tflite_classes(flatbuffer, classes))
    image = model_probe_image(model)
    _check_agreement(model.predict(image, verbose=0), run_tflite(out, image), "TFLite model")
    return out


def load_export(path: str | Path) -> ExportedClassifier:
    """A SavedModel folder or `.tflite` file written by `export_model`, ready to predict."""
    path = Path(path)
    try:
        return _load_savedmodel(path) if path.is_dir() else _load_tflite(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the export {path}: {first_line(exc)}") from exc


def export_model(model_path: Path, out: Path, fmt: ExportFormat, source: str | None = None) -> Path:
    """Export `model_path` to `out` in format `fmt`, with its class names; refuses to overwrite an existing path.

    `source` names the model in the log as the user gave it (a `models:/` URI fetched into `model_path`).
    """
    if fmt not in ("savedmodel", "tflite"):
        raise TransferlabError(f"unknown export format {fmt!r}: use savedmodel or tflite")
    if out.exists():
        raise TransferlabError(f"{out} already exists: remove it or choose another output path")
    model = load_model(model_path)
    model_image_size(model)
    classes = find_classes(model_path, int(model.output_shape[-1]))
    if classes is None:
        raise ModelError(
            f"no classes.json with {model.output_shape[-1]} class names beside {model_path} or in the project's "
            "data/splits/: export from the project that trained it, or put its classes.json beside it"
        )
    exported = export_savedmodel(model, out, classes) if fmt == "savedmodel" else export_tflite(model, out, classes)
    log.info("exported %s as %s to %s, with its %d class names", source or model_path, fmt, exported, len(classes))
    return exported
