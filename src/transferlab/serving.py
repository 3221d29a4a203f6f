"""The MLflow pyfunc wrapper that serves a trained classifier over HTTP.

Request (`POST /invocations`, `Content-Type: application/json`), one row per image, the image
file's bytes (JPEG, PNG, ...) base64-encoded in a string column `image`:

    {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ["<base64>"]]}}
    {"dataframe_records": [{"image": "<base64>"}, {"image": "<base64>"}]}

Response: `{"predictions": [{"label": "roses", "probability": 0.93, "daisy": 0.01, ...}, ...]}`,
one record per row: the top label, its probability and one probability column per class.

Limits: at most `max_rows` rows per request (`TRANSFERLAB_SERVE_MAX_ROWS` when the server
starts, default 256), decoded and scored `CHUNK_ROWS` at a time (`CHUNK_ROWS` squares, for a
model with test-time crops), and no image over
`images.MAX_IMAGE_PIXELS`. A request that breaks one, or holds an unreadable image, gets HTTP 400
with the reason (and the row) in its `message`.

Only `transferlab.tracking` (`Run.log_model`) calls `log_image_classifier`; this module,
`tracking` and `model_server` (MLflow's scoring server, behind a bound on request bodies in bytes)
are the only ones that touch `mlflow`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib.metadata
import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from transferlab.images import CENTRAL, square_positions

log = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
PROBABILITY_COLUMN = "probability"
KERAS_ARTIFACT = "keras_model"
# Rows decoded and scored per model call: a request's memory is bounded by this, not by its size.
CHUNK_ROWS = 32
# Rows one request may hold. The server reads MAX_ROWS_ENV when it loads the model; from Python,
# `mlflow.pyfunc.load_model(uri, model_config={"max_rows": N})` sets it too.
DEFAULT_MAX_ROWS = 256
MAX_ROWS_ENV = "TRANSFERLAB_SERVE_MAX_ROWS"
# The "models from code" script MLflow stores with the model and runs to rebuild it.
MODEL_SCRIPT = """\
from mlflow.models import set_model

from transferlab.serving import ImageClassifierModel

set_model(ImageClassifierModel())
"""
# Distributions the served model needs, pinned to the versions installed here. The first
# installed name of each group is used (TensorFlow ships as tensorflow, -cpu or -macos).
REQUIREMENT_GROUPS = (
    ("mlflow", "mlflow-skinny"),
    ("tensorflow-cpu", "tensorflow", "tensorflow-macos"),
    ("keras",),
    ("numpy",),
    ("pandas",),
    ("pillow",),
    ("cloudpickle",),
)


class BadRequestError(MlflowException, ValueError):
    """A request the model refuses; the scoring server answers HTTP 400 with this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def max_rows_setting(config: dict[str, Any]) -> int:
    """Rows per request: MAX_ROWS_ENV, else `model_config["max_rows"]`, else DEFAULT_MAX_ROWS."""
    import os

    raw = os.environ.get(MAX_ROWS_ENV) or config.get("max_rows", DEFAULT_MAX_ROWS)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_ROWS_ENV} (or model_config max_rows) must be a whole number >= 1, got {raw!r}")
    return value


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """Base64 image files in, top label and per-class probabilities out.

    Logged as "models from code" (no pickle): `MODEL_SCRIPT` builds it, and the class names
    and input size come from the logged `model_config`.
    """

    def __init__(self) -> None:
        self.classes: list[str] = []
        self.image_size = 0
        self.positions: tuple[float, ...] = CENTRAL  # where its squares sit: `images.square_positions`
        self.max_rows = DEFAULT_MAX_ROWS
        self._model: Any = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the `.keras` file logged as the `keras_model` artifact, and the class names."""
        from transferlab.console import quiet_imports

        quiet_imports()  # before TensorFlow loads: no C++ start-up chatter in the server's log
        from transferlab.inference import load_model, model_crops, model_image_size

        config = context.model_config or {}
        self._model = load_model(Path(context.artifacts[KERAS_ARTIFACT]))
        self.image_size = int(config.get("image_size") or model_image_size(self._model))
        self.positions = square_positions(model_crops(self._model))
        self.classes = list(config.get("classes") or [])
        self.max_rows = max_rows_setting(config)
        outputs = int(self._model.output_shape[-1])
        if len(self.classes) != outputs:
            raise ValueError(f"model_config lists {len(self.classes)} classes but the model has {outputs} outputs")

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One output row per input row, scored CHUNK_ROWS at a time (CHUNK_ROWS / crops for a model
        with test-time crops).

        `BadRequestError` (HTTP 400) for more than `max_rows` rows, or an unreadable or oversized
        image (naming its row).
        """
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if IMAGE_COLUMN not in frame.columns:
            raise BadRequestError(f"input needs a string column {IMAGE_COLUMN!r} of base64-encoded image files")
        if len(frame) > self.max_rows:
            raise BadRequestError(
                f"request has {len(frame)} rows, over the limit of {self.max_rows} ({MAX_ROWS_ENV}): "
                "send the images in smaller requests"
            )
        images = frame[IMAGE_COLUMN].tolist()
        rows = max(1, CHUNK_ROWS // len(self.positions))  # a model with test-time crops takes several squares a row
        chunks = [self._score(images[start : start + rows], start) for start in range(0, len(images), rows)]
        probabilities = np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes)))
        return to_output_frame(probabilities, self.classes)

    def _score(self, values: Sequence[object], first_row: int) -> np.ndarray:
        from transferlab.inference import predict_pixels

        pixels = np.stack([self._decode(value, first_row + offset) for offset, value in enumerate(values)])
        return predict_pixels(self._model, pixels)

    def _decode(self, value: object, row: int) -> np.ndarray:
        from transferlab.images import decode_image_bytes

        if not isinstance(value, str | bytes):
            raise BadRequestError(f"row {row}: {IMAGE_COLUMN!r} must be a base64 string, got {type(value).__name__}")
        text = value.decode("latin-1") if isinstance(value, bytes) else value  # base64 is ASCII
        if text.startswith("data:") and "," in text:  # tolerate data URLs
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequestError(f"row {row}: {IMAGE_COLUMN!r} is not valid base64") from exc
        try:
            return decode_image_bytes(data, self.image_size, self.positions)
        except ValueError as exc:
            raise BadRequestError(f"row {row}: {exc}") from exc


def to_output_frame(probabilities: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """`label`, `probability` (of that label) and one column per class, one row per image."""
    best = np.argmax(probabilities, axis=1)
    frame = pd.DataFrame(
        {
            LABEL_COLUMN: [classes[i] for i in best],
            PROBABILITY_COLUMN: probabilities[np.arange(len(best)), best],
        }
    )
    per_class = pd.DataFrame(probabilities, columns=list(classes))
    return pd.concat([frame, per_class], axis=1)


def encode_image_file(path: Path) -> str:
    """Base64 text of an image file, as the `image` column expects."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def model_signature(classes: Sequence[str]) -> mlflow.models.ModelSignature:
    """Input: string column `image`; output: `label`, `probability`, one double per class."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("string", LABEL_COLUMN), ColSpec("double", PROBABILITY_COLUMN)]
    outputs += [ColSpec("double", name) for name in classes]
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]), outputs=Schema(outputs))


def _example_image() -> str:
    """A tiny grey PNG, base64-encoded: the logged input example."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def pip_requirements() -> list[str]:
    """Exact installed versions, so MLflow does not infer requirements (slow) or guess them."""
    pins = []
    for group in REQUIREMENT_GROUPS:
        for name in group:
            try:
                pins.append(f"{name}=={importlib.metadata.version(name)}")
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return pins


@contextlib.contextmanager
def requirements_taken_as_installed() -> Iterator[None]:
    """Skip MLflow's check, while a model is logged, that its pip requirements match this
    environment.

    `pip_requirements()` reads them from this environment, so the check cannot find a mismatch.
    Its first call in a process maps every installed distribution to its modules by reading their
    file lists: 0.3 s of a run's model logging (README, "Performance"). Loading a logged model
    still checks (`mlflow.pyfunc.load_model`). Not thread-safe: a process logs one model at a time.
    Should MLflow move the check, nothing is skipped and nothing else changes.
    """
    from mlflow.utils import environment

    check = getattr(environment, "warn_dependency_requirement_mismatches", None)
    if check is None:
        yield
        return
    environment.warn_dependency_requirement_mismatches = lambda requirements: None
    try:
        yield
    finally:
        environment.warn_dependency_requirement_mismatches = check


def unpack_classifier(model_dir: Path, uri: str) -> tuple[Path, list[str]]:
    """The `.keras` file and class names in `model_dir`, the MLflow model `uri` downloaded there
    (logged by `log_image_classifier`)."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from transferlab.errors import ModelError

    try:
        flavor = Model.load(str(model_dir)).flavors["python_function"]
        keras_file = model_dir / flavor["artifacts"][KERAS_ARTIFACT]["path"]
        classes = list(flavor["config"]["classes"])
    except (MlflowException, OSError, KeyError, TypeError) as exc:
        raise ModelError(f"{uri} is not an image classifier logged by transferlab") from exc
    return keras_file, classes


class _PyfuncFlavor:
    """`mlflow.pyfunc` as the flavor `Model.log` saves with, MLflow's serving check turned off.

    With an input example, `Model.log` loads the model it just saved, serves the example through
    it and, if that fails, only warns (`validate_serving_input`, the switch MLflow's own
    transformers flavor turns off): a second load of the Keras file, 1-2 s of every run. The
    wrapper it would check is the same code for every model, checked by the serving tests; the
    example is still logged, and `transferlab evaluate` loads the saved model itself.
    """

    @staticmethod
    def save_model(path: str, mlflow_model: mlflow.models.Model, **kwargs: Any) -> None:
        kwargs.pop("validate_serving_input", None)  # read by Model.log, unknown to pyfunc.save_model
        mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **kwargs)


def log_image_classifier(
    model_file: Path,
    classes: Sequence[str],
    image_size: int,
    client: mlflow.MlflowClient,
    run: mlflow.entities.Run,
    name: str = "model",
) -> mlflow.models.model.ModelInfo:
    """Log the `.keras` file as pyfunc model `name` of `run`: servable and self-contained.

    The run need not be active (a sweep logs its best child's model at the end). Nothing is
    inferred or re-checked at log time: the signature, one input example and the exact pip
    requirements are given, MLflow's serving check is off (`_PyfuncFlavor`), and so is its check
    of those requirements against this environment (`requirements_taken_as_installed`).
    """
    import transferlab

    logged = client.create_logged_model(  # in the run's experiment (MLflow would pick the active one)
        run.info.experiment_id, name=name, source_run_id=run.info.run_id, params=run.data.params
    )
    with tempfile.TemporaryDirectory(prefix="transferlab-serving-") as tmp, requirements_taken_as_installed():
        script = Path(tmp) / "image_classifier.py"
        script.write_text(MODEL_SCRIPT)
        info = mlflow.models.Model.log(
            artifact_path=None,  # MLflow 3 names a logged model by `name`
            name=name,
            flavor=_PyfuncFlavor,
            run_id=run.info.run_id,
            model_id=logged.model_id,
            python_model=str(script),
            artifacts={KERAS_ARTIFACT: str(model_file)},
            model_config={"classes": list(classes), "image_size": int(image_size)},
            signature=model_signature(classes),
            input_example=pd.DataFrame({IMAGE_COLUMN: [_example_image()]}),
            pip_requirements=pip_requirements(),
            code_paths=[str(Path(transferlab.__file__).resolve().parent)],
            validate_serving_input=False,
        )
    log.info("logged MLflow model %s (%s)", info.model_uri, info.model_id)
    return info
